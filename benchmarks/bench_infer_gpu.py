"""Inference on one GPU: stock diffusers WanVACEPipeline vs faceid's identity path, same weights.

    python benchmarks/bench_infer_gpu.py --weights /tmp/test-weights-real            # 480x832x81, CFG 5
    python benchmarks/bench_infer_gpu.py --weights W --compile                         # + torch.compile of the blocks
    python benchmarks/bench_infer_gpu.py --device cpu --weights .cache/test-weights/tiny \\
        --frames 9 --height 32 --width 32 --out /tmp/infer.md                           # logic check on CPU

Weights: a Wan2.1-VACE-1.3B diffusers folder, e.g. random test weights (``faceid make-test-weights``;
speed and memory do not depend on the values). Configurations, one video each, 1 untimed + K timed
denoising steps (``--timed-steps``) after a 9-frame warm-up video, classifier-free guidance:

- ``stock``: ``WanVACEPipeline.from_pretrained(weights, torch_dtype=bf16)`` with a float32 VAE and
  UniPC flow_shift 3 (the Wan docs' recipe), prompt + negative prompt, no identity;
- ``faceid``: ``build_pipeline`` (``load_real_components``) and
  ``generate_video`` with an identity folder: 4 face tokens from a 128-D embedding (the profile's
  dlib embedder), LoRA rank 64 on the 30 main blocks' attn2 with non-zero weights, loaded by
  ``load_lora`` as a peft adapter;
- ``faceid-fused``: the same with the LoRA fused into the weights (``pipe.fuse_lora``; no extra warm-up);
- ``faceid-compiled`` (``--compile``): ``torch.compile`` of every transformer block (compile time excluded).

Hooks on the transformer time each forward: seconds per video at N steps = before (prompt
encoding + VACE control encoding) + N x median step + after (VAE decode, uint8 frames). It is an
extrapolation from K steps, not an N-step run. Peak memory is read per phase (CUDA allocator).
Then: the transformer forward under each SDPA backend (flash, cuDNN, efficient), the VAE decode with
and without tiling, and the physical bound: matmul FLOP of a forward at ``--peak-tflops``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_common import (PEAK_BF16_TFLOPS, REPO, bench_params, check_device, embed_dim, environment_line,
                        forward_flop, video_tokens, write_results)

PROMPT = "a person dancing, full body, plain background"
NEGATIVE = "blurry, low quality, distorted"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class ForwardTimer:
    """Forward hooks on the transformer: start/end time of each call and the peak memory of the
    phases before the first call, during the calls, and after the last (``expected`` calls)."""

    def __init__(self, transformer, device: torch.device, expected: int):
        self.device, self.expected, self.calls, self.peaks = device, expected, [], {}
        self.handles = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        sync(self.device)
        if not self.calls:
            self.peaks["before"] = peak_gib(self.device)
            reset_peak(self.device)
        self.calls.append([time.perf_counter(), None])

    def _post(self, module, args, output):
        sync(self.device)
        self.calls[-1][1] = time.perf_counter()
        if len(self.calls) == self.expected:
            self.peaks["denoise"] = peak_gib(self.device)
            reset_peak(self.device)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def timed_video(run, transformer, device: torch.device, steps: int, cfg: bool) -> dict:
    """``run(steps)`` renders one video; returns before/step/after seconds and per-phase peaks."""
    per_step = 2 if cfg else 1
    timer = ForwardTimer(transformer, device, steps * per_step)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    try:
        run(steps)
        sync(device)
        t1 = time.perf_counter()
    finally:
        timer.remove()
    calls = timer.calls
    if len(calls) != steps * per_step:
        raise RuntimeError(f"expected {steps * per_step} transformer calls, saw {len(calls)}")
    starts = [calls[i * per_step][0] for i in range(steps)] + [calls[-1][1]]
    step_s = [b - a for a, b in zip(starts, starts[1:])]
    return {"before_s": calls[0][0] - t0, "step_s": statistics.median(step_s[1:] if steps > 1 else step_s),
            "first_step_s": step_s[0], "forward_s": statistics.median(c[1] - c[0] for c in calls[per_step:] or calls),
            "after_s": t1 - calls[-1][1], "wall_s": t1 - t0,
            "peak_before_gib": timer.peaks.get("before"), "peak_denoise_gib": timer.peaks.get("denoise"),
            "peak_after_gib": peak_gib(device)}


def pose_video(frames: int, height: int, width: int) -> np.ndarray:
    """A moving white figure on black (skeleton-like bars): VACE control frames, uint8 [F, H, W, 3]."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    for f in range(frames):
        x = width // 2 + int(width * 0.1 * np.sin(f / 4))
        video[f, height // 6: height * 5 // 6, max(x - 2, 0): x + 2] = 255
        video[f, height // 3: height // 3 + 4, width // 4: width * 3 // 4] = 255
    return video


# --------------------------------------------------------------------------- configurations


def stock_pipeline(weights: Path, device: torch.device, dtype: torch.dtype):
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACEPipeline

    vae = AutoencoderKLWan.from_pretrained(weights, subfolder="vae", dtype=torch.float32)
    pipe = WanVACEPipeline.from_pretrained(weights, vae=vae, dtype=dtype)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def make_identity(pipe, params, folder: Path, rank: int, dim: int) -> Path:
    """An identity folder as train-lora writes it: random FaceMapper, LoRA with non-zero B."""
    from faceid.model.base_model import base_model_id, text_dim
    from faceid.model.identity import save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    tcfg = params.train_lora
    lora_cfg = type(tcfg.lora)(**{**tcfg.lora.__dict__, "rank": rank, "alpha": rank})
    torch.manual_seed(0)
    add_lora(pipe.transformer, lora_cfg, adapter_name="bench")
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name and ".bench." in name:
            p.data.normal_(0, 1e-3)
    mapper = FaceMapper(dim, text_dim(params.model), tcfg.num_face_tokens, tcfg.mapper_hidden_dim)
    emb = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    save_identity(folder, name="bench", card={"base_model": base_model_id(params.model), "embedder": params.embed_faces.embedder},
                  mapper=mapper, embedding=emb, transformer=pipe.transformer, adapter_name="bench")
    pipe.transformer.delete_adapters(["bench"])
    return folder


def sdpa_backends(transformer, device, dtype, frames, height, width, text_tokens) -> list[dict]:
    """One transformer forward (cond branch shape) under each SDPA backend: usable? seconds?"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = transformer.config
    f, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator("cpu").manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, f, h, w, generator=g).to(device, dtype),
                  timestep=torch.tensor([500], device=device),
                  encoder_hidden_states=torch.randn(1, text_tokens, c.text_dim, generator=g).to(device, dtype),
                  control_hidden_states=torch.randn(1, c.vace_in_channels, f, h, w, generator=g).to(device, dtype),
                  control_hidden_states_scale=torch.ones(len(c.vace_layers), device=device, dtype=dtype), return_dict=False)
    rows = []
    for name, backends in (("default", None), ("flash", [SDPBackend.FLASH_ATTENTION]),
                           ("cudnn", [SDPBackend.CUDNN_ATTENTION]), ("efficient", [SDPBackend.EFFICIENT_ATTENTION])):
        try:
            with torch.no_grad(), (sdpa_kernel(backends) if backends else contextlib.nullcontext()):
                times = []
                for _ in range(3):
                    sync(device)
                    t0 = time.perf_counter()
                    transformer(**inputs)
                    sync(device)
                    times.append(time.perf_counter() - t0)
            rows.append({"backend": name, "forward_s": statistics.median(times[1:]), "error": ""})
        except Exception as exc:  # a backend that cannot run these shapes: report it, go on
            rows.append({"backend": name, "forward_s": None, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"})
        print(json.dumps({"sdpa": rows[-1]}), flush=True)
    return rows


def vae_decode(vae, device, frames, height, width) -> list[dict]:
    """The VAE decode of one video's latents, tiling off and on: seconds and peak memory."""
    z = torch.randn(1, vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8).to(device, vae.dtype)
    rows = []
    for tiling in (False, True):
        vae.enable_tiling() if tiling else vae.disable_tiling()
        try:
            gc.collect()
            reset_peak(device)
            with torch.no_grad():
                sync(device)
                t0 = time.perf_counter()
                vae.decode(z, return_dict=False)
                sync(device)
            rows.append({"tiling": tiling, "decode_s": time.perf_counter() - t0, "peak_gib": peak_gib(device), "error": ""})
        except torch.cuda.OutOfMemoryError as exc:
            rows.append({"tiling": tiling, "decode_s": None, "peak_gib": None, "error": f"OOM: {str(exc)[:80]}"})
        print(json.dumps({"vae_decode": rows[-1]}), flush=True)
    vae.disable_tiling()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--weights", required=True, help="Wan2.1-VACE-1.3B diffusers folder (e.g. faceid make-test-weights)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--timed-steps", type=int, default=3, help="timed denoising steps after 1 untimed")
    parser.add_argument("--report-steps", type=int, nargs="+", default=[30, 50])
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--embed-dim", type=int, default=0, help="default: the configured embedder's (dlib: 128)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the transformer blocks")
    parser.add_argument("--skip", nargs="*", default=[], choices=["stock", "faceid", "fused", "sdpa", "vae"])
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    parser.add_argument("--out", help="markdown results (default on CUDA: benchmarks/results/infer_gpu.md)")
    args = parser.parse_args()
    device = check_device(args.device)
    out = args.out or (str(REPO / "benchmarks" / "results" / "infer_gpu.md") if device.type == "cuda" else None)
    run_all(args, device, out)


def run_all(args, device: torch.device, out: str | None) -> None:
    from faceid.model.base_model import resolve_dtype
    from faceid.model.generate import build_pipeline, generate_video, text_len
    from faceid.model.identity import load_identity
    from faceid.model.memory import format_holdings, holdings

    params = bench_params(args.weights, device)
    mcfg = params.model
    dtype = resolve_dtype(mcfg, device)
    steps = 1 + args.timed_steps
    cfg_on = args.guidance > 1.0
    pose = pose_video(args.frames, args.height, args.width)
    warm_frames = min(args.frames, 9)  # warm-up videos: every kernel, a short VAE pass
    results: dict[str, dict] = {}
    print(f"# {environment_line(device)}", flush=True)

    def record(name: str, row: dict) -> None:
        results[name] = row
        print(json.dumps({"config": name, **row}), flush=True)

    # 1. Stock diffusers (no identity); the first video warms kernels up, untimed
    if "stock" not in args.skip:
        from PIL import Image

        stock = stock_pipeline(Path(args.weights), device, dtype)
        frames = [Image.fromarray(f) for f in pose]

        def stock_run(n, num_frames=args.frames):
            stock(video=frames[:num_frames], prompt=PROMPT, negative_prompt=NEGATIVE, height=args.height, width=args.width,
                  num_frames=num_frames, num_inference_steps=n, guidance_scale=args.guidance,
                  generator=torch.Generator("cpu").manual_seed(0), output_type="np")

        stock_run(1, warm_frames)
        record("stock", timed_video(stock_run, stock.transformer, device, steps, cfg_on))
        del stock
        gc.collect()

    # 2. faceid: the library's pipeline, an identity folder (face tokens + LoRA)
    pipe = build_pipeline(mcfg, device)  # with the profile's memory options once build_pipeline applies them
    pipe.set_progress_bar_config(disable=True)
    text_tokens = text_len(pipe) + params.train_lora.num_face_tokens
    with tempfile.TemporaryDirectory() as tmp:
        dim = embed_dim(params, args.embed_dim)
        ident = load_identity(make_identity(pipe, params, Path(tmp) / "bench", args.lora_rank, dim), model_cfg=mcfg)

        def faceid_run(n, num_frames=args.frames):
            generate_video(pipe, ident, pose[:num_frames], PROMPT, face_scale=1.0, lora_scale=1.0, guidance_scale=args.guidance,
                           num_inference_steps=n, seed=0, negative_prompt=NEGATIVE)

        if "faceid" not in args.skip:
            faceid_run(1, warm_frames)  # warm-up; loads the LoRA
            record("faceid", timed_video(faceid_run, pipe.transformer, device, steps, cfg_on))
        print("holdings (weights only):\n" + format_holdings(holdings(pipe)), flush=True)

        # 3. The same with the LoRA fused into the base weights
        if "fused" not in args.skip and "faceid" not in args.skip:
            names = pipe.get_list_adapters()["transformer"]
            pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
            record("faceid-fused", timed_video(faceid_run, pipe.transformer, device, steps, cfg_on))
            pipe.unfuse_lora(components=["transformer"])

        # 4. torch.compile of the blocks (compile time spent in a full-size warm-up, excluded)
        if args.compile:
            for block in [*pipe.transformer.blocks, *pipe.transformer.vace_blocks]:
                block.compile()
            t0 = time.perf_counter()
            faceid_run(2)
            print(json.dumps({"compile_warmup_s": time.perf_counter() - t0}), flush=True)
            record("faceid-compiled", timed_video(faceid_run, pipe.transformer, device, steps, cfg_on))

    # 5. SDPA backends and VAE tiling
    sdpa = [] if "sdpa" in args.skip or args.compile else sdpa_backends(
        pipe.transformer, device, dtype, args.frames, args.height, args.width, text_tokens)
    vae = [] if "vae" in args.skip else vae_decode(pipe.vae, device, args.frames, args.height, args.width)

    # 6. Report
    tokens = video_tokens(pipe.transformer.config, args.frames, args.height, args.width)
    flop = forward_flop(pipe.transformer.config, tokens, text_tokens, args.lora_rank, params.train_lora.lora.targets)
    text = report(args, device, results, sdpa, vae, flop, tokens, text_len(pipe), format_holdings(holdings(pipe)))
    print(text, flush=True)
    if out:
        write_results(out, text)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args, device, results, sdpa, vae, flop, tokens, text_tokens, held) -> str:
    passes = 2 if args.guidance > 1.0 else 1
    bound_step = passes * flop["total"] / (args.peak_tflops * 1e12)
    head = " | ".join(f"s/video @{n}" for n in args.report_steps)
    lines = [
        "# Inference: stock diffusers vs faceid's identity path (`benchmarks/bench_infer_gpu.py`)", "",
        f"Machine: {environment_line(device)}.",
        f"Weights: `{args.weights}` (Wan2.1-VACE-1.3B architecture; random test weights time like real ones).",
        f"Video: {args.frames} frames {args.height}x{args.width} -> {tokens} video tokens, {text_tokens} text tokens "
        f"(+ faceid's face tokens), guidance {args.guidance} ({passes} transformer passes per step), UniPC.",
        f"Timing: 1 untimed + {args.timed_steps} timed steps per video after a 9-frame warm-up video; "
        f"**s/video @N = before + N x step + after, extrapolated** from those steps (before: prompt + VACE "
        f"control encode; after: VAE decode and uint8 frames). Peak memory per phase from the CUDA allocator "
        f"(text encoder: the test weights' 2-layer UMT5; the real UMT5-XXL adds 11.4 GB bf16 while it is on the device).",
        f"Bound: a forward is {flop['total']:.3g} FLOP ({flop['main']:.3g} in the {flop['main_blocks']} main blocks, the rest "
        f"in the {flop['vace_blocks']} VACE blocks; LoRA r{args.lora_rank} adds {flop['lora']:.2g}); at {args.peak_tflops:.0f} "
        f"TFLOP/s bf16 a step is "
        f"{bound_step:.2f} s. 'share of bound' = bound / measured step.", "",
        f"| configuration | step (s) | forward (s) | before (s) | after (s) | {head} | share of bound | "
        f"peak before / denoise / after (GiB) | vs stock |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(args.report_steps) + "---:|---|---:|",
    ]
    stock = results.get("stock")
    for name, r in results.items():
        per_video = [r["before_s"] + n * r["step_s"] + r["after_s"] for n in args.report_steps]
        ratio = ""
        if stock and name != "stock":
            s30 = stock["before_s"] + args.report_steps[0] * stock["step_s"] + stock["after_s"]
            ratio = f"{per_video[0] / s30:.3f}"
        peaks = " / ".join(fmt(r[k], ".1f") for k in ("peak_before_gib", "peak_denoise_gib", "peak_after_gib"))
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['forward_s']:.3f} | {r['before_s']:.2f} | {r['after_s']:.2f} | "
                     + " | ".join(f"{v:.1f}" for v in per_video) + f" | {bound_step / r['step_s']:.0%} | {peaks} | {ratio} |")
    if sdpa:
        lines += ["", "SDPA backend, one transformer forward (cond shape, LoRA active):", "",
                  "| backend | forward (s) | note |", "|---|---:|---|"]
        lines += [f"| {r['backend']} | {fmt(r['forward_s'], '.3f')} | {r['error']} |" for r in sdpa]
    if vae:
        lines += ["", "VAE decode of one video's latents:", "", "| tiling | seconds | peak (GiB) | note |", "|---|---:|---:|---|"]
        lines += [f"| {'on' if r['tiling'] else 'off'} | {fmt(r['decode_s'], '.2f')} | {fmt(r['peak_gib'], '.1f')} | "
                  f"{r['error']} |" for r in vae]
    lines += ["", "Weights held by the faceid pipeline at the end (parameters + buffers):", "", "```", held, "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
