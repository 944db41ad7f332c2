"""Face detectors, main-face choice and 5-point alignment (dlib) shared by crop, embed and FaceSim.

Detectors: ``mediapipe`` (FaceDetection, model_selection=1: the full-range model shipped in the
0.10.21 wheel) and ``dlib-hog`` (dlib's frontal HOG detector). Both see a copy of the image
downscaled to at most ``DETECT_MAX_SIDE`` pixels; boxes come back in original pixels.
Alignment: dlib's 5-point shape predictor (``face_recognition_models`` package data) and
``dlib.get_face_chip``, the similarity transform dlib's 128-D recogniser was trained with. Every
crop size shares that framing, so a 512 crop resized to 150 equals the 150 crop.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass

import numpy as np

DETECT_MAX_SIDE = 1280  # px; detection on a downscaled copy (mediapipe runs at 192x192 internally anyway)
CHIP_REGION_SCALE = 1.0  # landmarks/chips are computed on the face box grown by this much on each side


@dataclass(frozen=True)
class Face:
    """A detected face: box ``(x0, y0, x1, y1)`` in image pixels (may extend past the edges) and a score."""

    box: tuple[float, float, float, float]
    score: float

    @property
    def size(self) -> float:
        """Shorter side of the box, pixels."""
        return min(self.box[2] - self.box[0], self.box[3] - self.box[1])


@dataclass(frozen=True)
class AlignedFace:
    landmarks: np.ndarray  # [5, 2] float32, image pixels: dlib order (eye corners x4, nose base)
    crops: dict[int, np.ndarray]  # size -> [size, size, 3] uint8 RGB


# --------------------------------------------------------------------------- detectors


@contextlib.contextmanager
def _quiet_protobuf_noise():
    """mediapipe 0.10.21 under protobuf 6 prints a harmless "'MessageFactory' object has no attribute
    'GetPrototype'" while importing its bindings; drop that one message, pass the rest through."""

    class _Filter(io.TextIOBase):
        def __init__(self, target):
            self.target = target
            self.dropped = False

        def write(self, text: str) -> int:
            noise = "GetPrototype" in text or text.strip() in ("AttributeError", "AttributeError:", ":")
            if noise or (self.dropped and not text.strip()):
                self.dropped = True
                return len(text)
            self.dropped = False
            return self.target.write(text)

        def flush(self) -> None:
            self.target.flush()

    saved = sys.stderr
    sys.stderr = _Filter(saved)
    try:
        yield
    finally:
        sys.stderr = saved


# What mediapipe 0.10.21's C++ (absl logging, TF Lite) writes to fd 2 each time a graph loads its
# models and first runs: harmless, and no switch turns it off (absl's log level is not reachable from
# Python; GLOG_minloglevel and TF_CPP_MIN_LOG_LEVEL do not apply). ``NORM_RECT``: the Pose graph's
# landmark ROI is square (mediapipe squares it), the one case the message says is supported.
_MEDIAPIPE_NOISE = re.compile(
    r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.\n"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\n"
    r"|[IW]\d{4} [\d:.]+ +\d+ inference_feedback_manager\.cc:\d+\] Feedback manager requires a model with a "
    r"single signature inference\.[^\n]*\n"
    r"|[IW]\d{4} [\d:.]+ +\d+ landmark_projection_calculator\.cc:\d+\] Using NORM_RECT without "
    r"IMAGE_DIMENSIONS is only supported for the square ROI\.[^\n]*\n")
_quiet_lock = threading.Lock()
_quiet_state: list = []  # [(saved fd 2, capture file)] while a block holds it, [] otherwise
_quiet_depth = 0


@contextlib.contextmanager
def quiet_mediapipe_logs():
    """For the block (a mediapipe graph built and run until its models have loaded: the face
    detector's warm-up frame, a pose estimator's clip): fd 2 goes to a temporary file; after it,
    everything but :data:`_MEDIAPIPE_NOISE` is written to fd 2, in order. Other threads' stderr in the meantime comes out at the end of the block, not lost; only
    a crash of the process inside the block would lose it. Nested and concurrent blocks share one
    capture, written out when the last one ends."""
    global _quiet_depth
    with _quiet_lock:
        if _quiet_depth == 0:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            capture = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(capture.fileno(), 2)
            _quiet_state.append((saved, capture))
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                saved, capture = _quiet_state.pop()
                with contextlib.suppress(Exception):
                    sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                capture.seek(0)
                text = capture.read().decode("utf-8", "surrogateescape")
                capture.close()
                kept = _MEDIAPIPE_NOISE.sub("", text).encode("utf-8", "surrogateescape")
                while kept:
                    kept = kept[os.write(2, kept):]


def import_mediapipe():
    """``import mediapipe`` without its harmless protobuf noise (face detection and pose estimation)."""
    with _quiet_protobuf_noise():
        import mediapipe

    return mediapipe


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    import cv2

    small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return small, scale


def detection_copy(image: np.ndarray) -> tuple[np.ndarray, float]:
    """``(copy, scale)``: what the detectors look at, ``image`` downscaled to at most ``DETECT_MAX_SIDE``
    (copy px = image px x scale). A caller may make it ahead (crop-faces does, on its decoding thread)
    and pass it to ``detect(image, small)``: the faces are exactly those ``detect(image)`` finds."""
    return _downscale(image, DETECT_MAX_SIDE)


class MediapipeDetector:
    name = "mediapipe"

    def __init__(self, min_confidence: float):
        mp = import_mediapipe()
        # mediapipe starts the graph on its own threads and loads the model by the first process()
        # (its log lines come meanwhile): one blank frame here, inside the quiet block, has it all
        # done. Face detection keeps no state between frames, so the blank frame changes no result.
        with quiet_mediapipe_logs():
            self._fd = mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_confidence)
            self._fd.process(np.zeros((64, 64, 3), np.uint8))

    def detect(self, image: np.ndarray, small: tuple[np.ndarray, float] | None = None) -> list[Face]:
        """The faces of ``image``, found on ``small`` = :func:`detection_copy` of it (made here if None)."""
        small, scale = detection_copy(image) if small is None else small
        h, w = small.shape[:2]
        result = self._fd.process(np.ascontiguousarray(small))
        faces = []
        for det in result.detections or []:
            bb = det.location_data.relative_bounding_box
            x0, y0 = bb.xmin * w / scale, bb.ymin * h / scale
            faces.append(Face((x0, y0, x0 + bb.width * w / scale, y0 + bb.height * h / scale), float(det.score[0])))
        return faces

    def close(self) -> None:
        self._fd.close()


class DlibHogDetector:
    name = "dlib-hog"

    def __init__(self, min_confidence: float):
        """``min_confidence`` is not used: HOG scores are SVM margins (about -1..3), not
        probabilities, so every detection dlib reports at its own threshold is kept and the
        margin recorded as the score."""
        import dlib

        self._hog = dlib.get_frontal_face_detector()

    def detect(self, image: np.ndarray, small: tuple[np.ndarray, float] | None = None) -> list[Face]:
        """The faces of ``image``, found on ``small`` = :func:`detection_copy` of it (made here if None)."""
        small, scale = detection_copy(image) if small is None else small
        upsample = 1 if max(small.shape[:2]) < 640 else 0
        rects, scores, _ = self._hog.run(np.ascontiguousarray(small), upsample, 0.0)
        return [
            Face((r.left() / scale, r.top() / scale, (r.right() + 1) / scale, (r.bottom() + 1) / scale), float(s))
            for r, s in zip(rects, scores)
        ]

    def close(self) -> None:
        pass


def build_detector(name: str, min_confidence: float):
    """``mediapipe`` or ``dlib-hog`` -> an object with ``.detect(image RGB uint8, small=None) -> list[Face]``."""
    if name == "mediapipe":
        return MediapipeDetector(min_confidence)
    if name == "dlib-hog":
        return DlibHogDetector(min_confidence)
    raise ValueError(f"unknown detector {name!r}; expected mediapipe or dlib-hog")


def rank_faces(faces: list[Face], height: int, width: int) -> list[int]:
    """Indices of ``faces``, main face first: the largest, preferring central ones
    (size x (1 - 0.5 x distance from centre)); ties keep detection order. Size says nothing about
    *who* a face is: crop-faces keeps several and embed-faces picks the person's."""

    def key(face: Face) -> float:
        cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
        off = math.hypot((cx - width / 2) / width, (cy - height / 2) / height) / math.hypot(0.5, 0.5)
        return face.size * (1.0 - 0.5 * min(off, 1.0))

    return sorted(range(len(faces)), key=lambda i: -key(faces[i]))


def select_main_face(faces: list[Face], height: int, width: int) -> int:
    """Index of the main face (the first of :func:`rank_faces`)."""
    return rank_faces(faces, height, width)[0]


# --------------------------------------------------------------------------- alignment


class Aligner:
    """dlib 5-point landmarks + aligned square chips at any size."""

    def __init__(self):
        import dlib
        import face_recognition_models

        self._dlib = dlib
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())

    def align(self, image: np.ndarray, face: Face, sizes: tuple[int, ...], padding: float) -> AlignedFace:
        """Landmarks of ``face`` and chips at ``sizes``, computed on a region around the box
        (a 6000 px photo costs the same as a 600 px one)."""
        dlib = self._dlib
        h, w = image.shape[:2]
        x0, y0, x1, y1 = face.box
        grow = CHIP_REGION_SCALE * max(x1 - x0, y1 - y0) * (1.0 + padding)
        rx0, ry0 = max(0, int(x0 - grow)), max(0, int(y0 - grow))
        rx1, ry1 = min(w, int(math.ceil(x1 + grow))), min(h, int(math.ceil(y1 + grow)))
        region = np.ascontiguousarray(image[ry0:ry1, rx0:rx1])
        rect = dlib.rectangle(round(x0 - rx0), round(y0 - ry0), round(x1 - rx0), round(y1 - ry0))
        shape = self._predictor(region, rect)
        landmarks = np.array([[p.x + rx0, p.y + ry0] for p in shape.parts()], np.float32)
        crops = {int(s): dlib.get_face_chip(region, shape, size=int(s), padding=padding) for s in sizes}
        return AlignedFace(landmarks, crops)


def estimate_yaw(landmarks: np.ndarray) -> float:
    """Rough head yaw in degrees from dlib's 5 points (0 = frontal, sign = direction).

    The nose base sits about 0.6 half-eye-distances in front of the eye plane, so its sideways
    offset from the eye midpoint, in half-eye-distances, is ~0.6 tan(yaw). Good to ~10 degrees:
    enough to reject profiles, not a head-pose estimator.
    """
    right_eye = landmarks[0:2].mean(axis=0)
    left_eye = landmarks[2:4].mean(axis=0)
    nose = landmarks[4]
    axis = left_eye - right_eye
    half = np.linalg.norm(axis) / 2
    if half < 1e-6:
        return 90.0
    offset = float(np.dot(nose - (left_eye + right_eye) / 2, axis / (2 * half)))
    return math.degrees(math.atan(offset / half / 0.6))
