"""KFP components (installed as ``faceid_components``): one per stage, each a typed interface, the
pinned image, and one call of the stage's typed library function (``faceid.stages.<name>``).

The component images are pinned here and only here: the tag is the faceid package version
(``faceid.__version__``), so a release builds and pushes ``faceid:<version>`` and
``faceid-cuda:<version>`` from ``infra/Dockerfile`` (the CUDA image with a build argument).
``tests/test_infra.py`` checks that the Kubernetes manifests name the same tags.

Component bodies run inside the image (or, with KFP's local runner, in this environment). They
turn the pipeline parameters into library values with the helpers below (this door's own rules:
``""`` / a negative number mean "the value in params.yaml"; the environment of the task is read
here) and call the stage. ``install_kfp_package=False``: kfp is already in the image (a faceid
dependency), so nothing is pip-installed at run time.
"""

from __future__ import annotations

import os
from typing import Any

from faceid import __version__

REGISTRY = "ghcr.io/faceid"
IMAGE = f"{REGISTRY}/faceid:{__version__}"
GPU_IMAGE = f"{REGISTRY}/faceid-cuda:{__version__}"


def stage_params(params_path: str, profile: str = "", values: dict[str, Any] | None = None):
    """The params of a task: ``params_path`` ("" = ``$FACEID_PARAMS`` or ./params.yaml, the file
    baked into the image), the ``profile`` ("" = none), and ``values`` whose sentinel means "as in
    params.yaml": a negative number (a NaN goes through, for the stage to reject by name)."""
    from faceid.config import default_params_path, load_params

    path = params_path or default_params_path(os.environ)
    given = {k: v for k, v in (values or {}).items() if not (isinstance(v, (int, float)) and v < 0)}
    return load_params(path, profile=profile, values=given)


def mlflow_uri(explicit: str, params) -> str:
    """The task's MLflow tracking URI: the parameter, else ``$MLFLOW_TRACKING_URI`` (the cluster's
    secret), else params.yaml / the local store (:func:`faceid.tracking.resolve_uri`)."""
    from faceid.tracking import resolve_uri

    return resolve_uri(explicit, params.tracking, os.environ)


def ray_address(explicit: str, params) -> str:
    from faceid.ray_session import resolve_address

    return resolve_address(explicit, params.ray, os.environ)


def log_metrics(metrics, result: dict) -> None:
    """The numbers of a stage's result into a KFP Metrics artifact (shown in the KFP UI); nested
    keys joined with dots."""
    from faceid.config import flatten

    for key, value in flatten(result).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(key, float(value))
