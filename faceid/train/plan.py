"""What a train-lora run will do, decided before any diffusion model loads: ``faceid train-lora --plan``
prints it, and the recipe computes the same plan, prints it and executes it (one code path).

- **Examples.** The photos that train the identity (embed-faces' inliers, minus validation's
  held-out ones), each with its views (``faceid.train.photos``) and caption; the clips routed
  ``identity`` | ``prior`` (``faceid.train.routing``: FaceSim of the clip's stored face regions with
  the embed-faces embedder).
- **Face sizes.** A face's size is the height in pixels of its face box where the DiT sees it: for a
  clip frame the head box of its keypoints (``faceid.train.data.face_box_from_keypoints``, clip
  pixels: the target the identity is rendered on); for a photo view the detector's face box moved
  into the example (``faceid.train.photos.view_face_height``). On the sample photos the two boxes
  agree within ~15 % (tests/test_plan.py checks 25 %). Small-face views are made at evenly spaced
  quantiles of the clips' face heights (the 5th to the 95th percentile; the median for one view),
  the face placed at the clips' median face centre. **Coverage** is the share of the clips' face
  heights (every frame with a head, training and held-out clips) within [smallest, largest] face
  height of the identity examples (photo views and identity clips) that train.
- **Schedule** (:func:`resolve_schedule`, ``train_lora.schedule``): ``fixed`` keeps stage1/stage2
  steps; ``per_photo`` gives ``steps_per_photo`` identity-example draws per training photo,
  ``stage1_share`` of them in stage 1 (every stage-1 step draws an identity example) and the rest in
  stage 2 (whose steps draw one with probability ``identity_share``), each stage at least
  ``min_steps`` and at most its ``stageN.steps``. Passes per photo = expected draws of that photo's
  views (the identity pool is drawn uniformly over examples).
- **Estimate**: time and peak memory from the benchmark table below (``benchmarks/results``).

Models the plan loads: the pose estimator (``prepare_pose.estimator``, the photos' poses) and the
FaceSim scorer (face detector + embedder, clip routing); no diffusion model, and it writes nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.errors import ConfigError, InputError

REAL_PROFILE = "wan2.1-vace-1.3b"
# benchmarks/results/train_gpu.md (bench_train_gpu.py): NVIDIA H200, Wan2.1-VACE-1.3B, 480x832, LoRA rank 64
# main-cross-attn, FaceMapper 128 -> 1024 -> 4 x 4096, batch 1, bf16 autocast, one stage-2 step:
# (video tokens, gradient checkpointing, s/step, peak GiB)
GPU_FIGURES = {"device": "NVIDIA H200", "source": "benchmarks/results/train_gpu.md",
               "rows": ((32760, True, 4.013, 12.2), (32760, False, 2.989, 98.4),
                        (14040, True, 1.135, 7.8), (14040, False, 0.833, 45.2))}
# benchmarks/results/train.md: tiny profile, 2 CPU cores, one stage-2 step, peak RSS
CPU_TINY_FIGURES = {"device": "CPU, tiny profile", "source": "benchmarks/results/train.md",
                    "s_per_step": 0.015, "peak_gib": 466 / 1024}
QUANTILE_RANGE = (0.05, 0.95)  # small-face views span these quantiles of the clips' face heights
MIN_PHOTOS_ADVISED = 3  # fewer training photos: a warning (copy-paste faces, one look)
COVERAGE_WARN = 0.8  # coverage below this: a warning
PATCH_PX = 16  # one DiT token covers 16 x 16 pixels (VAE 8 x, patch 2 x 2)


@dataclass(frozen=True)
class PhotoPlan:
    name: str
    caption: str
    face_px: float  # the face box height in the photo itself (pixels)
    keypoints: np.ndarray  # [18, 3] photo pixels (the photo's own pose)
    pose_source: str  # pose-estimator | face-landmarks
    views: tuple  # faceid.train.photos.View
    view_face_px: tuple[float, ...]  # face height of each view, example pixels
    held_out: bool  # validation keeps the whole photo out of training


@dataclass(frozen=True)
class Schedule:
    mode: str
    stage1_steps: int
    stage2_steps: int
    identity_draws: float  # expected identity-example draws, both stages
    passes_per_photo: float  # expected draws of one training photo's views
    passes_per_example: float  # expected draws of one identity example (a view or an identity clip)
    why: str


@dataclass
class Plan:
    params: object  # faceid.config.Params with the resolved stage steps
    embedding: np.ndarray  # the identity's mean embedding
    embedder_meta: dict
    records: list  # faceid.faces.crop.PhotoRecord of the photos with an embedding (held-out ones too)
    photo_embeddings: dict
    outliers: list[str]
    reference_name: str  # the best aligned crop (VACE reference)
    holdout: object  # faceid.train.validation.Holdout
    photos: list[PhotoPlan]
    clips: list  # training clips
    held_out_clips: list
    routes: list  # faceid.train.routing.ClipRoute, training and held-out clips
    clip_face_px: dict[str, np.ndarray]  # clip_id -> face height per frame with a head
    face_sizes: dict
    schedule: Schedule
    estimate: dict
    warnings: list[str] = field(default_factory=list)

    def route(self, clip_id: str):
        return next(r for r in self.routes if r.clip_id == clip_id)


# --------------------------------------------------------------------------- pure rules


def clip_faces(keypoints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(heights [n], centres [n, 2])`` of the head boxes of a clip's frames ``[F, 18, 3]`` (clip
    pixels); frames without a confident head joint are left out."""
    from faceid.train.data import face_box_from_keypoints

    boxes = [b for b in (face_box_from_keypoints(k) for k in np.asarray(keypoints)) if b is not None]
    if not boxes:
        return np.zeros(0, np.float32), np.zeros((0, 2), np.float32)
    arr = np.asarray(boxes, np.float32)
    return arr[:, 3] - arr[:, 1], np.stack([(arr[:, 0] + arr[:, 2]) / 2, (arr[:, 1] + arr[:, 3]) / 2], 1)


def small_face_targets(clip_heights: np.ndarray, n: int) -> list[float]:
    """``n`` face heights at evenly spaced quantiles of the clips' (:data:`QUANTILE_RANGE`; the median for one)."""
    if n == 0 or len(clip_heights) == 0:
        return []
    lo, hi = QUANTILE_RANGE
    qs = [0.5] if n == 1 else [lo + (hi - lo) * k / (n - 1) for k in range(n)]
    return [float(v) for v in np.quantile(np.asarray(clip_heights, np.float64), qs)]


def stats(values) -> dict:
    v = np.asarray(list(values), np.float64)
    if not len(v):
        return {"n": 0, "min": None, "median": None, "max": None}
    return {"n": int(len(v)), "min": round(float(v.min()), 1), "median": round(float(np.median(v)), 1),
            "max": round(float(v.max()), 1)}


def coverage(clip_heights, example_heights) -> float | None:
    """Share of ``clip_heights`` within [min, max] of ``example_heights``; None without clip faces."""
    c, e = np.asarray(list(clip_heights), np.float64), np.asarray(list(example_heights), np.float64)
    if not len(c):
        return None
    if not len(e):
        return 0.0
    return float(((c >= e.min()) & (c <= e.max())).mean())


def resolve_schedule(tcfg, num_photos: int, views_per_photo: int, identity_clips: int, world_size: int,
                     init_from: bool = False) -> Schedule:
    """Steps of both stages (``tcfg`` = ``train_lora``; see the module doc). ``num_photos`` training
    photos with ``views_per_photo`` training views each, ``identity_clips`` training clips routed to
    the identity, ``world_size`` Ray workers (each step draws ``batch_size`` examples per worker).
    ``init_from``: the run starts from a shared adapter (``train-lora --init-from``): each stage's
    steps times ``train_lora.init_from_share`` (at least 1 where the stage trains).
    A schedule that trains nothing is a :class:`ConfigError`."""
    sc, per_step = tcfg.schedule, tcfg.batch_size * world_size
    pool = num_photos * views_per_photo + identity_clips
    if sc.mode == "fixed":
        s1, s2 = tcfg.stage1.steps, tcfg.stage2.steps
        why = "train_lora.schedule.mode fixed: train_lora.stage1.steps and stage2.steps as written"
    else:
        if num_photos < 1:
            raise ConfigError("train_lora.schedule.mode per_photo: no photo left to train on (all held out?); "
                              "add photos or use mode: fixed")
        draws = sc.steps_per_photo * num_photos
        want1 = int(round(draws * sc.stage1_share / per_step))
        want2 = int(round(draws * (1.0 - sc.stage1_share) / (per_step * tcfg.identity_share)))
        s1 = min(tcfg.stage1.steps, max(sc.min_steps, want1))
        s2 = min(tcfg.stage2.steps, max(sc.min_steps, want2))
        why = (f"train_lora.schedule.mode per_photo: {sc.steps_per_photo} draws x {num_photos} photo(s) = {draws} "
               f"identity draws, {sc.stage1_share:g} of them in stage 1 -> {want1} + {want2} steps "
               f"(at least min_steps {sc.min_steps}, at most stage1/stage2.steps {tcfg.stage1.steps}/{tcfg.stage2.steps})")
    if init_from:
        share = tcfg.init_from_share
        s1, s2 = (max(1, int(round(s * share))) if s > 0 else 0 for s in (s1, s2))
        why += f"; started from a shared adapter (--init-from): x train_lora.init_from_share {share:g} -> {s1} + {s2} steps"
    if s1 + s2 <= 0 or (sc.mode == "per_photo" and min(s1, s2) <= 0):
        raise ConfigError(f"train_lora: the schedule trains {s1} + {s2} steps ({why}); expected steps > 0 "
                          "(raise train_lora.stage1/stage2.steps or schedule.min_steps)")
    draws = (s1 + s2 * tcfg.identity_share) * per_step
    per_example = draws / pool if pool else 0.0
    return Schedule(sc.mode, s1, s2, draws, per_example * views_per_photo, per_example, why)


def tokens(frames: int, height: int, width: int, ref_frames: int = 0) -> int:
    """DiT video tokens of an example: latent frames (+ reference frames) x (H / 16) x (W / 16)."""
    return ((frames - 1) // 4 + 1 + ref_frames) * (height // PATCH_PX) * (width // PATCH_PX)


def _interpolate(rows: list[tuple[int, float]], t: int) -> float:
    """Linear in tokens through the benchmark rows (sorted by tokens); below the smallest row,
    proportional to it (a lower bound: small steps are dominated by fixed costs); above, the last slope."""
    (t0, v0), (t1, v1) = rows[0], rows[-1]
    if t <= t0:
        return v0 * t / t0
    for (a, va), (b, vb) in zip(rows, rows[1:]):
        if t <= b:
            return va + (vb - va) * (t - a) / (b - a)
    a, va = rows[-2]
    return v1 + (v1 - va) * (t - t1) / (t1 - a)


def estimate(params, schedule: Schedule, identity_tokens: list[int], prior_tokens: list[int]) -> dict:
    """Time and peak memory of the training steps (validation not included) from the benchmark figures."""
    tcfg = params.train_lora
    if params.model.profile != REAL_PROFILE:
        f = CPU_TINY_FIGURES
        steps = schedule.stage1_steps + schedule.stage2_steps
        return {"device": f["device"], "source": f["source"], "seconds": steps * f["s_per_step"],
                "peak_memory_gib": f["peak_gib"], "note": "per-step figure of the tiny model"}
    gc = tcfg.gradient_checkpointing
    rows = sorted((t, s) for t, g, s, _ in GPU_FIGURES["rows"] if g == gc)
    mem = sorted((t, m) for t, g, _, m in GPU_FIGURES["rows"] if g == gc)

    def mean_time(toks):
        return float(np.mean([_interpolate(rows, t) for t in toks])) if toks else 0.0

    t_id, t_prior = mean_time(identity_tokens), mean_time(prior_tokens)
    share = tcfg.identity_share if prior_tokens else 1.0
    t1 = t_id
    t2 = share * t_id + (1 - share) * t_prior
    seconds = (schedule.stage1_steps * t1 + schedule.stage2_steps * t2) * tcfg.batch_size
    largest = max(identity_tokens + prior_tokens, default=0)
    peak = max(mem[0][1], _interpolate(mem, largest)) if largest else mem[0][1]
    return {"device": GPU_FIGURES["device"], "source": GPU_FIGURES["source"], "seconds": seconds,
            "peak_memory_gib": peak, "stage1_s_per_step": t1, "stage2_s_per_step": t2,
            "note": (f"gradient checkpointing {'on' if gc else 'off'}; benchmark LoRA rank 64 main-cross-attn (this run: "
                     f"rank {tcfg.lora.rank} {tcfg.lora.targets}); 1-frame photo steps scaled from the 33-frame row "
                     "(a lower bound); validation not included")}


def photo_caption(caption: str, params) -> str:
    """A photo's caption: its ``<stem>.txt`` sidecar, else ``train_lora.photos.default_caption``, else
    (``""``) the clips' and inference's own ``prepare_pose.default_caption``."""
    return caption or params.train_lora.photos.default_caption or params.prepare_pose.default_caption


# --------------------------------------------------------------------------- the plan


def make_plan(params, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, world_size: int | None = None,
              init_from: bool = False) -> Plan:
    """The plan of one identity's run (module doc). Reads the inputs, routes the clips, estimates the
    photos' poses; loads no diffusion model and writes nothing. ``init_from``: the run starts from a
    shared adapter (:func:`resolve_schedule`)."""
    from faceid.faces.crop import choose_reference, read_photos
    from faceid.train.data import check_embedder, load_embedding, load_photo_embeddings, split_clips
    from faceid.train.routing import IDENTITY, route_clips
    from faceid.train.validation import enabled, plan_holdout

    tcfg = params.train_lora
    pcfg, world = tcfg.photos, world_size or tcfg.num_workers
    crops_dir, embeddings_dir, clips_dir = Path(crops_dir), Path(embeddings_dir), Path(clips_dir)

    # 1. Photos with an embedding; the reference photo; what validation holds out
    embedding, meta = load_embedding(embeddings_dir)
    check_embedder(meta, params.embed_faces)
    records = read_photos(crops_dir, embeddings_dir)
    photo_embs, outliers = load_photo_embeddings(embeddings_dir)
    used = [r for r in records if r.name in photo_embs]
    if not used:
        raise InputError(f"{crops_dir} / {embeddings_dir}: no accepted photo has an embedding (names "
                         f"{[r.name for r in records]} vs {sorted(photo_embs)}); rerun embed-faces on these crops")
    best = choose_reference(used)
    holdout = plan_holdout([r.name for r in used], best.name, tcfg.validation, pcfg.views)

    # 2. Clips: routed to identity | prior; their face heights (the target sizes)
    clips, kept_out = split_clips(clips_dir, tcfg.holdout_clips)  # kept out of training either way
    held_out_clips = kept_out if enabled(tcfg.validation) else []  # ... validated on when validation is on
    routes = route_clips(clips + held_out_clips, embedding, params.crop_faces, params.embed_faces,
                         tcfg.clip_identity_threshold)
    role = {r.clip_id: r.role for r in routes}
    clip_px, centres = {}, []
    for clip in clips + kept_out:  # the clips' face sizes: what the identity will be rendered on
        heights, ctr = np.zeros(0, np.float32), np.zeros((0, 2), np.float32)
        if clip.keypoints_path is not None and clip.keypoints_path.is_file():
            with np.load(clip.keypoints_path, allow_pickle=False) as z:
                heights, ctr = clip_faces(z["keypoints"][: clip.num_frames])
        clip_px[clip.clip_id] = heights
        centres.append(ctr / np.array([clip.width, clip.height], np.float32))
    all_heights = np.concatenate(list(clip_px.values())) if clip_px else np.zeros(0, np.float32)
    centre = tuple(float(v) for v in np.median(np.concatenate(centres), 0)) if len(all_heights) else (0.5, 0.5)
    targets = small_face_targets(all_heights, pcfg.small_face_views)

    # 3. Photos: their own pose, their views and the face height of each
    from faceid.pose.estimate import build_estimator
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE
    from faceid.train.photos import (estimate_photo_pose, face_height, read_rgb, small_face_views, view_face_height,
                                     views_for)

    budget = min(c.height * c.width for c in clips)
    warnings, photos = [], []
    estimator = build_estimator(params.prepare_pose)
    try:
        for rec in used:
            image = read_rgb(rec.photo_path)
            kps, source = estimate_photo_pose(estimator, image, rec.landmarks)
            own = face_height(rec.box)
            views = views_for(rec.sha256, pcfg)
            views += small_face_views(len(views), targets, centre, own, pcfg.flip)
            px = tuple(view_face_height(image.shape[:2], rec.box, kps, budget, v, DRAW_MIN_CONFIDENCE) for v in views)
            photos.append(PhotoPlan(rec.name, photo_caption(rec.caption, params), own, kps, source, tuple(views), px,
                                    rec.name in holdout.photos))
            if targets and own < max(targets):
                warnings.append(f"photo {rec.name}: its face is {own:.0f} px, smaller than the clips' {max(targets):.0f} px; "
                                "its small-face views stop at its own size (no upscaling)")
    finally:
        estimator.close()

    # 4. Face sizes of what trains, and their coverage of the clips'
    training_photos = [p for p in photos if not p.held_out]
    example_px = [h for p in training_photos for v, h in zip(p.views, p.view_face_px) if v.index != holdout.view]
    id_clips = [c for c in clips if role[c.clip_id] == IDENTITY]
    example_px += [float(h) for c in id_clips for h in clip_px[c.clip_id]]
    cov = coverage(all_heights, example_px)
    face_sizes = {"clips": stats(all_heights), "identity_examples": stats(example_px), "coverage": cov,
                  "small_face_targets": [round(t, 1) for t in targets],
                  "definition": "face box height in px where the DiT sees it: clip frames from keypoints (clip "
                                "pixels), photo views from the detector's box (example pixels); coverage = share of "
                                "clip face heights within [min, max] of the identity examples'"}

    # 5. Schedule, estimate
    views_trained = len(photos[0].views) - (1 if holdout.view is not None else 0)
    schedule = resolve_schedule(tcfg, len(training_photos), views_trained, len(id_clips), world, init_from)
    resolved = dataclasses.replace(params, train_lora=dataclasses.replace(
        tcfg, stage1=dataclasses.replace(tcfg.stage1, steps=schedule.stage1_steps),
        stage2=dataclasses.replace(tcfg.stage2, steps=schedule.stage2_steps)))
    ref = 1 if tcfg.reference_image else 0
    f, h, w = clips[0].num_frames, clips[0].height, clips[0].width
    id_tokens = [tokens(1, h, w, ref)] * (len(training_photos) * views_trained) + [tokens(f, h, w, ref)] * len(id_clips)
    prior_tokens = [tokens(c.num_frames, c.height, c.width) for c in clips if role[c.clip_id] != IDENTITY]
    est = estimate(resolved, schedule, id_tokens, prior_tokens)

    # 6. Warnings
    if len(training_photos) < MIN_PHOTOS_ADVISED:
        warnings.append(f"only {len(training_photos)} photo(s) train the identity: expect copy-paste faces; "
                        f"{MIN_PHOTOS_ADVISED}-15 varied photos are advised")
    if not len(all_heights):
        warnings.append("no clip face measured (clips without keypoints, or no head joint found): face sizes cannot "
                        "be matched and no small-face view is made")
    elif cov is not None and cov < COVERAGE_WARN:
        hint = ("raise train_lora.photos.small_face_views" if pcfg.small_face_views == 0 else
                "the photos' faces are too small (or too few) to cover the clips'; add closer photos")
        warnings.append(f"faces too small to cover: the identity examples' faces ({stats(example_px)['min']}-"
                        f"{stats(example_px)['max']} px) cover {100 * cov:.0f} % of the clips' face heights "
                        f"({face_sizes['clips']['min']}-{face_sizes['clips']['max']} px); {hint}")
    if not any(r.role == IDENTITY for r in routes):
        warnings.append("no identity clip: no clip shows the person (routing), the face is learnt from photos only")
    if all(role[c.clip_id] == IDENTITY for c in clips):
        warnings.append("no prior clip: every training clip shows the person, so stage 2 has no motion prior of "
                        "other people (add dance clips of others, or lower train_lora.holdout_clips)")
    return Plan(resolved, embedding, meta, used, photo_embs, outliers, best.name, holdout, photos, clips,
                held_out_clips, routes, clip_px, face_sizes, schedule, est, warnings)


def summary(plan: Plan) -> dict:
    """Numbers of the plan for the run summary and MLflow metrics."""
    fs, sc = plan.face_sizes, plan.schedule
    out = {"passes_per_photo": sc.passes_per_photo, "passes_per_example": sc.passes_per_example,
           "planned_stage1_steps": sc.stage1_steps, "planned_stage2_steps": sc.stage2_steps,
           "estimated_seconds": plan.estimate["seconds"], "estimated_peak_memory_gib": plan.estimate["peak_memory_gib"]}
    if fs["coverage"] is not None:
        out["face_size_coverage"] = fs["coverage"]
    for who in ("clips", "identity_examples"):
        for k in ("min", "median", "max"):
            if fs[who][k] is not None:
                out[f"{who}_face_px_{k}"] = fs[who][k]
    return out


def card(plan: Plan) -> dict:
    """The plan's part of the identity card (and MLflow's examples.json)."""
    return {"face_sizes": plan.face_sizes, "schedule": dataclasses.asdict(plan.schedule),
            "estimate": plan.estimate, "warnings": list(plan.warnings),
            "photo_views": {p.name: [round(h, 1) for h in p.view_face_px] for p in plan.photos}}


def format_plan(plan: Plan, identity: str) -> str:
    """The plan for a person to read (``faceid train-lora --plan`` and the start of a run)."""
    from faceid.train.routing import IDENTITY

    tcfg, fs, sc, est = plan.params.train_lora, plan.face_sizes, plan.schedule, plan.estimate
    train = [p for p in plan.photos if not p.held_out]
    n_views = len(plan.photos[0].views)
    small = tcfg.photos.small_face_views if fs["small_face_targets"] else 0
    lines = [f"train-lora plan for {identity} (made with the pose estimator and the face detector + embedder; "
             "no diffusion model)",
             "identity examples:",
             f"  photos: {len(train)} trained" + (f", held out: {', '.join(p.name for p in plan.photos if p.held_out)}"
                                                  if len(train) < len(plan.photos) else "")
             + (f", left out (embed-faces outliers): {', '.join(plan.outliers)}" if plan.outliers else ""),
             f"  views per photo: {n_views} ({tcfg.photos.views} person-aware, {small} small-face)"
             + (f"; view {plan.holdout.view} of each held out" if plan.holdout.view is not None else "")]
    for p in plan.photos:
        lines.append(f"    {p.name}: face {p.face_px:.0f} px in the photo; in its views "
                     f"{', '.join(f'{h:.0f}' for h in p.view_face_px)} px; caption {p.caption!r}"
                     + (" (held out)" if p.held_out else ""))
    held = {c.clip_id for c in plan.held_out_clips}
    n_id = sum(r.role == IDENTITY and r.clip_id not in held for r in plan.routes)
    lines.append(f"clips: {n_id} identity, {len(plan.clips) - n_id} prior, {len(held)} held out")
    for r in plan.routes:
        lines.append(f"  {r.clip_id}: {r.role}{' (held out)' if r.clip_id in held else ''}; {r.reason}")
    c, e = fs["clips"], fs["identity_examples"]
    cov = ("n/a: no clip face measured" if fs["coverage"] is None else
           f"{100 * fs['coverage']:.0f} % of the clips' face heights within the identity examples' range")
    lines += ["face sizes (face box height, px; min / median / max):",
              f"  clips:             {c['min']} / {c['median']} / {c['max']} ({c['n']} frames)",
              f"  identity examples: {e['min']} / {e['median']} / {e['max']} ({e['n']})",
              f"  coverage: {cov}"]
    lines += ["schedule:",
              f"  stage 1: {sc.stage1_steps} steps; stage 2: {sc.stage2_steps} steps "
              f"(identity_share {tcfg.identity_share:g}, batch {tcfg.batch_size} x {tcfg.num_workers} worker(s))",
              f"  passes per photo: {sc.passes_per_photo:.3g} (per identity example {sc.passes_per_example:.1f})",
              f"  {sc.why}"]
    mins = est["seconds"] / 60
    lines += [f"estimate on {est['device']} (from {est['source']}): ~{mins:.0f} min of training steps"
              f" ({est['seconds']:.0f} s), peak memory ~{est['peak_memory_gib']:.1f} GiB; {est['note']}"]
    lines += ["warnings:" if plan.warnings else "warnings: none"] + [f"  ! {w}" for w in plan.warnings]
    return "\n".join(lines)


def run(params, identity: str, crops_dir: Path, embeddings_dir: Path, clips_dir: Path, init_from: bool = False) -> dict:
    """``faceid train-lora --plan``: print what the run would do and return its numbers; loads no
    diffusion model, trains nothing, writes nothing (no lock, no cache, no output folder)."""
    plan = make_plan(params, crops_dir, embeddings_dir, clips_dir, init_from=init_from)
    print(format_plan(plan, identity))
    return {**summary(plan), "warnings": list(plan.warnings)}
