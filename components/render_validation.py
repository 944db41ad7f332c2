"""``render_validation``: held-out renders, FaceSim / pose metrics, alias gate (``faceid render-validation``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from faceid_components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def render_validation(
    clips: Input[Dataset],
    embeddings: Input[Dataset],
    validation: Output[Dataset],
    metrics: Output[Metrics],
    identity_dir: Input[Model] = None,
    adapter: Input[Model] = None,
    params_path: str = "",
    profile: str = "",
    mlflow_uri: str = "",
    kfp_run: str = "",
    kfp_task: str = "",
):
    """``identity_dir``: a train-lora output (the identity arm); ``adapter``: a train-shared output (the zero_shot
    arm; with ``embeddings`` of a folder of people, the people it held out); at least one of them.
    ``validation``: metrics.json, videos/, sheets/, side_by_side/; ``metrics``: the numbers for the KFP UI.
    ``kfp_run`` / ``kfp_task``: the pipeline passes its run and task name (KFP placeholders) for the MLflow run."""
    from faceid import stages
    from faceid_components import log_metrics, mlflow_uri as tracking_uri, stage_params

    params = stage_params(params_path, profile)
    result = stages.render_validation(params, identity_dir.path if identity_dir else None, clips.path, embeddings.path,
                                      validation.path, adapter=adapter.path if adapter else None,
                                      mlflow_uri=tracking_uri(mlflow_uri, params),
                                      origin={"source": "kfp render_validation", "kfp_run": kfp_run,
                                              "kfp_task": kfp_task})
    log_metrics(metrics, result)
