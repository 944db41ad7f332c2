"""Latent cache: per clip, the VAE latents of the target and control videos and the caption's
text embeddings, computed once and reused across epochs, stages and runs.

An entry is ``<cache_dir>/<key>.safetensors`` with tensors ``target`` [16, f, h, w] (normalised
latents, as the pipeline's decoder expects), ``control`` [96, f, h, w] (VACE conditioning:
inactive + reactive latents + mask, exactly as ``WanVACEPipeline`` builds it from a pose video
without a mask) and ``text`` [L, text_dim]. The key hashes the clip checksum, the caption, the
frame geometry and the base model id, so a new clip or another model never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

CACHE_VERSION = 1


def cache_key(checksum: str, caption: str, shape: tuple[int, ...], base_model: str, text_len: int) -> str:
    payload = json.dumps([CACHE_VERSION, checksum, caption, list(shape), base_model, text_len])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def encode_clip(pipe, target_frames: np.ndarray, pose_frames: np.ndarray, caption: str) -> dict:
    """VAE latents of the target, VACE control latents of the pose video, text embeddings (CPU, float32)."""
    import torch
    from PIL import Image

    from faceid.model.generate import encode_text

    device = pipe._execution_device
    num_frames, height, width, _ = pose_frames.shape
    with torch.no_grad():
        # control: the pipeline's own preprocessing (steps 5 of WanVACEPipeline.__call__)
        video, mask, refs = pipe.preprocess_conditions(
            [Image.fromarray(f) for f in pose_frames], None, None, 1, height, width, num_frames, torch.float32, device
        )
        control = pipe.prepare_video_latents(video, mask, refs, None, device)
        control = torch.cat([control, pipe.prepare_masks(mask, refs, None)], dim=1)
        # target: normalised like the pipeline's latents ((z - mean) / std)
        target = pipe.video_processor.preprocess_video([Image.fromarray(f) for f in target_frames], height, width)
        target = target.to(device=device, dtype=pipe.vae.dtype)
        z = pipe.vae.encode(target).latent_dist.mode()
        cfg = pipe.vae.config
        mean = torch.tensor(cfg.latents_mean, device=device).view(1, cfg.z_dim, 1, 1, 1)
        std = torch.tensor(cfg.latents_std, device=device).view(1, cfg.z_dim, 1, 1, 1)
        z = (z.float() - mean) / std
        text = encode_text(pipe, caption)
    return {
        "target": z[0].float().cpu().contiguous(),
        "control": control[0].float().cpu().contiguous(),
        "text": text[0].float().cpu().contiguous(),
    }


def cached_examples(pipe, clips, cache_dir: str | Path, base_model: str, read_clip, show_progress: bool = True) -> list[dict]:
    """One example per clip: read from the cache or encode (``read_clip(clip) -> (target, pose)``)
    and store atomically. Returns dicts of CPU tensors ``target``, ``control``, ``text`` + ``clip_id``."""
    from safetensors.torch import load_file, save_file

    from faceid.io import atomic_path, progress
    from faceid.model.generate import text_len

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    it = progress(clips, total=len(clips), desc="latent cache") if show_progress else clips
    for clip in it:
        key = cache_key(clip.checksum, clip.caption, (clip.num_frames, clip.height, clip.width), base_model, text_len(pipe))
        path = cache_dir / f"{key}.safetensors"
        if path.is_file():
            tensors = load_file(str(path))
        else:
            target, pose = read_clip(clip)
            tensors = encode_clip(pipe, target, pose, clip.caption)
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"clip_id": clip.clip_id, "checksum": clip.checksum})
        examples.append({**tensors, "clip_id": clip.clip_id})
    return examples
