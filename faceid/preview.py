"""Preview videos and contact sheets a person can watch in the MLflow UI (pure images).

The renders stay as they are (the per-arm videos, and every metric, use the original frames); only
the previews are composed here: the panels side by side (pose | base | reference-only | identity),
each labelled in the frame, at a watchable size:

- a tiny model's renders (64x64) are enlarged by an integer factor with nearest-neighbour, so every
  render pixel becomes a ``k x k`` block of the same colour (nothing is invented; downsampling by
  ``k`` gives the render back): each panel at least :data:`MIN_PANEL` px and the frame at least
  :data:`MIN_SIDE` px on its long side;
- real-size renders (e.g. four 832-wide panels) are reduced (area average) to at most
  :data:`MAX_SIDE` px on the long side; the rest are kept at their size.

The label is drawn after scaling (crisp text) in a dark box at the panel's top-left corner
(:func:`label_box`), with OpenCV's built-in Hershey font (no font file). Same frames, same bytes.
"""

from __future__ import annotations

import math

import numpy as np

MIN_SIDE = 512  # the preview frame's long side is at least this
MIN_PANEL = 256  # and each panel's long side (tiny renders are enlarged by an integer factor)
MAX_SIDE = 1920  # larger previews are reduced to this (the per-arm videos keep their size)
SHEET_FRAMES = 8  # frames per contact-sheet row
SHEET_GAP = 4  # px between contact-sheet cells (after scaling)
LABELS = {"pose": "pose", "base": "base", "reference_only": "reference-only", "zero_shot": "zero-shot",
          "identity": "identity"}


def preview_scale(height: int, width: int, num_panels: int) -> int | float:
    """The factor the panels of a preview are scaled by: an integer >= 1 for small panels (nearest
    neighbour), a fraction < 1 when the side-by-side frame would be wider/taller than :data:`MAX_SIDE`."""
    long_frame = max(height, width * num_panels)
    if long_frame > MAX_SIDE:
        return MAX_SIDE / long_frame
    return max(1, math.ceil(MIN_PANEL / max(height, width)), math.ceil(MIN_SIDE / long_frame))


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def scale_frames(frames: np.ndarray, factor: int | float) -> np.ndarray:
    """``[F, H, W, 3]`` scaled by ``factor``: an integer factor by pixel repetition (exact nearest
    neighbour), a fraction by OpenCV's area average to even sizes (H.264 yuv420p)."""
    import cv2

    frames = np.asarray(frames)
    if factor >= 1:
        k = int(factor)
        if k != factor:
            raise ValueError(f"an enlarging preview factor must be an integer, got {factor}")
        return frames if k == 1 else frames.repeat(k, axis=1).repeat(k, axis=2)
    height, width = _even(frames.shape[1] * factor), _even(frames.shape[2] * factor)
    return np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])


def _font(width: int) -> tuple[float, int]:
    scale = min(max(width / 320, 0.4), 1.5)  # "reference-only" (~260 px at 1.0) fits a 256-px panel at 0.8
    return scale, 1 if scale < 0.7 else 2


def label_box(width: int, text: str) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` of the label's dark box in a panel ``width`` px wide (clipped to it)."""
    import cv2

    scale, thick = _font(width)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    pad = max(2, int(round(4 * scale)))
    return 0, 0, min(width, tw + 2 * pad), th + base + 2 * pad


def label_frames(frames: np.ndarray, text: str) -> np.ndarray:
    """A copy of ``frames`` with ``text`` in white on a dark box at the top-left corner."""
    import cv2

    out = np.ascontiguousarray(frames).copy()
    scale, thick = _font(out.shape[2])
    x0, y0, x1, y1 = label_box(out.shape[2], text)
    pad = max(2, int(round(4 * scale)))
    (_, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    for frame in out:
        frame[y0:y1, x0:x1] = (16, 16, 16)
        cv2.putText(frame, text, (x0 + pad, y0 + pad + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick,
                    cv2.LINE_AA)
    return out


def preview_panels(panels: dict[str, np.ndarray], labels: bool = True, columns: int = 0) -> tuple[list[np.ndarray], int | float]:
    """Each panel (``name -> [F, H, W, 3]``, in order, the same H x W) cut to the shortest, scaled by
    :func:`preview_scale` (for ``columns`` panels in a row; 0 = as many as there are panels) and
    labelled (``LABELS[name]``, or the name); returns them and the factor."""
    videos = [np.asarray(v) for v in panels.values()]
    sizes = {v.shape[1:] for v in videos}
    if len(sizes) != 1:
        raise ValueError(f"preview panels differ in size: {sorted(sizes)}")
    length = min(len(v) for v in videos)
    height, width = videos[0].shape[1:3]
    factor = preview_scale(height, width, columns or len(videos))
    scaled = [scale_frames(v[:length], factor) for v in videos]
    if labels:
        scaled = [label_frames(v, LABELS.get(name, name)) for name, v in zip(panels, scaled)]
    return scaled, factor


def preview_video(panels: dict[str, np.ndarray], labels: bool = True) -> np.ndarray:
    """``[F, H', sum(W'), 3]``: the scaled, labelled panels side by side."""
    return np.concatenate(preview_panels(panels, labels)[0], axis=2)


def preview_sheet(panels: dict[str, np.ndarray], num_frames: int = SHEET_FRAMES) -> np.ndarray:
    """The contact sheet of a preview: one row per panel of ``num_frames`` evenly spaced frames,
    labelled as in the video, scaled as a video of that many panels side by side (the same factor as
    the video for tiny renders; real-size rows reduced to :data:`MAX_SIDE`)."""
    from faceid.render import frames_sheet

    length = min(len(v) for v in panels.values())
    idx = np.linspace(0, length - 1, min(num_frames, length)).round().astype(int)
    rows, _ = preview_panels({name: np.asarray(v)[idx] for name, v in panels.items()}, columns=len(idx))
    return frames_sheet(rows, len(idx), gap=SHEET_GAP)


def write_preview(video_path, sheet_path, panels: dict[str, np.ndarray], fps: float) -> None:
    """Write the preview video (:func:`faceid.pose.video.write_video`, deterministic) and its contact
    sheet (PNG) beside it, each atomically."""
    from PIL import Image

    from faceid.io import atomic_path
    from faceid.pose.video import write_video

    write_video(video_path, preview_video(panels), fps)
    with atomic_path(sheet_path) as tmp:
        Image.fromarray(preview_sheet(panels)).save(tmp, format="PNG")
