"""``embed_faces``: identity embedding and outlier report of the crops (``faceid embed-faces``)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def embed_faces(crops: Input[Dataset], embeddings: Output[Dataset], params_path: str = ""):
    """``embeddings``: embeddings.safetensors, embeddings.parquet, report.json."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "embed-faces", "--crops", crops.path, "--output", embeddings.path)
