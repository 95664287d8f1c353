"""cluster.toml: parsing, validation messages, and the arguments it gives the node and run commands."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from glinthawk import DEFAULT_MODEL
from glinthawk.cli import main as glinthawk_main
from glinthawk.cluster import LocalCluster
from glinthawk.clusterfile import ClusterFileError, load_cluster_file, local_cluster_kwargs, node_args
from glinthawk.node.cli import main as node_main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"

BASE = """\
[model]
dtype = "float32"

[tier1]
name = "tier1"
host = "127.0.0.1"
port = 7700

[[tier2]]
name = "a"
host = "127.0.0.1"
port = 7701
kv_memory = "1GiB"

[[tier2]]
name = "b"
host = "127.0.0.1"
port = 7702
kv_memory = "1GiB"
"""

TOP = "[model]\n"  # replace this to add top-level keys, which TOML wants before the first table
TIER2 = BASE[BASE.index("[[tier2]]"):]


def write(tmp_path: Path, text: str, name: str = "cluster.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(*replacements: tuple[str, str]) -> str:
    text = BASE
    for old, new in replacements:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def parse_node_args(args: list[str]) -> dict:
    return node_main.make_context("glinthawk-node", args).params


def test_example_file_parses():
    spec = load_cluster_file(EXAMPLE)
    assert spec.model.path is None and spec.model.dtype == "auto"
    assert (spec.tier1.name, spec.tier1.address, spec.tier1.micro_batches) == ("tier1", "127.0.0.1:7700", 4)
    assert [(t.name, t.address, t.kv_memory) for t in spec.tier2] == [
        ("tier2-a", "127.0.0.1:7701", "1GiB"), ("tier2-b", "127.0.0.1:7702", "1GiB")]
    assert spec.secret_file is None and not spec.insecure


def test_multi_machine_file(tmp_path):
    (tmp_path / "model").mkdir()
    write(tmp_path, "s3cret\n", "glinthawk.secret")
    path = write(tmp_path, edited(
        (TOP, 'secret_file = "glinthawk.secret"\n[model]\npath = "model"\ndevice = "cuda:1"\n'),
        ('host = "127.0.0.1"\nport = 7700', 'host = "10.0.0.1"\nport = 7700\nlisten = "0.0.0.0"\nmax_seqs = 64'),
        ('host = "127.0.0.1"\nport = 7701', 'host = "10.0.0.2"\nport = 7701'),
        ('port = 7702\nkv_memory = "1GiB"', 'port = 7702\nkv_tokens = 4096'),
    ) + '[inject]\ndelay_ms = 20\njitter_ms = 2.5\nbandwidth = "1Gbit"\n')
    spec = load_cluster_file(path)
    assert spec.model.path == tmp_path / "model" and spec.secret_file == tmp_path / "glinthawk.secret"
    assert (spec.tier1.host, spec.tier1.listen) == ("10.0.0.1", "0.0.0.0")
    assert spec.tier2[1].kv_tokens == 4096 and spec.tier2[1].kv_memory is None

    tier1 = parse_node_args(node_args(spec, "tier1"))
    assert tier1["role"] == "tier1" and tier1["listen"] == "0.0.0.0:7700"
    assert tier1["tier2_nodes"] == "10.0.0.2:7701,127.0.0.1:7702"
    assert (tier1["model_dir"], tier1["device"], tier1["max_seqs"]) == (tmp_path / "model", "cuda:1", 64)
    assert tier1["micro_batches"] is None  # left out of the file: the node's own default (measured)
    assert tier1["secret_file"] == tmp_path / "glinthawk.secret" and not tier1["insecure"]
    assert (tier1["delay_ms"], tier1["jitter_ms"], tier1["bandwidth"]) == (20, 2.5, "1Gbit")  # --inject-*
    a, b = (parse_node_args(node_args(spec, name)) for name in ("a", "b"))
    assert (a["role"], a["listen"], a["kv_memory"], a["kv_tokens"]) == ("tier2", "10.0.0.2:7701", "1GiB", None)
    assert (b["listen"], b["kv_memory"], b["kv_tokens"]) == ("127.0.0.1:7702", None, 4096)
    assert b["secret_file"] == tmp_path / "glinthawk.secret"


def test_insecure_allows_exposed_nodes_without_a_secret(tmp_path):
    path = write(tmp_path, edited((TOP, "insecure = true\n[model]\n"),
                                  ('host = "127.0.0.1"\nport = 7701', 'host = "10.0.0.2"\nport = 7701')))
    params = parse_node_args(node_args(load_cluster_file(path), "a"))
    assert params["insecure"] and params["secret_file"] is None


def test_tier2_machines_need_no_model(tmp_path):
    path = write(tmp_path, edited(("[model]\n", '[model]\npath = "/nowhere/model"\n')))
    assert load_cluster_file(path, for_node="a").model.path == Path("/nowhere/model")
    for for_node in (None, "tier1"):
        with pytest.raises(ClusterFileError, match=r"model\.path: no such directory /nowhere/model"):
            load_cluster_file(path, for_node=for_node)


INVALID = {
    "unknown top-level key": ((TOP, "colour = 1\n[model]\n"), 'unknown key "colour"'),
    "unknown node key": (('kv_memory = "1GiB"\n\n', 'kv_mem = "1GiB"\n\n'), 'tier2[0]: unknown key "kv_mem"'),
    "wrong type": (("port = 7700", 'port = "7700"'), 'tier1.port: expected an integer from 1 to 65535, got "7700"'),
    "port out of range": (("port = 7700", "port = 70000"),
                          "tier1.port: expected an integer from 1 to 65535, got 70000"),
    "missing required key": (('name = "b"\n', ""), "tier2[1].name: missing; expected a name"),
    "missing tier1": (('[tier1]\nname = "tier1"\nhost = "127.0.0.1"\nport = 7700\n', ""),
                      "tier1: missing; expected a table [tier1]"),
    "no tier2": ((TIER2, ""), "tier2: missing; expected at least one [[tier2]] table"),
    "tier2 not an array": ((TIER2, '[tier2]\nname = "a"\nhost = "127.0.0.1"\nport = 7701\n'),
                           "tier2: expected at least one [[tier2]] table, got a table"),
    "duplicate name": (('name = "b"', 'name = "tier1"'), 'tier2[1].name: "tier1" is already the name of tier1'),
    "duplicate address": (("port = 7702", "port = 7701"),
                          "tier2[1]: 127.0.0.1:7701 is already the address of tier2[0]"),
    "bad size": (('kv_memory = "1GiB"\n\n', 'kv_memory = "8 parsecs"\n\n'), "tier2[0].kv_memory: unknown size unit"),
    "zero size": (('kv_memory = "1GiB"\n\n', "kv_memory = 0\n\n"), "tier2[0].kv_memory: expected a size > 0"),
    "two kv sizes": (('kv_memory = "1GiB"\n\n', 'kv_memory = "1GiB"\nkv_tokens = 10\n\n'),
                     "tier2[0]: give kv_memory or kv_tokens, not both"),
    "bad dtype": (('dtype = "float32"', 'dtype = "int4"'), 'model.dtype: expected auto or one of float32, bfloat16, float16'),
    "bad device": (("[model]\n", '[model]\ndevice = "tpu"\n'), 'model.device: expected cpu, cuda, cuda:N or auto'),
    "missing model dir": (("[model]\n", '[model]\npath = "no-such-model"\n'), "model.path: no such directory"),
    "exposed without secret": (('host = "127.0.0.1"\nport = 7701', 'host = "10.0.0.2"\nport = 7701'),
                               "tier2[0] (a) is reachable from other machines at 10.0.0.2"),
    "exposed listen without secret": (("port = 7700", 'port = 7700\nlisten = "0.0.0.0"'),
                                      "tier1 (tier1) is reachable from other machines at 0.0.0.0"),
    "wildcard host": (('host = "127.0.0.1"\nport = 7700', 'host = "0.0.0.0"\nport = 7700'),
                      'tier1.host: expected an address the other nodes can connect to'),
    "missing secret file": ((TOP, 'secret_file = "missing.secret"\n[model]\n'), "secret_file: no such file"),
    "not a bool": ((TOP, 'insecure = "yes"\n[model]\n'), 'insecure: expected true or false, got "yes"'),
    "bad bandwidth": ((TOP, "[inject]\nbandwidth = \"fast\"\n[model]\n"), "inject.bandwidth: cannot parse bandwidth"),
    "negative delay": ((TOP, "[inject]\ndelay_ms = -1\n[model]\n"), "inject.delay_ms: expected a number >= 0, got -1"),
    "bad name": (('name = "b"', 'name = "b c"'), 'tier2[1].name: expected a name of letters'),
    "not TOML": (("port = 7700", "port = "), "not a valid TOML file"),
}


@pytest.mark.parametrize("replacement, message", INVALID.values(), ids=INVALID.keys())
def test_invalid_file_names_the_problem(tmp_path, replacement, message):
    path = write(tmp_path, edited(replacement))
    with pytest.raises(ClusterFileError) as info:
        load_cluster_file(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unreadable_file(tmp_path):
    with pytest.raises(ClusterFileError, match="cannot read cluster file .*missing.toml"):
        load_cluster_file(tmp_path / "missing.toml")


def test_unknown_node_name():
    with pytest.raises(ClusterFileError, match='no node named "c"; the nodes are: tier1, tier2-a, tier2-b'):
        node_args(load_cluster_file(EXAMPLE), "c")


def test_local_cluster_kwargs(tmp_path):
    settings = local_cluster_kwargs(load_cluster_file(EXAMPLE))
    assert settings == {"model_dir": DEFAULT_MODEL, "dtype": "auto", "device": "auto", "tier2_nodes": 2,
                        "kv_memory": "1GiB", "micro_batches": 4, "max_batch_tokens": 2048, "max_seqs": 256,
                        "delay_ms": 0.0, "jitter_ms": 0.0}
    LocalCluster(**settings)  # every key is a LocalCluster field
    uneven = write(tmp_path, edited(('port = 7702\nkv_memory = "1GiB"', 'port = 7702\nkv_memory = "2GiB"')))
    with pytest.raises(ClusterFileError, match="same KV cache size"):
        local_cluster_kwargs(load_cluster_file(uneven))


def _parsed(command: click.Command) -> click.Command:
    """``command``'s own parameters (``--cluster`` included), returning what it parsed instead of running."""
    return click.command(command.name, params=list(command.params))(lambda **params: params)


def _invoke(command: click.Command, args: list[str], prog_name: str) -> dict:
    return command.main(args, prog_name=prog_name, standalone_mode=False)


def test_node_cluster_option():
    node = _parsed(node_main)
    params = _invoke(node, ["--name", "tier2-b", "--cluster", str(EXAMPLE), "--kv-memory", "2GiB"], "glinthawk-node")
    expected = parse_node_args(node_args(load_cluster_file(EXAMPLE), "tier2-b"))
    assert params == expected | {"kv_memory": "2GiB"}  # the file's settings, and a flag given still wins
    with pytest.raises(click.UsageError, match="--cluster FILE and --name NAME go together"):
        _invoke(node, ["--cluster", str(EXAMPLE)], "glinthawk-node")
    with pytest.raises(click.UsageError, match='no node named "c"'):
        _invoke(node, ["--cluster", str(EXAMPLE), "--name", "c"], "glinthawk-node")
    with pytest.raises(click.MissingParameter):  # without --cluster, --role is still required
        _invoke(node, [], "glinthawk-node")


def test_run_cluster_option(tmp_path):
    run = _parsed(glinthawk_main.commands["run"])
    params = _invoke(run, ["in.jsonl", "-o", "out.jsonl", "--cluster", str(EXAMPLE), "--max-seqs", "8"], "run")
    assert (params["tier2_nodes"], params["kv_memory"], params["max_seqs"]) == (2, "1GiB", 8)
    broken = write(tmp_path, edited(("port = 7700", "port = 0")))
    with pytest.raises(click.BadParameter, match=r"tier1\.port"):
        _invoke(run, ["in.jsonl", "-o", "out.jsonl", "--cluster", str(broken)], "run")


def test_every_tier1_setting_is_a_key_and_means_what_its_option_means(tmp_path):
    """[tier1] takes every field of Tier1Settings under its own name, checked and passed on as the
    node's option (heartbeat_timeout_s as --heartbeat-timeout); a value below the option's range is refused."""
    spec = load_cluster_file(write(tmp_path, edited(("port = 7700", "port = 7700\nheartbeat_timeout_s = 3\n"
                                                                     "max_waiting = 64"))))
    tier1 = parse_node_args(node_args(spec, "tier1"))
    assert (tier1["heartbeat_timeout_s"], tier1["max_waiting"], tier1["max_seqs"]) == (3.0, 64, 256)
    with pytest.raises(ClusterFileError, match=r"tier1.heartbeat_timeout_s: expected a number >= 0.1, got 0.01"):
        load_cluster_file(write(tmp_path, edited(("port = 7700", "port = 7700\nheartbeat_timeout_s = 0.01"))))


STAGES = BASE.replace('port = 7700\n', 'port = 7700\nlayers = "0:2"\n').replace(
    'name = "b"', 'name = "b"\nstage = "second"') + """
[[stage]]
name = "second"
host = "127.0.0.1"
port = 7710
layers = "2:4"
"""


def test_stages_give_each_stage_its_layers_nodes_and_next(tmp_path):
    spec = load_cluster_file(write(tmp_path, STAGES))
    first = parse_node_args(node_args(spec, "tier1"))
    assert (first["layers"], first["next_stage"], first["tier2_nodes"]) == ("0:2", "127.0.0.1:7710", "127.0.0.1:7701")
    second = parse_node_args(node_args(spec, "second"))
    assert (second["role"], second["layers"], second["next_stage"], second["tier2_nodes"]) == (
        "tier1", "2:4", None, "127.0.0.1:7702")
    assert second["dtype"] == "float32"
    local = local_cluster_kwargs(spec)
    assert (local["stages"], local["tier2_nodes"]) == ("0:2,2:4", 1)


@pytest.mark.parametrize("text,message", [
    (STAGES.replace('layers = "2:4"', 'layers = "3:4"'), "stage second starts at layer 3 but tier1 ends at 2"),
    (STAGES.replace('stage = "second"', 'stage = "third"'), 'tier2[1].stage: no stage named "third"'),
    (STAGES.replace('stage = "second"\n', ''), 'stage second has no Tier 2 node; give a [[tier2]] table with stage = '
                                               '"second"'),
    (STAGES.replace('layers = "0:2"\n', ''), 'tier1.layers: with [[stage]] tables, [tier1] is the first stage'),
    (BASE.replace('port = 7700\n', 'port = 7700\nlayers = "0:2"\n'), "tier1.layers: a single Tier 1 serves every layer"),
    (STAGES.replace('layers = "2:4"', 'layers = "two"'), 'stage[0].layers: expected layers "A:B"'),
])
def test_a_bad_stage_layout_in_the_file_is_named(tmp_path, text, message):
    with pytest.raises(ClusterFileError, match=re.escape(message)):
        load_cluster_file(write(tmp_path, text))
