"""Identity routing of dance clips: a clip that shows the identity is an identity example, any
other clip a motion prior (trained with the null face).

Clips are identity-independent: prepare-pose keeps, per clip, the main face's region on a few
frames decoded at the source video's resolution (``clips/<clip_id>/faces.npz``; a face in a small
full-body clip is often too small to detect). Routing scores those regions against one identity
embedding with the FaceSim scorer (detect, align, embed, cosine) and routes by the median cosine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.config import CropFacesConfig, EmbedFacesConfig
from faceid.errors import InputError
from faceid.train.data import Clip

IDENTITY, PRIOR = "identity", "prior"
FACES_FILE = "faces.npz"


@dataclass(frozen=True)
class ClipRoute:
    clip_id: str
    role: str  # "identity" | "prior"
    facesim: float | None  # median cosine of the detected faces to the identity embedding; None = no face
    num_faces: int  # regions in which the scorer found a face
    num_regions: int  # face regions prepare-pose stored for the clip
    threshold: float
    reason: str


def faces_path(clip: Clip) -> Path:
    return clip.video_path.parent / FACES_FILE


def _open_faces(clip: Clip):
    """The clip's ``faces.npz`` (an open NpzFile), checked to exist and to belong to the clip."""
    path = faces_path(clip)
    if not path.is_file():
        raise InputError(
            f"{path}: face regions of clip {clip.clip_id} not found (clips from an older prepare-pose?); "
            "rerun prepare-pose to write faces.npz per clip"
        )
    try:
        z = np.load(path, allow_pickle=False)
        checksum = str(z["checksum"])
    except Exception as exc:
        raise InputError(f"{path}: not a readable faces.npz with 'regions' and 'checksum' ({exc}); rerun prepare-pose") from None
    if checksum != clip.checksum:
        z.close()
        raise InputError(
            f"{path}: checksum {checksum[:12]} does not match the manifest's {clip.checksum[:12]} for clip "
            f"{clip.clip_id} (folder from another prepare-pose run); rerun prepare-pose"
        )
    return z


def load_face_regions(clip: Clip) -> np.ndarray:
    """``regions`` [K, S, S, 3] uint8 of the clip's ``faces.npz`` (K may be 0), checked against the clip."""
    path = faces_path(clip)
    with _open_faces(clip) as z:
        try:
            regions = z["regions"]
        except Exception as exc:
            raise InputError(f"{path}: no readable 'regions' array ({exc}); rerun prepare-pose") from None
    if regions.dtype != np.uint8 or regions.ndim != 4 or regions.shape[-1] != 3:
        raise InputError(f"{path}: regions {regions.shape} {regions.dtype}, expected [K, S, S, 3] uint8; rerun prepare-pose")
    return regions


def route_clips(clips: list[Clip], reference: np.ndarray, crop_cfg: CropFacesConfig, embed_cfg: EmbedFacesConfig,
                threshold: float) -> list[ClipRoute]:
    """Route each clip to ``identity`` (median FaceSim of its face regions >= threshold) or ``prior``.

    ``reference`` is the identity embedding (embed_faces, same embedder); ``threshold`` <= 0 means
    the embedder's calibrated same-person threshold (``DEFAULT_OUTLIER_THRESHOLDS``). A clip
    without face regions, or whose regions show no face to the scorer, is a ``prior`` clip with
    ``facesim`` None.
    """
    from faceid.faces.embed import DEFAULT_OUTLIER_THRESHOLDS
    from faceid.faces.similarity import FaceSimScorer

    # 1. Check inputs before loading any model.
    threshold = float(threshold) if threshold > 0 else DEFAULT_OUTLIER_THRESHOLDS[embed_cfg.embedder]
    if not clips:
        return []
    for clip in clips:
        _open_faces(clip).close()  # exists and belongs to the clip, else an InputError naming the file
    # 2. Score each clip's regions with one scorer.
    routes = []
    with FaceSimScorer(reference, crop_cfg, embed_cfg) as scorer:
        for clip in clips:
            regions = load_face_regions(clip)
            if len(regions) == 0:
                routes.append(ClipRoute(clip.clip_id, PRIOR, None, 0, 0, threshold,
                                        "no face region (prepare-pose found no face in its sampled frames, "
                                        "or face_samples is 0)"))
                continue
            cosines = [c for c in scorer.score(regions)["per_frame"] if c is not None]
            if not cosines:
                routes.append(ClipRoute(clip.clip_id, PRIOR, None, 0, len(regions), threshold,
                                        f"no face found in any of {len(regions)} face regions"))
                continue
            facesim = float(np.median(cosines))
            same = facesim >= threshold
            reason = (f"median {scorer.metric} {facesim:.3f} {'>=' if same else '<'} {threshold:.3f} "
                      f"over {len(cosines)}/{len(regions)} faces")
            routes.append(ClipRoute(clip.clip_id, IDENTITY if same else PRIOR, facesim, len(cosines), len(regions),
                                    threshold, reason))
    return routes


def summarize_routes(routes: list[ClipRoute]) -> str:
    """A few lines for the train-lora log: counts per role, then each clip with its role and score."""
    n_id = sum(r.role == IDENTITY for r in routes)
    threshold = f" (threshold {routes[0].threshold:.3f})" if routes else ""
    lines = [f"routing: {n_id} identity clip(s), {len(routes) - n_id} prior clip(s){threshold}"]
    width = max((len(r.clip_id) for r in routes), default=0)
    lines += [f"  {r.clip_id:<{width}}  {r.role:<8}  {r.reason}" for r in routes]
    return "\n".join(lines)
