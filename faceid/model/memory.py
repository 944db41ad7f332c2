"""What the base model holds on the device, and the switches that keep the real profile inside
its targets at 480x832x81: <= 16 GB for inference, <= 24 GB for stage-2 training.

The real profile's parts (weights only; activations come on top):

| part | parameters | bytes | needed |
|---|---:|---:|---|
| UMT5-XXL text encoder | 5.68 B (1.05 B of it the 256k-token table) | 11.4 GB bf16 | only to encode prompts |
| Wan-VACE transformer | 2.15 B (main blocks 1.39 B, VACE 0.73 B) | 4.3 GB bf16 | every denoising / training step |
| Wan VAE | 127 M | 0.5 GB float32 | control/target encode, final decode |
| LoRA rank 32, main attention + FFN (30 x 10 projections, ``main-attn-ffn``) | 43.7 M | 175 MB float32 (+ 350 MB AdamW state) | identity |
| FaceMapper 128 -> 1024 -> 4 x 4096 | 17.0 M | 68 MB float32 | identity |

So the text encoder is the largest part and the least used: with ``model.text_encoder_offload``
it stays on the CPU and visits the device only inside :func:`text_encoder_on_device` (prompts are
encoded first, then it leaves before denoising). Training needs it only to fill the latent cache
(``recipe.train`` deletes the pipeline, text encoder and VAE with it, before the first step).
``model.vae_tiling`` encodes/decodes in spatial tiles (diffusers ``AutoencoderKLWan.enable_tiling``),
``model.vae_slicing`` one video of a batch at a time (batches > 1 only).

``holdings(pipe)`` lists what each component holds and where (the benchmarks and the smoke run
print it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

COMPONENTS = ("text_encoder", "transformer", "vae")


def apply_memory_options(pipe, model_cfg) -> None:
    """``model.vae_tiling`` / ``model.vae_slicing`` on the VAE; ``model.text_encoder_offload``:
    the text encoder goes to the CPU (:func:`text_encoder_on_device` brings it in to encode)."""
    if model_cfg.vae_tiling:
        pipe.vae.enable_tiling()
    if model_cfg.vae_slicing:
        pipe.vae.enable_slicing()
    if model_cfg.text_encoder_offload:
        offload_text_encoder(pipe)


def offload_text_encoder(pipe) -> None:
    """Move the text encoder to the CPU and release the device memory it held."""
    import torch

    if pipe.text_encoder.device.type != "cpu":
        pipe.text_encoder.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def text_encoder_on_device(pipe) -> Iterator[None]:
    """Inside the block the text encoder sits on the transformer's device (where ``encode_prompt``
    sends the token ids); an offloaded one goes back to the CPU afterwards. Nested blocks move it
    once. Encode every prompt of a video in one block, before denoising."""
    device = pipe.transformer.device
    if pipe.text_encoder.device == device:
        yield
        return
    pipe.text_encoder.to(device)
    try:
        yield
    finally:
        offload_text_encoder(pipe)


def holdings(pipe) -> list[dict[str, Any]]:
    """One row per component: ``name, device, dtype, parameters, bytes`` (parameters + buffers;
    LoRA layers included, in the transformer)."""
    rows = []
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        tensors = list(module.parameters()) + list(module.buffers())
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in module.parameters()})
        rows.append({"name": name, "device": str(module.device), "dtype": "/".join(dtypes),
                     "parameters": sum(p.numel() for p in module.parameters()),
                     "bytes": sum(t.numel() * t.element_size() for t in tensors)})
    return rows


def format_holdings(rows: list[dict[str, Any]]) -> str:
    """``text_encoder cuda:0 bfloat16 5680.9 M params 10835.6 MiB``, one line per component."""
    return "\n".join(f"  {r['name']:<13} {r['device']:<7} {r['dtype']:<17} {r['parameters'] / 1e6:9.1f} M params "
                     f"{r['bytes'] / 2**20:9.1f} MiB" for r in rows)
