"""The stages, one typed function each: what every door calls.

A stage has one name at every layer: CLI ``faceid crop-faces`` = :func:`crop_faces` here = DVC
stage ``crop_faces`` = KFP component ``crop_faces``. The doors (``faceid.cli``, the components
in ``components/``, installed as ``faceid_components``) turn their arguments into these calls;
they read the environment and resolve defaults (``faceid.tracking.resolve_uri``,
``faceid.ray_session.resolve_address``, :func:`faceid.render.settings_from`) and pass the values
here. The work is in the stage modules named in each function.

Every function takes the validated :class:`faceid.config.Params` first, paths as ``Path``, and
``lock_wait`` (seconds to wait for another run writing the same output; :func:`faceid.io.output_lock`).
"""

from __future__ import annotations

from pathlib import Path


def sample_data(params, output: Path, *, lock_wait: float = 0.0) -> dict:
    """The sample identity (real photos) and sample dance videos (:mod:`faceid.sample_data`)."""
    from faceid import sample_data as module

    return module.run(params.sample_data, Path(output), lock_wait=lock_wait)


def crop_faces(params, photos: Path, output: Path, *, lock_wait: float = 0.0) -> dict:
    """Photos of one person -> aligned crops; or a folder of such folders, each cropped into
    ``output/<folder name>/`` with the models loaded once (:mod:`faceid.faces.crop`)."""
    from faceid.faces import crop

    run = crop.run_many if crop.holds_identities(Path(photos)) else crop.run
    return run(params.crop_faces, Path(photos), Path(output), lock_wait=lock_wait)


def embed_faces(params, crops: Path, output: Path, *, lock_wait: float = 0.0) -> dict:
    """Crops -> per-photo and identity embeddings, outlier report; or a folder of crop-faces
    outputs (:mod:`faceid.faces.embed`)."""
    from faceid.faces import embed

    run = embed.run_many if embed.holds_identities(Path(crops)) else embed.run
    return run(params.embed_faces, Path(crops), Path(output), lock_wait=lock_wait)


def similarity(params, reference: Path, video: Path, output: Path | None = None) -> dict:
    """FaceSim of a video (or a folder of videos) to a reference embedding (:mod:`faceid.faces.similarity`)."""
    from faceid.faces import similarity as module

    return module.run(params, Path(reference), Path(video), Path(output) if output else None)


def prepare_pose(params, videos: Path, output: Path, *, pose_videos: Path | None = None, captions: Path | None = None,
                 ray_address: str = "", lock_wait: float = 0.0) -> dict:
    """Dance videos -> normalised clips + pose-control videos (:mod:`faceid.pose.prepare`)."""
    from faceid.pose import prepare

    return prepare.run(params.prepare_pose, Path(videos), Path(pose_videos) if pose_videos else None, Path(output),
                       captions=Path(captions) if captions else None, lock_wait=lock_wait, ray_address=ray_address,
                       num_cpus=params.ray.num_cpus)


def train_lora(params, identity: str, crops: Path, embeddings: Path, clips: Path, output: Path, *,
               ray_address: str = "", mlflow_uri: str = "", lock_wait: float = 0.0, plan: bool = False,
               origin: dict | None = None, init_from: str | None = None) -> dict:
    """Two-stage identity training on Ray Train, logged and registered in MLflow (:mod:`faceid.train.launch`).
    ``plan``: only print what the run would do (:func:`faceid.train.plan.run`): no model, no training, nothing written.
    ``origin``: where the door runs (command, KFP run, DVC stage: :data:`faceid.tracking.ORIGIN_TAGS`), for the MLflow run.
    ``init_from``: a shared adapter (folder or ``models:/``) to start from (:mod:`faceid.train.shared`)."""
    from faceid.train import launch

    if plan:
        from faceid.train import plan as planning

        if init_from:
            launch.check_init_from(params, init_from, mlflow_uri)
        return planning.run(params, identity, Path(crops), Path(embeddings), Path(clips), init_from=bool(init_from))

    return launch.run(params, identity=identity, crops_dir=Path(crops), embeddings_dir=Path(embeddings),
                      clips_dir=Path(clips), output_dir=Path(output), ray_address=ray_address, mlflow_uri=mlflow_uri,
                      lock_wait=lock_wait, origin=origin, init_from=init_from or None)


def train_shared(params, crops: Path, embeddings: Path, clips: Path, output: Path, *, ray_address: str = "",
                 mlflow_uri: str = "", lock_wait: float = 0.0, plan: bool = False, origin: dict | None = None) -> dict:
    """One adapter for many people (``<crops>/<person>/``, ``<embeddings>/<person>/``) through the identity recipe,
    registered as ``faceid-<train_shared.name>`` (:mod:`faceid.train.shared`). ``plan``: only print the plan."""
    from faceid.train import launch

    if plan:
        from faceid.train import shared

        return shared.run_plan(params, params.train_shared.name, Path(crops), Path(embeddings), Path(clips))
    return launch.run_shared(params, Path(crops), Path(embeddings), Path(clips), Path(output), ray_address=ray_address,
                             mlflow_uri=mlflow_uri, lock_wait=lock_wait, origin=origin)


def render_validation(params, identity: Path | None, clips: Path, reference: Path, output: Path, *,
                      mlflow_uri: str = "", lock_wait: float = 0.0, origin: dict | None = None,
                      adapter: str | None = None) -> dict:
    """Held-out clips rendered in the arms, FaceSim / pose / retrieval metrics, the validation gate (:mod:`faceid.validate`).
    ``identity``: a train-lora folder, or None with ``adapter`` (a shared adapter, folder or ``models:/``): zero-shot
    validation of the people it held out (``reference``: an embed-faces output of a folder of people) or of one person.
    ``origin``: as for :func:`train_lora`."""
    from faceid import validate

    return validate.run(params, identity_dir=Path(identity) if identity else None, clips_dir=Path(clips),
                        reference=Path(reference), output_dir=Path(output), mlflow_uri=mlflow_uri, lock_wait=lock_wait,
                        origin=origin, adapter=adapter or None)


def infer(params, pose_video: Path, output: Path, settings, *, identity: str | None = None, blend: str | None = None,
          reference_only: bool = False, reference_image: Path | None = None, mlflow_uri: str = "",
          lock_wait: float = 0.0, adapter: str | None = None) -> dict:
    """One video for an identity (folder or ``models:/``), a blend, or the reference-only baseline,
    rendered with ``settings`` (:class:`faceid.render.Settings`; :mod:`faceid.infer`)."""
    from faceid import infer as module

    return module.run(params, Path(pose_video), Path(output), settings, identity=identity, blend=blend,
                      reference_only=reference_only, reference_image=reference_image, mlflow_uri=mlflow_uri,
                      lock_wait=lock_wait, adapter=adapter)


def batch_infer(params, pose_videos: Path, output: Path, settings, *, identity: str | None = None,
                blend: str | None = None, interpolate: str | None = None, ray_address: str = "", mlflow_uri: str = "",
                lock_wait: float = 0.0, adapter: str | None = None) -> dict:
    """Videos for a folder or prepare-pose output of pose videos on Ray Data (:mod:`faceid.batch`)."""
    from faceid import batch

    return batch.run(params, identity=identity, pose_videos=Path(pose_videos), output_dir=Path(output), blend=blend,
                     interpolate=interpolate, ray_address=ray_address, mlflow_uri=mlflow_uri, settings=settings,
                     lock_wait=lock_wait, adapter=adapter)


def make_test_weights(params, output: Path | None, size: str, seed: int = 0, text_encoder: str = "test") -> Path:
    """RANDOM weights in the Wan2.1-VACE-1.3B folder layout, for offline checks (:mod:`faceid.model.test_weights`)."""
    from faceid.model import test_weights

    output = Path(output) if output else test_weights.default_output(size)
    return test_weights.write_test_weights(output, size, params.model.tiny, seed=seed, text_encoder=text_encoder)
