"""Model building blocks: tiny components, FaceMapper, LoRA save/reload (checked by outputs),
identity folders and their compatibility checks, the generate API."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceid.errors import InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def pipe(params):
    from faceid.model.generate import build_pipeline

    pipe = build_pipeline(params.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def identity_dir(params, pipe, tmp_path_factory):
    """An identity folder with a non-trivial LoRA (B randomised) and mapper."""
    from faceid.model.base_model import base_model_id
    from faceid.model.identity import save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    from faceid.model.base_model import build_components

    transformer = build_components(params.model)["transformer"]
    torch.manual_seed(0)
    add_lora(transformer, params.train_lora.lora)
    for name, p in transformer.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    mapper = FaceMapper(128, params.model.tiny.text_dim, 4)
    with torch.no_grad():
        mapper.gate_param.fill_(1.0 / mapper.gate_multiplier)  # the gate open, as training opens it
    emb = torch.nn.functional.normalize(torch.randn(128), dim=0)
    out = tmp_path_factory.mktemp("ident") / "alice"
    save_identity(out, name="alice", card={"base_model": base_model_id(params.model), "embedder": "dlib"},
                  mapper=mapper, embedding=emb, transformer=transformer,
                  loss_rows=[{"step": 1, "stage": "stage1", "loss": 1.0, "lr": 1e-3}])
    return out


def pose_frames(n=9, size=32):
    frames = np.zeros((n, size, size, 3), np.uint8)
    for f in range(n):
        frames[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 255
    return frames


def test_tiny_components_are_deterministic(params):
    from faceid.model.base_model import build_components

    a, b = build_components(params.model), build_components(params.model)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = a[name].state_dict(), b[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ids = a["tokenizer"]("a person dancing", padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and 1 in ids and ids[-1] == 0  # </s> then <pad>


def test_real_profile_without_weights_names_the_fix(params):
    from faceid.config import params_from_dict, to_dict
    from faceid.model.base_model import build_components

    p = params_from_dict(to_dict(params), ["model.profile=wan2.1-vace-1.3b", "model.weights_dir=/nonexistent"])
    with pytest.raises(InputError, match=r"transformer, vae, text_encoder, tokenizer, scheduler.*huggingface-cli download Wan-AI/Wan2.1-VACE-1.3B-diffusers"):
        build_components(p.model)


def test_mapper_shapes_and_face_scale():
    from faceid.model.mapper import FaceMapper, scale_face

    m = FaceMapper(512, 64, num_tokens=4, hidden_dim=0)
    tokens = m(torch.randn(3, 512))
    assert tokens.shape == (3, 4, 64) and m.null_tokens(3).shape == (3, 4, 64)
    null = m.null_tokens(3)
    assert torch.equal(scale_face(tokens, null, 0.0), null) and torch.allclose(scale_face(tokens, null, 1.0), tokens)
    with pytest.raises(ValueError, match="dim 512"):
        m(torch.randn(1, 128))


def test_lora_targets():
    from faceid.model.lora import TARGET_REGEX
    import re

    names = ["blocks.3.attn2.to_q", "blocks.3.attn1.to_k", "vace_blocks.1.attn2.to_out.0", "blocks.0.attn2.to_out.1",
             "blocks.0.ffn.net.2"]
    hit = {t: [n for n in names if re.fullmatch(r, n)] for t, r in TARGET_REGEX.items()}
    assert hit["main-cross-attn"] == ["blocks.3.attn2.to_q"]
    assert hit["main-attn"] == ["blocks.3.attn2.to_q", "blocks.3.attn1.to_k"]
    assert hit["vace-attn"] == ["vace_blocks.1.attn2.to_out.0"]
    assert hit["all-attn"] == names[:3]
    # the real profile's: DiffSynth-Studio's Wan LoRA (self- and cross-attention + FFN of the main blocks)
    assert hit["main-attn-ffn"] == ["blocks.3.attn2.to_q", "blocks.3.attn1.to_k", "blocks.0.ffn.net.2"]


def test_identity_folder_roundtrip_reproduces_outputs(params, pipe, identity_dir):
    """LoRA + mapper reloaded into a fresh pipeline give exactly the outputs of the saved weights,
    and they differ from the base model (so something was really loaded)."""
    from faceid.model.base_model import build_components
    from faceid.model.generate import generate_video
    from faceid.model.identity import load_identity
    from faceid.model.lora import LORA_FILE, add_lora
    from safetensors.torch import load_file

    ident = load_identity(identity_dir, model_cfg=params.model, embedder="dlib", embed_dim=128)
    assert ident.card["num_face_tokens"] == 4 and ident.card["embedder"] == "dlib"
    pose = pose_frames()
    out = generate_video(pipe, ident, pose, "a person dancing", face_scale=1.0, lora_scale=1.0, guidance_scale=3.0,
                         num_inference_steps=2, seed=0)
    assert out.shape == (9, 32, 32, 3) and out.dtype == np.uint8
    again = generate_video(pipe, ident, pose, "a person dancing", face_scale=1.0, lora_scale=1.0, guidance_scale=3.0, num_inference_steps=2, seed=0)
    base = generate_video(pipe, None, pose, "a person dancing", face_scale=1.0, lora_scale=1.0, guidance_scale=3.0, num_inference_steps=2, seed=0)
    assert np.array_equal(out, again) and not np.array_equal(out, base)

    # reference: the same weights applied by hand (peft on a fresh transformer), no diffusers loader
    from diffusers import WanVACEPipeline
    from faceid.model.lora import set_lora_state_dict

    comps = build_components(params.model)
    add_lora(comps["transformer"], params.train_lora.lora)
    state = {k.removeprefix("transformer."): v for k, v in load_file(str(identity_dir / LORA_FILE)).items()}
    set_lora_state_dict(comps["transformer"], state)
    ref_pipe = WanVACEPipeline(**comps)
    ref_pipe.set_progress_bar_config(disable=True)
    # generate_video would load the folder's LoRA as a second adapter; call the pipeline directly instead
    from faceid.model.generate import encode_text, face_tokens
    from PIL import Image

    cond, null = face_tokens([(ident, 1.0)], 1.0)
    pe = torch.cat([encode_text(ref_pipe, "a person dancing"), cond], 1)
    ne = torch.cat([encode_text(ref_pipe, ""), null], 1)
    ref = ref_pipe(video=[Image.fromarray(f) for f in pose], prompt_embeds=pe, negative_prompt_embeds=ne, height=32,
                   width=32, num_frames=9, num_inference_steps=2, guidance_scale=3.0,
                   generator=torch.Generator("cpu").manual_seed(0), output_type="np").frames[0]
    ref = np.clip(np.round(ref * 255), 0, 255).astype(np.uint8)
    assert np.array_equal(out, ref)


def test_load_identity_checks_compatibility(params, identity_dir, tmp_path):
    import json
    import shutil

    from faceid.config import params_from_dict, to_dict
    from faceid.model.identity import load_identity

    with pytest.raises(InputError, match="embedder 'dlib', not 'clip'"):
        load_identity(identity_dir, embedder="clip")
    with pytest.raises(InputError, match="expects 128-D embeddings, got 512-D"):
        load_identity(identity_dir, embed_dim=512)
    other = params_from_dict(to_dict(params), ["model.tiny.num_layers=3"])
    with pytest.raises(InputError, match="trained on base model"):
        load_identity(identity_dir, model_cfg=other.model)
    broken = tmp_path / "broken"
    shutil.copytree(identity_dir, broken)
    card = json.loads((broken / "identity.json").read_text())
    card["embed_dim"] = 512
    (broken / "identity.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="does not match the card"):
        load_identity(broken)
    with pytest.raises(InputError, match="identity folder not found"):
        load_identity(tmp_path / "nothing")


@pytest.mark.parametrize("name", ["face_mapper.safetensors", "identity_embedding.safetensors",
                                  "pytorch_lora_weights.safetensors"])
@pytest.mark.parametrize("damage", ["truncated", "header", "empty"])
def test_corrupt_weights_in_an_identity_folder_name_the_file_and_the_fix(params, identity_dir, tmp_path, name, damage):
    """A truncated (copy cut in half), garbled-header or empty ``.safetensors`` is an InputError naming
    the file and saying to re-run train-lora or download again, at load_identity and at load_lora:
    never safetensors' own SafetensorError (a traceback at the CLI)."""
    import shutil

    from faceid.model.identity import load_identity
    from faceid.model.lora import load_lora

    bad = tmp_path / "alice"
    shutil.copytree(identity_dir, bad)
    data = (bad / name).read_bytes()
    (bad / name).write_bytes({"truncated": data[: len(data) // 2], "header": b"\xff" * 64, "empty": b""}[damage])
    with pytest.raises(InputError) as err:
        load_identity(bad, model_cfg=params.model)
    message = str(err.value)
    assert message.startswith(f"{bad / name}: not a readable .safetensors file, truncated or corrupt")
    assert "re-run train-lora" in message and "download it again" in message
    if name == "pytorch_lora_weights.safetensors":
        with pytest.raises(InputError, match=f"{bad / name}: not a readable .safetensors file"):
            load_lora(object(), bad, "bad")  # refused before diffusers reads it (no pipeline needed)


def test_lora_load_detects_a_file_that_loads_nothing(params, identity_dir, tmp_path):
    """A raw peft dict (no transformer. prefix) makes diffusers load nothing: load_lora must refuse it."""
    import shutil

    from safetensors.torch import load_file, save_file

    from faceid.model.generate import build_pipeline
    from faceid.model.lora import LORA_FILE, load_lora

    bad = tmp_path / "bad"
    shutil.copytree(identity_dir, bad)
    sd = {k.removeprefix("transformer."): v for k, v in load_file(str(bad / LORA_FILE)).items()}
    save_file(sd, str(bad / LORA_FILE))
    fresh = build_pipeline(params.model, torch.device("cpu"))
    with pytest.raises(InputError, match="did not load"):
        load_lora(fresh, bad, "bad")


def test_generate_checks_inputs_and_blends(params, pipe, identity_dir):
    from faceid.model.generate import as_blend, face_tokens, generate_video, slerp
    from faceid.model.identity import load_identity

    ident = load_identity(identity_dir)
    with pytest.raises(InputError, match="4n\\+1"):
        generate_video(pipe, ident, pose_frames(n=8), "x", face_scale=1.0, lora_scale=1.0, guidance_scale=1.0, num_inference_steps=1, seed=0)
    with pytest.raises(InputError, match="multiples of 16"):
        generate_video(pipe, ident, np.zeros((9, 30, 32, 3), np.uint8), "x", face_scale=1.0, lora_scale=1.0, guidance_scale=1.0, num_inference_steps=1, seed=0)
    from faceid.model.generate import check_pose_frames

    check_pose_frames(np.zeros((1, 32, 32, 3), np.uint8))  # F = 4 * 0 + 1, a single image: Wan's rule allows it
    assert [w for _, w in as_blend([(ident, 3.0), (ident, 1.0)])] == [0.75, 0.25]
    cond, null = face_tokens([(ident, 1.0)], 0.0)
    assert torch.equal(cond, null)
    half, _ = face_tokens([(ident, 0.5), (ident, 0.5)], 1.0)
    assert torch.allclose(half[0], ident.face_tokens(), atol=1e-6)
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    mid = slerp(a, b, 0.5)
    assert np.allclose(mid, [np.sqrt(0.5)] * 2) and np.allclose(slerp(a, b, 0.0), a)


def lora_scalings(pipe, adapter: str) -> list[float]:
    """peft's ``scaling`` (adapter weight x alpha / rank) of every LoRA layer of ``adapter``."""
    return [m.scaling[adapter] for m in pipe.transformer.modules() if adapter in getattr(m, "scaling", {})]


def test_face_scale_scales_tokens_and_lora_and_zero_is_the_base_model(params, pipe, identity_dir):
    from faceid.model.generate import adapter_name, build_pipeline, generate_video
    from faceid.model.identity import load_identity

    ident = load_identity(identity_dir)
    pose = pose_frames()

    def render(who, on=pipe, **kw):
        return generate_video(on, who, pose, "a person dancing", guidance_scale=3.0, num_inference_steps=2, seed=0,
                              **{"face_scale": 1.0, "lora_scale": 1.0, **kw})

    full = render(ident)
    name = adapter_name(ident)
    unit = lora_scalings(pipe, name)  # at face_scale 1, lora_scale 1
    base = render(None)
    assert not np.array_equal(full, base)  # the LoRA (B randomised) and the mapper change the video
    # face_scale 0: bit-identical to the base model, on this pipeline and on a fresh one that never had a LoRA
    assert np.array_equal(render(ident, face_scale=0.0), base)
    fresh = build_pipeline(params.model, torch.device("cpu"))
    fresh.set_progress_bar_config(disable=True)
    assert np.array_equal(render(None, on=fresh), base)
    half = render(ident, face_scale=0.5)
    assert not np.array_equal(half, base) and not np.array_equal(half, full)

    # adapter weight = blend weight x face_scale x lora_scale
    assert unit and len(set(unit)) == 1
    render(ident, face_scale=0.5, lora_scale=0.4)
    assert lora_scalings(pipe, name) == pytest.approx([0.2 * unit[0]] * len(unit))
    no_lora = render(ident, lora_scale=0.0)
    assert not np.array_equal(no_lora, full) and not np.array_equal(no_lora, base)  # face tokens still there

    for kw, msg in [({"face_scale": float("nan")}, "face_scale: .* got nan"), ({"face_scale": -1.0}, "face_scale: .* got -1.0"),
                    ({"lora_scale": float("inf")}, "lora_scale: .* got inf"), ({"face_scale": "x"}, "face_scale: .* got 'x'")]:
        with pytest.raises(InputError, match=msg):
            render(ident, **kw)


def test_reference_image_goes_to_vace(params, pipe, identity_dir):
    """``reference_image`` renders (VACE R2V) and changes the video; an identity trained with its
    reference passes it by itself, except at face_scale 0."""
    import dataclasses

    from faceid.model.generate import generate_video
    from faceid.model.identity import load_identity

    ident = load_identity(identity_dir)
    pose = pose_frames()
    photo = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)

    def render(who, **kw):
        return generate_video(pipe, who, pose, "a person dancing", guidance_scale=3.0, num_inference_steps=2, seed=0,
                              **{"face_scale": 1.0, "lora_scale": 1.0, **kw})

    base, r2v = render(None), render(None, reference_image=photo)
    assert r2v.shape == base.shape and not np.array_equal(r2v, base)
    trained_with = dataclasses.replace(ident, reference=photo, card={**ident.card, "reference_image": {"in_training": True}})
    auto = render(trained_with)
    assert np.array_equal(auto, render(ident, reference_image=photo))
    assert not np.array_equal(auto, render(ident))
    assert np.array_equal(render(trained_with, face_scale=0.0), base)
    with pytest.raises(InputError, match="reference image: expected a uint8 RGB array"):
        render(None, reference_image=photo[..., 0])


def test_tiny_tokenizer_gives_the_same_ids_in_every_process(params, repo):
    """Same prompt -> same ids -> same video, in any process (rare characters included)."""
    import json
    import subprocess
    import sys

    from faceid.model.base_model import build_tiny_tokenizer

    text = "xylophone Zebra 42! a person dancing"
    code = (
        "import json, sys; from faceid.config import load_params; "
        "from faceid.model.base_model import build_tiny_tokenizer; "
        f"print(json.dumps(build_tiny_tokenizer(load_params(sys.argv[1]).model.tiny)({text!r}).input_ids))"
    )
    here = build_tiny_tokenizer(params.model.tiny)(text).input_ids
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code, str(repo / "params.yaml")], capture_output=True, text=True, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == here
    assert 2 not in here  # no <unk>: every character of the prompt is in the vocabulary


def test_a_damaged_latent_cache_entry_is_encoded_again(pipe, tmp_path, capsys):
    """The latent cache is faceid's own: an entry that cannot be read (truncated by a full disk or a
    killed copy) is encoded again and replaced, with a line saying so, instead of stopping training."""
    from faceid.train.cache import Source, cached_examples

    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    pose = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    source = Source(example_id="clip0", payload={"clip": "clip0"},
                    load=lambda: (frames, pose, "a person dancing", None, {}))
    first = cached_examples(pipe, [source], tmp_path, "tiny", show_progress=False)[0]
    entry = next(tmp_path.glob("*.safetensors"))
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated
    again = cached_examples(pipe, [source], tmp_path, "tiny", show_progress=False)[0]
    assert not again["cached"] and "cannot be read" in capsys.readouterr().err
    assert torch.equal(again["target"], first["target"])
    assert cached_examples(pipe, [source], tmp_path, "tiny", show_progress=False)[0]["cached"]  # replaced, readable
