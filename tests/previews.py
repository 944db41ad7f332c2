"""Checks of a preview video written by faceid.preview.write_preview, read back from the file
(render-validation's side_by_side/<clip>.mp4, training's validation/step_N/<clip>_side_by_side.mp4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def check_preview(video: Path, sheet: Path, renders: dict[str, np.ndarray], margin: float = 6.0) -> int:
    """``renders``: panel name -> the frames it shows (in order; read back from their own H.264
    files, hence ``margin``). Asserts the preview's long side >= 512, an integer nearest-neighbour
    factor whose blocks average back to each render, a label at each panel's top-left, and the contact
    sheet beside the video (one row per panel, at the preview's scale). Returns the factor."""
    from faceid.pose.video import read_video
    from faceid.preview import LABELS, MIN_SIDE, label_box, scale_frames

    frames = read_video(video)[0].astype(int)
    n, (h, w) = len(renders), next(iter(renders.values())).shape[1:3]
    assert max(frames.shape[1:3]) >= MIN_SIDE, frames.shape
    k = frames.shape[1] // h
    assert k >= 2 and frames.shape[1:3] == (k * h, n * k * w), (frames.shape, k)
    for i, (name, render) in enumerate(renders.items()):
        panel = frames[:, :, i * k * w: (i + 1) * k * w]
        render = render[: len(panel)].astype(int)
        # nearest neighbour: each k x k block is one render pixel (H.264 of both: compare with a margin)
        x0, y0, x1, y1 = label_box(k * w, LABELS[name])
        below = panel[:, y1 + (-y1) % k:]  # the rows under the label, whole blocks
        blocks = below.reshape(len(panel), -1, k, w, k, 3).mean(axis=(2, 4))
        assert np.abs(blocks - render[:, (y1 + (-y1) % k) // k:]).mean() < margin, name
        # the label: its box differs from the enlarged render there
        plain = scale_frames(render.astype(np.uint8), k).astype(int)
        assert np.abs(panel[:, y0:y1, x0:x1] - plain[:, y0:y1, x0:x1]).mean() > 20, name
    assert sheet.parent == video.parent and sheet.is_file(), (sheet, video)  # beside the video
    image = np.asarray(Image.open(sheet))
    assert image.shape[0] > n * k * h and image.shape[0] < n * (k * h + 10), image.shape  # n rows of k*h, small gaps
    return k
