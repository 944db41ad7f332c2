"""``batch_infer``: videos of a registered identity for every pose clip, on Ray Data (``faceid batch-infer``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from faceid_components import GPU_IMAGE


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
    from faceid import stages
    from faceid.render import settings_from
    from faceid.tracking import registry_uri
    from faceid_components import mlflow_uri as tracking_uri, ray_address as address, stage_params

    params = stage_params(params_path, profile, {"batch_infer.face_scale": face_scale,
                                                 "batch_infer.lora_scale": lora_scale})
    stages.batch_infer(params, clips.path, videos.path, settings_from(params.batch_infer),
                       identity=registry_uri(params.tracking, identity, alias), ray_address=address(ray_address, params),
                       mlflow_uri=tracking_uri(mlflow_uri, params))
