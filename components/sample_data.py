"""``sample_data``: the sample identity (real photos) and dance videos (``faceid sample-data``)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_data(sample: Output[Dataset], params_path: str = ""):
    """Writes ``identities/<name>/``, ``others/`` and ``videos/`` (+ ``captions.csv``)."""
    from faceid.orchestrate import run_stage

    run_stage(params_path, "sample-data", "--output", sample.path)
