"""libgomp's spin-wait: left at its default, shortened only for LocalCluster nodes that share cores."""

from __future__ import annotations

import os
import subprocess
import sys

from glinthawk import omp


def test_importing_glinthawk_leaves_the_spin_wait_alone():
    env = {k: v for k, v in os.environ.items() if k not in omp._USER_SETTINGS}
    code = "import os, glinthawk; print(os.environ.get('GOMP_SPINCOUNT'))"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["None"]


def test_children_get_a_spin_unless_it_is_the_default_or_the_user_chose_one(monkeypatch):
    for name in omp._USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert omp.child_spin_env(omp.SHARED_CORES_SPIN_ROUNDS) == {"GOMP_SPINCOUNT": str(omp.SHARED_CORES_SPIN_ROUNDS)}
    assert omp.child_spin_env(omp.LIBGOMP_SPIN_ROUNDS) == {}  # nothing to set: the child's libgomp defaults to it
    monkeypatch.setenv("GOMP_SPINCOUNT", "500")  # the user's, which the child inherits
    assert omp.child_spin_env(omp.SHARED_CORES_SPIN_ROUNDS) == {}
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert omp.child_spin_env(omp.SHARED_CORES_SPIN_ROUNDS) == {}
