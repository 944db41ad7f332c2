"""End to end on this machine, as a user runs it (CPU, tiny profile, few steps):

(a) ``faceid pipeline run train --local``: KFP's local runner runs the whole training DAG on the
    sample identity and leaves a registered MLflow model version ``faceid-obama@candidate``;
(b) ``dvc repro render_validation`` in a fresh ``git clone`` runs every stage of the per-person branch,
    a second one is a no-op, and changing a ``render_validation`` param reruns only render_validation
    (each stage lists the params it reads; the train_lora case is the same mechanism and costs a second
    training). The shared-adapter branch (``train_shared``, ``render_validation_shared``) costs a
    second training: its run, through KFP and DVC, is in (c), extended;
(c) extended (``make test-extended``): ``faceid pipeline run train-shared --local`` trains one adapter on
    the sample people, holds grace_hopper out and validates her zero-shot; ``dvc repro
    render_validation_shared`` in a fresh clone runs the same branch as DVC stages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 1500

pytestmark = pytest.mark.slow


def _env(**extra) -> dict[str, str]:
    # MLflow's set_tracking_uri/set_registry_uri export MLFLOW_TRACKING_URI/MLFLOW_REGISTRY_URI into
    # os.environ: after in-process tests they point at another test's store
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("MLFLOW_") and k not in ("RAY_ADDRESS", "KF_PIPELINES_ENDPOINT")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-6000:]}"
    return out


def test_local_kfp_run_registers_a_model_version(tmp_path):
    from mlflow import MlflowClient

    assert ARCHIVE.is_file(), f"{ARCHIVE} missing: run `make install`"
    out = _run([sys.executable, "-m", "faceid.cli", "--params", str(REPO / "params.yaml"),
                "--set", f"sample_data.photo_archive={ARCHIVE}",
                "--set", f"train_lora.cache_dir={tmp_path / 'latents'}",
                "--set", f"ray.storage_path={tmp_path / 'ray'}",
                "--set", "sample_data.video_seconds=1.25", "--set", "train_lora.photos.views=1",  # one clip a video
                "pipeline", "run", "train", "--local", "--arg", "stage1_steps=2", "--arg", "stage2_steps=2"],
               cwd=tmp_path, env=_env())
    assert "FAILURE" not in out
    for task in ["sample-data", "crop-faces", "embed-faces", "prepare-pose", "train-lora", "render-validation"]:
        assert re.search(rf"^\[{task}\] started$", out, re.M) and re.search(rf"^\[{task}\] done in \d+ s$", out, re.M), task
    # quiet by default: no KFP executor detail, no known-harmless warnings (all in the run's log file)
    for noise in ["[KFP Executor", "Got executor_input", '"outputFile"', "Executing task", "Streamed logs",
                  "have no effect in the current local runner", "non-Python base image",
                  "Add type hints to the `predict` method", "Feedback manager requires",
                  "XNNPACK delegate", "absl::InitializeLog", "State API unavailable", "PreemptionWatcher",
                  "Reporting training result", "Successfully registered", "Created version", "Registered model",
                  "Downloading artifacts"]:
        assert noise not in out, noise
    # ... and it ends with where the outputs are and the MLflow command (stdout's last lines)
    lines = out.splitlines()
    done = [i for i, line in enumerate(lines) if line.startswith("pipeline train: done in ")]
    assert len(done) == 1 and "artifacts under" in lines[done[0]], done
    tail = lines[done[0]:done[0] + 5]
    assert [line.split(":")[0].strip() for line in tail[1:]] in (["identity_dir", "validation", "log", "MLflow"],
                                                                ["validation", "identity_dir", "log", "MLflow"]), tail
    assert "mlflow ui --backend-store-uri sqlite:///" in tail[-1], tail
    log = Path(tail[3].split()[1])
    assert log.is_file() and "Got executor_input" in log.read_text()  # the detail is in the log file

    runs = list((tmp_path / ".kfp").glob("faceid-train-*"))
    assert len(runs) == 1
    identity_dir = runs[0] / "train-lora" / "identity_dir"
    assert (identity_dir / "pytorch_lora_weights.safetensors").is_file()
    assert (identity_dir / "metrics" / "train_loss.csv").is_file()
    assert (runs[0] / "render-validation" / "validation" / "metrics.json").is_file()

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("faceid-obama", "candidate")
    assert int(version.version) >= 1
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params.get("train_lora.stage2.steps") == "2"  # the pipeline parameter reached the stage
    # the MLflow runs name the KFP run that made them (KFP's placeholders, filled by the local runner too)
    assert run.info.run_name == f"train-lora obama {runs[0].name}" and run.data.tags["kfp.run"] == runs[0].name
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mlflow.source.name"] == "kfp train_lora"
    validation = client.get_run(version.tags["validation_run_id"])
    assert validation.data.tags["kfp.run"] == runs[0].name and validation.data.tags["kfp.task"] == "render-validation"


def _ran_stages(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", out))


def test_dvc_repro_in_a_fresh_clone(tmp_path):
    assert ARCHIVE.is_file(), f"{ARCHIVE} missing: run `make install`"
    clone = tmp_path / "faceid"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    (clone / ARCHIVE.relative_to(REPO)).parent.mkdir(parents=True)
    shutil.copy(ARCHIVE, clone / ARCHIVE.relative_to(REPO))
    params_file = clone / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train_lora"]["stage1"]["steps"] = 2
    params["train_lora"]["stage2"]["steps"] = 2
    params["train_lora"]["photos"]["views"] = 1
    params["sample_data"]["video_seconds"] = 1.25  # 20 frames: one 17-frame clip a video
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(PYTHONPATH=str(clone))  # the clone's code, not this checkout's
    dvc = [str(VENV_BIN / "dvc")]

    first = _run(dvc + ["repro", "render_validation"], clone, env)  # the per-person branch (the shared one: below)
    assert _ran_stages(first) == {"sample_data", "crop_faces", "embed_faces", "prepare_pose", "train_lora", "render_validation"}
    assert (clone / "data/work/obama/validation/metrics.json").is_file()
    assert (clone / "data/work/obama/identity/metrics/train_loss.csv").is_file()
    assert "validation/metrics.json" in _run(dvc + ["metrics", "show"], clone, env)
    # the MLflow runs name the DVC stage that made them ($DVC_STAGE, which dvc repro sets) and the command
    from mlflow import MlflowClient

    store = f"sqlite:///{clone / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("faceid").experiment_id])
    assert {(r.data.tags.get("dvc.stage"), r.data.tags["mlflow.source.name"]) for r in runs} == {
        ("train_lora", "faceid train-lora"), ("render_validation", "faceid render-validation")}

    second = _run(dvc + ["repro", "render_validation"], clone, env)
    assert _ran_stages(second) == set() and "up to date" in second

    # a param only the last stage reads (its render settings are training's too: train_lora's renders use them)
    params["render_validation"]["gate"]["tolerance"] = 0.03
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    third = _run(dvc + ["repro", "render_validation"], clone, env)
    assert _ran_stages(third) == {"render_validation"}

    # The default remote is a local folder beside the repository.
    _run(dvc + ["push"], clone, env)
    assert any((tmp_path / "faceid-dvc-storage").rglob("*"))


# --------------------------------------------------------------------------- the shared adapter (issue 25), extended


@pytest.mark.extended
def test_local_kfp_train_shared_validates_a_held_out_person_zero_shot(tmp_path):
    """``faceid pipeline run train-shared --local`` on the sample people: crop/embed them as a folder of
    people, train one adapter (grace_hopper, shown in the fewest clips, held out), register faceid-shared
    and render grace_hopper zero-shot (her embed-faces output through the adapter) beside the base, with
    retrieval among all four people; then ``faceid infer --adapter`` renders her from the same folder."""
    from mlflow import MlflowClient

    assert ARCHIVE.is_file(), f"{ARCHIVE} missing: run `make install`"
    sets = ["--set", f"sample_data.photo_archive={ARCHIVE}", "--set", f"train_lora.cache_dir={tmp_path / 'latents'}",
            "--set", f"ray.storage_path={tmp_path / 'ray'}", "--set", "sample_data.video_seconds=1.25",
            "--set", "train_lora.photos.views=1"]
    out = _run([sys.executable, "-m", "faceid.cli", "--params", str(REPO / "params.yaml"), *sets,
                "pipeline", "run", "train-shared", "--local", "--arg", "stage1_steps=2", "--arg", "stage2_steps=2"],
               cwd=tmp_path, env=_env())
    assert "FAILURE" not in out
    for task in ["sample-data", "crop-faces", "embed-faces", "prepare-pose", "train-shared", "render-validation"]:
        assert re.search(rf"^\[{task}\] done in \d+ s$", out, re.M), task
    assert "pipeline train-shared: inputs from the sample data: people_photos=" in out
    runs = list((tmp_path / ".kfp").glob("faceid-train-shared-*"))
    assert len(runs) == 1
    adapter = runs[0] / "train-shared" / "adapter"
    card = yaml.safe_load((adapter / "identity.json").read_text())
    assert card["kind"] == "shared" and card["people"] == {"trained": ["astronaut", "biden", "obama"],
                                                           "held_out": ["grace_hopper"]}
    metrics = yaml.safe_load((runs[0] / "render-validation" / "validation" / "metrics.json").read_text())
    assert list(metrics["people"]) == ["grace_hopper"] and metrics["gate"]["arm"] == "zero_shot"
    assert metrics["retrieval_people"] == ["astronaut", "biden", "grace_hopper", "obama"]
    assert metrics["reference_only"]["skipped"] and metrics["identity"]["skipped"]
    assert all(set(v) == {"base", "zero_shot"} for v in metrics["videos"].values())

    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    version = client.get_model_version_by_alias("faceid-shared", "candidate")
    assert client.get_run(version.run_id).data.tags["kfp.run"] == runs[0].name
    validation = client.get_run(version.tags["validation_run_id"])
    assert (validation.data.tags["adapter"], validation.data.tags["people"]) == ("shared", "grace_hopper")
    assert validation.data.tags["kfp.task"] == "render-validation"

    # the person held out, rendered from her embed-faces output with no training of hers
    emb = runs[0] / "embed-faces" / "embeddings" / "grace_hopper"
    pose = next((runs[0] / "prepare-pose" / "clips" / "clips").glob("*/pose.mp4"))
    _run([sys.executable, "-m", "faceid.cli", "--params", str(REPO / "params.yaml"), *sets, "infer", "--adapter",
          str(adapter), "--identity", str(emb), "--pose-video", str(pose), "--output", str(tmp_path / "gh.mp4")],
         cwd=tmp_path, env=_env())
    assert (tmp_path / "gh.mp4").stat().st_size > 0


@pytest.mark.extended
def test_dvc_repro_of_the_shared_branch_in_a_fresh_clone(tmp_path):
    """``dvc repro render_validation_shared``: the sample people cropped and embedded, one adapter trained
    on them and the held-out person validated zero-shot, each stage the same ``faceid`` command."""
    assert ARCHIVE.is_file(), f"{ARCHIVE} missing: run `make install`"
    clone = tmp_path / "faceid"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True, timeout=120)
    (clone / ARCHIVE.relative_to(REPO)).parent.mkdir(parents=True)
    shutil.copy(ARCHIVE, clone / ARCHIVE.relative_to(REPO))
    params_file = clone / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train_lora"]["stage1"]["steps"] = 2
    params["train_lora"]["stage2"]["steps"] = 2
    params["train_lora"]["photos"]["views"] = 1
    params["sample_data"]["video_seconds"] = 1.25
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    env = _env(PYTHONPATH=str(clone))
    out = _run([str(VENV_BIN / "dvc"), "repro", "render_validation_shared"], clone, env)
    assert _ran_stages(out) == {"sample_data", "crop_faces_people", "embed_faces_people", "prepare_pose", "train_shared",
                                "render_validation_shared"}
    metrics = yaml.safe_load((clone / "data/work/shared_validation/metrics.json").read_text())
    assert list(metrics["people"]) == ["grace_hopper"] and metrics["gate"]["arm"] == "zero_shot"
