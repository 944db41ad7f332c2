"""The training set of one identity: *identity* examples, which carry the person's own pixels and
face tokens, and *prior* examples, which keep the base model's motion and people.

- Identity photos (``faceid.train.photos``): every accepted photo that embed-faces kept, as
  ``train_lora.photos.views`` one-frame examples; face tokens from *that photo's own* embedding
  (``per_image``), so the mapper sees varied inputs; loss weighted towards the face.
- Dance clips are scored against the identity (``faceid.train.routing.route_clips``, FaceSim on
  faces found at the source video's resolution): a clip that shows the identity is an identity
  example (face tokens from the mean embedding, face-weighted loss from its keypoints); every
  other clip is a prior example, trained with the null face, so the LoRA keeps rendering motion
  and does not bind the identity to other people's faces (DreamBooth's prior preservation).
- ``train_lora.reference_image``: the identity's best aligned crop (sharp, frontal;
  ``faceid.faces.crop.choose_reference``) goes in front of identity examples as the VACE
  reference image (for the reference photo itself, the second best, so no target is its own
  reference).

Held out for validation during training (``faceid.train.validation``, when it is on): the photos
:func:`faceid.train.validation.plan_holdout` picks (or one augmented view of every photo) and the
held-out clips (``train_lora.holdout_clips``, routed like the others). They are built exactly like
training examples but land in ``TrainingSet.validation``, never in a training pool.

What trains is decided first, without a diffusion model, by :func:`faceid.train.plan.make_plan`
(photos, their poses and views, captions, clip routes, held-out photos and clips, the schedule):
:func:`build_training_set` executes that plan. Small-face views (``photos.small_face_views``) weigh 0
in the loss where they show fill instead of the photo.

Every example is cached in the latent cache (``faceid.train.cache``); ``rows`` lists each photo
and clip with its role (``identity`` | ``prior`` | ``excluded`` | ``held_out``) and score for the
identity card and MLflow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.train.routing import IDENTITY, PRIOR

EXCLUDED = "excluded"  # a photo embed-faces found to show another person
HELD_OUT = "held_out"  # a photo or clip kept out of training for validation (row key "validates": its role)


@dataclass
class TrainingSet:
    identity: list[dict]  # examples (dicts of CPU tensors, see faceid.train.step.BATCH_KEYS) with face tokens
    prior: list[dict]  # examples trained with the null face
    rows: list[dict]  # one per photo and clip: kind, id, role, facesim, ...
    reference: dict | None = None  # {"name", "image" [H, W, 3] uint8, "in_training"}
    routes: list = field(default_factory=list)  # faceid.train.routing.ClipRoute per clip
    cache_hits: int = 0
    cache_misses: int = 0
    notes: list[str] = field(default_factory=list)
    # held-out examples (never trained on), by the role they validate
    validation: dict[str, list[dict]] = field(default_factory=lambda: {IDENTITY: [], PRIOR: []})
    holdout_note: str = ""

    def pools(self) -> dict[str, list[dict]]:
        return {IDENTITY: self.identity, PRIOR: self.prior}


def _sha256_array(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


def _estimator_id(cfg) -> str:
    return cfg.estimator if cfg.estimator != "onnx" else f"onnx:{cfg.onnx_path}"


def _photo_sources(plan, params, budget: int, size: tuple[int, int], reference, vae_scale: int) -> list:
    """Cache sources of every view of every photo of the plan (``reference(name) -> (image, sha)`` or
    None); the photo's pose is the plan's (estimated once, before any model loaded)."""
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE
    from faceid.train.cache import Source
    from faceid.train.data import latent_face_mask
    from faceid.train.photos import VERSION, make_example, make_small_face_example, read_rgb

    records = {r.name: r for r in plan.records}
    sources = []
    for pp in plan.photos:
        rec, caption = records[pp.name], pp.caption
        ref_image, ref_sha = reference(rec.name) if reference else (None, None)
        for view in pp.views:
            payload = {"kind": "photo", "version": VERSION, "sha256": rec.sha256, "box": [round(float(v), 3) for v in rec.box],
                       "view": view.key(), "budget": budget, "caption": caption, "estimator": _estimator_id(params.prepare_pose),
                       "reference": ref_sha}
            if view.face_px:
                payload["size"] = list(size)

            def load(rec=rec, view=view, caption=caption, ref_image=ref_image, kps=pp.keypoints, source=pp.pose_source):
                photo = read_rgb(rec.photo_path)
                if view.face_px:
                    ex = make_small_face_example(photo, rec.box, kps, size, view, DRAW_MIN_CONFIDENCE)
                else:
                    ex = make_example(photo, rec.box, kps, budget, view, DRAW_MIN_CONFIDENCE)
                h, w = ex.target.shape[1:3]
                valid = np.ones((1, h // vae_scale, w // vae_scale), np.float32)
                if ex.valid is not None:  # latent cells wholly in the fill weigh 0
                    valid = latent_face_mask([ex.valid], h, w, vae_scale)
                extra = {"face_mask": latent_face_mask([ex.face_box], h, w, vae_scale), "valid_mask": valid,
                         "pose_from_landmarks": np.float32(source == "face-landmarks")}
                return ex.target, ex.pose, caption, ref_image, extra

            sources.append(Source(f"photo:{rec.name}:v{view.index}", payload, load))
    return sources


def _clip_face_mask(clip, vae_scale: int) -> np.ndarray:
    """``[f, h, w]`` latent face mask of a clip from its keypoints (all ones without keypoints)."""
    from faceid.train.data import face_box_from_keypoints, latent_face_mask

    f, h, w = (clip.num_frames - 1) // 4 + 1, clip.height // vae_scale, clip.width // vae_scale
    if clip.keypoints_path is None or not clip.keypoints_path.is_file():
        return np.ones((f, h, w), np.float32)
    with np.load(clip.keypoints_path, allow_pickle=False) as z:
        kps = z["keypoints"][: clip.num_frames]
    return latent_face_mask([face_box_from_keypoints(k) for k in kps], clip.height, clip.width, vae_scale)


def _clip_sources(clips, routes: dict, reference_sha: str | None, reference_image) -> list:
    from faceid.train.cache import Source
    from faceid.train.data import read_clip

    sources = []
    for clip in clips:
        with_ref = routes[clip.clip_id].role == IDENTITY and reference_image is not None
        payload = {"kind": "clip", "checksum": clip.checksum, "caption": clip.caption,
                   "shape": [clip.num_frames, clip.height, clip.width], "reference": reference_sha if with_ref else None}

        def load(clip=clip, with_ref=with_ref):
            target, pose = read_clip(clip)
            return target, pose, clip.caption, reference_image if with_ref else None, {}

        sources.append(Source(f"clip:{clip.clip_id}", payload, load))
    return sources


def build_training_set(pipe, params, plan, cache_dir: Path, base_model: str, show_progress: bool = True,
                       clip_ids: set[str] | None = None) -> TrainingSet:
    """Identity and prior examples (cached latents + conditioning) of one identity as ``plan``
    (:func:`faceid.train.plan.make_plan`) decided them, and the held-out validation examples when
    ``train_lora.validation`` is on; see the module doc. ``clip_ids``: build only these clips (a
    shared adapter builds each clip once, for the person it shows: :mod:`faceid.train.shared`)."""
    import torch

    from faceid.faces.crop import choose_reference
    from faceid.faces.embed import l2_normalize
    from faceid.train.cache import cached_examples
    from faceid.train.photos import read_rgb

    tcfg = params.train_lora
    vae_scale = int(pipe.vae_scale_factor_spatial)
    used, photo_embs, holdout, mean_embedding = plan.records, plan.photo_embeddings, plan.holdout, plan.embedding

    # 1. Photos that crop-faces accepted and embed-faces kept, each with its own embedding
    unit_mean = l2_normalize(np.asarray(mean_embedding, np.float32))
    rows = [{"kind": "photo", "id": pp.name, "role": IDENTITY,
             "facesim": float(l2_normalize(photo_embs[pp.name]) @ unit_mean), "caption": pp.caption,
             "face_px": round(pp.face_px, 1), "view_face_px": [round(h, 1) for h in pp.view_face_px]} for pp in plan.photos]
    rows += [{"kind": "photo", "id": n, "role": EXCLUDED, "facesim": None, "reason": "embed-faces outlier (likely another person)"}
             for n in plan.outliers]

    # 2. The reference image: the best aligned crop (the second best for the best photo itself);
    #    the photos (or views) held out for validation
    best = next(r for r in used if r.name == plan.reference_name)
    for row in rows:
        if row["kind"] == "photo" and row["id"] in holdout.photos:
            row.update(role=HELD_OUT, validates=IDENTITY)
        elif row["kind"] == "photo" and row["role"] == IDENTITY and holdout.view is not None:
            row["held_out_view"] = holdout.view
    others = [r for r in used if r is not best and r.name not in holdout.photos]  # a held-out photo is no reference
    second = choose_reference(others) if others else best
    images = {r.name: read_rgb(r.crop_path) for r in {best.name: best, second.name: second}.values()}
    shas = {n: _sha256_array(im) for n, im in images.items()}
    reference = {"name": best.name, "image": images[best.name], "in_training": tcfg.reference_image}

    def reference_for(name: str):
        pick = second.name if name == best.name else best.name
        return images[pick], shas[pick]

    # 3. Clips as routed: identity when they show the identity, else motion prior (held-out clips: what they validate)
    clips, held_out_clips = list(plan.clips), list(plan.held_out_clips)
    held_ids = {c.clip_id for c in held_out_clips}
    all_clips = [c for c in clips + held_out_clips if clip_ids is None or c.clip_id in clip_ids]
    route_list = plan.routes
    routes = {r.clip_id: r for r in route_list}
    for c in all_clips:
        route = routes[c.clip_id]
        px = plan.clip_face_px.get(c.clip_id, ())
        row = {"kind": "clip", "id": c.clip_id, "role": route.role, "facesim": route.facesim, "faces": route.num_faces,
               "reason": route.reason, "face_px_median": round(float(np.median(px)), 1) if len(px) else None}
        if c.clip_id in held_ids:
            row.update(role=HELD_OUT, validates=route.role)
        rows.append(row)

    # 4. Latent cache (small-face views are framed like the clips: their H x W)
    budget = min(c.height * c.width for c in clips)
    size = min(((c.height, c.width) for c in clips), key=lambda hw: hw[0] * hw[1])
    photo_src = _photo_sources(plan, params, budget, size, reference_for if tcfg.reference_image else None, vae_scale)
    clip_src = _clip_sources(all_clips, routes, shas[best.name], images[best.name] if tcfg.reference_image else None)
    cached = cached_examples(pipe, photo_src + clip_src, cache_dir, base_model, show_progress=show_progress)

    # 5. Conditioning per example: embedding, face tokens on/off, loss weight map, reference frames;
    #    then into a training pool or, held out, into the validation set
    by_clip = {c.clip_id: c for c in all_clips}
    texts: dict[str, torch.Tensor] = {}
    out = TrainingSet([], [], rows, reference, route_list, cache_hits=sum(e["cached"] for e in cached),
                      cache_misses=sum(not e["cached"] for e in cached), holdout_note=holdout.note)
    mean_t = torch.from_numpy(np.asarray(mean_embedding, np.float32))
    for ex in cached:
        kind, name = ex["example_id"].split(":")[:2]
        role = IDENTITY if kind == "photo" else routes[name].role
        f = ex["target"].shape[1]
        valid = None
        if kind == "photo":
            mask = ex.pop("face_mask")
            valid = ex.pop("valid_mask")
            ex.pop("pose_from_landmarks", None)
            embedding = torch.from_numpy(np.asarray(photo_embs[name], np.float32))
        else:
            mask = torch.from_numpy(_clip_face_mask(by_clip[name], vae_scale)) if role == IDENTITY else None
            embedding = mean_t
        weight = torch.ones(ex["target"].shape[1:])
        if role == IDENTITY and mask is not None and tcfg.face_loss_weight != 1.0:
            weight = 1.0 + (tcfg.face_loss_weight - 1.0) * mask.reshape(weight.shape)
        if valid is not None:  # a small-face view's fill is no one's pixels: out of the loss
            weight = weight * valid.reshape(weight.shape)
        text_id = hashlib.sha1(ex["text"].numpy().tobytes()).hexdigest()
        ex["text"] = texts.setdefault(text_id, ex["text"])  # one tensor per distinct caption
        ex.update(embedding=embedding, face=torch.tensor(role == IDENTITY), weight=weight, role=role,
                  ref_frames=int(ex["control"].shape[1] - f))
        if kind == "photo":
            held = name in holdout.photos or int(ex["example_id"].rsplit(":v", 1)[1]) == holdout.view
        else:
            held = name in held_ids
        if held:
            out.validation[role].append(ex)
        else:
            (out.identity if role == IDENTITY else out.prior).append(ex)
    return out


def summary_text(ts: TrainingSet) -> str:
    """What train-lora trains on, for the log: photos, clips by role, the cache, then each clip's route."""
    from faceid.train.routing import summarize_routes

    photos = [r["id"] for r in ts.rows if r["kind"] == "photo" and r["role"] == IDENTITY]
    excluded = [r["id"] for r in ts.rows if r["role"] == EXCLUDED]
    photo_examples = sum(e["example_id"].startswith("photo:") for e in ts.identity)
    text = (f"train-lora data: {len(photos)} photo(s) -> {photo_examples} identity examples; "
            f"{len(ts.identity) - photo_examples} identity clip(s), {len(ts.prior)} prior clip(s); "
            f"latent cache: {ts.cache_hits} read, {ts.cache_misses} encoded")
    if excluded:
        text += f"; photos left out (embed-faces outliers): {', '.join(excluded)}"
    if ts.holdout_note:
        text += (f"\nvalidation: {ts.holdout_note}; held-out examples: {len(ts.validation[IDENTITY])} identity, "
                 f"{len(ts.validation[PRIOR])} prior")
    return text + "\n" + summarize_routes(ts.routes)
