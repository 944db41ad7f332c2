"""One environment for every stage: kfp (protobuf>=6.31) beside mediapipe 0.10.21 (whose metadata
asks for protobuf<5 and numpy<2). mediapipe is installed with --no-deps; this proves it really runs
here, in the same process as kfp, with numpy 2 and protobuf 6."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np
from packaging.version import Version


def test_conflicting_pins_are_resolved_in_one_environment():
    import google.protobuf
    import kfp
    import mediapipe

    assert Version(google.protobuf.__version__) >= Version("6.31")
    assert Version(np.__version__) >= Version("2")
    assert version("mediapipe") == "0.10.21" and mediapipe.__version__ == "0.10.21"
    assert Version(kfp.__version__) >= Version("2.17")


def test_mediapipe_models_run_on_a_real_photo_beside_kfp():
    import kfp.dsl  # noqa: F401  (loaded in the same process on purpose)
    import mediapipe as mp
    from skimage import data

    photo = data.astronaut()  # a real photo of a person, shipped in scikit-image
    with mp.solutions.pose.Pose(static_image_mode=True, model_complexity=1) as pose:
        result = pose.process(photo)
    assert result.pose_landmarks is not None
    nose = result.pose_landmarks.landmark[0]
    # the astronaut's face is in the upper middle-left of the photo
    assert 0.2 < nose.x < 0.6 and 0.05 < nose.y < 0.45
    with mp.solutions.face_detection.FaceDetection(model_selection=1) as detector:
        faces = detector.process(photo).detections
    assert faces and len(faces) == 1


def test_torch_is_the_cpu_build_without_torchvision():
    import importlib.util

    import torch

    assert importlib.util.find_spec("torchvision") is None
    assert torch.__version__.startswith("2.")
