"""Inference on one GPU, end to end as users run it: stock diffusers vs faceid's real profile, uncompiled and compiled.

    python benchmarks/bench_infer_gpu.py --weights W                    # 480x832x81, 50 steps, CFG 5, 3 rounds
    python benchmarks/bench_infer_gpu.py --weights W --budget-s 500     # as many runs as fit; rerun to continue
    python benchmarks/bench_infer_gpu.py --device cpu --weights .cache/test-weights/tiny \\
        --frames 5 --height 32 --width 32 --steps 2 --repeats 1 --out /tmp/infer.md      # logic check on CPU

Weights: a Wan2.1-VACE-1.3B diffusers folder, e.g. random test weights with the full-size text encoder
(``faceid make-test-weights --size real --text-encoder umt5-xxl``: speed and memory do not depend on
the values; with the 2-layer test encoder, prompt encoding is not what users pay). Configurations,
each its own pipeline, all resident on the device, each warmed up by one full-size 2-step video
(kernels, autotuning, and for the compiled one torch.compile: its time is reported):

- ``stock``: ``WanVACEPipeline.from_pretrained(weights, bf16)`` with a float32 VAE and UniPC
  flow_shift 3 (the Wan docs' recipe); text encoder resident on the device (as diffusers leaves it),
  prompt strings, no identity;
- ``faceid``: :class:`faceid.render.Generator` on the shipped real profile (params.yaml +
  configs/wan2.1-vace-1.3b.yaml: text encoder offloaded, VAE tiling, ``model.compile`` as shipped: off)
  rendering an identity folder made with the profile's LoRA (rank, targets; non-zero weights) and
  face tokens, through ``Generator.generate`` (``faceid infer``'s path);
- ``faceid-compiled``: the same with ``model.compile`` on (blocks compiled, the LoRA fused: ``fuse_identity``).

Measured, not extrapolated: every run is a whole ``--steps`` video from the call to the uint8 frames
(CUDA synchronised). Hooks on the transformer split it into before (prompt encode + VACE control
encode), denoise and after (VAE decode). ``--repeats`` rounds, the order rotating (round r starts at
configuration r: A B C, B C A, C A B); each run has a new prompt (a ``faceid infer`` call: faceid
encodes it, the offloaded encoder visiting the device) unless ``--same-prompt`` (batch-infer: encoded
once). Per configuration: median and spread (min-max) of the video seconds; the ratio of medians to
stock. Peak memory of a run = its pipeline's weights on the device + the allocator's peak above what
was allocated when the run started (the other pipelines' weights left out).

Runs append to ``--runs`` (JSON lines; default beside ``--out``): rerunning the same command carries
on with the runs still missing, so a device session with 10-minute calls can split the work
(``--budget-s``: no run starts that would end after it). The report is made from every run in the file.
Then: faceid's prompt encode with a new prompt (encoder to the device, encode, back; seconds and the
peak while it is there) against stock's resident encoder, what each pipeline holds, and the bound:
a forward's matmul FLOP at ``--peak-tflops`` (default the H100/H200 dense bf16 spec, 989).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gpu_common import (PEAK_BF16_TFLOPS, REPO, bench_params, check_device, embed_dim, environment_line,
                        forward_flop, video_tokens, write_results)

PROMPT = "a person dancing, full body, plain background"
CONFIGS = ("stock", "faceid", "faceid-compiled")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_weights_gib(pipe) -> float:
    """Weights (parameters + buffers) of the pipeline's components that sit on a CUDA device."""
    from faceid.model.memory import holdings

    return sum(r["bytes"] for r in holdings(pipe) if r["device"].startswith("cuda")) / 2**30


class Phases:
    """Forward hooks on the transformer: times of its first call's start and last call's end."""

    def __init__(self, transformer, device: torch.device):
        self.device, self.first, self.last, self.calls = device, None, None, 0
        self.handles = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _pre(self, module, args):
        if self.first is None:
            sync(self.device)
            self.first = time.perf_counter()

    def _post(self, module, args, output):
        sync(self.device)  # ~ms a forward, the same for every configuration
        self.calls += 1
        self.last = time.perf_counter()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def measured_run(render, pipe, device: torch.device) -> dict:
    """``render()`` renders one whole video: wall seconds, phases, peak memory (weights + run)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    sync(device)
    base = allocated_gib(device)
    reset_peak(device)
    phases = Phases(pipe.transformer, device)
    t0 = time.perf_counter()
    try:
        render()
        sync(device)
        t1 = time.perf_counter()
    finally:
        phases.remove()
    return {"video_s": t1 - t0, "before_s": phases.first - t0, "denoise_s": phases.last - phases.first,
            "after_s": t1 - phases.last, "forwards": phases.calls,
            "peak_gib": device_weights_gib(pipe) + max(peak_gib(device) - base, 0.0)}


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


def make_identity(pipe, params, folder: Path, dim: int) -> Path:
    """An identity folder as train-lora writes it with the profile's LoRA (rank, targets): random
    FaceMapper, LoRA with non-zero B (so it costs what a trained one costs)."""
    from faceid.model.base_model import base_model_id, text_dim
    from faceid.model.identity import save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    tcfg = params.train_lora
    torch.manual_seed(0)
    add_lora(pipe.transformer, tcfg.lora, adapter_name="bench")
    for name, p in pipe.transformer.named_parameters():
        if "lora_B" in name and ".bench." in name:
            p.data.normal_(0, 1e-3)
    mapper = FaceMapper(dim, text_dim(params.model), tcfg.num_face_tokens, tcfg.mapper_hidden_dim)
    emb = torch.nn.functional.normalize(torch.randn(dim), dim=0)
    save_identity(folder, name="bench", card={"base_model": base_model_id(params.model), "embedder": params.embed_faces.embedder},
                  mapper=mapper, embedding=emb, transformer=pipe.transformer, adapter_name="bench")
    pipe.transformer.delete_adapters(["bench"])
    return folder


def schedule(configs: list[str], repeats: int) -> list[tuple[int, str]]:
    """``(round, config)`` in run order: round r starts at configuration r (mod n)."""
    n = len(configs)
    return [(r, configs[(r + i) % n]) for r in range(repeats) for i in range(n)]


def read_runs(path: Path, key: dict) -> list[dict]:
    """Runs of ``path`` made with the same ``key`` (weights, geometry, steps, ...); others are ignored."""
    if not path.is_file():
        return []
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in runs if r.get("key") == key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--weights", required=True, help="Wan2.1-VACE-1.3B diffusers folder (faceid make-test-weights)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=50, help="denoising steps of every measured video")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each runs every configuration once")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--same-prompt", action="store_true", help="one prompt for every run (batch-infer); default: a new one each")
    parser.add_argument("--embed-dim", type=int, default=0, help="default: the configured embedder's (dlib: 128)")
    parser.add_argument("--budget-s", type=float, default=0, help="start no run that would end later than this (0: no limit)")
    parser.add_argument("--peak-tflops", type=float, default=PEAK_BF16_TFLOPS)
    parser.add_argument("--out", help="markdown results (default on CUDA: benchmarks/results/infer_gpu_e2e.md)")
    parser.add_argument("--runs", help="JSON lines of the runs (default: <out>.runs.jsonl)")
    args = parser.parse_args()
    device = check_device(args.device)
    out = args.out or (str(REPO / "benchmarks" / "results" / "infer_gpu_e2e.md") if device.type == "cuda" else None)
    runs_path = Path(args.runs or (f"{out}.runs.jsonl" if out else tempfile.mkstemp(suffix=".jsonl")[1]))
    run_all(args, device, out, runs_path)


def run_all(args, device: torch.device, out: str | None, runs_path: Path) -> None:
    from faceid.config import params_from_dict, to_dict
    from faceid.model.base_model import resolve_dtype
    from faceid.model.generate import text_len
    from faceid.model.memory import format_holdings, holdings
    from faceid.render import Generator, Settings

    t_start = time.perf_counter()
    params = bench_params(args.weights, device)
    dtype = resolve_dtype(params.model, device)
    pose = pose_video(args.frames, args.height, args.width)
    key = {"weights": str(Path(args.weights).resolve()), "device": environment_line(device).split(";")[0],
           "geometry": [args.frames, args.height, args.width], "steps": args.steps, "guidance": args.guidance,
           "same_prompt": args.same_prompt, "profile": to_dict(params.model) | {"weights_dir": None},
           "lora": to_dict(params.train_lora.lora)}
    done = read_runs(runs_path, key)
    todo = [(r, c) for r, c in schedule(args.configs, args.repeats)
            if not any(d["round"] == r and d["config"] == c for d in done)]
    print(f"# {environment_line(device)}\n# {len(done)} runs in {runs_path}, {len(todo)} to do", flush=True)

    # 1. Pipelines, all resident: stock; faceid on the real profile, uncompiled and compiled
    pipes, renders, extra = {}, {}, {"warmup": {}, "compile_s": {}, "holdings": {}}
    frames_pil = None
    needed = sorted({c for _, c in todo} | ({"stock", "faceid"} & set(args.configs)), key=CONFIGS.index)
    tmp = tempfile.TemporaryDirectory()
    identity_dir = None

    def settings(n: int, prompt: str) -> Settings:
        return Settings(face_scale=1.0, lora_scale=1.0, guidance_scale=args.guidance, num_inference_steps=n, seed=0,
                        prompt=prompt)

    for name in needed:
        if name == "stock":
            from PIL import Image

            stock = stock_pipeline(Path(args.weights), device, dtype)
            frames_pil = [Image.fromarray(f) for f in pose]
            pipes[name] = stock

            def render(n, prompt, pipe=stock, frames=frames_pil):
                pipe(video=frames, prompt=prompt, negative_prompt="", height=args.height, width=args.width,
                     num_frames=args.frames, num_inference_steps=n, guidance_scale=args.guidance,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        else:
            p = params_from_dict(to_dict(params), [f"model.compile={'true' if name == 'faceid-compiled' else 'false'}"])
            gen = Generator(p, device=device)
            gen.pipe.set_progress_bar_config(disable=True)
            if identity_dir is None:
                identity_dir = make_identity(gen.pipe, p, Path(tmp.name) / "bench", embed_dim(p, args.embed_dim))
            ident = gen.conditioning(str(identity_dir))
            gen.fuse_identity(str(identity_dir), settings(1, PROMPT))  # compiled only (faceid infer does the same)
            pipes[name] = gen.pipe

            def render(n, prompt, gen=gen, ident=ident):
                gen.generate(ident, pose, prompt, settings(n, prompt))
        renders[name] = render
        if not any(c == name for _, c in todo):
            extra["holdings"][name] = format_holdings(holdings(pipes[name]))
            continue
        t0 = time.perf_counter()
        render(2, PROMPT)  # warm-up: full size, 2 steps (compiles the blocks of faceid-compiled)
        sync(device)
        extra["warmup"][name] = time.perf_counter() - t0
        if name == "faceid-compiled":
            extra["compile_s"][name] = gen.compile_clock.compile_s
        extra["holdings"][name] = format_holdings(holdings(pipes[name]))
        print(json.dumps({"warmup": name, "seconds": round(extra["warmup"][name], 2),
                          "compile_s": extra["compile_s"].get(name)}), flush=True)

    # 2. Measured runs, whole videos, in rotating order; each appended to the runs file at once
    per_run = {}
    for r, name in todo:
        elapsed = time.perf_counter() - t_start
        warm = extra["warmup"].get("faceid" if name == "faceid-compiled" else name, 0.0)  # compile time left out
        guess = max((d["video_s"] for d in done if d["config"] == name), default=warm * args.steps / 2)
        if args.budget_s and elapsed + guess > args.budget_s:
            print(f"# budget: {elapsed:.0f} s used, next run ~{guess:.0f} s: stopping; rerun the command to continue", flush=True)
            break
        prompt = PROMPT if args.same_prompt else f"{PROMPT}, take {r}"
        row = {"key": key, "round": r, "config": name, "prompt": prompt,
               **measured_run(lambda: renders[name](args.steps, prompt), pipes[name], device)}
        done.append(row)
        per_run[name] = row
        runs_path.parent.mkdir(parents=True, exist_ok=True)
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "key"}), flush=True)

    # 3. Prompt encoding: faceid's offloaded encoder (a new prompt) vs stock's resident one
    encode = prompt_encode(pipes, device, args.guidance > 1.0)

    # 4. Report from every run in the file
    any_pipe = next(iter(pipes.values()))
    tokens = video_tokens(any_pipe.transformer.config, args.frames, args.height, args.width)
    lora = params.train_lora.lora
    flop = forward_flop(any_pipe.transformer.config, tokens, text_len(any_pipe) + params.train_lora.num_face_tokens,
                        lora.rank, lora.targets)
    text = report(args, device, params, done, extra, encode, flop, tokens)
    print(text, flush=True)
    if out:
        write_results(out, text)
    tmp.cleanup()


def prompt_encode(pipes: dict, device: torch.device, cfg: bool) -> list[dict]:
    """Seconds and device peak of encoding a new prompt (+ the kept negative): faceid with
    ``model.text_encoder_offload`` (the encoder visits the device), stock with its resident encoder."""
    from faceid.model.prompts import PromptCache

    rows = []
    for name, pipe in pipes.items():
        if name == "faceid-compiled":
            continue
        gc.collect()
        sync(device)
        base = allocated_gib(device)
        reset_peak(device)
        t0 = time.perf_counter()
        if name == "stock":
            with torch.no_grad():
                pipe.encode_prompt(prompt=f"{PROMPT}, encode check", negative_prompt="" if cfg else None,
                                   do_classifier_free_guidance=cfg, device=device)
        else:
            PromptCache().encode(pipe, f"{PROMPT}, encode check", "" if cfg else None)
        sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"config": name, "encode_s": seconds, "encoder_device": str(pipe.text_encoder.device),
                     "peak_gib": device_weights_gib(pipe) + max(peak_gib(device) - base, 0.0),
                     "encoder_gib": sum(p.numel() * p.element_size() for p in pipe.text_encoder.parameters()) / 2**30})
        print(json.dumps({"prompt_encode": rows[-1]}), flush=True)
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(args, device, params, runs, extra, encode, flop, tokens) -> str:
    passes = 2 if args.guidance > 1.0 else 1
    bound_step = passes * flop["total"] / (args.peak_tflops * 1e12)
    by = {c: [r for r in runs if r["config"] == c] for c in args.configs}
    med = {c: statistics.median(r["video_s"] for r in rs) for c, rs in by.items() if rs}
    complete = all(len(by[c]) >= args.repeats for c in args.configs)
    m = params.model
    lora = params.train_lora.lora
    lines = [
        "# Inference end to end: stock diffusers vs faceid's real profile (`benchmarks/bench_infer_gpu.py`)", "",
        f"Machine: {environment_line(device)}.",
        f"Weights: `{args.weights}` (Wan2.1-VACE-1.3B layout, random test weights: speed and memory do not depend on the values).",
        f"Video: {args.frames} frames {args.height}x{args.width} -> {tokens} video tokens, **{args.steps} steps measured** "
        f"(whole videos, nothing extrapolated), guidance {args.guidance} ({passes} transformer passes a step), UniPC; "
        + ("one prompt for every run (batch-infer: faceid encodes it once)." if args.same_prompt else
           "a new prompt each run (a `faceid infer` call: faceid encodes it, its offloaded encoder visiting the device)."),
        f"faceid: the shipped real profile (text_encoder_offload {m.text_encoder_offload}, vae_tiling {m.vae_tiling}, "
        f"dtype {m.dtype}), identity with face tokens and LoRA rank {lora.rank} `{lora.targets}`; `faceid-compiled`: "
        f"model.compile true (the blocks compiled, the LoRA fused).",
        f"Order: {args.repeats} rounds, rotating (round r starts at configuration r). "
        + ("" if complete else f"**Incomplete: {sum(len(v) for v in by.values())} of {args.repeats * len(args.configs)} runs.**"),
        f"Bound: a forward is {flop['total']:.3g} FLOP of matmuls ({flop['main']:.3g} in the {flop['main_blocks']} main blocks, "
        f"the rest in the {flop['vace_blocks']} VACE blocks; the LoRA adds {flop['lora']:.2g}); at {args.peak_tflops:.0f} TFLOP/s "
        f"({'the H100/H200 dense bf16 spec peak' if args.peak_tflops == PEAK_BF16_TFLOPS else 'given with --peak-tflops'}) "
        f"a step is {bound_step:.2f} s. 'share of bound' = that / the measured denoise s a step.", "",
        "| configuration | runs | s/video median | spread (min-max) | vs stock | before (s) | denoise (s) | after (s) | "
        "s/step | share of bound | peak (GiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c, rs in by.items():
        if not rs:
            lines.append(f"| {c} | 0 | - | - | - | - | - | - | - | - | - |")
            continue
        mid = lambda k: statistics.median(r[k] for r in rs)  # noqa: E731
        step = mid("denoise_s") / args.steps
        ratio = f"{med[c] / med['stock']:.3f}" if "stock" in med and c != "stock" else ""
        spread = f"{min(r['video_s'] for r in rs):.1f}-{max(r['video_s'] for r in rs):.1f}"
        lines.append(f"| {c} | {len(rs)} | {med[c]:.1f} | {spread} | {ratio} | {mid('before_s'):.2f} | {mid('denoise_s'):.1f} | "
                     f"{mid('after_s'):.2f} | {step:.3f} | {bound_step / step:.0%} | {max(r['peak_gib'] for r in rs):.1f} |")
    lines += ["", "Peak = the pipeline's weights on the device + the allocator's peak above what the run started with "
              "(the other resident pipelines left out).", ""]
    if extra["warmup"]:
        lines += ["Warm-up (one full-size 2-step video per pipeline, this process): " + ", ".join(
            f"{c} {s:.1f} s" for c, s in extra["warmup"].items())
            + "".join(f"; torch.compile of {c}'s blocks {fmt(s, '.1f')} s (first forward minus the second)"
                      for c, s in extra["compile_s"].items()) + ".", ""]
    if encode:
        lines += ["Prompt encoding, a new prompt and the negative (seconds include an offloaded encoder's trips):", "",
                  "| pipeline | text encoder | encoder weights (GiB) | seconds | peak while encoding (GiB) |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['config']} | {'offloaded (CPU between prompts)' if r['config'] != 'stock' else 'resident'} | "
                  f"{r['encoder_gib']:.1f} | {r['encode_s']:.2f} | {r['peak_gib']:.1f} |" for r in encode]
        lines.append("")
    lines += ["Weights held by each pipeline at the end (parameters + buffers):", ""]
    for c, held in extra["holdings"].items():
        lines += [f"{c}:", "```", held, "```"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
