"""The real profile end to end on CPU, through the CLI users run, on random real-architecture weights.

    make smoke-real                       # = python benchmarks/smoke_real.py (builds the test weights once)
    python benchmarks/smoke_real.py --size tiny          # the same steps on the tiny test weights (minutes)
    python benchmarks/smoke_real.py --set model.device=cuda --set prepare_pose.height=480 ...   # on a GPU

Steps (each a ``faceid`` subprocess with ``--set @configs/wan2.1-vace-1.3b.yaml
--set model.weights_dir=<test weights>`` and a small geometry: 9 frames 64x64, 1 step per training
stage, 1 denoising step with CFG, gradient checkpointing on): sample-data, crop-faces, embed-faces,
prepare-pose, train-lora (Ray Train + MLflow), render-validation, infer, batch-infer with a blend
of two identity folders (the trained one and a copy). Then the checks:

1. the identity card names the test-weights base model (``<profile>@test-weights-<id>``), never
   the bare profile;
2. the LoRA file loads into a stock ``WanVACEPipeline.from_pretrained(<weights>)`` with
   ``load_lora_weights`` (an adapter on each of the 30 main blocks' attn2 projections, among the
   real profile's ``main-attn-ffn`` targets) and changes
   its transformer's output;
3. the face tokens reach every one of the 30 main blocks' cross-attention: during a faceid
   generation, each ``blocks.N.attn2`` receives text + face tokens, and changing the face rows of
   its context changes its output; and they start in the text tokens' range (:func:`check_token_scale`):
   the card's ``face_token_scale`` is the RMS of the run's caption tokens from the real UMT5 layout,
   and an initialised mapper's tokens are within 20 % of it.

Prints wall time and peak RSS (the whole process tree, Ray workers included, sampled) per step.
The weights are random: the videos are noise, FaceSim and the gate mean nothing here.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMALL = [  # geometry and step counts of the smoke run (override with --set)
    "prepare_pose.num_frames=9", "prepare_pose.height=64", "prepare_pose.width=64", "prepare_pose.max_clips_per_video=2",
    "train_lora.stage1.steps=1", "train_lora.stage2.steps=1", "train_lora.stage1.warmup_steps=0",
    "train_lora.stage2.warmup_steps=0", "train_lora.checkpoint_every=1", "train_lora.gradient_checkpointing=true",
    "train_lora.use_gpu=false", "train_lora.num_workers=1", "train_lora.photos.views=1",
    # validation during training: the held-out loss at one timestep; no renders (each costs minutes on CPU at
    # this size; render_validation renders the real profile below)
    "train_lora.validation.num_timesteps=1", "train_lora.validation.render_every=0",
    "render_validation.num_clips=1", "render_validation.num_inference_steps=1",
    "batch_infer.num_inference_steps=1", "batch_infer.use_gpu=false", "batch_infer.num_workers=1",
    "model.device=cpu",
]


class TreeRss:
    """Peak summed RSS of a process and all its descendants (sampled every 0.5 s)."""

    def __init__(self, pid: int):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
                self.peak = max(self.peak, total)
            except psutil.Error:
                return
            self._stop.wait(0.5)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_step(name: str, argv: list[str], sets: list[str], log: Path, timings: list[dict]) -> None:
    cmd = [sys.executable, "-m", "faceid.cli", "--params", str(REPO / "params.yaml")]
    for s in sets:
        cmd += ["--set", s]
    cmd += argv
    print(f"\n=== {name}: faceid {' '.join(argv)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n=== {name}: {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        rss = TreeRss(proc.pid)
        for line in proc.stdout:
            f.write(line)
            if not line.startswith(("Loading", "  0%")) and "it/s]" not in line:
                print(f"  {line.rstrip()[:200]}", flush=True)
        rc = proc.wait()
        peak = rss.stop()
    row = {"step": name, "seconds": time.perf_counter() - t0, "peak_rss_gib": peak / 2**30, "rc": rc}
    timings.append(row)
    print(f"=== {name}: exit {rc}, {row['seconds']:.0f} s, peak RSS {row['peak_rss_gib']:.1f} GiB", flush=True)
    if rc != 0:
        raise SystemExit(f"smoke-real: {name} failed (exit {rc}); log: {log}")


# --------------------------------------------------------------------------- checks


def check_card(identity_dir: Path, params) -> str:
    from faceid.model.base_model import base_model_id

    card = json.loads((identity_dir / "identity.json").read_text())
    expected = base_model_id(params.model)
    assert "@test-weights-" in expected, f"base_model_id {expected!r} does not name the test weights"
    assert card["base_model"] == expected, f"card base_model {card['base_model']!r} != {expected!r}"
    return card["base_model"]


def small_inputs(transformer, text_tokens: int, frames: int = 5, size: int = 32):
    import torch

    c = transformer.config
    g = torch.Generator("cpu").manual_seed(0)
    f, h = (frames - 1) // 4 + 1, size // 8
    return dict(hidden_states=torch.randn(1, 16, f, h, h, generator=g), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, text_tokens, c.text_dim, generator=g),
                control_hidden_states=torch.randn(1, c.vace_in_channels, f, h, h, generator=g), return_dict=False)


def check_stock_lora(weights: Path, identity_dir: Path) -> dict:
    """A stock pipeline from the same folder takes the LoRA file and its output changes."""
    import torch
    from diffusers import WanVACEPipeline
    from safetensors.torch import load_file

    from faceid.model.lora import LORA_FILE

    pipe = WanVACEPipeline.from_pretrained(weights, dtype=torch.float32)
    inputs = small_inputs(pipe.transformer, 16)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
    pipe.load_lora_weights(str(identity_dir), weight_name=LORA_FILE, adapter_name="smoke")
    lora_modules = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n})
    main_attn2 = [m for m in lora_modules if m.startswith("blocks.") and ".attn2." in m]
    n_blocks = pipe.transformer.config.num_layers
    assert len(main_attn2) == 4 * n_blocks, f"LoRA on {len(main_attn2)} main attn2 projections, expected {4 * n_blocks}"
    expected = load_file(str(identity_dir / LORA_FILE))
    with torch.no_grad():
        adapted = pipe.transformer(**inputs)[0]
    diff = (adapted - base).abs().max().item()
    assert diff > 0, "the LoRA loaded but the transformer output did not change"
    del pipe
    return {"lora_tensors": len(expected), "lora_modules": len(lora_modules), "max_abs_output_change": diff}


def check_face_tokens(params, identity_dir: Path, pose_frames) -> dict:
    """Hooks on blocks.N.attn2 during a faceid generation: context = text + face tokens in every
    main block, and the face rows of that context change each block's cross-attention output."""
    import torch

    from faceid.model.generate import build_pipeline, generate_video, text_len
    from faceid.model.identity import load_identity

    pipe = build_pipeline(params.model)
    pipe.set_progress_bar_config(disable=True)
    ident = load_identity(identity_dir, model_cfg=params.model)
    n_text, n_face = text_len(pipe), ident.card["num_face_tokens"]
    seen: dict[int, tuple] = {}

    def hook(index):
        def pre(module, args):
            seen.setdefault(index, (args[0].detach().clone(), args[1].detach().clone()))
        return pre

    blocks = pipe.transformer.blocks
    handles = [b.attn2.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        generate_video(pipe, ident, pose_frames, "a person dancing", face_scale=1.0, lora_scale=1.0, guidance_scale=1.0,
                       num_inference_steps=1, seed=0)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(len(blocks))), f"attn2 ran in blocks {sorted(seen)}"
    changes = []
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden, context = seen[i]
            assert context.shape[1] == n_text + n_face, f"block {i}: attn2 context of {context.shape[1]} tokens, expected {n_text} + {n_face}"
            moved = context.clone()
            moved[:, n_text:] = moved[:, n_text:].flip(1) + 1.0  # other face tokens, same text
            a, b = block.attn2(hidden, context, None, None), block.attn2(hidden, moved, None, None)
            changes.append((a - b).abs().max().item())
    assert all(c > 0 for c in changes), f"face tokens do not change attn2 output in blocks {[i for i, c in enumerate(changes) if c <= 0]}"
    scale = check_token_scale(params, pipe, ident)
    del pipe
    return {"blocks": len(blocks), "context_tokens": n_text + n_face, "min_attn2_change": min(changes), **scale}


def check_token_scale(params, pipe, ident) -> dict:
    """Face tokens start in the text tokens' range (issue 20) on the real UMT5 layout: the RMS of the
    run's caption tokens, measured here with this pipeline's text encoder (non-padding rows), matches
    the card's ``face_token_scale`` (what train-lora measured), and a freshly initialised mapper
    calibrated to it has token RMS within 20 % of it."""
    import torch

    from faceid.model.generate import encode_text
    from faceid.model.mapper import caption_token_rms, initial_mapper

    captions = {params.prepare_pose.default_caption, params.train_lora.photos.default_caption or params.prepare_pose.default_caption}
    with torch.no_grad():
        texts = [encode_text(pipe, c)[0].float().cpu() for c in sorted(captions)]
    text_rms = caption_token_rms(texts)
    card_scale = ident.card["face_token_scale"]
    assert abs(card_scale - text_rms) <= 0.05 * text_rms, f"card face_token_scale {card_scale} vs caption RMS {text_rms}"
    cfg = ident.mapper.config()
    mapper = initial_mapper(cfg["embed_dim"], cfg["text_dim"], cfg["num_tokens"], cfg["hidden_dim"], seed=0).calibrate(text_rms)
    with torch.no_grad():
        token_rms = float(mapper.ungated(ident.embedding[None]).pow(2).mean(-1).sqrt().mean())
        closed = float(mapper(ident.embedding[None]).abs().max()) == 0.0
    assert abs(token_rms - text_rms) <= 0.2 * text_rms, f"face token RMS {token_rms} vs text RMS {text_rms}"
    assert closed, "the untrained mapper's gate is not closed"
    return {"caption_token_rms": text_rms, "face_token_rms_at_init": token_rms, "face_gate": ident.card["face_gate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--size", choices=["real", "tiny"], default="real", help="test weights to run on")
    parser.add_argument("--weights", help="weights folder (default: .cache/test-weights/<size>, written if missing)")
    parser.add_argument("--work", default=".cache/smoke-real", help="work folder (replaced)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--from-step", default="sample-data", help="resume: skip the steps before this one")
    args = parser.parse_args()
    t_start = time.perf_counter()
    os.chdir(REPO)

    from faceid.config import load_params
    from faceid.io import read_parquet
    from faceid.model.test_weights import default_output

    # 1. Test weights (cached) and the work folder
    weights = Path(args.weights or default_output(args.size)).resolve()
    timings: list[dict] = []
    work = Path(args.work).resolve()
    log = work.with_suffix(".log")
    steps = ["sample-data", "crop-faces", "embed-faces", "prepare-pose", "train-lora", "render-validation", "infer", "batch-infer"]
    skip = steps[: steps.index(args.from_step)]
    if not skip:
        shutil.rmtree(work, ignore_errors=True)
        log.unlink(missing_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    if not (weights / "model_index.json").is_file():
        run_step("make-test-weights", ["make-test-weights", "--size", args.size, "--output", str(weights)], [], log, timings)
    sets = [f"@{REPO / 'configs' / 'wan2.1-vace-1.3b.yaml'}", f"model.weights_dir={weights}", *SMALL,
            f"train_lora.cache_dir={work / 'latents'}", f"ray.storage_path={work / 'ray'}",
            f"tracking.local_store={work / 'mlruns'}", "ray.num_cpus=2", *args.overrides]
    params = load_params(REPO / "params.yaml", sets)
    sample, ident = work / "sample", work / "obama"

    # 2. The stages, as users run them
    plan = [
        ("sample-data", ["sample-data", "--output", str(sample)]),
        ("crop-faces", ["crop-faces", "--input", str(sample / "identities" / "obama"), "--output", str(ident / "crops")]),
        ("embed-faces", ["embed-faces", "--crops", str(ident / "crops"), "--output", str(ident / "embeddings")]),
        ("prepare-pose", ["prepare-pose", "--videos", str(sample / "videos"), "--output", str(work / "clips")]),
        ("train-lora", ["train-lora", "--identity", "obama", "--crops", str(ident / "crops"), "--embeddings",
                        str(ident / "embeddings"), "--clips", str(work / "clips"), "--output", str(ident / "identity")]),
        ("render-validation", ["render-validation", "--identity", str(ident / "identity"), "--clips", str(work / "clips"),
                               "--reference", str(ident / "embeddings"), "--output", str(ident / "validation")]),
    ]
    for name, argv in plan:
        if name not in skip:
            run_step(name, argv, sets, log, timings)
    clips = [r for r in read_parquet(work / "clips" / "manifest.parquet") if r.get("status", "ok") == "ok" and r.get("pose_path")]
    pose_path = (work / "clips" / clips[-1]["pose_path"]).resolve()
    if "infer" not in skip:
        run_step("infer", ["infer", "--identity", str(ident / "identity"), "--pose-video", str(pose_path),
                           "--output", str(work / "infer" / "obama.mp4"), "--steps", "1"], sets, log, timings)
    if "batch-infer" not in skip:
        other = work / "obama_copy" / "identity"
        shutil.rmtree(other.parent, ignore_errors=True)
        shutil.copytree(ident / "identity", other)
        poses = work / "batch_pose"
        poses.mkdir(exist_ok=True)
        shutil.copy(pose_path, poses / pose_path.name)
        run_step("batch-infer", ["batch-infer", "--identity", str(ident / "identity"), "--pose-videos", str(poses),
                                 "--output", str(work / "batch"), "--blend", f"{ident / 'identity'}=0.6,{other}=0.4"],
                 sets, log, timings)

    # 3. Checks (in this process)
    from faceid.pose.video import read_video

    checks = {}
    for name, fn in (("card", lambda: check_card(ident / "identity", params)),
                     ("stock_lora", lambda: check_stock_lora(weights, ident / "identity")),
                     ("face_tokens", lambda: check_face_tokens(params, ident / "identity", read_video(pose_path, max_frames=5)[0]))):
        t0 = time.perf_counter()
        checks[name] = fn()
        gc.collect()  # each check loads the model once: free it before the next
        print(f"=== check {name}: {checks[name]} ({time.perf_counter() - t0:.0f} s)", flush=True)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

    # 4. Summary
    print("\nsmoke-real: PASSED", flush=True)
    print(f"  weights: {weights} (base model {checks['card']})")
    for r in timings:
        print(f"  {r['step']:<18} {r['seconds']:7.0f} s   peak RSS {r['peak_rss_gib']:5.1f} GiB")
    print(f"  {'checks':<18} {'':>7}     peak RSS {own_peak:5.1f} GiB (this process)")
    print(f"  total {time.perf_counter() - t_start:.0f} s; log {log}")


if __name__ == "__main__":
    main()
