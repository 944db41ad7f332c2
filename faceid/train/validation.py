"""Validation during training (``train_lora.validation``): held-out loss, renders, best step, early stop.

Real runs take hours and an identity trained on 3-15 photos overfits quickly, so the recipe
measures the adapter while it trains, on examples it never trains on, and keeps the best step:

- **Held out** (:func:`plan_holdout`, built by ``faceid.train.examples`` like training examples and
  cached once): ``holdout_photos`` photos (never the reference photo), or, when too few photos are
  left to train on (fewer than :data:`MIN_TRAINING_PHOTOS`) or ``holdout_photos`` is 0, the last
  augmented view of every photo (a weaker check: the same photos are trained on); plus the
  held-out clips (``train_lora.holdout_clips``), routed like training clips.
- **Held-out loss** (:func:`heldout_loss`) every ``validate_every`` steps, at step 0 (the untrained
  adapter, a baseline) and at the last step: the recipe's flow-matching loss at ``num_timesteps``
  fixed, evenly spaced timesteps with fixed noise per example (seeded by the example's id), face
  tokens on for identity examples and the null face for prior ones, so the number is comparable
  across steps and runs; separately ``identity_loss`` and ``prior_loss``.
- **Renders** (:class:`Renderer`) every ``render_every`` steps and at the last step: the first
  ``num_clips`` held-out poses with the identity and with face_scale 0 (the base model: rendered
  once a run), in the inference configuration (``render_validation``'s steps, guidance, seed and
  face_scale; the reference image when the identity is trained with one), FaceSim of each to the
  identity embedding when a face is detected, a labelled side-by-side preview video (pose | base |
  identity, scaled to a watchable size) and its contact sheet per clip.
  The point's FaceSim is the mean over the clips whose render shows a face (None when none does:
  such a step cannot be the best by FaceSim).
- **Best step** by ``criterion``: ``identity_loss`` (lower is better), ``facesim`` (render steps
  only; higher is better), or ``auto``: FaceSim once a render shows a detectable face, the
  identity loss before (:func:`rank_key`). Step 0 is never the best. Its weights are kept in
  memory and in every checkpoint (``best.safetensors``), its record in the step state, so a resumed
  run keeps it. ``keep: best`` writes it as the identity folder and the last step to ``last/``.
- **Early stop**: ``patience`` validations in a row without improvement end the stage (stage 1
  goes on to stage 2); the reason is printed, logged and written to the card.

Everything runs on rank 0; other workers wait at the next gradient all-reduce and learn about an
early stop by broadcast. The driver logs the numbers (``metrics/validation.csv``) to MLflow; rank 0
logs each point live through ``on_point`` (``faceid.tracking.validation_logger``).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from faceid.errors import InputError

# A photo is held out only when at least this many stay in training: 3 is the fewest photos an identity
# is made of (crop_faces / embed_faces min_photos), and each of so few photos carries a view of the face
# (angle, expression, light) the others lack. A 3-photo identity trains on all 3 and holds out the last
# augmented view of each instead; a 4-photo identity holds one photo out.
MIN_TRAINING_PHOTOS = 3
METRICS = ("identity_loss", "prior_loss", "facesim", "facesim_base")  # per point; None = not measured
# validation point key -> MLflow metric (beside loss/train_stage1 / loss/train_stage2: one chart section per prefix)
VALIDATION_METRICS = {"identity_loss": "loss/val_identity", "prior_loss": "loss/val_prior", "facesim": "facesim/val",
                      "facesim_base": "facesim/val_base"}

OnPoint = Callable[[dict, "Path | None"], None]  # (point, folder of renders or None)


def enabled(cfg) -> bool:
    """Validation is on when it has something to do (``cfg`` = ``train_lora.validation``)."""
    return bool(cfg.validate_every or cfg.render_every)


# --------------------------------------------------------------------------- what is held out


@dataclass(frozen=True)
class Holdout:
    photos: tuple[str, ...] = ()  # photos never trained on
    view: int | None = None  # or: this augmented view of every photo is never trained on
    note: str = "off (nothing held out)"


def plan_holdout(names: list[str], reference: str, cfg, views: int) -> Holdout:
    """Which photos (or views) validation keeps out of training: the last ``cfg.holdout_photos``
    photos by name, never ``reference`` (the identity's reference photo), when at least
    :data:`MIN_TRAINING_PHOTOS` remain to train on; otherwise (or with ``holdout_photos`` 0) the
    last augmented view of every photo. No augmented view either: an :class:`InputError` that says
    what to change. Validation off: nothing."""
    if not enabled(cfg):
        return Holdout()
    n, k = len(names), cfg.holdout_photos
    if k and n - k >= MIN_TRAINING_PHOTOS:
        picked = tuple(sorted(x for x in names if x != reference)[-k:])
        return Holdout(photos=picked, note=f"photo(s) {', '.join(picked)} held out ({n - k} of {n} trained on)")
    why = ("train_lora.validation.holdout_photos is 0" if not k else
           f"{n} photo(s) cannot spare holdout_photos={k} (at least {MIN_TRAINING_PHOTOS} must stay in training)")
    if views < 2:
        raise InputError(f"train_lora.validation: {why}, and train_lora.photos.views=1 has no augmented view to "
                         "hold out instead; set photos.views >= 2, add photos, or turn validation off "
                         "(validate_every: 0, render_every: 0)")
    return Holdout(view=views - 1, note=f"{why}: augmented view {views - 1} of every photo held out instead "
                                        "(a weaker check: the same photos are trained on)")


# --------------------------------------------------------------------------- held-out loss


def fixed_timestep_indices(num_timesteps: int, num_train_timesteps: int) -> list[int]:
    """``num_timesteps`` evenly spaced indices into the training schedule (mid-points of equal bins)."""
    return [int((k + 0.5) * num_train_timesteps / num_timesteps) for k in range(num_timesteps)]


def example_seed(seed: int, example_id: str) -> int:
    """Noise seed of one held-out example: its id and the run seed only (independent of order)."""
    return int(hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()[:12], 16)


def heldout_loss(model, examples: list[dict], noise_scheduler, *, seed: int, num_timesteps: int, device: torch.device,
                 amp_dtype: torch.dtype | None, timestep_sampling: str = "uniform") -> float | None:
    """Mean flow-matching loss of ``examples`` at fixed timesteps with fixed noise (None without
    examples); face tokens for identity examples, the null face for prior ones; no face dropout."""
    from faceid.train.step import BATCH_KEYS, clean_latents, loss_at

    if not examples:
        return None
    indices = fixed_timestep_indices(num_timesteps, noise_scheduler.config.num_train_timesteps)
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for ex in examples:
                batch = {k: ex[k].unsqueeze(0) for k in BATCH_KEYS}
                batch["ref_frames"] = ex["ref_frames"]
                x0 = clean_latents(batch)
                gen = torch.Generator().manual_seed(example_seed(seed, ex["example_id"]))
                for i in indices:
                    noise = torch.randn(x0.shape, generator=gen)
                    loss = loss_at(model, batch, noise_scheduler, noise, torch.tensor([i]), ~batch["face"].bool(),
                                   device, amp_dtype, timestep_sampling)
                    total += float(loss)
    finally:
        model.train(was_training)
    return total / (len(examples) * len(indices))


# --------------------------------------------------------------------------- renders


class Renderer:
    """Renders held-out poses with the adapter being trained (rank 0), as a user renders the identity:
    the settings of ``render_validation`` (steps, guidance, seed, face_scale: the configuration
    whose numbers the gate judges), the identity's reference image as VACE ``reference_images`` when
    it is trained with one (``reference``; ``train_lora.reference_image``), and the same
    conditioning as :func:`faceid.model.generate.generate_video` (``[text | face tokens]`` against
    ``[negative text | null face]``, tokens and LoRA scaled by face_scale). Prompts are encoded once;
    then a pipeline of the training transformer, the VAE and the inference scheduler (no text
    encoder) renders with the LoRA on, and ``[text]`` with it off (face_scale 0, the base model
    exactly, no reference image, as ``generate_video`` renders it)."""

    def __init__(self, pipe, clips: list, embedding: np.ndarray, params, device: torch.device, reference=None):
        from diffusers import WanVACEPipeline

        from faceid.faces.similarity import FaceSimScorer
        from faceid.model.generate import check_reference_image, encode_text
        from faceid.pose.video import read_video

        cfg = params.render_validation  # the inference configuration render-validation gates on
        self.steps, self.guidance, self.seed, self.face_scale = (cfg.num_inference_steps, cfg.guidance_scale, cfg.seed,
                                                                 cfg.face_scale)
        self.reference = None if reference is None else check_reference_image(reference)
        self.device = device
        self.embedding = torch.from_numpy(np.asarray(embedding, np.float32))[None]
        self.clips = []
        with torch.no_grad():
            negative = encode_text(pipe, "") if self.guidance > 1 else None
            for clip in clips:
                pose, fps = read_video(clip.pose_path)
                pose = pose[: clip.num_frames]
                prompt = clip.caption or params.prepare_pose.default_caption
                self.clips.append({"id": clip.clip_id, "pose": pose, "fps": fps, "text": encode_text(pipe, prompt),
                                   "negative": negative})
        self.pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, transformer=pipe.transformer, vae=pipe.vae,
                                    scheduler=pipe.scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.scorer = FaceSimScorer(embedding, params.crop_faces, params.embed_faces)
        self.base: dict[str, tuple[np.ndarray, dict]] = {}  # clip -> (frames, FaceSim): the base does not train

    def _generate(self, model, clip: dict, identity: bool) -> np.ndarray:
        from faceid.model.generate import denoise
        from faceid.model.mapper import scale_face

        transformer = self.pipe.transformer
        cond, uncond, reference = clip["text"], clip["negative"], None
        identity = identity and self.face_scale > 0  # face_scale 0 is the base exactly, as generate_video has it
        if identity:
            null = model.mapper.null_tokens(1)
            face = scale_face(model.mapper(self.embedding.to(self.device)), null, self.face_scale)
            cond = torch.cat([cond, face.to(cond.dtype)], dim=1)
            if uncond is not None:
                uncond = torch.cat([uncond, null.to(uncond.dtype)], dim=1)
            reference = self.reference
            if self.face_scale != 1.0:
                transformer.set_adapters(["default"], [self.face_scale])
        else:
            transformer.disable_adapters()
        try:
            return denoise(self.pipe, clip["pose"], cond, uncond, self.steps, self.guidance, self.seed, reference)
        finally:
            if not identity:
                transformer.enable_adapters()
            elif self.face_scale != 1.0:
                transformer.set_adapters(["default"], [1.0])

    def render(self, model, folder: Path) -> dict:
        """Render every clip (identity; the base once), write ``<clip>.mp4`` and ``<clip>_base.mp4``
        (the renders), ``<clip>_side_by_side.mp4`` (pose | base | identity, labelled and scaled to a
        watchable size, :mod:`faceid.preview`) and its contact sheet ``<clip>.png`` into ``folder``;
        return the mean FaceSim of each arm over the clips where it is measurable (None when no
        render shows a face), measured on the renders, not on the preview."""
        from faceid.pose.video import write_video
        from faceid.preview import write_preview  # pose | base | identity, as render-validation lays them out

        ident_scores, base_scores, rates = [], [], []
        with torch.no_grad():
            for clip in self.clips:
                if clip["id"] not in self.base:
                    frames = self._generate(model, clip, identity=False)
                    self.base[clip["id"]] = frames, self.scorer.score(frames)
                base, base_face = self.base[clip["id"]]
                frames = self._generate(model, clip, identity=True)
                face = self.scorer.score(frames)
                ident_scores.append(face["mean"])
                base_scores.append(base_face["mean"])
                rates.append(face["detection_rate"])
                write_video(folder / f"{clip['id']}.mp4", frames, clip["fps"])
                write_video(folder / f"{clip['id']}_base.mp4", base, clip["fps"])
                write_preview(folder / f"{clip['id']}_side_by_side.mp4", folder / f"{clip['id']}.png",
                              {"pose": clip["pose"], "base": base, "identity": frames}, clip["fps"])

        return {"facesim": mean_measured(ident_scores), "facesim_base": mean_measured(base_scores),
                "face_detection_rate": mean_measured(rates)}

    def close(self) -> None:
        self.scorer.close()


def mean_measured(values) -> float | None:
    """Mean over the renders where the value was measured (FaceSim: a face was detected); None when
    none was: such a step does not compete on FaceSim (:func:`rank_key` ranks it ``-inf``)."""
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# --------------------------------------------------------------------------- best step, early stop


def rank_key(point: dict, criterion: str, facesim_ranked: bool) -> tuple[int, float] | None:
    """How good a validation point is (larger is better), or None when it does not compete:
    ``(0, -identity_loss)`` or ``(1, FaceSim)`` (``-inf`` for a render without a detectable face).
    ``auto``: FaceSim on render steps once a render has shown a face (``facesim_ranked``: the best
    so far is ranked by FaceSim; loss-only steps then do not compete), the identity loss before."""
    loss, rendered, facesim = point.get("identity_loss"), point.get("rendered", False), point.get("facesim")
    by_loss = None if loss is None else (0, -loss)
    if criterion == "identity_loss":
        return by_loss
    if criterion == "auto" and not facesim_ranked and (not rendered or facesim is None):
        return by_loss
    if not rendered:
        return None
    return (1, facesim if facesim is not None else -math.inf)


class Validation:
    """Held-out losses, renders, the best step and early stop of one run; see the module doc.

    ``state`` is the recipe's ``state["validation"]`` (JSON, saved in every checkpoint): points,
    best, the stage's count of validations without improvement, early stops. ``best_weights``: the
    trainable tensors of the best step (from a checkpoint when resuming)."""

    def __init__(self, cfg, examples: dict[str, list[dict]], state: dict, *, seed: int, final_step: int, noise_scheduler,
                 device: torch.device, amp_dtype: torch.dtype | None, timestep_sampling: str, rank: int = 0,
                 world_size: int = 1, renderer: Renderer | None = None, on_point: OnPoint | None = None,
                 best_weights: dict | None = None):
        from faceid.train.routing import IDENTITY, PRIOR

        self.cfg, self.state, self.final_step = cfg, state, final_step
        self.examples = {IDENTITY: examples.get(IDENTITY, []), PRIOR: examples.get(PRIOR, [])}
        self.loss_args = dict(seed=seed, num_timesteps=cfg.num_timesteps, device=device, amp_dtype=amp_dtype,
                              timestep_sampling=timestep_sampling)
        self.noise_scheduler, self.device = noise_scheduler, device
        self.rank, self.world_size = rank, world_size
        self.renderer, self.on_point, self.best_weights = renderer, on_point, best_weights
        self.seconds = 0.0  # spent validating in this process
        for key, value in (("points", []), ("best", None), ("stage", None), ("since_best", 0), ("stopped", {})):
            state.setdefault(key, value)

    # -- when

    def due(self, step: int) -> bool:
        everies = (self.cfg.validate_every, self.cfg.render_every)
        return step == self.final_step or any(every and step % every == 0 for every in everies)

    def render_due(self, step: int) -> bool:
        return self.renderer is not None and (step == self.final_step or step % self.cfg.render_every == 0)

    def start_stage(self, stage: str) -> None:
        """Early stop counts per stage (a resumed stage keeps its count)."""
        if self.state["stage"] != stage:
            self.state.update(stage=stage, since_best=0)

    # -- measure

    def losses(self, model) -> dict:
        from faceid.train.routing import IDENTITY, PRIOR

        return {f"{role}_loss": heldout_loss(model, self.examples[role], self.noise_scheduler, **self.loss_args)
                for role in (IDENTITY, PRIOR)}

    def baseline(self, model) -> None:
        """Step 0, before training (rank 0): the held-out losses of the untrained adapter (not a candidate)."""
        if self.rank != 0 or self.state["points"]:
            return
        t0 = time.perf_counter()
        point = {"step": 0, "stage": "start", "rendered": False, **self.losses(model), "best": 0}
        self._record(point, None, t0)

    def validate(self, model, step: int, stage: str) -> bool:
        """Measure at ``step`` (rank 0), update the best step, decide on early stop; every rank
        returns the decision (True = stop the stage)."""
        stop = False
        if self.rank == 0:
            t0 = time.perf_counter()
            was_training = model.training
            model.eval()
            with tempfile.TemporaryDirectory() as tmp:
                folder = Path(tmp) if self.render_due(step) else None
                point = {"step": step, "stage": stage, "rendered": folder is not None, **self.losses(model)}
                if folder is not None:
                    point.update(self.renderer.render(model, folder))
                stop = self._update(point, model, stage)
                self._record(point, folder, t0)
            model.train(was_training)
        return self._broadcast(stop)

    def _update(self, point: dict, model, stage: str) -> bool:
        from faceid.train.step import trainable_state

        best = self.state["best"]
        key = rank_key(point, self.cfg.criterion, facesim_ranked=bool(best and best["key"][0] == 1))
        point["best"] = 0
        if key is None:
            return False
        if key[1] != -math.inf and (best is None or key > tuple(best["key"])):
            criterion = "facesim" if key[0] else "identity_loss"
            self.state["best"] = {"step": point["step"], "stage": stage, "criterion": criterion,
                                  "value": point[criterion], "key": list(key)}
            self.best_weights = trainable_state(model)
            self.state["since_best"] = 0
            point["best"] = 1
            return False
        self.state["since_best"] += 1
        if not self.cfg.patience or self.state["since_best"] < self.cfg.patience:
            return False
        best = self.state["best"]
        since = (f"best {best['criterion']} {best['value']:.4g} at step {best['step']}" if best
                 else "no step with a measurable criterion")
        reason = (f"{stage} stopped early at step {point['step']}: no improvement for {self.cfg.patience} "
                  f"validation(s) ({since}; train_lora.validation.patience={self.cfg.patience})")
        self.state["stopped"][stage] = {"step": point["step"], "reason": reason}
        point["stop"] = reason
        return True

    def _record(self, point: dict, folder: Path | None, t0: float) -> None:
        self.state["points"].append(point)
        shown = ", ".join(f"{k} {point[k]:.4g}" for k in METRICS if point.get(k) is not None)
        print(f"validation step {point['step']}: {shown}{' (best)' if point.get('best') else ''}"
              + (f"\n{point['stop']}" if point.get("stop") else ""))
        if self.on_point is not None:
            self.on_point(point, folder)
        point["seconds"] = time.perf_counter() - t0
        self.seconds += point["seconds"]

    def _broadcast(self, stop: bool) -> bool:
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([int(stop)], device=self.device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        return stop

    # -- what the identity folder holds

    def kept(self, last_step: int) -> dict:
        """The card's ``kept``: the step the identity folder holds, by which criterion, and why."""
        best, cfg = self.state["best"], self.cfg
        last = next((p for p in reversed(self.state["points"]) if p["step"] == last_step), None)
        if cfg.keep == "last" or best is None or best["step"] == last_step:
            why = ("train_lora.validation.keep is last" if cfg.keep == "last" else
                   "no validation step measured the criterion" if best is None else
                   f"the last step is the best by held-out {best['criterion']} ({best['value']:.4g})")
            return {"step": last_step, "last_step": last_step, "criterion": best and best["criterion"],
                    "value": best and last and last.get(best["criterion"]), "why": why, "last_folder": None}
        last_value = last.get(best["criterion"]) if last else None
        why = (f"best by held-out {best['criterion']}: {best['value']:.4g} at step {best['step']}; the last step "
               f"{last_step} has {'n/a' if last_value is None else f'{last_value:.4g}'} (in last/)")
        from faceid.model.identity import LAST_SUBDIR

        return {"step": best["step"], "last_step": last_step, "criterion": best["criterion"], "value": best["value"],
                "why": why, "last_folder": LAST_SUBDIR}

    def rows(self) -> list[dict]:
        """``metrics/validation.csv`` rows (``faceid.model.identity.VALIDATION_COLUMNS``)."""
        return [{"step": p["step"], "stage": p["stage"], **{k: p.get(k) for k in METRICS}, "best": p.get("best", 0)}
                for p in self.state["points"]]

    def close(self) -> None:
        if self.renderer is not None:
            self.renderer.close()


def kept_without_validation(last_step: int) -> dict:
    return {"step": last_step, "last_step": last_step, "criterion": None, "value": None, "last_folder": None,
            "why": "validation off (train_lora.validation.validate_every and render_every are 0): the last step"}
