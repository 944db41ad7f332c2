"""``prepare_pose``: dance videos -> normalised clips + pose-control videos (``faceid prepare-pose``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_pose(videos: Input[Dataset], clips: Output[Dataset], params_path: str = ""):
    """``videos``: a folder of dance videos (optionally captions.csv). ``clips``: manifest.parquet + clips/<id>/."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "prepare-pose", "--videos", videos.path, "--output", clips.path)
