"""``faceid train-lora``: launch the recipe on Ray Train, then log the run to MLflow (driver only).

- Ray: ``TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers, use_gpu))`` (DDP), local
  Ray by default or ``ray_address`` for a cluster (``faceid.ray_local``: a local Ray never outlives
  this process; Ray's own log records reach the terminal only when they are errors). Checkpoints
  every ``checkpoint_every`` steps go
  to ``params.ray.storage_path/<run name>``; the run name hashes the identity, config and data, so
  re-running the same command after a kill resumes from the last checkpoint, and a worker crash is
  retried from it (``FailureConfig``). The identity folder comes back inside the final checkpoint.
- One writer: the identity folder and the Ray run folder are locked for the run
  (:func:`faceid.io.output_lock`); a second identical command fails at once instead of sharing them.
- MLflow (this process, i.e. rank 0's entry point): flattened params, per-step losses and learning
  rates of both stages, throughput, peak memory, the identity card and loss table as artifacts,
  the identity folder as a registered model ``faceid-<identity>`` with alias
  ``params.tracking.register_alias``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from faceid.errors import InputError, TrainingError

MAX_FAILURES = 2


def run_name(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips: list) -> str:
    """Stable per (identity, config, data): the same command resumes the same Ray run.
    ``clips``: the training clips (:func:`faceid.train.data.training_clips`)."""
    from faceid.config import config_hash
    from faceid.io import sha256_file
    from faceid.train.data import embeddings_sha256

    data = sorted(c.checksum for c in clips)
    emb_id = embeddings_sha256(embeddings_dir) or str(embeddings_dir.resolve())
    photos_id = sha256_file(crops_dir / "manifest.parquet")
    # routing reads crop_faces/embed_faces settings (detector, embedder, padding): part of the data
    payload = json.dumps([config_hash(params.model, params.train_lora, params.crop_faces, params.embed_faces),
                          data, emb_id, photos_id], default=str)
    return f"train-lora-{identity}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def run(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, output_dir: Path,
        ray_address: str = "", mlflow_uri: str = "", fail_at_step: int | None = None, lock_wait: float = 0.0) -> dict:
    """Train ``identity``, write ``output_dir`` (the identity folder), log to MLflow; return the summary.
    ``fail_at_step`` (tests) kills the worker once after that step's checkpoint to exercise resume.
    ``lock_wait``: seconds to wait for another run writing the same folders (:func:`faceid.io.output_lock`)."""
    from faceid.io import output_lock

    # 1. Check inputs here, before any worker starts
    crops_dir, embeddings_dir = Path(crops_dir), Path(embeddings_dir)
    clips_dir, output_dir = Path(clips_dir), Path(output_dir)
    clips = _check_inputs(params, crops_dir, embeddings_dir, clips_dir)
    name = run_name(params, identity, crops_dir, embeddings_dir, clips)
    storage = Path(params.ray.storage_path).resolve()
    with output_lock("train-lora", output_dir, lock_wait), output_lock("train-lora", storage / name, lock_wait):
        return _train(params, identity, crops_dir, embeddings_dir, clips_dir, output_dir, name, storage,
                      ray_address, mlflow_uri, fail_at_step)


def _check_inputs(params, crops_dir: Path, embeddings_dir: Path, clips_dir: Path) -> list:
    """The training clips, after checking that the photos, embeddings and clips belong together."""
    from faceid.faces.crop import read_photos
    from faceid.train.data import check_embedder, load_embedding, load_photo_embeddings, training_clips

    _, meta = load_embedding(embeddings_dir)
    check_embedder(meta, params.embed_faces)
    photos, kept = read_photos(crops_dir, embeddings_dir), load_photo_embeddings(embeddings_dir)[0]
    if not any(p.name in kept for p in photos):
        raise InputError(f"{crops_dir}: none of its accepted photos is in {embeddings_dir} (embedded from other crops?); "
                         "rerun embed-faces on these crops")
    return training_clips(clips_dir, params.train_lora.holdout_clips)


def _train(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, output_dir: Path,
           name: str, storage: Path, ray_address: str, mlflow_uri: str, fail_at_step: int | None) -> dict:
    """Steps 2-4 of :func:`run`: the trainer on Ray, the identity folder, MLflow."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from faceid import ray_local
    from faceid.config import to_dict
    from faceid.io import atomic_dir
    from faceid.train.recipe import IDENTITY_SUBDIR, train_loop_per_worker

    tcfg = params.train_lora
    config = {
        "params": to_dict(params),
        "identity": identity,
        "crops_dir": str(crops_dir.resolve()),
        "embeddings_dir": str(embeddings_dir.resolve()),
        "clips_dir": str(clips_dir.resolve()),
        "output_dir": "",  # set per worker (a temporary folder; the driver copies the final checkpoint)
    }
    config["params"]["train_lora"]["cache_dir"] = str(Path(tcfg.cache_dir).resolve())
    if fail_at_step is not None:
        config.update(fail_at_step=fail_at_step, fail_marker=str(storage / name / "fault_injected"))

    # 2. Ray (local unless an address is given; faceid.ray_local) and the trainer
    with ray_local.session(ray_address, params.ray.num_cpus, log_to_driver=True):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
            run_config=RunConfig(
                name=name, storage_path=str(storage),
                failure_config=FailureConfig(max_failures=MAX_FAILURES),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level=ray_local.RAY_LOG_LEVEL),
            ),
        )
        try:
            result = trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; show the cause, not the Ray stack
            raise TrainingError(f"train-lora {identity}: training failed on Ray ({type(exc).__name__}: {exc})") from exc

    # 3. Outcome: NaN/inf stops with the recipe's message; otherwise copy the identity folder out
    metrics = dict(result.metrics or {})
    if metrics.get("error"):
        raise TrainingError(metrics["error"])
    if result.checkpoint is None or not metrics.get("done"):
        raise TrainingError(f"train-lora {identity}: Ray finished without a final checkpoint (metrics: {metrics})")
    with result.checkpoint.as_directory() as ckpt, atomic_dir(output_dir) as tmp:
        shutil.copytree(Path(ckpt) / IDENTITY_SUBDIR, tmp, dirs_exist_ok=True)
    metrics["ray_run"] = str(storage / name)

    # 4. MLflow (driver only)
    if mlflow_uri:
        metrics.update(log_to_mlflow(params, identity, output_dir, metrics, mlflow_uri))
    return metrics


def read_loss_table(identity_dir: Path) -> list[dict]:
    from faceid.model.identity import LOSS_FILE

    lines = (Path(identity_dir) / LOSS_FILE).read_text().splitlines()[1:]
    rows = []
    for line in lines:
        step, stage, loss, lr = line.split(",")
        rows.append({"step": int(step), "stage": stage, "loss": float(loss), "lr": float(lr)})
    return rows


def log_to_mlflow(params, identity: str, identity_dir: Path, summary: dict, mlflow_uri: str) -> dict:
    """One MLflow run: params, per-step metrics, summary, artifacts, registered model + alias."""
    import time

    import mlflow
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from faceid import tracking
    from faceid.config import flatten
    from faceid.io import read_json
    from faceid.model.identity import CARD_FILE, LOSS_FILE

    tracking.setup(mlflow_uri, params.tracking.experiment)
    card = read_json(identity_dir / CARD_FILE)
    model_name = tracking.registered_model_name(identity)
    client = MlflowClient()
    with mlflow.start_run(run_name=f"train-lora-{identity}") as run:
        mlflow.set_tags({"stage": "train_lora", "identity": identity, "base_model": card["base_model"],
                         "embedder": card["embedder"]})
        # every photo and clip with its role (identity | prior | excluded) and FaceSim score
        mlflow.log_dict({"examples": card.get("examples", []), "loss": card.get("loss", {})}, "examples.json")
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        keys = sorted(flat)
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
        now = int(time.time() * 1000)
        rows = read_loss_table(identity_dir)
        step_metrics = [Metric(f"{r['stage']}_loss", r["loss"], now, r["step"]) for r in rows]
        step_metrics += [Metric(f"{r['stage']}_lr", r["lr"], now, r["step"]) for r in rows]
        for i in range(0, len(step_metrics), 1000):
            client.log_batch(run.info.run_id, metrics=step_metrics[i : i + 1000])
        mlflow.log_metrics({k: float(v) for k, v in summary.items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        mlflow.log_artifact(str(identity_dir / CARD_FILE))
        mlflow.log_artifact(str(identity_dir / LOSS_FILE), artifact_path=str(Path(LOSS_FILE).parent))
        info = mlflow.pyfunc.log_model(
            name="identity",
            python_model=str(Path(__file__).resolve().parents[1] / "model" / "mlflow_model.py"),
            artifacts={"identity": str(identity_dir)},
            registered_model_name=model_name,
        )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(model_name, params.tracking.register_alias, version)
    print(f"train-lora {identity}: MLflow run {run.info.run_id}, model {model_name} v{version} "
          f"@{params.tracking.register_alias}")
    return {"mlflow_run_id": run.info.run_id, "model_name": model_name, "model_version": version}
