"""prepare-pose's inputs: dance videos (and their pose videos) found and paired by name, their
captions, and each video probed, hashed and planned into clips (:class:`VideoPlan`)."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.config import PreparePoseConfig, to_dict
from faceid.errors import InputError
from faceid.io import progress, require_file, sha256_file
from faceid.pose.geometry import analysis_size, clip_starts
from faceid.pose.video import VIDEO_EXTENSIONS

POSE_SUFFIX = "_pose"
MAX_LENGTH_MISMATCH = 0.05  # dance vs pose video length, relative (at least 2 frames tolerated)
MAX_ASPECT_MISMATCH = 0.02
FORMAT_VERSION = 2  # bump when the clip files change meaning (2: faces.npz)
PLAN_THREADS = 8  # videos probed and hashed at once


class Rejected(Exception):
    """An input that the stage skips; the message is the manifest's reason."""


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


def iter_plans(cfg: PreparePoseConfig, pairs: list[tuple[Path, Path | None]], captions: dict[str, str],
               threads: int = PLAN_THREADS) -> Iterator[VideoPlan | tuple[str, str]]:
    """:func:`plan_video` of every pair, in order, ``threads`` at a time, each as soon as it and the
    ones before it are done: a :class:`VideoPlan`, or ``(caption, reason)`` for a rejected video."""
    from concurrent.futures import ThreadPoolExecutor

    def one(pair):
        video, pose = pair
        caption = caption_for(video, captions, cfg.default_caption)
        try:
            return plan_video(cfg, video, pose, caption)
        except Rejected as exc:
            return caption, str(exc)

    with ThreadPoolExecutor(min(threads, max(1, len(pairs)))) as pool:
        yield from pool.map(one, pairs)


def plan_videos(cfg: PreparePoseConfig, pairs: list[tuple[Path, Path | None]], captions: dict[str, str]) -> list:
    """:func:`iter_plans` all at once, with progress."""
    return list(progress(iter_plans(cfg, pairs, captions), total=len(pairs), desc="prepare-pose: probe"))


def clip_checksum(key: dict, start: int) -> str:
    return hashlib.sha256(json.dumps({**key, "start": start}, sort_keys=True).encode()).hexdigest()
