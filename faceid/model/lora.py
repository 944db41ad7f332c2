"""LoRA on the Wan-VACE transformer's attention, through peft (``transformer.add_adapter``).

Targets (``params.train_lora.lora.targets``), the attention presets on the ``to_q, to_k, to_v,
to_out.0`` projections:

- ``main-cross-attn`` (the tiny profile's): cross-attention (``attn2``) of the main DiT blocks.
  The face tokens reach the model only through cross-attention, so this is where a LoRA helps the
  model *read* them (the IP-Adapter / Lynx recipe), with the fewest parameters (rank 64 on the
  1.3B: 23.6 M); the VACE branch keeps doing pose control untouched.
- ``main-attn``: self- and cross-attention of the main blocks.
- ``main-attn-ffn`` (the real profile's): self- and cross-attention and the feed-forward
  (``ffn.net.0.proj``, ``ffn.net.2``) of the main blocks: what DiffSynth-Studio's Wan LoRA
  trains (``q,k,v,o,ffn.0,ffn.2`` of the DiT, rank 32: 43.7 M on the 1.3B). Cross-attention
  reads the face tokens; drawing that face (its shape and texture at 3-4 patches in a full-body
  frame, kept across frames) is what the self-attention and FFN weights do, so they adapt too
  (README "The identity adapter"). VACE blocks stay frozen: pose control is the base model's.
- ``vace-attn``: attention of the VACE control blocks (DiffSynth-Studio's VACE recipe; adapts
  how control is injected, not how the face tokens are read).
- ``all-attn``: both branches.

The file format is diffusers' ``pytorch_lora_weights.safetensors`` (``transformer.``-prefixed
keys plus the LoRA config as metadata), loadable by ``WanVACEPipeline.load_lora_weights``.
Diffusers can silently load nothing (e.g. a raw peft dict without the prefix only logs a
warning), so :func:`load_lora` checks the loaded tensors against the file.
"""

from __future__ import annotations

from pathlib import Path

from faceid.config import LoraConfig
from faceid.errors import InputError

LORA_FILE = "pytorch_lora_weights.safetensors"
_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
TARGET_REGEX = {
    "main-cross-attn": rf"^blocks\.\d+\.attn2\.{_PROJ}$",
    "main-attn": rf"^blocks\.\d+\.attn[12]\.{_PROJ}$",
    "main-attn-ffn": rf"^blocks\.\d+\.(attn[12]\.{_PROJ}|ffn\.net\.0\.proj|ffn\.net\.2)$",
    "vace-attn": rf"^vace_blocks\.\d+\.attn[12]\.{_PROJ}$",
    "all-attn": rf"^(blocks|vace_blocks)\.\d+\.attn[12]\.{_PROJ}$",
}


RETRAIN = "re-run train-lora for this identity (or download it again from the registry)"


def read_weights(path: str | Path, fix: str = RETRAIN) -> tuple[dict, dict]:
    """``(tensors on CPU, metadata)`` of a ``.safetensors`` file. A missing, truncated or corrupt file
    (safetensors' "incomplete metadata", "header too large", ...) is an ``InputError`` naming the
    file and ``fix``: what to do about it."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found; {fix}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{path}: not a readable .safetensors file, truncated or corrupt ({exc}); {fix}") from None


def peft_config(cfg: LoraConfig):
    """The peft ``LoraConfig`` (regex ``target_modules`` is full-matched against module names)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, init_lora_weights=True,
        target_modules=TARGET_REGEX[cfg.targets],
    )


def add_lora(transformer, cfg: LoraConfig, adapter_name: str = "default") -> int:
    """Add a trainable LoRA adapter (B initialised at zero: the model is unchanged); return its size."""
    transformer.add_adapter(peft_config(cfg), adapter_name=adapter_name)
    return sum(p.numel() for n, p in transformer.named_parameters() if "lora_" in n and f".{adapter_name}." in n)


def lora_parameters(transformer) -> list:
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def lora_state_dict(transformer, adapter_name: str = "default") -> dict:
    """peft-format LoRA tensors (keys without the ``transformer.`` prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(transformer, adapter_name=adapter_name)


def set_lora_state_dict(transformer, state_dict: dict, adapter_name: str = "default") -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state_dict, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise InputError(f"LoRA state: {len(unexpected)} keys do not match the model, e.g. {unexpected[0]}")


def save_lora(folder: str | Path, transformer, adapter_name: str = "default") -> Path:
    """Write ``<folder>/pytorch_lora_weights.safetensors`` in diffusers format."""
    from diffusers import WanVACEPipeline

    state = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(transformer, adapter_name).items()}
    metadata = transformer.peft_config[adapter_name].to_dict()
    WanVACEPipeline.save_lora_weights(
        str(folder), transformer_lora_layers=state, transformer_lora_adapter_metadata=metadata, safe_serialization=True
    )
    return Path(folder) / LORA_FILE


def load_lora(pipe, folder: str | Path, adapter_name: str) -> None:
    """``pipe.load_lora_weights(folder, adapter_name=...)``, then verify every tensor arrived."""
    import torch

    path = Path(folder) / LORA_FILE
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected the identity's LoRA, written by train-lora)")
    expected = read_weights(path)[0]  # a truncated or corrupt file stops here, before diffusers reads it
    pipe.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=adapter_name)
    has_adapter = adapter_name in (getattr(pipe.transformer, "peft_config", None) or {})
    loaded = lora_state_dict(pipe.transformer, adapter_name) if has_adapter else {}
    mismatched = [
        k for k, v in expected.items()
        if k.removeprefix("transformer.") not in loaded
        or not torch.equal(loaded[k.removeprefix("transformer.")].to("cpu", v.dtype), v)
    ]
    if mismatched or not expected:
        raise InputError(
            f"{path}: LoRA did not load into the transformer ({len(mismatched)} of {len(expected)} tensors missing or "
            f"different, e.g. {mismatched[:1]}); the file may be for another base model"
        )


def fuse_lora(pipe, adapter_name: str, weight: float) -> None:
    """Merge adapter ``adapter_name`` at ``weight`` into the transformer's base weights
    (``W + weight * alpha / r * B A``; diffusers ``fuse_lora``, peft ``merge``): the LoRA matmuls
    leave every step. Unmerging in bf16 does not give the base weights back exactly, so a pipeline
    with a fused LoRA renders that identity at that weight only (``faceid.render.Generator`` checks)."""
    pipe.enable_lora()
    pipe.set_adapters([adapter_name], adapter_weights=[weight])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=[adapter_name])


def fused_adapters(transformer) -> set[str]:
    """Names of the adapters merged into ``transformer``'s weights (peft's ``merged_adapters``)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for m in transformer.modules() if isinstance(m, BaseTunerLayer) for name in m.merged_adapters}
