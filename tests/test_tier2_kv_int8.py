"""A Tier 2 node with --kv-dtype int8: what it announces, what it holds, and a whole two-tier run."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from cluster_util import PROMPTS, distributed, read_results, write_requests
from glinthawk.cluster import LocalCluster
from glinthawk.clusterfile import ClusterFileError, load_cluster_file, local_cluster_kwargs, node_args
from glinthawk.compute.kvcache import KV_STORAGE
from glinthawk.net.connection import open_connection
from glinthawk.net.handshake import client_handshake
from glinthawk.node.tier2 import Tier2Node
from glinthawk.settings import KV_DTYPES, Tier2Settings

GEOMETRY = {"num_layers": 6, "num_kv_heads": 2, "head_dim": 32, "dtype": "bfloat16"}  # the bundled model's


async def welcome(node: Tier2Node, hello: dict) -> dict:
    port = await node.start("127.0.0.1", 0)
    try:
        conn = await open_connection("127.0.0.1", port)
        fields = await client_handshake(conn, "tier1", hello)
        conn.close()
        return fields
    finally:
        await node.close()


@pytest.mark.parametrize("model_dtype,least", [("bfloat16", 1.8), ("float32", 3.6)])
async def test_int8_holds_about_twice_the_tokens_of_bf16_in_the_same_memory(model_dtype, least):
    """Capacity in tokens counts the scales: head_dim 32 gives 34-byte rows against 64 (bf16) or 128 (fp32)."""
    hello = {**GEOMETRY, "dtype": model_dtype}
    plain = await welcome(Tier2Node(kv_memory=64 << 20), hello)
    int8 = await welcome(Tier2Node(kv_memory=64 << 20, kv_dtype="int8"), hello)
    assert plain["kv_dtype"] == model_dtype and int8["kv_dtype"] == "int8"
    assert int8["bytes_per_token"] == 2 * 6 * 2 * (32 + 2)
    assert int8["capacity_tokens"] == (64 << 20) // int8["bytes_per_token"]
    assert int8["capacity_tokens"] / plain["capacity_tokens"] >= least


def test_the_nodes_store_keeps_int8_and_takes_q_k_v_in_the_model_dtype():
    store, fields = Tier2Node(kv_tokens=64, kv_dtype="int8")._new_store(GEOMETRY)
    assert fields["capacity_tokens"] == 64 and fields["kv_dtype"] == "int8"
    assert store.quantized and store.dtype == torch.bfloat16 and store.keys.dtype == torch.int8


async def test_a_two_tier_greedy_run_over_int8_agrees_with_the_unquantized_run(checkpoint, tmp_path):
    """Greedy tokens of every request through two int8 Tier 2 nodes against two unquantized
    ones: the same for at least their first 3 tokens, and the same in all in most requests
    (this tiny random model's logits are nearly flat, so a near-tie may flip late)."""
    requests = write_requests(tmp_path / "in.jsonl", {"temperature": 0})
    runs = {}
    for kv_dtype in ("auto", "int8"):
        out = tmp_path / f"{kv_dtype}.jsonl"
        await distributed(checkpoint, requests, out, nodes=2, micro_batches=2, kv_dtype=kv_dtype)
        runs[kv_dtype] = read_results(out)
    same = 0
    for custom_id, _, max_tokens in PROMPTS:
        plain, int8 = runs["auto"][custom_id]["token_ids"], runs["int8"][custom_id]["token_ids"]
        assert len(plain) == len(int8) == max_tokens
        assert int8[:3] == plain[:3], custom_id
        same += int8 == plain
    assert same >= len(PROMPTS) - 1


def test_kv_dtype_choices_are_the_nodes():
    assert tuple(KV_STORAGE) == KV_DTYPES


def test_a_bad_kv_dtype_is_one_line_everywhere(tmp_path):
    done = subprocess.run([sys.executable, "-m", "glinthawk.node", "--role", "tier2", "--kv-dtype", "int4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "Error: Invalid value for '--kv-dtype': 'int4' is not one of 'auto', 'int8'."
    with pytest.raises(ValueError, match=r"^kv_dtype must be one of auto, int8, got 'fp8'$"):
        Tier2Settings(kv_dtype="fp8")
    with pytest.raises(ValueError, match="kv_dtype must be one of auto, int8"):
        LocalCluster(tmp_path, kv_dtype="fp8")
    with pytest.raises(ValueError, match=r"^--kv-dtype must be one of auto, int8, got 'fp8'$"):
        Tier2Node(kv_tokens=8, kv_dtype="fp8")
    path = tmp_path / "cluster.toml"
    path.write_text('[model]\n[tier1]\nname = "t1"\nhost = "127.0.0.1"\nport = 7700\n'
                    '[[tier2]]\nname = "a"\nhost = "127.0.0.1"\nport = 7701\nkv_dtype = "int4"\n')
    with pytest.raises(ClusterFileError, match='kv_dtype: expected one of auto, int8, got "int4"'):
        load_cluster_file(path)


def test_local_clusters_and_cluster_files_pass_kv_dtype_to_each_tier2_node(tmp_path):
    assert Tier2Settings(kv_tokens=100, kv_dtype="int8").kv_args == ["--kv-tokens", "100", "--kv-dtype", "int8"]
    assert Tier2Settings().kv_args == ["--kv-memory", "1GiB"]
    assert LocalCluster(tmp_path, kv_dtype="int8").tier2.kv_dtype == "int8"
    path = tmp_path / "cluster.toml"
    path.write_text('[model]\n[tier1]\nname = "t1"\nhost = "127.0.0.1"\nport = 7700\n'
                    '[[tier2]]\nname = "a"\nhost = "127.0.0.1"\nport = 7701\nkv_dtype = "int8"\n')
    spec = load_cluster_file(path)
    assert spec.tier2[0].options["kv_dtype"] == "int8"
    args = node_args(spec, "a")
    assert args[args.index("--kv-dtype") + 1] == "int8"
    assert local_cluster_kwargs(spec)["kv_dtype"] == "int8"
    path.write_text(path.read_text() + '[[tier2]]\nname = "b"\nhost = "127.0.0.1"\nport = 7702\n')
    with pytest.raises(ClusterFileError, match="differ in kv_memory / kv_tokens / kv_dtype"):
        local_cluster_kwargs(load_cluster_file(path))
