"""Body keypoints in OpenPose-18 (COCO-18) order: mediapipe Pose offline, or a user ONNX model.

``build_estimator(cfg).estimate(frames [F, H, W, 3] RGB) -> [F, 18, 3]`` (x, y in pixels of the
given frames, confidence; a joint with confidence 0 is missing, a frame with all zeros has no
person). Each ``estimate`` call is one sequence (tracking state does not leak between calls).

OpenPose-18 order: 0 nose, 1 neck, 2 r-shoulder, 3 r-elbow, 4 r-wrist, 5 l-shoulder, 6 l-elbow,
7 l-wrist, 8 r-hip, 9 r-knee, 10 r-ankle, 11 l-hip, 12 l-knee, 13 l-ankle, 14 r-eye, 15 l-eye,
16 r-ear, 17 l-ear. The neck is the shoulders' midpoint (confidence: the lower of the two).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceid.config import PreparePoseConfig
from faceid.errors import ConfigError, InputError
from faceid.io import require_file

NUM_KEYPOINTS = 18
NECK = 1
# Source index per OpenPose-18 joint (NECK filled from the shoulders).
MEDIAPIPE_TO_OPENPOSE = (0, -1, 12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27, 5, 2, 8, 7)
COCO17_TO_OPENPOSE = (0, -1, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3)


def to_openpose18(points: np.ndarray, table: tuple[int, ...]) -> np.ndarray:
    """``[F, K, 3]`` keypoints of another layout -> ``[F, 18, 3]`` via ``table`` (neck added)."""
    out = np.zeros((points.shape[0], NUM_KEYPOINTS, 3), np.float32)
    for dst, src in enumerate(table):
        if src >= 0:
            out[:, dst] = points[:, src]
    r_sh, l_sh = points[:, table[2]], points[:, table[5]]
    out[:, NECK, :2] = (r_sh[:, :2] + l_sh[:, :2]) / 2
    out[:, NECK, 2] = np.minimum(r_sh[:, 2], l_sh[:, 2])
    return out


class MediapipePoseEstimator:
    """mediapipe 0.10.21 ``Pose(model_complexity=1)``: the full landmark model ships in the wheel."""

    def __init__(self, min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5):
        self.min_detection_confidence = min_detection_confidence
        self.min_tracking_confidence = min_tracking_confidence

    def estimate(self, frames: np.ndarray) -> np.ndarray:
        from faceid.faces.detect import import_mediapipe, quiet_mediapipe_logs

        mp = import_mediapipe()
        frames = np.asarray(frames)
        out = np.zeros((len(frames), 33, 3), np.float32)
        found = np.zeros(len(frames), bool)
        # Complexity 0 and 2 download their models at run time; 1 is offline. A graph per call: its
        # models load, and its harmless C++ warnings come, on its first frames (quiet_mediapipe_logs).
        with quiet_mediapipe_logs(), mp.solutions.pose.Pose(
            static_image_mode=False,
            model_complexity=1,
            min_detection_confidence=self.min_detection_confidence,
            min_tracking_confidence=self.min_tracking_confidence,
        ) as pose:
            for i, frame in enumerate(frames):
                result = pose.process(np.ascontiguousarray(frame))
                if result.pose_landmarks is None:
                    continue
                h, w = frame.shape[:2]
                lm = result.pose_landmarks.landmark
                out[i] = [(p.x * w, p.y * h, p.visibility) for p in lm]
                found[i] = True
        kps = to_openpose18(out, MEDIAPIPE_TO_OPENPOSE)
        kps[~found] = 0.0
        # visibility can round to exactly 0 for a joint that was still located; keep it "present".
        kps[found, :, 2] = np.maximum(kps[found, :, 2], 1e-3)
        return kps

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class OnnxPoseEstimator:
    """A top-down SimCC pose model (RTMPose / DWPose ONNX, user supplied) via onnxruntime.

    Input ``[1, 3, H, W]`` float (RGB, ImageNet mean/std in 0..255 units); outputs ``simcc_x``
    ``[1, K, W*r]`` and ``simcc_y`` ``[1, K, H*r]``. ``K`` = 17 (COCO body) or 133 (COCO-WholeBody,
    DWPose: its first 17 are the body). No person detector: the box is the previous frame's
    skeleton (padded) or the whole frame.
    """

    MEAN = np.array([123.675, 116.28, 103.53], np.float32)
    STD = np.array([58.395, 57.12, 57.375], np.float32)

    def __init__(self, path: str | Path, min_confidence: float = 0.3, padding: float = 1.25):
        import onnxruntime as ort

        path = require_file(path, "a DWPose/RTMPose ONNX file (prepare_pose.onnx_path)")
        self.session = ort.InferenceSession(str(path), providers=ort.get_available_providers())
        shape = self.session.get_inputs()[0].shape
        self.input_name = self.session.get_inputs()[0].name
        self.input_hw = (int(shape[2]), int(shape[3]))
        if len(self.session.get_outputs()) < 2:
            raise InputError(f"{path}: expected a SimCC model with outputs simcc_x, simcc_y (RTMPose/DWPose)")
        self.min_confidence = min_confidence
        self.padding = padding

    def _box(self, previous: np.ndarray | None, h: int, w: int) -> np.ndarray:
        """Centre and size (cx, cy, bw, bh) of the crop box."""
        if previous is not None:
            ok = previous[:, 2] > self.min_confidence
            if ok.sum() >= 4:
                lo, hi = previous[ok, :2].min(0), previous[ok, :2].max(0)
                centre, size = (lo + hi) / 2, (hi - lo) * self.padding
                return np.array([centre[0], centre[1], max(size[0], 16), max(size[1], 16)], np.float32)
        return np.array([w / 2, h / 2, w, h], np.float32)

    def _affine(self, box: np.ndarray) -> np.ndarray:
        """2x3 matrix mapping the box (aspect fixed to the model input) onto the input image."""
        in_h, in_w = self.input_hw
        cx, cy, bw, bh = box
        aspect = in_w / in_h
        bw, bh = (bh * aspect, bh) if bw / bh < aspect else (bw, bw / aspect)
        s = in_w / bw
        return np.array([[s, 0, in_w / 2 - s * cx], [0, s, in_h / 2 - s * cy]], np.float32)

    def estimate(self, frames: np.ndarray) -> np.ndarray:
        import cv2

        frames = np.asarray(frames)
        in_h, in_w = self.input_hw
        raw = []
        previous = None
        for frame in frames:
            h, w = frame.shape[:2]
            m = self._affine(self._box(previous, h, w))
            crop = cv2.warpAffine(frame, m, (in_w, in_h), flags=cv2.INTER_LINEAR).astype(np.float32)
            blob = ((crop - self.MEAN) / self.STD).transpose(2, 0, 1)[None]
            simcc_x, simcc_y = self.session.run(None, {self.input_name: blob})[:2]
            pts = decode_simcc(simcc_x[0], simcc_y[0], in_w, in_h)[:17]
            pts[:, 0] = (pts[:, 0] - m[0, 2]) / m[0, 0]
            pts[:, 1] = (pts[:, 1] - m[1, 2]) / m[1, 1]
            pts[pts[:, 2] < self.min_confidence, 2] = 0.0
            previous = pts
            raw.append(pts)
        return to_openpose18(np.stack(raw) if raw else np.zeros((0, 17, 3), np.float32), COCO17_TO_OPENPOSE)

    def close(self) -> None:
        self.session = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, input_w: int, input_h: int) -> np.ndarray:
    """SimCC logits ``[K, W*r]``, ``[K, H*r]`` -> ``[K, 3]`` (x, y in input pixels, confidence)."""
    ratio_x, ratio_y = simcc_x.shape[1] / input_w, simcc_y.shape[1] / input_h
    x = simcc_x.argmax(1) / ratio_x
    y = simcc_y.argmax(1) / ratio_y
    conf = np.minimum(simcc_x.max(1), simcc_y.max(1))
    return np.stack([x, y, np.clip(conf, 0, None)], axis=1).astype(np.float32)


def build_estimator(cfg: PreparePoseConfig):
    """The estimator named by ``prepare_pose.estimator``."""
    if cfg.estimator == "mediapipe":
        return MediapipePoseEstimator()
    if cfg.estimator == "onnx":
        if not cfg.onnx_path:
            raise ConfigError("prepare_pose.onnx_path: estimator 'onnx' needs a DWPose/RTMPose .onnx file")
        return OnnxPoseEstimator(cfg.onnx_path)
    raise ConfigError(f"prepare_pose.estimator: expected 'mediapipe' or 'onnx', got {cfg.estimator!r}")
