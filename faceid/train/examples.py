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

Every example is cached in the latent cache (``faceid.train.cache``); ``rows`` lists each photo
and clip with its role (``identity`` | ``prior`` | ``excluded`` | ``held_out``) and score for the
identity card and MLflow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from faceid.errors import InputError
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


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"{path}: unreadable image ({exc}); rerun crop-faces") from None


def _sha256_array(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes() + str(image.shape).encode()).hexdigest()


class _LazyEstimator:
    """The pose estimator, built on the first cache miss only (cached runs never load it)."""

    def __init__(self, cfg):
        self.cfg, self.estimator = cfg, None

    def __call__(self):
        if self.estimator is None:
            from faceid.pose.estimate import build_estimator

            self.estimator = build_estimator(self.cfg)
        return self.estimator

    def close(self) -> None:
        if self.estimator is not None:
            self.estimator.close()


def _estimator_id(cfg) -> str:
    return cfg.estimator if cfg.estimator != "onnx" else f"onnx:{cfg.onnx_path}"


def _photo_sources(records, params, budget: int, reference, estimator: _LazyEstimator, vae_scale: int) -> list:
    """Cache sources of every view of every photo (``reference(name) -> (image, sha)`` or None)."""
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE
    from faceid.train.cache import Source
    from faceid.train.data import latent_face_mask
    from faceid.train.photos import VERSION, estimate_photo_pose, make_example, views_for

    pcfg = params.train_lora.photos
    sources = []
    for rec in records:
        caption = rec.caption or pcfg.default_caption
        ref_image, ref_sha = reference(rec.name) if reference else (None, None)
        for view in views_for(rec.sha256, pcfg):
            payload = {"kind": "photo", "version": VERSION, "sha256": rec.sha256, "box": [round(float(v), 3) for v in rec.box],
                       "view": view.key(), "budget": budget, "caption": caption, "estimator": _estimator_id(params.prepare_pose),
                       "reference": ref_sha}

            def load(rec=rec, view=view, caption=caption, ref_image=ref_image):
                photo = _read_rgb(rec.photo_path)
                kps, source = estimate_photo_pose(estimator(), photo, rec.landmarks)
                ex = make_example(photo, rec.box, kps, budget, view, DRAW_MIN_CONFIDENCE)
                h, w = ex.target.shape[1:3]
                extra = {"face_mask": latent_face_mask([ex.face_box], h, w, vae_scale),
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


def build_training_set(pipe, params, crops_dir: Path, embeddings_dir: Path, clips: list, mean_embedding: np.ndarray,
                       cache_dir: Path, base_model: str, show_progress: bool = True,
                       held_out_clips: list = ()) -> TrainingSet:
    """Identity and prior examples (cached latents + conditioning) of one identity, and the held-out
    validation examples when ``train_lora.validation`` is on (``held_out_clips``: the clips kept out
    of training); see the module doc."""
    import torch

    from faceid.faces.crop import choose_reference, read_photos
    from faceid.faces.embed import l2_normalize
    from faceid.train.cache import cached_examples
    from faceid.train.data import load_photo_embeddings
    from faceid.train.routing import route_clips
    from faceid.train.validation import enabled, plan_holdout

    tcfg = params.train_lora
    vae_scale = int(pipe.vae_scale_factor_spatial)

    # 1. Photos that crop-faces accepted and embed-faces kept, each with its own embedding
    records = read_photos(crops_dir, embeddings_dir)  # the face embed-faces chose in photos with several
    photo_embs, outliers = load_photo_embeddings(embeddings_dir)
    used = [r for r in records if r.name in photo_embs]
    if not used:
        raise InputError(f"{crops_dir} / {embeddings_dir}: no accepted photo has an embedding (names "
                         f"{[r.name for r in records]} vs {sorted(photo_embs)}); rerun embed-faces on these crops")
    unit_mean = l2_normalize(np.asarray(mean_embedding, np.float32))
    rows = [{"kind": "photo", "id": r.name, "role": IDENTITY, "facesim": float(l2_normalize(photo_embs[r.name]) @ unit_mean),
             "caption": r.caption or tcfg.photos.default_caption} for r in used]
    rows += [{"kind": "photo", "id": n, "role": EXCLUDED, "facesim": None, "reason": "embed-faces outlier (likely another person)"}
             for n in outliers]

    # 2. The reference image: the best aligned crop (the second best for the best photo itself);
    #    the photos (or views) held out for validation
    best = choose_reference(used)
    holdout = plan_holdout([r.name for r in used], best.name, tcfg.validation, tcfg.photos.views)
    for row in rows:
        if row["kind"] == "photo" and row["id"] in holdout.photos:
            row.update(role=HELD_OUT, validates=IDENTITY)
        elif row["kind"] == "photo" and row["role"] == IDENTITY and holdout.view is not None:
            row["held_out_view"] = holdout.view
    others = [r for r in used if r is not best and r.name not in holdout.photos]  # a held-out photo is no reference
    second = choose_reference(others) if others else best
    images = {r.name: _read_rgb(r.crop_path) for r in {best.name: best, second.name: second}.values()}
    shas = {n: _sha256_array(im) for n, im in images.items()}
    reference = {"name": best.name, "image": images[best.name], "in_training": tcfg.reference_image}

    def reference_for(name: str):
        pick = second.name if name == best.name else best.name
        return images[pick], shas[pick]

    # 3. Clips: identity when they show the identity, else motion prior (held-out clips: what they validate)
    held_out_clips = list(held_out_clips) if enabled(tcfg.validation) else []
    held_ids = {c.clip_id for c in held_out_clips}
    all_clips = list(clips) + held_out_clips
    route_list = route_clips(all_clips, mean_embedding, params.crop_faces, params.embed_faces, tcfg.clip_identity_threshold)
    routes = {r.clip_id: r for r in route_list}
    for c in all_clips:
        route = routes[c.clip_id]
        row = {"kind": "clip", "id": c.clip_id, "role": route.role, "facesim": route.facesim, "faces": route.num_faces,
               "reason": route.reason}
        if c.clip_id in held_ids:
            row.update(role=HELD_OUT, validates=route.role)
        rows.append(row)

    # 4. Latent cache (photo poses are estimated only on cache misses)
    budget = min(c.height * c.width for c in clips)
    estimator = _LazyEstimator(params.prepare_pose)
    try:
        photo_src = _photo_sources(used, params, budget, reference_for if tcfg.reference_image else None, estimator, vae_scale)
        clip_src = _clip_sources(all_clips, routes, shas[best.name], images[best.name] if tcfg.reference_image else None)
        cached = cached_examples(pipe, photo_src + clip_src, cache_dir, base_model, show_progress=show_progress)
    finally:
        estimator.close()

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
        if kind == "photo":
            mask = ex.pop("face_mask")
            ex.pop("pose_from_landmarks", None)
            embedding = torch.from_numpy(np.asarray(photo_embs[name], np.float32))
        else:
            mask = torch.from_numpy(_clip_face_mask(by_clip[name], vae_scale)) if role == IDENTITY else None
            embedding = mean_t
        weight = torch.ones(ex["target"].shape[1:])
        if role == IDENTITY and mask is not None and tcfg.face_loss_weight != 1.0:
            weight = 1.0 + (tcfg.face_loss_weight - 1.0) * mask.reshape(weight.shape)
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
