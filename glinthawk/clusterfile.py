"""``cluster.toml``: one file that describes a whole cluster, so every machine starts its node from it.

It names the model, the Tier 1 node, the Tier 2 nodes, the shared secret and any injected link delay;
``examples/cluster.toml`` shows every key and docs/DEPLOYMENT.md explains them. An optional key left out
means the node's own default, so a file never restates, and cannot drift from, the command line's defaults.
Relative paths (model, secret file) are relative to the cluster file.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from glinthawk import DEFAULT_MODEL
from glinthawk.compute.config import DTYPE_NAMES
from glinthawk.net.auth import is_loopback
from glinthawk.toml_table import ClusterFileError, Table
from glinthawk.settings import NetemSettings, Tier1Settings, Tier2Settings, args_for, field_names

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_LAYERS = re.compile(r"\d+:\d+")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ModelSpec:
    path: Path | None = None  # None: the bundled model
    dtype: str | None = None
    device: str | None = None


class _Options:
    """The role settings a file gives (``options``), also readable as attributes: one that the
    file leaves out reads None, and the node's own default applies."""

    SETTINGS: ClassVar[type]
    options: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name != "options" and name in field_names(self.SETTINGS):
            return self.options.get(name)
        raise AttributeError(name)


@dataclass(frozen=True)
class NodeSpec(_Options):
    name: str
    host: str  # the address the other nodes and the clients connect to
    port: int
    listen: str  # the address to bind: ``host`` unless the file says otherwise (e.g. 0.0.0.0)
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Tier1Spec(NodeSpec):
    """Tier 1, or with [[stage]] tables its first pipeline stage (``layers`` "0:B")."""

    SETTINGS: ClassVar[type] = Tier1Settings
    layers: str | None = None


@dataclass(frozen=True)
class StageSpec(Tier1Spec):
    """A pipeline stage after the first."""


@dataclass(frozen=True)
class Tier2Spec(NodeSpec):
    SETTINGS: ClassVar[type] = Tier2Settings
    stage: str | None = None  # the name of the stage whose KV it holds (default: the [tier1] node)


@dataclass(frozen=True)
class InjectSpec(_Options):
    SETTINGS: ClassVar[type] = NetemSettings
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClusterSpec:
    source: Path
    model: ModelSpec
    tier1: Tier1Spec
    tier2: tuple[Tier2Spec, ...]
    inject: InjectSpec
    secret_file: Path | None = None
    insecure: bool = False
    stages: tuple[StageSpec, ...] = ()  # pipeline stages after [tier1], in layer order

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        return (self.tier1, *self.stages, *self.tier2)

    def tier2_of(self, stage: Tier1Spec) -> list[Tier2Spec]:
        return [t for t in self.tier2 if (t.stage or self.tier1.name) == stage.name]

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(node.name for node in self.nodes)
        raise ClusterFileError(f"{self.source}: no node named {json.dumps(name)}; the nodes are: {known}")


def load_cluster_file(path: str | Path, *, for_node: str | None = None) -> ClusterSpec:
    """Read and validate a cluster file; every problem is a :class:`ClusterFileError` naming file and key.

    ``for_node``: the node this machine is about to run. Tier 2 machines never read the weights, so the
    model directory is only required to exist here when ``for_node`` is None or names the Tier 1 node.
    """
    source = Path(path)
    try:
        with open(source, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ClusterFileError(f"cannot read cluster file {source}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ClusterFileError(f"{source}: not a valid TOML file: {exc}") from None
    base = source.parent
    top = Table(source, "", data)
    secret_file = top.path("secret_file", base)
    if secret_file is not None and not secret_file.is_file():
        raise top.error(f"no such file {secret_file}", "secret_file")
    insecure = bool(top.flag("insecure"))
    tier1 = _tier1(top.table("tier1", required=True))
    tier2 = tuple(_tier2(table) for table in top.tables("tier2"))
    stages = tuple(_tier1(table, StageSpec) for table in top.tables("stage", required=False))
    readers = {tier1.name, *(stage.name for stage in stages)}  # the nodes that read the weights
    model = _model(top.table("model"), base, check_dir=for_node is None or for_node in readers)
    inject = _inject(top.table("inject"))
    top.finish()
    spec = ClusterSpec(source, model, tier1, tier2, inject, secret_file, insecure, stages)
    _check_stages(spec)
    _check_unique(spec)
    _check_exposure(spec)
    return spec


def node_args(spec: ClusterSpec, name: str) -> list[str]:
    """The ``glinthawk-node`` arguments that run node ``name`` of ``spec``."""
    node = spec.node(name)
    if isinstance(node, Tier1Spec):
        chain = [spec.tier1, *spec.stages]
        after = chain[chain.index(node) + 1:]
        role = ["--role", "tier1", "--tier2", ",".join(t.address for t in spec.tier2_of(node)), *_flags(
            model=spec.model.path, dtype=spec.model.dtype, device=spec.model.device, layers=node.layers,
            next=after[0].address if after else None)]
    else:
        role = ["--role", "tier2"]
    common = [*args_for(node.SETTINGS, node.options), *_flags(secret_file=spec.secret_file),
              *args_for(NetemSettings, spec.inject.options)]
    return [*role, "--listen", f"{node.listen}:{node.port}", *common, *(["--insecure"] if spec.insecure else [])]


def local_cluster_kwargs(spec: ClusterSpec) -> dict[str, Any]:
    """Keyword arguments for :class:`glinthawk.cluster.LocalCluster` that run ``spec`` on loopback.

    The same model, sizes, secret and delays; names, hosts and ports are not used (a local cluster binds
    free loopback ports). Settings the file leaves out are left out here too, so LocalCluster's defaults apply.
    """
    sizes = {tuple(sorted(t.options.items())) for t in spec.tier2}
    if len(sizes) > 1:
        raise ClusterFileError(
            f"{spec.source}: a local cluster gives every Tier 2 node the same KV cache size and dtype, but the "
            "[[tier2]] nodes differ in kv_memory / kv_tokens / kv_dtype; give them all the same to run this file on "
            "loopback"
        )
    counts = {len(spec.tier2_of(stage)) for stage in (spec.tier1, *spec.stages)}
    if len(counts) > 1:
        raise ClusterFileError(f"{spec.source}: a local cluster gives every stage the same number of Tier 2 nodes, "
                               "but the stages here differ; give each the same number to run this file on loopback")
    settings = {
        "model_dir": spec.model.path or DEFAULT_MODEL, "dtype": spec.model.dtype, "device": spec.model.device,
        "tier2_nodes": counts.pop(), **spec.tier2[0].options, **spec.tier1.options, **spec.inject.options,
        "secret_file": spec.secret_file,
        "stages": ",".join(stage.layers for stage in (spec.tier1, *spec.stages)) if spec.stages else None,
    }
    return {key: value for key, value in settings.items() if value is not None}


def _flags(**options: object) -> list[str]:
    """``--some-option VALUE`` for each option that is set; an unset one keeps the node's default."""
    return [arg for key, value in options.items() if value is not None
            for arg in (f"--{key.replace('_', '-')}", str(value))]


def _model(t: Table, base: Path, check_dir: bool) -> ModelSpec:
    path = t.path("path", base)
    if path is not None and check_dir and not path.is_dir():
        raise t.error(f"no such directory {path} (a relative path is relative to the cluster file)", "path")
    dtype = t.text("dtype", expected=f"auto or one of {', '.join(DTYPE_NAMES)}",
                   check=lambda v: v == "auto" or v in DTYPE_NAMES)
    device = t.text("device", expected="cpu, cuda, cuda:N or auto", check=_DEVICE.fullmatch)
    t.finish()
    return ModelSpec(path, dtype, device)


def _node(t: Table) -> dict[str, Any]:
    """The keys every node has; the caller reads its role's own keys, then calls ``t.finish()``."""
    name = t.text("name", required=True, expected="a name of letters, digits, '-', '_' and '.'",
                  check=_NAME.fullmatch)
    address = "an address the other nodes can connect to (bind to all interfaces with listen = \"0.0.0.0\")"
    host = t.text("host", required=True, expected=address, check=lambda v: v not in _WILDCARD_HOSTS)
    port = t.integer("port", required=True, minimum=1, maximum=65535)
    listen = t.text("listen", expected="an address to bind, like \"0.0.0.0\"")
    return {"name": name, "host": host, "port": port, "listen": listen or host}


def _tier1(t: Table, kind: type[Tier1Spec] = Tier1Spec) -> Tier1Spec:
    layers = t.text("layers", required=kind is StageSpec, expected='layers "A:B" (A..B-1)', check=_LAYERS.fullmatch)
    spec = kind(**_node(t), options=_settings(t, Tier1Settings), layers=layers)
    t.finish()
    return spec


def _tier2(t: Table) -> Tier2Spec:
    stage = t.text("stage", expected="the name of the [tier1] node or of a [[stage]]")
    spec = Tier2Spec(**_node(t), options=_settings(t, Tier2Settings), stage=stage)
    if spec.kv_memory is not None and spec.kv_tokens is not None:
        raise t.error("give kv_memory or kv_tokens, not both")
    t.finish()
    return spec


def _inject(t: Table) -> InjectSpec:
    spec = InjectSpec(options=_settings(t, NetemSettings))
    t.finish()
    return spec


def _settings(t: Table, cls: type) -> dict[str, Any]:
    """The fields of the settings class ``cls`` that table ``t`` gives, each checked as the node checks it."""
    hints = typing.get_type_hints(cls)
    given = {}
    for item in dataclasses.fields(cls):
        kind, minimum, text = hints[item.name], item.metadata.get("minimum"), item.metadata.get("text")
        if kind is int or kind == int | None:
            value = t.integer(item.name, minimum=int(minimum or 0))
        elif kind is float:
            value = t.number(item.name, minimum=minimum or 0)
        elif text == "size":
            value = t.size(item.name)
        elif text == "bandwidth":
            value = t.bandwidth(item.name)
        elif choices := item.metadata.get("choices"):
            value = t.text(item.name, expected=f"one of {', '.join(choices)}", check=lambda v, c=choices: v in c)
        else:
            value = t.text(item.name)
        if value is not None:
            given[item.name] = value
    return given


def _check_stages(spec: ClusterSpec) -> None:
    """Stages follow each other from layer 0, and each has Tier 2 nodes (the last layer is checked by the
    nodes, which read the model)."""
    chain = [spec.tier1, *spec.stages]
    names = [stage.name for stage in chain]
    for i, node in enumerate(spec.tier2):
        if node.stage is not None and node.stage not in names:
            raise ClusterFileError(f"{spec.source}: tier2[{i}].stage: no stage named {json.dumps(node.stage)}; the "
                                   f"stages are: {', '.join(names)}")
    if not spec.stages:
        if spec.tier1.layers is not None:
            raise ClusterFileError(f"{spec.source}: tier1.layers: a single Tier 1 serves every layer; give layers "
                                   "only with [[stage]] tables for the stages after it")
        return
    if spec.tier1.layers is None or not spec.tier1.layers.startswith("0:"):
        raise ClusterFileError(f'{spec.source}: tier1.layers: with [[stage]] tables, [tier1] is the first stage; '
                               'give its layers as "0:B"')
    for before, stage in zip(chain, chain[1:]):
        if before.layers.split(":")[1] != stage.layers.split(":")[0]:
            raise ClusterFileError(f"{spec.source}: stage {stage.name} starts at layer {stage.layers.split(':')[0]} but "
                                   f"{before.name} ends at {before.layers.split(':')[1]}; the stages' layers must "
                                   "follow each other without gap or overlap")
    for stage in chain:
        if not spec.tier2_of(stage):
            raise ClusterFileError(f"{spec.source}: stage {stage.name} has no Tier 2 node; give a [[tier2]] table "
                                   f"with stage = {json.dumps(stage.name)}")


def _check_unique(spec: ClusterSpec) -> None:
    names: dict[str, str] = {}
    addresses: dict[tuple[str, int], str] = {}
    for where, node in _labelled(spec):
        if node.name in names:
            raise ClusterFileError(f"{spec.source}: {where}.name: {json.dumps(node.name)} is already the name "
                                   f"of {names[node.name]}; node names must be unique")
        key = (node.host.lower(), node.port)
        if key in addresses:
            raise ClusterFileError(f"{spec.source}: {where}: {node.address} is already the address of "
                                   f"{addresses[key]}; every node needs its own host and port")
        names[node.name], addresses[key] = where, where


def _check_exposure(spec: ClusterSpec) -> None:
    """A node reachable from other machines must authenticate its peers, unless the file opts out."""
    if spec.secret_file is not None or spec.insecure:
        return
    for where, node in _labelled(spec):
        exposed = next((h for h in (node.host, node.listen) if not is_loopback(h)), None)
        if exposed is not None:
            raise ClusterFileError(
                f"{spec.source}: {where} ({node.name}) is reachable from other machines at {exposed} but the file "
                "sets no secret_file; add secret_file = \"PATH\" (the shared secret, the same on every machine), "
                "or insecure = true on a trusted network only"
            )


def _labelled(spec: ClusterSpec) -> list[tuple[str, NodeSpec]]:
    return [("tier1", spec.tier1), *((f"stage[{i}]", node) for i, node in enumerate(spec.stages)),
            *((f"tier2[{i}]", node) for i, node in enumerate(spec.tier2))]
