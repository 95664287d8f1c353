"""An install without its C kernels runs on torch's slower paths: it must say so, once, not silently."""

import importlib.util

import pytest
from click.testing import CliRunner

from glinthawk.cli import main
from glinthawk.compute import C_KERNELS, unbuilt_kernels, unbuilt_warning


def test_an_install_with_every_c_kernel_says_nothing():
    """(Whether they are built where a compiler is: tests/test_kvcache.py.)"""
    if unbuilt_kernels():
        pytest.skip("the C kernels are not built (no C compiler at install time)")
    assert unbuilt_warning() is None
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0 and "warning" not in result.output


def test_a_missing_kernel_is_named_in_one_warning_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name.endswith("._attention") else real(name, *rest))
    assert unbuilt_kernels() == ("_attention",) and "_attention" in C_KERNELS
    result = CliRunner().invoke(main, ["plan", "--help"])
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "(_attention) are not built" in warnings[0] and "pip install" in warnings[0]
