"""What a newcomer meets in the first hour: a fast --help, one grammar for the input file, stdout as an
output, and one-line messages instead of waits and tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from glinthawk.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torch_loaded(code: str) -> bool:
    """Whether running ``code`` in a fresh interpreter imports torch (it prints sys.modules' verdict last)."""
    probe = code + "\nimport sys\nprint('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1] == "True"


def _help(*args: str) -> str:
    return f"""
from glinthawk.cli import main
try:
    main({list(args)!r} + ['--help'])
except SystemExit as exc:
    assert exc.code == 0, exc.code
"""


def test_importing_the_package_and_the_cli_loads_no_torch():
    assert not _torch_loaded("import glinthawk, glinthawk.cli")


@pytest.mark.parametrize("command", [(), ("run",), ("submit",), ("generate",), ("status",), ("plan",), ("drain",),
                                     ("bench",)])
def test_help_loads_no_torch(command):
    """torch takes seconds to import; --help needs none of it."""
    assert not _torch_loaded(_help(*command))


def test_the_python_api_is_still_exported_from_the_package_root():
    import glinthawk
    from glinthawk import LLM, SamplingParams
    from glinthawk.api import LLM as api_llm

    assert LLM is api_llm and SamplingParams(max_tokens=3).max_tokens == 3
    assert {"LLM", "SamplingParams", "DEFAULT_MODEL"} <= set(dir(glinthawk))
    with pytest.raises(AttributeError):
        glinthawk.no_such_name  # noqa: B018


def _prompts(path: Path, count: int = 2) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"p{i}", "prompt": "Hello", "max_tokens": 2, "temperature": 0,
                                        "ignore_eos": True}) + "\n" for i in range(count)))
    return path


def _glinthawk(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glinthawk", *args], capture_output=True, text=True, env=ENV,
                          timeout=kwargs.pop("timeout", 240), **kwargs)


def test_generate_takes_its_input_as_an_argument_and_writes_stdout(tiny_checkpoint, tmp_path):
    """``generate IN -o -``, as run and submit take it: before, the argument was 'unexpected' and -o - made a
    file named '-'."""
    inputs = _prompts(tmp_path / "in.jsonl")
    proc = _glinthawk("generate", str(inputs), "-o", "-", "--model", str(tiny_checkpoint("llama_gqa")),
                      "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(line)["custom_id"] for line in proc.stdout.splitlines()) == ["p0", "p1"]
    assert "-> stdout" in proc.stderr and not (tmp_path / "-").exists()


def test_generate_without_input_on_a_terminal_says_so_instead_of_waiting(tmp_path):
    leader, follower = os.openpty()
    try:
        proc = _glinthawk("generate", "-o", str(tmp_path / "out.jsonl"), stdin=follower, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 2
    assert "no prompts file" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_generate_keeps_the_old_input_option_working(tiny_checkpoint, tmp_path):
    inputs, out = _prompts(tmp_path / "in.jsonl", 1), tmp_path / "out.jsonl"
    model = ["--model", str(tiny_checkpoint("llama_gqa")), "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(main, ["generate", "-i", str(inputs), "-o", str(out), *model])
    assert result.exit_code == 0, result.output
    assert "deprecated" in result.output and json.loads(out.read_text())["custom_id"] == "p0"
    result = CliRunner().invoke(main, ["generate", str(inputs), "-i", str(inputs), "-o", str(out), *model])
    assert result.exit_code == 2 and "give the prompts file once" in result.output


@pytest.mark.parametrize("command", ["run", "submit"])
def test_resume_into_stdout_is_refused(tmp_path, command):
    inputs = _prompts(tmp_path / "in.jsonl", 1)
    extra = ["--to", "127.0.0.1:9"] if command == "submit" else ["--log-dir", str(tmp_path / "logs")]
    result = CliRunner().invoke(main, [command, str(inputs), "-o", "-", "--resume", *extra])
    assert result.exit_code == 2 and "--resume" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "logs").exists()


def test_bench_without_its_extra_says_how_to_install_it(monkeypatch, tmp_path):
    """Before, the suite ran and ended in a matplotlib ImportError traceback."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    result = CliRunner().invoke(main, ["bench", "limits", "--quick", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [
        "Error: glinthawk bench needs matplotlib, from the bench extra: pip install 'glinthawk[bench]'"]
    assert not (tmp_path / "out").exists()


def test_an_output_of_dash_is_stdout_never_locked_emptied_or_removed(tmp_path, monkeypatch, capfd):
    """What run and submit write through (they share Output with generate)."""
    from glinthawk.outputs import Output, probe_output

    monkeypatch.chdir(tmp_path)
    probe_output("-")  # the CLI's early check: must neither create a file named '-' nor hold stdout
    with Output("-") as first, Output("-") as second:  # no lock: both may write
        first.start(append=False)
        first.write(b'{"custom_id": "a"}\n')
        second.write(b'{"custom_id": "b"}\n')
    assert capfd.readouterr().out == '{"custom_id": "a"}\n{"custom_id": "b"}\n'
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option,value,says", [
    ("--secret-file", "no-such-secret", "cannot read secret file"),
    ("--kv-memory", "lots", "cannot parse size 'lots'"),
    ("--inject-bandwidth", "lots", "cannot parse bandwidth 'lots'"),
])
def test_run_checks_what_it_hands_its_nodes_before_starting_them(tmp_path, option, value, says):
    """Before, the first node refused it and the run ended with that node's usage text, under its name."""
    inputs, logs = _prompts(tmp_path / "in.jsonl", 1), tmp_path / "logs"
    result = CliRunner().invoke(main, ["run", str(inputs), "-o", str(tmp_path / "out.jsonl"), "--log-dir", str(logs),
                                       option, str(tmp_path / value) if option == "--secret-file" else value])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and option.split("-")[-1] in errors[0] and says in errors[0], result.output
    assert "glinthawk.node" not in result.output and not logs.exists()


def test_run_reads_its_prompts_from_stdin_as_generate_does(tiny_checkpoint, tmp_path):
    """``run - -o OUT``: before, '-' was a file that did not exist."""
    inputs, out = _prompts(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    proc = _glinthawk("run", "-", "-o", str(out), "--model", str(tiny_checkpoint("llama_gqa")), "--device", "cpu",
                      "--tier2-nodes", "1", "--log-dir", str(tmp_path / "logs"), "--no-progress",
                      input=inputs.read_text(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(json.loads(line)["custom_id"] for line in out.read_text().splitlines()) == ["p0", "p1"]
    assert not (tmp_path / "-").exists()


def test_submit_reads_its_prompts_from_stdin_and_leaves_no_copy(tmp_path, monkeypatch):
    """``submit - --to ...`` sends what stdin holds (here to a Tier 1 that is not there): before, '-' was a
    file that did not exist. The copy of stdin it sends from is gone afterwards."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    result = CliRunner().invoke(main, ["submit", "-", "--to", "127.0.0.1:9", "-o", str(tmp_path / "out.jsonl")],
                                input=_prompts(tmp_path / "in.jsonl").read_text())
    assert result.exit_code == 1 and "cannot reach Tier 1 at 127.0.0.1:9" in result.output, result.output
    assert "Traceback" not in result.output and list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize("command", ["run", "submit"])
def test_resume_of_stdin_is_refused(tmp_path, command):
    """--resume finds the earlier run by its prompts file's path, which stdin has not."""
    extra = ["--to", "127.0.0.1:9"] if command == "submit" else ["--log-dir", str(tmp_path / "logs")]
    result = CliRunner().invoke(main, [command, "-", "-o", str(tmp_path / "out.jsonl"), "--resume", *extra], input="")
    assert result.exit_code == 2 and "--resume" in result.output and "'-'" in result.output, result.output
    assert not (tmp_path / "logs").exists() and not (tmp_path / "out.jsonl").exists()


def test_submit_of_stdin_on_a_terminal_says_so_instead_of_waiting(tmp_path):
    leader, follower = os.openpty()
    try:
        proc = _glinthawk("submit", "-", "--to", "127.0.0.1:9", "-o", str(tmp_path / "out.jsonl"), stdin=follower,
                          timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert proc.returncode == 2 and "pipe them in" in proc.stderr and "Traceback" not in proc.stderr
