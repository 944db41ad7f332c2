"""Pose stage: dance videos -> normalised clips, OpenPose-18 keypoints and pose-control videos.

Modules: ``video`` (decord read, PyAV H.264 write), ``estimate`` (mediapipe / ONNX keypoints),
``draw`` (ControlNet-style skeletons), ``prepare`` (the ``prepare_pose`` stage) with its parts
``inputs`` (find, pair, probe and plan videos), ``geometry`` (crop windows, keypoints), ``face_regions``
and ``clips`` (the clip makers: threads in one process, or Ray Data), ``metrics`` (pose fidelity).
Import the module you need; nothing heavy is imported here.
"""
