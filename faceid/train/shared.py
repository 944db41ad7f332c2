"""``faceid train-shared``: one identity adapter (face mapper + LoRA) for many people.

Why. Trained on one person, the mapper sees a few nearby embeddings and learns no map: mapper + LoRA
act as a few learned tokens for that face. Trained across many people, each photo with its own
embedding, the mapper learns to turn *any* embedding into face tokens, so a person it never saw is
rendered from their embed-faces output with no training (``faceid infer --adapter``), moving in
embedding space moves the rendered face (blends, interpolation), and per-person training can start
from it and be short (``faceid train-lora --init-from``). IP-Adapter-FaceID, PuLID, InstantID and the
identity-video systems (Lynx, Stand-In, ConsisID, Concat-ID) train this way, on thousands of people.

Inputs: what ``crop-faces`` / ``embed-faces`` write for a folder of people (``faceid.faces.many``):
``<crops>/<person>/`` and ``<embeddings>/<person>/``, plus the prepare-pose clips.

The plan (:func:`make_plan`, printed before any diffusion model loads, ``faceid train-shared --plan``):

- **People.** Every person with both a crops and an embeddings folder. With validation on
  (``train_lora.validation``), the ``train_shared.holdout_identities`` people shown in the fewest clips
  (ties: the last by name) are held out whole: their photos are never trained on and give the held-out *zero-shot* identity loss; renders of
  held-out poses use the first held-out person's embedding (FaceSim of a person the adapter never saw).
- **Identity examples** of every training person: that person's photo views, each with *that photo's
  own* embedding (``faceid.train.plan.make_plan`` per person, photos held out: none).
- **Clips** are routed per person by FaceSim (``faceid.train.routing``): a clip showing training person
  k (the highest FaceSim among those at the threshold) is an identity example of k, under k's mean
  embedding; a clip showing a held-out person is left out (it would teach the held-out face); every
  other clip is a motion prior with the null face. Held-out clips validate the prior.
- **Schedule**: ``train_lora.schedule`` over all training photos (``per_photo`` caps at
  ``stageN.steps``: raise them for many people).

Training is the identity recipe itself (``faceid.train.recipe.train`` with ``config["people"]``):
the same two stages, loss, Ray Train launcher, checkpoints, validation and MLflow logging. The output
is an adapter folder (``faceid.model.identity``; card ``kind: shared``, the people trained on and held
out, and every person's mean embedding in ``identity_embedding.safetensors`` as ``people``), registered
as ``faceid-<train_shared.name>``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.train.routing import IDENTITY, PRIOR, ClipRoute

MIN_TRAINING_PEOPLE = 2  # fewer: no map between embeddings can be learnt (train-lora is the tool for one person)
EXCLUDED_CLIP = "excluded"  # a clip that shows a held-out person


@dataclass
class SharedPlan:
    params: object  # faceid.config.Params with the resolved stage steps
    people: list[str]  # trained on
    held_out: list[str]  # validation: zero-shot
    plans: dict  # person -> faceid.train.plan.Plan with the shared routes (every clip as that person sees it)
    clip_person: dict[str, str | None]  # training clip -> the person it shows (None: prior; EXCLUDED_CLIP)
    clips: list  # training clips
    held_out_clips: list
    embedding: np.ndarray  # mean of the training people's mean embeddings (the adapter's "identity" tensor)
    people_embeddings: dict[str, np.ndarray]  # every person's mean embedding (trained and held out)
    embedder_meta: dict
    schedule: object  # faceid.train.plan.Schedule
    estimate: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def render_embedding(self) -> np.ndarray:
        """What validation renders with: the first held-out person (zero-shot), else the first trained one."""
        return self.people_embeddings[(self.held_out or self.people)[0]]


def list_people(crops_root: Path, embeddings_root: Path) -> list[str]:
    """People with an embed-faces folder under ``embeddings_root`` (sorted by name); each must have its
    crop-faces folder of the same name under ``crops_root``."""
    from faceid.io import require_dir

    crops_root = require_dir(crops_root, "a crop-faces output of a folder of people (<crops>/<person>/)")
    embeddings_root = require_dir(embeddings_root, "an embed-faces output of a folder of people (<embeddings>/<person>/)")
    if (embeddings_root / "embeddings.safetensors").is_file():
        raise InputError(f"{embeddings_root}: the embed-faces output of ONE person; train-shared takes a folder of "
                         "people (crop-faces / embed-faces run on a folder of identity folders); use train-lora for one")
    people = sorted(p.name for p in embeddings_root.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and (p / "embeddings.safetensors").is_file())
    missing = [n for n in people if not (crops_root / n / "manifest.parquet").is_file()]
    if missing:
        raise InputError(f"{crops_root}: no crop-faces folder for {', '.join(missing)} (expected <crops>/<person>/manifest.parquet "
                         f"beside {embeddings_root}/<person>/)")
    return people


def split_people(people: list[str], holdout: int, validation_on: bool, clips_shown: dict[str, int] | None = None
                  ) -> tuple[list[str], list[str]]:
    """``(trained, held out)``, each by name: with validation on, the ``holdout`` people shown in the fewest
    training clips (``clips_shown``; ties: the last by name) are held out, so holding a person out costs
    the fewest clips; at least :data:`MIN_TRAINING_PEOPLE` must train."""
    k = holdout if validation_on else 0
    shown = clips_shown or {}
    order = sorted(sorted(people, reverse=True), key=lambda p: shown.get(p, 0))  # fewest clips, then the last name
    held = sorted(order[:k]) if k else []
    trained = [p for p in people if p not in held]
    if len(trained) < MIN_TRAINING_PEOPLE:
        raise InputError(f"train-shared: {len(people)} people ({', '.join(people) or 'none'}), {len(held)} held out "
                         f"(train_shared.holdout_identities): at least {MIN_TRAINING_PEOPLE} must train; add people "
                         "or lower holdout_identities (a single person: train-lora)")
    return trained, held


def assign_clips(clip_ids: list[str], routes: dict[str, dict[str, ClipRoute]], trained: list[str],
                 held_out: list[str]) -> dict[str, str | None]:
    """``{clip: person | None | EXCLUDED_CLIP}``: the training person with the highest FaceSim among those
    the clip is routed to (``routes[person][clip]``); a clip that shows a held-out person (and no training
    one) is excluded; others None (motion prior). Pure."""
    out = {}
    for cid in clip_ids:
        shown = [(routes[p][cid].facesim, p) for p in trained if routes[p][cid].role == IDENTITY]
        if shown:
            out[cid] = min(shown, key=lambda fp: (-fp[0], fp[1]))[1]  # the highest FaceSim; ties: the first name
        elif any(routes[p][cid].role == IDENTITY for p in held_out):
            out[cid] = EXCLUDED_CLIP
        else:
            out[cid] = None
    return out


def make_plan(params, crops_root: Path, embeddings_root: Path, clips_dir: Path, world_size: int | None = None) -> SharedPlan:
    """The shared run's plan (module doc): people, their photos and views, clips per person, schedule.
    Loads the pose estimator and FaceSim scorer (per person), no diffusion model; writes nothing."""
    from faceid.train import plan as planning
    from faceid.train.data import split_clips
    from faceid.train.validation import enabled

    tcfg = params.train_lora
    world = world_size or tcfg.num_workers
    crops_root, embeddings_root = Path(crops_root), Path(embeddings_root)
    people = list_people(crops_root, embeddings_root)
    split_people(people, params.train_shared.holdout_identities, enabled(tcfg.validation))  # enough people, before the work

    # 1. Each person as train-lora plans them, with nothing of theirs held out (a held-out person is wholly out)
    whole = dataclasses.replace(params, train_lora=dataclasses.replace(
        tcfg, validation=dataclasses.replace(tcfg.validation, validate_every=0, render_every=0)))
    plans, warnings = {}, []
    for k, person in enumerate(people, start=1):
        print(f"train-shared plan [{k}/{len(people)}] {person}", flush=True)
        plans[person] = planning.make_plan(whole, crops_root / person, embeddings_root / person, clips_dir, world)
        warnings += [f"{person}: {w}" for w in plans[person].warnings if not w.startswith(("no identity clip", "no prior clip"))]
    metas = {p: plans[p].embedder_meta.get("embedder") for p in people}
    if len(set(metas.values())) > 1:
        raise InputError(f"{embeddings_root}: people embedded with different embedders {metas}; rerun embed-faces")

    # 2. Clips: each training clip to the person it shows (or the prior, or out); held-out clips validate the prior
    clips, kept_out = split_clips(clips_dir, tcfg.holdout_clips)
    held_out_clips = kept_out if enabled(tcfg.validation) else []
    routes = {p: {r.clip_id: r for r in plans[p].routes} for p in people}
    shown = {p: sum(r.role == IDENTITY for r in routes[p].values()) for p in people}
    trained, held = split_people(people, params.train_shared.holdout_identities, enabled(tcfg.validation), shown)
    clip_person = assign_clips([c.clip_id for c in clips], routes, trained, held)

    def shared_routes(person: str) -> list[ClipRoute]:
        out = []
        for c in clips:
            r, shown = routes[person][c.clip_id], clip_person[c.clip_id]
            role = IDENTITY if shown == person else PRIOR
            why = r.reason if shown in (person, None) else (
                "shows a held-out person: left out of training" if shown == EXCLUDED_CLIP else f"shows {shown}")
            out.append(dataclasses.replace(r, role=role, reason=why))
        out += [ClipRoute(c.clip_id, PRIOR, None, 0, 0, 0.0, "held out: validates the motion prior") for c in held_out_clips]
        return out

    first = trained[0]
    for person in people:  # the first trained person carries the prior and held-out clips
        plans[person] = dataclasses.replace(plans[person], routes=shared_routes(person),
                                            held_out_clips=held_out_clips if person == first else [])

    # 3. Schedule over every training photo, and the estimate
    photos = sum(len(plans[p].photos) for p in trained)
    views = len(plans[first].photos[0].views)
    id_clips = sum(1 for p in clip_person.values() if p not in (None, EXCLUDED_CLIP))
    schedule = planning.resolve_schedule(tcfg, photos, views, id_clips, world)
    resolved = dataclasses.replace(params, train_lora=dataclasses.replace(
        tcfg, stage1=dataclasses.replace(tcfg.stage1, steps=schedule.stage1_steps),
        stage2=dataclasses.replace(tcfg.stage2, steps=schedule.stage2_steps)))
    ref = 1 if tcfg.reference_image else 0
    f, h, w = clips[0].num_frames, clips[0].height, clips[0].width
    id_tokens = [planning.tokens(1, h, w, ref)] * (photos * views) + [planning.tokens(f, h, w, ref)] * id_clips
    prior_tokens = [planning.tokens(c.num_frames, c.height, c.width) for c in clips if clip_person[c.clip_id] is None]
    est = planning.estimate(resolved, schedule, id_tokens, prior_tokens)
    if not prior_tokens:
        warnings.append("no prior clip: every training clip shows a person, so stage 2 has no motion prior of others")

    people_embs = {p: np.asarray(plans[p].embedding, np.float32) for p in people}
    mean = np.mean([people_embs[p] for p in trained], axis=0).astype(np.float32)
    return SharedPlan(resolved, trained, held, plans, clip_person, clips, held_out_clips, mean, people_embs,
                      plans[first].embedder_meta, schedule, est, warnings)


def clips_of(plan: SharedPlan, person: str) -> set[str]:
    """The clips built with ``person``'s plan: those showing them; the first trained person also builds
    the prior and the held-out clips (each clip is built once)."""
    ids = {c for c, p in plan.clip_person.items() if p == person}
    if person == plan.people[0]:
        ids |= {c for c, p in plan.clip_person.items() if p is None} | {c.clip_id for c in plan.held_out_clips}
    return ids


def build_training_set(pipe, params, plan: SharedPlan, cache_dir: Path, base_model: str, show_progress: bool = True):
    """One :class:`faceid.train.examples.TrainingSet` for the shared run: every training person's identity
    examples (their photos with their own embeddings, the clips showing them), the prior clips, and as
    validation the held-out people's photos (identity: zero-shot) and the held-out clips (prior)."""
    from faceid.train.examples import TrainingSet, build_training_set as build_one

    out = TrainingSet([], [], [], None)
    for person in plan.people + plan.held_out:
        one = build_one(pipe, params, plan.plans[person], cache_dir, base_model, show_progress=show_progress,
                        clip_ids=clips_of(plan, person))  # its rows are its photos and these clips
        held = person in plan.held_out
        out.rows += [{**r, "person": person, **({"role": "held_out", "validates": IDENTITY} if held else {})}
                     for r in one.rows]
        out.cache_hits += one.cache_hits
        out.cache_misses += one.cache_misses
        if held:
            out.validation[IDENTITY] += one.identity + one.validation[IDENTITY]
        else:
            out.identity += one.identity
            out.prior += one.prior
            out.validation[PRIOR] += one.validation[PRIOR]
        if person == (plan.held_out or plan.people)[0]:
            out.reference = one.reference  # the renders' person
    out.routes = [dataclasses.replace(r, role=IDENTITY, reason=f"shows {plan.clip_person[r.clip_id]}: "
                                      f"{plan.plans[plan.clip_person[r.clip_id]].route(r.clip_id).reason}")
                  if plan.clip_person.get(r.clip_id) not in (None, EXCLUDED_CLIP) else r
                  for r in plan.plans[plan.people[0]].routes]
    out.holdout_note = (f"people held out (zero-shot): {', '.join(plan.held_out)}" if plan.held_out else
                        "no person held out (train_shared.holdout_identities 0 or validation off)")
    for c, p in plan.clip_person.items():
        if p == EXCLUDED_CLIP:
            out.rows.append({"kind": "clip", "id": c, "role": "excluded", "reason": "shows a held-out person"})
    return out


def format_plan(plan: SharedPlan, name: str) -> str:
    """The plan for a person to read (``faceid train-shared --plan`` and the start of a run)."""
    sc, est, tcfg = plan.schedule, plan.estimate, plan.params.train_lora
    lines = [f"train-shared plan for adapter {name!r} (pose estimator, face detector + embedder; no diffusion model)",
             f"people: {len(plan.people)} trained, {len(plan.held_out)} held out (zero-shot validation)"
             + (f": {', '.join(plan.held_out)}" if plan.held_out else "")]
    for p in plan.people + plan.held_out:
        pp = plan.plans[p]
        shows = sorted(c for c, who in plan.clip_person.items() if who == p)
        lines.append(f"  {p}: {len(pp.photos)} photo(s) x {len(pp.photos[0].views)} views"
                     + (f", clips showing them: {', '.join(shows)}" if shows else "")
                     + (" (held out)" if p in plan.held_out else ""))
    prior = sorted(c for c, who in plan.clip_person.items() if who is None)
    out = sorted(c for c, who in plan.clip_person.items() if who == EXCLUDED_CLIP)
    lines.append(f"clips: {len(plan.clips) - len(prior) - len(out)} identity, {len(prior)} prior, "
                 f"{len(out)} left out (show a held-out person), {len(plan.held_out_clips)} held out")
    lines += ["schedule:",
              f"  stage 1: {sc.stage1_steps} steps; stage 2: {sc.stage2_steps} steps (identity_share "
              f"{tcfg.identity_share:g}, batch {tcfg.batch_size} x {tcfg.num_workers} worker(s))",
              f"  passes per photo: {sc.passes_per_photo:.3g}; {sc.why}",
              f"estimate on {est['device']} (from {est['source']}): ~{est['seconds'] / 60:.0f} min of training steps, "
              f"peak memory ~{est['peak_memory_gib']:.1f} GiB; {est['note']}"]
    lines += ["warnings:" if plan.warnings else "warnings: none"] + [f"  ! {w}" for w in plan.warnings]
    return "\n".join(lines)


def summary(plan: SharedPlan) -> dict:
    """Numbers of the plan for the run summary and MLflow."""
    sc = plan.schedule
    return {"people_trained": len(plan.people), "people_held_out": len(plan.held_out),
            "passes_per_photo": sc.passes_per_photo, "passes_per_example": sc.passes_per_example,
            "planned_stage1_steps": sc.stage1_steps, "planned_stage2_steps": sc.stage2_steps,
            "estimated_seconds": plan.estimate["seconds"], "estimated_peak_memory_gib": plan.estimate["peak_memory_gib"]}


def card(plan: SharedPlan) -> dict:
    """The shared part of the adapter card."""
    return {"kind": "shared",
            "people": {"trained": list(plan.people), "held_out": list(plan.held_out)},
            "clips_per_person": {p: sorted(c for c, who in plan.clip_person.items() if who == p) for p in plan.people},
            "schedule": dataclasses.asdict(plan.schedule), "estimate": plan.estimate, "warnings": list(plan.warnings)}


def run_plan(params, name: str, crops_root: Path, embeddings_root: Path, clips_dir: Path) -> dict:
    """``faceid train-shared --plan``: print the plan; no diffusion model, nothing written."""
    plan = make_plan(params, crops_root, embeddings_root, clips_dir)
    print(format_plan(plan, name))
    return {"people": len(plan.people), "held_out": len(plan.held_out), "planned_stage1_steps": plan.schedule.stage1_steps,
            "planned_stage2_steps": plan.schedule.stage2_steps, "warnings": list(plan.warnings)}
