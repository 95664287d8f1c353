"""``glinthawk-node``'s own mistakes: a port in use ends in one line, not a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest


def node(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glinthawk.node", *args], capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def taken_port():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        yield held.getsockname()[1]


@pytest.mark.parametrize("option", ["--listen", "--metrics-port"])
def test_a_port_in_use_is_one_line_naming_the_option(taken_port, option):
    value = f"127.0.0.1:{taken_port}" if option == "--listen" else str(taken_port)
    done = node("--role", "tier2", option, value)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith(f"Error: cannot {'listen' if option == '--listen' else 'serve metrics'} on 127.0.0.1:"
                            f"{taken_port}: Address already in use; choose another {option}")


def test_node_version():
    done = node("--version")
    assert done.returncode == 0 and done.stdout.startswith("glinthawk-node, version ")
