"""``train_lora``: two-stage identity training on Ray Train (``faceid train-lora``).

Logs to MLflow and registers ``faceid-<identity>`` with ``tracking.register_alias``.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import GPU_IMAGE


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
):
    """``identity_dir``: LoRA + face mapper + identity card. "" / -1 = the value in params.yaml."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "train-lora", "--identity", identity, "--crops", crops.path, "--embeddings", embeddings.path,
              "--clips", clips.path, "--output", identity_dir.path, "--ray-address", ray_address,
              "--mlflow-uri", mlflow_uri, profile=profile, stage1_steps=stage1_steps, stage2_steps=stage2_steps)
