"""Training inputs: the prepare_pose clip manifest, the embed_faces embeddings (the identity's mean
and each photo's own), and the face box of a clip frame from its keypoints."""

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
    keypoints_path: Path | None = None  # absolute; None when the manifest names none


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
            keypoints_path=clips_dir / r["keypoints_path"] if r.get("keypoints_path") else None,
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
    return split_clips(clips_dir, holdout)[0]


def split_clips(clips_dir: str | Path, holdout: int) -> tuple[list[Clip], list[Clip]]:
    """``(training clips, held-out clips)``: the held-out ones are the last ``holdout`` ``ok`` clips by
    clip_id, never trained on (validation during training and render_validation use them)."""
    clips = sorted(load_clips(clips_dir), key=lambda c: c.clip_id)
    if holdout >= len(clips):
        raise InputError(
            f"{Path(clips_dir) / 'manifest.parquet'}: {len(clips)} usable clip(s) but train_lora.holdout_clips={holdout}; "
            "expected more clips than held out (add videos or lower holdout_clips)"
        )
    return clips[: len(clips) - holdout], clips[len(clips) - holdout:]


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


def check_embedder(meta: dict, embed_cfg) -> None:
    """The embeddings must come from the configured embedder (clip routing embeds faces with it,
    and the identity card names it): a mismatch is an InputError naming both."""
    if meta.get("embedder") != embed_cfg.embedder:
        raise InputError(
            f"{meta.get('path', 'embeddings')}: embedded with {meta.get('embedder')!r} ({meta.get('dim')}-D), but "
            f"embed_faces.embedder is {embed_cfg.embedder!r}; rerun embed-faces with the configured embedder or set it"
        )
    fixed = {"dlib": 128}.get(embed_cfg.embedder)
    if fixed is not None and int(meta.get("dim", fixed)) != fixed:
        raise InputError(f"{meta.get('path', 'embeddings')}: metadata says {embed_cfg.embedder} but the embedding has "
                         f"{meta.get('dim')} dims ({embed_cfg.embedder} gives {fixed}); the file is inconsistent, rerun embed-faces")


def embeddings_sha256(embeddings_dir: str | Path) -> str:
    """sha256 of the embed_faces file (``<dir>/embeddings.safetensors``, or the path itself if it
    is a file); ``""`` when there is no such file."""
    from faceid.io import sha256_file

    path = Path(embeddings_dir)
    file = path / "embeddings.safetensors" if path.is_dir() else path
    return sha256_file(file) if file.is_file() else ""


def load_photo_embeddings(embeddings_dir: str | Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """``({photo name: its own embedding [D] float32}, [excluded names])`` from embed-faces: the
    ``per_image`` rows of the consistency-check inliers (outliers are another person: never trained on)."""
    from safetensors.numpy import load_file

    from faceid.faces.embed import load_identity_embedding
    from faceid.io import read_parquet

    _, meta = load_identity_embedding(embeddings_dir)
    path = Path(meta["path"])
    tensors = load_file(str(path))
    names = meta.get("names")
    if "per_image" not in tensors or not isinstance(names, list) or len(names) != len(tensors["per_image"]):
        raise InputError(f"{path}: expected a 'per_image' tensor with one row per name in the metadata 'names' "
                         "(written by embed-faces)")
    table = path.parent / "embeddings.parquet"
    outliers = {str(r["name"]) for r in read_parquet(table) if r.get("outlier")} if table.is_file() else set()
    per_image = np.asarray(tensors["per_image"], np.float32)
    if not np.isfinite(per_image).all():
        raise InputError(f"{path}: 'per_image' holds NaN/inf values")
    kept = {n: per_image[i] for i, n in enumerate(names) if n not in outliers}
    return kept, sorted(outliers)


# OpenPose-18 joints of the head: nose, eyes, ears (faceid.pose.estimate); the neck gives the scale.
FACE_JOINTS = (0, 14, 15, 16, 17)
NECK = 1


def face_box_from_keypoints(kps: np.ndarray, min_confidence: float = 0.3) -> tuple[float, float, float, float] | None:
    """A square box ``(x0, y0, x1, y1)`` around the head of one frame's OpenPose-18 keypoints
    ``[18, 3]``, or None without a confident head joint. Side: 1.5 x the spread of the head joints,
    at least 0.9 x the nose-neck distance (a head is about that tall), at least 4 px."""
    kps = np.asarray(kps, np.float32)
    ok = [j for j in FACE_JOINTS if kps[j, 2] >= min_confidence]
    if not ok:
        return None
    pts = kps[ok, :2]
    lo, hi = pts.min(0), pts.max(0)
    side = 1.5 * float(max(hi - lo))
    if kps[0, 2] >= min_confidence and kps[NECK, 2] >= min_confidence:
        side = max(side, 0.9 * float(np.linalg.norm(kps[0, :2] - kps[NECK, :2])))
    side = max(side, 4.0)
    cx, cy = (lo + hi) / 2
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def latent_face_mask(boxes: list, height: int, width: int, scale: int = 8, temporal: int = 4) -> np.ndarray:
    """``[f, height // scale, width // scale]`` float32: 1 on latent cells a face box touches.

    ``boxes``: one box (or None) per pixel frame, in pixels; Wan's VAE maps frame 0 to latent frame
    0 and frames ``4t-3 .. 4t`` to latent frame t, so a latent frame is marked where any of its
    frames shows a face."""
    n = len(boxes)
    f = (n - 1) // temporal + 1
    h, w = height // scale, width // scale
    mask = np.zeros((f, h, w), np.float32)
    for i, box in enumerate(boxes):
        if box is None:
            continue
        t = 0 if i == 0 else (i - 1) // temporal + 1
        x0, y0, x1, y1 = (float(v) / scale for v in box)
        c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
        if c1 > c0 and r1 > r0:
            mask[t, r0:r1, c0:c1] = 1.0
    return mask
