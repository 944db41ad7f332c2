"""``crop_faces``: detect, align, quality-filter and crop the identity photos (``faceid crop-faces``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from faceid_components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def crop_faces(photos: Input[Dataset], crops: Output[Dataset], params_path: str = ""):
    """``photos``: a folder of photos of one person, or of such folders (one per person: ``crops/<person>/``).
    ``crops``: manifest.parquet + crops/<size>/."""
    from faceid import stages
    from faceid_components import stage_params

    stages.crop_faces(stage_params(params_path), photos.path, crops.path)
