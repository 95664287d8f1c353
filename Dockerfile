# Glinthawk node image; the entrypoint is glinthawk-node, and `glinthawk` (submit, run, ...) is on PATH too.
#
# CPU torch by default (Tier 2 nodes never need more). For a CUDA Tier 1, pick a PyTorch wheel variant:
#   docker build --build-arg TORCH_VARIANT=cu128 -t glinthawk:cuda .
# (TORCH_VERSION must exist for that variant; TORCH_INDEX overrides the whole index URL.)
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/glinthawk
# torch first, in its own layer: it is by far the largest and changes least.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml setup.py README.md LICENSE ./
COPY glinthawk ./glinthawk
# The C kernels need a compiler to build; it leaves in the same layer.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install --no-cache-dir . \
    && (cd / && python -c "from glinthawk.compute import _attention, _elementwise") \
    && apt-get purge -y --auto-remove gcc libc6-dev && rm -rf /var/lib/apt/lists/*
EXPOSE 7700 7701
ENTRYPOINT ["glinthawk-node"]
CMD ["--help"]
