"""The compiled KFP pipelines: tasks, edges, parameters, images and cluster resources in the IR;
the thin component bodies; the argument handling of ``faceid pipeline``; submit's clear error."""

from __future__ import annotations

import ast
import inspect
import socket
from pathlib import Path

import pytest
import yaml

import faceid_components as components
from faceid.errors import FaceidError
from faceid_pipelines.runner import compile_pipelines, parse_arguments, submit

REPO = Path(__file__).resolve().parents[1]
COMPONENT_FILES = ["sample_data", "crop_faces", "embed_faces", "prepare_pose", "train_lora", "train_shared",
                   "render_validation", "batch_infer"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """name -> (pipeline IR, kubernetes platform spec)."""
    out = tmp_path_factory.mktemp("compiled")
    paths = compile_pipelines(out)
    assert [p.name for p in paths] == ["train.yaml", "train-shared.yaml", "infer.yaml"]
    result = {}
    for path in paths:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 2, "IR + kubernetes platform spec"
        result[path.stem] = (docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"])
    return result


def _edges(ir: dict) -> set[tuple[str, str]]:
    edges = set()
    for name, task in ir["root"]["dag"]["tasks"].items():
        for art in task.get("inputs", {}).get("artifacts", {}).values():
            edges.add((art["taskOutputArtifact"]["producerTask"], name))
    return edges


def _params(ir: dict) -> dict[str, object]:
    return {k: v.get("defaultValue", "<required>") for k, v in ir["root"]["inputDefinitions"]["parameters"].items()}


def test_train_pipeline_dag(compiled):
    ir, _ = compiled["train"]
    assert ir["pipelineInfo"]["name"] == "faceid-train"
    tasks = set(ir["root"]["dag"]["tasks"])
    assert tasks == {"importer", "importer-2", "crop-faces", "embed-faces", "prepare-pose", "train-lora", "render-validation"}
    assert _edges(ir) == {
        ("importer", "crop-faces"), ("crop-faces", "embed-faces"), ("importer-2", "prepare-pose"),
        ("crop-faces", "train-lora"), ("embed-faces", "train-lora"), ("prepare-pose", "train-lora"),
        ("train-lora", "render-validation"), ("prepare-pose", "render-validation"), ("embed-faces", "render-validation"),
    }
    # Data inputs are runtime URIs; "" / -1 mean "from params.yaml" (no defaults duplicated here).
    assert _params(ir) == {
        "identity": "<required>", "identity_photos": "<required>", "dance_videos": "<required>",
        "params_path": "", "profile": "", "stage1_steps": -1, "stage2_steps": -1, "ray_address": "", "mlflow_uri": "",
    }
    assert set(ir["root"]["outputDefinitions"]["artifacts"]) == {"identity_dir", "validation"}
    train_inputs = dict(ir["root"]["dag"]["tasks"]["train-lora"]["inputs"]["parameters"])
    # the KFP run and task that made an MLflow run (its tags, its name): KFP fills the placeholders
    for task in ("train-lora", "render-validation"):
        given = ir["root"]["dag"]["tasks"][task]["inputs"]["parameters"]
        assert {k: given[k]["runtimeValue"]["constant"] for k in ("kfp_run", "kfp_task")} == {
            "kfp_run": "{{$.pipeline_job_name}}", "kfp_task": "{{$.pipeline_task_name}}"}
    del train_inputs["kfp_run"], train_inputs["kfp_task"]
    assert {k: v["componentInputParameter"] for k, v in train_inputs.items()} == {
        k: k for k in ["identity", "params_path", "profile", "stage1_steps", "stage2_steps", "ray_address", "mlflow_uri"]}


def test_train_shared_pipeline_dag(compiled):
    """Many people -> one adapter -> render-validation of the people it held out (the adapter, no identity)."""
    ir, _ = compiled["train-shared"]
    assert ir["pipelineInfo"]["name"] == "faceid-train-shared"
    tasks = ir["root"]["dag"]["tasks"]
    assert set(tasks) == {"importer", "importer-2", "crop-faces", "embed-faces", "prepare-pose", "train-shared",
                          "render-validation"}
    assert _edges(ir) == {
        ("importer", "crop-faces"), ("crop-faces", "embed-faces"), ("importer-2", "prepare-pose"),
        ("crop-faces", "train-shared"), ("embed-faces", "train-shared"), ("prepare-pose", "train-shared"),
        ("train-shared", "render-validation"), ("prepare-pose", "render-validation"), ("embed-faces", "render-validation"),
    }
    # the adapter goes to render-validation's adapter input; no identity folder: zero-shot validation
    given = tasks["render-validation"]["inputs"]["artifacts"]
    assert given["adapter"]["taskOutputArtifact"] == {"outputArtifactKey": "adapter", "producerTask": "train-shared"}
    assert set(given) == {"adapter", "clips", "embeddings"}
    assert _params(ir) == {
        "people_photos": "<required>", "dance_videos": "<required>",
        "params_path": "", "profile": "", "stage1_steps": -1, "stage2_steps": -1, "ray_address": "", "mlflow_uri": "",
    }
    assert set(ir["root"]["outputDefinitions"]["artifacts"]) == {"adapter", "validation"}
    train_inputs = dict(tasks["train-shared"]["inputs"]["parameters"])
    for task in ("train-shared", "render-validation"):
        params = tasks[task]["inputs"]["parameters"]
        assert {k: params[k]["runtimeValue"]["constant"] for k in ("kfp_run", "kfp_task")} == {
            "kfp_run": "{{$.pipeline_job_name}}", "kfp_task": "{{$.pipeline_task_name}}"}
    del train_inputs["kfp_run"], train_inputs["kfp_task"]
    assert {k: v["componentInputParameter"] for k, v in train_inputs.items()} == {
        k: k for k in ["params_path", "profile", "stage1_steps", "stage2_steps", "ray_address", "mlflow_uri"]}
    # the train pipeline's render-validation gets the identity folder, not an adapter (both inputs optional)
    train_given = compiled["train"][0]["root"]["dag"]["tasks"]["render-validation"]["inputs"]["artifacts"]
    assert set(train_given) == {"identity_dir", "clips", "embeddings"}


def test_infer_pipeline_dag(compiled):
    ir, _ = compiled["infer"]
    assert ir["pipelineInfo"]["name"] == "faceid-infer"
    assert set(ir["root"]["dag"]["tasks"]) == {"importer", "prepare-pose", "batch-infer"}
    assert _edges(ir) == {("importer", "prepare-pose"), ("prepare-pose", "batch-infer")}
    assert _params(ir) == {"identity": "<required>", "dance_videos": "<required>", "alias": "", "params_path": "",
                           "profile": "", "face_scale": -1.0, "lora_scale": -1.0, "ray_address": "", "mlflow_uri": ""}
    batch_inputs = ir["root"]["dag"]["tasks"]["batch-infer"]["inputs"]["parameters"]
    assert batch_inputs["face_scale"]["componentInputParameter"] == "face_scale"
    assert batch_inputs["lora_scale"]["componentInputParameter"] == "lora_scale"


@pytest.mark.parametrize("name,gpu_tasks,cpu_tasks", [
    ("train", ["train-lora", "render-validation"], ["crop-faces", "embed-faces", "prepare-pose"]),
    ("train-shared", ["train-shared", "render-validation"], ["crop-faces", "embed-faces", "prepare-pose"]),
    ("infer", ["batch-infer"], ["prepare-pose"]),
])
def test_images_and_resources(compiled, name, gpu_tasks, cpu_tasks):
    ir, k8s = compiled[name]
    executors = ir["deploymentSpec"]["executors"]
    for task in gpu_tasks:
        container = executors[f"exec-{task}"]["container"]
        assert container["image"] == components.GPU_IMAGE
        acc = container["resources"]["accelerator"]
        assert acc["resourceType"] == "nvidia.com/gpu" and acc["resourceCount"] == "1"
        assert container["resources"]["resourceMemoryRequest"].endswith("Gi")
        spec = k8s[f"exec-{task}"]
        assert spec["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
        assert spec["pvcMount"][0]["constant"] == "faceid-models" and spec["pvcMount"][0]["mountPath"] == "/models"
        assert spec["secretAsEnv"][0]["secretName"] == "faceid-mlflow"
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    for task in cpu_tasks:
        container = executors[f"exec-{task}"]["container"]
        assert container["image"] == components.IMAGE
        assert "accelerator" not in container["resources"] and container["resources"]["resourceMemoryRequest"]
        assert f"exec-{task}" not in k8s
    for executor in executors.values():
        if "container" in executor:  # nothing pip-installed at run time: kfp and faceid are in the image
            assert "pip install" not in " ".join(executor["container"]["command"])


def test_images_pinned_once(repo):
    from faceid import __version__

    assert components.IMAGE.endswith(f":{__version__}") and components.GPU_IMAGE.endswith(f":{__version__}")
    # the tag lives in components/__init__.py only, not in params.yaml
    assert "ghcr.io/faceid" not in (repo / "params.yaml").read_text()


@pytest.mark.parametrize("module", COMPONENT_FILES)
def test_component_body_calls_its_stage(module):
    """Interface + image + a call of the stage of the same name: the body imports only from faceid
    and faceid_components, and calls ``stages.<component name>`` exactly once."""
    import importlib

    comp = getattr(importlib.import_module(f"faceid_components.{module}"), module)
    fn = ast.parse(inspect.getsource(comp.python_func)).body[0]
    imports = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert imports and all(isinstance(n, ast.ImportFrom) and n.module.split(".")[0] in ("faceid", "faceid_components")
                           for n in imports), ast.dump(fn)
    calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and isinstance(n.func.value, ast.Name) and n.func.value.id == "stages"]
    assert [c.func.attr for c in calls] == [module]


def test_stage_params_sentinels_mean_params_yaml(repo):
    from faceid_components import stage_params

    params_path = str(repo / "params.yaml")
    base = stage_params(params_path)
    assert stage_params(params_path, values={"train_lora.stage1.steps": -1}) == base
    tuned = stage_params(params_path, "tiny", {"train_lora.stage1.steps": 0, "train_lora.stage2.steps": 7})
    assert (tuned.train_lora.stage1.steps, tuned.train_lora.stage2.steps, tuned.model.profile) == (0, 7, "tiny")
    # a pipeline parameter wins over the profile's value (the overlay sets 1000 / 3000 steps)
    real = stage_params(params_path, "wan2.1-vace-1.3b", {"train_lora.stage1.steps": 5})
    assert (real.train_lora.stage1.steps, real.train_lora.stage2.steps) == (5, 3000)
    # scales: negative = params.yaml; 0 is a real face_scale (the base model); NaN is rejected by name
    scaled = stage_params(params_path, values={"batch_infer.face_scale": 0.0, "batch_infer.lora_scale": 0.5})
    assert (scaled.batch_infer.face_scale, scaled.batch_infer.lora_scale) == (0.0, 0.5)
    with pytest.raises(FaceidError, match="batch_infer.face_scale: expected a finite number >= 0"):
        stage_params(params_path, values={"batch_infer.face_scale": float("nan")})


def test_params_default_to_the_image_file(repo, tmp_path, monkeypatch):
    """"" = $FACEID_PARAMS (set in the image), else ./params.yaml; profiles beside that file."""
    from faceid_components import stage_params

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FaceidError, match="params.yaml: params file not found"):
        stage_params("")
    monkeypatch.setenv("FACEID_PARAMS", str(repo / "params.yaml"))
    assert stage_params("", "wan2.1-vace-1.3b").model.profile == "wan2.1-vace-1.3b"


def test_profile_is_an_overlay_file_beside_the_params(repo, tmp_path):
    from faceid.config import load_params

    real = load_params(repo / "params.yaml", profile="wan2.1-vace-1.3b")
    assert real.model.profile == "wan2.1-vace-1.3b"
    with pytest.raises(FaceidError, match="profile 'huge'.*known profiles: tiny, wan2.1-vace-1.3b"):
        load_params(repo / "params.yaml", profile="huge")
    (tmp_path / "params.yaml").write_text((repo / "params.yaml").read_text())  # no configs/ beside it
    with pytest.raises(FaceidError, match="profile 'wan2.1-vace-1.3b'.*known profiles: tiny\)$"):
        load_params(tmp_path / "params.yaml", profile="wan2.1-vace-1.3b")


def test_registry_uri(repo):
    from faceid.config import load_params
    from faceid.tracking import registry_uri

    cfg = load_params(repo / "params.yaml").tracking
    assert registry_uri(cfg, "obama", "") == "models:/faceid-obama@validated"
    assert registry_uri(cfg, "obama", "candidate") == "models:/faceid-obama@candidate"


def test_arguments_are_typed_and_checked():
    assert parse_arguments("train", ["identity=ann", "stage1_steps=3"]) == {"identity": "ann", "stage1_steps": 3}
    assert parse_arguments("infer", ["identity=ann", "face_scale=0"]) == {"identity": "ann", "face_scale": 0.0}
    assert parse_arguments("train-shared", ["people_photos=s3://b/people", "stage2_steps=4"]) == {
        "people_photos": "s3://b/people", "stage2_steps": 4}
    with pytest.raises(FaceidError, match="pipeline train-shared: unknown parameter 'identity'"):
        parse_arguments("train-shared", ["identity=ann"])  # one adapter for many people: no identity name
    with pytest.raises(FaceidError, match="unknown parameter 'steps'"):
        parse_arguments("train", ["steps=3"])
    with pytest.raises(FaceidError, match="stage2_steps='many': expected int"):
        parse_arguments("train", ["stage2_steps=many"])
    with pytest.raises(FaceidError, match="expected NAME=VALUE"):
        parse_arguments("infer", ["identity"])


def test_submit_unreachable_host_is_a_clear_error(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["identity=ann", "identity_photos=s3://b/ann", "dance_videos=s3://b/videos"]
    with pytest.raises(FaceidError, match=rf"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}"):
        submit("train", f"http://127.0.0.1:{port}", args)
    with pytest.raises(FaceidError, match="missing parameter.*identity_photos"):
        submit("train", "http://127.0.0.1:1", ["identity=ann"])


def test_cli_submit_exit_code(repo, capsys):
    from faceid.cli import main

    rc = main(["--params", str(repo / "params.yaml"), "pipeline", "submit", "infer", "--host", "http://127.0.0.1:9",
               "--arg", "identity=ann", "--arg", "dance_videos=s3://b/v"])
    assert rc == 2
    assert "faceid pipeline: error: cannot reach Kubeflow Pipelines" in capsys.readouterr().err
