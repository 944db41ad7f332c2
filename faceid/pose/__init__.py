"""Pose stage: dance videos -> normalised clips, OpenPose-18 keypoints and pose-control videos.

Modules: ``video`` (decord read, PyAV H.264 write), ``estimate`` (mediapipe / ONNX keypoints),
``draw`` (ControlNet-style skeletons), ``prepare`` (the ``prepare_pose`` stage), ``metrics``
(pose fidelity). Import the module you need; nothing heavy is imported here.
"""
