"""The real profile's code path on test weights: `faceid make-test-weights --size tiny` writes the
Wan2.1-VACE-1.3B folder layout with the tiny config; the real profile (configs/wan2.1-vace-1.3b.yaml,
model.weights_dir) loads it through load_real_components, a stock WanVACEPipeline loads it, and
faceid generates with it. Identities made on test weights name them as their base model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from faceid.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, repo):
    """Tiny test weights written by the CLI subcommand users run."""
    from faceid.cli import main

    out = tmp_path_factory.mktemp("weights") / "tiny"
    assert main(["--params", str(repo / "params.yaml"), "make-test-weights", "--size", "tiny", "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def real_params(repo, weights):
    from faceid.config import load_params

    return load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}",
                                              f"model.weights_dir={weights}", "model.device=cpu"])


def test_layout_marker_and_readme(weights):
    from faceid.model.base_model import SUBFOLDERS, TEST_WEIGHTS_MARKER

    assert all((weights / s).is_dir() for s in SUBFOLDERS)
    index = json.loads((weights / "model_index.json").read_text())
    assert index["_class_name"] == "WanVACEPipeline"
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    assert index[TEST_WEIGHTS_MARKER]["size"] == "tiny" and "draw noise" in index[TEST_WEIGHTS_MARKER]["warning"]
    assert "TEST WEIGHTS: random, they draw noise" in (weights / "README.md").read_text()
    assert sorted(p.name for p in weights.parent.iterdir()) == ["tiny"]  # atomic: no temporary folder left


def test_real_profile_loads_them_with_the_tiny_weights(params, real_params):
    from faceid.model.base_model import base_model_id, build_components, text_dim

    components = build_components(real_params.model)  # profile wan2.1-vace-1.3b -> load_real_components
    assert type(components["scheduler"]).__name__ == "UniPCMultistepScheduler"
    assert components["scheduler"].config.prediction_type == "flow_prediction" and components["scheduler"].config.use_flow_sigmas
    assert text_dim(real_params.model) == params.model.tiny.text_dim
    assert components["tokenizer"].model_max_length == params.model.tiny.max_text_len
    tiny = build_components(params.model)["transformer"].state_dict()  # same seed -> the tiny profile's weights
    loaded = components["transformer"].state_dict()
    assert tiny.keys() == loaded.keys() and all(torch.equal(v, loaded[k]) for k, v in tiny.items())
    assert base_model_id(real_params.model).startswith("wan2.1-vace-1.3b@test-weights-tiny-seed0-")


def test_stock_pipeline_loads_them(weights):
    from diffusers import WanVACEPipeline

    pipe = WanVACEPipeline.from_pretrained(weights)
    assert type(pipe.tokenizer).__name__ in ("T5TokenizerFast", "T5Tokenizer")  # one class in transformers 5
    ids = pipe.tokenizer("a person dancing").input_ids
    assert 2 not in ids and ids[-1] == 1  # offline vocabulary: no <unk>, </s> appended
    padded = pipe.tokenizer("a person dancing", padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    assert padded[: len(ids)] == ids and set(padded[len(ids):]) == {0}


def test_base_model_id_keeps_real_folders_and_rejects_a_bad_marker(real_params, weights, tmp_path):
    import dataclasses

    from faceid.model.base_model import TEST_WEIGHTS_MARKER, base_model_id

    real = tmp_path / "real"
    shutil.copytree(weights, real, ignore=shutil.ignore_patterns("*.safetensors"))
    index = json.loads((real / "model_index.json").read_text())
    del index[TEST_WEIGHTS_MARKER]
    (real / "model_index.json").write_text(json.dumps(index))
    cfg = dataclasses.replace(real_params.model, weights_dir=str(real))
    assert base_model_id(cfg) == "wan2.1-vace-1.3b"  # a real folder: the id identity cards always had
    assert base_model_id(dataclasses.replace(cfg, weights_dir="")) == "wan2.1-vace-1.3b"
    (real / "model_index.json").write_text(json.dumps({**index, TEST_WEIGHTS_MARKER: "yes"}))
    with pytest.raises(InputError, match=TEST_WEIGHTS_MARKER):
        base_model_id(cfg)


def test_seed_changes_the_weights_id(params):
    from faceid.model.test_weights import build_test_components, weights_id

    a, b = (build_test_components("tiny", params.model.tiny, seed) for seed in (0, 1))
    assert weights_id("tiny", 0, a) != weights_id("tiny", 1, b)
    assert not torch.equal(a["transformer"].proj_out.weight, b["transformer"].proj_out.weight)


def test_generation_with_an_identity_and_the_card_check(params, real_params, tmp_path):
    import dataclasses

    from faceid.model.base_model import base_model_id, build_components
    from faceid.model.generate import build_pipeline, generate_video
    from faceid.model.identity import load_identity, save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    transformer = build_components(real_params.model)["transformer"]
    add_lora(transformer, real_params.train_lora.lora)
    mapper = FaceMapper(128, params.model.tiny.text_dim, 4)
    folder = tmp_path / "alice"
    save_identity(folder, name="alice", card={"base_model": base_model_id(real_params.model), "embedder": "dlib"},
                  mapper=mapper, embedding=torch.nn.functional.normalize(torch.randn(128), dim=0), transformer=transformer)
    pipe = build_pipeline(real_params.model)
    pipe.set_progress_bar_config(disable=True)
    ident = load_identity(folder, model_cfg=real_params.model)
    pose = np.zeros((5, 32, 32, 3), np.uint8)
    pose[:, 8:24, 12:20] = 255
    frames = generate_video(pipe, ident, pose, "a person dancing", face_scale=1.0, lora_scale=1.0, guidance_scale=3.0,
                            num_inference_steps=2, seed=0)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == np.uint8
    # an identity made on test weights never loads as one made on the real weights (nor the reverse)
    with pytest.raises(InputError, match="test-weights"):
        load_identity(folder, model_cfg=dataclasses.replace(real_params.model, weights_dir=""))


def test_memory_options(params):
    import dataclasses

    from faceid.model.generate import build_pipeline
    from faceid.model.memory import apply_memory_options, holdings, text_encoder_on_device

    pipe = build_pipeline(params.model, torch.device("cpu"))
    cfg = dataclasses.replace(params.model, text_encoder_offload=True, vae_tiling=True, vae_slicing=True)
    apply_memory_options(pipe, cfg)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    with text_encoder_on_device(pipe), text_encoder_on_device(pipe):  # nested: moved once
        assert pipe.text_encoder.device == pipe.transformer.device
    assert pipe.text_encoder.device.type == "cpu"
    rows = {r["name"]: r for r in holdings(pipe)}
    assert set(rows) == {"text_encoder", "transformer", "vae"}
    assert rows["transformer"]["parameters"] == sum(p.numel() for p in pipe.transformer.parameters())
    assert rows["vae"]["bytes"] >= 4 * rows["vae"]["parameters"]


def test_the_full_size_text_encoder_option_is_umt5_xxl(params):
    """``make-test-weights --text-encoder umt5-xxl`` (the GPU benchmark's prompt-encode memory) has
    UMT5-XXL's size: 5.68 B parameters, 1.05 B of them the token table (faceid.model.memory's table);
    counted on the meta device, nothing allocated. Only with --size real."""
    from transformers import UMT5Config, UMT5EncoderModel

    from faceid.model.test_weights import UMT5_XXL, UMT5_XXL_VOCAB_SIZE, build_test_components

    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(vocab_size=UMT5_XXL_VOCAB_SIZE, **UMT5_XXL))
    total = sum(p.numel() for p in encoder.parameters())
    assert round(total / 1e9, 2) == 5.68 and round(encoder.shared.weight.numel() / 1e9, 2) == 1.05
    with pytest.raises(InputError, match="--text-encoder"):
        build_test_components("tiny", params.model.tiny, text_encoder="umt5-xxl")


@pytest.mark.extended
def test_gpu_benchmarks_run_on_cpu_with_tiny_weights(repo, weights, tmp_path):
    """The GPU benchmarks' logic (--device cpu), so the one GPU session does not die on drift."""
    import subprocess
    import sys

    tiny = ["--device", "cpu", "--weights", str(weights), "--height", "32", "--width", "32"]
    runs = {
        "infer": [sys.executable, str(repo / "benchmarks" / "bench_infer_gpu.py"), *tiny, "--frames", "5",
                  "--steps", "1", "--repeats", "1", "--out", str(tmp_path / "infer.md")],
        "train": [sys.executable, str(repo / "benchmarks" / "bench_train_gpu.py"), *tiny, "--frames", "5",
                  "--steps", "1", "--out", str(tmp_path / "train.md")],
    }
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{name}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    infer = (tmp_path / "infer.md").read_text()
    assert all(f"| {c} | 1 |" in infer for c in ("stock", "faceid", "faceid-compiled"))  # 1 measured run each
    assert "**1 steps measured**" in infer and "torch.compile of faceid-compiled's blocks" in infer
    assert len((tmp_path / "infer.md.runs.jsonl").read_text().splitlines()) == 3
    again = subprocess.run(runs["infer"][:-2] + ["--configs", "stock", "faceid", "--out", str(tmp_path / "infer.md")],
                           capture_output=True, text=True, timeout=600)  # a second call carries on: nothing left to run
    assert again.returncode == 0 and "3 runs in" in again.stdout and ", 0 to do" in again.stdout, again.stderr[-2000:]
    assert len((tmp_path / "infer.md.runs.jsonl").read_text().splitlines()) == 3
    train = (tmp_path / "train.md").read_text()
    assert "| 5 | 8 | yes |" in train and "| 5 | 8 | no |" in train  # 2 latent frames x 2 x 2 tokens
    no_cuda = subprocess.run(runs["train"][:2] + ["--weights", str(weights)], capture_output=True, text=True)
    assert no_cuda.returncode != 0 and "needs a CUDA GPU" in no_cuda.stderr


@pytest.mark.parametrize("damaged", ["model_index.json", "transformer/config.json",
                                     "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                                     "text_encoder/config.json"])
def test_a_truncated_file_in_the_weights_folder_names_it_and_the_fix(real_params, weights, tmp_path, damaged):
    """A weights folder with a truncated config or weights file (an interrupted download or copy) is an
    InputError naming the file or subfolder and saying to download again, never a traceback."""
    from faceid.config import params_from_dict, to_dict
    from faceid.model.base_model import build_components

    copy = tmp_path / "weights"
    shutil.copytree(weights, copy)
    data = (copy / damaged).read_bytes()
    (copy / damaged).write_bytes(data[: len(data) // 2])
    p = params_from_dict(to_dict(real_params), [f"model.weights_dir={copy}"])
    with pytest.raises(InputError) as err:
        build_components(p.model)
    message = str(err.value)
    named = copy / damaged if damaged == "model_index.json" else copy / damaged.split("/")[0]
    assert message.startswith(f"{named}: "), message
    assert "incomplete or corrupt: download it again" in message and "make-test-weights" in message


def test_face_tokens_start_at_the_text_tokens_rms_on_the_real_layout(real_params):
    """The real profile's loader and the T5 tokenizer of `make-test-weights` (the UMT5 interface):
    a mapper calibrated on the captions' tokens starts within 20 % of their RMS, gate closed (issue 20;
    the same on the 4096-D `--size real` weights in `make smoke-real`, benchmarks/smoke_real.py)."""
    from faceid.model.generate import build_pipeline, encode_text
    from faceid.model.mapper import caption_token_rms, initial_mapper

    pipe = build_pipeline(real_params.model)
    with torch.no_grad():
        texts = [encode_text(pipe, c)[0].float() for c in ("a person dancing", "a photo of a person")]
    assert all(0 < int((t.abs().sum(-1) > 0).sum()) < t.shape[0] for t in texts)  # caption rows, then padding
    text_rms = caption_token_rms(texts)
    mapper = initial_mapper(128, texts[0].shape[-1], 4, 0, seed=0).calibrate(text_rms)
    emb = torch.nn.functional.normalize(torch.randn(8, 128, generator=torch.Generator().manual_seed(0)), dim=-1)
    with torch.no_grad():
        token_rms = float(mapper.ungated(emb).pow(2).mean(-1).sqrt().mean())
        assert float(mapper(emb).abs().max()) == 0.0
    assert abs(token_rms - text_rms) <= 0.2 * text_rms, (token_rms, text_rms)
