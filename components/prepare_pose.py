"""``prepare_pose``: dance videos -> normalised clips + pose-control videos (``faceid prepare-pose``).

The clips are made on Ray Data (``ray_address``: the cluster train_lora and batch_infer use; "" =
``ray.address`` of the params, else local Ray in the pod). ``profile`` sets the clip size and length
(the real profile's clips are 81 frames at 480x832).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from faceid_components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare_pose(videos: Input[Dataset], clips: Output[Dataset], params_path: str = "", profile: str = "",
                 ray_address: str = ""):
    """``videos``: a folder of dance videos (optionally captions.csv). ``clips``: manifest.parquet + clips/<id>/."""
    from faceid import stages
    from faceid_components import ray_address as address, stage_params

    params = stage_params(params_path, profile)
    stages.prepare_pose(params, videos.path, clips.path, ray_address=address(ray_address, params))
