"""TEST WEIGHTS: a diffusers folder with the layout of ``Wan-AI/Wan2.1-VACE-1.3B-diffusers`` and
random weights (fixed seed), written offline. They draw noise; they exist so the real profile's
code path (``faceid.model.base_model.load_real_components``) runs on a machine with no hub.

    faceid make-test-weights [--size real|tiny] [--seed 0] [--output .cache/test-weights/<size>] [--text-encoder test|umt5-xxl]
    faceid --set @configs/wan2.1-vace-1.3b.yaml --set model.weights_dir=.cache/test-weights/real <stage> ...

Layout (as the hub folder): ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``, plus ``README.md`` saying what this is.

- ``real``: the transformer with the real 1.3B VACE config (:data:`WAN_VACE_1_3B`, 2.15 B
  parameters, bfloat16, 4.1 GB); ``AutoencoderKLWan()`` (its defaults are the Wan2.1 VAE config,
  float32, 485 MB); the published scheduler config (UniPC, flow prediction, flow_shift 3.0); a
  UMT5 encoder with the real interface (d_model 4096, 512 tokens, gated-gelu, T5 tokenizer) but 2
  layers and a 256-piece offline vocabulary (float32, 114 MB). 4.6 GB in all; ~50 s and 5.4 GB of
  RAM to write on 2 cores. ``--text-encoder umt5-xxl``: the encoder at UMT5-XXL's full size
  (24 layers, 64 heads, d_ff 10240, 256,384-token table; 5.68 B parameters, bfloat16, 11.4 GB), so
  the text encoder's memory and time on a GPU are the real ones (the GPU benchmark's prompt encode).
- ``tiny``: the same layout with ``params.model.tiny`` (the tiny profile's transformer, VAE and
  text encoder, same seed = same weights): CI loads it through the real profile in seconds.

The folder is marked: ``model_index.json`` holds ``"_faceid_test_weights": {"warning", "size",
"seed", "id"}`` (diffusers ignores keys starting with ``_``), so ``base_model_id`` names such a
folder ``<profile>@test-weights-<id>``: an identity (or a latent cache entry) made on test
weights never passes as made on the real weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from faceid.config import TinyModelConfig, to_dict
from faceid.errors import InputError
from faceid.model.base_model import TEST_WEIGHTS_MARKER, build_tiny_components, tiny_vocab

SIZES = ("real", "tiny")
WARNING = "TEST WEIGHTS: random weights with the Wan2.1-VACE-1.3B layout. They draw noise. Not a model."

# transformer/config.json of Wan-AI/Wan2.1-VACE-1.3B-diffusers (2.15 B parameters)
WAN_VACE_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
    pos_embed_seq_len=None, vace_layers=list(range(0, 30, 2)), vace_in_channels=96,
)
# scheduler/scheduler_config.json of the hub folder: UniPC with flow sigmas (other keys: defaults)
SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
# UMT5-XXL's interface (d_model 4096, 512 tokens, gated-gelu), not its depth or vocabulary
UMT5_TEST = dict(d_model=4096, num_layers=2, num_heads=8, d_kv=64, d_ff=512, feed_forward_proj="gated-gelu",
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False)
REAL_TEXT_LEN = 512
TEST_VOCAB_SIZE = 256
# text_encoder/config.json of the hub folder: UMT5-XXL's encoder (5.68 B parameters, 11.4 GB bf16)
UMT5_XXL = dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, feed_forward_proj="gated-gelu",
                relative_attention_num_buckets=32, relative_attention_max_distance=128, tie_word_embeddings=False)
UMT5_XXL_VOCAB_SIZE = 256384
TEXT_ENCODERS = ("test", "umt5-xxl")  # --text-encoder of --size real: 2 layers (114 MB) or the full size


def default_output(size: str) -> Path:
    """``.cache/test-weights/<size>`` (a build output: gitignored, never committed)."""
    return Path(".cache") / "test-weights" / size


def offline_t5_tokenizer(vocab_size: int, max_length: int):
    """A ``T5TokenizerFast`` (the hub folder's class) over the offline :func:`tiny_vocab`;
    UMT5 ids ``<pad>``=0, ``</s>``=1, ``<unk>``=2, ``</s>`` appended."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(vocab=tiny_vocab(vocab_size), extra_ids=0, model_max_length=max_length)


def build_test_components(size: str, tiny: TinyModelConfig, seed: int = 0, text_encoder: str = "test") -> dict[str, Any]:
    """``WanVACEPipeline`` keyword arguments with random weights (CPU, eval, no grad).
    ``real``: transformer in bfloat16, the rest float32; ``text_encoder="umt5-xxl"``: the text
    encoder at UMT5-XXL's full size and vocabulary (:data:`UMT5_XXL`, bfloat16, 11.4 GB: what the
    real encoder weighs on the device; the tokenizer stays the offline 256-piece one). ``tiny``: float32."""
    import torch
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanVACETransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    if size not in SIZES:
        raise InputError(f"test weights: size must be one of {', '.join(SIZES)}, got {size!r}")
    if text_encoder not in TEXT_ENCODERS or (text_encoder != "test" and size != "real"):
        raise InputError(f"test weights: --text-encoder must be one of {', '.join(TEXT_ENCODERS)} ({TEXT_ENCODERS[1]} "
                         f"with --size real only), got {text_encoder!r} with --size {size}")
    scheduler = UniPCMultistepScheduler(**SCHEDULER)
    if size == "tiny":
        components = build_tiny_components(dataclasses.replace(tiny, seed=seed), SCHEDULER["flow_shift"])
        tokenizer = offline_t5_tokenizer(tiny.vocab_size, tiny.max_text_len)
        if len(tokenizer) != components["text_encoder"].config.vocab_size:
            raise InputError(f"test weights: tokenizer of {len(tokenizer)} pieces for a text encoder of "
                             f"{components['text_encoder'].config.vocab_size} (model.tiny.vocab_size)")
        return {**components, "tokenizer": tokenizer, "scheduler": scheduler}

    tokenizer = offline_t5_tokenizer(TEST_VOCAB_SIZE, REAL_TEXT_LEN)
    # fork_rng: writing weights must not disturb the caller's global RNG. The transformer is built
    # in bfloat16 directly (4.3 GB instead of 8.6 GB of float32 to cast).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan()
        torch.manual_seed(seed + 1)
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            transformer = WanVACETransformer3DModel(**WAN_VACE_1_3B)
        finally:
            torch.set_default_dtype(default)
        torch.manual_seed(seed + 2)
        full = text_encoder == "umt5-xxl"
        torch.set_default_dtype(torch.bfloat16 if full else default)  # 11.4 GB built as it is kept, not cast
        try:
            text_encoder = UMT5EncoderModel(UMT5Config(
                vocab_size=UMT5_XXL_VOCAB_SIZE if full else len(tokenizer), pad_token_id=0, eos_token_id=1,
                decoder_start_token_id=0, **(UMT5_XXL if full else UMT5_TEST)))
        finally:
            torch.set_default_dtype(default)
    for module in (vae, transformer, text_encoder):
        module.eval().requires_grad_(False)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def weights_id(size: str, seed: int, components: dict[str, Any]) -> str:
    """``<size>-seed<N>-<hash of the component configs>``: different weights, different id."""
    configs = {name: dict(components[name].config) for name in ("transformer", "vae", "scheduler")}
    configs["text_encoder"] = components["text_encoder"].config.to_dict()
    configs["vocab"] = components["tokenizer"].get_vocab()
    for name in ("transformer", "vae", "scheduler"):  # diffusers' bookkeeping keys vary with versions
        configs[name] = {k: v for k, v in configs[name].items() if not k.startswith("_")}
    for key in ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures"):
        configs["text_encoder"].pop(key, None)
    digest = hashlib.sha256(json.dumps([size, seed, configs], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{size}-seed{seed}-{digest}"


def write_test_weights(output: str | Path, size: str, tiny: TinyModelConfig, seed: int = 0, text_encoder: str = "test") -> Path:
    """Write the folder atomically (a temporary folder beside ``output``, renamed when complete)."""
    from faceid.io import atomic_dir, write_json
    from faceid.outputs import check_folder

    # 1. Build the components (random, seeded), once the output is known to be new, empty or test weights
    output = check_folder("make_test_weights", output)  # faceid.outputs
    from diffusers import WanVACEPipeline

    t0 = time.perf_counter()
    _say(f"make-test-weights: building {size} components (seed {seed}) ...")
    components = build_test_components(size, tiny, seed, text_encoder)
    wid = weights_id(size, seed, components)
    _say(f"make-test-weights: built in {time.perf_counter() - t0:.0f} s; writing {output} ...")

    # 2. Write the diffusers layout, the marker and the README into a temporary folder
    with atomic_dir(output) as tmp:
        pipe = WanVACEPipeline(**components)
        for name in ("scheduler", "tokenizer", "text_encoder", "vae", "transformer"):
            t1 = time.perf_counter()
            getattr(pipe, name).save_pretrained(tmp / name, **({} if name in ("scheduler", "tokenizer") else
                                                              {"safe_serialization": True}))
            _say(f"make-test-weights:   {name}/ ({_size_mb(tmp / name):.0f} MB, {time.perf_counter() - t1:.0f} s)")
        pipe.save_config(tmp)  # model_index.json, as save_pretrained writes it
        index = json.loads((tmp / "model_index.json").read_text())
        index[TEST_WEIGHTS_MARKER] = {"warning": WARNING, "size": size, "seed": seed, "id": wid}
        write_json(tmp / "model_index.json", index)
        (tmp / "README.md").write_text(_readme(size, seed, wid, tiny, text_encoder))
    _say(f"make-test-weights: {output} ({_size_mb(output) / 1024:.2f} GB, id {wid}) in {time.perf_counter() - t0:.0f} s")
    return output


def _readme(size: str, seed: int, wid: str, tiny: TinyModelConfig, text_encoder: str = "test") -> str:
    encoder = ("a UMT5-XXL-sized encoder (24 layers, 256,384-token table) with a 256-piece tokenizer" if text_encoder != "test"
               else "a 2-layer 4096-D UMT5 with a 256-piece vocabulary")
    what = (f"the real Wan2.1-VACE-1.3B transformer and VAE configs, {encoder}"
            if size == "real" else f"the tiny profile's config (params.yaml model.tiny: {json.dumps(to_dict(tiny))})")
    return f"""---
tags: [test-weights, random-weights, not-a-model]
---
# TEST WEIGHTS: random, they draw noise

**This is not Wan2.1-VACE-1.3B.** Every weight here is random (seed {seed}); videos rendered with it
are noise, and an identity trained on it is useless anywhere else. It has the folder layout of
`Wan-AI/Wan2.1-VACE-1.3B-diffusers` ({what}) so the real profile's loading, training and rendering
code runs offline: `faceid make-test-weights --size {size} --seed {seed}` wrote it.

- id: `{wid}` (`model_index.json` key `{TEST_WEIGHTS_MARKER}`); identity cards made with it name the base
  model `<profile>@test-weights-{wid}`, so they never load on the real weights.
- Regenerate it instead of copying it; never commit or publish it.
"""


def _size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 2**20


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
