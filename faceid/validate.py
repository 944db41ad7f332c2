"""``faceid render-validation`` (DVC stage / KFP component ``render_validation``).

For held-out pose clips (``ok`` clips of the prepare-pose manifest that the identity was not trained
on; the last clips when every clip was used, noted in ``metrics.json``) render three arms with the
same seed and prompt:

- ``base``: the base model, no identity (``generate_video(pipe, None, ...)``);
- ``reference_only``: the training-free baseline, base VACE with the identity's ``reference.png``
  as its reference image (R2V), no adapter; skipped (with the reason in ``metrics.json``) when the
  identity folder has no reference.png;
- ``identity``: the trained identity at ``render_validation.face_scale`` (``lora_scale`` 1; its
  reference image too when it was trained with it).

Per video, per arm and on average (``faceid.faces.similarity``, ``faceid.pose.metrics``):

- FaceSim to the reference embedding and the face detection rate,
- temporal identity stability: the spread (std) of per-frame FaceSim and its mean frame-to-frame change,
- pose fidelity: keypoints re-extracted from the generated video vs the clip's control keypoints
  (PCK@0.1 and mean error normalised by the person's size).

The gate (``render_validation.gate``), every check on the averages:

- ``facesim``: FaceSim(identity) >= ``min_facesim`` (0 = the embedder's same-person threshold,
  ``faceid.faces.embed.outlier_threshold``): the render shows *the* person, not just someone closer;
- ``face_detection_rate``: the identity videos' share of frames with a detected face >= ``min_face_detection_rate``;
- ``facesim_gain``: FaceSim(identity) - FaceSim(base) >= ``min_facesim_gain``;
- ``vs_reference_only``: FaceSim(identity) >= FaceSim(reference_only) - ``tolerance`` (not
  applicable, not failed, when the reference_only arm is skipped);
- ``pose_pck``: PCK(identity) >= ``min_pose_pck``.

A value that cannot be measured fails its check, with the reason. When the gate passes and the
identity is registered in MLflow, its version gets the alias ``tracking.validated_alias``.

Output ``<out>/``: ``metrics.json`` (DVC metrics), ``videos/<clip>.mp4`` (identity),
``<clip>_base.mp4`` and ``<clip>_reference_only.mp4``, ``sheets/<clip>.png`` (rows: pose, base,
reference-only, identity; the renders' pixels), ``side_by_side/<clip>.mp4`` (pose | base | reference-only |
identity, each panel labelled, scaled to a watchable size: :mod:`faceid.preview`) and its contact sheet
``side_by_side/<clip>.png``. Every input is
checked before a model is built; ``<out>`` is locked for the run (:func:`faceid.io.output_lock`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from faceid.errors import InputError

PCK_THRESHOLD = 0.1
SHEET_FRAMES = 8
ARMS = ("base", "reference_only", "identity")  # the order of the panels and sheet rows (after the pose)
VALIDATION_LORA_SCALE = 1.0  # the identity arm: the LoRA at the weight it was trained with (x face_scale)


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


def evaluate_gate(arms: dict[str, dict | None], gate, same_person_threshold: float) -> dict:
    """``arms``: the averaged metrics of ``base``, ``reference_only`` (None when skipped) and
    ``identity``; ``gate`` = ``render_validation.gate``; ``same_person_threshold``: the embedder's
    (what ``min_facesim: 0`` stands for). A value that is not measurable fails its check; the check
    of a skipped arm is ``not_applicable``. Passes when no check failed."""
    ident, base, ref = arms["identity"], arms["base"], arms.get("reference_only")
    min_facesim = gate_facesim(gate, same_person_threshold)

    def diff(other: dict) -> float | None:
        a, b = ident.get("facesim"), other.get("facesim")
        return None if a is None or b is None else a - b

    checks = {"facesim": _check(
        ident.get("facesim"), min_facesim,
        "FaceSim not measurable (no face detected in the identity videos)",
        f"FaceSim {{value:.4f}} < min_facesim {min_facesim:g} (the same-person threshold)")}
    checks["face_detection_rate"] = _check(
        ident.get("face_detection_rate"), gate.min_face_detection_rate,
        "face detection rate not measurable (no identity video)",
        f"face detection rate {{value:.4f}} < min_face_detection_rate {gate.min_face_detection_rate:g}")
    checks["facesim_gain"] = _check(
        diff(base), gate.min_facesim_gain,
        "FaceSim not measurable (no face detected in the identity or base videos)",
        f"FaceSim gain over base {{value:.4f}} < min_facesim_gain {gate.min_facesim_gain:g}")
    if ref is None:
        checks["vs_reference_only"] = {"status": "not_applicable", "value": None, "threshold": -gate.tolerance,
                                       "reason": "reference_only arm skipped (no reference.png)"}
    else:
        checks["vs_reference_only"] = _check(
            diff(ref), -gate.tolerance,
            "FaceSim not measurable (no face detected in the identity or reference-only videos)",
            f"FaceSim over reference-only {{value:.4f}} < -tolerance (-{gate.tolerance:g})")
    checks["pose_pck"] = _check(ident.get("pose_pck"), gate.min_pose_pck,
                                "pose PCK not measurable (no reference pose in the clips)",
                                f"pose PCK {{value:.4f}} < min_pose_pck {gate.min_pose_pck:g}")
    reasons = [c["reason"] for c in checks.values() if c["status"] == "failed"]
    return {"passed": not reasons, "facesim_gain": checks["facesim_gain"]["value"],
            "facesim_vs_reference_only": checks["vs_reference_only"]["value"],
            "min_facesim": min_facesim, "min_face_detection_rate": gate.min_face_detection_rate,
            "min_facesim_gain": gate.min_facesim_gain, "tolerance": gate.tolerance, "min_pose_pck": gate.min_pose_pck,
            "checks": checks, "reasons": reasons}


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


def _video_name(clip_id: str, arm: str) -> str:
    return f"{clip_id}.mp4" if arm == "identity" else f"{clip_id}_{arm}.mp4"


def _render_clip(generator, arms: dict[str, tuple], scorer, estimator, clip: dict, settings, out: Path) -> dict:
    """Render every arm (``arm -> (conditioning, reference image)``) for one clip; measure; write
    the videos, the contact sheet, and the side-by-side preview with its contact sheet beside it
    (scaled and labelled for watching: :mod:`faceid.preview`; the metrics use the renders as they are)."""
    from faceid.pose.metrics import pose_fidelity
    from faceid.pose.video import read_video, write_video
    from faceid.preview import write_preview
    from faceid.render import frames_sheet

    pose_frames, fps = read_video(clip["pose_path"])
    ref_kps = np.load(clip["keypoints_path"])["keypoints"]
    prompt = clip.get("caption") or generator.params.prepare_pose.default_caption
    name = clip["clip_id"]
    videos, metrics = {}, {}
    for arm, (conditioning, reference_image) in arms.items():
        frames = generator.generate(conditioning, pose_frames, prompt, settings, reference_image=reference_image)
        videos[arm] = frames
        write_video(out / "videos" / _video_name(name, arm), frames, fps)
        face = scorer.score(frames)
        pose = pose_fidelity(estimator.estimate(frames), ref_kps, threshold=PCK_THRESHOLD)
        metrics[arm] = {**video_metrics(face, pose), "per_frame_facesim": face["per_frame"]}
    panels = {"pose": pose_frames, **{arm: videos[arm] for arm in ARMS if arm in videos}}
    _write_png(out / "sheets" / f"{name}.png", frames_sheet(list(panels.values()), SHEET_FRAMES))
    write_preview(out / "side_by_side" / f"{name}.mp4", out / "side_by_side" / f"{name}.png", panels, fps)
    return metrics


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def run(params, identity_dir: Path, clips_dir: Path, reference: Path, output_dir: Path, mlflow_uri: str | None = None,
        lock_wait: float = 0.0, origin: dict | None = None) -> dict:
    """Render the three arms, measure and gate; write ``output_dir`` atomically; log to MLflow when ``mlflow_uri``.
    Every input is checked before a model is built. ``lock_wait``: seconds to wait for another run
    writing ``output_dir`` (:func:`faceid.io.output_lock`). ``origin``: what the door knows of where
    it runs (:data:`faceid.tracking.ORIGIN_TAGS`), as run tags."""
    from faceid.faces.embed import load_identity_embedding, outlier_threshold
    from faceid.faces.similarity import FaceSimScorer
    from faceid.io import atomic_dir, output_lock, write_json
    from faceid.model.identity import REFERENCE_FILE, load_identity
    from faceid.outputs import check_folder, mark
    from faceid.pose.estimate import build_estimator
    from faceid.render import Generator, Settings

    cfg = params.render_validation
    output_dir = check_folder("render_validation", output_dir, [identity_dir, clips_dir, reference])  # faceid.outputs

    # 1. Check inputs: reference embedding, identity card (base model, embedder, dim), clips, settings
    #    (render_validation values are checked at config load)
    ref, ref_meta = load_identity_embedding(reference)
    if ref_meta["embedder"] != params.embed_faces.embedder:
        raise InputError(f"{ref_meta['path']}: reference embedded with {ref_meta['embedder']!r}, but embed_faces.embedder is "
                         f"{params.embed_faces.embedder!r}; FaceSim needs the same embedder")
    identity = load_identity(identity_dir, model_cfg=params.model, embedder=ref_meta["embedder"], embed_dim=int(ref_meta["dim"]))
    trained = set((identity.card.get("data") or {}).get("clips") or {})
    clips, held_out = select_clips(_clip_rows(Path(clips_dir)), trained, cfg.num_clips)
    settings = Settings(face_scale=cfg.face_scale, lora_scale=VALIDATION_LORA_SCALE, guidance_scale=cfg.guidance_scale,
                        num_inference_steps=cfg.num_inference_steps, seed=cfg.seed, prompt="")

    # 2. The arms: arm -> (conditioning, VACE reference image); reference_only needs the identity's reference.png
    arms = {"base": (None, None), "reference_only": (None, identity.reference), "identity": (identity, None)}
    skipped = {}
    if identity.reference is None:
        del arms["reference_only"]
        skipped["reference_only"] = f"{Path(identity_dir) / REFERENCE_FILE} not found (identity folder written before it existed)"

    output_dir = Path(output_dir)
    with output_lock("render-validation", output_dir, lock_wait):
        # 3. Model, FaceSim scorer, pose estimator (each built once)
        generator = Generator(params)

        # 4. Render and measure every clip, into a temporary folder that replaces output_dir at the end
        with (atomic_dir(output_dir) as tmp, FaceSimScorer(ref, params.crop_faces, params.embed_faces) as scorer,
              build_estimator(params.prepare_pose) as estimator):
            mark(tmp, "render_validation")
            per_clip = {}
            for clip in clips:
                per_clip[clip["clip_id"]] = _render_clip(generator, arms, scorer, estimator, clip, settings, tmp)
                print(f"render-validation: {clip['clip_id']} rendered ({', '.join(arms)})")

            # 5. Averages per arm, the gate, metrics.json
            summary = {}
            for arm in ARMS:
                if arm in skipped:
                    summary[arm] = {"skipped": True, "reason": skipped[arm]}
                else:
                    summary[arm] = aggregate([{k: x for k, x in m[arm].items() if k != "per_frame_facesim"}
                                              for m in per_clip.values()])
            gate = evaluate_gate({arm: None if arm in skipped else summary[arm] for arm in ARMS}, cfg.gate,
                                 outlier_threshold(params.embed_faces))
            result = {
                "identity_name": identity.name,
                "metric": scorer.metric,
                "held_out": held_out,
                "clips": [c["clip_id"] for c in clips],
                **summary,
                "gate": gate,
                "videos": per_clip,
            }
            write_json(tmp / "metrics.json", result)

        # 6. MLflow: metrics, videos, sheets; alias when the gate passes
        if mlflow_uri:
            result["mlflow"] = log_to_mlflow(params, identity, output_dir, result, mlflow_uri, origin)
    verdict = "PASSED" if gate["passed"] else "FAILED (" + "; ".join(gate["reasons"]) + ")"
    scores = ", ".join(f"{arm} " + ("skipped" if arm in skipped else _fmt(summary[arm]["facesim"])) for arm in ARMS)
    print(f"render-validation {identity.name}: {len(clips)} clip(s){'' if held_out else ' (not held out: every clip was trained on)'}, "
          f"{result['metric']}: {scores}; gate {verdict} -> {output_dir / 'metrics.json'}")
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def flat_metrics(result: dict) -> dict[str, float]:
    """Every number of ``metrics.json`` under one flat name: ``identity.facesim``, ``base.pose_pck``,
    ``reference_only.skipped`` (1 when skipped), ``gate.facesim_gain``, ``gate.vs_reference_only.passed``,
    ``gate.passed`` (0/1), ``clip.<clip>.<arm>.<metric>``; values that are not measurable are left out."""
    import re

    out = {}
    for arm in ARMS:
        if result[arm].get("skipped"):
            out[f"{arm}.skipped"] = 1.0
            continue
        out.update({f"{arm}.{k}": float(v) for k, v in result[arm].items() if v is not None})
    gate = result["gate"]
    for key in ("facesim_gain", "facesim_vs_reference_only", "min_facesim", "min_face_detection_rate", "min_facesim_gain",
                "tolerance", "min_pose_pck"):
        if gate[key] is not None:
            out[f"gate.{key}"] = float(gate[key])
    for name, check in gate["checks"].items():
        if check["status"] != "not_applicable":
            out[f"gate.{name}.passed"] = float(check["status"] == "passed")
    out["gate.passed"] = float(gate["passed"])
    for clip, arms in result["videos"].items():
        safe = re.sub(r"[^\w\-. /]", "_", clip)
        for arm, values in arms.items():
            out.update({f"clip.{safe}.{arm}.{k}": float(v) for k, v in values.items()
                        if k != "per_frame_facesim" and v is not None})
    return out


def not_measured(result: dict) -> dict[str, str]:
    """Tags ``not_measured.<arm>.<metric>`` -> why, for each averaged number that could not be measured
    (left out of the metrics, never logged as 0; the terminal prints it as n/a)."""
    why = {"facesim": "no face detected in any frame", "facesim_min": "no face detected in any frame",
           "facesim_std": "no face detected in any frame",
           "facesim_jitter": "no two consecutive frames with a face",
           "pose_pck": "no reference pose to compare", "pose_error": "no joint found in both poses",
           "pose_detection_rate": "no reference pose to compare"}
    return {f"not_measured.{arm}.{k}": why.get(k, "not measurable")
            for arm in ARMS if not result[arm].get("skipped") for k, v in result[arm].items() if v is None}


def log_to_mlflow(params, identity, output_dir: Path, result: dict, mlflow_uri: str, origin: dict | None = None) -> dict:
    """One MLflow run ``render-validation <identity> <hash of card, settings and clips>`` tagged with
    the identity; numbers not measurable are absent (tagged ``not_measured.*`` with the reason). The
    registered version of this identity folder gets tags and a description naming this run and its
    side-by-side videos; the alias ``validated`` only when the gate passes."""
    import mlflow

    from faceid import tracking
    from faceid.config import flatten

    client = tracking.client(mlflow_uri)
    passed = result["gate"]["passed"]
    digest = tracking.short_hash(identity.card, flatten(params.render_validation), result["clips"])
    tags = {"stage": "render_validation", "identity": identity.name, "base_model": identity.card["base_model"],
            "embedder": identity.card["embedder"], "gate": "passed" if passed else "failed",
            "held_out": str(result["held_out"]).lower(), **not_measured(result)}
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
    videos = [f"side_by_side/{clip}.mp4" for clip in result["clips"]]
    for key, value in (("validation_gate", "passed" if passed else "failed"), ("validation_run_id", run.info.run_id),
                       ("validation_run_name", run.info.run_name), ("validation_side_by_side", " ".join(videos))):
        client.set_model_version_tag(name, version, key, value)
    described = client.get_model_version(name, version).description or ""
    link = tracking.run_link(run.info.experiment_id, run.info.run_id)
    client.update_model_version(name, version, description=(
        f"{described.split(tracking.VALIDATION_NOTE)[0]}{tracking.VALIDATION_NOTE} gate {'passed' if passed else 'failed'} in "
        f"[{run.info.run_name}]({link}) (run `{run.info.run_id}`); side-by-side videos (pose | base | "
        f"reference-only | identity) in its artifacts: {', '.join(videos)}."))
    if passed:
        client.set_registered_model_alias(name, params.tracking.validated_alias, version)
        out["alias"] = params.tracking.validated_alias
        print(f"render-validation {identity.name}: {name} v{version} @{params.tracking.validated_alias}")
    return out
