"""Training: the recipe run directly (loss decreases, only mapper/LoRA change, resume is exact,
NaN stops) and one Ray-launched run (kill -> resume from checkpoint, MLflow model + alias)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from faceid.config import to_dict
from faceid.errors import TrainingError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F, H, W = 9, 32, 32


def write_clips(root: Path, n_clips: int = 3) -> Path:
    """A prepare-pose-style clips folder of synthetic clips (no face in them: every clip is prior)."""
    from faceid.io import write_parquet
    from faceid.pose.video import write_video

    clips = root / "clips"
    rows = []
    for i in range(n_clips):
        pose = np.zeros((F, H, W, 3), np.uint8)
        video = np.full((F, H, W, 3), (200, 60 + 40 * i, 40), np.uint8)
        for f in range(F):
            pose[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 255
            video[f, 8:20, 2 + 2 * f : 14 + 2 * f] = (240, 200, 180)
        d = clips / "clips" / f"c{i}"
        d.mkdir(parents=True)
        write_video(d / "video.mp4", video, 16)
        write_video(d / "pose.mp4", pose, 16)
        np.savez(d / "faces.npz", regions=np.zeros((0, 256, 256, 3), np.uint8), frames=np.zeros(0, np.int64),
                 boxes=np.zeros((0, 4), np.float32), sizes=np.zeros(0, np.float32), checksum=np.array(f"sum{i}"))
        rows.append({"clip_id": f"c{i}", "source": "synthetic", "start_frame": 0, "num_frames": F, "fps": 16.0,
                     "height": H, "width": W, "video_path": f"clips/c{i}/video.mp4", "pose_path": f"clips/c{i}/pose.mp4",
                     "keypoints_path": "", "caption": "a person dancing", "pose_detection_rate": 1.0,
                     "checksum": f"sum{i}", "status": "ok", "reason": ""})
    rows.append({**rows[0], "clip_id": "bad", "status": "rejected", "video_path": "missing.mp4"})
    write_parquet(clips / "manifest.parquet", rows)
    return clips


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, sample_identity):
    """(crops, embeddings, clips): the real sample identity's photos and embeddings, synthetic clips."""
    crops, emb = sample_identity
    return crops, emb, write_clips(tmp_path_factory.mktemp("train_inputs"))


def small_params(params, tmp: Path, **kw):
    from faceid.config import params_from_dict

    overrides = [f"train_lora.cache_dir={tmp / 'cache'}", "train_lora.stage1.steps=6", "train_lora.stage2.steps=6",
                 "train_lora.checkpoint_every=4", f"ray.storage_path={tmp / 'ray'}"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return params_from_dict(to_dict(params), overrides)


def config_for(p, inputs, out):
    crops, emb, clips = inputs
    return {"params": to_dict(p), "identity": "synth", "crops_dir": str(crops), "embeddings_dir": str(emb),
            "clips_dir": str(clips), "output_dir": str(out)}


def test_recipe_trains_saves_and_resumes_exactly(params, inputs, tmp_path):
    from faceid.model.identity import load_identity
    from faceid.train import recipe

    p = small_params(params, tmp_path, train_lora__stage1__learning_rate=0.01, train_lora__stage2__learning_rate=0.01)
    checkpoints: list[Path] = []

    def keep(metrics, ckpt):
        if ckpt is not None:
            dst = tmp_path / ("ckpt_final" if metrics.get("done") else f"ckpt_{metrics['step']}")
            import shutil
            shutil.copytree(ckpt, dst)
            checkpoints.append(dst)

    full = recipe.train(config_for(p, inputs, tmp_path / "full"), report=keep)
    # every 4 steps, at the end of each stage, and a final one with the identity folder
    assert full["steps"] == 12
    assert [c.name for c in checkpoints] == ["ckpt_4", "ckpt_6", "ckpt_8", "ckpt_12", "ckpt_final"]
    assert (tmp_path / "ckpt_final" / "identity" / "identity.json").is_file()
    assert full["stage2_loss_last"] < full["stage1_loss_first"]
    ident = load_identity(tmp_path / "full", model_cfg=p.model, embedder="dlib", embed_dim=128)
    card = ident.card
    # the last clip (train_lora.holdout_clips=1) is kept out of training for render_validation
    assert card["lora"]["targets"] == "main-cross-attn" and card["data"]["clips"] == {"c0": "sum0", "c1": "sum1"}
    assert (tmp_path / "full" / "metrics" / "train_loss.csv").read_text().count("\n") == 13
    # the card lists every photo and clip with its role: the accepted photos are identity examples,
    # the clips (no face in them) the motion prior
    roles = {(r["kind"], r["id"]): r["role"] for r in card["examples"]}
    photos = {n for (k, n), role in roles.items() if k == "photo" and role == "identity"}
    assert photos == {"obama", "obama2", "obama3", "obama_partial_face"}
    assert roles[("clip", "c0")] == roles[("clip", "c1")] == "prior"
    assert card["loss"]["identity_share"] == p.train_lora.identity_share
    assert card["reference_image"]["source"] in photos and ident.reference is not None
    assert full["identity_examples"] == 4 * p.train_lora.photos.views and full["prior_examples"] == 2
    # the latent cache was filled: one entry per clip and per photo view
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2 + 4 * p.train_lora.photos.views

    # resume from the step-4 checkpoint (a run killed after step 4) -> identical result
    resumed = recipe.train(config_for(p, inputs, tmp_path / "resumed"), checkpoint_dir=tmp_path / "ckpt_4")
    assert resumed["resumed_from"] == 4
    # every example (photo views and clips) came from the latent cache the first run filled
    assert full["latent_cache_encoded"] == 2 + 4 * p.train_lora.photos.views and full["latent_cache_read"] == 0
    assert resumed["latent_cache_read"] == full["latent_cache_encoded"] and resumed["latent_cache_encoded"] == 0
    from safetensors.torch import load_file

    for name in ("face_mapper.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "resumed" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    rows_full = (tmp_path / "full" / "metrics" / "train_loss.csv").read_text()
    assert rows_full == (tmp_path / "resumed" / "metrics" / "train_loss.csv").read_text()


def test_nan_loss_stops_with_clear_message(params, inputs, tmp_path):
    from faceid.train import recipe

    p = small_params(params, tmp_path, train_lora__stage1__learning_rate="1.0e+30", train_lora__grad_clip=0.0,
                     train_lora__stage1__steps=20)
    with pytest.raises(TrainingError, match=r"stage1, step \d+: loss is (nan|inf).*learning_rate"):
        recipe.train(config_for(p, inputs, tmp_path / "out"))


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_run_killed_resumes_and_registers_model(params, inputs, tmp_path, ray_session):
    """Ray Train launch: the worker is killed after the step-4 checkpoint, FailureConfig restarts it
    from that checkpoint, and the result equals the uninterrupted recipe run directly; MLflow gets params,
    per-step losses and a registered model version with the alias."""
    import mlflow
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from faceid.tracking import local_store_uri
    from faceid.train import launch, recipe

    crops, emb, clips = inputs
    p = small_params(params, tmp_path)
    uri = local_store_uri(tmp_path / "mlruns")
    summary = launch.run(p, "synth", crops, emb, clips, tmp_path / "identity", ray_address="", mlflow_uri=uri, fail_at_step=4)
    assert summary["resumed_from"] == 4 and summary["steps"] == 12
    assert (Path(summary["ray_run"]) / "fault_injected").is_file()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the Ray worker (OMP_NUM_THREADS=1): same float reduction order
    try:
        direct = recipe.train(config_for(p, inputs, tmp_path / "direct"))
    finally:
        torch.set_num_threads(threads)
    assert direct["steps"] == 12
    for name in ("face_mapper.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = load_file(str(tmp_path / "identity" / name)), load_file(str(tmp_path / "direct" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name

    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    mv = client.get_model_version_by_alias("faceid-synth", p.tracking.register_alias)
    assert str(mv.version) == summary["model_version"]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train_lora.stage1.steps"] == "6"
    history = client.get_metric_history(run.info.run_id, "stage2_loss")
    assert [m.step for m in history] == list(range(7, 13))
    local = mlflow.artifacts.download_artifacts(f"models:/faceid-synth@{p.tracking.register_alias}",
                                                dst_path=str(tmp_path / "dl"))
    assert (Path(local) / "artifacts" / "identity" / "identity.json").is_file()


def test_holdout_keeps_the_last_clips_and_must_leave_some_to_train(inputs):
    from faceid.errors import InputError
    from faceid.train.data import training_clips

    clips = inputs[2]
    assert [c.clip_id for c in training_clips(clips, 0)] == ["c0", "c1", "c2"]
    assert [c.clip_id for c in training_clips(clips, 1)] == ["c0", "c1"]
    with pytest.raises(InputError, match=r"3 usable clip\(s\) but train_lora.holdout_clips=3"):
        training_clips(clips, 3)


def test_reference_image_trains_in_front_of_identity_examples(params, inputs, tmp_path):
    """train_lora.reference_image: identity examples carry the best aligned crop as VACE reference
    (one extra latent frame in the control, left out of the loss); prior clips do not; the card says
    so and inference passes it (faceid.model.generate, tests/test_model.py)."""
    from safetensors.torch import load_file

    from faceid.model.identity import load_identity
    from faceid.train import recipe

    p = small_params(params, tmp_path, train_lora__reference_image="true", train_lora__stage1__steps=2,
                     train_lora__stage2__steps=2, train_lora__photos__views=1)
    summary = recipe.train(config_for(p, inputs, tmp_path / "ref"))
    assert summary["steps"] == 4 and np.isfinite(summary["stage2_loss_last"])
    ident = load_identity(tmp_path / "ref")
    assert ident.reference_in_training and ident.reference is not None
    assert ident.card["reference_image"]["source"] in {"obama", "obama2", "obama3", "obama_partial_face"}
    entries = [load_file(str(f)) for f in (tmp_path / "cache").glob("*.safetensors")]
    photos = [e for e in entries if e["target"].shape[1] == 1]
    clips = [e for e in entries if e["target"].shape[1] > 1]
    assert len(photos) == 4 and len(clips) == 2
    assert all(e["control"].shape[1] == e["target"].shape[1] + 1 for e in photos)  # the reference frame in front
    assert all(e["control"].shape[1] == e["target"].shape[1] for e in clips)  # prior clips: no reference


# --------------------------------------------------------------------------- no pickle, one writer, no orphans


def test_optimizer_state_is_read_without_pickle(tmp_path):
    """optimizer.pt holds tensors, numbers and lists only (weights_only=True reads it back exactly);
    a crafted pickle is refused before it can run anything."""
    import os
    import pickle

    from faceid.train.recipe import load_optimizer_state, make_optimizer

    class Stage:
        learning_rate, warmup_steps = 0.1, 3

    weights = [torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))]
    optimizer, sched = make_optimizer(weights, Stage, 0.01)
    for _ in range(2):
        weights[0].pow(2).sum().backward()
        optimizer.step()
        sched.step()
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": sched.state_dict()}, tmp_path / "optimizer.pt")
    state = load_optimizer_state(tmp_path / "optimizer.pt")
    again, again_sched = make_optimizer([torch.nn.Parameter(weights[0].detach().clone())], Stage, 0.01)
    again.load_state_dict(state["optimizer"])
    again_sched.load_state_dict(state["lr_scheduler"])
    assert again_sched.get_last_lr() == sched.get_last_lr()
    assert torch.equal(again.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])

    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"optimizer": Payload(), "lr_scheduler": {}}))
    torch.save({"optimizer": Payload(), "lr_scheduler": {}}, tmp_path / "zip.pt")
    for name in ("raw.pt", "zip.pt"):
        with pytest.raises(TrainingError, match="refused: not plain optimizer state.*weights_only=True"):
            load_optimizer_state(tmp_path / name)
    assert not marker.exists()


def test_a_second_writer_fails_at_once(params, inputs, tmp_path, monkeypatch):
    import faceid.ray_local
    from faceid.io import LockedError
    from faceid.train import launch
    from test_processes import held_lock

    def started(*args, **kwargs):
        raise AssertionError("Ray started although another run holds the identity folder")

    monkeypatch.setattr(faceid.ray_local, "session", started)
    crops, emb, clips = inputs
    out = tmp_path / "identity"
    with held_lock("train-lora", out) as holder:
        with pytest.raises(LockedError, match=rf"another train-lora run \(pid {holder.pid}\) is writing {out}"):
            launch.run(small_params(params, tmp_path), "synth", crops, emb, clips, out)
    assert not out.exists()


def test_killed_driver_leaves_no_ray_process_and_the_rerun_resumes(params, inputs, tmp_path, repo):
    """SIGKILL of `faceid train-lora` after its first checkpoint: 30 s later no process of its local
    Ray session is alive (faceid.ray_local's watchdog; Ray alone leaves its agents running), and
    the same command resumes from the checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from faceid.train import launch

    import ray

    # the driver's Ray must be the only one here: Ray Train's state-API calls without an address
    # (its PlacementGroupCleaner) fail with a traceback when they find two (this module's and the driver's)
    if ray.is_initialized():
        ray.shutdown()
    crops, emb, clips = inputs
    sets = {"train_lora.cache_dir": tmp_path / "cache", "train_lora.stage1.steps": 6, "train_lora.stage2.steps": 6,
            "train_lora.checkpoint_every": 2, "ray.storage_path": tmp_path / "ray"}
    cmd = [sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml")]
    for key, value in sets.items():
        cmd += ["--set", f"{key}={value}"]
    cmd += ["--set", "ray.num_cpus=2", "train-lora", "--identity", "synth", "--crops", str(crops), "--embeddings",
            str(emb), "--clips", str(clips), "--output", str(tmp_path / "identity"),
            "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp_path / "ray").glob("*/checkpoint_manager_snapshot.json")):  # a checkpoint is registered
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.5)
        session = []
        for proc in psutil.Process(driver.pid).children(recursive=True):
            try:
                session.append((proc, proc.create_time()))
            except psutil.Error:
                pass
        assert any("raylet" in " ".join(p.cmdline()) for p, _ in session)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

    def alive():
        out = []
        for proc, created in session:
            try:
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{proc.pid} {proc.name()}")
            except psutil.Error:
                pass
        return out

    deadline = time.monotonic() + 30
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(), f"processes of the killed driver's Ray session still running after 30 s: {alive()}"
    log = (tmp_path / "driver.log").read_text()
    assert "Traceback" not in log and "Failed to query Ray Train Controller" not in log  # Ray's own logs: ERROR only

    summary = launch.run(small_params(params, tmp_path, train_lora__checkpoint_every=2), "synth", crops, emb, clips,
                         tmp_path / "identity")
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= 2 and summary["steps"] == 12
    assert (tmp_path / "identity" / "identity.json").is_file()
