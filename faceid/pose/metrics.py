"""Pose fidelity of a generated video: PCK of its keypoints against the driving pose's keypoints."""

from __future__ import annotations

import numpy as np


def pose_fidelity(pred_kps: np.ndarray, ref_kps: np.ndarray, threshold: float = 0.1, min_confidence: float = 0.3) -> dict:
    """PCK@``threshold`` and mean error, normalised by the reference person's box size per frame.

    ``pred_kps``, ``ref_kps``: ``[F, 18, 3]`` (x, y, confidence). Frames are compared up to the
    shorter length; a frame counts when the reference has >= 2 joints with confidence >=
    ``min_confidence`` (its box size = the larger side of those joints' box). A reference joint
    that the prediction misses counts as a failure for PCK. ``mean_error`` averages the normalised
    distance over joints present in both. ``detection_rate``: compared frames in which the
    prediction has any joint.
    """
    pred, ref = np.asarray(pred_kps, np.float32), np.asarray(ref_kps, np.float32)
    if pred.ndim != 3 or pred.shape[1:] != (18, 3) or ref.ndim != 3 or ref.shape[1:] != (18, 3):
        raise ValueError(f"pose_fidelity: expected [F, 18, 3] arrays, got {pred.shape} and {ref.shape}")
    n = min(len(pred), len(ref))
    pred, ref = pred[:n], ref[:n]
    ref_ok = ref[..., 2] >= min_confidence
    pred_ok = pred[..., 2] >= min_confidence
    hits = total = 0
    errors: list[np.ndarray] = []
    detected = compared = 0
    for f in range(n):
        if ref_ok[f].sum() < 2:
            continue
        pts = ref[f, ref_ok[f], :2]
        size = float((pts.max(0) - pts.min(0)).max())
        if size <= 0:
            continue
        compared += 1
        detected += bool(pred_ok[f].any())
        dist = np.linalg.norm(pred[f, :, :2] - ref[f, :, :2], axis=1) / size
        both = ref_ok[f] & pred_ok[f]
        hits += int((dist[both] <= threshold).sum())
        total += int(ref_ok[f].sum())
        errors.append(dist[both])
    all_errors = np.concatenate(errors) if errors else np.zeros(0)
    return {
        "pck": hits / total if total else float("nan"),
        "mean_error": float(all_errors.mean()) if len(all_errors) else float("nan"),
        "frames_compared": compared,
        "detection_rate": detected / compared if compared else float("nan"),
    }
