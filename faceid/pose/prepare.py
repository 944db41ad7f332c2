"""``faceid prepare-pose``: dance videos -> normalised clips, pose-control videos and keypoints.

For every dance video (and its ``<name>_pose.mp4`` when given) the stage resamples to
``prepare_pose.fps``, splits clips of ``num_frames`` (4n+1) frames every ``stride`` frames, estimates
keypoints on the frames at analysis resolution (long side up to 1280 px, never below what the
crop needs), crops the same window from both videos (centred on the person when
``person_aware_crop``), resizes to ``height`` x ``width`` and writes, per clip, atomically::

    <out>/clips/<clip_id>/video.mp4     target RGB clip (H.264 yuv420p)
    <out>/clips/<clip_id>/pose.mp4      the given pose video, or the skeleton drawn ControlNet-style
    <out>/clips/<clip_id>/keypoints.npz keypoints [F, 18, 3] in clip pixels, detected [F], checksum
    <out>/clips/<clip_id>/faces.npz     face regions at source resolution (see below), checksum
    <out>/manifest.parquet              one row per clip or rejected input (docs/architecture.md)
    <out>/.faceid-output.json           the marker: a prepare-pose output (faceid.outputs)

A clip whose folder already holds the same checksum (inputs + settings) is not redone, so a rerun
does no work and a crashed run resumes. Bad inputs become ``rejected`` rows with a reason; a clip
with too few frames showing a person is written but marked ``rejected``. On ``ok`` rows ``reason``
holds notes (frame rate resampled, variable frame rate, container rotation, pose video trimmed or
resized). Rejections and notes are also printed, one line each.

Nothing usable, nothing touched: new clips are made in ``.<out>.staging`` beside the output folder
(a crashed run resumes from there too) and move into ``<out>/clips`` only when at least one clip is
``ok``; then the manifest is replaced (atomically) and clip folders no row refers to are removed.
With no ``ok`` clip the stage fails (exit code 2) and ``<out>`` stays exactly as it was.

Face regions: on ``face_samples`` frames spread evenly over each clip, decoded at the source
video's native resolution (a face in a small full-body clip is often too small to detect), the
main face (mediapipe) is cut out as a square of ``FACE_REGION_SCALE`` x the face box's longer side
(black past the frame edges) resized to ``FACE_REGION_SIZE``. ``faces.npz`` holds, for the K
sampled frames where a face was found (K may be 0): ``regions`` [K, 256, 256, 3] uint8, ``frames``
[K] int64 (index within the clip), ``boxes`` [K, 4] float32 (x0, y0, x1, y1 in source pixels),
``sizes`` [K] float32 (box shorter side, source pixels) and ``checksum``. Clips are independent
of any identity; training scores the regions per identity (faceid.train.routing).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.config import PreparePoseConfig, to_dict
from faceid.errors import FaceidError, InputError
from faceid.io import atomic_dir, output_lock, progress, require_dir, require_file, sha256_file, write_parquet
from faceid.outputs import check_folder, mark
from faceid.pose.video import VIDEO_EXTENSIONS

STAGE = "prepare_pose"  # its name in faceid.outputs
POSE_SUFFIX = "_pose"
ANALYSIS_LONG_SIDE = 1280  # px: pose estimation resolution cap
MAX_LENGTH_MISMATCH = 0.05  # dance vs pose video length, relative (at least 2 frames tolerated)
MAX_ASPECT_MISMATCH = 0.02
DRAW_MIN_CONFIDENCE = 0.3
FORMAT_VERSION = 2  # bump when the clip files change meaning (2: faces.npz)
FACE_DETECTOR = "mediapipe"  # face regions: detector and its minimum confidence
FACE_MIN_CONFIDENCE = 0.5
FACE_REGION_SCALE = 2.0  # region side / face box longer side: the whole head and some context
FACE_REGION_SIZE = 256  # px, side of the stored face regions
CLIP_FILES = ("video.mp4", "pose.mp4", "keypoints.npz", "faces.npz")
PLAN_THREADS = 8  # videos probed and hashed at once
MAX_CLIPS_PER_CALL = 4  # clips a Ray worker takes at a time (its decode / pose / encode overlap within them)
ENCODE_PRESET = "veryfast"  # x264: half the CPU of "fast" at crf 18 (41.3 vs 42.5 dB PSNR on a 480x832 clip)
LOCAL_RAY_MIN_CLIPS = 8  # workers 0 on one machine: fewer clips to make are made in this process
LOCAL_RAY_MIN_CORES = 2  # ... and so is everything on a machine with this many cores or fewer

COLUMNS = (
    ("clip_id", "string"), ("source", "string"), ("start_frame", "int64"), ("num_frames", "int64"),
    ("fps", "float64"), ("height", "int64"), ("width", "int64"), ("video_path", "string"),
    ("pose_path", "string"), ("keypoints_path", "string"), ("faces_path", "string"), ("caption", "string"),
    ("pose_detection_rate", "float64"), ("num_face_regions", "int64"), ("checksum", "string"), ("status", "string"),
    ("reason", "string"),
)  # fmt: skip


class Rejected(Exception):
    """An input that the stage skips; the message is the manifest's reason."""


# --------------------------------------------------------------------------- pure geometry


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


def analysis_size(src_h: int, src_w: int, out_h: int, out_w: int) -> tuple[int, int] | None:
    """Decode size (h, w) for pose estimation: long side <= 1280 px unless the crop needs more."""
    aspect = out_w / out_h
    cw = min(src_w, src_h * aspect)
    needed = out_w / cw
    scale = min(1.0, max(needed, ANALYSIS_LONG_SIDE / max(src_h, src_w)))
    if scale >= 1.0:
        return None
    return int(round(src_h * scale / 2)) * 2, int(round(src_w * scale / 2)) * 2


def reconcile_lengths(n_video: int, n_pose: int, fps: float) -> tuple[int, str]:
    """Common frame count of a dance video and its pose video, or :class:`Rejected`."""
    if n_video == n_pose:
        return n_video, ""
    shorter = min(n_video, n_pose)
    if abs(n_video - n_pose) <= max(2, round(MAX_LENGTH_MISMATCH * shorter)):
        return shorter, f"pose video {n_pose} frames vs {n_video} at {fps:g} fps: trimmed to {shorter}"
    raise Rejected(
        f"length mismatch: dance video {n_video} frames, pose video {n_pose} frames at {fps:g} fps "
        f"(more than {MAX_LENGTH_MISMATCH:.0%} apart)"
    )


# --------------------------------------------------------------------------- inputs


def find_inputs(videos_dir: Path, pose_dir: Path | None) -> tuple[list[tuple[Path, Path | None]], list[tuple[Path, str]]]:
    """``[(dance video, pose video or None)]`` matched by name, and ``[(file, reason)]`` rejects.

    Pose videos are ``<name>_pose.<ext>`` (or ``<name>.<ext>`` in ``pose_dir``); without
    ``pose_dir`` they are looked for beside the dance videos.
    """
    files = sorted(p for p in videos_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    rejects: list[tuple[Path, str]] = [(p, f"a folder (videos are read from the top level of {videos_dir} only)")
                                       for p in sorted(videos_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    dance, pose_here = [], {}
    for p in files:
        ext = p.suffix.lower()
        if p.name == "captions.csv" or ext == ".txt":
            continue
        if ext not in VIDEO_EXTENSIONS:
            rejects.append((p, f"not a video (extension {ext or 'none'}; expected {', '.join(VIDEO_EXTENSIONS)})"))
        elif p.stem.endswith(POSE_SUFFIX):
            pose_here[p.stem[: -len(POSE_SUFFIX)]] = p
        else:
            dance.append(p)
    poses = dict(pose_here)
    if pose_dir is not None:
        poses = {}
        for p in sorted(pose_dir.iterdir()):
            if p.name.startswith("."):
                continue
            if not p.is_file() or p.suffix.lower() not in VIDEO_EXTENSIONS:  # said, never skipped silently
                what = "a folder" if p.is_dir() else f"not a video (extension {p.suffix.lower() or 'none'})"
                rejects.append((p, f"{what} in the pose videos folder {pose_dir}"))
                continue
            name = p.stem[: -len(POSE_SUFFIX)] if p.stem.endswith(POSE_SUFFIX) else p.stem
            if name in poses:  # prefer <name>_pose over <name>
                keep, drop = (poses[name], p) if poses[name].stem.endswith(POSE_SUFFIX) else (p, poses[name])
                rejects.append((drop, f"{keep.name} is the pose video of {name} (<name>{POSE_SUFFIX} is preferred)"))
                poses[name] = keep
                continue
            poses[name] = p
    names = {p.stem for p in dance}
    for name, p in sorted(poses.items()):
        if name not in names:
            rejects.append((p, f"pose video without a dance video named {name}.*"))
    pairs, seen = [], set()
    for p in dance:
        if p.stem in seen:
            rejects.append((p, f"another video is also named {p.stem} (clip ids come from the name)"))
            continue
        seen.add(p.stem)
        pose = poses.get(p.stem)
        if pose_dir is not None and pose is None:
            rejects.append((p, f"no pose video {p.stem}{POSE_SUFFIX}.* in {pose_dir}"))
            continue
        pairs.append((p, pose))
    return pairs, rejects


def load_captions(videos_dir: Path, captions: Path | None) -> dict[str, str]:
    """``name -> caption`` from ``captions`` (or ``<videos>/captions.csv``), columns name,caption."""
    path = require_file(captions, "a captions CSV with columns name,caption") if captions else videos_dir / "captions.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "caption"} <= set(reader.fieldnames):
            raise InputError(f"{path}: expected a CSV with a header row name,caption; got {reader.fieldnames}")
        return {Path(row["name"].strip()).stem: row["caption"].strip() for row in reader if row["name"]}


def caption_for(video: Path, table: dict[str, str], default: str) -> str:
    """captions.csv entry > ``<name>.txt`` beside the video > ``prepare_pose.default_caption``."""
    if table.get(video.stem):
        return table[video.stem]
    sidecar = video.with_suffix(".txt")
    text = sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""
    return text or default


# --------------------------------------------------------------------------- plan and clips


@dataclass
class VideoPlan:
    video: Path
    pose: Path | None
    caption: str
    video_indices: np.ndarray
    pose_indices: np.ndarray | None
    size: tuple[int, int] | None  # decode size (h, w) of both videos; None = native
    starts: list[int]
    key: dict  # what the clips depend on (for checksums)
    notes: list[str] = field(default_factory=list)


def plan_video(cfg: PreparePoseConfig, video: Path, pose: Path | None, caption: str) -> VideoPlan:
    """Probe a dance video (and its pose video) and decide its clips, or raise :class:`Rejected`."""
    from faceid.pose.video import frame_indices, probe

    notes = []
    try:
        info = probe(video)
        if info["vfr"]:
            notes.append(f"variable frame rate: resampled by timestamps to {cfg.fps} fps")
        elif abs(info["fps"] - cfg.fps) > 1e-3:
            notes.append(f"frame rate {info['fps']:g} fps resampled to {cfg.fps} fps")
        if info["rotation"]:
            notes.append(f"rotated {info['rotation']} deg in the container: decoded upright")
        v_idx, _ = frame_indices(video, cfg.fps)
        p_idx = None
        if pose is not None:
            try:
                pinfo = probe(pose)
                p_idx, _ = frame_indices(pose, cfg.fps)
            except InputError as exc:
                raise Rejected(f"pose video {pose.name}: {exc}") from None
            a, b = info["height"] / info["width"], pinfo["height"] / pinfo["width"]
            if abs(a - b) > MAX_ASPECT_MISMATCH * a:
                raise Rejected(
                    f"size mismatch: dance video {info['width']}x{info['height']}, pose video "
                    f"{pinfo['width']}x{pinfo['height']} (different aspect ratio)"
                )
            if (pinfo["height"], pinfo["width"]) != (info["height"], info["width"]):
                notes.append(f"pose video {pinfo['width']}x{pinfo['height']} resized to {info['width']}x{info['height']}")
            n, note = reconcile_lengths(len(v_idx), len(p_idx), cfg.fps)
            v_idx, p_idx = v_idx[:n], p_idx[:n]
            if note:
                notes.append(note)
    except InputError as exc:
        raise Rejected(str(exc).removeprefix(f"{video}: ")) from None
    if len(v_idx) < cfg.num_frames:
        raise Rejected(
            f"too short: {len(v_idx)} frames at {cfg.fps} fps ({len(v_idx) / cfg.fps:.2f} s); "
            f"a clip needs {cfg.num_frames} ({cfg.num_frames / cfg.fps:.2f} s)"
        )
    size = analysis_size(info["height"], info["width"], cfg.height, cfg.width)
    settings = {k: v for k, v in to_dict(cfg).items()
                if k not in ("default_caption", "max_clips_per_video", "min_pose_detection_rate", "workers")}
    key = {
        "version": FORMAT_VERSION,
        "video": sha256_file(video),
        "pose": sha256_file(pose) if pose is not None else None,
        "settings": settings,
    }
    starts = clip_starts(len(v_idx), cfg.num_frames, cfg.stride, cfg.max_clips_per_video)
    return VideoPlan(video, pose, caption, v_idx, p_idx, size, starts, key, notes)


def plan_videos(cfg: PreparePoseConfig, pairs: list[tuple[Path, Path | None]], captions: dict[str, str]) -> list:
    """:func:`plan_video` of every pair, in order, a few at a time: each a :class:`VideoPlan` or
    ``(caption, reason)`` for a rejected video."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        video, pose = pair
        caption = caption_for(video, captions, cfg.default_caption)
        try:
            return plan_video(cfg, video, pose, caption)
        except Rejected as exc:
            return caption, str(exc)

    with ThreadPoolExecutor(min(PLAN_THREADS, max(1, len(pairs)))) as pool:
        return list(progress(pool.map(one, pairs), total=len(pairs), desc="prepare-pose: probe"))


def clip_checksum(key: dict, start: int) -> str:
    return hashlib.sha256(json.dumps({**key, "start": start}, sort_keys=True).encode()).hexdigest()


def _done(clip_dir: Path, checksum: str) -> tuple[np.ndarray, int] | None:
    """``(detected flags, number of face regions)`` of a finished clip with this checksum, else None."""
    if not all((clip_dir / n).is_file() for n in CLIP_FILES):
        return None
    try:
        with np.load(clip_dir / "keypoints.npz", allow_pickle=False) as kz, \
                np.load(clip_dir / "faces.npz", allow_pickle=False) as fz:
            if str(kz["checksum"]) != checksum or str(fz["checksum"]) != checksum:
                return None
            return kz["detected"], int(len(fz["frames"]))
    except Exception:
        return None


@dataclass
class ClipJob:
    """One clip to make: everything a worker needs (plain values: it travels to Ray workers as JSON)."""

    clip_id: str
    video: str
    pose: str | None
    video_indices: list[int]  # source frames of the clip
    pose_indices: list[int] | None
    size: tuple[int, int] | None  # decode size (h, w) of both videos; None = native
    checksum: str

    @classmethod
    def of(cls, plan: VideoPlan, start: int, num_frames: int) -> "ClipJob":
        stop = start + num_frames
        return cls(
            clip_id=f"{plan.video.stem}-{start:05d}", video=str(plan.video), pose=str(plan.pose) if plan.pose else None,
            video_indices=[int(i) for i in plan.video_indices[start:stop]],
            pose_indices=None if plan.pose_indices is None else [int(i) for i in plan.pose_indices[start:stop]],
            size=None if plan.size is None else (int(plan.size[0]), int(plan.size[1])),
            checksum=clip_checksum(plan.key, start),
        )


@dataclass
class Decoded:
    """A clip's source frames: at analysis resolution, the pose video's, and the face samples at native size."""

    frames: np.ndarray
    pose_frames: np.ndarray | None
    face_frames: np.ndarray
    face_picks: np.ndarray


@dataclass
class Made:
    """A clip ready to write."""

    clip: np.ndarray
    pose: np.ndarray
    keypoints: np.ndarray
    detected: np.ndarray
    faces: dict


def decode_clip(cfg: PreparePoseConfig, job: ClipJob) -> Decoded:
    """1. Decode the clip's frames (analysis resolution), its pose video's, and the face-sample frames
    at the source's native resolution (the same source frames; taken from the clip's frames when the
    analysis resolution is the native one)."""
    from faceid.pose.video import read_frames

    frames = read_frames(job.video, job.video_indices, job.size)
    pose_frames = read_frames(job.pose, job.pose_indices, frames.shape[1:3]) if job.pose is not None else None
    picks = face_sample_frames(cfg.num_frames, cfg.face_samples)
    if not len(picks):
        native = np.zeros((0, 1, 1, 3), np.uint8)
    elif job.size is None:
        native = frames[picks]
    else:
        native = read_frames(job.video, [job.video_indices[i] for i in picks])
    return Decoded(frames, pose_frames, native, picks)


def assemble_clip(cfg: PreparePoseConfig, decoded: Decoded, kps: np.ndarray, detector) -> Made:
    """3. With the person's keypoints (step 2: the pose model on ``decoded.frames``): crop both
    videos with one window, draw the skeleton (unless a pose video was given), cut the face regions.
    ``detector`` may be None when ``face_samples`` is 0."""
    from faceid.pose.draw import draw_poses

    detected = (kps[..., 2] > 0).any(axis=1)
    h, w = decoded.frames.shape[1:3]
    box = crop_box(h, w, cfg.height, cfg.width, kps if cfg.person_aware_crop else None)
    clip = apply_crop(decoded.frames, box, cfg.height, cfg.width)
    clip_kps = transform_keypoints(kps, box, cfg.height, cfg.width)
    if decoded.pose_frames is not None:
        pose = apply_crop(decoded.pose_frames, box, cfg.height, cfg.width)
    else:
        pose = draw_poses(clip_kps, cfg.height, cfg.width, DRAW_MIN_CONFIDENCE)
    faces = face_regions(decoded.face_frames, decoded.face_picks, detector)
    return Made(clip, pose, clip_kps, detected, faces)


def write_clip(cfg: PreparePoseConfig, made: Made, clip_dir: Path, checksum: str) -> None:
    """4. Write all four files or none."""
    from faceid.pose.video import write_video

    with atomic_dir(clip_dir) as tmp:
        write_video(tmp / "video.mp4", made.clip, cfg.fps, preset=ENCODE_PRESET)
        write_video(tmp / "pose.mp4", made.pose, cfg.fps, preset=ENCODE_PRESET)
        np.savez(tmp / "keypoints.npz", keypoints=made.keypoints, detected=made.detected, checksum=np.array(checksum))
        np.savez(tmp / "faces.npz", **made.faces, checksum=np.array(checksum))


class ClipMaker:
    """One worker's clip maker (in this process, or one per Ray Data actor).

    The pose estimator and the face detector are built once and reused for every clip. Clips flow
    through three overlapping threads: one decodes the next clip (step 1), this one runs the pose
    model on the current clip (step 2), one assembles and encodes the previous clip (steps 3-4); at
    most three clips are in memory, and the pose model never waits on video I/O. Each clip's outcome
    is a dict: ``clip_id``, ``detected`` (list of bools) and ``num_face_regions``, or ``error``; one
    failing clip never stops the others.
    """

    def __init__(self, cfg: PreparePoseConfig, staging: str | Path):
        from faceid.faces.detect import build_detector
        from faceid.pose.estimate import build_estimator

        self.cfg, self.staging = cfg, Path(staging)
        self.estimator = build_estimator(cfg)
        self.detector = build_detector(FACE_DETECTOR, FACE_MIN_CONFIDENCE) if cfg.face_samples > 0 else None

    def finish(self, job: ClipJob, decoded: Decoded, kps: np.ndarray) -> dict:
        """Steps 3-4 of one clip: its outcome."""
        made = assemble_clip(self.cfg, decoded, kps, self.detector)
        write_clip(self.cfg, made, self.staging / job.clip_id, job.checksum)
        return {"clip_id": job.clip_id, "detected": [bool(d) for d in made.detected],
                "num_face_regions": int(len(made.faces["frames"]))}

    def make_all(self, jobs: list[ClipJob]) -> Iterator[dict]:
        """Outcomes in the order of ``jobs``."""
        from concurrent.futures import ThreadPoolExecutor

        if not jobs:
            return
        with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder, \
                ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
            decoding = decoder.submit(decode_clip, self.cfg, jobs[0])
            finishing = None  # (job, future) of the previous clip
            for i, job in enumerate(jobs):
                current = decoding
                if i + 1 < len(jobs):
                    decoding = decoder.submit(decode_clip, self.cfg, jobs[i + 1])
                failed = None
                try:
                    decoded = current.result()
                    kps = self.estimator.estimate(decoded.frames)
                    started = (job, finisher.submit(self.finish, job, decoded, kps))
                except Exception as exc:
                    started, failed = None, _failed(job, exc)
                if finishing is not None:
                    yield _outcome(*finishing)
                finishing = started
                if failed is not None:
                    yield failed
            if finishing is not None:
                yield _outcome(*finishing)

    def __call__(self, batch: dict) -> dict:
        """Ray Data: a batch of JSON jobs -> their JSON outcomes."""
        jobs = [ClipJob(**json.loads(text)) for text in batch["job"]]
        for path in [Path(jobs[0].video), self.staging] if jobs else []:
            if not path.exists():  # a cluster node without the driver's storage: every clip would fail
                import socket

                raise FaceidError(
                    f"prepare-pose: the Ray worker on {socket.gethostname()} cannot see {path}; on a cluster the "
                    "videos and the output folder must be on storage that every Ray node mounts at the same path")
        import ray

        node = ray.get_runtime_context().get_node_id()  # which node made them (the run's log names them)
        return {"outcome": np.array([json.dumps({**o, "node": node}) for o in self.make_all(jobs)], dtype=object)}

    def close(self) -> None:
        self.estimator.close()
        if self.detector is not None:
            self.detector.close()


def _failed(job: ClipJob, exc: Exception) -> dict:
    return {"clip_id": job.clip_id, "error": f"failed: {type(exc).__name__}: {exc}"}


def _outcome(job: ClipJob, future) -> dict:
    try:
        return future.result()
    except Exception as exc:
        return _failed(job, exc)


def make_clips(cfg: PreparePoseConfig, jobs: list[ClipJob], staging: Path, ray_address: str = "",
               num_cpus: int = 0) -> Iterator[dict]:
    """Make ``jobs`` into ``staging``; yield each outcome as it arrives (any order), with progress.

    Where: ``cfg.workers`` 1 -> in this process. A cluster (``ray_address``) or ``cfg.workers`` >= 2
    -> on Ray Data: that many actors (0 = one per CPU of the cluster), each a :class:`ClipMaker`.
    ``cfg.workers`` 0 without a cluster -> local Ray on ``num_cpus`` cores (0 = all) when there are
    at least :data:`LOCAL_RAY_MIN_CLIPS` clips to make and more than :data:`LOCAL_RAY_MIN_CORES`
    cores, else in this process: starting local Ray costs about as much as making a few clips, and
    one process's threads already keep two cores busy (benchmarks/results/pose.md: 25.5 frames/s in
    one process vs 18.6 on 2 Ray workers on 2 cores). On a cluster ``staging`` must be on storage
    that every node sees (as ``ray.storage_path`` for training).
    """
    if not jobs:
        return
    cores = num_cpus or os.cpu_count() or 1
    local_small = not ray_address and cfg.workers == 0 and (len(jobs) < LOCAL_RAY_MIN_CLIPS or cores <= LOCAL_RAY_MIN_CORES)
    if cfg.workers == 1 or local_small:
        maker = ClipMaker(cfg, staging)
        try:
            yield from progress(maker.make_all(jobs), total=len(jobs), desc="prepare-pose")
        finally:
            maker.close()
        return
    yield from _make_on_ray(cfg, jobs, staging, ray_address, num_cpus)


def _make_on_ray(cfg: PreparePoseConfig, jobs: list[ClipJob], staging: Path, ray_address: str,
                 num_cpus: int) -> Iterator[dict]:
    import ray

    from faceid import ray_session

    with ray_session.session(ray_address, num_cpus, log_to_driver=False):
        workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        workers = min(workers, len(jobs))
        # a few clips per call, so that a worker's decode / pose / encode overlap; ~2 calls per worker
        per_call = max(1, min(MAX_CLIPS_PER_CALL, -(-len(jobs) // (2 * workers))))
        texts = [{"job": json.dumps(dataclasses.asdict(j))} for j in jobs]
        ds = ray.data.from_items(texts, override_num_blocks=-(-len(jobs) // per_call)).map_batches(
            ClipMaker, fn_constructor_kwargs={"cfg": cfg, "staging": str(staging)}, batch_size=per_call,
            batch_format="numpy", concurrency=workers, num_cpus=1,
        )
        print(f"prepare-pose: {len(jobs)} clips on {workers} Ray worker(s)"
              + (f" at {ray_address}" if ray_address else " (local Ray)"), file=sys.stderr)
        nodes: dict[str, int] = {}
        try:
            for row in progress(ds.iter_rows(), total=len(jobs), desc="prepare-pose"):
                outcome = json.loads(row["outcome"])
                node = outcome.pop("node")
                nodes[node] = nodes.get(node, 0) + 1
                yield outcome
        except Exception as exc:  # a worker could not start or died: show the cause; finished clips stay staged
            cause = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise FaceidError(f"prepare-pose: the Ray Data job failed ({type(exc).__name__}: {cause}); "
                              "clips made so far are kept and a rerun resumes") from exc
        print(f"prepare-pose: clips made on {len(nodes)} Ray node(s): "
              + ", ".join(f"{node} ({n})" for node, n in sorted(nodes.items())), file=sys.stderr)


def _row(**values) -> dict:
    return {name: values.get(name) for name, _ in COLUMNS}


def _clip_row(cfg: PreparePoseConfig, plan: VideoPlan, job: ClipJob, outcome: dict) -> dict:
    """The manifest row of a clip: ``ok``, or ``rejected`` (failed, or too few frames with a person)."""
    common = dict(clip_id=job.clip_id, source=plan.video.name, start_frame=int(job.clip_id.rsplit("-", 1)[1]),
                  num_frames=cfg.num_frames, fps=float(cfg.fps), height=cfg.height, width=cfg.width,
                  caption=plan.caption, checksum=job.checksum)
    if "error" in outcome:
        return _row(**common, status="rejected", reason=outcome["error"])
    rate = float(np.mean(outcome["detected"]))
    notes, status = list(plan.notes), "ok"
    if rate < cfg.min_pose_detection_rate:
        status = "rejected"
        notes.insert(0, f"person detected in {rate:.0%} of frames (< {cfg.min_pose_detection_rate:.0%})")
    rel = f"clips/{job.clip_id}"
    return _row(**common, video_path=f"{rel}/video.mp4", pose_path=f"{rel}/pose.mp4",
                keypoints_path=f"{rel}/keypoints.npz", faces_path=f"{rel}/faces.npz", pose_detection_rate=rate,
                num_face_regions=int(outcome["num_face_regions"]), status=status, reason="; ".join(notes))


def _schema():
    import pyarrow as pa

    return pa.schema([(name, getattr(pa, kind)()) for name, kind in COLUMNS])


def _clean_partial(clips_root: Path) -> None:
    """Remove leftovers of an interrupted run (temporary clip folders)."""
    if clips_root.is_dir():
        for p in clips_root.iterdir():
            if p.is_dir() and p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
                shutil.rmtree(p)


def staging_dir(output_dir: Path) -> Path:
    """Where a run makes its new clips (beside the output folder, never part of it)."""
    return output_dir.parent / f".{output_dir.name}.staging"


def _move_in(src: Path, dst: Path) -> None:
    """Replace the clip folder ``dst`` by ``src`` (a finished clip in the staging folder)."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        if old.exists():
            shutil.rmtree(old)
        dst.rename(old)
        src.rename(dst)
        shutil.rmtree(old)
    else:
        src.rename(dst)


def report_lines(rows: list[dict]) -> list[str]:
    """What the terminal shows besides the summary: one line per rejected input or clip, and one per
    change made to an input (its notes, once per source video)."""
    lines, noted = [], set()
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"  rejected {r['clip_id'] if r['video_path'] else r['source']}: {r['reason']}")
        elif r["reason"] and r["source"] not in noted:
            noted.add(r["source"])
            lines.append(f"  note {r['source']}: {r['reason']}")
    return lines


# --------------------------------------------------------------------------- stage


def run(cfg: PreparePoseConfig, videos_dir: Path, pose_dir: Path | None, output_dir: Path, captions: Path | None = None,
        lock_wait: float = 0.0, ray_address: str = "", num_cpus: int = 0) -> dict:
    """Prepare every video in ``videos_dir``; write clips and ``manifest.parquet`` to ``output_dir``.
    Fails (:class:`InputError`), leaving ``output_dir`` as it was, when no clip is usable.
    ``lock_wait``: seconds to wait for another run writing ``output_dir`` (:func:`faceid.io.output_lock`).
    ``ray_address`` / ``num_cpus``: where the clip makers run (:func:`make_clips`; ``cfg.workers``)."""
    # 1. Check inputs; one writer per output folder
    videos_dir = require_dir(videos_dir, "a folder of dance videos")
    if pose_dir is not None:
        pose_dir = require_dir(pose_dir, "a folder of *_pose.mp4 videos")
    output_dir = check_folder(STAGE, output_dir, [videos_dir, pose_dir, captions])  # faceid.outputs
    clips_root, staging = output_dir / "clips", staging_dir(output_dir)
    table = load_captions(videos_dir, captions)
    with output_lock("prepare-pose", output_dir, lock_wait):
        pairs, rejects = find_inputs(videos_dir, pose_dir)
        rows = [_row(clip_id=p.stem, source=p.name, status="rejected", reason=reason) for p, reason in rejects]

        # 2. Plan: probe and hash each video (threads: I/O and decoder index), decide its clips
        plans = []
        for (video, _), planned in zip(pairs, plan_videos(cfg, pairs, table)):
            if isinstance(planned, VideoPlan):
                plans.append(planned)
            else:
                rows.append(_row(clip_id=video.stem, source=video.name, caption=planned[0], status="rejected",
                                 reason=planned[1]))

        # 3. Make the clips that are not done yet (same checksum in <out>/clips or in staging = skip);
        #    new ones go to the staging folder, made by workers (ClipMaker: in this process or on Ray Data)
        _clean_partial(staging)
        jobs = [(plan, ClipJob.of(plan, start, cfg.num_frames)) for plan in plans for start in plan.starts]
        outcomes: dict[str, dict] = {}
        staged: set[str] = set()
        for _, job in jobs:
            done = _done(clips_root / job.clip_id, job.checksum)
            if done is None and (done := _done(staging / job.clip_id, job.checksum)) is not None:
                staged.add(job.clip_id)
            if done is not None:
                outcomes[job.clip_id] = {"clip_id": job.clip_id, "detected": done[0], "num_face_regions": done[1]}
        skipped = len(outcomes)
        todo = [job for _, job in jobs if job.clip_id not in outcomes]
        if todo:
            staging.mkdir(parents=True, exist_ok=True)
        for outcome in make_clips(cfg, todo, staging, ray_address, num_cpus):
            outcomes[outcome["clip_id"]] = outcome
            if "error" not in outcome:
                staged.add(outcome["clip_id"])
        written = len(outcomes) - skipped - sum("error" in o for o in outcomes.values())
        for plan, job in jobs:
            rows.append(_clip_row(cfg, plan, job, outcomes[job.clip_id]))

        # 4. Nothing usable: fail, output folder untouched. Else move the new clips in, replace the
        #    manifest (atomic), remove clip folders that no row refers to (older settings or inputs)
        ok = sum(r["status"] == "ok" for r in rows)
        for line in report_lines(rows):
            print(line, file=sys.stderr)
        if not ok:
            shutil.rmtree(staging, ignore_errors=True)
            raise InputError(
                f"prepare-pose: no usable clip from {len(pairs) + len(rejects)} input(s) in {videos_dir} "
                f"(reasons above, one per input); {output_dir} left as it was"
            )
        keep = {r["clip_id"] for r in rows if r["video_path"]}
        clips_root.mkdir(parents=True, exist_ok=True)
        mark(output_dir, STAGE)
        _clean_partial(clips_root)
        for clip_id in sorted(staged & keep):
            _move_in(staging / clip_id, clips_root / clip_id)
        write_parquet(output_dir / "manifest.parquet", rows, schema=_schema())
        for p in clips_root.iterdir():
            if p.is_dir() and p.name not in keep:
                shutil.rmtree(p)
        shutil.rmtree(staging, ignore_errors=True)
    summary = {
        "clips_ok": ok,
        "rejected": len(rows) - ok,
        "clips_written": written,
        "clips_skipped": skipped,
        "manifest": str(output_dir / "manifest.parquet"),
    }
    print(f"prepare-pose: {ok} clips ok, {len(rows) - ok} rejected rows; {written} written, "
          f"{skipped} already done -> {output_dir}", file=sys.stderr)
    return summary
