"""Identity photos as 1-frame examples (faceid.train.photos): geometry at the clips' pixel budget,
person-aware crops of real photos, their own poses drawn as prepare-pose draws them, mirrored
views with left/right swapped, cut-off bodies drawn only where visible."""

from __future__ import annotations

import io

import numpy as np
import pytest

from faceid.train import photos as ph

BUDGET = 480 * 832


@pytest.fixture(scope="module")
def real():
    """Real photos of one person with their main face box, dlib landmarks and mediapipe pose."""
    from PIL import Image

    from faceid.faces.detect import Aligner, build_detector, select_main_face
    from faceid.pose.estimate import MediapipePoseEstimator
    from faceid.sample_data import extract_archive_photos
    from conftest import ARCHIVE

    data = extract_archive_photos(ARCHIVE)
    det, aligner, est = build_detector("mediapipe", 0.5), Aligner(), MediapipePoseEstimator()
    out = {}
    try:
        for name in ("obama.jpg", "obama3.jpg"):
            image = np.asarray(Image.open(io.BytesIO(data[name])).convert("RGB"))
            faces = det.detect(image)
            face = faces[select_main_face(faces, *image.shape[:2])]
            landmarks = aligner.align(image, face, (150,), 0.25).landmarks
            kps, source = ph.estimate_photo_pose(est, image, landmarks)
            out[name] = dict(image=image, box=face.box, landmarks=landmarks, kps=kps, source=source)
        out["estimator"] = est
        yield out
    finally:
        det.close()


@pytest.mark.parametrize("aspect", [0.3, 9 / 16, 0.75, 1.0, 1.4, 3.0])
@pytest.mark.parametrize("budget", [64 * 64, 32 * 32, 480 * 832])
def test_example_size_stays_in_budget_on_the_16px_grid(aspect, budget):
    h, w = ph.example_size(aspect, budget)
    assert h % 16 == 0 and w % 16 == 0 and h * w <= budget
    clamped = min(max(aspect, 9 / 16), 16 / 9)
    # the grid is coarse for tiny budgets; at the real budget the aspect is close
    if budget == 480 * 832:
        assert abs(w / h - clamped) / clamped < 0.06 and h * w > 0.93 * budget


def test_square_budget_gives_square_and_portrait_examples():
    assert ph.example_size(1.0, 64 * 64) == (64, 64)
    assert ph.example_size(0.6, 64 * 64) == (80, 48)  # portrait head-and-shoulders, not forced square


def test_real_photo_view_is_person_aware_and_posed_like_prepare_pose(real):
    from faceid.pose.draw import draw_poses
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE

    r = real["obama.jpg"]  # head and upper body, hands crossed, hips out of the picture
    assert r["source"] == "pose-estimator"
    ex = ph.make_example(r["image"], r["box"], r["kps"], BUDGET, ph.View(0), DRAW_MIN_CONFIDENCE)
    _, h, w, _ = ex.target.shape
    assert h * w <= BUDGET and h % 16 == 0 and w % 16 == 0 and h > w  # portrait, like the photo's person
    x0, y0, x1, y1 = ex.face_box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert (x1 - x0) * (y1 - y0) > 0.05 * h * w  # the face is a large part of a head-and-shoulders example
    # the control is that photo's pose drawn exactly as prepare-pose draws clips
    assert np.array_equal(ex.pose, draw_poses(ex.keypoints[None], h, w, DRAW_MIN_CONFIDENCE))
    assert ex.pose.any()
    # joints outside the picture (hips, knees, ankles of a cut-off body) are not drawn
    assert all(ex.keypoints[j, 2] == 0 for j in (9, 10, 12, 13))
    assert ex.keypoints[0, 2] > 0 and ex.keypoints[2, 2] > 0 and ex.keypoints[5, 2] > 0  # nose and shoulders are


def test_standing_photo_keeps_the_body(real):
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE

    r = real["obama3.jpg"]  # standing, the photo ends below the knees
    ex = ph.make_example(r["image"], r["box"], r["kps"], BUDGET, ph.View(0), DRAW_MIN_CONFIDENCE)
    assert ex.keypoints[9, 2] > 0 and ex.keypoints[12, 2] > 0  # both knees are in the crop
    assert ex.keypoints[10, 2] == 0 and ex.keypoints[13, 2] == 0  # the ankles (below the picture) are not
    face_h = ex.face_box[3] - ex.face_box[1]
    assert face_h < 0.25 * ex.target.shape[1]  # the head is small in a full-body example


def test_mirrored_view_mirrors_pixels_and_swaps_sides(real):
    from faceid.pose.draw import draw_poses
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE

    r = real["obama.jpg"]
    plain = ph.make_example(r["image"], r["box"], r["kps"], BUDGET, ph.View(0), DRAW_MIN_CONFIDENCE)
    flipped = ph.make_example(r["image"], r["box"], r["kps"], BUDGET, ph.View(0, flip=True), DRAW_MIN_CONFIDENCE)
    w = plain.target.shape[2]
    assert np.array_equal(flipped.target, plain.target[:, :, ::-1])
    # the right shoulder (joint 2) of the mirrored person is where the left one (5) was, mirrored
    assert flipped.keypoints[2, 0] == pytest.approx(w - plain.keypoints[5, 0], abs=1e-3)
    # OpenPose colours encode the side: the mirrored drawing is NOT the mirrored image of the drawing
    assert not np.array_equal(flipped.pose, plain.pose[:, :, ::-1])
    assert np.array_equal(flipped.pose, draw_poses(flipped.keypoints[None], *plain.pose.shape[1:3], DRAW_MIN_CONFIDENCE))
    assert flipped.face_box[0] == pytest.approx(w - plain.face_box[2], abs=1e-3)


def test_views_are_seeded_per_photo():
    cfg = type("Photos", (), dict(views=4, flip=True, scale_jitter=0.1, shift_jitter=0.05))()
    a, b = ph.views_for("aaa", cfg), ph.views_for("aaa", cfg)
    assert a == b and a[0] == ph.View(0) and [v.flip for v in a] == [False, True, False, True]
    assert all(0.9 <= v.zoom <= 1.1 and abs(v.shift_x) <= 0.05 for v in a)
    assert ph.views_for("bbb", cfg) != a


def test_no_person_found_falls_back_to_the_face_landmarks(real):
    # a real estimator on an image without a person: the head is drawn from dlib's landmarks
    r = real["obama.jpg"]
    blank = np.full_like(r["image"], 90)
    kps, source = ph.estimate_photo_pose(real["estimator"], blank, r["landmarks"])
    assert source == "face-landmarks"
    assert kps[0, 2] == 1 and kps[14, 2] == 1 and kps[15, 2] == 1 and kps[[1, 2, 5], 2].sum() == 0
    # the person's right eye (OpenPose 14) is on the image's left, as mediapipe puts it
    assert kps[14, 0] < kps[15, 0]
    assert (kps[14, 0] < kps[15, 0]) == (r["kps"][14, 0] < r["kps"][15, 0])
