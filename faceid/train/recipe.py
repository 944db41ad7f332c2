"""The identity training recipe, top to bottom: setup -> plan -> model -> data -> validation -> stage 1 -> stage 2 -> save.

Plan (``faceid.train.plan``, before any diffusion model loads; ``faceid train-lora --plan`` prints the
same): the photos and their views (person-aware crops, and small-face views at the clips' face
sizes), the clips routed identity | prior, the face-size coverage, the schedule (``train_lora.schedule``:
fixed steps, or steps from the number of photos) and an estimate of time and memory. The run
executes the plan: its resolved steps replace ``stage1.steps`` / ``stage2.steps`` from here on.

Data (``faceid.train.examples``): *identity* examples — every accepted photo of the person as
1-frame samples with that photo's own embedding, plus dance clips that show the person — and
*prior* examples — the other dance clips, trained with the null face so the LoRA keeps the base
model's motion and does not bind the identity to the dancers' faces. Stage 1 trains the
FaceMapper alone (the DiT frozen) on identity examples only: the face tokens learn to steer the
frozen model through its cross-attention. Stage 2 trains mapper + LoRA (``faceid.model.lora``) on
a mix: ``train_lora.identity_share`` of the steps draw identity examples, the rest prior ones.
A batch holds examples of one shape (photos are 1 frame, clips F; photo aspects vary).

Loss: rectified flow matching as in diffusers' SD3/Wan trainers. For clean latents x0, noise n and
sigma from the shifted training schedule (``FlowMatchEulerDiscreteScheduler``) at a timestep
drawn by ``train_lora.timestep_sampling`` (``uniform``; ``logit_normal`` as in SD3; or
``mid_weighted``: uniform draws with DiffSynth-Studio's bell-shaped loss weight over the
timestep value of the shifted schedule): ``x_t = (1 - sigma) x0 + sigma n``; the DiT predicts the velocity ``n - x0``
(MSE). Latent tokens inside the face box of identity examples weigh ``face_loss_weight`` (the
loss is normalised by the total weight, so it changes the emphasis, not the scale). With a VACE
reference image the reference latent stands in front of x0 (as the pipeline puts it in front of
the noise) and is left out of the loss. Conditioning: ``[caption tokens | face tokens]``; the null
face instead for prior examples and on a ``face_dropout`` share of identity samples, so the
unconditional branch of CFG is trained.

Validation (``faceid.train.validation``, ``train_lora.validation``): examples held out of training
give a held-out loss every ``validate_every`` steps and renders every ``render_every`` steps, on
rank 0; the best step's weights are kept (the identity folder holds them, ``last/`` the last step)
and ``patience`` validations without improvement stop a stage. Validation draws no training
randomness: a run trains the same with or without it.

Determinism and resume: global step s trains a global batch of ``batch_size * num_workers`` samples,
drawn with their noise, sigma and face dropout from ``seed, s`` only; rank r trains its slice
(``faceid.train.step.make_batch``, ``flow_matching_loss``), and DDP averages the ranks' gradients.
So a run resumed from its step-k checkpoint (with the validation state and the best weights so far)
computes exactly what the uninterrupted run would have, and 2 workers x batch b train the samples of
1 worker x batch 2b (equal up to float summation order: tests/test_ray_cluster.py).
Validation, renders, the identity folder, checkpoints and MLflow logging happen on rank 0 only.

Many people (``faceid train-shared``, ``config["people"]``): the same recipe on every person's
identity examples at once, each photo with its own embedding, whole people held out for validation
(:mod:`faceid.train.shared` plans and builds the data); the output is a shared adapter. One person
started from a shared adapter (``train-lora --init-from``, ``config["init_from"]``): mapper and LoRA
start from the adapter's weights and the schedule is ``train_lora.init_from_share`` of the usual.

``train(config, ...)`` is a plain function (tests call it directly); ``train_loop_per_worker`` is
the thin adapter Ray Train launches (rank, device, checkpoints and metrics through ``ray.train``).
"""

from __future__ import annotations

import json
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from faceid.errors import TrainingError
from faceid.train.step import (  # the building blocks of one training step
    FaceConditionedDiT,
    flow_matching_loss,
    load_trainable_state,
    make_batch,
    make_optimizer,
    step_generator,
    trainable_state,
    training_scheduler,
)

CKPT_WEIGHTS = "trainable.safetensors"
CKPT_OPTIM = "optimizer.pt"
CKPT_STATE = "state.json"
CKPT_BEST = "best.safetensors"  # trainable tensors of the best validation step so far (train_lora.validation)
IDENTITY_SUBDIR = "identity"

Report = Callable[[dict, "Path | None"], None]  # (metrics, checkpoint folder or None)


def save_checkpoint(folder: Path, model: FaceConditionedDiT, optimizer, lr_sched, state: dict,
                    best: dict | None = None) -> Path:
    """Trainable weights (safetensors), optimizer + LR scheduler state (tensors, numbers and lists
    only: read back with ``torch.load(weights_only=True)``, :func:`load_optimizer_state`), the
    step state (JSON, with the validation state) and the best step's weights (``best``, if any).
    Nothing in a checkpoint is unpickled into arbitrary objects."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(folder / CKPT_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict()}, folder / CKPT_OPTIM)
    (folder / CKPT_STATE).write_text(json.dumps(state))
    if best is not None:
        save_file(best, str(folder / CKPT_BEST))
    return folder


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_stage(
    stage: str,
    model: FaceConditionedDiT,
    trainable: list[nn.Parameter],
    pools: dict[str, list[dict]],
    share: float,
    stage_cfg,
    tcfg,
    state: dict,
    *,
    device: torch.device,
    noise_scheduler,
    first_step: int,
    rank: int = 0,
    world_size: int = 1,
    resume_optim: dict | None = None,
    report: Report | None = None,
    amp_dtype: torch.dtype | None = None,
    validation=None,
) -> None:
    """Train ``trainable`` for ``stage_cfg.steps`` steps on batches from ``pools`` (identity examples
    with probability ``share``, see :func:`make_batch`); global steps ``first_step ..``; appends
    ``{step, stage, loss, lr}`` to ``state['history']``, checkpoints every ``tcfg.checkpoint_every``.
    Resumes mid-stage from ``state['step']`` (with ``resume_optim``). ``amp_dtype``: CUDA autocast dtype (None = off).
    ``validation`` (``faceid.train.validation.Validation``): validates when due and may stop the stage early."""
    import torch.distributed as dist

    from faceid.io import progress

    last_step = first_step + stage_cfg.steps
    if stage_cfg.steps == 0 or state["step"] >= last_step:
        return
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer, lr_sched = make_optimizer(trainable, stage_cfg, tcfg.weight_decay)
    if resume_optim is not None and state["step"] > first_step:
        optimizer.load_state_dict(resume_optim["optimizer"])
        lr_sched.load_state_dict(resume_optim["lr_scheduler"])
    forward = model
    if world_size > 1 and dist.is_initialized():  # wrapped per stage: DDP registers the params that need grads now
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if validation is not None:
        validation.start_stage(stage)
    model.train()
    steps = range(state["step"], last_step)
    bar = progress(steps, total=stage_cfg.steps, desc=f"{stage}") if rank == 0 else steps
    if rank == 0 and state["step"] > first_step:
        bar.update(state["step"] - first_step)
    t0, n0 = time.perf_counter(), state["step"]
    for step in bar:
        gen = step_generator(tcfg.seed, step)  # the same on every rank
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)) + rank)  # module dropout, if any
        # this rank's slice of the step's global batch, with its slice of the global noise, timesteps
        # and face dropout: DDP's mean of the ranks' gradients is the gradient of the global batch
        batch = make_batch(pools, share, step, rank, tcfg.batch_size, tcfg.seed, world_size)
        loss = flow_matching_loss(forward, batch, noise_scheduler, gen, tcfg.face_dropout, device, amp_dtype,
                                  tcfg.timestep_sampling)
        logged = loss.detach().clone()
        if world_size > 1 and dist.is_initialized():
            dist.all_reduce(logged)
            logged /= world_size
        if not torch.isfinite(logged):
            raise TrainingError(
                f"{stage}, step {step}: loss is {logged.item()} (NaN/inf); stopping. Lower "
                f"train_lora.{stage}.learning_rate ({stage_cfg.learning_rate}) or check the inputs"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        lr_sched.step()
        state["step"] = step + 1
        state["history"].append({"step": step + 1, "stage": stage, "loss": float(logged), "lr": lr})
        if rank == 0 and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{float(logged):.4f}", lr=f"{lr:.2e}", refresh=False)
        stop = validation is not None and validation.due(state["step"]) and validation.validate(model, state["step"], stage)
        if stop:  # early stop: the stage is over (the next one starts at its own first step)
            state["step"] = last_step
        done = state["step"] == last_step
        if report is not None and (state["step"] % tcfg.checkpoint_every == 0 or done):
            elapsed = time.perf_counter() - t0
            metrics = {
                "step": state["step"], "stage": stage, "loss": float(logged), "lr": lr,
                "samples_per_s": (state["step"] - n0) * tcfg.batch_size * world_size / max(elapsed, 1e-9),
                "peak_memory_mb": peak_memory_mb(device),
            }
            with tempfile.TemporaryDirectory() as tmp:
                best = validation.best_weights if validation is not None else None
                ckpt = save_checkpoint(Path(tmp), model, optimizer, lr_sched, state, best) if rank == 0 else None
                report(metrics, ckpt)
        if done:
            break
    if rank == 0 and hasattr(bar, "close"):
        bar.close()
    model.eval()


def fit(model: FaceConditionedDiT, pools: dict[str, list[dict]], tcfg, state: dict, **common) -> None:
    """The two stages: stage 1 trains the mapper alone (DiT frozen) on identity examples only;
    stage 2 trains mapper + LoRA on ``identity_share`` identity examples and the rest prior ones.
    With ``validation`` in ``common``: first the step-0 baseline of the held-out losses."""
    from faceid.model.lora import lora_parameters

    if common.get("validation") is not None and state["step"] == 0:
        common["validation"].baseline(model)
    mapper = model.mapper
    run_stage("stage1", model, list(mapper.parameters()), pools, 1.0, tcfg.stage1, tcfg, state, first_step=0, **common)
    trainable = list(mapper.parameters()) + lora_parameters(model.transformer)
    run_stage("stage2", model, trainable, pools, tcfg.identity_share, tcfg.stage2, tcfg, state,
              first_step=tcfg.stage1.steps, **common)


# --------------------------------------------------------------------------- the recipe


def train(
    config: dict,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    checkpoint_dir: Path | None = None,
    report: Report | None = None,
    on_validation=None,
) -> dict:
    """Two-stage training of one identity. ``config``: ``params`` (dict of Params), ``identity``,
    ``crops_dir``, ``embeddings_dir``, ``clips_dir``, ``output_dir`` (rank 0 writes the identity
    folder there); ``people: true``: crops_dir / embeddings_dir hold one folder per person and the
    output is a shared adapter named ``identity`` (:mod:`faceid.train.shared`); ``init_from``: a shared
    adapter folder to start from. ``checkpoint_dir``: resume from it. ``on_validation(point, renders
    folder or None)``: called on rank 0 after each validation point. Returns the summary metrics."""
    from safetensors.torch import save_file

    from faceid.config import config_hash, params_from_dict, to_dict
    from faceid.model import base_model as comp
    from faceid.model.generate import build_pipeline
    from faceid.model.memory import text_encoder_on_device
    from faceid.model.lora import add_lora, lora_parameters
    from faceid.model.mapper import caption_token_rms, initial_mapper
    from faceid.train.data import embeddings_sha256
    from faceid.train.examples import IDENTITY, build_training_set, summary_text
    from faceid.train import shared as many
    from faceid.train.plan import card as plan_card, format_plan, make_plan, summary as plan_summary
    from faceid.train.validation import Renderer, Validation, enabled, kept_without_validation

    # 1. Setup
    params = params_from_dict(config["params"])
    device = device or comp.resolve_device(params.model)
    t_start = time.perf_counter()
    people, init_from = bool(config.get("people")), config.get("init_from")

    # 2. Plan (no diffusion model yet): photos and views, clips routed, face sizes, schedule; then
    #    executed as printed: its resolved stage steps replace the configured ones from here on
    inputs = Path(config["crops_dir"]), Path(config["embeddings_dir"]), Path(config["clips_dir"])
    if people:  # many people, one adapter
        plan = many.make_plan(params, *inputs, world_size=world_size)
        render_embedding = plan.render_embedding
    else:
        plan = make_plan(params, *inputs, world_size=world_size, init_from=bool(init_from))
        render_embedding = plan.embedding
    if rank == 0:
        print((many.format_plan if people else format_plan)(plan, config["identity"]))
    params = plan.params
    mcfg, tcfg, vcfg = params.model, params.train_lora, params.train_lora.validation
    torch.manual_seed(tcfg.seed)
    embedding, emb_meta, clips, held_out_clips = plan.embedding, plan.embedder_meta, plan.clips, plan.held_out_clips

    # 3. Base model (text encoder and VAE are needed only to fill the cache, and the VAE for renders)
    pipe = build_pipeline(mcfg, device)
    pipe.set_progress_bar_config(disable=True)

    # 4. Data: identity photos + clips (identity or prior) -> cached latents, the held-out validation
    #    examples likewise; then free the text encoder and the VAE (rank 0 keeps the VAE to render)
    base_model = comp.base_model_id(mcfg)
    with text_encoder_on_device(pipe):  # an offloaded text encoder visits once for the whole cache fill
        data = (many.build_training_set if people else build_training_set)(pipe, params, plan, Path(tcfg.cache_dir),
                                                                            base_model, show_progress=rank == 0)
    if rank == 0:
        print(summary_text(data))
    renderer = None  # rank 0 renders held-out poses with the VAE (and the prompts encoded once)
    if rank == 0 and vcfg.render_every:
        reference = data.reference["image"] if data.reference["in_training"] else None  # rendered as inference does
        renderer = Renderer(pipe, held_out_clips[: vcfg.num_clips], render_embedding, params, device, reference)
    emb = torch.from_numpy(embedding)
    transformer = pipe.transformer
    del pipe
    _free_memory()

    # 5. Trainable parts: FaceMapper (float32) + LoRA (float32 on the frozen DiT). The mapper's tokens
    #    start at the RMS of this run's caption tokens (as the loaded text encoder wrote them), behind a
    #    closed gate: the untrained adapter appends padding-like zero tokens (faceid.model.mapper)
    text_rms = caption_token_rms(e["text"] for e in data.identity + data.prior)
    mapper = initial_mapper(emb.numel(), comp.text_dim(mcfg), tcfg.num_face_tokens, tcfg.mapper_hidden_dim,
                            tcfg.seed).calibrate(text_rms).to(device)
    add_lora(transformer, tcfg.lora)
    for p in lora_parameters(transformer):
        p.data = p.data.float()
    if tcfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    model = FaceConditionedDiT(transformer, mapper)
    parent = None
    if init_from:  # train-lora --init-from: mapper and LoRA start from the shared adapter (checked by the launcher)
        from faceid.model.identity import load_identity
        from faceid.train.step import load_adapter

        adapter = load_identity(init_from, model_cfg=mcfg)
        load_adapter(model, adapter, tcfg.lora)
        mapper.to(device)
        parent = {"path": str(init_from), "name": adapter.name, "sha256": config.get("init_from_sha256", "")}

    # 6. Resume from the last checkpoint (if any): weights, optimizer, step, validation state and best weights
    state, resume_optim, best = {"step": 0, "history": [], "resumed_from": None}, None, None
    if checkpoint_dir is not None:
        state, resume_optim, best = _load_checkpoint(model, Path(checkpoint_dir))
        if rank == 0:
            print(f"train-lora: resuming {config['identity']} from step {state['step']}")

    # autocast to the model dtype on CUDA (bf16 by default); float32 -> no autocast; CPU -> float32
    model_dtype = comp.resolve_dtype(mcfg, device)
    amp_dtype = model_dtype if device.type == "cuda" and model_dtype != torch.float32 else None
    noise_scheduler = training_scheduler(mcfg.flow_shift)
    common = dict(device=device, noise_scheduler=noise_scheduler, rank=rank,
                  world_size=world_size, resume_optim=resume_optim, report=report, amp_dtype=amp_dtype)

    # 7. Validation during training (rank 0 measures): held-out losses, renders, best step, early stop
    validation = None
    if enabled(vcfg):
        validation = Validation(vcfg, data.validation, state.setdefault("validation", {}), seed=tcfg.seed,
                                final_step=tcfg.stage1.steps + tcfg.stage2.steps, noise_scheduler=noise_scheduler,
                                device=device, amp_dtype=amp_dtype, timestep_sampling=tcfg.timestep_sampling, rank=rank,
                                world_size=world_size, renderer=renderer, on_point=on_validation, best_weights=best)

    # 8. Stage 1: mapper only, identity examples only; stage 2: mapper + LoRA, mixed with the motion prior
    try:
        fit(model, data.pools(), tcfg, state, validation=validation, **common)
    finally:
        if validation is not None:
            validation.close()

    # 9. Save the identity folder (rank 0): the kept step (the best by default; the last in last/), and summarise
    last_step = state["history"][-1]["step"] if state["history"] else state["step"]
    kept = validation.kept(last_step) if validation is not None else kept_without_validation(last_step)
    summary = _summary(state, tcfg, world_size, time.perf_counter() - t_start, device)
    summary.update(identity_examples=len(data.identity), prior_examples=len(data.prior),
                   latent_cache_read=data.cache_hits, latent_cache_encoded=data.cache_misses,
                   **(many.summary(plan) if people else plan_summary(plan)),
                   face_token_scale=text_rms, face_gate=float(mapper.gate.detach().cpu()),
                   **_validation_summary(validation, kept, summary["seconds"]))
    last_weights = trainable_state(model)
    if rank == 0:
        card = {
            **(many.card(plan) if people else {}),
            **({"init_from": parent} if parent else {}),
            "base_model": base_model,
            "profile": mcfg.profile,
            "embedder": emb_meta["embedder"],
            "lora": to_dict(tcfg.lora),
            "train_config_hash": config_hash(mcfg, tcfg),
            "train": {"stage1_steps": tcfg.stage1.steps, "stage2_steps": tcfg.stage2.steps, "seed": tcfg.seed,
                      "final_loss": summary.get("stage2_loss_last", summary.get("stage1_loss_last"))},
            "loss": {"identity_share": tcfg.identity_share, "face_loss_weight": tcfg.face_loss_weight,
                     "timestep_sampling": tcfg.timestep_sampling, "face_dropout": tcfg.face_dropout,
                     "clip_identity_threshold": tcfg.clip_identity_threshold, "photo_views": tcfg.photos.views},
            "reference_image": ({"file": None, "source": "each person's own (infer --reference-image)",
                                 "in_training": data.reference["in_training"]} if people else
                                {"file": "reference.png", "source": data.reference["name"],
                                 "in_training": data.reference["in_training"]}),
            "examples": data.rows,
            "plan": None if people else plan_card(plan),  # face sizes and coverage, schedule and passes per photo, estimate, warnings
            "data": {
                "embeddings_sha256": "" if people else embeddings_sha256(config["embeddings_dir"]),
                "clips": {c.clip_id: c.checksum for c in clips},
                "identity_clips": sorted(r["id"] for r in data.rows if r["kind"] == "clip" and r["role"] == IDENTITY),
            },
            "validation": {**to_dict(vcfg), "holdout": data.holdout_note,
                           "early_stop": (validation.state["stopped"] if validation is not None else {})},
            "kept": kept,
        }
        save = dict(name=config["identity"], mapper=mapper, embedding=emb, transformer=transformer,
                    loss_rows=state["history"], reference=None if people else data.reference["image"],
                    validation_rows=validation.rows() if validation is not None else (),
                    people=plan.people_embeddings if people else None)
        _save_kept(Path(config["output_dir"]), model, card, save, kept, validation)
        print(format_summary(config["identity"], summary, config.get("final_output_dir") or config["output_dir"]))
    if report is not None:  # final checkpoint: trainable state + the identity folder (Ray brings it back)
        with tempfile.TemporaryDirectory() as tmp:
            final = None
            if rank == 0:
                final = Path(tmp)
                save_file(last_weights, str(final / CKPT_WEIGHTS))
                if validation is not None and validation.best_weights is not None:
                    save_file(validation.best_weights, str(final / CKPT_BEST))
                (final / CKPT_STATE).write_text(json.dumps(state))
                shutil.copytree(config["output_dir"], final / IDENTITY_SUBDIR)
            report({**summary, "done": True}, final)
    return summary


def train_loop_per_worker(config: dict) -> None:
    """What Ray Train runs on each worker: rank/device/checkpoint from ``ray.train``, then :func:`train`.
    The identity folder travels back to the driver inside the final checkpoint. A NaN/inf loss is
    reported as ``error`` (no retry: it would fail the same way)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict, ckpt: Path | None) -> None:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(ckpt)) if ckpt else None)

    fail_at = config.get("fail_at_step")  # fault injection for the resume test (launch.run(fail_at_step=...))
    if fail_at is not None:
        report = _failing_report(report, fail_at, Path(config["fail_marker"]))

    on_validation = None  # rank 0 logs each validation point to MLflow as it happens
    if rank == 0 and config.get("mlflow"):
        from faceid.tracking import validation_logger
        from faceid.train.validation import VALIDATION_METRICS

        on_validation = validation_logger(config["mlflow"]["uri"], config["mlflow"]["run_id"], VALIDATION_METRICS)

    checkpoint = ray.train.get_checkpoint()
    with tempfile.TemporaryDirectory() as tmp, (checkpoint.as_directory() if checkpoint else nullcontext()) as ckpt_dir:
        try:
            train({**config, "output_dir": str(Path(tmp) / IDENTITY_SUBDIR)}, rank=rank, world_size=world,
                  device=ray.train.torch.get_device(), checkpoint_dir=Path(ckpt_dir) if ckpt_dir else None,
                  report=report, on_validation=on_validation)
        except TrainingError as exc:
            ray.train.report({"error": str(exc)})


# --------------------------------------------------------------------------- helpers


def _load_checkpoint(model: FaceConditionedDiT, folder: Path) -> tuple[dict, dict | None, dict | None]:
    """``(step state, optimizer state or None, best step's weights or None)``; the model gets the weights."""
    from safetensors.torch import load_file

    load_trainable_state(model, load_file(str(folder / CKPT_WEIGHTS)))
    state = json.loads((folder / CKPT_STATE).read_text())
    state["resumed_from"] = state["step"]
    optim = load_optimizer_state(folder / CKPT_OPTIM) if (folder / CKPT_OPTIM).is_file() else None
    best = load_file(str(folder / CKPT_BEST)) if (folder / CKPT_BEST).is_file() else None
    return state, optim, best


def _save_kept(output_dir: Path, model: FaceConditionedDiT, card: dict, save: dict, kept: dict, validation) -> None:
    """The identity folder holds the kept step; when that is not the last step (the best one, by
    default), the last step goes to ``last/`` beside it, with its own card. ``save``: the other
    arguments of ``save_identity``. Leaves the model at the last step."""
    from faceid.model.identity import LAST_SUBDIR, save_identity

    if kept["last_folder"] is None:
        save_identity(output_dir, card=card, **save)
        return
    last = trainable_state(model)
    with tempfile.TemporaryDirectory() as tmp:
        last_kept = {**kept, "step": kept["last_step"], "last_folder": None,
                     "why": f"the last step; the folder above holds step {kept['step']} ({kept['why']})"}
        save_identity(Path(tmp) / LAST_SUBDIR, card={**card, "kept": last_kept}, **save)
        load_trainable_state(model, validation.best_weights)
        try:
            save_identity(output_dir, card=card, **save)
        finally:
            load_trainable_state(model, last)
        shutil.move(str(Path(tmp) / LAST_SUBDIR), str(output_dir / LAST_SUBDIR))


def _validation_summary(validation, kept: dict, seconds: float) -> dict:
    out = {"kept_step": kept["step"], "last_step": kept["last_step"]}
    if validation is None:
        return out
    out.update(validation_seconds=validation.seconds, validation_share=validation.seconds / max(seconds, 1e-9),
               validation_points=len(validation.state["points"]), early_stop=dict(validation.state["stopped"]))
    best = validation.state["best"]
    if best is not None:
        out[f"best_{best['criterion']}"] = best["value"]
    return out


def load_optimizer_state(path: Path) -> dict:
    """``{"optimizer": ..., "lr_scheduler": ...}`` read with ``weights_only=True``: tensors, numbers,
    strings and containers only. A file that would build any other object (a crafted pickle runs
    code while it loads) is refused with a :class:`TrainingError`, never executed."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln.strip().startswith(boilerplate)]
        why = (lines[0] if lines else type(exc).__name__)[:200]
        raise TrainingError(f"{path}: refused: not plain optimizer state (tensors, numbers, lists), read with "
                            f"torch.load(weights_only=True): {why}; delete this checkpoint (or its Ray run "
                            "folder) to train from the start") from None
    if not isinstance(state, dict) or not {"optimizer", "lr_scheduler"} <= set(state):
        raise TrainingError(f"{path}: expected a dict with optimizer and lr_scheduler state, got {type(state).__name__}")
    return state


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(state: dict, tcfg, world_size: int, seconds: float, device: torch.device) -> dict:
    out = {"steps": state["step"], "steps_trained": len(state["history"]), "seconds": seconds,
           "peak_memory_mb": peak_memory_mb(device), "resumed_from": state.get("resumed_from")}
    for stage in ("stage1", "stage2"):
        losses = [h["loss"] for h in state["history"] if h["stage"] == stage]
        if losses:
            k = max(1, min(5, len(losses) // 4))
            out[f"{stage}_loss_first"] = sum(losses[:k]) / k
            out[f"{stage}_loss_last"] = sum(losses[-k:]) / k
    out["samples_per_s"] = len(state["history"]) * tcfg.batch_size * world_size / max(seconds, 1e-9)
    return out


def format_summary(identity: str, s: dict, output_dir) -> str:
    lines = [f"train-lora {identity}: {s['steps_trained']} steps in {s['seconds']:.1f} s "
             f"({s['samples_per_s']:.2f} samples/s, peak memory {s['peak_memory_mb']:.0f} MiB)"]
    if "passes_per_photo" in s:
        lines.append(f"  passes per photo: {s['passes_per_photo']:.3g} (planned {s['planned_stage1_steps']} + "
                     f"{s['planned_stage2_steps']} steps)")
    if "face_size_coverage" in s:
        lines.append(f"  face sizes (px, min/median/max): clips {s['clips_face_px_min']:.0f}/{s['clips_face_px_median']:.0f}/"
                     f"{s['clips_face_px_max']:.0f}, identity examples {s['identity_examples_face_px_min']:.0f}/"
                     f"{s['identity_examples_face_px_median']:.0f}/{s['identity_examples_face_px_max']:.0f}; "
                     f"coverage {100 * s['face_size_coverage']:.0f} %")
    for stage in ("stage1", "stage2"):
        if f"{stage}_loss_first" in s:
            lines.append(f"  {stage}: loss {s[f'{stage}_loss_first']:.4f} -> {s[f'{stage}_loss_last']:.4f}")
    if s.get("resumed_from") is not None:
        lines.append(f"  resumed from step {s['resumed_from']}")
    for stop in (s.get("early_stop") or {}).values():
        lines.append(f"  {stop['reason']}")
    if "validation_seconds" in s:
        lines.append(f"  validation: {s['validation_points']} point(s), {s['validation_seconds']:.1f} s "
                     f"({100 * s['validation_share']:.1f} % of the run)")
    last = f" (the last step {s['last_step']} is in {Path(output_dir) / 'last'})" if s["kept_step"] != s["last_step"] else ""
    lines.append(f"  identity folder: {output_dir} holds step {s['kept_step']}{last}")
    return "\n".join(lines)


def _failing_report(report: Report, fail_at: int, marker: Path) -> Report:
    """Kill the worker process once, at the first report after step ``fail_at`` (whose checkpoint
    Ray has registered by then) -- the run must resume from the step-``fail_at`` checkpoint."""
    import os

    def wrapped(metrics: dict, ckpt: Path | None) -> None:
        if metrics.get("step", 0) > fail_at and not marker.exists():
            marker.write_text("killed")
            time.sleep(5.0)  # Ray's controller collects reports by polling: let it register the checkpoint
            os._exit(1)
        report(metrics, ckpt)

    return wrapped
