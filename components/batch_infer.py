"""``batch_infer``: videos of a registered identity for every pose clip, on Ray Data (``faceid batch-infer``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def batch_infer(
    clips: Input[Dataset],
    videos: Output[Dataset],
    identity: str,
    alias: str = "",
    params_path: str = "",
    profile: str = "",
    face_scale: float = -1.0,
    lora_scale: float = -1.0,
    ray_address: str = "",
    mlflow_uri: str = "",
):
    """Identity ``models:/faceid-<identity>@<alias>`` ("" = tracking.validated_alias). ``videos``: *.mp4 + manifest.parquet.
    ``face_scale`` / ``lora_scale``: a negative value = batch_infer.face_scale / lora_scale (0 is a real face_scale: the base model)."""
    from faceid.orchestrate import registry_uri, run_stage

    run_stage(params_path, "batch-infer", "--identity", registry_uri(params_path, identity, alias),
              "--pose-videos", clips.path, "--output", videos.path, "--ray-address", ray_address,
              "--mlflow-uri", mlflow_uri, profile=profile, face_scale=face_scale, lora_scale=lora_scale)
