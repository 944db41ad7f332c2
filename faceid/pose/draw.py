"""OpenPose-18 skeletons drawn the ControlNet way: coloured limbs (60 % colour) and joints on black.

Same limb list and colours as ControlNet's OpenPose annotator (``draw_bodypose``), which is what
pose-conditioned video models such as Wan-VACE were trained on. Limb width and joint radius are
4 px at 512 px (short side) and scale with the frame.
"""

from __future__ import annotations

import math

import numpy as np

# Pairs of OpenPose-18 joints (0-based); the first 17 are drawn, as in ControlNet.
LIMBS = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10),
    (1, 11), (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)  # fmt: skip
COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0),
    (0, 255, 0), (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255),
    (0, 0, 255), (85, 0, 255), (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
LIMB_ALPHA = 0.6


def limb_color(index: int) -> tuple[int, int, int]:
    """RGB colour of limb ``index`` on a black canvas."""
    return tuple(int(c * LIMB_ALPHA) for c in COLORS[index])


def stroke_width(height: int, width: int) -> int:
    return max(1, round(4 * min(height, width) / 512))


def draw_pose(keypoints: np.ndarray, height: int, width: int, min_confidence: float = 0.3) -> np.ndarray:
    """``[18, 3]`` keypoints (x, y pixels, confidence) -> ``[H, W, 3]`` uint8 RGB skeleton on black."""
    import cv2

    kps = np.asarray(keypoints, np.float32)
    if kps.shape != (18, 3):
        raise ValueError(f"draw_pose: expected keypoints of shape (18, 3), got {kps.shape}")
    canvas = np.zeros((height, width, 3), np.uint8)
    ok = kps[:, 2] >= min_confidence
    stick = stroke_width(height, width)
    for i, (a, b) in enumerate(LIMBS):
        if not (ok[a] and ok[b]):
            continue
        (xa, ya), (xb, yb) = kps[a, :2], kps[b, :2]
        length = math.hypot(xa - xb, ya - yb)
        angle = math.degrees(math.atan2(ya - yb, xa - xb))
        centre = (int(round((xa + xb) / 2)), int(round((ya + yb) / 2)))
        polygon = cv2.ellipse2Poly(centre, (int(length / 2), stick), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, limb_color(i))
    for j in range(18):
        if ok[j]:
            cv2.circle(canvas, (int(round(kps[j, 0])), int(round(kps[j, 1]))), stick, COLORS[j], thickness=-1)
    return canvas


def draw_poses(keypoints: np.ndarray, height: int, width: int, min_confidence: float = 0.3) -> np.ndarray:
    """``[F, 18, 3]`` -> ``[F, H, W, 3]``."""
    return np.stack([draw_pose(k, height, width, min_confidence) for k in keypoints])
