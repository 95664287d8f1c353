"""The Python API, shaped like vLLM's offline one::

    from glinthawk import LLM, SamplingParams
    with LLM(model="path/to/checkpoint", tier2_nodes=2) as llm:
        outputs = llm.generate(["Once upon a time"], SamplingParams(temperature=0.8, max_tokens=64))
        print(outputs[0].outputs[0].text)

``LLM`` starts a local two-tier cluster (or talks to a running Tier 1 given
``endpoint="host:port"``), streams the prompts through it and returns the results in
input order.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glinthawk import DEFAULT_MODEL
from glinthawk.client import submit
from glinthawk.cluster import LocalCluster
from glinthawk.compute.sampling import SamplingParams
from glinthawk.generation_config import DEFAULTED_FIELDS
from glinthawk.net.loop import run
from glinthawk.settings import LOCAL_TIER2_NODES

class GenerationError(RuntimeError):
    """A request of the batch failed; the message says which and why."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict[str, Any]] | None = None  # with SamplingParams(logprobs=N): per token (docs/FORMAT.md)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | list[dict[str, Any]]
    prompt_token_count: int
    outputs: list[CompletionOutput]
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # with SamplingParams(prompt_logprobs=N)


class LLM:
    def __init__(self, model: str | Path = DEFAULT_MODEL, *, tier2_nodes: int = LOCAL_TIER2_NODES,
                 endpoint: str | None = None, secret: bytes | None = None, ray: str | None = None,
                 **cluster_options: Any):
        """Start a local cluster on ``model`` (``cluster_options`` go to LocalCluster: kv_memory,
        kv_dtype ("int8": each Tier 2 node keeps K/V as int8), dtype, micro_batches, ...), or use the running Tier 1 at ``endpoint``, or, with ``ray``
        ("auto", "local" or an address; ``pip install 'glinthawk[ray]'``), start the nodes as actors
        of that Ray cluster (glinthawk/ray_cluster.py; ``stages`` too, and without kv_memory or
        kv_tokens each Tier 2 actor gets the largest KV that Ray's machines hold)."""
        self._cluster: Any = None
        self._secret = secret
        if endpoint is not None:
            host, _, port = endpoint.rpartition(":")
            self._address = (host or "127.0.0.1", int(port))
        elif ray is not None:
            from glinthawk.ray_cluster import RayCluster

            self._cluster = RayCluster.from_options(ray, Path(model), tier2_nodes, secret=secret,
                                                    **cluster_options).__enter__()
            self._address, self._secret = self._cluster.tier1_address, self._cluster.secret.encode()
        else:
            self._cluster = LocalCluster(Path(model), tier2_nodes=tier2_nodes, **cluster_options).__enter__()
            self._address = self._cluster.tier1_address
        self._workdir = tempfile.TemporaryDirectory(prefix="glinthawk-api-")

    def generate(self, prompts: str | Sequence[str], sampling_params: SamplingParams | None = None
                 ) -> list[RequestOutput]:
        """Complete each prompt; results in the order of ``prompts``. Without ``sampling_params``,
        the checkpoint's generation_config.json sampling defaults apply (as in vLLM)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return self._run([{"prompt": p} for p in prompts], prompts, sampling_params)

    def chat(self, messages: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[RequestOutput]:
        """Answer one conversation (a list of {"role", "content"}) or a list of them, with the chat
        template (``chat_template_kwargs``: its further variables, e.g. {"enable_thinking": False})."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        extra = {"chat_template_kwargs": chat_template_kwargs} if chat_template_kwargs is not None else {}
        return self._run([{"messages": c, **extra} for c in conversations], conversations, sampling_params)

    def _run(self, bodies: list[dict], prompts: list, params: SamplingParams | None) -> list[RequestOutput]:
        fields = _sampling_fields(params) if params is not None else {}
        workdir = Path(self._workdir.name)
        requests, results = workdir / "requests.jsonl", workdir / "results.jsonl"
        with open(requests, "w", encoding="utf-8") as f:
            for index, body in enumerate(bodies):
                f.write(json.dumps({"custom_id": str(index), **body, **fields}) + "\n")
        host, port = self._address
        run(submit(requests, host, port, results, progress=False, secret=self._secret))
        lines = {}
        with open(results, encoding="utf-8") as f:
            for text in f:
                line = json.loads(text)
                lines[line["custom_id"]] = line
        outputs = []
        for index, prompt in enumerate(prompts):
            line = lines.get(str(index))
            if line is None or "error" in line:
                reason = line["error"]["message"] if line else "no result"
                raise GenerationError(f"request {index} failed: {reason}")
            choices = [CompletionOutput(i, choice["text"], choice["token_ids"], choice["finish_reason"],
                                        choice.get("logprobs")) for i, choice in enumerate(line.get("choices", [line]))]
            outputs.append(RequestOutput(str(index), prompt, line["prompt_tokens"], choices,
                                         line.get("prompt_logprobs")))
        return outputs

    def close(self, clean: bool = True) -> None:
        """Stop the local cluster; its temporary log directory is removed when ``clean``, else kept and logged."""
        if self._cluster is not None:
            self._cluster.close(clean)
            self._cluster = None
        self._workdir.cleanup()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(clean=exc_type is None)


def _sampling_fields(params: SamplingParams) -> dict[str, Any]:
    """The request fields of ``params``: those a checkpoint may default (generation_config.py)
    always, as vLLM takes given SamplingParams whole; the others where they differ from the
    defaults (so the request line stays small). Without params, the line leaves all of them
    to the checkpoint's defaults."""
    defaults = SamplingParams()
    fields = {}
    for item in dataclasses.fields(params):
        value = getattr(params, item.name)
        if value != getattr(defaults, item.name) or item.name in DEFAULTED_FIELDS.values():
            fields[item.name] = list(value) if isinstance(value, tuple) else value
    return fields
