"""Shared by bench_infer_gpu.py and bench_train_gpu.py: device check, the real profile's params on
a weights folder, the embedding dim of the configured embedder, FLOP counts, the results file."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# The bound: dense bf16 tensor-core peak of the H100 SXM and H200 (NVIDIA's data sheets; 1979 is with
# 2:4 sparsity). Figures before 2026-12 used 790 TFLOP/s, which this workplace's device notes give for an
# H200's bf16 matrix work; no benchmark here recorded it, so it is no longer the bound (--peak-tflops
# takes a measured one; name it beside the figures).
PEAK_BF16_TFLOPS = 989.0


def check_device(name: str) -> torch.device:
    """``cuda`` needs a visible GPU (SystemExit with the fix otherwise); ``cpu`` is the logic check."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (none is visible). To check its logic on CPU: "
                         "--device cpu --weights .cache/test-weights/tiny with a tiny geometry (see --help)")
    return torch.device(name)


def bench_params(weights: str | Path, device: torch.device, overrides: list[str] = ()):
    """params.yaml + configs/wan2.1-vace-1.3b.yaml (the real profile users run) on ``weights``."""
    from faceid.config import load_params

    weights = Path(weights)
    if not (weights / "model_index.json").is_file():
        raise SystemExit(f"{weights}: no diffusers folder (model_index.json missing). Write random ones with "
                         "`faceid make-test-weights --size real` (or --size tiny for the CPU check)")
    return load_params(REPO / "params.yaml", [f"@{REPO / 'configs' / 'wan2.1-vace-1.3b.yaml'}",
                                              f"model.weights_dir={weights.resolve()}", f"model.device={device.type}",
                                              *overrides])


def embed_dim(params, override: int = 0) -> int:
    """The identity embedding's dim for ``embed_faces.embedder``: dlib is 128-D (the real profile's
    embedder); arcface-onnx and clip depend on the model file, so they need ``--embed-dim``."""
    from faceid.faces.embed import DlibEmbedder

    if override:
        return override
    if params.embed_faces.embedder == "dlib":
        return DlibEmbedder.dim
    raise SystemExit(f"embed_faces.embedder={params.embed_faces.embedder}: its dim comes from the model file; pass --embed-dim")


def video_tokens(config, frames: int, height: int, width: int, vae_scale=(4, 8)) -> int:
    """Transformer sequence length of one video: latent frames x (h / 8 / patch) x (w / 8 / patch)."""
    pt, ph, pw = config.patch_size
    return ((frames - 1) // vae_scale[0] + 1) // pt * (height // vae_scale[1] // ph) * (width // vae_scale[1] // pw)


def forward_flop(config, tokens: int, text_tokens: int, lora_rank: int = 0,
                 lora_targets: str = "main-cross-attn") -> dict[str, float]:
    """Matmul FLOP of one transformer forward (2 per multiply-add): per block, self-attention
    projections 8Ld^2 + scores/values 4L^2 d, cross-attention 4Ld^2 + 4Td^2 + 4LTd, FFN 4L d ffn;
    ``main`` = the 30 main blocks (the issue's 2.8e14 figure at 480x832x81), ``total`` adds the 15
    VACE blocks (+ their output projections); ``lora`` = rank-r LoRA on the projections of the
    ``lora_targets`` preset (faceid/model/lora.py): 2 n r (d_in + d_out) per adapted Linear on n tokens."""
    d, ffn, L, T = config.num_attention_heads * config.attention_head_dim, config.ffn_dim, tokens, text_tokens
    block = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * T * d * d + 4 * L * T * d + 4 * L * d * ffn
    main = config.num_layers * block
    vace = len(config.vace_layers) * (block + 2 * L * d * d)

    def lin(n: int, d_in: int, d_out: int) -> int:
        return 2 * n * lora_rank * (d_in + d_out)

    attn1, attn2 = 4 * lin(L, d, d), 2 * lin(L, d, d) + 2 * lin(T, d, d)
    ffn_lora = lin(L, d, ffn) + lin(L, ffn, d)
    per_main = {"main-cross-attn": attn2, "main-attn": attn1 + attn2, "main-attn-ffn": attn1 + attn2 + ffn_lora,
                "vace-attn": 0, "all-attn": attn1 + attn2}[lora_targets]
    per_vace = attn1 + attn2 if lora_targets in ("vace-attn", "all-attn") else 0
    lora = config.num_layers * per_main + len(config.vace_layers) * per_vace if lora_rank else 0
    return {"main": float(main), "total": float(main + vace), "lora": float(lora),
            "main_blocks": config.num_layers, "vace_blocks": len(config.vace_layers)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment_line(device: torch.device) -> str:
    import diffusers
    import peft
    import transformers

    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (f"{device_name(device)}; torch {torch.__version__}{cuda}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, peft {peft.__version__}; {datetime.date.today().isoformat()}")


def write_results(path: str | Path, text: str) -> None:
    """Write the markdown results file atomically (``faceid.io.atomic_path``)."""
    from faceid.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(text)
    print(f"wrote {path}", flush=True)
