"""Helpers for the ``glinthawk serve`` tests: the service as a child process, batch files, polling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

READY_TIMEOUT_S = 120.0
FINAL = ("completed", "failed", "cancelled", "expired")


class ServeProcess:
    """``glinthawk serve`` on loopback with a local cluster of one Tier 2 node, in ``data_dir``."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir, self.log_dir = data_dir, data_dir.parent / f"{data_dir.name}-cluster-logs"
        self.ready = data_dir.parent / f"{data_dir.name}.ready"
        self.ready.unlink(missing_ok=True)
        self.stderr_path = data_dir.parent / f"{data_dir.name}.stderr"
        command = [sys.executable, "-m", "glinthawk", "serve", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
                   "--ready-file", str(self.ready), "--tier2-nodes", "1", "--log-dir", str(self.log_dir), *args]
        with open(self.stderr_path, "ab") as stderr:
            self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.exists() or not self.ready.read_text().endswith("\n"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"glinthawk serve did not start:\n{self.stderr()}")
            time.sleep(0.1)
        self.base_url = f"http://{self.ready.read_text().strip()}/v1"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-4000:]

    def client(self, api_key: str = "unused") -> OpenAI:
        return OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0)

    def tier1_address(self) -> tuple[str, int]:
        host, port = (self.log_dir / "tier1.addr").read_text().strip().rsplit(":", 1)
        return host, int(port)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(90)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def batch_line(custom_id: str, prompt: str, max_tokens: int, url: str = "/v1/completions", **body) -> dict:
    if url == "/v1/completions":
        body = {"prompt": prompt, **body}
    else:
        body = {"messages": [{"role": "user", "content": prompt}], **body}
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": "default", "max_tokens": max_tokens, "temperature": 0, **body}}


def write_lines(path: Path, lines: list[dict]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def wait_for(client: OpenAI, batch_id: str, until=lambda b: b.status in FINAL, timeout_s: float = 240.0):
    """Poll a batch until ``until`` holds; a batch that never gets there fails the test, not hangs it."""
    deadline = time.monotonic() + timeout_s
    while True:
        batch = client.batches.retrieve(batch_id)
        if until(batch):
            return batch
        assert time.monotonic() < deadline, f"batch stuck: {batch}"
        time.sleep(0.2)


def read_jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def generate(input_path: Path, output_path: Path) -> dict[str, dict]:
    """What ``glinthawk generate`` (single process, the oracle) answers for the same file, by custom_id."""
    subprocess.run([sys.executable, "-m", "glinthawk", "generate", "-i", str(input_path), "-o", str(output_path),
                    "--no-progress"], check=False, capture_output=True)
    return {line["custom_id"]: line for line in read_jsonl(output_path.read_text())}
