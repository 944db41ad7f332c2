"""Inference core: an identity (or a blend of identities) + a pose video -> a video.

Public API (used by ``faceid.render``, and training's validation renders)::

    pipe = build_pipeline(params.model)                      # WanVACEPipeline on the configured device
    ident = load_identity("out/obama", model_cfg=params.model)
    frames = generate_video(pipe, ident, pose_frames, "a person dancing",
                            face_scale=1.0, lora_scale=1.0, guidance_scale=3.0, num_inference_steps=4, seed=0)
    frames = generate_video(pipe, [(a, 0.5), (b, 0.5)], pose_frames, ...)   # a blend
    frames = generate_video(pipe, None, pose_frames, ...)                   # base model, no identity
    frames = generate_video(pipe, None, pose_frames, ..., reference_image=crop)  # base VACE R2V (no adapter)
    frames = generate_video(pipe, ident, pose_frames, ..., prompt_cache=cache)  # each distinct prompt encoded once

How conditioning is built (the same layout training uses, see ``faceid.train.recipe``):

- cond:   ``prompt_embeds = [text tokens (max_text_len) | face tokens (N)]``
- uncond: ``negative_prompt_embeds = [negative-prompt text tokens | null face (N)]``
- face tokens of a blend ``[(I_1, w_1), ...]`` (weights normalised to sum 1):
  ``tokens = sum_i w_i * mapper_i(e_i)``, ``null = sum_i w_i * null_i``, then
  ``null + face_scale * (tokens - null)``.
- LoRA: each identity's LoRA is loaded as its own adapter and ``pipe.set_adapters(names, weights)``
  activates them with ``weight_i = w_i * face_scale * lora_scale``.
- ``face_scale`` is the identity's strength: it scales the face tokens *and* the LoRA (1 = as
  trained, > 1 extrapolates). ``face_scale == 0`` is the base model exactly: no face tokens in
  either branch, LoRA disabled, no identity reference image, so the frames equal
  ``generate_video(pipe, None, ...)`` with the same seed. ``lora_scale`` (1 = as trained) scales the
  LoRA alone. Both must be finite and >= 0 (:func:`check_scale`); guidance finite and >= 1
  (:func:`check_guidance`), steps 1..1000 (:func:`check_steps`), seed 0..2^63-1 (:func:`check_seed`):
  the same checks run on the params keys at config load and on the command-line flags.
- VACE reference image (R2V): ``reference_image`` is passed as ``reference_images=[PIL image]``
  (the pipeline fits it into the frame size, encodes it as one extra leading latent frame and drops
  that frame after denoising). Without one, an identity trained with its reference
  (``Identity.reference_in_training``, card key ``reference_image.in_training``) passes its own
  ``Identity.reference`` when ``face_scale > 0``; for a blend, that of the *dominant* identity
  (the largest weight, the first one on ties; :func:`dominant`).

For two identities that share one mapper, interpolating their embeddings with :func:`slerp` is the
alternative to mixing; :func:`face_tokens` mixes tokens because each identity has its own mapper.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Union

import numpy as np

from faceid.errors import FaceidError, InputError
from faceid.model.checks import check_guidance, check_scale, check_seed, check_steps
from faceid.model.identity import Identity
from faceid.model.prompts import PromptCache, encode_text, text_len
from faceid.model.shapes import check_video_shape

Blend = list[tuple[Identity, float]]  # identities and their weights (summing to 1)
IdentityOrBlend = Union[Identity, Blend, None]


def build_pipeline(model_cfg, device=None):
    """``WanVACEPipeline`` for ``model_cfg.profile`` on ``device`` (default: ``model.device``);
    transformer and text encoder in the configured dtype, the VAE in float32."""
    from diffusers import WanVACEPipeline

    from faceid.model.base_model import build_components, resolve_device, resolve_dtype
    from faceid.model.memory import apply_memory_options

    device = device or resolve_device(model_cfg)
    pipe = WanVACEPipeline(**build_components(model_cfg, resolve_dtype(model_cfg, device)))
    pipe.to(device)
    apply_memory_options(pipe, model_cfg)  # model.text_encoder_offload / vae_tiling / vae_slicing
    pipe.set_progress_bar_config(leave=False)
    return pipe


def as_blend(identity_or_blend: IdentityOrBlend) -> list[tuple[Identity, float]]:
    """``Identity`` -> ``[(identity, 1.0)]``; a blend -> weights normalised to sum 1; ``None`` -> ``[]``."""
    if identity_or_blend is None:
        return []
    if isinstance(identity_or_blend, Identity):
        return [(identity_or_blend, 1.0)]
    blend = [(ident, float(w)) for ident, w in identity_or_blend]
    total = sum(w for _, w in blend)
    if not blend or not math.isfinite(total) or total <= 0 or any(w < 0 for _, w in blend):
        raise InputError(f"blend: expected identities with non-negative weights summing to > 0, got {[(i.name, w) for i, w in blend]}")
    dims = {(i.card["text_dim"], i.card["num_face_tokens"]) for i, _ in blend}
    if len(dims) > 1:
        raise InputError(f"blend: identities have different face-token shapes {sorted(dims)}; they cannot be mixed")
    return [(ident, w / total) for ident, w in blend]


def dominant(blend: list[tuple[Identity, float]]) -> Identity:
    """The identity of a blend with the largest weight (the first one on ties)."""
    return max(blend, key=lambda pair: pair[1])[0]


def identity_reference(blend: list[tuple[Identity, float]], face_scale: float) -> np.ndarray | None:
    """The VACE reference image an identity brings: ``Identity.reference`` of the (dominant)
    identity when it was trained with it and ``face_scale > 0``; otherwise None."""
    if not blend or face_scale == 0:
        return None
    ident = dominant(blend)
    return ident.reference if ident.reference_in_training else None


def face_tokens(identities: list[tuple[Identity, float]], face_scale: float):
    """``(cond, null)``: ``[1, N, text_dim]`` float32 tensors on CPU.

    ``cond = null + face_scale * (sum_i w_i mapper_i(e_i) - null)`` with ``null = sum_i w_i null_i``;
    weights are normalised to sum 1 (:func:`as_blend`). face_scale 0 gives the null face."""
    import torch

    from faceid.model.mapper import scale_face

    blend = as_blend(identities)
    if not blend:
        raise InputError("face_tokens: no identity given")
    with torch.no_grad():
        tokens = sum(w * ident.mapper(ident.embedding.unsqueeze(0)) for ident, w in blend)
        null = sum(w * ident.mapper.null_tokens(1) for ident, w in blend)
        return scale_face(tokens, null, face_scale), null


def slerp(a, b, t: float):
    """Spherical interpolation of two vectors/tensors (norms interpolated linearly);
    linear interpolation when they are (anti)parallel."""
    import torch

    a_t, b_t = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    na, nb = a_t.norm(), b_t.norm()
    ua, ub = a_t / na.clamp_min(1e-12), b_t / nb.clamp_min(1e-12)
    dot = (ua * ub).sum().clamp(-1.0, 1.0)
    omega = torch.arccos(dot)
    if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
        out = (1 - t) * a_t + t * b_t
    else:
        direction = (torch.sin((1 - t) * omega) * ua + torch.sin(t * omega) * ub) / torch.sin(omega)
        out = direction * ((1 - t) * na + t * nb)
    return out.numpy() if isinstance(a, np.ndarray) else out


def adapter_name(identity: Identity) -> str:
    """A stable adapter name per identity folder (name + short hash of the resolved path); people rendered
    through one shared adapter (``faceid.model.identity.zero_shot``) share its name: one LoRA, loaded once."""
    digest = hashlib.sha256(str(identity.path.resolve()).encode()).hexdigest()[:8]
    name = (identity.card.get("zero_shot") or {}).get("adapter_name", identity.name)
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{digest}"


def activate_loras(pipe, blend: list[tuple[Identity, float]], scale: float = 1.0) -> list[str]:
    """Load each identity's LoRA once (verified, see ``faceid.model.lora.load_lora``) and activate
    exactly these adapters with weights ``blend weight * scale``; an empty blend disables LoRA."""
    from faceid.model.lora import load_lora

    loaded = set(pipe.get_list_adapters().get("transformer", [])) if getattr(pipe.transformer, "peft_config", None) else set()
    if not blend:
        if loaded:
            pipe.disable_lora()
        return []
    weights: dict[str, float] = {}  # people of one shared adapter: one LoRA, their weights summed
    for ident, w in blend:
        name = adapter_name(ident)
        if name not in loaded:
            load_lora(pipe, ident.path, name)
            loaded.add(name)
        weights[name] = weights.get(name, 0.0) + w
    names = list(weights)
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=[weights[n] * scale for n in names])
    return names


def check_reference_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__), getattr(image, "dtype", "")
        raise InputError(f"reference image: expected a uint8 RGB array [H, W, 3], got {got}")
    return image


def check_pose_frames(pose_frames: np.ndarray) -> None:
    if not isinstance(pose_frames, np.ndarray) or pose_frames.ndim != 4 or pose_frames.shape[-1] != 3 or pose_frames.dtype != np.uint8:
        got = getattr(pose_frames, "shape", type(pose_frames).__name__), getattr(pose_frames, "dtype", "")
        raise InputError(f"pose frames: expected a uint8 array [F, H, W, 3], got {got}")
    check_video_shape(*pose_frames.shape[:3], where="pose frames")


def generate_video(
    pipe,
    identity_or_blend: IdentityOrBlend,
    pose_frames: np.ndarray,
    prompt: str,
    *,
    face_scale: float,
    lora_scale: float,
    guidance_scale: float,
    num_inference_steps: int,
    seed: int,
    negative_prompt: str = "",
    reference_image: np.ndarray | None = None,
    prompt_cache: PromptCache | None = None,
) -> np.ndarray:
    """Generate ``[F, H, W, 3]`` uint8 frames following ``pose_frames`` (``[F, H, W, 3]`` uint8,
    F = 4n+1, H and W multiples of 16) with the identity (or blend, or ``None`` for the base
    model). Deterministic for a given ``seed`` (noise drawn on the CPU).

    ``face_scale`` scales face tokens and LoRA (0 = the base model exactly), ``lora_scale`` the
    LoRA alone; 1 and 1 are the identity as trained. The settings have no defaults here: the
    caller's one :class:`faceid.render.Settings` (or its own explicit values) decides. ``reference_image`` (``[H, W, 3]``
    uint8 RGB) goes to VACE as its reference image; without it, an identity trained with its
    reference passes that one (see the module docstring). ``prompt_cache``: a
    :class:`faceid.model.prompts.PromptCache` kept across calls (the same embeddings, each distinct
    text encoded once; ``faceid.render.Generator`` holds one); None encodes both prompts now.

    The output is checked before it is returned: non-finite values (NaN/inf) or a blank video (one
    colour, :func:`blank_render`) raise :class:`RenderError` naming the settings that likely caused it."""
    import torch

    # 1. Check inputs; face_scale 0 leaves no trace of the identity (the base model exactly)
    check_pose_frames(pose_frames)
    face_scale = check_scale("face_scale", face_scale)
    lora_scale = check_scale("lora_scale", lora_scale)
    guidance_scale = check_guidance("guidance_scale", guidance_scale)
    num_inference_steps = check_steps("num_inference_steps", num_inference_steps)
    seed = check_seed("seed", seed)
    blend = as_blend(identity_or_blend)  # checked at face_scale 0 too
    if face_scale == 0:
        blend = []
    if reference_image is None:
        reference_image = identity_reference(blend, face_scale)
    else:
        check_reference_image(reference_image)
    device = pipe._execution_device
    do_cfg = guidance_scale > 1.0

    # 2. Text + face tokens -> prompt embeddings (cond) and negative embeddings (uncond); both prompts
    #    first, in one visit of an offloaded text encoder, which leaves the device before denoising
    #    (texts the cache has seen are reused: no encoder call, no visit)
    cond, uncond = (prompt_cache or PromptCache()).encode(pipe, prompt, negative_prompt if do_cfg else None)
    if blend:
        face, null = face_tokens(blend, face_scale)
        cond = torch.cat([cond, face.to(device, cond.dtype)], dim=1)
        if do_cfg:
            uncond = torch.cat([uncond, null.to(device, uncond.dtype)], dim=1)

    # 3. LoRA adapters of the identities, weights x face_scale x lora_scale (disabled for the base model)
    activate_loras(pipe, blend, face_scale * lora_scale)

    # 4. Denoise with the pose video as VACE control (and the reference image, if any)
    settings = (f"face_scale={face_scale:g}, lora_scale={lora_scale:g}, guidance_scale={guidance_scale:g}, "
                f"num_inference_steps={num_inference_steps}, seed={seed}")
    try:
        frames = denoise(pipe, pose_frames, cond, uncond, num_inference_steps, guidance_scale, seed, reference_image)
    except RenderError as exc:
        raise RenderError(f"{exc}; {likely_cause(settings, bool(blend))}") from None

    # 5. Check the output: a blank video is an error, not a result
    blank = blank_render(frames)
    if blank:
        raise RenderError(f"the render is blank ({blank}); {likely_cause(settings, bool(blend))}")
    return frames


class RenderError(FaceidError):
    """The model's output is not a video: non-finite values, or blank (one colour)."""


BLANK_STD = 1.0  # grey levels (0-255): a render whose pixels vary less than this over all frames is one colour


def check_finite(out: np.ndarray) -> np.ndarray:
    """``out`` (the pipeline's float frames); :class:`RenderError` when any value is NaN or inf
    (which the conversion to uint8 would turn into black)."""
    bad = ~np.isfinite(out)
    if bad.any():
        raise RenderError(f"the model produced non-finite values (NaN/inf) in {int(bad.sum())} of {bad.size} output values")
    return out


def blank_render(frames: np.ndarray) -> str:
    """Why ``frames`` (``[F, H, W, 3]`` uint8) is blank, or "" when it is not: every pixel of every
    frame (almost) one colour, std of the values < :data:`BLANK_STD` grey levels."""
    std = float(np.asarray(frames, dtype=np.float32).std())
    if std >= BLANK_STD:
        return ""
    colour = tuple(int(round(c)) for c in np.asarray(frames).reshape(-1, 3).mean(0))
    what = "black" if max(colour) <= 2 else f"one colour, RGB {colour}"
    return f"every frame is {what}: std {std:.2f} < {BLANK_STD:g} grey levels"


def likely_cause(settings: str, with_identity: bool) -> str:
    """What to try after a broken render, naming the settings used."""
    scales = "a face_scale or lora_scale far above 1, " if with_identity else ""
    return (f"settings {settings}. Likely causes: {scales}a very high guidance_scale, or broken weights "
            "(a diverged identity); try face_scale=1 lora_scale=1 and the default guidance_scale")


def denoise(pipe, pose_frames: np.ndarray, cond, uncond, num_inference_steps: int, guidance_scale: float, seed: int,
            reference_image: np.ndarray | None = None) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 frames from prompt embeddings ``cond`` (and ``uncond`` for CFG, else
    None) with ``pose_frames`` as VACE control: noise drawn on the CPU from ``seed``. Values as
    checked by :func:`generate_video` (which calls it; so does training's validation renderer)."""
    import torch
    from PIL import Image

    num_frames, height, width, _ = pose_frames.shape
    dtype = pipe.transformer.dtype
    out = pipe(
        video=[Image.fromarray(frame) for frame in pose_frames],
        reference_images=None if reference_image is None else [Image.fromarray(reference_image)],
        prompt_embeds=cond.to(dtype),
        negative_prompt_embeds=None if uncond is None else uncond.to(dtype),
        height=height,
        width=width,
        num_frames=num_frames,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).frames[0]
    out = check_finite(np.asarray(out, dtype=np.float32))
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def describe(identity_or_blend: IdentityOrBlend) -> str:
    """Human-readable label: ``obama`` / ``a=0.70,b=0.30`` / ``base``."""
    blend = as_blend(identity_or_blend)
    if not blend:
        return "base"
    if len(blend) == 1:
        return blend[0][0].name
    return ",".join(f"{i.name}={w:.2f}" for i, w in blend)


__all__: list[Any] = [
    "build_pipeline", "encode_text", "text_len", "PromptCache", "as_blend", "check_scale", "check_guidance", "check_steps",
    "check_seed", "dominant", "identity_reference",
    "face_tokens", "slerp", "adapter_name", "activate_loras", "check_reference_image", "check_pose_frames",
    "generate_video", "denoise", "describe", "RenderError", "check_finite", "blank_render",
]
