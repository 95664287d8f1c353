"""libgomp's spin-wait: shortened when glinthawk loads before torch, left alone otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from glinthawk import omp

PROBE = ("import os, sys; import glinthawk; "
         "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")


def probe(**env_changes: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k not in omp._USER_SETTINGS}
    env.update({k: v for k, v in env_changes.items() if v is not None})
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          check=True).stdout.split()


def test_set_before_torch_loads():
    # torch is loaded by the time glinthawk's import returns: the setting was in place first.
    assert probe() == [str(omp.SPIN_ROUNDS), "True"]


@pytest.mark.parametrize("name, value", [("GOMP_SPINCOUNT", "500"), ("OMP_WAIT_POLICY", "PASSIVE")])
def test_user_settings_win(name, value):
    expected = value if name == "GOMP_SPINCOUNT" else "None"
    assert probe(**{name: value})[0] == expected


def test_too_late_once_torch_is_loaded(monkeypatch):
    import torch  # noqa: F401  (this test process has it already; made explicit)

    for name in omp._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert omp.shorten_spin_wait() is False
    assert "GOMP_SPINCOUNT" not in os.environ


def test_children_get_a_spin_unless_the_user_chose_one(monkeypatch):
    for name in omp._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(omp, "_set_here", False)
    assert omp.child_spin_env(1234) == {"GOMP_SPINCOUNT": "1234"}
    monkeypatch.setenv("GOMP_SPINCOUNT", "100000")
    monkeypatch.setattr(omp, "_set_here", True)  # glinthawk's own setting: a child may get another
    assert omp.child_spin_env(1234) == {"GOMP_SPINCOUNT": "1234"}
    monkeypatch.setattr(omp, "_set_here", False)  # the user's
    assert omp.child_spin_env(1234) == {}
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert omp.child_spin_env(1234) == {}
