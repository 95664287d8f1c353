"""compose.yaml and the Dockerfile: Docker cannot run here, so check that what they run would parse."""

from __future__ import annotations

from pathlib import Path

import pytest

from glinthawk.cli import main as glinthawk_main
from glinthawk.node.cli import main as node_main
from glinthawk.node.cli import parse_address

ROOT = Path(__file__).resolve().parent.parent
SECRET = "/run/secrets/glinthawk"


@pytest.fixture(scope="module")
def services() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]


def test_nodes_parse_and_authenticate(services):
    nodes = {name: node_main.make_context("glinthawk-node", list(services[name]["command"])).params
             for name in ("tier1", "tier2-a", "tier2-b")}
    for name, params in nodes.items():
        assert params["listen"].startswith("0.0.0.0:"), name
        assert str(params["secret_file"]) == SECRET and not params["insecure"], name
        assert "glinthawk" in services[name]["secrets"], name
    assert nodes["tier1"]["role"] == "tier1"
    for address in nodes["tier1"]["tier2_nodes"].split(","):
        host, port = parse_address(address, "--tier2")
        assert nodes[host]["role"] == "tier2" and nodes[host]["listen"] == f"0.0.0.0:{port}"
    assert set(services["tier1"]["depends_on"]) == {"tier2-a", "tier2-b"}


def test_submit_runs_the_examples_into_out(services):
    submit = services["submit"]
    assert submit["entrypoint"] == ["glinthawk"] and submit["command"][0] == "submit"
    params = glinthawk_main.commands["submit"].make_context("submit", list(submit["command"][1:])).params
    host, port = parse_address(params["to"], "--to")
    assert host == "tier1" and services["tier1"]["command"].count(f"--listen=0.0.0.0:{port}") == 1
    assert str(params["secret_file"]) == SECRET
    mounts = {target: source for source, target, *_ in (volume.split(":") for volume in submit["volumes"])}
    assert mounts[str(Path(params["output_path"]).parent)] == "./out"
    assert mounts[params["input_path"]] == "./examples/prompts.jsonl"


def test_image_is_the_node():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["glinthawk-node"]' in dockerfile
    assert "ARG TORCH_VARIANT=cpu" in dockerfile


def test_image_copies_what_the_build_reads():
    """pyproject.toml names its readme and license files; a build without them fails."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    copied = {name for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
              for name in line.split()[1:-1]}
    assert {project["readme"], *project["license-files"]} <= copied


def test_package_metadata_names_its_home():
    """`pip show glinthawk` gives a user somewhere to go: the repository, docs and issue tracker."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(project["urls"]) == {"Homepage", "Repository", "Documentation", "Issues"}
    assert all(url.startswith(project["urls"]["Repository"]) for url in project["urls"].values())
    assert any(c.startswith("Programming Language :: Python :: 3") for c in project["classifiers"])
    # The SPDX `license` field replaces License :: classifiers; setuptools rejects both together.
    assert not any(c.startswith("License ::") for c in project["classifiers"])
