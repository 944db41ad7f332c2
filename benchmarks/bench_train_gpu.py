"""Stage-2 training step of faceid on one GPU (mapper + LoRA on the frozen Wan-VACE transformer).

    python benchmarks/bench_train_gpu.py --weights /tmp/test-weights-real [--frames 81 33] [--steps 3]
    python benchmarks/bench_train_gpu.py --device cpu --weights .cache/test-weights/tiny \\
        --frames 9 --height 32 --width 32 --out /tmp/train.md                          # logic check on CPU

The transformer comes from a Wan2.1-VACE-1.3B diffusers folder through the real profile's own
loader (``load_real_components``; random test weights from ``faceid make-test-weights`` time like
real ones), in the profile's dtype (bf16 on CUDA). On it: the LoRA and FaceMapper of
configs/wan2.1-vace-1.3b.yaml (rank 32 on the main blocks' attention and FFN; mapper 128 -> 1024 -> 4 x 4096:
the profile embeds faces with dlib, 128-D, so the mapper input follows ``embed_faces.embedder``).
The step is the recipe's own (``recipe.make_batch``, ``flow_matching_loss`` with its autocast and
timestep sampling, backward, clipping, AdamW) on one cached-latent-shaped example at
``--height`` x ``--width`` (latents 16 x f x h/8 x w/8, control 96 x ..., 512 text tokens), with
and without gradient checkpointing (an out-of-memory run is reported as such). Reports s/step
(median of ``--steps`` after 2 warm-up steps), video tokens/s, peak allocated memory, and the
step as a share of the physical bound: (forwards a step costs: 2 without checkpointing, 3 with) x
the forward's matmul FLOP at ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import torch

from gpu_common import (PEAK_BF16_TFLOPS, REPO, bench_params, check_device, embed_dim, environment_line,
                        forward_flop, video_tokens, write_results)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def example(transformer, text_tokens: int, dim: int, frames: int, height: int, width: int) -> dict:
    """One cached example as ``faceid.train.examples`` builds it (an identity clip, uniform loss weight)."""
    g = torch.Generator("cpu").manual_seed(0)
    lat = ((frames - 1) // 4 + 1, height // 8, width // 8)
    return {"target": torch.randn(16, *lat, generator=g), "control": torch.randn(transformer.config.vace_in_channels, *lat, generator=g),
            "text": torch.randn(text_tokens, transformer.config.text_dim, generator=g),
            "embedding": torch.nn.functional.normalize(torch.randn(dim, generator=g), dim=0),
            "face": torch.tensor(True), "weight": torch.ones(lat), "ref_frames": 0}


def bench(transformer, params, device, amp_dtype, ex: dict, steps: int, checkpointing: bool, dim: int) -> dict:
    from faceid.model.base_model import text_dim
    from faceid.model.lora import lora_parameters
    from faceid.model.mapper import FaceMapper
    from faceid.train import recipe
    from faceid.train.examples import IDENTITY, PRIOR

    tcfg = params.train_lora
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    torch.manual_seed(tcfg.seed)
    mapper = FaceMapper(dim, text_dim(params.model), tcfg.num_face_tokens, tcfg.mapper_hidden_dim).to(device)
    model = recipe.FaceConditionedDiT(transformer, mapper)
    trainable = list(mapper.parameters()) + lora_parameters(transformer)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer, sched = recipe.make_optimizer(trainable, tcfg.stage2, tcfg.weight_decay)
    noise_scheduler = recipe.training_scheduler(params.model.flow_shift)
    pools = {IDENTITY: [ex], PRIOR: []}
    times, error, loss = [], "", None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    try:
        for step in range(steps + 2):
            sync(device)
            t0 = time.perf_counter()
            batch = recipe.make_batch(pools, 1.0, step, 0, 1, tcfg.seed)
            loss = recipe.flow_matching_loss(model, batch, noise_scheduler, recipe.step_generator(tcfg.seed, step, 0),
                                             tcfg.face_dropout, device, amp_dtype, tcfg.timestep_sampling)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
            optimizer.step()
            sched.step()
            sync(device)
            if step >= 2:
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError as exc:
        error = f"out of memory ({str(exc).splitlines()[0][:100]})"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    model.eval()
    optimizer.zero_grad(set_to_none=True)
    del model, mapper, optimizer, loss
    for p in trainable:
        p.requires_grad_(False)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"checkpointing": checkpointing, "s_per_step": statistics.median(times) if times else None,
            "peak_gib": peak, "trainable_m": sum(p.numel() for p in trainable) / 1e6, "error": error}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--weights", required=True, help="Wan2.1-VACE-1.3B diffusers folder (e.g. faceid make-test-weights)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 33])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after 2 warm-up steps")
    parser.add_argument("--checkpointing", choices=["both", "on", "off"], default="both")
    parser.add_argument("--embed-dim", type=int, default=0, help="default: the configured embedder's (dlib: 128)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    parser.add_argument("--out", help="markdown results (default on CUDA: benchmarks/results/train_gpu.md)")
    args = parser.parse_args()
    device = check_device(args.device)
    out = args.out or (str(REPO / "benchmarks" / "results" / "train_gpu.md") if device.type == "cuda" else None)

    from faceid.model.base_model import load_real_components, resolve_dtype
    from faceid.model.lora import add_lora, lora_parameters

    params = bench_params(args.weights, device)
    dtype = resolve_dtype(params.model, device)
    amp_dtype = dtype if device.type == "cuda" and dtype != torch.float32 else None  # as recipe.train does
    components = load_real_components(params.model, dtype)
    text_tokens = int(min(components["tokenizer"].model_max_length, 512))
    transformer = components["transformer"].to(device)
    del components
    add_lora(transformer, params.train_lora.lora)
    for p in lora_parameters(transformer):
        p.data = p.data.float()
    dim = embed_dim(params, args.embed_dim)
    print(f"# {environment_line(device)}", flush=True)
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.checkpointing]
    rows = []
    for frames in args.frames:
        ex = example(transformer, text_tokens, dim, frames, args.height, args.width)
        tokens = video_tokens(transformer.config, frames, args.height, args.width)
        flop = forward_flop(transformer.config, tokens, text_tokens + params.train_lora.num_face_tokens, params.train_lora.lora.rank,
                            params.train_lora.lora.targets)
        for ckpt in settings:
            row = {"frames": frames, "tokens": tokens, "forward_flop": flop["total"],
                   **bench(transformer, params, device, amp_dtype, ex, args.steps, ckpt, dim)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    text = report(args, device, params, rows, dim)
    print(text, flush=True)
    if out:
        write_results(out, text)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args, device, params, rows, dim) -> str:
    from faceid.model.base_model import text_dim

    lora = params.train_lora.lora
    lines = [
        "# Training: faceid stage-2 step (`benchmarks/bench_train_gpu.py`)", "",
        f"Machine: {environment_line(device)}.",
        f"Weights: `{args.weights}` (Wan2.1-VACE-1.3B architecture via `load_real_components`; random test weights time "
        f"like real ones). LoRA rank {lora.rank} on `{lora.targets}`, FaceMapper {dim} -> "
        f"{params.train_lora.mapper_hidden_dim} -> {params.train_lora.num_face_tokens} x {text_dim(params.model)} "
        f"(embedder `{params.embed_faces.embedder}`), batch 1, {args.height}x{args.width}, the recipe's own step "
        f"(bf16 autocast on CUDA, backward, clipping, AdamW); median of {args.steps} steps after 2 warm-up steps.",
        f"Bound: a forward's matmul FLOP at {args.peak_tflops:.0f} TFLOP/s (dense bf16{' spec peak of the H100/H200' if args.peak_tflops == PEAK_BF16_TFLOPS else ', given with --peak-tflops'}); a step counts as 2 forwards without "
        f"gradient checkpointing (forward + backward to the activations; the base weights are frozen) and 3 with it "
        f"(+ the recomputed forward). 'share of bound' = that time / measured step.", "",
        "| frames | video tokens | gradient checkpointing | s/step | video tokens/s | peak memory (GiB) | share of bound | trainable | note |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["s_per_step"]
        bound = (3 if r["checkpointing"] else 2) * r["forward_flop"] / (args.peak_tflops * 1e12)
        per_s, share = (None, None) if s is None else (r["tokens"] / s, bound / s)
        lines.append(
            f"| {r['frames']} | {r['tokens']} | {'yes' if r['checkpointing'] else 'no'} | {fmt(s, '.3f')} | "
            f"{fmt(per_s, '.0f')} | {fmt(r['peak_gib'], '.1f')} | {fmt(share, '.0%')} | {r['trainable_m']:.1f} M | {r['error']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
