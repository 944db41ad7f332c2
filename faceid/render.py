"""Rendering: a pose video + an identity (or a blend, or none) -> a generated video file.

What the rendering stages share (``faceid.infer``, ``faceid.batch``'s Ray Data workers,
``faceid.validate``):

- :func:`resolve_identity` — an identity folder or ``models:/faceid-<name>@<alias>`` -> a local folder.
- :func:`load_identities` — resolve, load and check identities before any model is built.
- :func:`parse_blend` / :func:`parse_interpolate` — ``a=0.7,b=0.3`` / ``a,b`` from the command line.
- :func:`check_pose_video` / :func:`load_pose_video` — size checked from the container (multiples of 16,
  at most 720p) before decoding; read and apply the 4n+1 frame policy (``faceid.model.shapes``).
- :func:`read_reference_photo` — a ``--reference-image`` with crop-faces' photo checks (size, blank, a face).
- :func:`identity_sha256` — the content of an identity folder, for batch-infer's ``made_with``.
- :func:`reference_image_for` — the photo of ``--reference-only`` (``--reference-image`` or the
  identity folder's ``reference.png``).
- :class:`Generator` — the pipeline built once (its blocks compiled with ``model.compile``), identities
  loaded (and compatibility-checked) once, each distinct prompt encoded once.
- :func:`render_one` — pose video -> output file, with timings; catches GPU out-of-memory.

Render settings (``face_scale``, ``lora_scale``, guidance, steps, seed, prompt) are one frozen
:class:`Settings`, built once at the door (:func:`settings_from`: the flags given, else
``batch_infer``) and passed down unchanged to ``generate_video``: no other default, no override on
the way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceid.errors import FaceidError, InputError

# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    face_scale: float  # identity strength: face tokens and LoRA (0 = the base model exactly)
    lora_scale: float  # the LoRA alone (adapter weight = blend weight x face_scale x lora_scale)
    guidance_scale: float
    num_inference_steps: int
    seed: int
    prompt: str  # "" = the clip caption / prepare_pose.default_caption


def settings_from(cfg, *, face_scale=None, lora_scale=None, guidance_scale=None, num_inference_steps=None,
                  seed=None, prompt=None) -> Settings:
    """The render settings of a run, built once at the door: explicit values (the flags given) win;
    ``None`` means the value in ``cfg`` (the ``batch_infer`` section). Every value is checked (finite,
    in range; :mod:`faceid.model.checks`), the error naming the flag or the key: face_scale and
    lora_scale >= 0, guidance >= 1, steps 1..1000, seed 0..2^63-1."""
    from faceid.model.checks import check_guidance, check_scale, check_seed, check_steps

    def pick(check, value, flag: str, key: str):
        return check(f"batch_infer.{key}", getattr(cfg, key)) if value is None else check(flag, value)

    return Settings(
        face_scale=pick(check_scale, face_scale, "--face-scale", "face_scale"),
        lora_scale=pick(check_scale, lora_scale, "--lora-scale", "lora_scale"),
        guidance_scale=pick(check_guidance, guidance_scale, "--guidance-scale", "guidance_scale"),
        num_inference_steps=pick(check_steps, num_inference_steps, "--steps", "num_inference_steps"),
        seed=pick(check_seed, seed, "--seed", "seed"),
        prompt=cfg.prompt if prompt is None else prompt,
    )


def choose_prompt(settings: Settings, caption: str | None, default_caption: str) -> str:
    return settings.prompt or caption or default_caption


# --------------------------------------------------------------------------- identity references


def parse_blend(text: str) -> list[tuple[str, float]]:
    """``"a=0.7,b=0.3"`` -> ``[("a", 0.7), ("b", 0.3)]``. Weights must be >= 0 and sum to 1."""
    items = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        ref, sep, raw = part.rpartition("=")
        if not sep or not ref.strip():
            raise InputError(f"--blend {text!r}: expected NAME=WEIGHT pairs, e.g. a=0.7,b=0.3 (got {part!r})")
        try:
            weight = float(raw)
        except ValueError:
            raise InputError(f"--blend {text!r}: weight of {ref.strip()!r} is not a number ({raw!r})") from None
        if not np.isfinite(weight) or weight < 0:
            raise InputError(f"--blend {text!r}: weight of {ref.strip()!r} must be a finite number >= 0, got {raw!r}")
        items.append((ref.strip(), weight))
    if not items:
        raise InputError(f"--blend {text!r}: expected NAME=WEIGHT pairs, e.g. a=0.7,b=0.3")
    total = sum(w for _, w in items)
    if abs(total - 1.0) > 1e-3:
        raise InputError(f"--blend {text!r}: weights must sum to 1, got {total:g}")
    return items


def parse_interpolate(text: str, identity: str | None = None) -> tuple[str, str]:
    """``"a,b"`` -> ``("a", "b")``; a single name ``"b"`` interpolates from ``identity`` to it."""
    parts = [p.strip() for p in (text or "").split(",") if p.strip()]
    if len(parts) == 1 and identity:
        parts = [identity, parts[0]]
    if len(parts) != 2:
        raise InputError(f"--interpolate {text!r}: expected two identities A,B (folders or models:/ URIs)")
    return parts[0], parts[1]


def resolve_identity(ref: str | Path, mlflow_uri: str | None, download_dir: str | Path) -> Path:
    """An identity folder, or ``models:/faceid-<name>@<alias>`` (or ``/<version>``) from the MLflow
    registry at ``mlflow_uri``, downloaded once per version into ``download_dir``
    (``tracking.download_dir``; :func:`faceid.tracking.download_identity`)."""
    from faceid import tracking

    ref = str(ref)
    if ref.startswith(tracking.MODELS_PREFIX):
        if not mlflow_uri:
            raise InputError(f"{ref}: a registry identity needs an MLflow tracking URI (--mlflow-uri)")
        return tracking.download_identity(ref, mlflow_uri, Path(download_dir))
    path = Path(ref)
    if path.is_file():
        raise InputError(f"{path} is a file; expected a folder (a train-lora output folder) or models:/faceid-<name>@<alias>")
    if not path.is_dir():
        raise InputError(f"{path}: identity folder not found (expected a train-lora output folder or models:/faceid-<name>@<alias>)")
    return path


def identity_sha256(folder: str | Path) -> str:
    """sha256 over the files an identity renders with (card, mapper, embedding, LoRA, reference.png):
    what batch-infer's manifest records, so a retrained identity in the same folder is redone."""
    from faceid.io import sha256_file
    from faceid.model.identity import CARD_FILE, EMBEDDING_FILE, MAPPER_FILE, REFERENCE_FILE
    from faceid.model.lora import LORA_FILE

    folder = Path(folder)
    parts = [f"{name}:{sha256_file(folder / name) if (folder / name).is_file() else '-'}"
             for name in (CARD_FILE, MAPPER_FILE, EMBEDDING_FILE, LORA_FILE, REFERENCE_FILE)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def load_identities(refs: list[str | Path], params, mlflow_uri: str | None = None, adapter: str | Path | None = None,
                    reference=None) -> dict[str, Any]:
    """``{ref: Identity}``: each identity folder or registry name resolved, loaded and checked against
    the base model (``params.model``), before any model is built (a missing one fails in a moment).
    With a shared ``adapter`` (folder or registry name), each ref is a person's embed-faces output
    rendered zero-shot through it (:func:`load_person`; ``reference``: the person's reference image)."""
    from faceid.model.identity import load_identity

    if adapter:
        shared = load_adapter(adapter, params, mlflow_uri)
        return {str(ref): load_person(ref, shared, reference) for ref in refs}
    return {str(ref): load_identity(resolve_identity(ref, mlflow_uri, params.tracking.download_dir), model_cfg=params.model)
            for ref in refs}


def load_adapter(ref: str | Path, params, mlflow_uri: str | None = None):
    """A shared adapter (``train-shared`` output folder or ``models:/faceid-<name>@<alias>``), checked
    against the base model; a person's own identity folder is refused (it renders only that person)."""
    from faceid.model.identity import is_shared, load_identity

    adapter = load_identity(resolve_identity(ref, mlflow_uri, params.tracking.download_dir), model_cfg=params.model)
    if not is_shared(adapter):
        raise InputError(f"--adapter {ref}: not a shared adapter (train-shared writes those); a person's identity "
                         "folder renders only that person: pass it with --identity and no --adapter")
    return adapter


def load_person(embeddings: str | Path, adapter, reference=None):
    """The person of an embed-faces output folder (their mean embedding), rendered zero-shot through the
    shared ``adapter`` (:func:`faceid.model.identity.zero_shot`); the embedder must be the adapter's."""
    from faceid.model.identity import zero_shot
    from faceid.train.data import embeddings_sha256, load_embedding

    path = Path(embeddings)
    if not path.is_dir() or not (path / "embeddings.safetensors").is_file():
        raise InputError(f"{path}: with --adapter, an identity is a person's embed-faces output folder "
                         "(holding embeddings.safetensors)")
    embedding, meta = load_embedding(path)
    if meta.get("embedder") != adapter.card["embedder"]:
        raise InputError(f"{path}: embedded with {meta.get('embedder')!r}; the shared adapter {adapter.path} maps "
                         f"{adapter.card['embedder']!r} embeddings (rerun embed-faces with embed_faces.embedder="
                         f"{adapter.card['embedder']})")
    return zero_shot(adapter, embedding, path.name, reference,
                     source={"embeddings": str(path), "embeddings_sha256": embeddings_sha256(path)})


def read_image(path: str | Path) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file; :class:`InputError` when missing or unreadable."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


# crop-faces' rejections that mean "no face to refer to": refused for a --reference-image (a face
# that crop-faces would reject for quality, e.g. blur or yaw, is still a face: accepted)
REFERENCE_REFUSED = ("image_too_small", "blank_image", "no_face")


def read_reference_photo(path: str | Path, crop_cfg) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of a ``--reference-image``, with crop-faces' photo checks
    (``crop_cfg`` = ``params.crop_faces``): readable, at most ``max_image_pixels`` (checked from the
    header, before decoding), any mode read as 8-bit RGB upright, not blank, a face detected.
    :class:`InputError` naming the file and the rule otherwise; runs before any model loads."""
    from faceid.faces.crop import UnreadableImage, crop_face, face_models, load_image
    from faceid.faces.detect import detection_copy

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image not found" + (" (a folder; expected a photo)" if path.is_dir() else ""))
    try:
        image = load_image(path, crop_cfg.max_image_pixels).pixels
    except UnreadableImage as exc:
        key = " (crop_faces.max_image_pixels)" if exc.reason == "image_too_large" else ""
        raise InputError(f"{path}: not usable as a reference image: {exc.detail}{key}") from None
    with face_models(crop_cfg) as (detector, aligner):
        result = crop_face(image, detector, aligner, crop_cfg, detection_copy(image))
    reason = getattr(result, "reason", None)
    if reason in REFERENCE_REFUSED:
        raise InputError(f"{path}: not usable as a reference image: {result.detail}; "
                         "pass a photo of the face, e.g. an aligned crop from crop-faces")
    return image


def reference_image_for(identity: str | Path | None, reference_image: str | Path | None,
                        mlflow_uri: str | None, download_dir: str | Path, crop_cfg=None) -> tuple[np.ndarray, str]:
    """``(image, source path)`` for ``--reference-only``: ``reference_image`` when given (any photo;
    an aligned face crop works best; checked as crop-faces checks photos when ``crop_cfg``, i.e.
    ``params.crop_faces``, is given: :func:`read_reference_photo`), else the identity folder's
    ``reference.png`` (an accepted crop train-lora wrote)."""
    from faceid.model.identity import REFERENCE_FILE

    if reference_image:
        image = read_image(reference_image) if crop_cfg is None else read_reference_photo(reference_image, crop_cfg)
        return image, str(reference_image)
    if not identity:
        raise InputError("--reference-only: expected --reference-image PATH (a face photo) or --identity (its reference.png)")
    path = resolve_identity(identity, mlflow_uri, download_dir) / REFERENCE_FILE
    if not path.is_file():
        raise InputError(f"{identity}: the identity folder has no {REFERENCE_FILE} (folders from before it existed); "
                         "pass --reference-image PATH, e.g. an aligned crop from crop-faces")
    return read_image(path), str(path)


# --------------------------------------------------------------------------- pose videos


def check_pose_video(path: str | Path) -> dict:
    """:func:`faceid.pose.video.probe` of a pose video, refused (:class:`InputError` naming the file,
    its size and the rule) when its frames are larger than the model takes or not multiples of 16:
    read from the container, before any frame is decoded or any model loads."""
    from faceid.model.shapes import check_max_size, check_size
    from faceid.pose.video import probe

    info = probe(path)
    check_max_size(info["height"], info["width"], f"{path} (pose video)")
    check_size(info["height"], info["width"], f"{path} (pose video)")
    return info


def load_pose_video(path: str | Path, policy: str) -> tuple[np.ndarray, float, dict]:
    """``(frames [F, H, W, 3] uint8, fps, info)`` with F = 4n+1 per ``policy``; sizes must be
    multiples of 16 and at most the model's (720p: :func:`faceid.model.shapes.check_max_size`),
    checked on the container before any frame is decoded (no silent resize). ``info`` has
    ``source_frames`` and ``trimmed_frames``. A long video shows a progress bar while it decodes."""
    from faceid.model.shapes import check_size, frames_to_keep
    from faceid.pose.video import read_video

    path = Path(path)
    check_pose_video(path)
    frames, fps = read_video(path)
    num, height, width = frames.shape[:3]
    check_size(height, width, f"{path} (pose video)")
    keep = frames_to_keep(num, policy, where=str(path))
    return frames[:keep], float(fps), {"source_frames": int(num), "trimmed_frames": int(num - keep)}


# --------------------------------------------------------------------------- generation


def out_of_memory_error(exc: BaseException, pose_frames: np.ndarray) -> FaceidError:
    num, height, width = pose_frames.shape[:3]
    return FaceidError(
        f"GPU out of memory generating {num} frames at {height}x{width} ({str(exc).splitlines()[0][:160]}). "
        "Try fewer frames (a shorter pose video or prepare_pose.num_frames=49/33), a smaller size "
        "(prepare_pose.height/width, e.g. 480x832 -> 320x576), or model offload / a larger GPU."
    )


class Generator:
    """The pipeline, built once (per process or Ray worker), and identities, loaded and checked once."""

    def __init__(self, params, mlflow_uri: str | None = None, device=None, identities: dict | None = None,
                 adapter: str | Path | None = None):
        """``identities``: ``{ref: Identity}`` already loaded and checked (:func:`load_identities`).
        ``adapter``: a shared adapter; identity refs are then people's embed-faces outputs (zero-shot).
        ``model.compile``: the transformer's blocks are compiled (on the first video; ``compile_clock``
        times it). Prompts are encoded once per distinct text (``prompts``, kept across videos)."""
        from faceid.model.compiled import CompileClock, compile_blocks
        from faceid.model.generate import PromptCache, build_pipeline

        self.params = params
        self.mlflow_uri = mlflow_uri
        self.adapter = adapter
        self.pipe = build_pipeline(params.model, device=device)
        self._identities: dict[str, Any] = dict(identities or {})
        self._adapter = None
        self.prompts = PromptCache()
        self.compile_clock = None
        self.fused: tuple | None = None  # (identity ref, adapter weight) whose LoRA is in the weights (fuse_identity)
        if params.model.compile:
            compile_blocks(self.pipe.transformer)
            self.compile_clock = CompileClock(self.pipe.transformer)

    def identity(self, ref: str | Path):
        """Load (once, :func:`load_identities`; the shared adapter once for all its people) and check
        against the base model: a mismatch is an :class:`InputError`."""
        key = str(ref)
        if key not in self._identities:
            if self.adapter:
                self._adapter = self._adapter or load_adapter(self.adapter, self.params, self.mlflow_uri)
                self._identities[key] = load_person(ref, self._adapter)
            else:
                self._identities.update(load_identities([ref], self.params, self.mlflow_uri))
        return self._identities[key]

    def conditioning(self, identity: str | Path | None = None, blend: str | list | None = None):
        """What ``generate_video`` takes: one identity, or a blend ``[(Identity, weight), ...]``."""
        if blend:
            pairs = parse_blend(blend) if isinstance(blend, str) else blend
            return [(self.identity(ref), float(w)) for ref, w in pairs]
        if identity is None:
            raise InputError("no identity given (expected --identity or --blend)")
        return self.identity(identity)

    def interpolation(self, a: str | Path, b: str | Path, steps: int) -> list[tuple[float, list]]:
        """``steps`` conditionings from A (t=0) to B (t=1): the slerp of the two embeddings goes
        through each identity's own mapper, tokens and LoRAs mixed with weights (1-t, t). The
        endpoints are exactly the pure identities. ``steps`` >= 2 (``batch_infer.interpolation_steps``,
        checked when params are loaded)."""
        from faceid.model.generate import slerp

        ia, ib = self.identity(a), self.identity(b)
        if ia.card["embed_dim"] != ib.card["embed_dim"] or ia.card["embedder"] != ib.card["embedder"]:
            raise InputError(
                f"--interpolate: {ia.name} ({ia.card['embedder']}, {ia.card['embed_dim']}-D) and {ib.name} "
                f"({ib.card['embedder']}, {ib.card['embed_dim']}-D) use different face embeddings"
            )
        out = []
        for t in np.linspace(0.0, 1.0, steps):
            t = float(t)
            if t == 0.0:
                out.append((t, ia))
            elif t == 1.0:
                out.append((t, ib))
            else:
                emb = slerp(ia.embedding, ib.embedding, t)
                out.append((t, [(dataclasses.replace(ia, embedding=emb), 1.0 - t), (dataclasses.replace(ib, embedding=emb), t)]))
        return out

    def fuse_identity(self, ref: str | Path, settings: Settings) -> bool:
        """With ``model.compile`` (the fast path): merge the LoRA of identity ``ref`` at the strength
        of ``settings`` (face_scale x lora_scale) into the weights, before the first video, for a
        pipeline that renders that identity at that strength only (``faceid infer`` and a batch-infer
        worker of ``--identity``; never blends, interpolation or render-validation's base arm):
        :meth:`generate` refuses anything else. Whether it fused."""
        from faceid.model.generate import activate_loras
        from faceid.model.lora import fuse_lora

        weight = settings.face_scale * settings.lora_scale
        if not self.params.model.compile or weight == 0 or self.fused is not None:
            return False
        (name,) = activate_loras(self.pipe, [(self.identity(ref), 1.0)], weight)
        fuse_lora(self.pipe, name, weight)
        self.fused = (str(ref), weight)
        return True

    def generate(self, conditioning, pose_frames: np.ndarray, prompt: str, settings: Settings,
                 reference_image: np.ndarray | None = None) -> np.ndarray:
        """``generate_video`` with ``settings``, and a clear message on GPU out-of-memory."""
        import torch

        from faceid.model.generate import generate_video

        if self.fused is not None:  # the fused identity at its strength only (fuse_identity)
            ref, weight = self.fused
            if conditioning is not self._identities.get(ref) or settings.face_scale * settings.lora_scale != weight:
                raise FaceidError(f"this pipeline has the LoRA of {ref} fused at weight {weight:g}; it renders that "
                                  "identity at that face_scale x lora_scale only (build another Generator)")
        try:
            return generate_video(
                self.pipe, conditioning, pose_frames, prompt,
                face_scale=settings.face_scale,
                guidance_scale=settings.guidance_scale,
                num_inference_steps=settings.num_inference_steps,
                seed=settings.seed,
                lora_scale=settings.lora_scale,
                reference_image=reference_image,
                prompt_cache=self.prompts,
            )
        except torch.cuda.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise out_of_memory_error(exc, pose_frames) from None


def render_one(generator: Generator, conditioning, pose_video: Path, output: Path, settings: Settings,
               caption: str | None = None, pose: tuple[np.ndarray, float, dict] | None = None,
               reference_image: np.ndarray | None = None) -> dict:
    """Pose video -> ``output`` (atomic). Returns a manifest row: settings, seed, frames, timings,
    whether a VACE reference image was passed. ``pose``: what :func:`load_pose_video` returned,
    when the caller has already read the video."""
    from faceid.io import sha256_file
    from faceid.model.generate import RenderError, as_blend, describe, identity_reference
    from faceid.pose.video import write_video

    t0 = time.perf_counter()
    pose_frames, fps, info = pose or load_pose_video(pose_video, generator.params.batch_infer.frame_count_policy)
    prompt = choose_prompt(settings, caption, generator.params.prepare_pose.default_caption)
    blend = as_blend(conditioning)
    with_reference = reference_image is not None or identity_reference(blend, settings.face_scale) is not None
    encode_s, clock = generator.prompts.encode_s, generator.compile_clock
    compiling = clock is not None and clock.compile_s is None  # this video's first forwards compile
    t1 = time.perf_counter()
    try:
        frames = generator.generate(conditioning, pose_frames, prompt, settings, reference_image=reference_image)
    except RenderError as exc:  # NaN/inf or blank: no file is written
        raise RenderError(f"{pose_video}: {exc}; {output} not written") from None
    if frames.shape != pose_frames.shape:
        raise FaceidError(f"{pose_video}: generated {frames.shape}, expected the pose video's shape {pose_frames.shape}")
    t2 = time.perf_counter()
    write_video(output, frames, fps)
    t3 = time.perf_counter()
    return {
        "pose_video": str(pose_video),
        "output": str(output),
        "identity": describe(conditioning),
        "prompt": prompt,
        # face_scale and lora_scale do not apply without an identity (base model, --reference-only)
        **{k: (None if k in ("face_scale", "lora_scale") and not blend else v)
           for k, v in dataclasses.asdict(settings).items() if k != "prompt"},
        "reference_image": with_reference,
        "num_frames": int(frames.shape[0]),
        "height": int(frames.shape[1]),
        "width": int(frames.shape[2]),
        "fps": float(fps),
        "frames_sha256": hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest(),  # the raw frames
        "output_sha256": sha256_file(output),  # the file (deterministic encoder: equal frames, equal bytes)
        **info,
        "load_s": round(t1 - t0, 4),
        "generate_s": round(t2 - t1, 4),
        "write_s": round(t3 - t2, 4),
        # part of generate_s: encoding prompts not seen before (0: kept from an earlier video), and
        # torch.compile of the blocks (model.compile; the first video only, else None)
        "prompt_encode_s": round(generator.prompts.encode_s - encode_s, 4),
        "compile_s": round(clock.compile_s, 4) if compiling and clock.compile_s is not None else None,
    }


# --------------------------------------------------------------------------- sheets (pure images)


def frames_sheet(videos: list[np.ndarray], num_frames: int = 8, gap: int = 2) -> np.ndarray:
    """One row per video (e.g. pose / base / reference-only / identity) of ``num_frames`` evenly spaced frames."""
    length = min(len(v) for v in videos)
    idx = np.linspace(0, length - 1, min(num_frames, length)).round().astype(int)
    h, w = videos[0].shape[1:3]
    sheet = np.full((len(videos) * (h + gap) - gap, len(idx) * (w + gap) - gap, 3), 255, np.uint8)
    for r, video in enumerate(videos):
        for c, i in enumerate(idx):
            sheet[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = video[i]
    return sheet
