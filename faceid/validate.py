"""``faceid render-validation`` (DVC stage / KFP component ``render_validation``).

For held-out pose clips (``ok`` clips of the prepare-pose manifest that the identity or shared adapter
was not trained on; the last clips when every clip was used, noted in ``metrics.json``) render the
arms with the same seed and prompt:

- ``base``: the base model, no identity (``generate_video(pipe, None, ...)``);
- ``reference_only``: the training-free baseline, base VACE with the identity's ``reference.png``
  as its reference image (R2V), no adapter; skipped (with the reason in ``metrics.json``) when there
  is no reference image (an identity folder without reference.png; a person given only by their
  embed-faces output, which holds no image);
- ``zero_shot`` (with ``adapter``, a ``train-shared`` adapter): the person rendered from their own
  embed-faces output through the shared adapter, with no training of theirs (:func:`faceid.render.load_person`);
- ``identity`` (with ``identity_dir``, a ``train-lora`` folder): the trained identity.

``zero_shot`` and ``identity`` render at ``render_validation.face_scale`` (``lora_scale`` 1; the
reference image too when the adapter was trained with it).

Who is validated: the person of ``reference`` (one embed-faces output); with ``adapter`` and a
``reference`` that is an embed-faces output of a folder of people, every person the adapter held out
(its card's ``people.held_out``), each on the same clips (the base rendered once per clip).

Per video, per arm, per person and on average (``faceid.faces.similarity``, ``faceid.pose.metrics``):

- FaceSim to the person's reference embedding and the face detection rate,
- temporal identity stability: the spread (std) of per-frame FaceSim and its mean frame-to-frame change,
- pose fidelity: keypoints re-extracted from the generated video vs the clip's control keypoints
  (PCK@0.1 and mean error normalised by the person's size),
- with ``adapter``, identity retrieval (:func:`faceid.faces.similarity.retrieval`): the render's mean face embedding against
  every person's (the adapter's people, :func:`faceid.model.identity.read_people`, and the validated
  ones): the rank of its own person (1 = closest), ``retrieval_correct`` (1/0; averaged: the share of
  renders retrieved right) and the margin (cosine to its own person minus the closest other's).

The gate (``render_validation.gate``) judges one arm, on the averages: ``identity`` when an identity
folder is given, else ``zero_shot`` (zero-shot-only validation gates the shared adapter itself):

- ``facesim``: FaceSim >= ``min_facesim`` (0 = the embedder's same-person threshold,
  ``faceid.faces.embed.outlier_threshold``): the render shows *the* person, not just someone closer;
- ``face_detection_rate``: the arm's share of frames with a detected face >= ``min_face_detection_rate``;
- ``facesim_gain``: FaceSim(arm) - FaceSim(base) >= ``min_facesim_gain``;
- ``vs_reference_only``: FaceSim(arm) >= FaceSim(reference_only) - ``tolerance`` (not
  applicable, not failed, when the reference_only arm is skipped);
- ``pose_pck``: PCK(arm) >= ``min_pose_pck``;
- ``retrieval``: the share of the arm's renders retrieved as their own person >= ``min_retrieval``
  (not applicable without ``adapter``: one person, nothing to tell them from).

A value that cannot be measured fails its check, with the reason. When the gate passes and the gated
folder (the identity, else the shared adapter) is registered in MLflow, its version gets the alias
``tracking.validated_alias``.

Output ``<out>/``: ``metrics.json`` (DVC metrics), ``videos/<video>.mp4`` (identity),
``<video>_<arm>.mp4`` (the other arms), ``sheets/<video>.png`` (rows: pose and the arms; the renders'
pixels), ``side_by_side/<video>.mp4`` (pose | base | reference-only | zero-shot | identity, the arms
rendered, each panel labelled, scaled to a watchable size: :mod:`faceid.preview`) and its contact sheet
``side_by_side/<video>.png``; ``<video>`` is the clip id, or ``<person>/<clip>`` with ``adapter``. Every
input is checked before a model is built; ``<out>`` is locked for the run (:func:`faceid.io.output_lock`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from faceid.errors import InputError

PCK_THRESHOLD = 0.1
SHEET_FRAMES = 8
ARMS = ("base", "reference_only", "zero_shot", "identity")  # the order of the panels and sheet rows (after the pose)
VALIDATION_LORA_SCALE = 1.0  # the adapter arms: the LoRA at the weight it was trained with (x face_scale)
NOT_AVERAGED = ("per_frame_facesim", "retrieved")  # per-video values that are no number to average


# --------------------------------------------------------------------------- pure metrics


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _mean(values) -> float | None:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else None


def identity_jitter(per_frame: list[float | None]) -> float | None:
    """Mean absolute change of FaceSim between consecutive frames that both show a face."""
    diffs = [abs(b - a) for a, b in zip(per_frame, per_frame[1:]) if a is not None and b is not None]
    return float(np.mean(diffs)) if diffs else None


def video_metrics(face: dict, pose: dict) -> dict:
    """One video's numbers from ``face_similarity`` and ``pose_fidelity`` (None = not measurable)."""
    return {
        "facesim": face["mean"],
        "facesim_min": face["min"],
        "facesim_std": face["std"],
        "facesim_jitter": identity_jitter(face["per_frame"]),
        "face_detection_rate": face["detection_rate"],
        "pose_pck": _mean([pose["pck"]]),
        "pose_error": _mean([pose["mean_error"]]),
        "pose_detection_rate": _mean([pose["detection_rate"]]),
    }


def aggregate(rows: list[dict]) -> dict:
    """Mean over videos of every metric, ignoring videos where it is not measurable (None)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = {k: _mean(r.get(k) for r in rows) for k in keys}
    out["num_videos"] = len(rows)
    return out


def _check(value: float | None, threshold: float, unmeasurable: str, failed: str) -> dict:
    """``value >= threshold``: passed / failed (``failed`` formatted with the value) / failed as unmeasurable."""
    if value is None:
        return {"status": "failed", "value": None, "threshold": threshold, "reason": unmeasurable}
    ok = value >= threshold
    return {"status": "passed" if ok else "failed", "value": value, "threshold": threshold,
            "reason": None if ok else failed.format(value=value)}


def gate_facesim(gate, same_person_threshold: float) -> float:
    """The absolute FaceSim the gate asks for: ``gate.min_facesim``, or with 0 the embedder's
    same-person threshold (:func:`faceid.faces.embed.outlier_threshold`)."""
    return gate.min_facesim if gate.min_facesim > 0 else same_person_threshold


def evaluate_gate(arms: dict[str, dict | None], gate, same_person_threshold: float, candidate: str = "identity",
                  retrieval: bool = False) -> dict:
    """``arms``: the averaged metrics of ``base``, ``reference_only`` (None when skipped) and the gated
    arm ``candidate`` (``identity`` or ``zero_shot``); ``gate`` = ``render_validation.gate``;
    ``same_person_threshold``: the embedder's (what ``min_facesim: 0`` stands for); ``retrieval``: whether
    the arm's retrieval among several people was measured (else that check is ``not_applicable``). A value
    that is not measurable fails its check; the check of a skipped arm is ``not_applicable``. Passes when
    no check failed."""
    ident, base, ref = arms[candidate], arms["base"], arms.get("reference_only")
    min_facesim = gate_facesim(gate, same_person_threshold)

    def diff(other: dict) -> float | None:
        a, b = ident.get("facesim"), other.get("facesim")
        return None if a is None or b is None else a - b

    checks = {"facesim": _check(
        ident.get("facesim"), min_facesim,
        f"FaceSim not measurable (no face detected in the {candidate} videos)",
        f"FaceSim {{value:.4f}} < min_facesim {min_facesim:g} (the same-person threshold)")}
    checks["face_detection_rate"] = _check(
        ident.get("face_detection_rate"), gate.min_face_detection_rate,
        f"face detection rate not measurable (no {candidate} video)",
        f"face detection rate {{value:.4f}} < min_face_detection_rate {gate.min_face_detection_rate:g}")
    checks["facesim_gain"] = _check(
        diff(base), gate.min_facesim_gain,
        f"FaceSim not measurable (no face detected in the {candidate} or base videos)",
        f"FaceSim gain over base {{value:.4f}} < min_facesim_gain {gate.min_facesim_gain:g}")
    if ref is None:
        checks["vs_reference_only"] = {"status": "not_applicable", "value": None, "threshold": -gate.tolerance,
                                       "reason": "reference_only arm skipped (no reference image)"}
    else:
        checks["vs_reference_only"] = _check(
            diff(ref), -gate.tolerance,
            f"FaceSim not measurable (no face detected in the {candidate} or reference-only videos)",
            f"FaceSim over reference-only {{value:.4f}} < -tolerance (-{gate.tolerance:g})")
    checks["pose_pck"] = _check(ident.get("pose_pck"), gate.min_pose_pck,
                                "pose PCK not measurable (no reference pose in the clips)",
                                f"pose PCK {{value:.4f}} < min_pose_pck {gate.min_pose_pck:g}")
    if retrieval:
        checks["retrieval"] = _check(
            ident.get("retrieval_correct"), gate.min_retrieval,
            f"retrieval not measurable (no face detected in the {candidate} videos)",
            f"retrieval {{value:.4f}} < min_retrieval {gate.min_retrieval:g} (share of renders closest to their own person)")
    else:
        checks["retrieval"] = {"status": "not_applicable", "value": None, "threshold": gate.min_retrieval,
                               "reason": "one person (no shared adapter's people to tell them from)"}
    reasons = [c["reason"] for c in checks.values() if c["status"] == "failed"]
    return {"passed": not reasons, "arm": candidate, "facesim_gain": checks["facesim_gain"]["value"],
            "facesim_vs_reference_only": checks["vs_reference_only"]["value"],
            "retrieval": checks["retrieval"]["value"],
            "min_facesim": min_facesim, "min_face_detection_rate": gate.min_face_detection_rate,
            "min_facesim_gain": gate.min_facesim_gain, "tolerance": gate.tolerance, "min_pose_pck": gate.min_pose_pck,
            "min_retrieval": gate.min_retrieval, "checks": checks, "reasons": reasons}


def select_clips(rows: list[dict], trained: set[str], num_clips: int) -> tuple[list[dict], bool]:
    """``(clips, held_out)``: the first ``num_clips`` clips not used in training; if every clip was
    used, the last ``num_clips`` clips and ``held_out=False``."""
    if num_clips < 1:
        raise InputError(f"render_validation.num_clips: expected >= 1, got {num_clips}")
    rows = sorted(rows, key=lambda r: r["clip_id"])
    unseen = [r for r in rows if r["clip_id"] not in trained]
    if unseen:
        return unseen[:num_clips], True
    return rows[-num_clips:], False


# --------------------------------------------------------------------------- I/O shell


def _clip_rows(clips_dir: Path) -> list[dict]:
    """The ``ok`` clips as training reads them (``load_clips``: columns and files checked), plus
    the control keypoints file of each (a manifest column training does not use)."""
    from faceid.io import read_parquet
    from faceid.train.data import load_clips

    clips = load_clips(clips_dir)
    keypoints = {str(r["clip_id"]): r["keypoints_path"] for r in read_parquet(clips_dir / "manifest.parquet") if r["status"] == "ok"}
    rows = []
    for clip in clips:
        path = clips_dir / keypoints[clip.clip_id]
        if not path.is_file():
            raise InputError(f"{path}: clip {clip.clip_id} listed in the manifest but the file is missing")
        rows.append({"clip_id": clip.clip_id, "pose_path": clip.pose_path, "keypoints_path": path, "caption": clip.caption})
    return rows


def _video_name(key: str, arm: str) -> str:
    return f"{key}.mp4" if arm == "identity" else f"{key}_{arm}.mp4"


def _render_clip(generator, people: dict[str, dict], scorer, estimator, clip: dict, settings, out: Path,
                 candidates: dict[str, np.ndarray] | None, per_person: bool) -> dict[str, dict]:
    """Render one clip: the base once, then every person's arms (``people``: name -> ``{"embedding": [D],
    "arms": {arm: (conditioning, reference image)}}``); measure each render against the person (FaceSim,
    pose, and with ``candidates``, retrieval among them); write the videos, the contact sheet, and the
    side-by-side preview with its contact sheet beside it (scaled and labelled for watching:
    :mod:`faceid.preview`; the metrics use the renders as they are). Returns ``{video key: {arm: metrics}}``;
    the key is the clip id, or ``<person>/<clip>`` when ``per_person``."""
    from faceid.faces.similarity import retrieval
    from faceid.pose.metrics import pose_fidelity
    from faceid.pose.video import read_video, write_video
    from faceid.preview import write_preview
    from faceid.render import frames_sheet

    pose_frames, fps = read_video(clip["pose_path"])
    ref_kps = np.load(clip["keypoints_path"])["keypoints"]
    prompt = clip.get("caption") or generator.params.prepare_pose.default_caption

    def render(conditioning, reference_image) -> dict:
        frames = generator.generate(conditioning, pose_frames, prompt, settings, reference_image=reference_image)
        return {"frames": frames, "faces": scorer.faces(frames),
                "pose": pose_fidelity(estimator.estimate(frames), ref_kps, threshold=PCK_THRESHOLD)}

    base = render(None, None)  # the same video for every person: rendered and measured once
    out_metrics = {}
    for person, spec in people.items():
        key = f"{person}/{clip['clip_id']}" if per_person else clip["clip_id"]
        renders = {"base": base, **{arm: render(*given) for arm, given in spec["arms"].items()}}
        metrics = {}
        for arm in (a for a in ARMS if a in renders):
            r = renders[arm]
            write_video(out / "videos" / _video_name(key, arm), r["frames"], fps)
            face = scorer.score(r["frames"], reference=spec["embedding"], faces=r["faces"])
            metrics[arm] = {**video_metrics(face, r["pose"]), "per_frame_facesim": face["per_frame"]}
            if candidates:
                metrics[arm].update(retrieval(r["faces"][0], person, candidates))
        panels = {"pose": pose_frames, **{arm: renders[arm]["frames"] for arm in ARMS if arm in renders}}
        _write_png(out / "sheets" / f"{key}.png", frames_sheet(list(panels.values()), SHEET_FRAMES))
        write_preview(out / "side_by_side" / f"{key}.mp4", out / "side_by_side" / f"{key}.png", panels, fps)
        out_metrics[key] = metrics
    return out_metrics


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _people(reference: Path, adapter) -> dict[str, Path]:
    """``{person: embed-faces folder}``: the one person of ``reference`` (an embed-faces output), or with a
    shared ``adapter`` and ``reference`` an embed-faces output of a folder of people, every person the
    adapter held out (its card's ``people.held_out``)."""
    reference = Path(reference)
    if adapter is None or (reference / "embeddings.safetensors").is_file() or not reference.is_dir():
        return {reference.name: reference}  # one person (checked when their embedding is read)
    held = list((adapter.card.get("people") or {}).get("held_out") or [])
    if not held:
        raise InputError(f"--adapter {adapter.path}: the shared adapter held no person out (train_shared.holdout_identities "
                         f"0), so {reference} (a folder of people) has no one to validate zero-shot; pass --reference "
                         "<one person's embed-faces folder> (a person the adapter never trained on)")
    missing = [p for p in held if not (reference / p / "embeddings.safetensors").is_file()]
    if missing:
        raise InputError(f"{reference}: no embed-faces output for {', '.join(missing)} (held out by the shared adapter "
                         f"{adapter.path}; expected {reference}/<person>/embeddings.safetensors)")
    return {p: reference / p for p in held}


def run(params, identity_dir: Path | None, clips_dir: Path, reference: Path, output_dir: Path, mlflow_uri: str | None = None,
        lock_wait: float = 0.0, origin: dict | None = None, adapter: str | Path | None = None) -> dict:
    """Render the arms, measure and gate; write ``output_dir`` atomically; log to MLflow when ``mlflow_uri``.
    ``identity_dir``: a train-lora folder (the ``identity`` arm); ``adapter``: a shared adapter (folder or
    ``models:/``; the ``zero_shot`` arm); at least one of them. ``reference``: the person's embed-faces
    output, or with ``adapter`` a folder of them (the adapter's held-out people are validated).
    Every input is checked before a model is built. ``lock_wait``: seconds to wait for another run
    writing ``output_dir`` (:func:`faceid.io.output_lock`). ``origin``: what the door knows of where
    it runs (:data:`faceid.tracking.ORIGIN_TAGS`), as run tags."""
    from faceid.faces.embed import load_identity_embedding, outlier_threshold
    from faceid.faces.similarity import FaceSimScorer
    from faceid.io import atomic_dir, output_lock, write_json
    from faceid.model.identity import REFERENCE_FILE, load_identity, read_people
    from faceid.outputs import check_folder, mark
    from faceid.pose.estimate import build_estimator
    from faceid.render import Generator, Settings, load_adapter, load_person

    cfg = params.render_validation
    if identity_dir is None and adapter is None:
        raise InputError("render-validation: expected --identity (a train-lora folder) and/or --adapter (a train-shared adapter)")
    output_dir = check_folder("render_validation", output_dir,  # faceid.outputs
                              [x for x in (identity_dir, adapter, clips_dir, reference) if x is not None])

    # 1. Check inputs: the shared adapter, the people and their embeddings, the identity card (base model,
    #    embedder, dim), clips, settings (render_validation values are checked at config load)
    shared = load_adapter(adapter, params, mlflow_uri) if adapter is not None else None
    people = _people(Path(reference), shared)
    embeddings = {}
    for person, folder in people.items():
        emb, meta = load_identity_embedding(folder)
        if meta["embedder"] != params.embed_faces.embedder:
            raise InputError(f"{meta['path']}: reference embedded with {meta['embedder']!r}, but embed_faces.embedder is "
                             f"{params.embed_faces.embedder!r}; FaceSim needs the same embedder")
        embeddings[person] = (emb, meta)
    ref_meta = next(iter(embeddings.values()))[1]
    identity = None
    if identity_dir is not None:
        if list(people.values()) != [Path(reference)]:
            raise InputError(f"--identity {identity_dir} is one person's adapter, but {reference} is a folder of people; "
                             "pass --reference <that person's embed-faces folder>")
        identity = load_identity(identity_dir, model_cfg=params.model, embedder=ref_meta["embedder"],
                                 embed_dim=int(ref_meta["dim"]))
    trained = set((identity.card.get("data") or {}).get("clips") or {}) if identity else set()
    if shared is not None:
        trained |= set((shared.card.get("data") or {}).get("clips") or {})
    clips, held_out = select_clips(_clip_rows(Path(clips_dir)), trained, cfg.num_clips)
    settings = Settings(face_scale=cfg.face_scale, lora_scale=VALIDATION_LORA_SCALE, guidance_scale=cfg.guidance_scale,
                        num_inference_steps=cfg.num_inference_steps, seed=cfg.seed, prompt="")

    # 2. The arms of each person: arm -> (conditioning, VACE reference image); reference_only needs a reference image
    reference_image = identity.reference if identity is not None else None
    skipped = {}
    if reference_image is None:
        skipped["reference_only"] = (f"{Path(identity_dir) / REFERENCE_FILE} not found (identity folder written before it "
                                     "existed)" if identity is not None else
                                     "no reference image: a person given by their embed-faces output has none "
                                     "(--identity brings its reference.png)")
    if shared is None:
        skipped["zero_shot"] = "no shared adapter (--adapter)"
    if identity is None:
        skipped["identity"] = "no identity folder (--identity): zero-shot validation of the shared adapter"
    specs = {}
    for person, folder in people.items():
        arms = {}
        if "reference_only" not in skipped:
            arms["reference_only"] = (None, reference_image)
        if shared is not None:
            if shared.reference_in_training and reference_image is None:
                raise InputError(f"--adapter {adapter}: trained with each person's reference image, which {folder} (an "
                                 "embed-faces output) does not hold; pass --identity <their train-lora folder with "
                                 "reference.png>")
            zero = load_person(folder, shared, reference_image if shared.reference_in_training else None)
            arms["zero_shot"] = (zero, zero.reference)
        if identity is not None:
            arms["identity"] = (identity, None)
        specs[person] = {"embedding": embeddings[person][0], "arms": arms}
    candidates = None
    if shared is not None:  # retrieval: among the adapter's people and the validated ones (their own embeddings)
        candidates = {**read_people(shared), **{p: e for p, (e, _) in embeddings.items()}}
        if len(candidates) < 2:
            candidates = None
    gated = "identity" if identity is not None else "zero_shot"
    held_people = set((shared.card.get("people") or {}).get("held_out") or []) if shared is not None else set()

    output_dir = Path(output_dir)
    with output_lock("render-validation", output_dir, lock_wait):
        # 3. Model, FaceSim scorer, pose estimator (each built once)
        generator = Generator(params)

        # 4. Render and measure every clip, into a temporary folder that replaces output_dir at the end
        first = next(iter(specs.values()))["embedding"]
        with (atomic_dir(output_dir) as tmp, FaceSimScorer(first, params.crop_faces, params.embed_faces) as scorer,
              build_estimator(params.prepare_pose) as estimator):
            mark(tmp, "render_validation")
            per_video = {}
            for clip in clips:
                per_video.update(_render_clip(generator, specs, scorer, estimator, clip, settings, tmp, candidates,
                                              per_person=shared is not None))
                print(f"render-validation: {clip['clip_id']} rendered ({', '.join(a for a in ARMS if a not in skipped)}"
                      + (f"; {len(specs)} people" if len(specs) > 1 else "") + ")")

            # 5. Averages per arm (and per person), the gate, metrics.json
            def averages(rows: list[dict]) -> dict:
                return {arm: {"skipped": True, "reason": skipped[arm]} if arm in skipped else
                        aggregate([{k: x for k, x in m[arm].items() if k not in NOT_AVERAGED} for m in rows])
                        for arm in ARMS}

            summary = averages(list(per_video.values()))
            gate = evaluate_gate({arm: None if arm in skipped else summary[arm] for arm in ARMS}, cfg.gate,
                                 outlier_threshold(params.embed_faces), candidate=gated, retrieval=candidates is not None)
            result = {
                "identity_name": identity.name if identity is not None else shared.name,
                "metric": scorer.metric,
                "held_out": held_out,
                "clips": [c["clip_id"] for c in clips],
                **summary,
                "gate": gate,
                "videos": per_video,
            }
            if shared is not None:
                result["adapter"] = {"name": shared.name, "path": str(shared.path),
                                     "people_trained": list((shared.card.get("people") or {}).get("trained") or []),
                                     "people_held_out": sorted(held_people)}
                result["retrieval_people"] = sorted(candidates or [])
                result["people"] = {
                    p: {"held_out": p in held_people,
                        **averages([m for key, m in per_video.items() if key.split("/", 1)[0] == p])} for p in specs}
            write_json(tmp / "metrics.json", result)

        # 6. MLflow: metrics, videos, sheets; alias when the gate passes (on the gated folder)
        if mlflow_uri:
            result["mlflow"] = log_to_mlflow(params, identity if identity is not None else shared, output_dir, result,
                                             mlflow_uri, origin)
    verdict = "PASSED" if gate["passed"] else "FAILED (" + "; ".join(gate["reasons"]) + ")"
    scores = ", ".join(f"{arm} " + _fmt(summary[arm]["facesim"]) for arm in ARMS if arm not in skipped)
    if candidates is not None:
        scores += "; retrieval " + ", ".join(f"{arm} " + _fmt(summary[arm].get("retrieval_correct"))
                                             for arm in ARMS if arm not in skipped)
    who = result["identity_name"] + (f" ({', '.join(specs)} zero-shot)" if shared is not None else "")
    not_zero_shot = [p for p in specs if shared is not None and p not in held_people]
    print(f"render-validation {who}: {len(clips)} clip(s){'' if held_out else ' (not held out: every clip was trained on)'}, "
          f"{result['metric']}: {scores}; gate on {gated} {verdict} -> {output_dir / 'metrics.json'}"
          + (f"\n  note: the shared adapter trained on {', '.join(not_zero_shot)}: not a zero-shot test" if not_zero_shot else ""))
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def flat_metrics(result: dict) -> dict[str, float]:
    """Every number of ``metrics.json`` under one flat name: ``identity.facesim``, ``base.pose_pck``,
    ``zero_shot.retrieval_correct``, ``reference_only.skipped`` (1 when skipped), ``gate.facesim_gain``,
    ``gate.vs_reference_only.passed``, ``gate.passed`` (0/1), ``clip.<video>.<arm>.<metric>`` and, with a
    shared adapter, ``person.<person>.<arm>.<metric>``; values that are not measurable are left out."""
    import re

    def numbers(prefix: str, values: dict) -> dict[str, float]:
        return {f"{prefix}.{k}": float(v) for k, v in values.items()
                if k not in NOT_AVERAGED and not isinstance(v, bool) and v is not None}

    out = {}
    for arm in ARMS:
        if result[arm].get("skipped"):
            out[f"{arm}.skipped"] = 1.0
            continue
        out.update(numbers(arm, result[arm]))
    gate = result["gate"]
    for key in ("facesim_gain", "facesim_vs_reference_only", "retrieval", "min_facesim", "min_face_detection_rate",
                "min_facesim_gain", "tolerance", "min_pose_pck", "min_retrieval"):
        if gate[key] is not None:
            out[f"gate.{key}"] = float(gate[key])
    for name, check in gate["checks"].items():
        if check["status"] != "not_applicable":
            out[f"gate.{name}.passed"] = float(check["status"] == "passed")
    out["gate.passed"] = float(gate["passed"])
    for clip, arms in result["videos"].items():
        safe = re.sub(r"[^\w\-. /]", "_", clip)
        for arm, values in arms.items():
            out.update(numbers(f"clip.{safe}.{arm}", values))
    for person, arms in (result.get("people") or {}).items():
        safe = re.sub(r"[^\w\-. /]", "_", person)
        for arm in ARMS:
            if not arms[arm].get("skipped"):
                out.update(numbers(f"person.{safe}.{arm}", arms[arm]))
    return out


def not_measured(result: dict) -> dict[str, str]:
    """Tags ``not_measured.<arm>.<metric>`` -> why, for each averaged number that could not be measured
    (left out of the metrics, never logged as 0; the terminal prints it as n/a)."""
    why = {"facesim": "no face detected in any frame", "facesim_min": "no face detected in any frame",
           "facesim_std": "no face detected in any frame",
           "facesim_jitter": "no two consecutive frames with a face",
           "pose_pck": "no reference pose to compare", "pose_error": "no joint found in both poses",
           "pose_detection_rate": "no reference pose to compare", "retrieval_rank": "no face detected in any frame",
           "retrieval_correct": "no face detected in any frame", "retrieval_margin": "no face detected in any frame"}
    return {f"not_measured.{arm}.{k}": why.get(k, "not measurable")
            for arm in ARMS if not result[arm].get("skipped") for k, v in result[arm].items() if v is None}


def log_to_mlflow(params, identity, output_dir: Path, result: dict, mlflow_uri: str, origin: dict | None = None) -> dict:
    """One MLflow run ``render-validation <identity> <hash of card, settings and clips>`` tagged with
    the identity (``identity``: the gated folder, a person's identity or the shared adapter); numbers not
    measurable are absent (tagged ``not_measured.*`` with the reason). The registered version of this
    folder gets tags and a description naming this run and its side-by-side videos; the alias
    ``validated`` only when the gate passes."""
    import mlflow

    from faceid import tracking
    from faceid.config import flatten

    client = tracking.client(mlflow_uri)
    passed = result["gate"]["passed"]
    digest = tracking.short_hash(identity.card, flatten(params.render_validation), result["clips"])
    tags = {"stage": "render_validation", "identity": identity.name, "base_model": identity.card["base_model"],
            "embedder": identity.card["embedder"], "gate": "passed" if passed else "failed",
            "held_out": str(result["held_out"]).lower(), "gated_arm": result["gate"]["arm"], **not_measured(result)}
    if result.get("adapter"):
        tags.update(adapter=result["adapter"]["name"], people=",".join(result["people"]))
    with tracking.using(mlflow_uri, params.tracking.experiment) as exp_id, \
            mlflow.start_run(run_name=tracking.run_name("render-validation", identity.name, digest, origin),
                             experiment_id=exp_id, tags=tracking.run_tags(tags, origin)) as run:
        mlflow.log_params(flatten(params.render_validation, "render_validation"))
        mlflow.log_metrics(flat_metrics(result))
        mlflow.log_artifacts(str(output_dir))  # metrics.json, videos/, sheets/ (PNGs show in the UI), side_by_side/
    name = tracking.registered_model_name(identity.name)
    version = tracking.find_registered_version(mlflow_uri, identity.name, identity.card, params.tracking.register_alias)
    out = {"run_id": run.info.run_id, "model_name": name, "model_version": version, "alias": None}
    if version is None:
        print(f"render-validation {identity.name}: no registered version {name}@{params.tracking.register_alias} "
              "for this identity folder; alias not changed")
        return out
    videos = [f"side_by_side/{key}.mp4" for key in result["videos"]]
    for key, value in (("validation_gate", "passed" if passed else "failed"), ("validation_run_id", run.info.run_id),
                       ("validation_run_name", run.info.run_name), ("validation_side_by_side", " ".join(videos))):
        client.set_model_version_tag(name, version, key, value)
    described = client.get_model_version(name, version).description or ""
    link = tracking.run_link(run.info.experiment_id, run.info.run_id)
    client.update_model_version(name, version, description=(
        f"{described.split(tracking.VALIDATION_NOTE)[0]}{tracking.VALIDATION_NOTE} gate {'passed' if passed else 'failed'} in "
        f"[{run.info.run_name}]({link}) (run `{run.info.run_id}`); side-by-side videos (pose | "
        f"{' | '.join(arm.replace('_', '-') for arm in ARMS if not result[arm].get('skipped'))}) in its artifacts: "
        f"{', '.join(videos)}."))
    if passed:
        client.set_registered_model_alias(name, params.tracking.validated_alias, version)
        out["alias"] = params.tracking.validated_alias
        print(f"render-validation {identity.name}: {name} v{version} @{params.tracking.validated_alias}")
    return out
