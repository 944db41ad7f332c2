"""Face regions of a clip: the main face on a few frames at the source's native resolution (a face
in a small full-body clip is often too small to detect), cut out as a square around it.

``faces.npz`` (prepare-pose) holds, for the K sampled frames where a face was found: ``regions``
[K, 256, 256, 3] uint8, ``frames`` [K] int64 (index within the clip), ``boxes`` [K, 4] float32
(x0, y0, x1, y1 in source pixels), ``sizes`` [K] float32 (box shorter side, source pixels).
"""

from __future__ import annotations

import numpy as np

FACE_DETECTOR = "mediapipe"  # face regions: detector and its minimum confidence
FACE_MIN_CONFIDENCE = 0.5
FACE_REGION_SCALE = 2.0  # region side / face box longer side: the whole head and some context
FACE_REGION_SIZE = 256  # px, side of the stored face regions


def face_sample_frames(num_frames: int, samples: int) -> np.ndarray:
    """Indices (within a clip) of ``samples`` frames spread evenly over ``num_frames``, first and last included."""
    if samples <= 0:
        return np.zeros(0, np.int64)
    return np.unique(np.linspace(0, num_frames - 1, min(samples, num_frames)).round().astype(np.int64))


def face_region(frame: np.ndarray, box, scale: float = FACE_REGION_SCALE, size: int = FACE_REGION_SIZE) -> np.ndarray:
    """Square ``size`` x ``size`` region around a face box (x0, y0, x1, y1): side = ``scale`` x the box's
    longer side, centred on the box, black where it extends past the frame."""
    import cv2

    x0, y0, x1, y1 = (float(v) for v in box)
    side = max(1, int(round(scale * max(x1 - x0, y1 - y0))))
    left = int(round((x0 + x1) / 2 - side / 2))
    top = int(round((y0 + y1) / 2 - side / 2))
    h, w = frame.shape[:2]
    region = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(0, left), max(0, top), min(w, left + side), min(h, top + side)
    if sx1 > sx0 and sy1 > sy0:
        region[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = frame[sy0:sy1, sx0:sx1]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
    return cv2.resize(region, (size, size), interpolation=interp)


def face_regions(frames: np.ndarray, clip_frames: np.ndarray, detector) -> dict[str, np.ndarray]:
    """The main face's region in each of ``frames`` (source resolution) that shows a face.

    ``clip_frames`` are the frames' indices within the clip. Returns the ``faces.npz`` arrays
    (without checksum): regions, frames, boxes, sizes, with one row per frame where a face was found.
    """
    from faceid.faces.detect import select_main_face

    regions, found, boxes, sizes = [], [], [], []
    for index, frame in zip(clip_frames, frames):
        frame = np.ascontiguousarray(frame)
        faces = detector.detect(frame)
        if not faces:
            continue
        face = faces[select_main_face(faces, *frame.shape[:2])]
        regions.append(face_region(frame, face.box))
        found.append(int(index))
        boxes.append(face.box)
        sizes.append(face.size)
    n = FACE_REGION_SIZE
    return {
        "regions": np.stack(regions) if regions else np.zeros((0, n, n, 3), np.uint8),
        "frames": np.asarray(found, np.int64),
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "sizes": np.asarray(sizes, np.float32),
    }
