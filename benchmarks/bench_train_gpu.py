"""Stage-2 training step of the full Wan2.1-VACE-1.3B architecture (random weights) on one GPU.

    python benchmarks/bench_train_gpu.py [--steps 10] [--frames 81 33] [--no-checkpointing]

Builds WanVACETransformer3DModel with the real 1.3B config (no download: random weights, bf16),
adds the LoRA of configs/wan2.1-vace-1.3b.yaml (rank 64, main-cross-attn) and a FaceMapper
(512-D ArcFace embedding -> 4 x 4096 tokens, hidden 1024), and times the recipe's stage-2 step
(flow-matching loss, bf16 autocast, backward, grad clipping, AdamW) on cached-latent-shaped
inputs at 480x832 with 81 and 33 frames (latents 16 x 21|9 x 60 x 104, 512 text tokens).
Prints one JSON line per setting: s/step (median after warm-up) and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

WAN_VACE_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    vace_layers=list(range(0, 30, 2)), vace_in_channels=96,
)


def bench(frames: int, steps: int, checkpointing: bool, params) -> dict:
    from diffusers import WanVACETransformer3DModel

    from faceid.model.lora import add_lora, lora_parameters
    from faceid.model.mapper import FaceMapper
    from faceid.train import recipe

    device = torch.device("cuda")
    tcfg = params.train_lora
    torch.cuda.reset_peak_memory_stats()
    with torch.device(device):
        transformer = WanVACETransformer3DModel(**WAN_VACE_1_3B).to(torch.bfloat16)
    transformer.requires_grad_(False)
    add_lora(transformer, tcfg.lora)
    for p in lora_parameters(transformer):
        p.data = p.data.float()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    mapper = FaceMapper(512, 4096, tcfg.num_face_tokens, tcfg.mapper_hidden_dim).to(device)
    model = recipe.FaceConditionedDiT(transformer, mapper)
    trainable = list(mapper.parameters()) + lora_parameters(transformer)
    for p in trainable:
        p.requires_grad_(True)
    lat = (16, (frames - 1) // 4 + 1, 480 // 8, 832 // 8)
    example = {"target": torch.randn(lat), "control": torch.randn(96, *lat[1:]),
               "text": torch.randn(512, 4096), "embedding": torch.randn(512)}
    optimizer, sched = recipe.make_optimizer(trainable, tcfg.stage2, tcfg.weight_decay)
    noise_scheduler = recipe.training_scheduler(params.model.flow_shift)
    times = []
    for step in range(steps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        batch = recipe.make_batch([example], step, 0, 1, 1, 0)
        loss = recipe.flow_matching_loss(model, batch, noise_scheduler, recipe.step_generator(0, step, 0),
                                         tcfg.face_dropout, device, torch.bfloat16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        sched.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t0)
    times.sort()
    out = {"gpu": torch.cuda.get_device_name(), "frames": frames, "height": 480, "width": 832,
           "gradient_checkpointing": checkpointing, "steps": steps, "s_per_step": times[len(times) // 2],
           "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
           "base_params_b": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n) / 1e9,
           "trainable_params_m": sum(p.numel() for p in trainable) / 1e6}
    del model, transformer, mapper, optimizer
    torch.cuda.empty_cache()
    return out


def main() -> None:
    from faceid.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 33])
    parser.add_argument("--no-checkpointing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_train_gpu: needs a CUDA GPU (the tiny CPU benchmark is bench_train_tiny.py)")
    params = load_params(REPO / "params.yaml", [f"@{REPO / 'configs' / 'wan2.1-vace-1.3b.yaml'}"])
    for frames in args.frames:
        print(json.dumps(bench(frames, args.steps, not args.no_checkpointing, params)), flush=True)


if __name__ == "__main__":
    main()
