"""One config source: ``params.yaml`` (a section per stage) parsed into frozen dataclasses.

Values live in ``params.yaml`` only (no defaults here: every key is required, so there is one
place to read and DVC tracks every value). ``params.yaml`` in the repository root is the demo
configuration (tiny profile, CPU). ``load_params(path, overrides=["train_lora.stage1.steps=5",
"@configs/wan2.1-vace-1.3b.yaml"])`` returns a validated :class:`Params`; every mistake names the
key and the expected value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from faceid.errors import ConfigError

# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SampleDataConfig:
    """``faceid sample-data``: a deterministic sample identity and dance videos."""

    # sdist of face_recognition 1.3.0 (PyPI); its tests/test_images hold real photos.
    photo_archive: str
    num_videos: int
    video_seconds: float
    video_fps: int
    video_height: int
    video_width: int
    seed: int


@dataclass(frozen=True)
class TinyModelConfig:
    """A randomly initialised tiny Wan-VACE (built from config, fixed seed)."""

    num_attention_heads: int
    attention_head_dim: int
    text_dim: int
    freq_dim: int
    ffn_dim: int
    num_layers: int
    vace_layers: tuple[int, ...]
    vae_base_dim: int
    text_encoder_dim: int
    text_encoder_layers: int
    vocab_size: int
    max_text_len: int
    seed: int


@dataclass(frozen=True)
class ModelConfig:
    profile: Literal["tiny", "wan2.1-vace-1.3b"]
    # Local diffusers-format folder for the real profile (transformer/, vae/, text_encoder/, tokenizer/, scheduler/).
    weights_dir: str
    # auto: bfloat16 on CUDA, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    device: Literal["auto", "cpu", "cuda"]
    max_text_len: int
    flow_shift: float
    # Memory (faceid.model.memory): the text encoder lives on the CPU and visits the device only to
    # encode prompts (UMT5-XXL is 11 GB in bf16); the VAE encodes/decodes in spatial tiles
    # (tiling) or one video of a batch at a time (slicing, batches > 1 only).
    text_encoder_offload: bool
    vae_tiling: bool
    vae_slicing: bool
    # Speed (faceid.model.compiled): torch.compile of the transformer's repeated blocks (regional
    # compilation) in the pipelines that render (infer, batch-infer, render-validation; training does not
    # compile). Compiled once per process / batch-infer worker on its first video; the time is reported.
    compile: bool
    tiny: TinyModelConfig


@dataclass(frozen=True)
class CropFacesConfig:
    detector: Literal["mediapipe", "dlib-hog"]
    min_detection_confidence: float
    min_face_size: int  # pixels, shorter side of the detected box
    min_sharpness: float  # Laplacian variance of the aligned 150px crop
    max_yaw_degrees: float
    duplicate_max_distance: int  # Hamming distance of 64-bit perceptual hashes
    crop_sizes: tuple[int, ...]
    crop_padding: float
    max_image_pixels: int
    min_photos: int
    # Long side (px) of the upright copy of each accepted photo (photos/<name>.png); 0 = full size, else >= 256.
    photo_max_side: int


@dataclass(frozen=True)
class EmbedFacesConfig:
    # dlib (offline default) | arcface-onnx | clip | dinov2 | dinov3 (docs/embedders.md)
    embedder: Literal["dlib", "arcface-onnx", "clip", "dinov2", "dinov3"]
    # ONNX file (arcface-onnx) or a local transformers folder with config.json (clip: CLIPVisionModelWithProjection,
    # dinov2: Dinov2Model, dinov3: DINOv3ViTModel); never a hub id, nothing is downloaded
    model_path: str
    # Same-person threshold on pairwise cosine similarity (photos grouped by average linkage; faceid.faces.embed);
    # 0 = the embedder's default (calibrated for dlib only; calibrate the others: docs/embedders.md).
    outlier_threshold: float
    min_photos: int


@dataclass(frozen=True)
class PreparePoseConfig:
    estimator: Literal["mediapipe", "onnx"]
    onnx_path: str
    fps: int
    num_frames: int  # 4n+1: 81 for real runs; 49/33/17 allowed
    height: int  # multiple of 16: 480x832 / 832x480 for real runs
    width: int
    stride: int  # frames between clip starts; 0 = num_frames (no overlap)
    max_clips_per_video: int  # 0 = no limit
    min_pose_detection_rate: float
    default_caption: str
    person_aware_crop: bool
    face_samples: int  # frames per clip whose face region (source resolution) goes to faces.npz; 0 = off
    workers: int  # clip makers: 0 = one per CPU (Ray cluster, local Ray, or local worker processes: pose.clips.where_to_make); 1 = in this process, no Ray


@dataclass(frozen=True)
class StageConfig:
    steps: int
    learning_rate: float
    warmup_steps: int


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: int
    dropout: float
    # main-cross-attn | main-attn | main-attn-ffn | vace-attn | all-attn (faceid/model/lora.py)
    targets: Literal["main-cross-attn", "main-attn", "main-attn-ffn", "vace-attn", "all-attn"]


@dataclass(frozen=True)
class PhotoExamplesConfig:
    """Identity photos as 1-frame training examples (``train_lora.photos``)."""

    default_caption: str  # when a photo has no <stem>.txt caption sidecar
    views: int  # cached views per photo: view 0 as is, the others augmented (flip, scale/shift jitter)
    flip: bool  # mirror some augmented views (pose redrawn with left/right swapped)
    scale_jitter: float  # relative zoom of the crop window, +-
    shift_jitter: float  # shift of the crop window, +- this share of its size
    # Extra views per photo, zoomed out so the face is as small as in the clips (faceid.train.plan):
    # view k's face height is the (k + 0.5) / n quantile of the clips' face heights; 0 = none.
    small_face_views: int


@dataclass(frozen=True)
class ScheduleConfig:
    """How many steps each stage trains (``train_lora.schedule``; ``faceid.train.plan.resolve_schedule``)."""

    # fixed: stage1.steps and stage2.steps as written; per_photo: from the number of training photos,
    # with stageN.steps as each stage's cap
    mode: Literal["fixed", "per_photo"]
    steps_per_photo: int  # per_photo: identity-example draws per training photo, both stages together
    stage1_share: float  # per_photo: share of those draws in stage 1 (the mapper alone)
    min_steps: int  # per_photo: the fewest steps a stage trains (below its cap)


@dataclass(frozen=True)
class ValidationConfig:
    """Validation during training (``train_lora.validation``; ``faceid.train.validation``)."""

    # Steps between held-out losses (also at step 0 and the last step); validate_every and render_every
    # both 0 = validation off: nothing is held out and the last step is kept.
    validate_every: int
    # photos never trained on (identity loss), when at least faceid.train.validation.MIN_TRAINING_PHOTOS
    # stay in training; else (or 0) the last augmented view of every photo is held out instead
    holdout_photos: int
    num_timesteps: int  # fixed, evenly spaced timesteps (with fixed noise) of the held-out loss
    render_every: int  # steps between renders of held-out poses (identity and face_scale 0) + FaceSim; 0 = off
    num_clips: int  # held-out clips rendered (<= train_lora.holdout_clips), with render_validation's settings
    # auto: FaceSim of the renders once a face is detected in them, else the held-out identity loss
    criterion: Literal["auto", "facesim", "identity_loss"]
    patience: int  # validations without improvement that stop a stage; 0 = never stop early
    keep: Literal["best", "last"]  # the identity folder holds this step (the other goes to <identity>/last/)


@dataclass(frozen=True)
class TrainLoraConfig:
    num_face_tokens: int
    mapper_hidden_dim: int  # 0 = text_dim
    lora: LoraConfig
    stage1: StageConfig
    stage2: StageConfig
    batch_size: int
    grad_clip: float  # max gradient norm; 0 = no clipping
    weight_decay: float
    seed: int
    checkpoint_every: int
    num_workers: int
    use_gpu: bool
    gradient_checkpointing: bool
    face_dropout: float  # probability of training a step with the null face (for CFG)
    holdout_clips: int  # last N clips (by clip_id) kept out of training for render_validation
    cache_dir: str  # latent cache (VAE latents + text embeddings per example, keyed by content + geometry + model)
    # Stage 2: share of samples drawn from identity examples (photos + clips that show the identity);
    # the rest are prior clips trained with the null face. Stage 1 trains on identity examples only.
    identity_share: float
    # FaceSim (cosine) at or above which a clip counts as showing the identity; 0 = the embedder's
    # calibrated same-person threshold (faceid.faces.embed.DEFAULT_OUTLIER_THRESHOLDS).
    clip_identity_threshold: float
    photos: PhotoExamplesConfig
    schedule: ScheduleConfig
    face_loss_weight: float  # loss weight of latent tokens inside the face box (identity examples); 1 = uniform
    timestep_sampling: Literal["uniform", "logit_normal", "mid_weighted"]
    reference_image: bool  # pass the identity's best aligned crop as VACE reference_images (train + inference)
    validation: ValidationConfig
    # train-lora --init-from <shared adapter>: both stages' resolved steps times this (the adapter already
    # reads faces: a short run adapts it to the person; faceid.train.shared)
    init_from_share: float


@dataclass(frozen=True)
class TrainSharedConfig:
    """``faceid train-shared``: one adapter trained on many people (``faceid.train.shared``); the recipe,
    loss, LoRA, schedule and validation settings are train_lora's."""

    name: str  # the adapter's name: the card's, and the registered model faceid-<name>
    holdout_identities: int  # whole people (the last by name) kept out of training: zero-shot validation


@dataclass(frozen=True)
class GateConfig:
    # FaceSim(identity) must be >= this; 0 = the embedder's same-person threshold
    # (faceid.faces.embed.outlier_threshold: embed_faces.outlier_threshold or the embedder's calibrated default)
    min_facesim: float
    min_facesim_gain: float  # FaceSim(identity) - FaceSim(base) must be >= this
    min_face_detection_rate: float  # share of the identity videos' frames with a detected face must be >= this
    min_pose_pck: float
    tolerance: float  # FaceSim(identity) must be >= FaceSim(reference_only) - this
    # with several people (render-validation --adapter): share of the gated arm's renders whose mean face
    # embedding is closest to their own person's among all the people must be >= this
    min_retrieval: float


@dataclass(frozen=True)
class RenderValidationConfig:
    num_clips: int
    num_inference_steps: int
    guidance_scale: float
    face_scale: float
    seed: int
    gate: GateConfig


@dataclass(frozen=True)
class BatchInferConfig:
    num_inference_steps: int
    guidance_scale: float
    face_scale: float  # identity strength: face tokens and LoRA (0 = the base model exactly)
    lora_scale: float  # the LoRA alone: adapter weight = blend weight x face_scale x lora_scale
    seed: int
    prompt: str  # "" = the caption of each clip / prepare_pose.default_caption
    num_workers: int
    use_gpu: bool
    frame_count_policy: Literal["fix", "reject"]
    interpolation_steps: int


@dataclass(frozen=True)
class TrackingConfig:
    # "" = the local store below; MLFLOW_TRACKING_URI (read by the CLI entry point) or --mlflow-uri override it.
    mlflow_uri: str
    local_store: str
    experiment: str
    register_alias: str
    validated_alias: str
    download_dir: str  # models:/ identities, downloaded once per registry version


@dataclass(frozen=True)
class RayConfig:
    address: str  # "" = start a local Ray; "auto" or ray://host:10001 for a cluster
    num_cpus: int  # local Ray only; 0 = all cores
    storage_path: str


@dataclass(frozen=True)
class PipelineConfig:
    pipeline_root: str


@dataclass(frozen=True)
class Params:
    sample_data: SampleDataConfig
    model: ModelConfig
    crop_faces: CropFacesConfig
    embed_faces: EmbedFacesConfig
    prepare_pose: PreparePoseConfig
    train_lora: TrainLoraConfig
    train_shared: TrainSharedConfig
    render_validation: RenderValidationConfig
    batch_infer: BatchInferConfig
    tracking: TrackingConfig
    ray: RayConfig
    pipeline: PipelineConfig




# --------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - programming error


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    where = f"{prefix}." if prefix else ""
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"expected keys of {prefix or 'the top level'}: {', '.join(names)}"
        )
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"missing key(s) {', '.join(where + k for k in missing)} (every key is required; see params.yaml)")
    kwargs = {name: _coerce(data[name], hints[name], where + name) for name in names}
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    """Cross-field rules that a type alone does not express."""
    if isinstance(obj, CropFacesConfig) and obj.photo_max_side != 0 and obj.photo_max_side < 256:
        raise ConfigError(f"{prefix}.photo_max_side: expected 0 (full size) or >= 256 px, got {obj.photo_max_side}")
    if isinstance(obj, PreparePoseConfig):
        from faceid.model.shapes import MIN_FRAMES, SIZE_MULTIPLE, valid_num_frames, valid_side

        if not valid_num_frames(obj.num_frames, MIN_FRAMES):
            raise ConfigError(f"{prefix}.num_frames: expected 4n+1 (e.g. 17, 33, 49, 81), got {obj.num_frames}")
        for name in ("height", "width"):
            v = getattr(obj, name)
            if not valid_side(v):
                raise ConfigError(f"{prefix}.{name}: expected a positive multiple of {SIZE_MULTIPLE}, got {v}")
        if obj.face_samples < 0:
            raise ConfigError(f"{prefix}.face_samples: expected >= 0 (0 = no face regions), got {obj.face_samples}")
        if obj.workers < 0:
            raise ConfigError(f"{prefix}.workers: expected >= 0 (0 = one per CPU, 1 = in this process), got {obj.workers}")
    if isinstance(obj, LoraConfig) and obj.rank <= 0:
        raise ConfigError(f"{prefix}.rank: expected a positive integer, got {obj.rank}")
    if isinstance(obj, TrainLoraConfig):
        if obj.holdout_clips < 0:
            raise ConfigError(f"{prefix}.holdout_clips: expected >= 0, got {obj.holdout_clips}")
        if not 0.0 < obj.identity_share <= 1.0:
            raise ConfigError(f"{prefix}.identity_share: expected a share in (0, 1], got {obj.identity_share}")
        if not 0.0 <= obj.clip_identity_threshold < 1.0:
            raise ConfigError(f"{prefix}.clip_identity_threshold: expected a cosine in [0, 1) (0 = calibrated default), "
                              f"got {obj.clip_identity_threshold}")
        if not obj.face_loss_weight >= 1.0:
            raise ConfigError(f"{prefix}.face_loss_weight: expected >= 1 (1 = uniform loss), got {obj.face_loss_weight}")
        v = obj.validation
        if v.render_every and v.num_clips > obj.holdout_clips:
            raise ConfigError(f"{prefix}.validation.num_clips: renders need held-out clips, but num_clips={v.num_clips} > "
                              f"{prefix}.holdout_clips={obj.holdout_clips}; raise holdout_clips or set render_every: 0")
    if isinstance(obj, ValidationConfig):
        _validate_validation(obj, prefix)
    if isinstance(obj, PhotoExamplesConfig):
        if obj.views < 1:
            raise ConfigError(f"{prefix}.views: expected >= 1 (1 = no augmentation), got {obj.views}")
        for name in ("scale_jitter", "shift_jitter"):
            if not 0.0 <= getattr(obj, name) < 0.5:
                raise ConfigError(f"{prefix}.{name}: expected a value in [0, 0.5), got {getattr(obj, name)}")
    if isinstance(obj, StageConfig) and obj.steps < 0:
        raise ConfigError(f"{prefix}.steps: expected >= 0, got {obj.steps}")
    if isinstance(obj, (BatchInferConfig, RenderValidationConfig)):
        _validate_generation(obj, prefix)
    _validate_ranges(obj, prefix)
    if isinstance(obj, (StageConfig, TrainLoraConfig)):
        _validate_trains(obj, prefix)


def _validate_validation(obj: ValidationConfig, prefix: str) -> None:
    for name in ("validate_every", "holdout_photos", "render_every", "patience"):
        if getattr(obj, name) < 0:
            raise ConfigError(f"{prefix}.{name}: expected >= 0 (0 = off), got {getattr(obj, name)}")
    if not 1 <= obj.num_timesteps <= 1000:
        raise ConfigError(f"{prefix}.num_timesteps: expected 1..1000 (fixed timesteps of the held-out loss), "
                          f"got {obj.num_timesteps}")
    if obj.num_clips < 1:
        raise ConfigError(f"{prefix}.num_clips: expected >= 1, got {obj.num_clips}")
    if obj.criterion == "facesim" and not obj.render_every:
        raise ConfigError(f"{prefix}.criterion: facesim is measured on renders, but render_every is 0; "
                          "set render_every > 0 or criterion: auto | identity_loss")
    if obj.patience and not (obj.validate_every or obj.render_every):
        raise ConfigError(f"{prefix}.patience: early stop counts validations, but validate_every and render_every are 0")


def _validate_generation(obj: Any, prefix: str) -> None:
    """The values ``generate_video`` takes, finite and in range: the same checks as the command-line
    flags and ``generate_video`` itself (``faceid.model.checks``), at config load."""
    from faceid.errors import InputError
    from faceid.model.checks import check_guidance, check_scale, check_seed, check_steps

    checks = [("num_inference_steps", check_steps), ("guidance_scale", check_guidance), ("face_scale", check_scale),
              ("seed", check_seed)]
    if isinstance(obj, BatchInferConfig):
        checks.append(("lora_scale", check_scale))
    try:
        for key, check in checks:
            check(f"{prefix}.{key}", getattr(obj, key))
    except InputError as exc:
        raise ConfigError(str(exc)) from None
    if isinstance(obj, BatchInferConfig) and obj.interpolation_steps < 2:
        raise ConfigError(f"{prefix}.interpolation_steps: expected >= 2 (A, ..., B), got {obj.interpolation_steps}")


# Ranges of single keys: field -> (what is expected, test). Checked after the rules above, then every
# float key must be finite (nan/inf in YAML: .nan, .inf, 1e999).
_GE0, _GE1 = (">= 0", lambda v: v >= 0), (">= 1", lambda v: v >= 1)
_GT0 = ("a number > 0", lambda v: v > 0)
_UNIT = ("a value in [0, 1]", lambda v: 0 <= v <= 1)
_SHARE = ("a probability in [0, 1)", lambda v: 0 <= v < 1)
_EVEN = ("a positive even number of pixels (H.264 needs even sides)", lambda v: v > 0 and v % 2 == 0)
_PATH = ("a non-empty path", lambda v: bool(v.strip()))
_NAME = ("a non-empty name", lambda v: bool(v.strip()))
_RANGES: dict[type, dict[str, tuple[str, Any]]] = {
    SampleDataConfig: {"num_videos": _GE1, "video_seconds": _GT0, "video_fps": _GE1, "video_height": _EVEN,
                       "video_width": _EVEN, "seed": _GE0},
    TinyModelConfig: {**{k: _GE1 for k in ("num_attention_heads", "attention_head_dim", "text_dim", "freq_dim", "ffn_dim",
                                          "num_layers", "vae_base_dim", "text_encoder_dim", "text_encoder_layers",
                                          "vocab_size", "max_text_len")}, "seed": _GE0},
    ModelConfig: {"max_text_len": _GE1, "flow_shift": _GT0},
    CropFacesConfig: {"min_detection_confidence": _UNIT, "min_face_size": _GE1, "min_sharpness": _GE0,
                      "max_yaw_degrees": ("degrees in (0, 180]", lambda v: 0 < v <= 180),
                      "duplicate_max_distance": ("0..64 (bits of a 64-bit perceptual hash)", lambda v: 0 <= v <= 64),
                      "crop_sizes": ("a non-empty list of sizes >= 16 px", lambda v: bool(v) and min(v) >= 16),
                      "crop_padding": _GE0, "max_image_pixels": _GE1, "min_photos": _GE1},
    EmbedFacesConfig: {"outlier_threshold": ("a cosine in [0, 1) (0 = the embedder's calibrated default)",
                                             lambda v: 0 <= v < 1), "min_photos": _GE1},
    PreparePoseConfig: {"fps": _GE1, "stride": (">= 0 (0 = num_frames)", lambda v: v >= 0),
                        "max_clips_per_video": (">= 0 (0 = no limit)", lambda v: v >= 0),
                        "min_pose_detection_rate": _UNIT},
    PhotoExamplesConfig: {"small_face_views": (">= 0 (0 = none)", lambda v: v >= 0)},
    ScheduleConfig: {"steps_per_photo": _GE1, "min_steps": _GE0,
                     "stage1_share": ("a share in [0, 1)", lambda v: 0 <= v < 1)},
    StageConfig: {"learning_rate": ("a finite number >= 0", lambda v: v >= 0), "warmup_steps": _GE0},
    LoraConfig: {"alpha": ("> 0 (the LoRA scale is alpha / rank)", lambda v: v > 0), "dropout": _SHARE},
    TrainLoraConfig: {"num_face_tokens": _GE1, "mapper_hidden_dim": (">= 0 (0 = text_dim)", lambda v: v >= 0),
                      "batch_size": _GE1, "grad_clip": (">= 0 (0 = no clipping)", lambda v: v >= 0),
                      "weight_decay": _GE0, "seed": _GE0, "checkpoint_every": (">= 1 (steps between checkpoints)", lambda v: v >= 1),
                      "num_workers": (">= 1 (Ray Train workers)", lambda v: v >= 1), "face_dropout": _SHARE, "cache_dir": _PATH,
                      "init_from_share": ("a share in (0, 1]", lambda v: 0 < v <= 1)},
    TrainSharedConfig: {"name": ("a name of letters, digits, '-', '_' (the model faceid-<name>)",
                                 lambda v: bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", v))), "holdout_identities": _GE0},
    GateConfig: {"min_pose_pck": _UNIT, "tolerance": _GE0, "min_face_detection_rate": _UNIT, "min_retrieval": _UNIT,
                 "min_facesim": ("a cosine in [0, 1) (0 = the embedder's same-person threshold)", lambda v: 0 <= v < 1)},
    RenderValidationConfig: {"num_clips": _GE1},
    BatchInferConfig: {"num_workers": (">= 1 (Ray Data workers)", lambda v: v >= 1)},
    TrackingConfig: {"local_store": _PATH, "experiment": _NAME, "register_alias": _NAME, "validated_alias": _NAME,
                     "download_dir": _PATH},
    RayConfig: {"num_cpus": (">= 0 (0 = all cores)", lambda v: v >= 0), "storage_path": _PATH},
    PipelineConfig: {"pipeline_root": _PATH},
}


def _validate_ranges(obj: Any, prefix: str) -> None:
    """:data:`_RANGES` of ``obj``'s section, then: every float key finite, every int key within 64 bits."""
    import math

    where = f"{prefix}." if prefix else ""
    for name, (expected, ok) in _RANGES.get(type(obj), {}).items():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{where}{name}: expected {expected}, got {value!r}")
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}{field.name}: expected a finite number, got {value}")
        if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            raise ConfigError(f"{where}{field.name}: expected an integer within 64 bits, got {value}")
    if isinstance(obj, TinyModelConfig) and not all(0 <= i < obj.num_layers for i in obj.vace_layers):
        raise ConfigError(f"{where}vace_layers: expected block indices in 0..{obj.num_layers - 1} (num_layers), "
                          f"got {list(obj.vace_layers)}")
    if isinstance(obj, TrackingConfig) and obj.validated_alias == obj.register_alias:
        raise ConfigError(f"{where}validated_alias: expected another alias than register_alias "
                          f"({obj.register_alias!r}): the gate moves it only after render-validation passes")


def _validate_trains(obj: Any, prefix: str) -> None:
    """Nothing untrained is registered: a stage with steps needs a learning rate > 0, and the two
    stages together need a step (issue 21). :func:`faceid.train.launch.check_trained` checks the result."""
    if isinstance(obj, StageConfig) and obj.steps > 0 and not obj.learning_rate > 0:
        raise ConfigError(f"{prefix}.learning_rate: expected a number > 0 for a stage with steps "
                          f"({prefix}.steps={obj.steps}; set steps: 0 to skip the stage), got {obj.learning_rate}")
    if isinstance(obj, TrainLoraConfig) and obj.stage1.steps + obj.stage2.steps < 1:
        raise ConfigError(f"{prefix}.stage1.steps, {prefix}.stage2.steps: expected at least one training step in all, "
                          f"got {obj.stage1.steps} and {obj.stage2.steps} (nothing would be trained, yet registered)")


def _parse_override(text: str) -> tuple[list[str], Any]:
    import yaml

    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE, e.g. train_lora.stage1.steps=5")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not raw.strip():
        return key.split("."), ""
    # a plain YAML value: no tags (!!python/object, !!binary, !!set, !custom: safe_load refuses some,
    # turns others into bytes or sets) and nothing safe_load cannot read; errors name the key
    try:
        tags = [t.value for t in yaml.scan(raw) if isinstance(t, yaml.TagToken)]
        if tags:
            raise ConfigError(f"{key}: expected a plain value (a number, true/false, a string or a list), got a YAML "
                              f"tag {''.join(tags[0])!r} in {raw!r}; quote a string that starts with '!'")
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{key}: expected a YAML value, got {raw!r} ({problem}); quote a string, "
                          f"e.g. --set {key}='\"...\"'") from None
    return key.split("."), value


def _merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, what: str = "params file") -> dict:
    import yaml

    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found (expected a YAML file with one section per stage)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {what} not readable as YAML text ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def params_from_dict(data: dict, overrides: list[str] | tuple[str, ...] = (),
                     values: dict[str, Any] | None = None) -> Params:
    """Apply ``overrides`` (``KEY=VALUE`` or ``@overlay.yaml``), then ``values`` (typed,
    ``{"train_lora.stage1.steps": 5}``: they win over both) to ``data`` and validate it."""
    data = json.loads(json.dumps(data or {}))  # deep copy, plain types
    for text in overrides:
        if text.startswith("@"):
            data = _merge(data, _read_yaml(Path(text[1:]), f"overlay {text!r}"))
            continue
        path, value = _parse_override(text)
        _set_key(data, path, value, f"override {text!r}")
    for key, value in (values or {}).items():
        _set_key(data, key.split("."), value, key)
    return _build(Params, data, "")


def load_params(path: str | Path = "params.yaml", overrides: list[str] | tuple[str, ...] = (), profile: str = "",
                values: dict[str, Any] | None = None) -> Params:
    """Read ``path``, apply the ``profile`` (:func:`profile_overlay`), then ``overrides`` (``--set``
    text), then ``values`` (typed, ``{"train_lora.stage1.steps": 5}``), and validate. Errors name the
    file, the key and what was expected."""
    path = Path(path)
    overrides = ([profile_overlay(path, profile)] if profile else []) + list(overrides)
    try:
        return params_from_dict(_read_yaml(path), overrides, values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if not str(exc).startswith(str(path)) else str(exc)) from None


def with_values(params: Params, values: dict[str, Any], flags: dict[str, str] | None = None) -> Params:
    """``params`` with typed ``values`` (``{"prepare_pose.workers": 4}``) set and validated again.
    ``flags``: key -> the command-line flag that gave it, named in the error instead of the key."""
    try:
        return params_from_dict(to_dict(params), values=values)
    except ConfigError as exc:
        flag = next((f for k, f in (flags or {}).items() if str(exc).startswith(f"{k}:")), None)
        if flag:
            raise ConfigError(f"{flag} ({exc})") from None
        raise


# The one profile that is params.yaml itself (model.profile=tiny) rather than an overlay file.
BASE_PROFILE = "tiny"
PROFILES_DIR = "configs"  # profile overlays: <folder of the params file>/configs/<profile>.yaml
PARAMS_ENV = "FACEID_PARAMS"  # the params file when none is named (set in the container image)


def default_params_path(environ: Mapping[str, str]) -> Path:
    """``$FACEID_PARAMS`` or ``params.yaml`` (in the working directory); the doors pass their environment."""
    return Path(environ.get(PARAMS_ENV) or "params.yaml")


def known_profiles(params_path: str | Path) -> list[str]:
    return sorted({BASE_PROFILE} | {p.stem for p in (Path(params_path).parent / PROFILES_DIR).glob("*.yaml")})


def profile_overlay(params_path: str | Path, profile: str) -> str:
    """The override of a profile: ``tiny`` is ``model.profile=tiny``; any other name is the overlay
    ``configs/<profile>.yaml`` beside the params file (e.g. ``wan2.1-vace-1.3b``)."""
    if profile == BASE_PROFILE:
        return f"model.profile={profile}"
    overlay = Path(params_path).parent / PROFILES_DIR / f"{profile}.yaml"
    if not overlay.is_file():
        raise ConfigError(f"profile {profile!r}: no overlay {overlay} (known profiles: {', '.join(known_profiles(params_path))})")
    return f"@{overlay}"


def _set_key(data: dict, path: list[str], value: Any, key: str) -> None:
    if not all(path):
        raise ConfigError(f"{key}: expected a dotted key such as train_lora.stage1.steps, got {'.'.join(path)!r}")
    node = data
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: expected {'.'.join(path[:i + 1])} to be a section, got the value {node!r}")
    node[path[-1]] = value


def to_dict(obj: Any) -> dict:
    """Plain nested dict (tuples as lists) of a config dataclass."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train_lora.stage1.steps": 20, ...}`` for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in (to_dict(obj) if dataclasses.is_dataclass(obj) else obj).items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def config_hash(*objs: Any) -> str:
    """Stable short hash of one or more config sections (for cache keys and identity cards)."""
    payload = json.dumps([to_dict(o) for o in objs], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
