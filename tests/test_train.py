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

    p = small_params(params, tmp_path, train_lora__stage1__learning_rate=0.01, train_lora__stage2__learning_rate=0.01,
                     train_lora__validation__validate_every=2)  # a best step before the resume point
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
    assert (tmp_path / "ckpt_4" / recipe.CKPT_BEST).is_file()  # the best step so far travels with the checkpoint
    ident = load_identity(tmp_path / "full", model_cfg=p.model, embedder="dlib", embed_dim=128)
    card = ident.card
    # the last clip (train_lora.holdout_clips=1) is kept out of training for render_validation
    assert card["lora"]["targets"] == "main-cross-attn" and card["data"]["clips"] == {"c0": "sum0", "c1": "sum1"}
    assert (tmp_path / "full" / "metrics" / "train_loss.csv").read_text().count("\n") == 13
    # the card lists every photo and clip with its role: the accepted photos are identity examples but
    # one held out for validation (never trained on), the clips (no face in them) the motion prior,
    # the held-out clip validates the prior
    roles = {(r["kind"], r["id"]): r["role"] for r in card["examples"]}
    photos = {n for (k, n), role in roles.items() if k == "photo" and role == "identity"}
    assert photos == {"obama", "obama2", "obama3"}
    assert roles[("photo", "obama_partial_face")] == roles[("clip", "c2")] == "held_out"
    assert next(r for r in card["examples"] if r["id"] == "c2")["validates"] == "prior"
    assert roles[("clip", "c0")] == roles[("clip", "c1")] == "prior"
    assert card["loss"]["identity_share"] == p.train_lora.identity_share
    assert card["reference_image"]["source"] in photos and ident.reference is not None
    assert full["identity_examples"] == 3 * p.train_lora.photos.views and full["prior_examples"] == 2
    # the latent cache was filled: one entry per clip and per photo view (held-out ones included)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3 + 4 * p.train_lora.photos.views
    # validation at step 0, every 2 steps and the last; the folder holds the kept step and says why
    val = (tmp_path / "full" / "metrics" / "validation.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in val[1:]] == [0, 2, 4, 6, 8, 10, 12]
    assert card["kept"]["last_step"] == 12 and card["kept"]["criterion"] == "identity_loss"

    from faceid.train.launch import check_trained

    check_trained(tmp_path / "full", p.train_lora.seed, "synth")  # trained: may be registered

    # resume from the step-4 checkpoint (a run killed after step 4) -> identical result
    resumed = recipe.train(config_for(p, inputs, tmp_path / "resumed"), checkpoint_dir=tmp_path / "ckpt_4")
    assert resumed["resumed_from"] == 4
    # every example (photo views and clips) came from the latent cache the first run filled
    assert full["latent_cache_encoded"] == 3 + 4 * p.train_lora.photos.views and full["latent_cache_read"] == 0
    assert resumed["latent_cache_read"] == full["latent_cache_encoded"] and resumed["latent_cache_encoded"] == 0
    from safetensors.torch import load_file

    # the same kept step (the best so far came back from the checkpoint), weights and tables
    assert load_identity(tmp_path / "resumed").card["kept"] == card["kept"]
    folders = [""] + (["last"] if card["kept"]["last_folder"] else [])
    for sub in folders:
        for name in ("face_mapper.safetensors", "pytorch_lora_weights.safetensors"):
            a, b = load_file(str(tmp_path / "full" / sub / name)), load_file(str(tmp_path / "resumed" / sub / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (sub, name)
    for table in ("train_loss.csv", "validation.csv"):
        assert (tmp_path / "full" / "metrics" / table).read_text() == (tmp_path / "resumed" / "metrics" / table).read_text()


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


def test_ray_run_killed_resumes_and_registers_model(params, inputs, tmp_path, ray_session, shared_cache):
    """Ray Train launch: the worker is killed after the step-4 checkpoint, FailureConfig restarts it
    from that checkpoint, and the result equals the uninterrupted recipe run directly (the same best
    step kept); MLflow gets params, per-step losses, the validation time series and the renders of
    each render step (logged by rank 0 while it trained, once per step across the restart) and a
    registered model version with the alias."""
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from faceid.tracking import local_store_uri
    from faceid.train import launch, recipe

    crops, emb, clips = inputs
    p = small_params(params, tmp_path, train_lora__cache_dir=shared_cache, train_lora__validation__validate_every=4,
                     train_lora__validation__render_every=8)
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
    kept = json.loads((tmp_path / "identity" / "identity.json").read_text())["kept"]
    assert kept == json.loads((tmp_path / "direct" / "identity.json").read_text())["kept"]
    for sub in [""] + (["last"] if kept["last_folder"] else []):
        for name in ("face_mapper.safetensors", "pytorch_lora_weights.safetensors"):
            a, b = load_file(str(tmp_path / "identity" / sub / name)), load_file(str(tmp_path / "direct" / sub / name))
            assert all(torch.equal(a[k], b[k]) for k in a), (sub, name)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias("faceid-synth", p.tracking.register_alias)
    assert str(mv.version) == summary["model_version"]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["train_lora.stage1.steps"] == "6"
    # the plan (faceid.train.plan): passes per photo in summary.json (single values: no one-point metrics);
    # face sizes and the schedule in examples.json
    assert summary["passes_per_photo"] > 0
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))).read_text())
    assert logged["passes_per_photo"] == pytest.approx(summary["passes_per_photo"]) and logged["steps"] == 12
    assert not {"passes_per_photo", "seconds", "steps"} & set(run.data.metrics)
    examples = json.loads(Path(client.download_artifacts(run.info.run_id, "examples.json", str(tmp_path))).read_text())
    assert examples["plan"]["schedule"]["stage1_steps"] == 6 and examples["plan"]["face_sizes"]["clips"]["n"] == 0
    assert any("no clip face measured" in w for w in examples["plan"]["warnings"])  # synthetic clips: no keypoints
    history = client.get_metric_history(run.info.run_id, "loss/train_stage2")
    assert [m.step for m in history] == list(range(7, 13))
    # validation: the time series beside the training loss, one value per step (step 8 ran twice: before the
    # kill and after the resume from step 4)
    rows = launch.read_validation_table(tmp_path / "identity")
    for key in ("identity_loss", "prior_loss"):
        series = client.get_metric_history(run.info.run_id, f"loss/val_{key.removesuffix('_loss')}")
        assert sorted(m.step for m in series) == [0, 4, 8, 12]
        csv = {r["step"]: r[key] for r in rows}  # 6 significant digits
        assert {m.step: m.value for m in series} == pytest.approx(csv, rel=1e-5)
    # renders of the held-out clip (identity, face_scale 0) + contact sheet per render step (and the last)
    for step in (8, 12):
        files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, f"validation/step_{step:06d}")}
        assert files == {"c2.mp4", "c2_base.mp4", "c2_side_by_side.mp4", "c2.png"}, step
    assert run.data.tags["kept_step"] == str(kept["step"]) and run.info.status == "FINISHED"
    # issue 24: the model's metrics (MLflow shows them on the version) are the kept step's, not step 0's; the
    # version leads to its run; the run has a name that tells it apart, a Source and a Created by
    [output] = run.outputs.model_outputs
    assert mv.source == f"models:/{output.model_id}" and output.step == kept["step"] > 0
    model = client.get_logged_model(output.model_id)
    assert {m.step for m in model.metrics} == {kept["step"]}
    at_kept = {m.key: m.value for m in model.metrics}
    assert at_kept["loss/val_identity"] == pytest.approx({r["step"]: r["identity_loss"] for r in rows}[kept["step"]], rel=1e-5)
    assert mv.tags["training_run_id"] == run.info.run_id and mv.tags["kept_step"] == str(kept["step"])
    assert run.info.run_id in mv.description and f"Kept step {kept['step']} of 12" in mv.description
    assert run.info.run_name == f"train-lora synth {Path(summary['ray_run']).name.rsplit('-', 1)[1][:7]}"
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
    assert run.data.tags["mlflow.source.name"]
    from faceid.tracking import download_identity

    local = download_identity(f"models:/faceid-synth@{p.tracking.register_alias}", uri, tmp_path / "dl")
    assert (local / "identity.json").is_file() and local.name == "identity"
    assert not (local / "last").exists()  # the registered model is the kept step


def test_a_run_that_cannot_train_is_refused_at_load(repo, inputs, tmp_path, capsys):
    """Nothing untrained is registered (issue 21): no steps, or a learning rate of 0 for a stage with
    steps, stop the CLI at config load (exit 2, the key named): no identity folder, no MLflow store."""
    from faceid.cli import main

    crops, emb, clips = inputs
    args = ["train-lora", "--identity", "synth", "--crops", str(crops), "--embeddings", str(emb), "--clips", str(clips),
            "--output", str(tmp_path / "identity"), "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    for sets, key in ((["train_lora.stage1.steps=0", "train_lora.stage2.steps=0"], "train_lora.stage1.steps, "
                       "train_lora.stage2.steps: expected at least one training step in all, got 0 and 0"),
                      (["train_lora.stage2.learning_rate=0"], "train_lora.stage2.learning_rate: expected a number > 0 "
                                                              "for a stage with steps")):
        argv = ["--params", str(repo / "params.yaml")] + [a for s in sets for a in ("--set", s)] + args
        assert main(argv) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "identity").exists() and not (tmp_path / "mlflow.db").exists()


def test_crops_and_embeddings_of_different_photos_are_refused(repo, inputs, tmp_path, capsys):
    """Issue 21 item 4: embed-faces records the sha256 of each crop it embedded; train-lora refuses
    crops whose files differ (the same names, other photos), naming the photo and both folders, and
    an embed-faces output without hashes (older) with "rerun embed-faces"; before any training."""
    import shutil

    from faceid.cli import main
    from faceid.io import read_parquet, write_parquet

    crops, emb, clips = inputs
    rows = {r["name"]: r for r in read_parquet(emb / "embeddings.parquet")}
    assert all(len(r["crop_sha256"]) == 64 for r in rows.values())
    other = shutil.copytree(crops, tmp_path / "other_crops")  # the same names; one photo's crop is another's
    a, b = sorted(n for n, r in rows.items() if not r["outlier"])[:2]
    shutil.copy(crops / rows[b]["crop_path"], other / rows[a]["crop_path"])
    old = shutil.copytree(emb, tmp_path / "old_embeddings")
    write_parquet(old / "embeddings.parquet", [{k: v for k, v in r.items() if k != "crop_sha256"} for r in rows.values()])
    photo = next(r["path"] for r in read_parquet(crops / "manifest.parquet") if r["name"] == a)
    for crops_dir, emb_dir, message in [
        (other, emb, f"photo {photo}: the crops in {other} and the embeddings in {emb} are of different photos "
                     f"({rows[a]['crop_path']}: sha256 "),
        (crops, old, f"{old / 'embeddings.parquet'}: no crop_sha256 column (written by an older embed-faces)"),
    ]:
        rc = main(["--params", str(repo / "params.yaml"), "train-lora", "--identity", "synth", "--crops", str(crops_dir),
                   "--embeddings", str(emb_dir), "--clips", str(clips), "--output", str(tmp_path / "identity")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "rerun embed-faces" in err, err
    assert not (tmp_path / "identity").exists()


def test_untrained_weights_are_never_written_or_registered(params, tmp_path):
    """The outcome check before the identity folder is written and registered: weights equal to where
    training starts (the seeded mapper, LoRA B at zero), or no step with a learning rate > 0, are a
    TrainingError; one trained LoRA tensor is enough to pass."""
    from safetensors.torch import load_file, save_file

    from faceid.model.base_model import build_components
    from faceid.model.identity import save_identity
    from faceid.model.lora import LORA_FILE, add_lora
    from faceid.model.mapper import initial_mapper
    from faceid.train.launch import check_trained

    tcfg = params.train_lora
    transformer = build_components(params.model)["transformer"]
    mapper = initial_mapper(128, params.model.tiny.text_dim, tcfg.num_face_tokens, tcfg.mapper_hidden_dim, tcfg.seed)
    add_lora(transformer, tcfg.lora)
    rows = [{"step": 1, "stage": "stage1", "loss": 1.0, "lr": 1e-3}]
    untrained = save_identity(tmp_path / "untrained", name="synth", card={"base_model": "tiny", "embedder": "dlib"},
                              mapper=mapper, embedding=torch.ones(128), transformer=transformer, loss_rows=rows)
    with pytest.raises(TrainingError, match=r"train-lora synth: after 1 step\(s\) the weights equal their initial state "
                                            r"\(face mapper as initialised, LoRA B at zero\): nothing was learned"):
        check_trained(untrained, tcfg.seed, "synth")
    lora = load_file(str(untrained / LORA_FILE))
    key = next(k for k in sorted(lora) if "lora_B" in k)
    lora[key][0, 0] = 1e-3
    save_file(lora, str(untrained / LORA_FILE))
    check_trained(untrained, tcfg.seed, "synth")  # a LoRA that moved: trained
    (untrained / "metrics" / "train_loss.csv").write_text("step,stage,loss,lr\n1,stage1,1.0,0\n")
    with pytest.raises(TrainingError, match="no optimizer step with a learning rate > 0 ran"):
        check_trained(untrained, tcfg.seed, "synth")


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
    assert len(photos) == 4 and len(clips) == 3  # the held-out clip and photo are cached too (validation)
    assert all(e["control"].shape[1] == e["target"].shape[1] + 1 for e in photos)  # the reference frame in front
    assert all(e["control"].shape[1] == e["target"].shape[1] for e in clips)  # prior clips: no reference


# --------------------------------------------------------------------------- validation during training


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One latent cache for the tests below that do not count its entries (each entry is encoded once)."""
    return tmp_path_factory.mktemp("shared_cache")


@pytest.fixture
def one_thread():
    """As in a Ray worker (OMP_NUM_THREADS=1): the tiny model's ops are too short for two threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_best_step_is_kept_and_early_stop_fires_after_patience(params, inputs, tmp_path, shared_cache, one_thread):
    """A run that gets worse: stage 1 learns (held-out identity loss falls), then stage 2's learning rate
    is far too high. The identity folder holds the best step by held-out identity loss (in stage 1),
    ``last/`` the last one, the card says which and why; patience 2 stops stage 2 after two
    validations without improvement."""
    from safetensors.torch import load_file

    from faceid.model.identity import load_identity
    from faceid.train import launch, recipe

    p = small_params(params, tmp_path, train_lora__stage1__learning_rate=0.01, train_lora__stage2__learning_rate=20.0,
                     train_lora__checkpoint_every=2, train_lora__validation__validate_every=2,
                     train_lora__validation__patience=2, train_lora__photos__views=1, train_lora__cache_dir=shared_cache)
    weights: dict[int, dict] = {}  # step -> trainable tensors of its checkpoint

    def keep(metrics, ckpt):
        if ckpt is not None and not metrics.get("done"):
            weights[metrics["step"]] = load_file(str(ckpt / recipe.CKPT_WEIGHTS))

    out = tmp_path / "identity"
    summary = recipe.train(config_for(p, inputs, out), report=keep)
    rows = launch.read_validation_table(out)
    losses = {r["step"]: r["identity_loss"] for r in rows}
    best = min((s for s in losses if s > 0), key=losses.get)
    # the constructed run: better in stage 1, worse once stage 2's learning rate hits
    # (from step 4: the first steps open the face-token gate, closed at step 0: faceid.model.mapper)
    assert losses[6] < losses[4] < losses[0] and best <= 6 and losses[10] > losses[best]
    # early stop: two validations without improvement (steps 8 and 10) end stage 2 at step 10
    stop = summary["early_stop"]["stage2"]
    assert stop["step"] == 10 and "no improvement for 2 validation(s)" in stop["reason"] and "patience=2" in stop["reason"]
    assert summary["steps_trained"] == 10 and sorted(losses) == [0, 2, 4, 6, 8, 10]
    assert (out / "metrics" / "train_loss.csv").read_text().count("\n") == 11
    running, improved = float("inf"), []  # validation.csv flags each new best (step 0 is a baseline only)
    for step in sorted(s for s in losses if s > 0):
        if losses[step] < running:
            running, improved = losses[step], improved + [step]
    assert [r["step"] for r in rows if r["best"]] == improved and improved[-1] == best
    # the folder holds the best step, last/ the last; each card says which step it is and why
    ident, last = load_identity(out), load_identity(out / "last")
    assert ident.card["kept"]["step"] == summary["kept_step"] == best and ident.card["kept"]["last_step"] == 10
    assert ident.card["kept"]["criterion"] == "identity_loss"
    assert ident.card["kept"]["value"] == pytest.approx(losses[best], rel=1e-5)
    assert f"step {best}" in ident.card["kept"]["why"] and ident.card["validation"]["early_stop"]["stage2"] == stop
    assert last.card["kept"]["step"] == 10 and not (out / "last" / "last").exists()
    # the checkpoint reported at the early stop says step 12: the stage is over (a resume skips it)
    assert sorted(weights) == [2, 4, 6, 8, 12]
    for folder, step in ((out, best), (out / "last", 12)):
        mapper = load_file(str(folder / "face_mapper.safetensors"))
        assert all(torch.equal(v, weights[step][f"mapper.{k}"]) for k, v in mapper.items()), (folder, step)
    assert summary["validation_seconds"] > 0 and 0 < summary["validation_share"] < 1


def test_holdout_plan_keeps_three_photos_to_train_on_or_holds_out_a_view():
    from dataclasses import dataclass

    from faceid.errors import InputError
    from faceid.train.validation import plan_holdout

    @dataclass
    class Cfg:
        validate_every: int = 10
        render_every: int = 0
        holdout_photos: int = 1

    names = ["a", "b", "c", "d"]
    assert plan_holdout(names, "d", Cfg(), views=2).photos == ("c",)  # the last by name, never the reference
    assert plan_holdout(names + ["e"], "a", Cfg(holdout_photos=2), views=2).photos == ("d", "e")
    four = plan_holdout(names, "a", Cfg(), views=2)  # 4 photos: one held out, 3 (the product's minimum) trained on
    assert four.photos == ("d",) and four.view is None
    # 3 photos (issue 20: a 3-photo identity trains on all 3): the last augmented view of each photo instead
    three = plan_holdout(names[:3], "a", Cfg(), views=4)
    assert three.photos == () and three.view == 3 and "at least 3 must stay in training" in three.note
    assert plan_holdout(names, "a", Cfg(holdout_photos=0), views=2).view == 1
    with pytest.raises(InputError, match=r"photos.views=1 has no augmented view.*turn validation off"):
        plan_holdout(names[:3], "a", Cfg(), views=1)
    assert plan_holdout(names, "a", Cfg(validate_every=0), views=1).photos == ()  # validation off: nothing held out


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
    import faceid.ray_session
    from faceid.io import LockedError
    from faceid.train import launch
    from test_processes import held_lock

    def started(*args, **kwargs):
        raise AssertionError("Ray started although another run holds the identity folder")

    monkeypatch.setattr(faceid.ray_session, "session", started)
    crops, emb, clips = inputs
    out = tmp_path / "identity"
    with held_lock("train-lora", out) as holder:
        with pytest.raises(LockedError, match=rf"another train-lora run \(pid {holder.pid}\) is writing {out}"):
            launch.run(small_params(params, tmp_path), "synth", crops, emb, clips, out)
    assert not out.exists()


@pytest.mark.extended
def test_killed_driver_leaves_no_ray_process_and_the_rerun_resumes(params, inputs, tmp_path, repo):
    """SIGKILL of `faceid train-lora` after its first checkpoint: 30 s later no process of its local
    Ray session is alive (faceid.ray_session's watchdog; Ray alone leaves its agents running), and
    the same command resumes from the checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from process_tree import alive, descendants

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
        session = descendants(driver.pid)
        assert any("raylet" in " ".join(p.cmdline()) for p, _ in session)
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)

    deadline = time.monotonic() + 30
    while alive(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(session), f"processes of the killed driver's Ray session still running after 30 s: {alive(session)}"
    log = (tmp_path / "driver.log").read_text()
    assert "Traceback" not in log and "Failed to query Ray Train Controller" not in log  # Ray's own logs: ERROR only

    summary = launch.run(small_params(params, tmp_path, train_lora__checkpoint_every=2), "synth", crops, emb, clips,
                         tmp_path / "identity")
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= 2 and summary["steps"] == 12
    assert (tmp_path / "identity" / "identity.json").is_file()


def test_validation_renders_as_inference_does(params, inputs, tmp_path, one_thread):
    """Training's renders (faceid.train.validation.Renderer) are what `faceid infer` renders for the
    identity saved at that step: render_validation's steps, guidance and seed, and the reference image
    as VACE reference_images when the identity is trained with it (issue 20); without it they differ."""
    from faceid.model.base_model import base_model_id
    from faceid.model.generate import build_pipeline, generate_video
    from faceid.model.identity import load_identity, save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper
    from faceid.pose.video import read_video
    from faceid.train.data import load_clips, load_embedding
    from faceid.train.step import FaceConditionedDiT
    from faceid.train.validation import Renderer

    p = small_params(params, tmp_path, render_validation__num_inference_steps=2, render_validation__guidance_scale=2.5,
                     render_validation__seed=5)
    cpu = torch.device("cpu")
    pipe = build_pipeline(p.model, cpu)
    pipe.set_progress_bar_config(disable=True)
    crops, emb_dir, clips_dir = inputs
    embedding, _ = load_embedding(emb_dir)
    clip = load_clips(clips_dir)[0]
    add_lora(pipe.transformer, p.train_lora.lora)
    gen = torch.Generator().manual_seed(0)
    mapper = FaceMapper(embedding.size, p.model.tiny.text_dim, p.train_lora.num_face_tokens)
    with torch.no_grad():
        for name, prm in pipe.transformer.named_parameters():
            if "lora_B" in name:
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.2)
        mapper.gate_param.fill_(1.0 / mapper.gate_multiplier)
    model = FaceConditionedDiT(pipe.transformer, mapper).eval()
    from PIL import Image

    reference = np.asarray(Image.open(sorted(Path(crops).glob("crops/*/*.png"))[0]).convert("RGB"))
    card = {"base_model": base_model_id(p.model), "embedder": "dlib",
            "reference_image": {"file": "reference.png", "source": "x", "in_training": True}}
    folder = save_identity(tmp_path / "ident", name="ident", card=card, mapper=mapper, embedding=embedding,
                           transformer=pipe.transformer, reference=reference)
    renders = {}
    for with_reference in (True, False):
        renderer = Renderer(pipe, [clip], embedding, p, cpu, reference if with_reference else None)
        try:
            with torch.no_grad():
                renders[with_reference] = renderer._generate(model, renderer.clips[0], identity=True)
        finally:
            renderer.close()
    fresh = build_pipeline(p.model, cpu)
    fresh.set_progress_bar_config(disable=True)
    pose = read_video(clip.pose_path)[0][: clip.num_frames]
    rv = p.render_validation
    inferred = generate_video(fresh, load_identity(folder), pose, clip.caption, face_scale=rv.face_scale, lora_scale=1.0,
                              guidance_scale=rv.guidance_scale, num_inference_steps=rv.num_inference_steps, seed=rv.seed)
    assert np.abs(renders[True].astype(int) - inferred).max() <= 1
    assert np.abs(renders[False].astype(int) - inferred).mean() > 1.0  # the reference image matters
    # render_validation.face_scale scales the face tokens and the LoRA as generate_video does (then the LoRA is back at 1)
    half = small_params(params, tmp_path, render_validation__num_inference_steps=2, render_validation__guidance_scale=2.5,
                        render_validation__seed=5, render_validation__face_scale=0.5)
    renderers = [Renderer(pipe, [clip], embedding, cfg, cpu, reference) for cfg in (half, p)]
    try:
        with torch.no_grad():
            rendered, after = (r._generate(model, r.clips[0], identity=True) for r in renderers)
    finally:
        for r in renderers:
            r.close()
    inferred = generate_video(fresh, load_identity(folder), pose, clip.caption, face_scale=0.5, lora_scale=1.0,
                              guidance_scale=rv.guidance_scale, num_inference_steps=rv.num_inference_steps, seed=rv.seed)
    assert np.abs(rendered.astype(int) - inferred).max() <= 1 and np.array_equal(after, renders[True])
    # a render step's folder: the renders as they are, the side-by-side preview (pose | base | identity, labelled,
    # enlarged by nearest neighbour) and its contact sheet beside it (issue 24)
    from previews import check_preview

    renderer = Renderer(pipe, [clip], embedding, p, cpu, reference)
    try:
        with torch.no_grad():
            renderer.render(model, tmp_path / "step")
    finally:
        renderer.close()
    assert read_video(tmp_path / "step" / f"{clip.clip_id}.mp4")[0].shape == renders[True].shape  # the render at its size
    step = {"pose": pose, "base": renderer.base[clip.clip_id][0], "identity": renders[True]}
    assert check_preview(tmp_path / "step" / f"{clip.clip_id}_side_by_side.mp4", tmp_path / "step" / f"{clip.clip_id}.png",
                         step) == 8  # 32 px renders: x8


def test_the_best_render_step_counts_only_renders_with_a_face(params, one_thread):
    """FaceSim of a validation point is the mean over the held-out renders that show a face; a render
    step where no render shows one cannot be the best by FaceSim, however low its loss (issue 20)."""
    import dataclasses

    from faceid.model.base_model import build_components
    from faceid.model.mapper import FaceMapper
    from faceid.train.step import FaceConditionedDiT, training_scheduler
    from faceid.train.validation import Validation, mean_measured

    assert mean_measured([0.9, None, 0.8]) == pytest.approx(0.85) and mean_measured([None, None]) is None
    cfg = dataclasses.replace(params.train_lora.validation, render_every=2, criterion="facesim")
    model = FaceConditionedDiT(build_components(params.model)["transformer"], FaceMapper(128, params.model.tiny.text_dim, 4))
    state: dict = {}
    v = Validation(cfg, {}, state, seed=0, final_step=10, noise_scheduler=training_scheduler(3.0), device=torch.device("cpu"),
                   amp_dtype=None, timestep_sampling="uniform")
    v._update({"step": 2, "rendered": True, "identity_loss": 0.01, "facesim": None}, model, "stage1")
    assert state["best"] is None and v.best_weights is None  # no face in any render: not a candidate
    v._update({"step": 4, "rendered": True, "identity_loss": 0.5, "facesim": mean_measured([None, 0.7])}, model, "stage1")
    assert state["best"]["step"] == 4 and state["best"]["value"] == pytest.approx(0.7)
    v._update({"step": 6, "rendered": True, "identity_loss": 0.001, "facesim": None}, model, "stage1")
    assert state["best"]["step"] == 4


def test_ranks_train_the_slices_of_one_global_batch():
    """DDP (num_workers 2, batch b): the step's global batch comes from seed and step only and rank r
    trains slice r, so 2 x b train exactly the samples of 1 x 2b, each rank its own (its slice of the
    global noise likewise: faceid.train.step.flow_matching_loss; the end-to-end check, adapters
    included, on a 2-node cluster: tests/test_ray_cluster.py)."""
    from faceid.train.examples import IDENTITY, PRIOR
    from faceid.train.step import make_batch

    gen = torch.Generator().manual_seed(0)

    def example(frames: int, face: bool) -> dict:
        return {"target": torch.randn(16, frames, 2, 2, generator=gen), "control": torch.randn(96, frames, 2, 2, generator=gen),
                "text": torch.randn(3, 8, generator=gen), "embedding": torch.randn(128, generator=gen),
                "face": torch.tensor(face), "weight": torch.ones(frames, 2, 2), "ref_frames": 0}

    pools = {IDENTITY: [example(1, True) for _ in range(5)], PRIOR: [example(3, False) for _ in range(4)]}
    differ = 0
    for step in range(20):
        one = make_batch(pools, 0.5, step, 0, 4, 7)
        ranks = [make_batch(pools, 0.5, step, r, 2, 7, world_size=2) for r in range(2)]
        assert [b["global_slice"] for b in ranks] == [(0, 4), (2, 4)] and one["global_slice"] == (0, 4)
        for key in ("target", "control", "text", "embedding", "face", "weight"):
            assert torch.equal(torch.cat([b[key] for b in ranks]), one[key]), (step, key)
        differ += not torch.equal(ranks[0]["target"], ranks[1]["target"])
    assert differ >= 10  # the ranks train different samples (drawn with replacement: sometimes the same)
