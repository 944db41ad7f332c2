"""KFP components: one per stage, each a typed interface + the pinned image + one call into faceid.

The component images are pinned here and only here: the tag is the faceid package version
(``faceid.__version__``), so a release builds and pushes ``faceid:<version>`` and
``faceid-cuda:<version>`` from ``infra/Dockerfile`` (the CUDA image with a build argument).
``tests/test_infra.py`` checks that the Kubernetes manifests name the same tags.

Component bodies run inside the image (or, with KFP's local runner, in this environment); each
imports :func:`faceid.orchestrate.run_stage` and calls the stage's CLI command with the artifact
paths. ``install_kfp_package=False``: kfp is already in the image (a faceid dependency), so
nothing is pip-installed at run time.
"""

from faceid import __version__

REGISTRY = "ghcr.io/faceid"
IMAGE = f"{REGISTRY}/faceid:{__version__}"
GPU_IMAGE = f"{REGISTRY}/faceid-cuda:{__version__}"
