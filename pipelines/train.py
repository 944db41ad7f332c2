"""Training pipeline: photos + dance videos -> crops, embedding, pose clips -> identity adapter -> validation.

    import-photos -> crop-faces -> embed-faces ----+--> train-lora -> render-validation
                         \__ (photos as targets) __/
    import-videos -> prepare-pose -----------------+

``identity_photos`` and ``dance_videos`` are folder URIs: a local path for ``faceid pipeline run
--local``, ``s3://...`` / ``minio://...`` / ``gs://...`` on a cluster. "" / -1 parameters mean
"the value in params.yaml" (``params_path``; "" = the params.yaml baked into the image).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Model

from faceid_components.crop_faces import crop_faces
from faceid_components.embed_faces import embed_faces
from faceid_components.prepare_pose import prepare_pose
from faceid_components.render_validation import render_validation
from faceid_components.train_lora import train_lora
from faceid_pipelines import on_cpu, on_gpu


@dsl.pipeline(name="faceid-train", description="Train a face-identity adapter for Wan2.1-VACE and validate it")
def train_pipeline(
    identity: str,
    identity_photos: str,
    dance_videos: str,
    params_path: str = "",
    profile: str = "",
    stage1_steps: int = -1,
    stage2_steps: int = -1,
    ray_address: str = "",
    mlflow_uri: str = "",
) -> NamedTuple("Outputs", identity_dir=Model, validation=Dataset):
    photos = dsl.importer(artifact_uri=identity_photos, artifact_class=Dataset, reimport=False)
    photos.set_display_name("import-photos")
    videos = dsl.importer(artifact_uri=dance_videos, artifact_class=Dataset, reimport=False)
    videos.set_display_name("import-videos")

    crops = on_cpu(crop_faces(photos=photos.output, params_path=params_path))
    embeddings = on_cpu(embed_faces(crops=crops.outputs["crops"], params_path=params_path))
    clips = on_cpu(prepare_pose(videos=videos.output, params_path=params_path, profile=profile, ray_address=ray_address))

    trained = on_gpu(train_lora(
        crops=crops.outputs["crops"], embeddings=embeddings.outputs["embeddings"], clips=clips.outputs["clips"],
        identity=identity,
        params_path=params_path, profile=profile, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
        ray_address=ray_address, mlflow_uri=mlflow_uri,
        kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
    ))
    validated = on_gpu(render_validation(
        identity_dir=trained.outputs["identity_dir"], clips=clips.outputs["clips"],
        embeddings=embeddings.outputs["embeddings"], params_path=params_path, profile=profile,
        mlflow_uri=mlflow_uri,
        kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
    ), memory="32Gi")

    Outputs = NamedTuple("Outputs", identity_dir=Model, validation=Dataset)
    return Outputs(identity_dir=trained.outputs["identity_dir"], validation=validated.outputs["validation"])
