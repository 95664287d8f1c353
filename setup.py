"""Builds the optional C kernels (decode and bf16 prefill attention; RMSNorm, RoPE and
argmax; sampling; float32 linear layers); everything else is in pyproject.toml.

The extensions are optional: without a C compiler the install still succeeds and torch's
ops do the same work (slower; the same results but for float rounding, which can move a
sampled token at a filter's edge).
"""

from setuptools import Extension, setup

# Included by the .c files (a change to one rebuilds them).
HEADERS = ["_kernels.h", "_openmp.h", "_decode_kernels.h", "_kvint8.h", "_prefill.h", "_softmax16.h"]
# Reassociation lets the sums vectorise; no -ffast-math, which would set flush-to-zero for
# the whole process on some toolchains.
FLAGS = ["-O3", "-std=c11", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(f"glinthawk.compute.{name}", sources=[f"glinthawk/compute/{name}.c"],
                  depends=[f"glinthawk/compute/{header}" for header in HEADERS], extra_compile_args=FLAGS,
                  optional=True)
        for name in ("_attention", "_elementwise", "_matmul", "_sampling")
    ]
)
