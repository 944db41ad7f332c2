"""``faceid render-validation`` (DVC stage / KFP component ``render_validation``).

For held-out pose clips (``ok`` clips of the prepare-pose manifest that the identity was not trained
on; the last clips when every clip was used, noted in ``metrics.json``) render the clip with the
identity at ``render_validation.face_scale`` and with ``face_scale=0`` (the baseline: null face,
same seed and prompt), then measure per video and on average:

- FaceSim to the reference embedding (``faceid.faces.similarity``), face detection rate,
- temporal identity stability: the spread (std) of per-frame FaceSim and its mean frame-to-frame change,
- pose fidelity: keypoints re-extracted from the generated video vs the clip's control keypoints
  (PCK@0.1 and mean error normalised by the person's size, ``faceid.pose.metrics``).

The gate (``render_validation.gate``): FaceSim(identity) - FaceSim(baseline) > ``min_facesim_gain``
and PCK >= ``min_pose_pck``. When it passes and the identity is registered in MLflow, its version
gets the alias ``tracking.validated_alias``.

Output ``<out>/``: ``metrics.json`` (DVC metrics), ``videos/<clip>.mp4`` and ``<clip>_baseline.mp4``,
``sheets/<clip>.png`` (pose / identity / baseline frames), ``side_by_side/<clip>.mp4``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from faceid.errors import InputError

PCK_THRESHOLD = 0.1
SHEET_FRAMES = 8
VARIANTS = ("identity", "baseline")


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


def evaluate_gate(identity: dict, baseline: dict, gate) -> dict:
    """``gate`` = ``render_validation.gate``. A metric that is not measurable fails its check."""
    gain = None if identity.get("facesim") is None or baseline.get("facesim") is None else identity["facesim"] - baseline["facesim"]
    pck = identity.get("pose_pck")
    reasons = []
    if gain is None:
        reasons.append("FaceSim not measurable (no face detected in the identity or baseline videos)")
    elif not gain > gate.min_facesim_gain:
        reasons.append(f"FaceSim gain {gain:.4f} <= min_facesim_gain {gate.min_facesim_gain:g}")
    if pck is None:
        reasons.append("pose PCK not measurable (no reference pose in the clips)")
    elif not pck >= gate.min_pose_pck:
        reasons.append(f"pose PCK {pck:.4f} < min_pose_pck {gate.min_pose_pck:g}")
    return {"passed": not reasons, "facesim_gain": gain, "min_facesim_gain": gate.min_facesim_gain,
            "min_pose_pck": gate.min_pose_pck, "reasons": reasons}


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


# --------------------------------------------------------------------------- pure images


def contact_sheet(videos: list[np.ndarray], num_frames: int = SHEET_FRAMES, gap: int = 2) -> np.ndarray:
    """One row per video (e.g. pose / identity / baseline) of ``num_frames`` evenly spaced frames."""
    length = min(len(v) for v in videos)
    idx = np.linspace(0, length - 1, min(num_frames, length)).round().astype(int)
    h, w = videos[0].shape[1:3]
    sheet = np.full((len(videos) * (h + gap) - gap, len(idx) * (w + gap) - gap, 3), 255, np.uint8)
    for r, video in enumerate(videos):
        for c, i in enumerate(idx):
            sheet[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = video[i]
    return sheet


def side_by_side(*videos: np.ndarray) -> np.ndarray:
    """``[F, H, sum(W), 3]``: the videos next to each other, cut to the shortest."""
    length = min(len(v) for v in videos)
    return np.concatenate([v[:length] for v in videos], axis=2)


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


def _render_clip(generator, cond, scorer, estimator, clip: dict, settings, out: Path) -> dict:
    from faceid.pose.metrics import pose_fidelity
    from faceid.pose.video import read_video, write_video

    pose_frames, fps = read_video(clip["pose_path"])
    ref_kps = np.load(clip["keypoints_path"])["keypoints"]
    prompt = clip.get("caption") or generator.params.prepare_pose.default_caption
    name = clip["clip_id"]
    videos, metrics = {}, {}
    for variant, scale in zip(VARIANTS, (settings.face_scale, 0.0)):
        frames = generator.generate(cond, pose_frames, prompt, settings, face_scale=scale)
        videos[variant] = frames
        write_video(out / "videos" / (f"{name}.mp4" if variant == "identity" else f"{name}_{variant}.mp4"), frames, fps)
        face = scorer.score(frames)
        pose = pose_fidelity(estimator.estimate(frames), ref_kps, threshold=PCK_THRESHOLD)
        metrics[variant] = {**video_metrics(face, pose), "per_frame_facesim": face["per_frame"]}
    sheet = contact_sheet([pose_frames, videos["identity"], videos["baseline"]])
    _write_png(out / "sheets" / f"{name}.png", sheet)
    write_video(out / "side_by_side" / f"{name}.mp4", side_by_side(pose_frames, videos["identity"], videos["baseline"]), fps)
    return metrics


def _write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def run(params, identity_dir: Path, clips_dir: Path, reference: Path, output_dir: Path, mlflow_uri: str | None = None) -> dict:
    """Render, measure and gate; write ``output_dir`` atomically; log to MLflow when ``mlflow_uri``."""
    from faceid.faces.embed import load_identity_embedding
    from faceid.faces.similarity import FaceSimScorer
    from faceid.infer import Generator, settings_from
    from faceid.io import atomic_dir, write_json
    from faceid.model.identity import load_identity
    from faceid.pose.estimate import build_estimator

    cfg = params.render_validation

    # 1. Check inputs: reference embedding, identity card (base model, embedder, dim), clips
    ref, ref_meta = load_identity_embedding(reference)
    if ref_meta["embedder"] != params.embed_faces.embedder:
        raise InputError(f"{ref_meta['path']}: reference embedded with {ref_meta['embedder']!r}, but embed_faces.embedder is "
                         f"{params.embed_faces.embedder!r}; FaceSim needs the same embedder")
    identity = load_identity(identity_dir, model_cfg=params.model, embedder=ref_meta["embedder"], embed_dim=int(ref_meta["dim"]))
    trained = set((identity.card.get("data") or {}).get("clips") or {})
    clips, held_out = select_clips(_clip_rows(Path(clips_dir)), trained, cfg.num_clips)
    settings = settings_from(params, cfg.face_scale, cfg.guidance_scale, cfg.num_inference_steps, cfg.seed, "")

    # 2. Model, FaceSim scorer, pose estimator (each built once); the identity loaded above conditions it
    generator = Generator(params)

    # 3. Render and measure every clip, into a temporary folder that replaces output_dir at the end
    output_dir = Path(output_dir)
    with (atomic_dir(output_dir) as tmp, FaceSimScorer(ref, params.crop_faces, params.embed_faces) as scorer,
          build_estimator(params.prepare_pose) as estimator):
        per_clip = {}
        for clip in clips:
            per_clip[clip["clip_id"]] = _render_clip(generator, identity, scorer, estimator, clip, settings, tmp)
            print(f"render-validation: {clip['clip_id']} rendered")
        summary = {v: aggregate([{k: x for k, x in m[v].items() if k != "per_frame_facesim"} for m in per_clip.values()])
                   for v in VARIANTS}
        gate = evaluate_gate(summary["identity"], summary["baseline"], cfg.gate)
        result = {
            "identity": identity.name,
            "metric": scorer.metric,
            "held_out": held_out,
            "clips": [c["clip_id"] for c in clips],
            **summary,
            "gate": gate,
            "videos": per_clip,
        }
        write_json(tmp / "metrics.json", result)

    # 4. MLflow: metrics, videos, sheets; alias when the gate passes
    if mlflow_uri:
        result["mlflow"] = log_to_mlflow(params, identity, output_dir, result, mlflow_uri)
    verdict = "PASSED" if gate["passed"] else "FAILED (" + "; ".join(gate["reasons"]) + ")"
    fs = summary["identity"]["facesim"]
    print(f"render-validation {identity.name}: {len(clips)} clip(s){'' if held_out else ' (not held out: every clip was trained on)'}, "
          f"{result['metric']} {'n/a' if fs is None else f'{fs:.3f}'}, gate {verdict} -> {output_dir / 'metrics.json'}")
    return result


def flat_metrics(result: dict) -> dict[str, float]:
    """``{"identity.facesim": ..., "baseline.pose_pck": ..., "gate.facesim_gain": ..., "gate.passed": 0/1}``."""
    out = {}
    for variant in VARIANTS:
        for key, value in result[variant].items():
            if value is not None:
                out[f"{variant}.{key}"] = float(value)
    if result["gate"]["facesim_gain"] is not None:
        out["gate.facesim_gain"] = float(result["gate"]["facesim_gain"])
    out["gate.passed"] = float(result["gate"]["passed"])
    return out


def find_registered_version(client, identity, register_alias: str) -> str | None:
    """The registry version of this identity folder: ``faceid-<name>@<register_alias>`` when the
    card logged with that version equals ours; None when not registered (or another training run)."""
    import json

    import mlflow

    from faceid.tracking import registered_model_name

    try:
        version = client.get_model_version_by_alias(registered_model_name(identity.name), register_alias)
    except Exception:  # not registered, or no such alias
        return None
    try:
        card_path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="identity.json")
        card = json.loads(Path(card_path).read_text())
    except Exception:
        return None
    return str(version.version) if card == identity.card else None


def log_to_mlflow(params, identity, output_dir: Path, result: dict, mlflow_uri: str) -> dict:
    """One MLflow run tagged with the identity; the alias ``validated`` only when the gate passes."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from faceid import tracking
    from faceid.config import flatten

    tracking.setup(mlflow_uri, params.tracking.experiment)
    client = MlflowClient()
    passed = result["gate"]["passed"]
    with mlflow.start_run(run_name=f"render-validation-{identity.name}") as run:
        mlflow.set_tags({"stage": "render_validation", "identity": identity.name, "base_model": identity.card["base_model"],
                         "embedder": identity.card["embedder"], "gate": "passed" if passed else "failed",
                         "held_out": str(result["held_out"]).lower()})
        mlflow.log_params(flatten(params.render_validation, "render_validation"))
        mlflow.log_metrics(flat_metrics(result))
        mlflow.log_artifacts(str(output_dir))  # metrics.json, videos/, sheets/ (PNGs show in the UI), side_by_side/
    name = tracking.registered_model_name(identity.name)
    version = find_registered_version(client, identity, params.tracking.register_alias)
    out = {"run_id": run.info.run_id, "model_name": name, "model_version": version, "alias": None}
    if version is None:
        print(f"render-validation {identity.name}: no registered version {name}@{params.tracking.register_alias} "
              "for this identity folder; alias not changed")
        return out
    client.set_model_version_tag(name, version, "validation_gate", "passed" if passed else "failed")
    client.set_model_version_tag(name, version, "validation_run_id", run.info.run_id)
    if passed:
        client.set_registered_model_alias(name, params.tracking.validated_alias, version)
        out["alias"] = params.tracking.validated_alias
        print(f"render-validation {identity.name}: {name} v{version} @{params.tracking.validated_alias}")
    return out
