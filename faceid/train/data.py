"""Training inputs: the prepare_pose clip manifest and the embed_faces identity embedding."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.errors import InputError

MANIFEST_COLUMNS = ("clip_id", "video_path", "pose_path", "caption", "num_frames", "height", "width", "checksum", "status")


@dataclass(frozen=True)
class Clip:
    clip_id: str
    video_path: Path  # absolute
    pose_path: Path  # absolute
    caption: str
    num_frames: int
    height: int
    width: int
    checksum: str


def load_clips(clips_dir: str | Path) -> list[Clip]:
    """Rows of ``<clips>/manifest.parquet`` with status == 'ok' (paths resolved against ``clips_dir``)."""
    from faceid.io import read_parquet, require_dir

    clips_dir = require_dir(clips_dir, "the output folder of prepare-pose")
    rows = read_parquet(clips_dir / "manifest.parquet")
    if rows and (missing := [c for c in MANIFEST_COLUMNS if c not in rows[0]]):
        raise InputError(f"{clips_dir / 'manifest.parquet'}: columns {missing} missing (written by prepare-pose?)")
    clips = []
    for r in rows:
        if r["status"] != "ok":
            continue
        clip = Clip(
            clip_id=str(r["clip_id"]), video_path=clips_dir / r["video_path"], pose_path=clips_dir / r["pose_path"],
            caption=str(r["caption"] or ""), num_frames=int(r["num_frames"]), height=int(r["height"]),
            width=int(r["width"]), checksum=str(r["checksum"]),
        )
        for p in (clip.video_path, clip.pose_path):
            if not p.is_file():
                raise InputError(f"{p}: clip {clip.clip_id} listed in the manifest but the file is missing")
        clips.append(clip)
    if not clips:
        raise InputError(f"{clips_dir / 'manifest.parquet'}: no clip with status 'ok' to train on")
    return clips


def training_clips(clips_dir: str | Path, holdout: int) -> list[Clip]:
    """The clips to train on: all ``ok`` clips but the last ``holdout`` by clip_id, which
    render_validation renders as unseen poses (the identity card lists the trained clips)."""
    clips = sorted(load_clips(clips_dir), key=lambda c: c.clip_id)
    if holdout >= len(clips):
        raise InputError(
            f"{Path(clips_dir) / 'manifest.parquet'}: {len(clips)} usable clip(s) but train_lora.holdout_clips={holdout}; "
            "expected more clips than held out (add videos or lower holdout_clips)"
        )
    return clips[: len(clips) - holdout]


def read_clip(clip: Clip) -> tuple[np.ndarray, np.ndarray]:
    """``(target, pose)``, each ``[F, H, W, 3]`` uint8, checked against the manifest."""
    from faceid.pose.video import read_video

    target, _ = read_video(clip.video_path)
    pose, _ = read_video(clip.pose_path)
    n = clip.num_frames
    for name, frames in (("video", target), ("pose", pose)):
        if frames.shape[0] < n or frames.shape[1:3] != (clip.height, clip.width):
            raise InputError(
                f"clip {clip.clip_id}: {name} is {frames.shape}, manifest says {n} frames of {clip.height}x{clip.width}"
            )
    return target[:n], pose[:n]


def load_embedding(embeddings_dir: str | Path) -> tuple[np.ndarray, dict]:
    """``(embedding [D] float32, meta{embedder, dim, ...})`` from the embed_faces output."""
    from faceid.faces.embed import load_identity_embedding

    emb, meta = load_identity_embedding(embeddings_dir)
    emb = np.asarray(emb, dtype=np.float32)
    if emb.ndim != 1 or not np.isfinite(emb).all():
        raise InputError(f"{embeddings_dir}: identity embedding must be a finite 1-D vector, got shape {emb.shape}")
    return emb, dict(meta)


def embeddings_sha256(embeddings_dir: str | Path) -> str:
    """sha256 of the embed_faces file (``<dir>/embeddings.safetensors``, or the path itself if it
    is a file); ``""`` when there is no such file."""
    from faceid.io import sha256_file

    path = Path(embeddings_dir)
    file = path / "embeddings.safetensors" if path.is_dir() else path
    return sha256_file(file) if file.is_file() else ""
