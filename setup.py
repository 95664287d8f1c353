"""Builds the optional C decode-attention kernel; everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and attention
falls back to torch (slower for long decode contexts, same results).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "glinthawk.compute._decode_attention",
            sources=["glinthawk/compute/_decode_attention.c"],
            # Reassociation lets the dot products vectorise; no -ffast-math, which would
            # set flush-to-zero for the whole process on some toolchains.
            extra_compile_args=["-O3", "-std=c11", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
                                "-fno-trapping-math"],
            optional=True,
        )
    ]
)
