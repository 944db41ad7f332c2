"""Train-step time and peak memory of the tiny profile on CPU (stage 2: mapper + LoRA).

    .venv/bin/python benchmarks/bench_train_tiny.py [--steps 30]

Uses the recipe's own building blocks (FaceConditionedDiT, flow_matching_loss, AdamW) on random
cached-latent-shaped inputs, at 9x32x32 and at the demo resolution of params.yaml (17x64x64).
Not a timed test: numbers go to benchmarks/results/train.md by hand.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from faceid.config import load_params
from faceid.model.base_model import build_components
from faceid.model.lora import add_lora, lora_parameters
from faceid.model.mapper import FaceMapper
from faceid.train import recipe

REPO = Path(__file__).resolve().parents[1]


def bench(params, frames: int, height: int, width: int, steps: int) -> dict:
    tcfg = params.train_lora
    transformer = build_components(params.model)["transformer"]
    mapper = FaceMapper(128, params.model.tiny.text_dim, tcfg.num_face_tokens, tcfg.mapper_hidden_dim)
    add_lora(transformer, tcfg.lora)
    model = recipe.FaceConditionedDiT(transformer, mapper)
    lat = (16, (frames - 1) // 4 + 1, height // 8, width // 8)
    example = {"target": torch.randn(lat), "control": torch.randn(96, *lat[1:]),
               "text": torch.randn(params.model.tiny.max_text_len, params.model.tiny.text_dim), "embedding": torch.randn(128),
               "face": torch.tensor(True), "weight": torch.ones(lat[1:]), "ref_frames": 0}
    pools = {"identity": [example], "prior": []}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = list(mapper.parameters()) + lora_parameters(transformer)
    for p in trainable:
        p.requires_grad_(True)
    optimizer, sched = recipe.make_optimizer(trainable, tcfg.stage2, tcfg.weight_decay)
    noise_scheduler = recipe.training_scheduler(params.model.flow_shift)
    times = []
    for step in range(steps + 3):
        t0 = time.perf_counter()
        batch = recipe.make_batch(pools, 1.0, step, 0, tcfg.batch_size, 0)
        loss = recipe.flow_matching_loss(model, batch, noise_scheduler, recipe.step_generator(0, step, 0),
                                         tcfg.face_dropout, torch.device("cpu"), None, tcfg.timestep_sampling)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        sched.step()
        if step >= 3:  # warm-up excluded
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"frames": frames, "height": height, "width": width, "steps": steps,
            "median_s_per_step": times[len(times) // 2], "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "trainable_params": sum(p.numel() for p in trainable)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    params = load_params(REPO / "params.yaml")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for f, h, w in ((9, 32, 32), (17, 64, 64)):
        print(json.dumps(bench(params, f, h, w, args.steps)))


if __name__ == "__main__":
    main()
