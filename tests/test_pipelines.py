"""The compiled KFP pipelines: tasks, edges, parameters, images and cluster resources in the IR;
the thin component bodies; the argument handling of ``faceid pipeline``; submit's clear error."""

from __future__ import annotations

import ast
import inspect
import socket
from pathlib import Path

import pytest
import yaml

import components
from faceid.errors import FaceidError
from faceid.orchestrate import compile_pipelines, parse_arguments, registry_uri, stage_argv, submit

REPO = Path(__file__).resolve().parents[1]
COMPONENT_FILES = ["sample_data", "crop_faces", "embed_faces", "prepare_pose", "train_lora", "render_validation", "batch_infer"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """name -> (pipeline IR, kubernetes platform spec)."""
    out = tmp_path_factory.mktemp("compiled")
    paths = compile_pipelines(out)
    assert [p.name for p in paths] == ["train.yaml", "infer.yaml"]
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
    train_inputs = ir["root"]["dag"]["tasks"]["train-lora"]["inputs"]["parameters"]
    assert {k: v["componentInputParameter"] for k, v in train_inputs.items()} == {
        k: k for k in ["identity", "params_path", "profile", "stage1_steps", "stage2_steps", "ray_address", "mlflow_uri"]}


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
def test_component_body_is_one_call(module):
    """Interface + image + one call: the body is a docstring, one import from faceid, one call."""
    import importlib

    comp = getattr(importlib.import_module(f"components.{module}"), module)
    fn = ast.parse(inspect.getsource(comp.python_func)).body[0]
    body = [n for n in fn.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert len(body) == 2, ast.dump(fn)
    assert isinstance(body[0], ast.ImportFrom) and body[0].module == "faceid.orchestrate"
    assert isinstance(body[1], ast.Expr) and isinstance(body[1].value, ast.Call)
    assert body[1].value.func.id == "run_stage"


def test_stage_argv_sentinels_add_nothing():
    assert stage_argv("", ["crop-faces", "--input", "a"]) == ["crop-faces", "--input", "a"]
    assert stage_argv("p.yaml", ["train-lora"], profile="tiny", stage1_steps=0, stage2_steps=7) == [
        "--params", "p.yaml", "--set", "model.profile=tiny", "--set", "train_lora.stage1.steps=0",
        "--set", "train_lora.stage2.steps=7", "train-lora"]
    # scales: negative = params.yaml; 0 is a real face_scale (the base model); nan goes through to be rejected
    assert stage_argv("", ["batch-infer"], face_scale=-1.0, lora_scale=-1.0) == ["batch-infer"]
    assert stage_argv("", ["batch-infer"], face_scale=0.0, lora_scale=0.5) == [
        "--set", "batch_infer.face_scale=0.0", "--set", "batch_infer.lora_scale=0.5", "batch-infer"]
    assert stage_argv("", ["batch-infer"], face_scale=float("nan"))[:2] == ["--set", "batch_infer.face_scale=nan"]


def test_profile_is_an_overlay_file(repo, monkeypatch):
    monkeypatch.chdir(repo)
    assert stage_argv("", ["x"], profile="wan2.1-vace-1.3b") == ["--set", "@configs/wan2.1-vace-1.3b.yaml", "x"]
    with pytest.raises(FaceidError, match="profile 'huge'.*known profiles: tiny, wan2.1-vace-1.3b"):
        stage_argv("", ["x"], profile="huge")


def test_stage_argv_is_accepted_by_the_cli(repo):
    from faceid.cli import build_parser

    argv = stage_argv(str(repo / "params.yaml"), ["train-lora", "--identity", "a", "--crops", "p", "--embeddings", "e", "--clips", "c",
                                                  "--output", "o", "--ray-address", "", "--mlflow-uri", ""],
                      profile="tiny", stage1_steps=1)
    args = build_parser().parse_args(argv)
    assert args.overrides == ["model.profile=tiny", "train_lora.stage1.steps=1"] and args.ray_address == ""


def test_registry_uri(repo):
    params = str(repo / "params.yaml")
    assert registry_uri(params, "obama", "") == "models:/faceid-obama@validated"
    assert registry_uri(params, "obama", "candidate") == "models:/faceid-obama@candidate"


def test_arguments_are_typed_and_checked():
    assert parse_arguments("train", ["identity=ann", "stage1_steps=3"]) == {"identity": "ann", "stage1_steps": 3}
    assert parse_arguments("infer", ["identity=ann", "face_scale=0"]) == {"identity": "ann", "face_scale": 0.0}
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
