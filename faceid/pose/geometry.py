"""Clip geometry, pure: where clips start, the crop window (centred on the person), cropping and
resizing frames, keypoints into clip pixels, and the resolution pose estimation runs at."""

from __future__ import annotations

import numpy as np

ANALYSIS_LONG_SIDE = 1280  # px: pose estimation resolution cap
DRAW_MIN_CONFIDENCE = 0.3  # joints below this are neither drawn nor used to centre the crop


def clip_starts(total: int, num_frames: int, stride: int, max_clips: int) -> list[int]:
    """Start frames of the clips of ``num_frames`` in ``total`` frames (``stride`` 0 = no overlap)."""
    step = stride or num_frames
    starts = list(range(0, total - num_frames + 1, step))
    return starts[:max_clips] if max_clips > 0 else starts


def crop_box(src_h: int, src_w: int, out_h: int, out_w: int, keypoints: np.ndarray | None = None,
             min_confidence: float = DRAW_MIN_CONFIDENCE) -> tuple[int, int, int, int]:
    """Largest ``out_h:out_w`` window (x0, y0, w, h) in the frame, centred on the person if given.

    The person's centre is the median over frames of the keypoint-box centres (frames with >= 2
    confident joints); without one the window is centred in the frame.
    """
    aspect = out_w / out_h
    cw = min(float(src_w), src_h * aspect)
    ch = cw / aspect
    cx, cy = src_w / 2, src_h / 2
    if keypoints is not None:
        centres = []
        for kp in np.asarray(keypoints):
            ok = kp[:, 2] >= min_confidence
            if ok.sum() >= 2:
                pts = kp[ok, :2]
                centres.append((pts.min(0) + pts.max(0)) / 2)
        if centres:
            cx, cy = np.median(np.stack(centres), axis=0)
    w, h = min(src_w, int(round(cw))), min(src_h, int(round(ch)))
    x0 = int(round(np.clip(cx - w / 2, 0, src_w - w)))
    y0 = int(round(np.clip(cy - h / 2, 0, src_h - h)))
    return x0, y0, w, h


def apply_crop(frames: np.ndarray, box: tuple[int, int, int, int], out_h: int, out_w: int) -> np.ndarray:
    """``[F, H, W, 3]`` frames -> the window ``box`` (x0, y0, w, h) of each, resized to ``out_h`` x ``out_w``."""
    import cv2

    x0, y0, w, h = box
    interp = cv2.INTER_AREA if w >= out_w else cv2.INTER_LINEAR
    return np.stack([cv2.resize(f[y0 : y0 + h, x0 : x0 + w], (out_w, out_h), interpolation=interp) for f in frames])


def transform_keypoints(kps: np.ndarray, box: tuple[int, int, int, int], out_h: int, out_w: int) -> np.ndarray:
    """Keypoints of the analysis frames -> clip pixels; joints outside the clip get confidence 0."""
    x0, y0, w, h = box
    out = np.array(kps, np.float32, copy=True)
    out[..., 0] = (out[..., 0] - x0) * (out_w / w)
    out[..., 1] = (out[..., 1] - y0) * (out_h / h)
    inside = (out[..., 0] >= 0) & (out[..., 0] < out_w) & (out[..., 1] >= 0) & (out[..., 1] < out_h)
    out[~inside, 2] = 0.0
    out[out[..., 2] == 0] = 0.0
    return out


def analysis_size(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[int, int] | None:
    """Decode size (h, w) for pose estimation: long side <= 1280 px unless the crop needs more."""
    aspect = out_w / out_h
    cw = min(src_w, src_h * aspect)
    needed = out_w / cw
    scale = min(1.0, max(needed, ANALYSIS_LONG_SIDE / max(src_h, src_w)))
    if scale >= 1.0:
        return None
    return int(round(src_h * scale / 2)) * 2, int(round(src_w * scale / 2)) * 2
