"""deploy/k8s: the Kubernetes manifests. No cluster runs here, so render the kustomizations as kustomize
would (their resources, generated Secret and ConfigMap, labels, image), validate every object against
the Kubernetes schemas (kubernetes-validate bundles them: no network), and check that what the
containers run parses with the CLI and fits together (ports, secret, ready file, memory, grace)."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path

import kubernetes_validate  # the test extra pins it; its package holds the schemas (no network)
import pytest
import yaml

from glinthawk.cli import main as glinthawk_main
from glinthawk.net.netem import parse_size
from glinthawk.node.cli import main as node_main
from glinthawk.node.tier2 import LEAVE_GRACE_S
from glinthawk.options import parse_address

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # a release still widely run, and the newest the validator knows
QUANTITY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def render(directory: Path) -> list[dict]:
    """What ``kubectl kustomize`` would print for the few features these kustomizations use."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "labels", "resources", "secretGenerator",
                                  "configMapGenerator", "images"}, "a kustomize feature this renderer lacks"
    objects = [doc for name in kustomization.get("resources", [])
               for doc in yaml.safe_load_all((directory / name).read_text()) if doc]
    for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for generator in kustomization.get(key, []):
            assert generator.get("options", {}).get("disableNameSuffixHash", kind == "ConfigMap"), \
                "a hashed Secret name would need the references rewritten"
            data = {}
            for entry in generator["files"]:
                item, _, path = entry.rpartition("=")
                data[item or Path(path).name] = (
                    b"0123456789abcdef" if path == "glinthawk.secret" else (directory / path).read_bytes())
            field = {"Secret": "data", "ConfigMap": "binaryData"}[kind]
            objects.append({"apiVersion": "v1", "kind": kind, "metadata": {"name": generator["name"]},
                            field: {k: base64.b64encode(v).decode() for k, v in data.items()}})
    for obj in objects:
        for label in kustomization.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(label["pairs"])
        for container in containers(obj):
            for image in kustomization.get("images", []):
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


def pod_spec(obj: dict) -> dict | None:
    return obj["spec"]["template"]["spec"] if obj["kind"] in ("Deployment", "StatefulSet", "Job") else None


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return [] if spec is None else spec.get("initContainers", []) + spec["containers"]


@pytest.fixture(scope="module")
def cluster() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(K8S)}


@pytest.fixture(scope="module")
def submission() -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in render(K8S / "submit")}


def node_params(deployment: dict) -> dict:
    (container,) = pod_spec(deployment)["containers"]
    assert "command" not in container, "the image's entrypoint is glinthawk-node"
    return node_main.make_context("glinthawk-node", list(container["args"])).params


def memory(quantity: str) -> int:
    return int(quantity[:-2]) * QUANTITY[quantity[-2:]]


def test_every_object_passes_the_kubernetes_schemas(cluster, submission):
    for obj in [*cluster.values(), *submission.values()]:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)  # raises on any error or unknown field


def test_tier2_nodes_join_tier1_through_its_service(cluster):
    tier1, tier2 = node_params(cluster["Deployment", "glinthawk-tier1"]), node_params(cluster["Deployment",
                                                                                               "glinthawk-tier2"])
    service = cluster["Service", "glinthawk-tier1"]
    assert tier1["role"] == "tier1" and not tier1["tier2_nodes"]  # it waits for nodes to join
    assert tier2["role"] == "tier2"
    host, port = parse_address(tier2["join"], "--join")
    (service_port,) = service["spec"]["ports"]
    assert host == service["metadata"]["name"] and port == service_port["port"]
    (container,) = pod_spec(cluster["Deployment", "glinthawk-tier1"])["containers"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert parse_address(tier1["listen"])[1] == named[service_port["targetPort"]]
    assert service["spec"]["selector"].items() <= cluster["Deployment", "glinthawk-tier1"]["spec"]["template"][
        "metadata"]["labels"].items()
    assert cluster["Deployment", "glinthawk-tier1"]["spec"]["replicas"] == 1
    assert cluster["Deployment", "glinthawk-tier1"]["spec"]["strategy"]["type"] == "Recreate"


def test_every_node_authenticates_with_the_secret_and_is_ready_from_its_ready_file(cluster):
    secret = cluster["Secret", "glinthawk-secret"]
    for name in ("glinthawk-tier1", "glinthawk-tier2"):
        deployment = cluster["Deployment", name]
        params = node_params(deployment)
        assert params["listen"].startswith("0.0.0.0:") and not params["insecure"]
        (container,) = pod_spec(deployment)["containers"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(deployment)["volumes"]}
        secret_file = Path(params["secret_file"])
        volume = next(volumes[n] for n, path in mounts.items() if path == str(secret_file.parent))
        assert volume["secret"]["secretName"] == secret["metadata"]["name"] and secret_file.name in secret["data"]
        assert container["readinessProbe"]["exec"]["command"] == ["test", "-s", str(params["ready_file"])]


def test_tier2_memory_is_sized_from_its_kv_memory_and_it_may_drain(cluster):
    deployment = cluster["Deployment", "glinthawk-tier2"]
    params = node_params(deployment)
    (container,) = pod_spec(deployment)["containers"]
    resources = container["resources"]
    kv = parse_size(params["kv_memory"])
    assert memory(resources["requests"]["memory"]) >= kv + 512 * 2**20  # the process beside its KV
    assert resources["limits"]["memory"] == resources["requests"]["memory"]  # never evicted for its KV
    # SIGTERM (a scale-down): the node leaves once Tier 1 finished or moved its sequences
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > params["drain_timeout"] + LEAVE_GRACE_S


def test_the_job_submits_a_file_from_a_volume_to_a_volume(cluster, submission):
    job = submission["Job", "glinthawk-submit"]
    spec = pod_spec(job)
    (wait,) = spec["initContainers"]
    (submit,) = spec["containers"]
    assert submit["command"] == ["glinthawk"] and submit["args"][0] == "submit"
    params = glinthawk_main.commands["submit"].make_context("submit", list(submit["args"][1:])).params
    service = cluster["Service", "glinthawk-tier1"]
    assert parse_address(params["to"], "--to") == (service["metadata"]["name"], service["spec"]["ports"][0]["port"])
    assert params["resume"]  # a retried pod continues the file
    mounts = {m["mountPath"]: m["name"] for m in submit["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    source = volumes[mounts[str(Path(params["input_path"]).parent)]]
    config_map = submission["ConfigMap", source["configMap"]["name"]]
    assert Path(params["input_path"]).name in config_map["binaryData"]
    results = volumes[mounts[str(Path(params["output_path"]).parent)]]
    assert ("PersistentVolumeClaim", results["persistentVolumeClaim"]["claimName"]) in submission
    assert (K8S / "submit" / "prompts.jsonl").read_bytes() == (ROOT / "examples" / "prompts.jsonl").read_bytes()
    # the init container waits until `glinthawk status` gets an answer from the same Tier 1
    shell = wait["command"][-1]
    assert wait["command"][:2] == ["sh", "-c"] and shell.startswith("until ")
    status = shlex.split(shell.removeprefix("until ").split(";")[0].split(">")[0])
    assert status[:2] == ["glinthawk", "status"]
    status_params = glinthawk_main.commands["status"].make_context("status", status[2:]).params
    assert status_params["address"] == params["to"] and status_params["secret_file"] == params["secret_file"]


def test_the_secret_itself_stays_out_of_git():
    assert "glinthawk.secret" in (K8S / ".gitignore").read_text().split()
