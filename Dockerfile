# Glinthawk node image. CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
# (and a matching TORCH_VERSION) for a CUDA Tier 1.
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
WORKDIR /opt/glinthawk
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
COPY pyproject.toml README.md ./
COPY glinthawk ./glinthawk
RUN pip install --no-cache-dir .
EXPOSE 7700 7701
ENTRYPOINT ["glinthawk-node"]
CMD ["--help"]
