"""``embed_faces``: identity embedding and outlier report of the crops (``faceid embed-faces``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from faceid_components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed_faces(crops: Input[Dataset], embeddings: Output[Dataset], params_path: str = ""):
    """``embeddings``: embeddings.safetensors, embeddings.parquet, report.json (per person: ``<person>/``)."""
    from faceid import stages
    from faceid_components import stage_params

    stages.embed_faces(stage_params(params_path), crops.path, embeddings.path)
