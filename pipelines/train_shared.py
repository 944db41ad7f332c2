"""Shared-adapter pipeline: photos of many people + dance videos -> one adapter -> zero-shot validation.

    import-people -> crop-faces -> embed-faces --+--> train-shared -> render-validation (held-out people, zero-shot)
                         \__ (photos as targets) __/
    import-videos -> prepare-pose ---------------+

``people_photos`` is a folder of people (``<person>/<photos>``, crop-faces and embed-faces run on each)
and ``dance_videos`` a folder of videos, each a URI: a local path for ``faceid pipeline run --local``,
``s3://...`` / ``minio://...`` / ``gs://...`` on a cluster. train-shared holds out
``train_shared.holdout_identities`` people; render-validation renders them from their embed-faces output
through the adapter (no training of theirs) and gates the adapter on them. "" / -1 parameters mean
"the value in params.yaml" (``params_path``; "" = the params.yaml baked into the image).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Model

from faceid_components.crop_faces import crop_faces
from faceid_components.embed_faces import embed_faces
from faceid_components.prepare_pose import prepare_pose
from faceid_components.render_validation import render_validation
from faceid_components.train_shared import train_shared
from faceid_pipelines import on_cpu, on_gpu


@dsl.pipeline(name="faceid-train-shared",
              description="Train one face-identity adapter for many people and validate it zero-shot on people held out")
def train_shared_pipeline(
    people_photos: str,
    dance_videos: str,
    params_path: str = "",
    profile: str = "",
    stage1_steps: int = -1,
    stage2_steps: int = -1,
    ray_address: str = "",
    mlflow_uri: str = "",
) -> NamedTuple("Outputs", adapter=Model, validation=Dataset):
    photos = dsl.importer(artifact_uri=people_photos, artifact_class=Dataset, reimport=False)
    photos.set_display_name("import-people")
    videos = dsl.importer(artifact_uri=dance_videos, artifact_class=Dataset, reimport=False)
    videos.set_display_name("import-videos")

    crops = on_cpu(crop_faces(photos=photos.output, params_path=params_path))
    embeddings = on_cpu(embed_faces(crops=crops.outputs["crops"], params_path=params_path))
    clips = on_cpu(prepare_pose(videos=videos.output, params_path=params_path, profile=profile, ray_address=ray_address))

    trained = on_gpu(train_shared(
        crops=crops.outputs["crops"], embeddings=embeddings.outputs["embeddings"], clips=clips.outputs["clips"],
        params_path=params_path, profile=profile, stage1_steps=stage1_steps, stage2_steps=stage2_steps,
        ray_address=ray_address, mlflow_uri=mlflow_uri,
        kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
    ))
    validated = on_gpu(render_validation(
        adapter=trained.outputs["adapter"], clips=clips.outputs["clips"],
        embeddings=embeddings.outputs["embeddings"], params_path=params_path, profile=profile,
        mlflow_uri=mlflow_uri,
        kfp_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER, kfp_task=dsl.PIPELINE_TASK_NAME_PLACEHOLDER,
    ), memory="32Gi")

    Outputs = NamedTuple("Outputs", adapter=Model, validation=Dataset)
    return Outputs(adapter=trained.outputs["adapter"], validation=validated.outputs["validation"])
