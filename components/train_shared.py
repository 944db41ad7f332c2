"""``train_shared``: one identity adapter for many people on Ray Train (``faceid train-shared``).

Logs to MLflow and registers ``faceid-<train_shared.name>`` with ``tracking.register_alias``.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from faceid_components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def train_shared(
    crops: Input[Dataset],
    embeddings: Input[Dataset],
    clips: Input[Dataset],
    adapter: Output[Model],
    params_path: str = "",
    profile: str = "",
    stage1_steps: int = -1,
    stage2_steps: int = -1,
    ray_address: str = "",
    mlflow_uri: str = "",
    kfp_run: str = "",
    kfp_task: str = "",
):
    """``crops`` / ``embeddings``: crop-faces / embed-faces of a folder of people (``<person>/``). ``adapter``:
    LoRA + face mapper + card naming the people trained and held out. "" / -1 = the value in params.yaml.
    ``kfp_run`` / ``kfp_task``: the pipeline passes its run and task name (KFP placeholders) for the MLflow run."""
    from faceid import stages
    from faceid_components import mlflow_uri as tracking_uri, ray_address as address, stage_params

    params = stage_params(params_path, profile, {"train_lora.stage1.steps": stage1_steps,
                                                 "train_lora.stage2.steps": stage2_steps})
    stages.train_shared(params, crops.path, embeddings.path, clips.path, adapter.path,
                        ray_address=address(ray_address, params), mlflow_uri=tracking_uri(mlflow_uri, params),
                        origin={"source": "kfp train_shared", "kfp_run": kfp_run, "kfp_task": kfp_task})
