"""infra/ checked offline: every Kubernetes manifest parses and matches the Kubernetes API schema
(the OpenAPI models of the `kubernetes` client: unknown fields and wrong types fail); the CRDs
(Profile, RayCluster) match a schema of the fields faceid uses, and their pod templates the
Kubernetes schema; names and image tags agree with the pipelines; the Dockerfiles copy files
that exist and pin what `make install` pins. No Docker engine or cluster here, so nothing is built."""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import pytest
import yaml

import faceid_components as components
import faceid_pipelines as pipelines

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "infra" / "k8s"
CORE_KINDS = {"Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet", "Service": "V1Service",
              "Secret": "V1Secret", "PersistentVolumeClaim": "V1PersistentVolumeClaim"}
PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": (str, int, dict, list)}


def check_k8s(obj, type_name: str, where: str) -> None:
    """Raise AssertionError naming the path of the first field the Kubernetes API would reject."""
    from kubernetes import client

    if type_name.startswith("list["):
        assert isinstance(obj, list), f"{where}: expected a list"
        for i, item in enumerate(obj):
            check_k8s(item, type_name[5:-1], f"{where}[{i}]")
        return
    if type_name.startswith("dict("):
        assert isinstance(obj, dict), f"{where}: expected a mapping"
        value_type = type_name[5:-1].split(", ", 1)[1]
        for key, value in obj.items():
            check_k8s(value, value_type, f"{where}.{key}")
        return
    if type_name in PRIMITIVES:
        assert isinstance(obj, PRIMITIVES[type_name]) and not (type_name == "int" and isinstance(obj, bool)), \
            f"{where}: expected {type_name}, got {obj!r}"
        return
    cls = getattr(client.models, type_name)
    assert isinstance(obj, dict), f"{where}: expected a {type_name} mapping"
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    for key, value in obj.items():
        assert key in by_json, f"{where}.{key}: unknown field of {type_name}"
        check_k8s(value, cls.openapi_types[by_json[key]], f"{where}.{key}")


def manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc:
                out.append((f"{path.name}#{i}", doc))
    return out


def by_kind(kind: str) -> list[dict]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


POD_TEMPLATE = {"type": "object", "required": ["spec"], "properties": {"spec": {"type": "object", "required": ["containers"]}}}
CRD_SCHEMAS = {
    ("kubeflow.org/v1", "Profile"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["name"], "not": {"required": ["namespace"]}},
            "spec": {"type": "object", "required": ["owner"], "additionalProperties": False, "properties": {
                "owner": {"type": "object", "required": ["kind", "name"], "properties": {
                    "kind": {"enum": ["User", "Group"]}, "name": {"type": "string"}}},
                "resourceQuotaSpec": {"type": "object"}, "plugins": {"type": "array"}}},
        },
    },
    ("ray.io/v1", "RayCluster"): {
        "type": "object", "required": ["metadata", "spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["name", "namespace"]},
            "spec": {"type": "object", "required": ["headGroupSpec", "workerGroupSpecs", "rayVersion"],
                     "additionalProperties": False, "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "headGroupSpec": {"type": "object", "required": ["template"], "additionalProperties": False, "properties": {
                    "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                    "serviceType": {"type": "string"}, "template": POD_TEMPLATE}},
                "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["groupName", "template"], "additionalProperties": False, "properties": {
                        "groupName": {"type": "string"}, "replicas": {"type": "integer"},
                        "minReplicas": {"type": "integer"}, "maxReplicas": {"type": "integer"},
                        "rayStartParams": {"type": "object", "additionalProperties": {"type": "string"}},
                        "template": POD_TEMPLATE}}},
            }},
        },
    },
}


@pytest.mark.parametrize("name,doc", manifests(), ids=[n for n, _ in manifests()])
def test_manifest_matches_its_schema(name, doc):
    assert {"apiVersion", "kind", "metadata"} <= set(doc), name
    if doc["kind"] in CORE_KINDS:
        check_k8s(doc, CORE_KINDS[doc["kind"]], name)
        assert doc["metadata"].get("namespace") == "faceid", f"{name}: everything lives in the faceid namespace"
        return
    schema = CRD_SCHEMAS[(doc["apiVersion"], doc["kind"])]
    jsonschema.validate(doc, schema)
    if doc["kind"] == "RayCluster":
        groups = [doc["spec"]["headGroupSpec"]] + doc["spec"]["workerGroupSpecs"]
        for i, group in enumerate(groups):
            check_k8s(group["template"], "V1PodTemplateSpec", f"{name}.group[{i}].template")


def test_the_validator_rejects_mistakes():
    with pytest.raises(AssertionError, match="contaners: unknown field"):
        check_k8s({"spec": {"contaners": []}}, "V1PodTemplateSpec", "t")
    with pytest.raises(AssertionError, match="replicas: expected int"):
        check_k8s({"replicas": "1", "selector": {}, "template": {}}, "V1DeploymentSpec", "t")


def test_names_agree_with_the_pipelines():
    pvcs = {d["metadata"]["name"] for d in by_kind("PersistentVolumeClaim")}
    secrets = {d["metadata"]["name"]: d for d in by_kind("Secret")}
    assert pipelines.MODELS_PVC in pvcs
    assert set(pipelines.MLFLOW_SECRET_ENV) <= set(secrets[pipelines.MLFLOW_SECRET]["stringData"])
    (profile,) = by_kind("Profile")
    assert profile["metadata"]["name"] == "faceid"
    (mlflow_svc,) = [s for s in by_kind("Service") if s["metadata"]["name"] == "mlflow"]
    port = mlflow_svc["spec"]["ports"][0]["port"]
    assert secrets[pipelines.MLFLOW_SECRET]["stringData"]["MLFLOW_TRACKING_URI"] == f"http://mlflow.faceid.svc.cluster.local:{port}"


def test_ray_cluster_runs_the_pinned_gpu_image_and_this_ray():
    import ray

    (cluster,) = by_kind("RayCluster")
    assert cluster["spec"]["rayVersion"] == ray.__version__
    head, gpu, cpu = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group, image in [(head, components.GPU_IMAGE), (gpu, components.GPU_IMAGE), (cpu, components.IMAGE)]:
        for container in group["template"]["spec"]["containers"]:
            assert container["image"] == image
    assert "nvidia.com/gpu" not in str(cpu)  # prepare-pose's clip makers: CPU nodes
    worker = gpu["template"]["spec"]
    assert worker["containers"][0]["resources"]["limits"][pipelines.GPU_RESOURCE] == "1"
    assert worker["nodeSelector"] == {pipelines.GPU_NODE_LABEL[0]: pipelines.GPU_NODE_LABEL[1]}
    assert worker["volumes"][0]["persistentVolumeClaim"]["claimName"] == pipelines.MODELS_PVC


def test_mlflow_server_image_pins_this_mlflow():
    import mlflow

    (deploy,) = [d for d in by_kind("Deployment") if d["metadata"]["name"] == "mlflow"]
    assert deploy["spec"]["template"]["spec"]["containers"][0]["image"].endswith(f":{mlflow.__version__}")
    assert f"mlflow=={mlflow.__version__}" in (REPO / "infra" / "Dockerfile.mlflow").read_text()


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_files_that_exist_and_pins_what_make_install_pins():
    steps = _instructions(REPO / "infra" / "Dockerfile")
    copies = [arg.split()[:-1] for op, arg in steps if op == "COPY"]
    for sources in copies:
        for src in sources:
            assert (REPO / src).exists(), f"infra/Dockerfile copies {src}, which is not in the repository"
    copied = {s.rstrip("/") for sources in copies for s in sources}
    # Everything the package build needs, and the params the components read (params_path "").
    assert {"pyproject.toml", "README.md", "faceid", "components", "pipelines", "params.yaml", "configs"} <= copied
    runs = " ".join(arg for op, arg in steps if op == "RUN")
    makefile = (REPO / "Makefile").read_text()
    for pin in re.findall(r"(torch==[\w.]+|mediapipe==[\w.]+|face_recognition==[\w.]+)", makefile):
        assert pin in runs, f"infra/Dockerfile does not install {pin} like the Makefile"
    assert "--no-deps mediapipe==" in runs
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".cache" in ignored
