"""Thread policy (glinthawk/threads.py): libgomp's spin-wait, left at its default and shortened only
for LocalCluster nodes that share cores; torch threads, set in one place."""

from __future__ import annotations

import os
import subprocess
import sys

from pathlib import Path

import pytest

from glinthawk import threads


def test_importing_glinthawk_leaves_the_spin_wait_alone():
    env = {k: v for k, v in os.environ.items() if k not in threads._USER_SETTINGS}
    code = "import os, glinthawk; print(os.environ.get('GOMP_SPINCOUNT'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["None"]


def test_children_get_a_spin_unless_it_is_the_default_or_the_user_chose_one(monkeypatch):
    for name in threads._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert threads.child_spin_env(threads.SHARED_CORES_SPIN_ROUNDS) == {"GOMP_SPINCOUNT": str(threads.SHARED_CORES_SPIN_ROUNDS)}
    assert threads.child_spin_env(threads.LIBGOMP_SPIN_ROUNDS) == {}  # nothing to set: the child's libgomp defaults to it
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")  # the user's, which the child inherits
    assert threads.child_spin_env(threads.SHARED_CORES_SPIN_ROUNDS) == {}
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert threads.child_spin_env(threads.SHARED_CORES_SPIN_ROUNDS) == {}


def test_one_module_sets_torch_threads():
    """Every thread decision goes through glinthawk/threads.py: no other product module sets them."""
    package = Path(threads.__file__).parent
    setters = [path.relative_to(package).as_posix() for path in package.rglob("*.py")
               if "set_num_threads" in path.read_text(encoding="utf-8")]
    assert setters == ["threads.py"]


def test_use_threads_reaches_children_only_when_asked(monkeypatch):
    import torch

    before = torch.get_num_threads()
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    try:
        threads.use_threads(2)
        assert threads.torch_threads() == 2
        assert not any(name in os.environ for name in threads.THREAD_VARIABLES)
        threads.use_threads(1, children=True)
        assert threads.torch_threads() == 1
        assert all(os.environ[name] == "1" for name in threads.THREAD_VARIABLES)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device,own", [("cpu", False), ("cuda", True)])
def test_tier1_computes_on_the_event_loop_on_the_cpu_only(device, own):
    assert threads.computes_on_own_thread(device) is own


def test_nothing_to_hook_without_a_kernel_module():
    assert threads.hook_openmp(None) is False
