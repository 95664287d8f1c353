"""Tensor math: the model's layers, attention, the KV store, sampling, and the C kernels' bindings."""

import importlib.util

C_KERNELS = ("_elementwise", "_attention", "_matmul", "_sampling")  # built at install time where a C compiler is present


def unbuilt_kernels() -> tuple[str, ...]:
    """The C kernels this install lacks (found without importing them, or torch)."""
    return tuple(name for name in C_KERNELS if importlib.util.find_spec(f"glinthawk.compute.{name}") is None)


def unbuilt_warning() -> str | None:
    """One line to show where C kernels were not built: a run then silently takes torch's much
    slower CPU paths for attention and sampling (a fifth to a third of the engine's throughput,
    measured), and oneDNN for float32 matmuls on AVX-512F."""
    if not (missing := unbuilt_kernels()):
        return None
    return (f"glinthawk's C kernels ({', '.join(missing)}) are not built, so CPU attention, sampling and float32 "
            "matmuls run on slower paths; reinstall with a C compiler present (pip install -e . builds them)")
