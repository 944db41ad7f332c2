"""``render_validation``: held-out renders, FaceSim / pose metrics, alias gate (``faceid render-validation``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def render_validation(
    identity_dir: Input[Model],
    clips: Input[Dataset],
    embeddings: Input[Dataset],
    validation: Output[Dataset],
    metrics: Output[Metrics],
    params_path: str = "",
    profile: str = "",
    mlflow_uri: str = "",
):
    """``validation``: metrics.json, videos/, sheets/, side_by_side/; ``metrics``: the numbers for the KFP UI."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "render-validation", "--identity", identity_dir.path, "--clips", clips.path,
              "--reference", embeddings.path, "--output", validation.path, "--mlflow-uri", mlflow_uri,
              profile=profile, metrics=metrics, metrics_file=validation.path + "/metrics.json")
