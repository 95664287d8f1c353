"""``glinthawk serve`` driven by the official openai client: Files and Batches, cancel, pagination,
online completions, auth, and bad input, against one service on the bundled model."""

from __future__ import annotations

import json
import socket

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion
from serve_util import ServeProcess, batch_line, generate, read_jsonl, wait_for, write_lines

from glinthawk.client import fetch_status
from glinthawk.net.loop import run

KEYS = ("key-alice", "key-bob")
LIMIT = 1 << 20  # --max-file-size


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "keys").write_text(f"# two users\n{KEYS[0]}\n\n{KEYS[1]}\n")
    process = ServeProcess(root / "data", "--api-key-file", str(root / "keys"), "--max-file-size", str(LIMIT))
    yield process
    process.stop()


@pytest.fixture
def client(service):
    return service.client(KEYS[0])


def upload(client, path):
    with open(path, "rb") as f:
        return client.files.create(file=f, purpose="batch")


def test_batch_completes_with_output_and_error_files(client, tmp_path):
    lines = [batch_line(f"q{i}", prompt, 3 + 2 * i) for i, prompt in enumerate(
        ["The built-in function", "A class", "The with statement", "Exceptions are"])]
    lines.insert(2, {**batch_line("bad", "x", 4), "body": {"prompt": "x", "max_tokens": 4, "bogus": 1}})
    source = write_lines(tmp_path / "in.jsonl", lines)
    uploaded = upload(client, source)
    assert (uploaded.purpose, uploaded.bytes, uploaded.filename) == ("batch", source.stat().st_size, "in.jsonl")
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h",
                                    metadata={"job": "t1"})
    assert created.status == "validating" and created.metadata == {"job": "t1"}
    batch = wait_for(client, created.id)
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (5, 4, 1)
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at and batch.expires_at
    outputs = read_jsonl(client.files.content(batch.output_file_id).text)
    errors = read_jsonl(client.files.content(batch.error_file_id).text)
    assert sorted(o["custom_id"] for o in outputs) == ["q0", "q1", "q2", "q3"]
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["status_code"] == 400 and "bogus" in errors[0]["response"]["body"]["error"]["message"]
    expected = generate(source, tmp_path / "oracle.jsonl")
    for line in outputs:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        completion = Completion.model_validate(line["response"]["body"])
        oracle = Completion.model_validate(expected[line["custom_id"]]["response"]["body"])
        assert completion.choices[0].text == oracle.choices[0].text
        assert completion.usage.completion_tokens == oracle.usage.completion_tokens
    assert batch.usage.output_tokens == sum(3 + 2 * i for i in range(4))
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_chat_batch(client, tmp_path):
    url = "/v1/chat/completions"
    source = write_lines(tmp_path / "chat.jsonl", [batch_line(f"c{i}", "What does with do?", 4, url) for i in range(2)])
    batch = client.batches.create(input_file_id=upload(client, source).id, endpoint=url, completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    for line in read_jsonl(client.files.content(batch.output_file_id).text):
        answer = ChatCompletion.model_validate(line["response"]["body"])
        assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens == 4


def test_cancel_keeps_finished_lines_and_stops_the_cluster(service, client, tmp_path):
    # Five short requests finish early; the long ones would run far longer than the test waits.
    lines = [batch_line(f"s{i}", "The built-in function", 2) for i in range(5)]
    lines += [batch_line(f"l{i}", "A class", 400, ignore_eos=True) for i in range(40)]
    source = write_lines(tmp_path / "long.jsonl", lines)
    batch = client.batches.create(input_file_id=upload(client, source).id, endpoint="/v1/completions",
                                  completion_window="24h")
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 5)
    # An online request is answered beside the batch, not after it.
    online = client.completions.create(model="default", prompt="The", max_tokens=2, temperature=0)
    assert online.usage.completion_tokens == 2 and client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    batch = wait_for(client, batch.id)
    assert batch.status == "cancelled" and batch.cancelled_at
    outputs = read_jsonl(client.files.content(batch.output_file_id).text)
    ids = [line["custom_id"] for line in outputs]
    assert len(ids) == len(set(ids)) and {f"s{i}" for i in range(5)} <= set(ids) and len(ids) < len(lines)
    assert batch.request_counts.completed == len(ids)
    status = run(fetch_status(*service.tier1_address()))
    assert status["batches"] == 0 and status["requests"]["running"] == 0, status  # Tier 1 dropped the rest
    with pytest.raises(openai.BadRequestError, match="cannot cancel"):
        client.batches.cancel(batch.id)


def test_list_pagination(client, tmp_path):
    upload(client, write_lines(tmp_path / "older.jsonl", [batch_line("a", "The", 1)]))  # a page after the first
    file_id = upload(client, write_lines(tmp_path / "one.jsonl", [batch_line("a", "The", 1)])).id
    made = [client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id
            for _ in range(3)]
    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == made[::-1][:2] and first.has_more
    second = client.batches.list(limit=2, after=first.data[-1].id)
    assert second.data[0].id == made[0]
    listed = [b.id for b in client.batches.list(limit=2)]  # the SDK follows the pages itself
    assert listed[:3] == made[::-1] and len(listed) == len(set(listed))
    # Input files only: the batches' output files, which may be made meanwhile, are newer.
    files = client.files.list(limit=1, order="desc", purpose="batch")
    assert files.data[0].id == file_id and files.has_more
    for batch_id in made:
        wait_for(client, batch_id)


def test_online_endpoints(client, tmp_path):
    assert [m.id for m in client.models.list().data] == ["default"]
    completion = client.completions.create(model="default", prompt="The built-in function", max_tokens=5,
                                           temperature=0)
    oracle = generate(write_lines(tmp_path / "p.jsonl", [batch_line("p", "The built-in function", 5)]),
                      tmp_path / "p.out.jsonl")["p"]["response"]["body"]
    assert completion.choices[0].text == oracle["choices"][0]["text"] and completion.usage.completion_tokens == 5
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=3, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 3
    chunks = list(client.completions.create(model="default", prompt="The built-in function", max_tokens=5,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    several = client.completions.create(model="default", prompt="The", max_tokens=4, n=3, seed=1)
    assert [c.index for c in several.choices] == [0, 1, 2] and several.usage.completion_tokens == 12
    chunks = list(client.completions.create(model="default", prompt="The", max_tokens=4, n=3, seed=1, stream=True))
    assert {c.choices[0].index: c.choices[0].text for c in chunks} == {c.index: c.text for c in several.choices}
    with pytest.raises(openai.BadRequestError, match="bogus"):
        client.completions.create(model="default", prompt="x", max_tokens=2, extra_body={"bogus": 1})


def test_keys_scope_files_and_batches(service, client, tmp_path):
    file_id = upload(client, write_lines(tmp_path / "mine.jsonl", [batch_line("a", "The", 1)])).id
    batch_id = client.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h").id
    bob = service.client(KEYS[1])
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch_id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(file_id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    assert batch_id not in [b.id for b in bob.batches.list()]
    with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
        service.client("key-mallory").batches.list()
    status, body = raw_request(service, b"GET /v1/batches HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 401 and "Authorization: Bearer" in body["error"]["message"]
    wait_for(client, batch_id)


def raw_request(service, head: bytes, body: bytes = b"") -> tuple[int, dict]:
    """Send bytes as they are (what no well-behaved client would send); the status and JSON body."""
    host, port = service.base_url.split("//")[1].split("/")[0].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # a refused body's unread rest: the answer came before it
                break
            if not chunk:
                break
            reply += chunk
    head_text, _, payload = reply.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(payload[:_length(reply)])


def _length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 1 << 30


AUTH = f"Authorization: Bearer {KEYS[0]}\r\n".encode()


def test_bad_uploads(service, client, tmp_path):
    with pytest.raises(openai.BadRequestError, match="not a Batch API input file.*line 2"):
        upload(client, tmp_path.joinpath("notjsonl.jsonl").write_bytes(b'{"a": 1}\nnot json\n') and
               tmp_path / "notjsonl.jsonl")
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune'"):
        client.files.create(file=("a.jsonl", b'{"custom_id": "a"}\n'), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError, match="limit of 1048576 bytes") as raised:
        client.files.create(file=("big.jsonl", b'{"custom_id": "a"}\n' * (LIMIT // 19 + 10)), purpose="batch")
    assert raised.value.status_code == 413
    # A 1 GiB upload is refused from its headers, before a byte of it is read.
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1073741824\r\n\r\n")
    status, body = raw_request(service, head)
    assert status == 413 and "limit" in body["error"]["message"]
    # Sent without a length (chunked), it is cut off at the limit as it streams in.
    part = (b"--b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b\r\n"
            b"Content-Disposition: form-data; name=\"file\"; filename=\"x.jsonl\"\r\n\r\n")
    stream = part + b'{"custom_id": "a"}\n' * (LIMIT // 19 + 10) + b"\r\n--b--\r\n"  # just over the limit
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
    status, body = raw_request(service, head, b"%x\r\n%s\r\n0\r\n\r\n" % (len(stream), stream))
    assert status == 413, body
    head = (b"POST /v1/files HTTP/1.1\r\nHost: x\r\n" + AUTH +
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 7\r\nConnection: close\r\n\r\n")
    status, body = raw_request(service, head, b"garbage")
    assert status == 400 and "multipart/form-data" in body["error"]["message"]
    assert not list((service.data_dir / "files").glob(".*.tmp"))  # nothing refused is left on disk


def test_bad_batches(client, tmp_path):
    with pytest.raises(openai.NotFoundError, match="file-nope"):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/completions", completion_window="24h")
    good = upload(client, write_lines(tmp_path / "g.jsonl", [batch_line("a", "The", 1)]))
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=good.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=good.id, endpoint="/v1/completions", completion_window="1h")
    done = wait_for(client, client.batches.create(input_file_id=good.id, endpoint="/v1/completions",
                                                  completion_window="24h").id)
    with pytest.raises(openai.BadRequestError, match="purpose 'batch_output'"):
        client.batches.create(input_file_id=done.output_file_id, endpoint="/v1/completions", completion_window="24h")
    lines = [batch_line("a", "The", 1), batch_line("b", "The", 1, "/v1/chat/completions"), batch_line("a", "x", 1)]
    bad = upload(client, write_lines(tmp_path / "bad.jsonl", lines))
    batch = wait_for(client, client.batches.create(input_file_id=bad.id, endpoint="/v1/completions",
                                                   completion_window="24h").id)
    assert batch.status == "failed" and batch.failed_at and batch.output_file_id is None
    found = {(e.code, e.line) for e in batch.errors.data}
    assert found == {("mismatched_endpoint", 2), ("duplicate_custom_id", 3)}
    assert all(e.message.startswith(f"line {e.line}: ") for e in batch.errors.data)


def test_file_delete(client, tmp_path):
    uploaded = upload(client, write_lines(tmp_path / "d.jsonl", [batch_line("a", "The", 1)]))
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(uploaded.id)


def test_non_loopback_needs_keys(tmp_path):
    from click.testing import CliRunner

    from glinthawk.cli import main

    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--listen", "0.0.0.0:0"])
    assert result.exit_code == 2 and "--api-key-file" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "d").exists()  # refused before anything starts
    (tmp_path / "keys").write_text("# none yet\n")
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path / "d"), "--api-key-file",
                                       str(tmp_path / "keys")])
    assert result.exit_code == 2 and "holds no key" in result.output


def test_one_service_per_data_dir(service):
    from click.testing import CliRunner

    from glinthawk.cli import main

    result = CliRunner().invoke(main, ["serve", "--data-dir", str(service.data_dir)])
    assert result.exit_code == 1 and "another glinthawk serve uses" in result.output, result.output
