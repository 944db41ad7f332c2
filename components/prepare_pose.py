"""``prepare_pose``: dance videos -> normalised clips + pose-control videos (``faceid prepare-pose``).

The clips are made on Ray Data (``ray_address``: the cluster train_lora and batch_infer use; "" =
``ray.address`` of the params, else local Ray in the pod). ``profile`` sets the clip size and length
(the real profile's clips are 81 frames at 480x832).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_pose(videos: Input[Dataset], clips: Output[Dataset], params_path: str = "", profile: str = "",
                 ray_address: str = ""):
    """``videos``: a folder of dance videos (optionally captions.csv). ``clips``: manifest.parquet + clips/<id>/."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "prepare-pose", "--videos", videos.path, "--output", clips.path,
              "--ray-address", ray_address, profile=profile)
