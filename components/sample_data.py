"""``sample_data``: the sample identity (real photos) and dance videos (``faceid sample-data``)."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from faceid_components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sample_data(sample: Output[Dataset], params_path: str = ""):
    """Writes ``identities/<name>/``, ``others/`` and ``videos/`` (+ ``captions.csv``)."""
    from faceid import stages
    from faceid_components import stage_params

    stages.sample_data(stage_params(params_path), sample.path)
