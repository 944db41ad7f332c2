"""``faceid train-lora``: launch the recipe on Ray Train, then log the run to MLflow (driver only).

- Ray: ``TorchTrainer(train_loop_per_worker, ScalingConfig(num_workers, use_gpu))`` (DDP), local
  Ray by default or ``ray_address`` for a cluster (``faceid.ray_session``: a local Ray never outlives
  this process; Ray's own log records reach the terminal only when they are errors). Checkpoints
  every ``checkpoint_every`` steps go
  to ``params.ray.storage_path/<run name>``; the run name hashes the identity, config and data, so
  re-running the same command after a kill resumes from the last checkpoint, and a worker crash is
  retried from it (``FailureConfig``). The identity folder comes back inside the final checkpoint.
- One writer: the identity folder and the Ray run folder are locked for the run
  (:func:`faceid.io.output_lock`); a second identical command fails at once instead of sharing them.
- MLflow: the run ``train-lora <identity> <7 hex of the Ray run's config + data hash>`` (the KFP run
  instead of the hash inside KFP; Source, Created by and the door's KFP run / DVC stage as tags:
  :func:`faceid.tracking.run_tags`) is opened here before training (a rerun after a kill continues
  the unfinished run of the same Ray run name); rank 0 logs each validation point into it while it
  trains (:func:`faceid.tracking.validation_logger`: ``loss/val_identity``, ``loss/val_prior``,
  ``facesim/val``, ``facesim/val_base`` at their step, renders and contact sheets under
  ``validation/step_NNNNNN/``). After training this process logs flattened params, per-step losses
  and learning rates of both stages (``loss/train_stage1``, ``loss/train_stage2``, ``lr/stage1``...:
  the "loss" section of the UI holds train and validation curves together), the validation series
  (steps not logged yet), the single-value figures (seconds, memory, counts) as ``summary.json``,
  the identity card and loss tables as artifacts, the kept step as tags, and the identity folder
  (without ``last/``) as a registered model ``faceid-<identity>`` with alias
  ``params.tracking.register_alias``, logged at the kept step (its metrics are that step's) and
  described with a link to this run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from faceid.errors import InputError, TrainingError
from faceid.train.validation import VALIDATION_METRICS

MAX_FAILURES = 2


def run_name(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips: list, people: list[str] = (),
             parent: str = "") -> str:
    """Stable per (identity, config, data): the same command resumes the same Ray run.
    ``clips``: the training and held-out clips (:func:`faceid.train.data.split_clips`); ``people``: a
    shared run's people (``crops_dir`` / ``embeddings_dir`` hold a folder each); ``parent``: the
    sha256 of the adapter an ``--init-from`` run starts from."""
    from faceid.config import config_hash
    from faceid.io import sha256_file
    from faceid.train.data import embeddings_sha256

    data = sorted(c.checksum for c in clips)
    folders = [(crops_dir / p, embeddings_dir / p) for p in people] or [(crops_dir, embeddings_dir)]
    ids = [(embeddings_sha256(e) or str(e.resolve()), sha256_file(c / "manifest.parquet")) for c, e in folders]
    # routing reads crop_faces/embed_faces settings (detector, embedder, padding): part of the data
    cfg = config_hash(params.model, params.train_lora, params.crop_faces, params.embed_faces,
                      *([params.train_shared] if people else []))
    if people or parent:
        payload = json.dumps([cfg, data, ids if people else list(ids[0]), parent], default=str)
    else:  # the payload of runs before train-shared / --init-from: their runs still resume
        payload = json.dumps([cfg, data, *ids[0]], default=str)
    command = "train-shared" if people else "train-lora"
    return f"{command}-{identity}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


def run(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, output_dir: Path,
        ray_address: str = "", mlflow_uri: str = "", fail_at_step: int | None = None, lock_wait: float = 0.0,
        origin: dict | None = None, init_from: str | Path | None = None) -> dict:
    """Train ``identity``, write ``output_dir`` (the identity folder), log to MLflow; return the summary.
    ``fail_at_step`` (tests) kills the worker once after that step's checkpoint to exercise resume.
    ``lock_wait``: seconds to wait for another run writing the same folders (:func:`faceid.io.output_lock`).
    ``origin``: what the door knows of where it runs (:data:`faceid.tracking.ORIGIN_TAGS`), as run tags.
    ``init_from``: a shared adapter (folder or ``models:/`` URI) whose mapper and LoRA the run starts from."""
    from faceid.io import output_lock

    # 1. Check inputs here, before any worker starts
    from faceid.outputs import check_folder

    crops_dir, embeddings_dir = Path(crops_dir), Path(embeddings_dir)
    clips_dir = Path(clips_dir)
    output_dir = check_folder("train_lora", output_dir, [crops_dir, embeddings_dir, clips_dir, init_from])  # faceid.outputs
    clips = _check_inputs(params, [(crops_dir, embeddings_dir)], clips_dir)
    parent = check_init_from(params, init_from, mlflow_uri) if init_from else None
    name = run_name(params, identity, crops_dir, embeddings_dir, clips, parent=parent["sha256"] if parent else "")
    storage = Path(params.ray.storage_path).resolve()
    extra = {"init_from": parent["path"], "init_from_sha256": parent["sha256"]} if parent else {}
    with output_lock("train-lora", output_dir, lock_wait), output_lock("train-lora", storage / name, lock_wait):
        return _train(params, identity, crops_dir, embeddings_dir, clips_dir, output_dir, name, storage,
                      ray_address, mlflow_uri, fail_at_step, origin, extra)


def run_shared(params, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, output_dir: Path, ray_address: str = "",
               mlflow_uri: str = "", lock_wait: float = 0.0, origin: dict | None = None) -> dict:
    """``faceid train-shared``: one adapter (``train_shared.name``) on every person of ``crops_dir`` /
    ``embeddings_dir`` (a folder each, :mod:`faceid.train.shared`), through the same recipe, launcher,
    checkpoints and MLflow logging as :func:`run`; written to ``output_dir``, registered as ``faceid-<name>``."""
    from faceid.io import output_lock
    from faceid.outputs import check_folder
    from faceid.train.shared import list_people, split_people
    from faceid.train.validation import enabled

    crops_dir, embeddings_dir, clips_dir = Path(crops_dir), Path(embeddings_dir), Path(clips_dir)
    output_dir = check_folder(SHARED, output_dir, [crops_dir, embeddings_dir, clips_dir])  # faceid.outputs
    people = list_people(crops_dir, embeddings_dir)
    split_people(people, params.train_shared.holdout_identities, enabled(params.train_lora.validation))
    clips = _check_inputs(params, [(crops_dir / p, embeddings_dir / p) for p in people], clips_dir)
    name = params.train_shared.name
    run = run_name(params, name, crops_dir, embeddings_dir, clips, people=people)
    storage = Path(params.ray.storage_path).resolve()
    with output_lock("train-shared", output_dir, lock_wait), output_lock("train-shared", storage / run, lock_wait):
        return _train(params, name, crops_dir, embeddings_dir, clips_dir, output_dir, run, storage,
                      ray_address, mlflow_uri, None, origin, {"people": True})


SHARED = "train_shared"  # the stage's name (faceid.outputs, MLflow tag)


def check_init_from(params, ref: str | Path, mlflow_uri: str) -> dict:
    """``{"path", "sha256"}`` of the ``--init-from`` adapter after checking it can start this run: a shared
    adapter (``train-shared``) for this base model and embedder, with the configured LoRA and mapper shape."""
    from faceid.model.base_model import text_dim
    from faceid.model.identity import is_shared, load_identity
    from faceid.render import identity_sha256, resolve_identity
    from faceid.train.step import check_adapter

    folder = resolve_identity(ref, mlflow_uri, params.tracking.download_dir)
    adapter = load_identity(folder, model_cfg=params.model, embedder=params.embed_faces.embedder)
    tcfg = params.train_lora
    if not is_shared(adapter):
        raise InputError(f"--init-from {ref}: not a shared adapter (written by train-shared); a person's identity "
                         "folder cannot start another person's training")
    # the embedder (so embed_dim) and text_dim are load_identity's checks; the rest is train_lora's
    check_adapter(adapter, tcfg.lora, f"--init-from {ref}", num_tokens=tcfg.num_face_tokens,
                  hidden_dim=tcfg.mapper_hidden_dim or text_dim(params.model))
    return {"path": str(Path(folder).resolve()), "sha256": identity_sha256(folder)}


def _check_inputs(params, people: list[tuple[Path, Path]], clips_dir: Path) -> list:
    """The training and held-out clips, after checking that each ``(crops, embeddings)`` pair (one per
    person) comes from the configured embedder and from these crops, and that the clips can be split."""
    from faceid.faces.crop import read_photos
    from faceid.train.data import check_embedder, load_embedding, load_photo_embeddings, split_clips

    for crops_dir, embeddings_dir in people:
        _, meta = load_embedding(embeddings_dir)
        check_embedder(meta, params.embed_faces)
        photos, kept = read_photos(crops_dir, embeddings_dir), load_photo_embeddings(embeddings_dir)[0]
        if not any(p.name in kept for p in photos):
            raise InputError(f"{crops_dir}: none of its accepted photos is in {embeddings_dir} (embedded from other "
                             "crops?); rerun embed-faces on these crops")
    train, held_out = split_clips(clips_dir, params.train_lora.holdout_clips)
    return train + held_out


def _train(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, output_dir: Path,
           name: str, storage: Path, ray_address: str, mlflow_uri: str, fail_at_step: int | None,
           origin: dict | None, extra: dict) -> dict:
    """Steps 2-4 of :func:`run`: the trainer on Ray, the identity folder, MLflow (the run opened first)."""
    from faceid import tracking
    from faceid.config import to_dict

    tcfg = params.train_lora
    config = {
        "params": to_dict(params),
        "identity": identity,
        "crops_dir": str(crops_dir.resolve()),
        "embeddings_dir": str(embeddings_dir.resolve()),
        "clips_dir": str(clips_dir.resolve()),
        "output_dir": "",  # set per worker (a temporary folder; the driver copies the final checkpoint)
        "final_output_dir": str(output_dir),  # where the identity folder ends up (the summary names it)
        **extra,  # people: true (train-shared) | init_from (+ its sha256)
    }
    stage = SHARED if extra.get("people") else "train_lora"
    command = stage.replace("_", "-")
    config["params"]["train_lora"]["cache_dir"] = str(Path(tcfg.cache_dir).resolve())
    if fail_at_step is not None:
        config.update(fail_at_step=fail_at_step, fail_marker=str(storage / name / "fault_injected"))
    # "train-lora obama 3f2a9c1": the Ray run name's hash of config + data (or the KFP run)
    run_id = tracking.open_run(mlflow_uri, params.tracking.experiment,
                               run_name=tracking.run_name(command, identity, name.rsplit("-", 1)[1][:7], origin),
                               tags=tracking.run_tags({"stage": stage, "identity": identity}, origin),
                               resume_tag=f"ray_run={name}") if mlflow_uri else None
    if run_id:  # rank 0 logs validation points into this run while it trains
        config["mlflow"] = {"uri": mlflow_uri, "run_id": run_id}
    try:
        return _fit_and_log(params, identity, output_dir, name, storage, ray_address, mlflow_uri, config, run_id, origin,
                            stage)
    except BaseException:
        if run_id:
            tracking.end_run(mlflow_uri, run_id, "FAILED", command)
        raise


def _fit_and_log(params, identity: str, output_dir: Path, name: str, storage: Path, ray_address: str, mlflow_uri: str,
                 config: dict, run_id: str | None, origin: dict | None, stage: str) -> dict:
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from faceid import ray_session
    from faceid.io import atomic_dir, readable_tree
    from faceid.outputs import mark
    from faceid.train.recipe import IDENTITY_SUBDIR, train_loop_per_worker

    tcfg = params.train_lora

    # 2. Ray (local unless an address is given; faceid.ray_session) and the trainer
    with ray_session.session(ray_address, params.ray.num_cpus, log_to_driver=True):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=config,
            scaling_config=ScalingConfig(num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu),
            run_config=RunConfig(
                name=name, storage_path=str(storage),
                # a worker that dies (its node lost): restart the group from the last checkpoint; a group the
                # cluster cannot place (Ray Train waits RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default,
                # each time): give up after as many tries instead of waiting forever (Ray's default)
                failure_config=FailureConfig(max_failures=MAX_FAILURES, controller_failure_limit=MAX_FAILURES),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level=ray_session.RAY_LOG_LEVEL),
            ),
        )
        try:
            with ray_session.train_env(ray_address):  # Ray Train's switches (output; local Ray's)
                result = ray_session.fit_off_main_thread(trainer.fit)  # Ctrl-C / SIGTERM stay faceid's
        except Exception as exc:  # Ray wraps worker errors; show the cause, not the Ray stack
            raise TrainingError(fit_error(exc, f"{stage.replace('_', '-')} {identity}", tcfg, storage / name)) from exc

    # 3. Outcome: NaN/inf stops with the recipe's message; otherwise copy the identity folder out
    metrics = dict(result.metrics or {})
    if metrics.get("error"):
        raise TrainingError(metrics["error"])
    if result.checkpoint is None or not metrics.get("done"):
        raise TrainingError(f"train-lora {identity}: Ray finished without a final checkpoint (metrics: {metrics})")
    with result.checkpoint.as_directory() as ckpt:
        check_trained(Path(ckpt) / IDENTITY_SUBDIR, tcfg.seed, identity)  # nothing untrained is written or registered
        with atomic_dir(output_dir) as tmp:
            shutil.copytree(Path(ckpt) / IDENTITY_SUBDIR, tmp, dirs_exist_ok=True)
            readable_tree(tmp)  # the checkpoint's folders are temporary ones (0700): as the user's umask says
            mark(tmp, stage)
    metrics["ray_run"] = str(storage / name)

    # 4. MLflow (driver only)
    if mlflow_uri:
        metrics.update(log_to_mlflow(params, identity, output_dir, metrics, mlflow_uri, run_id=run_id, origin=origin,
                                     stage=stage))
    return metrics


def fit_error(exc: BaseException, what: str, tcfg, run_dir: Path) -> str:
    """What ``trainer.fit`` raised, as faceid's message (``what``: "train-lora <identity>"): a worker
    group the cluster could not place (:data:`MAX_FAILURES` + 1 tries) says so and what it needs;
    anything else names Ray's error."""
    cause = getattr(exc, "controller_failure", None)
    if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
        need = f"1 CPU{' and 1 GPU' if tcfg.use_gpu else ''} each"
        return (f"{what}: the Ray cluster could not place {tcfg.num_workers} training worker(s) "
                f"({need}; train_lora.num_workers) in {MAX_FAILURES + 1} tries ({cause}): it has fewer free "
                f"resources than that now (a node lost?); the checkpoints in {run_dir} are kept: rerun the same "
                f"command when the cluster has room (it resumes from the last one), or lower train_lora.num_workers")
    return f"{what}: training failed on Ray ({type(exc).__name__}: {exc})"


def check_trained(identity_dir: Path, seed: int, identity: str) -> None:
    """Nothing untrained is registered (issue 21): the loss table must show an optimizer step with a
    learning rate > 0, and the weights must differ from where training starts: the face mapper from
    :func:`faceid.model.mapper.initial_mapper` (``seed``), or a LoRA B matrix from zero (peft's
    initialisation). Else ``TrainingError``: no identity folder is written and no alias moves.
    (Config load already refuses a run without steps or learning rate: this checks the outcome.)"""
    import torch

    from faceid.model.identity import MAPPER_FILE
    from faceid.model.lora import LORA_FILE, read_weights
    from faceid.model.mapper import initial_mapper

    rows = read_loss_table(identity_dir)
    fix = "check train_lora.stage1/stage2 steps and learning_rate; nothing was written or registered"
    if not any(r["lr"] > 0 for r in rows):
        raise TrainingError(f"train-lora {identity}: no optimizer step with a learning rate > 0 ran "
                            f"({len(rows)} step(s) logged); {fix}")
    mapper, meta = read_weights(identity_dir / MAPPER_FILE)
    mcfg = json.loads(meta["config"])
    with torch.random.fork_rng(devices=[]):
        start = initial_mapper(mcfg["embed_dim"], mcfg["text_dim"], mcfg["num_tokens"], mcfg["hidden_dim"], seed)
    lora = read_weights(identity_dir / LORA_FILE)[0]
    moved = set(mapper) != set(start.state_dict()) or any(
        not torch.equal(mapper[k], v) for k, v in start.state_dict().items())
    moved = moved or any(bool(v.abs().sum()) for k, v in lora.items() if "lora_B" in k)
    if not moved:
        raise TrainingError(f"train-lora {identity}: after {len(rows)} step(s) the weights equal their initial state "
                            f"(face mapper as initialised, LoRA B at zero): nothing was learned; {fix}")


def read_validation_table(identity_dir: Path) -> list[dict]:
    """``metrics/validation.csv`` rows (empty cells -> None); [] when validation was off."""
    import csv

    from faceid.model.identity import VALIDATION_FILE

    path = Path(identity_dir) / VALIDATION_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: (v if k == "stage" else int(v) if k in ("step", "best") else float(v) if v else None)
                 for k, v in row.items()} for row in csv.DictReader(f)]


def read_loss_table(identity_dir: Path) -> list[dict]:
    from faceid.model.identity import LOSS_FILE

    lines = (Path(identity_dir) / LOSS_FILE).read_text().splitlines()[1:]
    rows = []
    for line in lines:
        step, stage, loss, lr = line.split(",")
        rows.append({"step": int(step), "stage": stage, "loss": float(loss), "lr": float(lr)})
    return rows


# the loss curves: one chart section per prefix in the MLflow UI ("loss/", "lr/"), steps = global steps
TRAIN_LOSS_METRIC = "loss/train_{stage}"  # stage1 / stage2, beside loss/val_identity, loss/val_prior
LR_METRIC = "lr/{stage}"
SUMMARY_FILE = "summary.json"  # the single-value figures (seconds, memory, counts): one artifact, not one-point metrics


def log_to_mlflow(params, identity: str, identity_dir: Path, summary: dict, mlflow_uri: str, run_id: str | None = None,
                  origin: dict | None = None, stage: str = "train_lora") -> dict:
    """One MLflow run (``run_id``: the one :func:`faceid.tracking.open_run` opened, else a new one
    named ``train-lora <identity> <hash of the card's config and data>``): params, per-step losses
    and learning rates (``loss/train_stage1``, ``lr/stage1``...) beside the validation series
    (``loss/val_identity``, ``facesim/val``...), the summary as ``summary.json``, artifacts, and the
    registered model + alias. The logged model is logged at the kept step, so the metrics MLflow
    attaches to it (and shows on the model version) are that step's, not step 0's. The model
    version's tags and description name the training run."""
    import tempfile
    import time

    import mlflow
    from mlflow.entities import Metric
    from faceid import tracking
    from faceid.config import flatten
    from faceid.io import read_json
    from faceid.model.identity import CARD_FILE, LAST_SUBDIR, LOSS_FILE, VALIDATION_FILE

    card = read_json(identity_dir / CARD_FILE)
    model_name = tracking.registered_model_name(identity)
    client = tracking.client(mlflow_uri)
    kept = card.get("kept") or {}
    with tracking.using(mlflow_uri, params.tracking.experiment) as exp_id:
        digest = tracking.short_hash(card.get("train_config_hash"), card.get("data"))
        resume_or_new = {"run_id": run_id} if run_id else {
            "run_name": tracking.run_name(stage.replace("_", "-"), identity, digest, origin), "experiment_id": exp_id,
            "tags": tracking.run_tags({}, origin)}
        with mlflow.start_run(**resume_or_new) as run:
            mlflow.set_tags({"stage": stage, "identity": identity, "base_model": card["base_model"],
                             "embedder": card["embedder"], "kept_step": str(kept.get("step")),
                             "last_step": str(kept.get("last_step")), "kept_why": str(kept.get("why"))[:5000]})
            # every photo and clip with its role (identity | prior | excluded) and FaceSim score
            # and the plan: face sizes (clips vs identity examples, coverage), schedule, passes per photo
            mlflow.log_dict({"examples": card.get("examples", []), "loss": card.get("loss", {}),
                             "plan": card.get("plan", {})}, "examples.json")
            mlflow.log_dict(json.loads(json.dumps(summary, default=str)), SUMMARY_FILE)
            flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
            keys = sorted(flat)
            for i in range(0, len(keys), 100):
                mlflow.log_params({k: flat[k] for k in keys[i : i + 100]})
            now = int(time.time() * 1000)
            rows = read_loss_table(identity_dir)
            step_metrics = [Metric(TRAIN_LOSS_METRIC.format(stage=r["stage"]), r["loss"], now, r["step"]) for r in rows]
            step_metrics += [Metric(LR_METRIC.format(stage=r["stage"]), r["lr"], now, r["step"]) for r in rows]
            points = read_validation_table(identity_dir)
            for key, name in VALIDATION_METRICS.items():  # the points rank 0 has not logged live
                done = {m.step for m in client.get_metric_history(run.info.run_id, name)}
                step_metrics += [Metric(name, r[key], now, r["step"]) for r in points
                                 if r[key] is not None and r["step"] not in done]  # None: not measured, absent
            for i in range(0, len(step_metrics), 1000):
                client.log_batch(run.info.run_id, metrics=step_metrics[i : i + 1000])
            mlflow.log_artifact(str(identity_dir / CARD_FILE))
            mlflow.log_artifact(str(identity_dir / LOSS_FILE), artifact_path=str(Path(LOSS_FILE).parent))
            if (identity_dir / VALIDATION_FILE).is_file():
                mlflow.log_artifact(str(identity_dir / VALIDATION_FILE), artifact_path=str(Path(VALIDATION_FILE).parent))
            with tempfile.TemporaryDirectory() as tmp:  # the registered model is the kept step only (no last/)
                model_dir = Path(tmp) / "identity"
                top = Path(identity_dir)
                shutil.copytree(top, model_dir, ignore=lambda d, names: [LAST_SUBDIR] if Path(d) == top else [])
                with tracking.quiet(events=True):  # this stage prints the version it registered
                    info = mlflow.pyfunc.log_model(
                        name="identity",
                        python_model=str(Path(__file__).resolve().parents[1] / "model" / "mlflow_model.py"),
                        artifacts={"identity": str(model_dir)},
                        registered_model_name=model_name,
                        step=int(kept.get("step") or 0),  # MLflow links the metrics of this step to the model
                    )
            version = str(info.registered_model_version)
            client.set_registered_model_alias(model_name, params.tracking.register_alias, version)
            _describe_version(client, model_name, version, run.info, kept)
    print(f"{stage.replace('_', '-')} {identity}: MLflow run {run.info.run_id}, model {model_name} v{version} "
          f"@{params.tracking.register_alias}")
    return {"mlflow_run_id": run.info.run_id, "model_name": model_name, "model_version": version}


def _describe_version(client, model_name: str, version: str, run_info, kept: dict) -> None:
    """The model version leads to its training run: tags ``training_run_id`` / ``training_run_name``
    / ``kept_step``, and a description with a link (render-validation appends its own part)."""
    from faceid import tracking

    for key, value in (("training_run_id", run_info.run_id), ("training_run_name", run_info.run_name),
                       ("kept_step", str(kept.get("step")))):
        client.set_model_version_tag(model_name, version, key, value)
    link = tracking.run_link(run_info.experiment_id, run_info.run_id)
    text = (f"Trained by [{run_info.run_name}]({link}) (run `{run_info.run_id}`). Kept step {kept.get('step')} "
            f"of {kept.get('last_step')}: {kept.get('why')}. Its metrics on this page are that step's."
            f"{tracking.VALIDATION_NOTE} not yet run (faceid render-validation adds its run and side-by-side videos here).")
    client.update_model_version(model_name, version, description=text)
