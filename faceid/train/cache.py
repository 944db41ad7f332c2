"""Latent cache: per training example (a clip, or one view of an identity photo), the VAE latents
of the target and control videos and the caption's text embeddings, computed once and reused
across epochs, stages and runs.

An entry is ``<cache_dir>/<key>.safetensors`` with tensors ``target`` [16, f, h, w] (normalised
latents, as the pipeline's decoder expects), ``control`` [96, r + f, h, w] (VACE conditioning:
inactive + reactive latents + mask, exactly as ``WanVACEPipeline`` builds it from a pose video
without a mask and with ``r`` reference images in front) and ``text`` [L, text_dim], plus the
example's own extra tensors (e.g. a photo's face mask). The key hashes what the example is made
of (clip checksum, or photo hash + view + geometry), the caption, the reference image and the
base model, so a new input or another model never reads a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CACHE_VERSION = 2


@dataclass(frozen=True)
class Source:
    """What one cache entry is made from: ``payload`` identifies it (hashed into the key);
    ``load()`` returns ``(target [F, H, W, 3], pose [F, H, W, 3], caption, reference image or None,
    extra tensors)`` and runs only on a cache miss."""

    example_id: str
    payload: dict
    load: Callable[[], tuple]


def cache_key(payload: dict, base_model: str, text_len: int) -> str:
    data = json.dumps([CACHE_VERSION, payload, base_model, text_len], sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:24]


def encode_example(pipe, target_frames: np.ndarray, pose_frames: np.ndarray, caption: str, reference: np.ndarray | None = None) -> dict:
    """VAE latents of the target, VACE control latents of the pose video (with ``reference`` as
    VACE reference image in front, when given), text embeddings (CPU, float32)."""
    import torch
    from PIL import Image

    from faceid.model.generate import encode_text

    device = pipe._execution_device
    num_frames, height, width, _ = pose_frames.shape
    refs = [Image.fromarray(np.ascontiguousarray(reference))] if reference is not None else None
    with torch.no_grad():
        # control: the pipeline's own preprocessing (step 5 of WanVACEPipeline.__call__)
        video, mask, refs = pipe.preprocess_conditions(
            [Image.fromarray(f) for f in pose_frames], None, refs, 1, height, width, num_frames, torch.float32, device
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


def _read_entry(path: Path, load_file) -> dict | None:
    """A cache entry's tensors, or None when the file cannot be read (truncated or damaged): the cache
    is faceid's own, so such an entry is encoded again rather than stopping the run."""
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError / ValueError for damaged files
        print(f"latent cache: {path.name} cannot be read ({type(exc).__name__}); encoding it again", file=sys.stderr)
        return None


def cached_examples(pipe, sources: list[Source], cache_dir: str | Path, base_model: str, show_progress: bool = True,
                    desc: str = "latent cache") -> list[dict]:
    """One example per source: read from the cache or encode and store atomically. Returns dicts of
    CPU tensors (``target``, ``control``, ``text`` and the source's extras) + ``example_id`` +
    ``cached`` (True when read from the cache)."""
    import torch
    from safetensors.torch import load_file, save_file

    from faceid.io import atomic_path, progress
    from faceid.model.generate import text_len

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    examples = []
    it = progress(sources, total=len(sources), desc=desc) if show_progress else sources
    for source in it:
        path = cache_dir / f"{cache_key(source.payload, base_model, text_len(pipe))}.safetensors"
        tensors = _read_entry(path, load_file) if path.is_file() else None
        cached = tensors is not None
        if not cached:  # a miss, or an entry that cannot be read (a disk fault): encoded again, replaced
            target, pose, caption, reference, extra = source.load()
            tensors = encode_example(pipe, target, pose, caption, reference)
            tensors.update({k: torch.as_tensor(np.asarray(v)).float().contiguous() for k, v in extra.items()})
            with atomic_path(path) as tmp:
                save_file(tensors, str(tmp), metadata={"example_id": source.example_id})
        examples.append({**tensors, "example_id": source.example_id, "cached": cached})
    return examples
