"""Batch-inference pipeline: a registered identity + dance videos -> pose clips -> generated videos.

    import-videos -> prepare-pose -> batch-infer (models:/faceid-<identity>@<alias>)

``alias`` "" = ``tracking.validated_alias`` (the identity passed the validation gate); pass
``alias=candidate`` to use the latest trained version. ``face_scale`` / ``lora_scale`` < 0 = the
values in params.yaml (``batch_infer``); ``face_scale=0`` renders the base model.
"""

from kfp import dsl
from kfp.dsl import Dataset

from faceid_components.batch_infer import batch_infer
from faceid_components.prepare_pose import prepare_pose
from faceid_pipelines import on_cpu, on_gpu


@dsl.pipeline(name="faceid-infer", description="Generate videos of a registered identity dancing like the given videos")
def infer_pipeline(
    identity: str,
    dance_videos: str,
    alias: str = "",
    params_path: str = "",
    profile: str = "",
    face_scale: float = -1.0,
    lora_scale: float = -1.0,
    ray_address: str = "",
    mlflow_uri: str = "",
) -> Dataset:
    videos = dsl.importer(artifact_uri=dance_videos, artifact_class=Dataset, reimport=False)
    videos.set_display_name("import-videos")
    clips = on_cpu(prepare_pose(videos=videos.output, params_path=params_path, profile=profile, ray_address=ray_address))
    generated = on_gpu(batch_infer(
        clips=clips.outputs["clips"], identity=identity, alias=alias, params_path=params_path,
        profile=profile, face_scale=face_scale, lora_scale=lora_scale, ray_address=ray_address, mlflow_uri=mlflow_uri,
    ))
    return generated.outputs["videos"]
