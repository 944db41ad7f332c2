"""MLflow helpers. Called only from entry points (and only on rank 0)."""

from __future__ import annotations

from pathlib import Path


def local_store_uri(store: Path) -> str:
    """The embedded default: a sqlite tracking store inside ``store`` (artifacts beside it)."""
    store = Path(store).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def setup(tracking_uri: str, experiment: str) -> str:
    """Point MLflow's tracking AND registry at ``tracking_uri`` and make sure ``experiment`` exists;
    return its id. (The registry must follow: a registry URI set earlier in the process, e.g. by a
    ``models:/`` download from another store, would otherwise receive the model versions.)

    For a sqlite store the experiment's artifacts go to ``<store>/artifacts`` (not the cwd).
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is not None:
        mlflow.set_experiment(experiment)
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:///"):
        artifact_location = (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment)
    return exp_id


def registered_model_name(identity: str) -> str:
    return f"faceid-{identity}"
