"""MLflow: where runs and models go, registry names and URIs. Called only from the stages (and
only on rank 0)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

MODELS_PREFIX = "models:/"


def resolve_uri(explicit: str | None, cfg, environ: Mapping[str, str]) -> str:
    """The tracking URI of a run: ``explicit`` (``--mlflow-uri``, a pipeline parameter) >
    ``$MLFLOW_TRACKING_URI`` > ``tracking.mlflow_uri`` (``cfg``) > the local sqlite store
    ``tracking.local_store``. The doors pass their environment."""
    uri = explicit or environ.get("MLFLOW_TRACKING_URI") or cfg.mlflow_uri
    return uri or local_store_uri(Path(cfg.local_store))


def local_store_uri(store: Path) -> str:
    """The embedded default: a sqlite tracking store inside ``store`` (artifacts beside it)."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def experiment_id(tracking_uri: str, experiment: str) -> str:
    """The id of ``experiment`` in the store at ``tracking_uri``, created when missing (for a sqlite
    store its artifacts go to ``<store>/artifacts``, not the working directory)."""
    mlflow_client = client(tracking_uri)
    exp = mlflow_client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return mlflow_client.create_experiment(experiment, artifact_location=artifact_location)


URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def using(tracking_uri: str, experiment: str) -> Iterator[str]:
    """For the block, MLflow's fluent API (``mlflow.start_run``, ``log_*``, ``pyfunc.log_model``)
    logs to ``tracking_uri``, tracking AND registry (a registry URI left from elsewhere would
    otherwise receive the model versions); yields the id of ``experiment``. MLflow's process-wide
    URIs, and the environment variables it sets for them, are restored after: nothing leaks into
    the rest of the process (tests, notebooks, the next stage run in-process)."""
    import os

    import mlflow

    saved = {name: os.environ.get(name) for name in URI_ENV}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield experiment_id(tracking_uri, experiment)
    finally:
        mlflow.set_tracking_uri(saved["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(saved["MLFLOW_REGISTRY_URI"])
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def registered_model_name(identity: str) -> str:
    return f"faceid-{identity}"


def registry_uri(cfg, identity: str, alias: str = "") -> str:
    """``models:/faceid-<identity>@<alias>``; ``alias=""`` = ``tracking.validated_alias`` (``cfg``)."""
    return f"{MODELS_PREFIX}{registered_model_name(identity)}@{alias or cfg.validated_alias}"


@contextlib.contextmanager
def quiet(events: bool = False) -> Iterator[None]:
    """For the block: no "Downloading artifacts" bars (MLflow's own, for a model read back when
    logged or an identity downloaded; faceid says what it fetched); a
    ``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR`` the user set wins. ``events``: MLflow's event lines
    too ("Successfully registered model ...", "Created version ..."), which are not log records but
    prints to MLflow's event stream. MLflow's own counted switch for that stream is used (its
    autologging's ``MlflowEventsAndWarningsBehaviorGlobally``): MLflow's inner blocks of the same
    kind re-enable the stream on exit unless the count says otherwise, so a plain
    ``disable_logging()`` does not hold through ``log_model``. MLflow's warnings are left as they
    are. Restored after."""
    from faceid.io import environ_set

    with contextlib.ExitStack() as stack:
        if events:
            from mlflow.utils.autologging_utils.logging_and_warnings import MlflowEventsAndWarningsBehaviorGlobally

            stack.enter_context(MlflowEventsAndWarningsBehaviorGlobally(
                disable_event_logs=True, disable_warnings=False, reroute_warnings=False))
        stack.enter_context(environ_set("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false", keep_existing=True))
        yield


def client(tracking_uri: str):
    """An ``MlflowClient`` whose tracking AND registry are ``tracking_uri`` (no process-wide state)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


# --------------------------------------------------------------------------- runs


# What a door knows about where a stage runs (``origin``, a plain dict the doors build): key -> tag.
# ``source``: the command ("faceid train-lora"); ``kfp_run``: the KFP run's name
# (``dsl.PIPELINE_JOB_NAME_PLACEHOLDER``); ``kfp_task``: its task; ``dvc_stage``: ``$DVC_STAGE``.
ORIGIN_TAGS = {"source": "mlflow.source.name", "kfp_run": "kfp.run", "kfp_task": "kfp.task", "dvc_stage": "dvc.stage"}


def short_hash(*parts) -> str:
    """7 hex digits of the JSON of ``parts``: what tells two runs of one identity apart in a run name."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()[:7]


def run_name(command: str, identity: str, digest: str, origin: Mapping[str, str] | None = None) -> str:
    """``train-lora obama 3f2a9c1``: the command, the identity, and the KFP run when inside one, else
    ``digest`` (a short hash of the resolved config and input data: the same inputs, the same name)."""
    return f"{command} {identity} {(origin or {}).get('kfp_run') or digest}"


def run_tags(tags: Mapping[str, str], origin: Mapping[str, str] | None = None) -> dict[str, str]:
    """``tags`` with what the MLflow UI shows as Source and Created by (``mlflow.source.*``,
    ``mlflow.user``, the git commit: MLflow's own run-context resolution, as ``mlflow.start_run``
    does, so that a run created through the client -- train-lora's, which Ray workers log into --
    has them too) and the ``origin`` the door passed (:data:`ORIGIN_TAGS`; empty values left out;
    ``mlflow.source.type`` JOB inside KFP)."""
    from mlflow.tracking.context.registry import resolve_tags

    origin = {k: v for k, v in (origin or {}).items() if v}
    unknown = set(origin) - set(ORIGIN_TAGS)
    if unknown:
        raise ValueError(f"origin: unknown keys {sorted(unknown)} (expected {sorted(ORIGIN_TAGS)})")
    out = resolve_tags(dict(tags))
    out.update({ORIGIN_TAGS[k]: str(v) for k, v in origin.items()})
    if origin.get("kfp_run"):
        out["mlflow.source.type"] = "JOB"
    return out


def open_run(tracking_uri: str, experiment: str, run_name: str, tags: dict[str, str], resume_tag: str) -> str:
    """The unfinished run tagged ``resume_tag`` (``key=value``) that a killed command left (its rerun
    goes on in it), else a new run named ``run_name`` with ``tags`` (see :func:`run_tags`). Returns its id."""
    key, value = resume_tag.split("=", 1)
    mlflow_client = client(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    found = mlflow_client.search_runs([exp_id], filter_string=f"tags.{key} = '{value}'",
                                      order_by=["attributes.start_time DESC"], max_results=1)
    if found and found[0].info.status != "FINISHED":
        return found[0].info.run_id
    return mlflow_client.create_run(exp_id, run_name=run_name, tags={**tags, key: value}).info.run_id


# A model version's description: train-lora's part, then this heading and render-validation's part
# (replaced by each validation of that version).
VALIDATION_NOTE = "\n\nValidation:"


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's address of a run, relative to the UI (works in a model version's description)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def end_run(tracking_uri: str, run_id: str, status: str, stage: str) -> None:
    """Mark a run ``status`` (FINISHED / FAILED / KILLED); an MLflow error is said, not raised (the
    stage's own error matters more)."""
    try:
        client(tracking_uri).set_terminated(run_id, status)
    except Exception as exc:
        print(f"{stage}: could not mark MLflow run {run_id} {status} ({type(exc).__name__}: {exc})")


def validation_logger(mlflow_uri: str, run_id: str, metric_names: dict[str, str]):
    """``on_validation`` for rank 0 (``faceid.train.recipe.train``): each validation point into the
    run as it happens -- ``metric_names`` (point key -> MLflow metric): held-out losses and FaceSim
    as metrics at their step (steps already logged, e.g. before a resume, are skipped), the renders
    and contact sheets as artifacts under
    ``validation/step_NNNNNN/``, an early stop as tag ``early_stop.<stage>``. MLflow unreachable from
    the worker does not stop training: it says so (the driver logs the numbers at the end)."""
    import time

    from mlflow.entities import Metric

    mlflow_client = client(mlflow_uri)
    logged: dict[str, set[int]] = {}  # metric -> steps in the run (read at the first point)

    def log(point: dict, folder: Path | None) -> None:
        step = point["step"]
        try:
            if not logged:
                logged.update({name: {m.step for m in mlflow_client.get_metric_history(run_id, name)}
                               for name in metric_names.values()})
            now = int(time.time() * 1000)
            metrics = [Metric(name, float(point[key]), now, step) for key, name in metric_names.items()
                       if point.get(key) is not None and step not in logged[name]]
            if metrics:
                mlflow_client.log_batch(run_id, metrics=metrics)
            for m in metrics:
                logged[m.key].add(step)
            if folder is not None:
                mlflow_client.log_artifacts(run_id, str(folder), artifact_path=f"validation/step_{step:06d}")
            if point.get("stop"):
                mlflow_client.set_tag(run_id, f"early_stop.{point['stage']}", point["stop"])
        except Exception as exc:
            print(f"train-lora: MLflow logging of validation step {step} failed ({type(exc).__name__}: {exc}); "
                  "training goes on (the driver logs the numbers at the end)")

    return log


# --------------------------------------------------------------------------- registry


def find_registered_version(tracking_uri: str, identity: str, card: dict, alias: str) -> str | None:
    """The registry version of an identity folder: ``faceid-<identity>@<alias>`` when the card
    logged with that version equals ``card``; None when not registered (or another training run)."""
    import json

    import mlflow

    try:
        version = client(tracking_uri).get_model_version_by_alias(registered_model_name(identity), alias)
    except Exception:  # not registered, or no such alias
        return None
    try:
        with quiet():
            card_path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="identity.json",
                                                            tracking_uri=tracking_uri, registry_uri=tracking_uri)
        logged = json.loads(Path(card_path).read_text())
    except Exception:
        return None
    return str(version.version) if logged == card else None


def parse_models_uri(uri: str) -> tuple[str, str, str]:
    """``models:/<name>@<alias>`` -> ``(name, "alias", alias)``; ``models:/<name>/<version>`` ->
    ``(name, "version", version)``."""
    from faceid.errors import InputError

    rest = uri[len(MODELS_PREFIX):] if uri.startswith(MODELS_PREFIX) else ""
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in name:
            return name, "alias", alias
    elif rest.count("/") == 1:
        name, version = rest.split("/")
        if name and version.isdigit():
            return name, "version", version
    raise InputError(f"{uri}: expected models:/faceid-<name>@<alias> or models:/faceid-<name>/<version>")


def pin_version(uri: str, tracking_uri: str) -> str:
    """``models:/<name>@<alias>`` -> ``models:/<name>/<version>`` (the version the alias names now),
    so that every worker of a run loads the same version even if the alias moves meanwhile."""
    from faceid.errors import InputError

    name, kind, ref = parse_models_uri(uri)
    if kind == "version":
        return uri
    try:
        version = client(tracking_uri).get_model_version_by_alias(name, ref).version
    except Exception as exc:  # MlflowException / RestException: unknown model or alias
        raise InputError(f"{uri}: cannot load from the MLflow registry at {tracking_uri} "
                         f"({str(exc).splitlines()[0][:200]}); check the name faceid-<identity> and the alias "
                         "(candidate/validated)") from None
    return f"{MODELS_PREFIX}{name}/{version}"


def download_identity(uri: str, tracking_uri: str, cache_dir: Path) -> Path:
    """The identity folder of a registered model version, downloaded once per version into
    ``cache_dir/<store hash>/<name>/<version>/`` (atomically, one downloader at a time; a version's
    files do not change) and reused by later calls, other processes and Ray workers on this machine."""
    import hashlib

    import mlflow

    from faceid.errors import InputError
    from faceid.io import atomic_dir, output_lock

    name, _, version = parse_models_uri(pin_version(uri, tracking_uri))
    store = hashlib.sha256(tracking_uri.encode()).hexdigest()[:12]
    folder = Path(cache_dir) / store / name / version
    with output_lock("download", folder, wait=-1):
        if not folder.is_dir():
            with atomic_dir(folder) as tmp:
                try:  # the version's storage location, from this store's registry (a models:/ URI would be
                    #     resolved against MLflow's process-wide registry URI, whatever it is)
                    location = client(tracking_uri).get_model_version_download_uri(name, version)
                    with quiet():
                        mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(tmp), tracking_uri=tracking_uri)
                except Exception as exc:
                    raise InputError(f"{uri}: cannot download version {version} from the MLflow registry at "
                                     f"{tracking_uri} ({str(exc).splitlines()[0][:200]})") from None
    cards = sorted(folder.rglob("identity.json"))
    if len(cards) != 1:
        raise InputError(f"{uri}: expected one identity folder (with identity.json) in the registered model, found {len(cards)}")
    return cards[0].parent
