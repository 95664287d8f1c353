"""The results file: only a client Tier 1 accepted writes it, one glinthawk process at a time,
and a write that fails (a full disk) ends the run in one line that says how to go on."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from glinthawk.cli import main
from glinthawk.client import SubmitError, batch_id, submit
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.outputs import OutputError, ResultWriter
from test_inputs import assert_clean_failure
from test_resume import cluster, write_lines

BUSY = "another glinthawk process is writing it"


def prompts(path: Path, count: int, max_tokens: int = 8) -> Path:
    return write_lines(path, [{"custom_id": f"r{i}", "prompt": f"Request {i}", "max_tokens": max_tokens,
                               "ignore_eos": True} for i in range(count)])


async def test_a_second_client_on_the_same_files_leaves_the_first_ones_output_whole(checkpoint, tmp_path):
    """The second client, refused, had already truncated the file with its own descriptor; the
    first went on writing at its old offset: NUL bytes up front and the first results gone."""
    requests, out = prompts(tmp_path / "in.jsonl", 48), tmp_path / "out.jsonl"
    async with cluster(checkpoint, tmp_path) as (_, port):
        first = asyncio.create_task(submit(requests, "127.0.0.1", port, out, progress=False))
        while not out.exists() or out.read_bytes().count(b"\n") < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(SubmitError) as refused:
            await asyncio.wait_for(submit(requests, "127.0.0.1", port, out, progress=False), 60)
        assert not first.done()  # refused while the first was mid-run
        summary = await asyncio.wait_for(first, 300)
    raw = out.read_bytes()
    assert b"\0" not in raw
    lines = [json.loads(line) for line in raw.decode().splitlines()]
    assert Counter(line["custom_id"] for line in lines) == Counter(f"r{i}" for i in range(48))
    assert (summary.done, summary.failed) == (48, 0)
    message = str(refused.value)
    assert str(out) in message and BUSY in message and "\n" not in message


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
@pytest.mark.parametrize("before", [None, b'{"custom_id": "r0", "text": "x"}\n{"custom_id": "r1", "te'],
                         ids=["no-file", "half-written"])
async def test_a_client_tier1_refuses_leaves_its_output_file_as_it_was(checkpoint, tmp_path, resume, before):
    """Tier 1 refuses a batch that has a client attached (one this process holds no lock for,
    as from another machine): the refused client used to create, empty, or cut the file first."""
    requests, out = prompts(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    if before is not None:
        out.write_bytes(before)
    async with cluster(checkpoint, tmp_path) as (_, port):
        attached = await open_connection("127.0.0.1", port)
        await client_handshake(attached, "client", {"batch_id": batch_id(requests, out), "resume": False})
        await attached.recv()  # CAPACITY: the batch is this connection's
        with pytest.raises(SubmitError, match="already has a client attached"):
            await asyncio.wait_for(submit(requests, "127.0.0.1", port, out, progress=False, resume=resume), 60)
        attached.close()
    if before is None:
        assert not out.exists()
    else:
        assert out.read_bytes() == before


@pytest.mark.parametrize("command", ["submit", "run", "generate"])
def test_cli_refuses_an_output_file_another_glinthawk_process_writes(tiny_checkpoint, tmp_path, command):
    """Without the lock, ``submit`` truncated it before Tier 1 refused it, and ``generate`` and
    ``run`` (which starts a whole cluster first) wrote it over the other process's results."""
    inputs, out, logs = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "logs"
    prompts(inputs, 1, max_tokens=2)
    out.write_text('{"custom_id": "other", "text": "x"}\n')
    model = ["--model", str(tiny_checkpoint("llama_gqa"))]
    args = {"submit": [str(inputs), "--to", "127.0.0.1:9"],
            "run": [str(inputs), *model, "--tier2-nodes", "1", "--log-dir", str(logs)],
            "generate": [*model, str(inputs)]}[command]
    with open(out, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the other glinthawk process holds
        result = CliRunner().invoke(main, [command, *args, "-o", str(out), "--no-progress"])
    assert_clean_failure(result, str(out), BUSY)
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert out.read_text() == '{"custom_id": "other", "text": "x"}\n'
    assert not logs.exists()  # no node was started


def test_result_writer_holds_the_file_until_closed(tmp_path):
    out = tmp_path / "out.jsonl"
    with ResultWriter(out, progress=False):
        with pytest.raises(OutputError, match=BUSY):
            ResultWriter(out, progress=False)
    with ResultWriter(out, progress=False) as writer:  # free again once closed
        writer.write({"custom_id": "a", "text": "x"})
    assert out.read_text() == '{"custom_id": "a", "text": "x"}\n'


def test_result_writer_appends_after_the_file_is_cut_under_it(tmp_path):
    """A writer with its own offset writes past a truncation and leaves NUL bytes before its line."""
    out = tmp_path / "out.jsonl"
    with ResultWriter(out, progress=False) as writer:
        writer.write({"custom_id": "a", "text": "x"})
        os.truncate(out, 0)
        writer.write({"custom_id": "b", "text": "y"})
    assert out.read_text() == '{"custom_id": "b", "text": "y"}\n'


async def test_submit_to_a_full_disk_ends_in_one_line_that_says_to_resume(checkpoint, tmp_path):
    """It ended in a traceback, with no word on what to do."""
    requests = prompts(tmp_path / "in.jsonl", 2, max_tokens=2)
    async with cluster(checkpoint, tmp_path) as (_, port):
        client = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "glinthawk", "submit", str(requests), "--to", f"127.0.0.1:{port}", "-o", "/dev/full",
            "--no-progress", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        stdout, stderr = await asyncio.wait_for(client.communicate(), 120)
    message = stderr.decode().strip()
    assert client.returncode != 0
    assert "Traceback" not in message and len(message.splitlines()) == 1, message
    for fragment in ("/dev/full", "No space left on device", "0 results were written", "--resume"):
        assert fragment in message, message


def test_generate_to_a_full_disk_ends_in_one_line(tiny_checkpoint, tmp_path):
    inputs = prompts(tmp_path / "in.jsonl", 2, max_tokens=2)
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_checkpoint("llama_gqa")), str(inputs),
                                       "-o", "/dev/full", "--no-progress"])
    assert_clean_failure(result, "/dev/full", "No space left on device", "0 results were written")
    assert len(result.output.strip().splitlines()) == 1, result.output
