"""FaceSim: per-frame identity similarity of a video to a reference embedding (``faceid similarity``).

Each frame: detect faces (crop_faces.detector), take the main face, align it like crop_faces
(dlib 5 points, crop_faces.crop_padding), embed it (embed_faces.embedder), cosine to the
reference. Frames without a face count against ``detection_rate`` and give ``None``.
The metric is labelled by embedder: FaceSim-dlib numbers are not comparable to ArcFace numbers
in papers. For dlib, ``mean_euclidean`` is the Euclidean distance in dlib's descriptor scale
(frame descriptor vs the reference direction at the frame descriptor's norm); dlib's usual rule
reads below 0.6 as the same person.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from faceid.config import CropFacesConfig, EmbedFacesConfig, Params
from faceid.errors import InputError
from faceid.faces.detect import Aligner, build_detector, select_main_face
from faceid.faces.embed import build_embedder, l2_normalize, load_identity_embedding
from faceid.io import write_json
from faceid.pose.video import VIDEO_EXTENSIONS


def _stats(values: list[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    arr = np.asarray(values, np.float64)
    return float(arr.mean()), float(arr.min()), float(arr.std())


class FaceSimScorer:
    """Holds one detector, aligner and embedder; :meth:`score` runs on any number of videos."""

    def __init__(self, reference: np.ndarray, crop_cfg: CropFacesConfig, embed_cfg: EmbedFacesConfig):
        self.embedder = build_embedder(embed_cfg)
        reference = np.asarray(reference, np.float32).reshape(-1)
        if reference.shape[0] != self.embedder.dim:
            raise InputError(
                f"reference embedding has {reference.shape[0]} dims but embedder {self.embedder.name} gives "
                f"{self.embedder.dim}; embed the reference with the same embed_faces.embedder"
            )
        self.reference = l2_normalize(reference)
        self.metric = f"FaceSim-{self.embedder.name}"
        self._padding = crop_cfg.crop_padding
        self._detector = build_detector(crop_cfg.detector, crop_cfg.min_detection_confidence)
        self._aligner = Aligner()

    def faces(self, frames: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """``(embeddings [n, D], frame indices)``: the main face of each of ``frames`` [F, H, W, 3] uint8 RGB
        that shows one, aligned like crop-faces and embedded (``[0, D]`` when no frame has a face)."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise InputError(f"frames: expected [F, H, W, 3] RGB, got shape {frames.shape}")
        size = self.embedder.input_size
        chips, found = [], []
        for i, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            faces = self._detector.detect(frame)
            if faces:
                face = faces[select_main_face(faces, *frame.shape[:2])]
                chips.append(self._aligner.align(frame, face, (size,), self._padding).crops[size])
                found.append(i)
        return self.embedder.embed(chips), found

    def score(self, frames: np.ndarray, reference: np.ndarray | None = None,
              faces: tuple[np.ndarray, list[int]] | None = None) -> dict:
        """``frames`` [F, H, W, 3] uint8 RGB -> metric dict (see :func:`face_similarity`), to the scorer's
        reference or to ``reference`` [D] (same embedder); ``faces``: what :meth:`faces` returned for
        these frames, when the caller has it (the frames are not detected again)."""
        frames = np.asarray(frames)
        emb, found = faces if faces is not None else self.faces(frames)
        ref = self.reference if reference is None else l2_normalize(np.asarray(reference, np.float32).reshape(-1))
        if ref.shape != self.reference.shape:
            raise InputError(f"reference embedding has {ref.shape[0]} dims but embedder {self.embedder.name} gives "
                             f"{self.embedder.dim}; embed the reference with the same embed_faces.embedder")
        cos = (l2_normalize(emb) @ ref).astype(np.float64)

        def per_frame(values: np.ndarray) -> list[float | None]:
            out: list[float | None] = [None] * len(frames)
            for i, v in zip(found, values):
                out[i] = float(v)
            return out

        mean, low, std = _stats(cos.tolist())
        out = {
            "metric": self.metric,
            "embedder": self.embedder.name,
            "mean": mean,
            "min": low,
            "std": std,
            "detection_rate": len(found) / len(frames) if len(frames) else 0.0,
            "num_frames": int(len(frames)),
            "num_detected": len(found),
            "per_frame": per_frame(cos),
        }
        if self.embedder.name == "dlib":
            dist = np.linalg.norm(emb, axis=1) * np.sqrt(np.maximum(0.0, 2.0 - 2.0 * cos))
            out["mean_euclidean"] = _stats(dist.tolist())[0]
            out["per_frame_euclidean"] = per_frame(dist)
        return out

    def close(self) -> None:
        self._detector.close()

    def __enter__(self) -> FaceSimScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def face_similarity(reference: np.ndarray, frames: np.ndarray, crop_cfg: CropFacesConfig, embed_cfg: EmbedFacesConfig) -> dict:
    """FaceSim of ``frames`` [F, H, W, 3] uint8 RGB to ``reference`` [D].

    Keys: metric ("FaceSim-<embedder>"), embedder, mean, min, std (None when no face was found),
    detection_rate, num_frames, num_detected, per_frame (cosine or None per frame); for dlib also
    mean_euclidean and per_frame_euclidean. Use :class:`FaceSimScorer` to score many videos.
    """
    with FaceSimScorer(reference, crop_cfg, embed_cfg) as scorer:
        return scorer.score(frames)


# --------------------------------------------------------------------------- I/O shell


def _read_video(path: Path) -> np.ndarray:
    from faceid.pose.video import read_video

    try:
        frames, _ = read_video(path)
    except InputError:
        raise
    except Exception as exc:  # decord raises its own error types
        raise InputError(f"{path}: cannot read video ({exc})") from exc
    return frames


def _list_videos(video: Path) -> list[Path]:
    if video.is_file():
        return [video]
    if video.is_dir():
        found = sorted(p for p in video.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not found:
            raise InputError(f"{video}: no videos ({', '.join(VIDEO_EXTENSIONS)})")
        return found
    raise InputError(f"{video}: not found (expected a video file or a folder of videos)")


def run(params: Params, reference: Path, video: Path, output: Path | None) -> dict:
    """FaceSim of each video to the reference embedding; JSON to ``output`` or stdout."""
    import json

    from faceid.outputs import check_file, is_json_report

    if output is not None:  # faceid.outputs: not a folder, not an input; replaces only an earlier report
        output = check_file("similarity", output, [reference, video], replaceable=is_json_report("metric", "videos"),
                            what="a similarity report (JSON with metric and videos)")
    ref, meta = load_identity_embedding(reference)
    if meta["embedder"] != params.embed_faces.embedder:
        raise InputError(
            f"{meta['path']}: reference was embedded with {meta['embedder']!r} but embed_faces.embedder is "
            f"{params.embed_faces.embedder!r}; FaceSim needs the same embedder for both"
        )
    videos = _list_videos(Path(video))
    per_video = {}
    with FaceSimScorer(ref, params.crop_faces, params.embed_faces) as scorer:
        for path in videos:
            per_video[path.name] = scorer.score(_read_video(path))
    means = [r["mean"] for r in per_video.values() if r["mean"] is not None]
    frames = sum(r["num_frames"] for r in per_video.values())
    result = {
        "metric": scorer.metric,
        "embedder": scorer.embedder.name,
        "reference": str(meta["path"]),
        "mean": float(np.mean(means)) if means else None,
        "min": min((r["min"] for r in per_video.values() if r["min"] is not None), default=None),
        "detection_rate": sum(r["num_detected"] for r in per_video.values()) / frames if frames else 0.0,
        "videos": per_video,
    }
    if output is not None:
        write_json(output, result)
        mean = "n/a" if result["mean"] is None else f"{result['mean']:.3f}"
        print(f"similarity: {result['metric']} mean {mean}, detection rate {result['detection_rate']:.2f} "
              f"over {len(videos)} video(s) -> {output}")
    else:
        print(json.dumps(result, indent=2))
    return result


def retrieval(embeddings: np.ndarray, own: str, people: dict[str, np.ndarray]) -> dict:
    """Identity retrieval of one render: ``embeddings`` [n, D] (its frames' faces: :meth:`FaceSimScorer.faces`)
    averaged (each L2-normalised) against every person's embedding in ``people`` (``own`` among them) by
    cosine. ``retrieval_rank``: 1 + the number of other people closer than ``own``; ``retrieval_correct``:
    1.0 when rank 1, else 0.0; ``retrieval_margin``: cosine to ``own`` minus the closest other's (> 0:
    retrieved right); ``retrieved``: the closest person. All None when no frame shows a face. Pure."""
    if own not in people or len(people) < 2:
        raise InputError(f"retrieval of {own!r}: expected it among at least two people, got {sorted(people)}")
    emb = np.asarray(embeddings, np.float32)
    if emb.ndim != 2 or not len(emb):
        return {"retrieval_rank": None, "retrieval_correct": None, "retrieval_margin": None, "retrieved": None}
    mean = l2_normalize(l2_normalize(emb).mean(axis=0))
    cos = {name: float(l2_normalize(np.asarray(e, np.float32).reshape(-1)) @ mean) for name, e in people.items()}
    closest_other = max(v for k, v in cos.items() if k != own)
    rank = 1 + sum(v > cos[own] for k, v in cos.items() if k != own)
    return {"retrieval_rank": float(rank), "retrieval_correct": float(rank == 1),
            "retrieval_margin": cos[own] - closest_other, "retrieved": min(cos, key=lambda k: (-cos[k], k))}
