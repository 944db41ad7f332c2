"""``faceid infer``: one pose video + a trained identity (or a blend) -> one generated video.

Building blocks shared with ``faceid.batch`` (Ray Data workers) and ``faceid.validate``:

- :func:`resolve_identity` — an identity folder or ``models:/faceid-<name>@<alias>`` -> a local folder.
- :func:`load_identities` — resolve, load and check identities before any model is built.
- :func:`parse_blend` / :func:`parse_interpolate` — ``a=0.7,b=0.3`` / ``a,b`` from the command line.
- :func:`load_pose_video` — read, check size (multiples of 16) and apply the 4n+1 frame policy.
- :func:`reference_image_for` — the photo of ``--reference-only`` (``--reference-image`` or the
  identity folder's ``reference.png``).
- :class:`Generator` — the pipeline built once, identities loaded (and compatibility-checked) once.
- :func:`render_one` — pose video -> output file, with timings; catches GPU out-of-memory.

Settings left as ``None`` come from ``params.batch_infer`` (one place for defaults): the values
travel as one :class:`Settings` down to ``generate_video`` and are not overridden on the way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from faceid.errors import FaceidError, InputError

MODELS_PREFIX = "models:/"


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    face_scale: float  # identity strength: face tokens and LoRA (0 = the base model exactly)
    lora_scale: float  # the LoRA alone (adapter weight = blend weight x face_scale x lora_scale)
    guidance_scale: float
    num_inference_steps: int
    seed: int
    prompt: str  # "" = the clip caption / prepare_pose.default_caption


def settings_from(params, *, face_scale=None, lora_scale=None, guidance_scale=None, num_inference_steps=None,
                  seed=None, prompt=None) -> Settings:
    """Explicit values (the command-line flags) win; ``None`` means the value in ``params.batch_infer``.
    Every value is checked (finite, in range; ``faceid.model.generate.check_*``), the error naming the
    flag or the key: face_scale and lora_scale >= 0, guidance >= 1, steps 1..1000, seed 0..2^63-1."""
    from faceid.model.generate import check_guidance, check_scale, check_seed, check_steps

    cfg = params.batch_infer

    def pick(check, value, flag: str, key: str):
        return check(f"batch_infer.{key}", getattr(cfg, key)) if value is None else check(flag, value)

    return Settings(
        face_scale=pick(check_scale, face_scale, "--face-scale", "face_scale"),
        lora_scale=pick(check_scale, lora_scale, "--lora-scale", "lora_scale"),
        guidance_scale=pick(check_guidance, guidance_scale, "--cfg-scale", "guidance_scale"),
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


def resolve_identity(ref: str | Path, mlflow_uri: str | None = None) -> Path:
    """An identity folder, or ``models:/faceid-<name>@<alias>`` (or ``/<version>``) downloaded from
    the MLflow registry (the registered model holds ``artifacts/<identity folder>``)."""
    ref = str(ref)
    if not ref.startswith(MODELS_PREFIX):
        path = Path(ref)
        if not path.is_dir():
            raise InputError(f"{path}: identity folder not found (expected a train-lora output folder or models:/faceid-<name>@<alias>)")
        return path
    import mlflow

    if mlflow_uri:
        mlflow.set_tracking_uri(mlflow_uri)
        mlflow.set_registry_uri(mlflow_uri)
    dst = tempfile.mkdtemp(prefix="faceid-identity-")
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=dst))
    except Exception as exc:  # MlflowException / RestException: unknown model, alias or version
        raise InputError(
            f"{ref}: cannot load from the MLflow registry at {mlflow_uri or mlflow.get_tracking_uri()} "
            f"({str(exc).splitlines()[0][:200]}); check the name faceid-<identity> and the alias (candidate/validated)"
        ) from None
    cards = sorted(local.rglob("identity.json"))
    if len(cards) != 1:
        raise InputError(f"{ref}: expected one identity folder (with identity.json) in the registered model, found {len(cards)}")
    return cards[0].parent


def load_identities(refs: list[str | Path], params, mlflow_uri: str | None = None) -> dict[str, Any]:
    """``{ref: Identity}``: each identity folder or registry name resolved, loaded and checked against
    the base model (``params.model``), before any model is built (a missing one fails in a moment)."""
    from faceid.model.identity import load_identity

    return {str(ref): load_identity(resolve_identity(ref, mlflow_uri), model_cfg=params.model) for ref in refs}


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


def reference_image_for(identity: str | Path | None, reference_image: str | Path | None,
                        mlflow_uri: str | None = None) -> tuple[np.ndarray, str]:
    """``(image, source path)`` for ``--reference-only``: ``reference_image`` when given (any photo;
    an aligned face crop works best), else the identity folder's ``reference.png``."""
    from faceid.model.identity import REFERENCE_FILE

    if reference_image:
        return read_image(reference_image), str(reference_image)
    if not identity:
        raise InputError("--reference-only: expected --reference-image PATH (a face photo) or --identity (its reference.png)")
    path = resolve_identity(identity, mlflow_uri) / REFERENCE_FILE
    if not path.is_file():
        raise InputError(f"{identity}: the identity folder has no {REFERENCE_FILE} (folders from before it existed); "
                         "pass --reference-image PATH, e.g. an aligned crop from crop-faces")
    return read_image(path), str(path)


# --------------------------------------------------------------------------- pose videos


def frames_to_keep(num_frames: int, policy: str, where: str = "pose video") -> int:
    """Wan needs 4n+1 frames. ``fix``: the largest 4n+1 <= F (trailing frames dropped);
    ``reject``: :class:`InputError` unless F is already 4n+1."""
    if num_frames < 5:
        raise InputError(f"{where}: {num_frames} frames; at least 5 (4n+1) are needed")
    keep = (num_frames - 1) // 4 * 4 + 1
    if keep != num_frames and policy == "reject":
        raise InputError(
            f"{where}: {num_frames} frames is not 4n+1 (e.g. {keep} or {keep + 4}); trim the video or set "
            "batch_infer.frame_count_policy=fix to drop the trailing frames"
        )
    return keep


def load_pose_video(path: str | Path, policy: str) -> tuple[np.ndarray, float, dict]:
    """``(frames [F, H, W, 3] uint8, fps, info)`` with F = 4n+1 per ``policy``; sizes must be
    multiples of 16 (no silent resize). ``info`` has ``source_frames`` and ``trimmed_frames``."""
    from faceid.pose.video import read_video

    path = Path(path)
    frames, fps = read_video(path)
    num, height, width = frames.shape[:3]
    if height % 16 or width % 16:
        raise InputError(
            f"{path}: {height}x{width} pose video; height and width must be multiples of 16 "
            "(prepare-pose writes such clips, e.g. 480x832)"
        )
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

    def __init__(self, params, mlflow_uri: str | None = None, device=None, identities: dict | None = None):
        """``identities``: ``{ref: Identity}`` already loaded and checked (:func:`load_identities`)."""
        from faceid.model.generate import build_pipeline

        self.params = params
        self.mlflow_uri = mlflow_uri
        self.pipe = build_pipeline(params.model, device=device)
        self._identities: dict[str, Any] = dict(identities or {})

    def identity(self, ref: str | Path):
        """Load (once) and check against the base model: a mismatch is an :class:`InputError`."""
        from faceid.model.identity import load_identity

        key = str(ref)
        if key not in self._identities:
            self._identities[key] = load_identity(resolve_identity(ref, self.mlflow_uri), model_cfg=self.params.model)
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
        endpoints are exactly the pure identities."""
        from faceid.model.generate import slerp

        if steps < 2:
            raise InputError(f"batch_infer.interpolation_steps: expected >= 2, got {steps}")
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

    def generate(self, conditioning, pose_frames: np.ndarray, prompt: str, settings: Settings,
                 reference_image: np.ndarray | None = None) -> np.ndarray:
        """``generate_video`` with ``settings``, and a clear message on GPU out-of-memory."""
        import torch

        from faceid.model.generate import generate_video

        try:
            return generate_video(
                self.pipe, conditioning, pose_frames, prompt,
                face_scale=settings.face_scale,
                guidance_scale=settings.guidance_scale,
                num_inference_steps=settings.num_inference_steps,
                seed=settings.seed,
                lora_scale=settings.lora_scale,
                reference_image=reference_image,
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
    from faceid.model.generate import as_blend, describe, identity_reference
    from faceid.pose.video import write_video

    t0 = time.perf_counter()
    pose_frames, fps, info = pose or load_pose_video(pose_video, generator.params.batch_infer.frame_count_policy)
    prompt = choose_prompt(settings, caption, generator.params.prepare_pose.default_caption)
    blend = as_blend(conditioning)
    with_reference = reference_image is not None or identity_reference(blend, settings.face_scale) is not None
    t1 = time.perf_counter()
    frames = generator.generate(conditioning, pose_frames, prompt, settings, reference_image=reference_image)
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
        # of the raw frames: H.264 files of equal frames may differ across processes (encoder threads)
        "frames_sha256": hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest(),
        **info,
        "load_s": round(t1 - t0, 4),
        "generate_s": round(t2 - t1, 4),
        "write_s": round(t3 - t2, 4),
    }


# --------------------------------------------------------------------------- entry point


def infer_one(
    params,
    identity: str | Path | None,
    pose_video: Path,
    output: Path,
    face_scale: float | None = None,
    guidance_scale: float | None = None,
    num_inference_steps: int | None = None,
    seed: int | None = None,
    prompt: str | None = None,
    blend: str | None = None,
    mlflow_uri: str | None = None,
    lora_scale: float | None = None,
    reference_only: bool = False,
    reference_image: str | Path | None = None,
    lock_wait: float = 0.0,
) -> dict:
    """Generate ``output`` (MP4, the pose video's frame count/size/fps) for ``identity`` (a folder
    or ``models:/`` URI) or a ``blend`` (``a=0.7,b=0.3``, which replaces ``identity``).

    ``reference_only``: the training-free baseline, base VACE R2V with no adapter and no face
    tokens; the reference image is ``reference_image`` (a photo) or the identity's reference.png.
    Every input is checked before the model is built. ``lock_wait``: seconds to wait for another
    run writing ``output`` (:func:`faceid.io.output_lock`)."""
    from faceid.io import output_lock

    # 1. Check inputs before building the model: output, flags, identities (folders or registry
    #    names, checked against the base model), the pose video (trimmed to 4n+1: said, not silent)
    output = Path(output)
    if output.suffix.lower() != ".mp4":
        raise InputError(f"{output}: the output must be an .mp4 file")
    reference = None
    if reference_only:
        given = [flag for flag, value in (("--blend", blend), ("--face-scale", face_scale), ("--lora-scale", lora_scale))
                 if value is not None]
        if given:
            raise InputError(f"--reference-only uses no identity adapter: {', '.join(given)} cannot be combined with it")
        reference, reference_source = reference_image_for(identity, reference_image, mlflow_uri)
    elif reference_image is not None:
        raise InputError("--reference-image is the photo of --reference-only (an identity brings its own reference)")
    settings = settings_from(params, face_scale=face_scale, lora_scale=lora_scale, guidance_scale=guidance_scale,
                             num_inference_steps=num_inference_steps, seed=seed, prompt=prompt)
    pairs = parse_blend(blend) if blend else None
    refs = [] if reference_only else [ref for ref, _ in pairs] if pairs else [identity] if identity else []
    if not reference_only and not refs:
        raise InputError("infer: expected --identity, --blend or --reference-only")
    identities = load_identities(refs, params, mlflow_uri)
    t0 = time.perf_counter()
    pose = load_pose_video(pose_video, params.batch_infer.frame_count_policy)
    load_s = time.perf_counter() - t0
    info = pose[2]
    if info["trimmed_frames"]:
        print(f"faceid infer: {pose_video}: {info['source_frames']} frames trimmed to {len(pose[0])} (Wan needs 4n+1; "
              f"batch_infer.frame_count_policy=fix drops the last {info['trimmed_frames']}, =reject refuses)")

    with output_lock("infer", output, lock_wait):
        # 2. Model and identity (loaded in step 1); none for --reference-only
        t0 = time.perf_counter()
        generator = Generator(params, mlflow_uri=mlflow_uri, identities=identities)
        conditioning = None if reference_only else generator.conditioning(identity, pairs)
        setup_s = time.perf_counter() - t0

        # 3. Generate and write (the pose video read in step 1)
        row = render_one(generator, conditioning, Path(pose_video), output, settings, pose=pose, reference_image=reference)
    row.update(load_s=round(load_s, 4), setup_s=round(setup_s, 4))
    if reference_only:
        row.update(identity="reference-only", reference_source=reference_source)
    who = f"reference-only ({reference_source})" if reference_only else f"identity {row['identity']}"
    print(f"faceid infer: wrote {output} ({row['num_frames']} frames {row['height']}x{row['width']} @ {row['fps']:g} fps, "
          f"{who}, {row['generate_s']:.1f} s)")
    return row
