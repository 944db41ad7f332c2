"""The base model: Wan2.1-VACE components for a profile (``params.model.profile``).

- ``tiny``: a randomly initialised tiny Wan-VACE built from ``params.model.tiny`` with a fixed
  seed (VAE, transformer, a tiny UMT5 text encoder, an offline Unigram tokenizer, scheduler).
  It runs the real diffusers code on CPU in seconds; the same config always gives the same weights.
- ``wan2.1-vace-1.3b``: real weights from the local diffusers folder ``params.model.weights_dir``.

``build_components(cfg, dtype) -> dict`` returns the keyword arguments of ``WanVACEPipeline``.
``base_model_id(cfg)`` names the base model in identity cards (compatibility checks): the profile
name, or ``<profile>@test-weights-<id>`` for a folder of random test weights
(``faceid.model.test_weights``, marked in its ``model_index.json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from faceid.config import ModelConfig, TinyModelConfig, config_hash
from faceid.errors import InputError

SUBFOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# what to do about a weights folder that is incomplete or corrupt (a truncated config or weights file)
REDOWNLOAD = ("the weights folder (model.weights_dir) is incomplete or corrupt: download it again "
              "(`huggingface-cli download Wan-AI/Wan2.1-VACE-1.3B-diffusers --local-dir <dir>`), or for test "
              "weights run `faceid make-test-weights` again")
# model_index.json key of a folder written by `faceid make-test-weights` (random weights)
TEST_WEIGHTS_MARKER = "_faceid_test_weights"

# A fixed corpus for the tiny tokenizer: dance/pose captions plus the alphabet.
_TINY_CORPUS = [
    "a person dancing",
    "a woman dancing in a studio",
    "a man dancing on a street at night",
    "a person in a red shirt dances and waves both arms",
    "a dancer spins slowly, full body, plain background",
    "close-up of a smiling face, soft light, high quality video",
    "a person walking towards the camera",
    "abcdefghijklmnopqrstuvwxyz 0123456789 .,!?-'",
]


def resolve_device(cfg: ModelConfig):
    import torch

    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise InputError("model.device: cuda requested but no CUDA device is visible (set model.device=cpu or auto)")
    return torch.device(cfg.device)


def resolve_dtype(cfg: ModelConfig, device):
    """``auto``: bfloat16 on CUDA, float32 on CPU. Explicit values are honoured as given."""
    import torch

    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]


def text_dim(cfg: ModelConfig) -> int:
    """Width of the text-encoder space (face tokens live here): 4096 for UMT5-XXL."""
    if cfg.profile == "tiny":
        return cfg.tiny.text_dim
    import json

    config = Path(cfg.weights_dir) / "transformer" / "config.json"
    _check_weights_dir(cfg)
    try:
        return int(json.loads(config.read_text())["text_dim"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{config}: expected the transformer's config.json with a 'text_dim' "
                         f"({type(exc).__name__}: {exc}); {REDOWNLOAD}") from None


def max_text_len(cfg: ModelConfig) -> int:
    return cfg.tiny.max_text_len if cfg.profile == "tiny" else cfg.max_text_len


def base_model_id(cfg: ModelConfig) -> str:
    """A stable name of the base weights, written into identity cards and latent-cache keys and
    checked on load: ``tiny-<config hash>``; the profile name for real weights; and
    ``<profile>@test-weights-<id>`` when ``weights_dir`` holds random test weights, so nothing
    made on them passes as made on the real weights."""
    if cfg.profile == "tiny":
        return f"tiny-{config_hash(cfg.tiny)}"
    marker = read_test_weights_marker(cfg.weights_dir)
    return f"{cfg.profile}@test-weights-{marker['id']}" if marker else cfg.profile


def read_test_weights_marker(weights_dir: str | Path) -> dict | None:
    """The test-weights marker of ``<weights_dir>/model_index.json``, or None (real weights, or no folder)."""
    import json

    index = Path(weights_dir) / "model_index.json" if weights_dir else None
    if index is None or not index.is_file():
        return None
    try:
        marker = json.loads(index.read_text()).get(TEST_WEIGHTS_MARKER)
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as exc:
        raise InputError(f"{index}: not a valid model_index.json ({exc}); {REDOWNLOAD}") from None
    if marker is not None and not (isinstance(marker, dict) and marker.get("id")):
        raise InputError(f"{index}: key {TEST_WEIGHTS_MARKER} must be an object with an 'id', got {marker!r}")
    return marker


def build_components(cfg: ModelConfig, dtype=None) -> dict[str, Any]:
    """``WanVACEPipeline(**build_components(cfg, dtype))``; modules on CPU, transformer and text
    encoder in ``dtype`` (default float32), the VAE in float32; the caller moves them to a device."""
    import torch

    dtype = dtype or torch.float32
    if cfg.profile != "tiny":
        return load_real_components(cfg, dtype)
    components = build_tiny_components(cfg.tiny, cfg.flow_shift)  # built in float32
    if dtype != torch.float32:  # (a cast to the same dtype would only draw diffusers' fp32-modules warning)
        for name in ("transformer", "text_encoder"):
            components[name].to(dtype=dtype)
    return components


# --------------------------------------------------------------------------- tiny


def tiny_vocab(vocab_size: int) -> list[tuple[str, float]]:
    """A fixed Unigram vocabulary (pure function of the corpus and size, no training): specials,
    then the corpus words as whole pieces (preferred), then single characters as the fallback.
    Training a Unigram model instead is not deterministic across processes for rare characters."""
    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = sorted({c for line in _TINY_CORPUS for c in line if c != " "})
    char_pieces = [("\u2581", -3.0)] + [(f"\u2581{c}", -4.0) for c in chars] + [(c, -5.0) for c in chars]
    words = sorted({w for line in _TINY_CORPUS for w in line.split() if len(w) > 1})
    room = vocab_size - len(specials) - len(char_pieces)
    if room < 0:
        raise InputError(f"model.tiny.vocab_size: expected at least {len(specials) + len(char_pieces)}, got {vocab_size}")
    word_pieces = [(f"\u2581{w}", -1.0) for w in words[:room]]
    return specials + word_pieces + char_pieces


def build_tiny_tokenizer(tiny: TinyModelConfig):
    """An offline Unigram tokenizer over :func:`tiny_vocab`, UMT5-style ids: ``<pad>``=0,
    ``</s>``=1, ``<unk>``=2; ``</s>`` appended to every sequence. Same ids in every process."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(tiny_vocab(tiny.vocab_size), unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=tiny.max_text_len
    )


def build_tiny_components(tiny: TinyModelConfig, flow_shift: float) -> dict[str, Any]:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if tiny.text_encoder_dim != tiny.text_dim:
        raise InputError(
            f"model.tiny.text_encoder_dim ({tiny.text_encoder_dim}) must equal model.tiny.text_dim ({tiny.text_dim}): "
            "the transformer reads the text encoder's hidden states"
        )
    tokenizer = build_tiny_tokenizer(tiny)
    # fork_rng: building the tiny model must not disturb the caller's global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.seed)
        vae = AutoencoderKLWan(
            base_dim=tiny.vae_base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
        torch.manual_seed(tiny.seed + 1)
        transformer = WanVACETransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=tiny.num_attention_heads,
            attention_head_dim=tiny.attention_head_dim,
            in_channels=16,
            out_channels=16,
            text_dim=tiny.text_dim,
            freq_dim=tiny.freq_dim,
            ffn_dim=tiny.ffn_dim,
            num_layers=tiny.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
            vace_layers=list(tiny.vace_layers),
            vace_in_channels=96,
        )
        torch.manual_seed(tiny.seed + 2)
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=tiny.text_encoder_dim,
                d_kv=max(tiny.text_encoder_dim // 4, 4),
                d_ff=tiny.text_encoder_dim * 2,
                num_layers=tiny.text_encoder_layers,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
            )
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=flow_shift)
    for module in (vae, transformer, text_encoder):
        module.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer, "scheduler": scheduler}


# --------------------------------------------------------------------------- real weights


def _check_weights_dir(cfg: ModelConfig) -> Path:
    root = Path(cfg.weights_dir) if cfg.weights_dir else None
    missing = [s for s in SUBFOLDERS if root is None or not (root / s).is_dir()]
    if missing:
        where = f"{root}" if root else "model.weights_dir is empty"
        raise InputError(
            f"{where}: profile {cfg.profile} needs a local diffusers folder with subfolders "
            f"{', '.join(SUBFOLDERS)} (missing: {', '.join(missing)}). Get it on a machine with internet: "
            f"`huggingface-cli download Wan-AI/Wan2.1-VACE-1.3B-diffusers --local-dir <dir>`, copy it here and set "
            f"model.weights_dir=<dir> (e.g. --set model.weights_dir=/models/Wan2.1-VACE-1.3B-diffusers)"
        )
    return root


def load_real_components(cfg: ModelConfig, dtype) -> dict[str, Any]:
    """Load every component from the local folder (never from a hub); transformer and text encoder
    in ``dtype``, the VAE in float32 (as the Wan docs recommend). ``from_pretrained`` on a folder
    path is offline."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from safetensors import SafetensorError

    root = _check_weights_dir(cfg)
    read_test_weights_marker(root)  # a truncated model_index.json is named here
    loaders = {
        "transformer": lambda d: WanVACETransformer3DModel.from_pretrained(d, dtype=dtype, local_files_only=True),
        "vae": lambda d: AutoencoderKLWan.from_pretrained(d, dtype=torch.float32, local_files_only=True),
        "text_encoder": lambda d: UMT5EncoderModel.from_pretrained(d, dtype=dtype, local_files_only=True),
        "tokenizer": lambda d: AutoTokenizer.from_pretrained(d, local_files_only=True),
        "scheduler": lambda d: UniPCMultistepScheduler.from_pretrained(d, local_files_only=True),
    }
    loaded = {}
    for name, load in loaders.items():
        # a truncated config.json or weights file: diffusers/transformers raise OSError, ValueError
        # (JSON), safetensors its SafetensorError; the message names the subfolder and the fix
        try:
            loaded[name] = load(root / name)
        except (OSError, ValueError, SafetensorError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise InputError(f"{root / name}: could not load the {name} ({type(exc).__name__}: {first}); "
                             f"{REDOWNLOAD}") from None
    transformer, vae, text_encoder, tokenizer = (loaded[k] for k in ("transformer", "vae", "text_encoder", "tokenizer"))
    scheduler = UniPCMultistepScheduler.from_config(loaded["scheduler"].config, flow_shift=cfg.flow_shift)
    for module in (vae, transformer, text_encoder):
        module.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer, "scheduler": scheduler}
