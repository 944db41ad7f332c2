"""``train_lora``: two-stage identity training on Ray Train (``faceid train-lora``).

Logs to MLflow and registers ``faceid-<identity>`` with ``tracking.register_alias``.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from faceid_components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_lora(
    crops: Input[Dataset],
    embeddings: Input[Dataset],
    clips: Input[Dataset],
    identity_dir: Output[Model],
    identity: str,
    params_path: str = "",
    profile: str = "",
    stage1_steps: int = -1,
    stage2_steps: int = -1,
    ray_address: str = "",
    mlflow_uri: str = "",
    kfp_run: str = "",
    kfp_task: str = "",
):
    """``identity_dir``: LoRA + face mapper + identity card. "" / -1 = the value in params.yaml.
    ``kfp_run`` / ``kfp_task``: the pipeline passes its run and task name (KFP placeholders) for the MLflow run."""
    from faceid import stages
    from faceid_components import mlflow_uri as tracking_uri, ray_address as address, stage_params

    params = stage_params(params_path, profile, {"train_lora.stage1.steps": stage1_steps,
                                                 "train_lora.stage2.steps": stage2_steps})
    stages.train_lora(params, identity, crops.path, embeddings.path, clips.path, identity_dir.path,
                      ray_address=address(ray_address, params), mlflow_uri=tracking_uri(mlflow_uri, params),
                      origin={"source": "kfp train_lora", "kfp_run": kfp_run, "kfp_task": kfp_task})
