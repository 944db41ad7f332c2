"""Identity photos as 1-frame training examples: the person's own pixels are the target.

Every accepted photo (``faceid.faces.crop.read_photos``) becomes ``train_lora.photos.views``
one-frame examples at the clips' pixel budget (H x W <= the clips' H x W, sides multiples of 16):

- **target**: a person-aware crop of the photo: the head (face box grown to take in hair and
  chin) and as much of the body as the photo shows (confident body keypoints inside the photo),
  padded a little; the aspect follows that region, clamped to [9:16, 16:9] (a head-and-shoulders
  photo is square or portrait, a full-body photo portrait), never forced into the clips' aspect.
- **control**: that photo's own pose, estimated on the photo (``prepare_pose.estimator``, as
  prepare-pose does for clips), moved into the crop and drawn exactly as prepare-pose draws it
  (``faceid.pose.draw.draw_poses``); joints outside the crop are dropped, so a cut-off body shows
  only its visible parts. No person found -> the head drawn from the photo's face landmarks.
- **face box** in the crop (for ``train_lora.face_loss_weight``).

View 0 is the photo as is; views 1.. are augmented with seeded, per-photo randomness: a zoom of
the crop window by up to +-``scale_jitter``, a shift by up to +-``shift_jitter`` of its size, and
(``flip``) every odd view mirrored, its pose redrawn with left and right swapped (OpenPose colours
encode the side).

**Small-face views** (``small_face_views``; :func:`make_small_face_example`): a person-aware crop of a
head-and-shoulders photo puts the face at 250-350 px, while a full-body dance clip shows it at 40-60
px. A small-face view is framed like a clip (the clips' H x W) with the face box ``face_px`` tall and
centred where the clips' faces are (``face_cx``, ``face_cy``: shares of the width and height): the
photo is downscaled (area filter) and placed there, its own pixels wherever the photo reaches, a flat
fill of the photo's mean colour elsewhere. The fill is no person's pixels, so it is left out of the
loss (``PhotoExample.valid``: the box of real pixels); the pose shows the joints the photo holds.
A view never upscales: ``face_px`` is at most the photo's own face height.
Pure functions except :func:`estimate_photo_pose` (runs the estimator).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from faceid.model.shapes import SIZE_MULTIPLE

ASPECT_RANGE = (9 / 16, 16 / 9)  # width / height of a photo example
# OpenPose-18 left/right pairs (faceid.pose.estimate): swapped when an image is mirrored.
MIRROR_PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))
HEAD_GROW = (0.4, 0.6, 0.4, 0.4)  # face box grown by these shares of its size: left, top, right, bottom
REGION_PAD = 0.08
VERSION = 2  # bump when the examples change meaning (part of the latent-cache key); 2: small-face views, face height


@dataclass(frozen=True)
class View:
    """How view ``index`` of a photo is cut: window zoom and shift (shares of the window), mirror."""

    index: int
    zoom: float = 1.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    flip: bool = False
    face_px: float = 0.0  # > 0: a small-face view, face box this tall in a clip-sized frame
    face_cx: float = 0.5  # small-face view: face centre, share of the frame's width
    face_cy: float = 0.5  # ... and of its height

    def key(self) -> list:
        key = [self.index, round(self.zoom, 6), round(self.shift_x, 6), round(self.shift_y, 6), self.flip]
        if self.face_px:
            key += [round(self.face_px, 3), round(self.face_cx, 4), round(self.face_cy, 4)]
        return key


@dataclass(frozen=True)
class PhotoExample:
    target: np.ndarray  # [1, H, W, 3] uint8
    pose: np.ndarray  # [1, H, W, 3] uint8, drawn skeleton
    face_box: tuple[float, float, float, float]  # x0, y0, x1, y1 in example pixels
    keypoints: np.ndarray  # [18, 3] in example pixels
    valid: tuple[float, float, float, float] | None = None  # box of the photo's own pixels; None = all of it


def read_rgb(path) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB; unreadable -> an InputError naming it."""
    from PIL import Image

    from faceid.errors import InputError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"{path}: unreadable image ({exc}); rerun crop-faces") from None


def views_for(photo_sha256: str, cfg) -> list[View]:
    """``cfg.views`` views of one photo (``cfg`` = ``train_lora.photos``); seeded by the photo's hash,
    so the same photo always gets the same views (and cache keys)."""
    views = [View(0)]
    for k in range(1, cfg.views):
        seed = int(hashlib.sha256(f"{photo_sha256}:{k}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng(seed)
        zoom = 1.0 + float(rng.uniform(-cfg.scale_jitter, cfg.scale_jitter))
        sx, sy = (float(v) for v in rng.uniform(-cfg.shift_jitter, cfg.shift_jitter, size=2))
        views.append(View(k, zoom, sx, sy, flip=bool(cfg.flip and k % 2 == 1)))
    return views


def small_face_views(first_index: int, face_heights: list[float], centre: tuple[float, float], photo_face_px: float,
                     flip: bool) -> list[View]:
    """Small-face views of one photo, indices ``first_index..``: one per target face height (capped at
    the photo's own face height ``photo_face_px``: never upscaled), the face at ``centre`` (shares of
    the frame); with ``flip`` the odd indices mirrored, as the augmented views."""
    return [View(first_index + k, flip=bool(flip and (first_index + k) % 2 == 1), face_px=float(min(px, photo_face_px)),
                 face_cx=float(centre[0]), face_cy=float(centre[1])) for k, px in enumerate(face_heights)]


def face_height(face_box) -> float:
    """Face size in pixels: the height of a face box ``(x0, y0, x1, y1)``."""
    return float(face_box[3] - face_box[1])


def example_size(aspect: float, budget: int) -> tuple[int, int]:
    """``(H, W)``, multiples of 16, ``H * W <= budget``, ``W / H`` as close to ``aspect`` (clamped to
    :data:`ASPECT_RANGE`) as the grid allows."""
    m = SIZE_MULTIPLE
    if budget < m * m:
        raise ValueError(f"pixel budget {budget} is below one {m}x{m} tile")
    a = min(max(aspect, ASPECT_RANGE[0]), ASPECT_RANGE[1])
    h = max(m, int(math.sqrt(budget / a)) // m * m)
    w = max(m, int(math.sqrt(budget * a)) // m * m)
    while h * w > budget:  # both floored to >= m can overshoot a tiny budget
        if h >= w:
            h -= m
        else:
            w -= m
    while True:  # grow the side that keeps the aspect closest while the budget allows
        options = [(abs(math.log(w / (h + m) / a)), h + m, w), (abs(math.log((w + m) / h / a)), h, w + m)]
        options = [o for o in options if o[1] * o[2] <= budget]
        if not options:
            return h, w
        _, h, w = min(options)


def person_region(face_box, keypoints: np.ndarray | None, height: int, width: int,
                  min_confidence: float = 0.3) -> tuple[float, float, float, float]:
    """Box ``(x0, y0, x1, y1)`` around the head (face box grown by :data:`HEAD_GROW`) and the
    confident body keypoints inside the photo, padded by :data:`REGION_PAD`, within the photo."""
    x0, y0, x1, y1 = (float(v) for v in face_box)
    fs = max(x1 - x0, y1 - y0)
    gl, gt, gr, gb = HEAD_GROW
    pts = [(x0 - gl * fs, y0 - gt * fs), (x1 + gr * fs, y1 + gb * fs)]
    if keypoints is not None:
        kps = np.asarray(keypoints, np.float32)
        inside = (kps[:, 2] >= min_confidence) & (kps[:, 0] >= 0) & (kps[:, 0] < width) & (kps[:, 1] >= 0) & (kps[:, 1] < height)
        pts += [tuple(p) for p in kps[inside, :2]]
    arr = np.asarray(pts, np.float64)
    lo, hi = arr.min(0), arr.max(0)
    pad = REGION_PAD * (hi - lo)
    lo, hi = lo - pad, hi + pad
    return (max(0.0, lo[0]), max(0.0, lo[1]), min(float(width), hi[0]), min(float(height), hi[1]))


def crop_window(region, face_box, aspect: float, height: int, width: int, view: View) -> tuple[int, int, int, int]:
    """Window ``(x0, y0, w, h)`` (ints, inside the photo) of aspect ``aspect`` around ``region``,
    zoomed/shifted by ``view``; shrunk to fit the photo, then moved to keep the face box in it."""
    rx0, ry0, rx1, ry1 = region
    rw, rh = max(rx1 - rx0, 1.0), max(ry1 - ry0, 1.0)
    w, h = (rh * aspect, rh) if rw / rh < aspect else (rw, rw / aspect)
    w, h = w * view.zoom, h * view.zoom
    fit = min(1.0, width / w, height / h)
    w, h = w * fit, h * fit
    cx = (rx0 + rx1) / 2 + view.shift_x * w
    cy = (ry0 + ry1) / 2 + view.shift_y * h
    x0 = min(max(cx - w / 2, 0.0), width - w)
    y0 = min(max(cy - h / 2, 0.0), height - h)
    fx0, fy0, fx1, fy1 = face_box
    for lo, hi, pos, size, limit in ((fx0, fx1, "x", w, width), (fy0, fy1, "y", h, height)):
        start = x0 if pos == "x" else y0
        if lo < start:
            start = max(0.0, lo)
        elif hi > start + size:
            start = min(limit - size, hi - size)
        if pos == "x":
            x0 = start
        else:
            y0 = start
    iw, ih = max(1, int(round(w))), max(1, int(round(h)))
    ix0 = int(round(min(max(x0, 0), width - iw)))
    iy0 = int(round(min(max(y0, 0), height - ih)))
    return ix0, iy0, iw, ih


def mirror_keypoints(kps: np.ndarray, width: int) -> np.ndarray:
    """Keypoints ``[..., 18, 3]`` of an image mirrored left-right: x -> width - x, and each
    left/right joint pair swapped (the mirrored person's right arm was the left one)."""
    out = np.array(kps, np.float32, copy=True)
    present = out[..., 2] > 0
    out[..., 0] = np.where(present, width - out[..., 0], 0.0)
    for a, b in MIRROR_PAIRS:
        out[..., [a, b], :] = out[..., [b, a], :]
    return out


def landmark_keypoints(landmarks: np.ndarray) -> np.ndarray:
    """OpenPose-18 keypoints ``[18, 3]`` of the head only, from dlib's 5 face points, for a photo
    where no body was found. dlib's points 0-1 are the corners of the eye on the image's right,
    i.e. the person's LEFT eye (OpenPose 15); 2-3 the person's right eye (14); 4 the nose base."""
    lm = np.asarray(landmarks, np.float32).reshape(5, 2)
    kps = np.zeros((18, 3), np.float32)
    kps[0, :2], kps[14, :2], kps[15, :2] = lm[4], lm[2:4].mean(0), lm[0:2].mean(0)
    kps[[0, 14, 15], 2] = 1.0
    return kps


def make_example(photo: np.ndarray, face_box, keypoints: np.ndarray, budget: int, view: View,
                 min_confidence: float) -> PhotoExample:
    """One view of one photo (``photo`` [H, W, 3] uint8 RGB; ``face_box`` and ``keypoints`` [18, 3]
    in photo pixels) as a 1-frame example of at most ``budget`` pixels."""
    from faceid.pose.draw import draw_poses
    from faceid.pose.prepare import apply_crop, transform_keypoints

    height, width = photo.shape[:2]
    region = person_region(face_box, keypoints, height, width, min_confidence)
    out_h, out_w = example_size((region[2] - region[0]) / max(region[3] - region[1], 1.0), budget)
    box = crop_window(region, face_box, out_w / out_h, height, width, view)
    target = apply_crop(photo[None], box, out_h, out_w)
    kps = transform_keypoints(np.asarray(keypoints, np.float32)[None], box, out_h, out_w)
    x0, y0, bw, bh = box
    sx, sy = out_w / bw, out_h / bh
    fb = ((face_box[0] - x0) * sx, (face_box[1] - y0) * sy, (face_box[2] - x0) * sx, (face_box[3] - y0) * sy)
    if view.flip:
        target = np.ascontiguousarray(target[:, :, ::-1])
        kps = mirror_keypoints(kps, out_w)
        fb = (out_w - fb[2], fb[1], out_w - fb[0], fb[3])
    fb = (max(0.0, fb[0]), max(0.0, fb[1]), min(float(out_w), fb[2]), min(float(out_h), fb[3]))
    pose = draw_poses(kps, out_h, out_w, min_confidence)
    return PhotoExample(target=target, pose=pose, face_box=fb, keypoints=kps[0])


def view_face_height(photo_hw: tuple[int, int], face_box, keypoints: np.ndarray, budget: int, view: View,
                     min_confidence: float) -> float:
    """Face height in pixels of ``view`` of a photo (``photo_hw`` its H, W), as :func:`make_example` or
    :func:`make_small_face_example` cuts it, without touching pixels (the plan measures views with it)."""
    if view.face_px:
        return float(view.face_px)
    height, width = photo_hw
    region = person_region(face_box, keypoints, height, width, min_confidence)
    out_h, out_w = example_size((region[2] - region[0]) / max(region[3] - region[1], 1.0), budget)
    x0, y0, bw, bh = crop_window(region, face_box, out_w / out_h, height, width, view)
    top, bottom = max(float(face_box[1]), y0), min(float(face_box[3]), y0 + bh)
    return max(0.0, bottom - top) * out_h / bh


def make_small_face_example(photo: np.ndarray, face_box, keypoints: np.ndarray, size: tuple[int, int], view: View,
                            min_confidence: float) -> PhotoExample:
    """A small-face view (``view.face_px`` > 0) of a photo as a 1-frame example of ``size`` = (H, W),
    the clips' size: see the module doc. ``valid`` is the box the photo's pixels cover."""
    import cv2

    from faceid.pose.draw import draw_poses

    out_h, out_w = size
    height, width = photo.shape[:2]
    fx0, fy0, fx1, fy1 = (float(v) for v in face_box)
    s = view.face_px / max(fy1 - fy0, 1.0)  # example pixels per photo pixel (<= 1: never upscaled)
    cx = 1.0 - view.face_cx if view.flip else view.face_cx  # mirrored below: the face ends at face_cx
    ox = cx * out_w - (fx0 + fx1) / 2 * s  # where the photo's origin lands
    oy = view.face_cy * out_h - (fy0 + fy1) / 2 * s
    sw, sh = max(1, int(round(width * s))), max(1, int(round(height * s)))
    small = cv2.resize(photo, (sw, sh), interpolation=cv2.INTER_AREA)
    fill = np.round(photo.reshape(-1, 3).mean(0)).astype(np.uint8)
    target = np.empty((out_h, out_w, 3), np.uint8)
    target[:] = fill
    ix, iy = int(round(ox)), int(round(oy))
    x0, y0, x1, y1 = max(0, ix), max(0, iy), min(out_w, ix + sw), min(out_h, iy + sh)
    if x1 > x0 and y1 > y0:
        target[y0:y1, x0:x1] = small[y0 - iy : y1 - iy, x0 - ix : x1 - ix]
    kps = np.array(keypoints, np.float32, copy=True)[None]
    kps[..., 0], kps[..., 1] = kps[..., 0] * s + ix, kps[..., 1] * s + iy
    inside = (kps[..., 0] >= 0) & (kps[..., 0] < out_w) & (kps[..., 1] >= 0) & (kps[..., 1] < out_h)
    kps[~inside | (kps[..., 2] <= 0)] = 0.0
    fb = (fx0 * s + ix, fy0 * s + iy, fx1 * s + ix, fy1 * s + iy)
    valid = (float(x0), float(y0), float(x1), float(y1))
    target = target[None]
    if view.flip:
        target = np.ascontiguousarray(target[:, :, ::-1])
        kps = mirror_keypoints(kps, out_w)
        fb = (out_w - fb[2], fb[1], out_w - fb[0], fb[3])
        valid = (out_w - valid[2], valid[1], out_w - valid[0], valid[3])
    fb = (max(0.0, fb[0]), max(0.0, fb[1]), min(float(out_w), fb[2]), min(float(out_h), fb[3]))
    pose = draw_poses(kps, out_h, out_w, min_confidence)
    return PhotoExample(target=target, pose=pose, face_box=fb, keypoints=kps[0], valid=valid)


def estimate_photo_pose(estimator, photo: np.ndarray, landmarks: np.ndarray, max_side: int = 1280) -> tuple[np.ndarray, str]:
    """``(keypoints [18, 3] in photo pixels, source)``: the pose estimator on the photo (downscaled
    to ``max_side`` for speed, as prepare-pose analyses frames), or, when it finds no person, the
    head from the face landmarks (source ``face-landmarks``)."""
    import cv2

    h, w = photo.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    small = photo if scale == 1.0 else cv2.resize(photo, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    kps = np.asarray(estimator.estimate(small[None]), np.float32)[0]
    if not (kps[:, 2] > 0).any():
        return landmark_keypoints(landmarks), "face-landmarks"
    kps[:, :2] /= scale
    return kps, "pose-estimator"
