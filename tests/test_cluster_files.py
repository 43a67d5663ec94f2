"""cluster/: the launcher config validates against Ray's schema, the KubeRay manifests describe a GPU cluster on
shared storage running the sweep, and the Grafana ConfigMap matches dashboards/smile_sweep.json."""
import importlib.util
import json
import re
import shlex
import sys
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
SWEEP_COMMAND = "python -m smile_ray.tune --space clip_b32.yaml"
SHARED = "/mnt/shared"


def _docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path, kind: str) -> dict:
    (doc,) = [d for d in _docs(path) if d.get("kind") == kind]
    return doc


def _pinned(package: str) -> str:
    """The version requirements.lock pins for a package."""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.fullmatch(rf"{re.escape(package)}(\[[^\]]*\])?==(\S+)", line.strip())
        if match:
            return match[2]
    raise AssertionError(f"{package} is not pinned in requirements.lock")


def _image_tag() -> str:
    """The Ray image every config starts from: Ray and Python as pinned and tested."""
    return f"rayproject/ray:{_pinned('ray')}-py{sys.version_info.major}{sys.version_info.minor}-gpu"


def _sweep_args(entrypoint: str) -> list[str]:
    words = shlex.split(entrypoint)
    assert " ".join(words[:5]) == SWEEP_COMMAND, entrypoint
    return words[3:]


def test_every_yaml_in_cluster_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"ray-cluster.yaml", "raycluster.yaml", "rayjob.yaml",
                                       "grafana-dashboard-configmap.yaml", "shared-pvc.yaml", "mlflow.yaml"}
    for path in files:
        docs = _docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path
        if path.parent == KUBERAY:
            assert all(d.get("apiVersion") and d.get("kind") and d["metadata"]["name"] for d in docs), path


# --- the Ray cluster launcher ---------------------------------------------------------------------------------

def test_launcher_config_validates_against_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    validate_config(prepare_config(config))              # Ray's own checks, offline (node resources are given)


def test_launcher_config_has_a_gpu_worker_shared_storage_and_the_pinned_install():
    config = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 and t.get("max_workers", 0) >= 1 for t in types.values())
    assert config["docker"]["image"] == _image_tag()
    assert f"-v {SHARED}:{SHARED}" in config["docker"]["run_options"]
    assert any(f"{SHARED}" in c and "mount" in c for c in config["initialization_commands"])
    assert config["file_mounts"]["~/smile_ray"] == "."
    assert any("pip install" in c and "-r requirements.lock" in c and "-e ." in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--head" in head and "--dashboard-host=0.0.0.0" in head and "--metrics-export-port=8080" in head
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert "--metrics-export-port=8080" in " ".join(config["worker_start_ray_commands"])


# --- KubeRay ------------------------------------------------------------------------------------------------------

def _pod_specs(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"]["spec"] for g in groups]


def test_kuberay_cluster_has_a_gpu_worker_group_on_shared_storage():
    cluster = _one(KUBERAY / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _pinned("ray")
    assert spec["authOptions"]["mode"] == "token"
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]
    assert gpu_groups and gpu_groups[0]["maxReplicas"] >= 1
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu_groups[0]["template"]["spec"]["tolerations"])
    claim = _one(KUBERAY / "shared-pvc.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for pod in _pod_specs(spec):
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert volumes[mounts[SHARED]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert {"containerPort": 8080, "name": "metrics"} in container["ports"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["SMILE_RAY_CACHE"].startswith(SHARED) and env["HF_HOME"].startswith(SHARED)


def test_rayjob_runs_the_sweep_on_the_same_cluster_spec():
    job = _one(KUBERAY / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"] == _one(KUBERAY / "raycluster.yaml", "RayCluster")["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    args = _sweep_args(job["spec"]["entrypoint"])
    from smile_ray.spec import resolve_space_path
    from smile_ray.tune import parse_args

    options = parse_args(args)                            # the entrypoint's flags are the CLI's
    assert options.output.startswith(f"{SHARED}/") and resolve_space_path(options.space).is_file()
    env_vars = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
    service = _one(KUBERAY / "mlflow.yaml", "Service")
    assert env_vars["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def test_images_are_the_pinned_ray_release():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(_image_tag())}$", dockerfile, re.M)
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    assert ray.__version__ == _pinned("ray")
    mlflow = _one(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert mlflow.endswith(f":v{_pinned('mlflow')}")


def test_readme_gives_the_sweep_command_for_every_way():
    from smile_ray.tune import parse_args

    readme = re.sub(r"\\\n\s*", " ", (CLUSTER / "README.md").read_text())      # join continued shell lines
    commands = re.findall(r"python -m smile_ray\.tune [^\n`]*", readme)
    assert len(commands) >= 3
    for command in commands:
        options = parse_args(_sweep_args(command))
        assert options.space == "clip_b32.yaml" and options.output.startswith(f"{SHARED}/"), command


# --- the Grafana dashboard ConfigMap ------------------------------------------------------------------------------

def _configmap_script():
    spec = importlib.util.spec_from_file_location("make_dashboard_configmap", KUBERAY / "make_dashboard_configmap.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dashboard_configmap_is_in_sync_with_the_dashboard_json():
    dashboard_text = (ROOT / "dashboards" / "smile_sweep.json").read_text()
    path = KUBERAY / "grafana-dashboard-configmap.yaml"
    assert path.read_text() == _configmap_script().render(dashboard_text), \
        "run python cluster/kuberay/make_dashboard_configmap.py"
    configmap = _one(path, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["smile_sweep.json"]) == json.loads(dashboard_text)


def test_configmap_script_check_mode_reports_drift(tmp_path, monkeypatch):
    script = _configmap_script()
    assert script.main(["--check"]) == 0
    monkeypatch.setattr(script, "CONFIGMAP", tmp_path / "stale.yaml")
    (tmp_path / "stale.yaml").write_text("stale\n")
    assert script.main(["--check"]) == 1


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_head_exposes_dashboard_and_metrics(name):
    doc = _docs(KUBERAY / name)[0]
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    ports = {p["name"]: p["containerPort"] for p in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["dashboard"] == 8265 and ports["metrics"] == 8080 and ports["gcs-server"] == 6379


def test_nothing_is_exposed_outside_the_cluster():
    """cluster/README.md's threat model: every Service is ClusterIP, no Ingress, the Ray heads' services stay
    ClusterIP, and the MLflow servers serve their artifacts themselves (trials on any node never write to a path
    only one machine sees) bound to the cluster network (KubeRay) or the head's loopback (launcher)."""
    docs = [doc for path in sorted(KUBERAY.glob("*.yaml")) for doc in _docs(path)]
    assert not [d for d in docs if d.get("kind") == "Ingress"]
    for service in (d for d in docs if d.get("kind") == "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    for ray_kind, path in (("RayCluster", "raycluster.yaml"), ("RayJob", "rayjob.yaml")):
        spec = _one(KUBERAY / path, ray_kind)["spec"]
        head = (spec if ray_kind == "RayCluster" else spec["rayClusterSpec"])["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    server = " ".join(_one(KUBERAY / "mlflow.yaml", "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"])
    assert "--serve-artifacts" in server and "--artifacts-destination" in server
    launcher = (CLUSTER / "ray-cluster.yaml").read_text()
    assert re.search(r"mlflow server[^&]*--host 127\.0\.0\.1", launcher, re.S)


K8S_VERSION = "1.31"            # the Kubernetes release whose object schemas the manifests are checked against


def _pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "template", **template.get("metadata", {})},
            "spec": template["spec"]}


def _kubernetes_objects() -> list[tuple[str, dict]]:
    """(where, object) for every Kubernetes object in kuberay/, the RayCluster's and RayJob's pod templates as Pods."""
    objects = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] not in ("RayCluster", "RayJob"):
                objects.append((f"{path.name} {doc['kind']}", doc))
                continue
            cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            objects.append((f"{path.name} head", _pod(cluster["headGroupSpec"]["template"])))
            objects += [(f"{path.name} {group['groupName']}", _pod(group["template"]))
                        for group in cluster["workerGroupSpecs"]]
    return objects


@pytest.mark.parametrize("where, obj", _kubernetes_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_objects_validate_against_their_schemas(where, obj):
    """Offline, strictly (no unknown field) against the Kubernetes object schemas that kubernetes-validate ships."""
    import kubernetes_validate

    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_schema_check_catches_a_misspelt_field():
    import kubernetes_validate

    where, pod = next(o for o in _kubernetes_objects() if o[1]["kind"] == "Pod")
    pod = json.loads(json.dumps(pod))
    pod["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)


KUBERAY_RELEASE = "1.6.2"       # the KubeRay release cluster/README.md names; its RayCluster / RayJob schema is test data
KUBERAY_SCHEMA = ROOT / "tests" / "data" / f"kuberay_v{KUBERAY_RELEASE}.schema.yaml"


def _kuberay_validator(kind: str):
    """A strict validator for one KubeRay kind: KubeRay's fields from the test data, Kubernetes' own types (pod
    templates, services, env vars) from the object schemas kubernetes-validate ships for K8S_VERSION."""
    import jsonschema
    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    kuberay = yaml.safe_load(KUBERAY_SCHEMA.read_text())
    kubernetes = schema_contents(f"kubernetes-json-schema/v{K8S_VERSION}.0-local-strict/_definitions.json", K8S_VERSION)
    registry = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in (kuberay, kubernetes))
    return jsonschema.Draft202012Validator({"$ref": f"{kuberay['$id']}#/$defs/{kind}"}, registry=registry)


def _kuberay_errors(doc: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _kuberay_validator(doc["kind"]).iter_errors(doc)]


@pytest.mark.parametrize("path, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests_validate_against_the_crd_schema_of_the_named_release(path, kind):
    assert f"KubeRay v{KUBERAY_RELEASE}" in (CLUSTER / "README.md").read_text()
    assert _kuberay_errors(_one(KUBERAY / path, kind)) == []


def _set(doc: dict, path: str, value) -> dict:
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return doc


@pytest.mark.parametrize("path, value, expected", [
    ("spec.workerGroupSpec", [], "Additional properties"),                    # a misspelt KubeRay field
    ("spec.headGroupSpec.rayStartParams.num-cpus", 0, "is not of type 'string'"),   # KubeRay wants strings here
    ("spec.authOptions.mode", "Token", "is not one of"),
    ("spec.workerGroupSpecs.0.maxReplicas", "8", "is not of type 'integer'"),
    ("spec.workerGroupSpecs.0.template.spec.containers.0.imagePullPolcy", "Always", "Additional properties"),
    ("spec.headGroupSpec.template.spec.volumes.0.emptyDir.sizeLimit", [], "is not valid"),
])
def test_the_crd_schema_check_refuses_what_kubectl_would(path, value, expected):
    """Each mistake is one the API server refuses under kubectl's strict field validation, inside KubeRay's own
    fields and inside the Kubernetes types they embed (a pod template's container)."""
    errors = _kuberay_errors(_set(_one(KUBERAY / "raycluster.yaml", "RayCluster"), path, value))
    assert errors and any(expected in error for error in errors), errors
