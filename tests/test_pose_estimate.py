"""Keypoints of a real person (mediapipe, offline), COCO-18 mapping, ControlNet drawing, PCK metric."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_pose_video import person_frames

from faceid.errors import ConfigError, InputError
from faceid.pose.draw import COLORS, LIMBS, draw_pose, limb_color
from faceid.pose.estimate import (
    COCO17_TO_OPENPOSE,
    MEDIAPIPE_TO_OPENPOSE,
    build_estimator,
    decode_simcc,
    to_openpose18,
)
from faceid.pose.metrics import pose_fidelity

# A standing person in a 256x192 frame, OpenPose-18 order.
SKELETON = np.array(
    [[96, 40], [96, 70], [70, 70], [60, 110], [55, 150], [122, 70], [132, 110], [137, 150], [80, 140],
     [78, 190], [76, 240], [112, 140], [114, 190], [116, 240], [90, 34], [102, 34], [82, 38], [110, 38]],
    np.float32,
)  # fmt: skip
KPS = np.concatenate([SKELETON, np.ones((18, 1), np.float32)], axis=1)


@pytest.fixture(scope="module")
def real_keypoints(params):
    boxes: list = []
    frames = person_frames(num_frames=24, boxes=boxes)
    with build_estimator(params.prepare_pose) as estimator:
        return frames, estimator.estimate(frames), np.array(boxes)


def test_mediapipe_finds_the_real_person_in_most_frames(real_keypoints):
    frames, kps, boxes = real_keypoints
    assert kps.shape == (len(frames), 18, 3) and kps.dtype == np.float32
    detected = (kps[..., 2] > 0).any(axis=1)
    assert detected.mean() >= 0.8
    h, w = frames.shape[1:3]
    for kp in kps[detected]:
        # head above shoulders above hips; upper body inside the frame
        assert kp[0, 1] < kp[1, 1] < (kp[8, 1] + kp[11, 1]) / 2
        upper = kp[[0, 1, 2, 5]]
        assert (upper[:, 0] >= 0).all() and (upper[:, 0] < w).all() and (upper[:, 1] >= 0).all()
        np.testing.assert_allclose(kp[1, :2], (kp[2, :2] + kp[5, :2]) / 2, atol=1e-3)  # neck
        assert kp[2, 0] < kp[5, 0]  # facing the camera: right shoulder on the image's left
    # the skeleton follows the pasted photo: neck within the photo's box, x tracking its centre
    x0, y0, pw, ph = boxes[detected].T
    neck = kps[detected, 1, :2]
    assert ((neck[:, 0] > x0) & (neck[:, 0] < x0 + pw) & (neck[:, 1] > y0) & (neck[:, 1] < y0 + ph)).all()
    assert np.corrcoef(neck[:, 0], x0 + pw / 2)[0, 1] > 0.9
    assert neck[-1, 0] > neck[0, 0] + 20


def test_layout_tables_map_the_same_joints():
    # mediapipe: 11/12 shoulders, 23/24 hips; COCO-17: 5/6 shoulders, 11/12 hips (left first)
    assert MEDIAPIPE_TO_OPENPOSE[2] == 12 and MEDIAPIPE_TO_OPENPOSE[5] == 11
    assert COCO17_TO_OPENPOSE[2] == 6 and COCO17_TO_OPENPOSE[5] == 5
    points = np.zeros((1, 17, 3), np.float32)
    points[0, :, 0] = np.arange(17)
    points[0, :, 2] = 1
    points[0, 6, 2] = 0.4
    out = to_openpose18(points, COCO17_TO_OPENPOSE)
    assert out[0, [0, 2, 5, 8, 11, 14, 15, 16, 17], 0].tolist() == [0, 6, 5, 12, 11, 2, 1, 4, 3]
    assert out[0, 1, 0] == pytest.approx(5.5) and out[0, 1, 2] == pytest.approx(0.4)


def test_drawn_limbs_land_on_the_keypoints():
    canvas = draw_pose(KPS, 256, 192)
    assert canvas.shape == (256, 192, 3) and canvas.dtype == np.uint8
    limb_colors = {limb_color(j) for j in range(len(LIMBS))}
    for i, (a, b) in enumerate(LIMBS):
        if np.linalg.norm(SKELETON[a] - SKELETON[b]) < 20:
            continue  # face limbs are shorter than the joint dots drawn over them
        # sample along the limb away from its ends (joints are drawn on top there)
        for t in (0.3, 0.5, 0.7):
            x, y = ((1 - t) * SKELETON[a] + t * SKELETON[b]).round().astype(int)
            assert tuple(canvas[y, x]) in limb_colors, (i, t, canvas[y, x])
        x, y = ((SKELETON[a] + SKELETON[b]) / 2).round().astype(int)
        assert tuple(canvas[y, x]) == limb_color(i), i
    for j in range(18):
        x, y = SKELETON[j].round().astype(int)
        assert tuple(canvas[y, x]) == COLORS[j]
    # nothing drawn far from the skeleton
    assert canvas[:20].max() == 0 and canvas[:, :40].max() == 0 and canvas[250:].max() == 0


def test_low_confidence_joints_are_not_drawn():
    kps = KPS.copy()
    kps[4, 2] = 0.1  # right wrist
    canvas = draw_pose(kps, 256, 192)
    x, y = ((SKELETON[3] + SKELETON[4]) / 2).round().astype(int)
    assert canvas[y, x].max() == 0
    assert draw_pose(np.zeros((18, 3)), 64, 64).max() == 0
    with pytest.raises(ValueError, match="18, 3"):
        draw_pose(np.zeros((17, 3)), 64, 64)


def test_real_skeleton_drawing_matches_its_keypoints(real_keypoints):
    frames, kps, boxes = real_keypoints
    h, w = frames.shape[1:3]
    f = int(np.argmax((kps[..., 2] > 0.5).sum(1)))
    canvas = draw_pose(kps[f], h, w)
    for i, (a, b) in enumerate(LIMBS):
        if kps[f, a, 2] >= 0.3 and kps[f, b, 2] >= 0.3:
            x, y = ((kps[f, a, :2] + kps[f, b, :2]) / 2).round().astype(int)
            if 0 <= x < w and 0 <= y < h:
                assert canvas[y, x].max() > 0, f"limb {i} not drawn at its keypoints"


def test_pose_fidelity():
    ref = np.repeat(KPS[None], 4, axis=0)
    same = pose_fidelity(ref, ref)
    assert same == {"pck": 1.0, "mean_error": 0.0, "frames_compared": 4, "detection_rate": 1.0}
    size = float((SKELETON.max(0) - SKELETON.min(0)).max())
    shifted = ref.copy()
    shifted[..., 0] += 0.2 * size
    result = pose_fidelity(shifted, ref)
    assert result["pck"] == 0.0 and result["mean_error"] == pytest.approx(0.2, abs=1e-4)
    half = ref.copy()
    half[2:] = 0  # prediction lost the person in half the frames
    result = pose_fidelity(half, ref, threshold=0.05)
    assert result["pck"] == pytest.approx(0.5) and result["detection_rate"] == pytest.approx(0.5)
    assert pose_fidelity(ref[:3], ref)["frames_compared"] == 3


def test_decode_simcc():
    simcc_x = np.zeros((2, 384))
    simcc_y = np.zeros((2, 512))
    simcc_x[0, 100], simcc_y[0, 300] = 0.9, 0.8
    simcc_x[1, 10], simcc_y[1, 20] = 0.2, 0.7
    out = decode_simcc(simcc_x, simcc_y, input_w=192, input_h=256)
    np.testing.assert_allclose(out, [[50, 150, 0.8], [5, 10, 0.2]], atol=1e-6)


def test_onnx_estimator_needs_a_model_file(params, tmp_path):
    cfg = dataclasses.replace(params.prepare_pose, estimator="onnx", onnx_path="")
    with pytest.raises(ConfigError, match="onnx_path"):
        build_estimator(cfg)
    with pytest.raises(InputError, match="not found"):
        build_estimator(dataclasses.replace(cfg, onnx_path=str(tmp_path / "dwpose.onnx")))
