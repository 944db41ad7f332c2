"""Where the identity adapter starts (issue 20): face tokens at the text tokens' scale, the untrained
adapter close to the base model, older mapper files, and DiffSynth-Studio's ``mid_weighted`` weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

CAPTIONS = ("a person dancing", "a photo of a person", "a person in red")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long: one thread is much faster than two that spin
    against each other on a busy machine (as tests/test_conditioning.py does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(params, one_thread):
    from faceid.model.generate import build_pipeline

    pipe = build_pipeline(params.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def measured_rms(pipe) -> float:
    """The RMS of the caption tokens, written out here: every non-padding token of each caption."""
    from faceid.model.generate import encode_text

    rows = []
    with torch.no_grad():
        for caption in CAPTIONS:
            text = encode_text(pipe, caption)[0]
            n = int((text.abs().sum(-1) > 0).sum())
            assert 0 < n < text.shape[0]  # a caption, then zero padding (Wan's layout)
            rows.append(text[:n])
    return float(torch.cat(rows).double().pow(2).mean().sqrt())


@pytest.mark.parametrize("encoder_scale", [1.0, 0.05])
def test_face_tokens_start_at_the_text_tokens_rms(params, pipe, encoder_scale):
    """The tiny encoder's tokens have RMS 1 (its final RMSNorm); scaled by 0.05 it stands for an encoder
    whose tokens are far from the LayerNorm's RMS 1 (as UMT5-XXL's are): either way the calibrated
    mapper's tokens start within 20 % of the measured text RMS."""
    from faceid.model.generate import encode_text
    from faceid.model.mapper import caption_token_rms, initial_mapper

    norm = pipe.text_encoder.encoder.final_layer_norm.weight
    original = norm.detach().clone()
    try:
        with torch.no_grad():
            norm.mul_(encoder_scale)
        text_rms = measured_rms(pipe)
        with torch.no_grad():
            texts = [encode_text(pipe, c)[0] for c in CAPTIONS]
    finally:
        with torch.no_grad():
            norm.copy_(original)
    assert math.isclose(text_rms, encoder_scale, rel_tol=0.05)
    assert math.isclose(caption_token_rms(texts + texts[:1]), text_rms, rel_tol=1e-6)  # each caption once
    mapper = initial_mapper(128, params.model.tiny.text_dim, 4, 0, seed=0).calibrate(caption_token_rms(texts))
    emb = torch.nn.functional.normalize(torch.randn(16, 128, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        tokens = mapper.ungated(emb)
        token_rms = float(tokens.pow(2).mean(-1).sqrt().mean())
        assert float(mapper(emb).abs().max()) == 0.0  # the closed gate: the untrained tokens are padding
    assert abs(token_rms - text_rms) <= 0.2 * text_rms, (token_rms, text_rms)
    if encoder_scale != 1.0:  # uncalibrated, the LayerNorm's RMS 1 would be far off
        assert abs(1.0 - text_rms) > 0.2 * text_rms


def pose(n=9, size=64):
    frames = np.zeros((n, size, size, 3), np.uint8)
    for f in range(n):
        frames[f, size // 5: size - size // 5, size // 4 + 2 * f: size // 2 + 2 * f] = 255
    return frames


def test_the_untrained_adapter_renders_close_to_the_base(params, pipe, tmp_path):
    """Step 0 as train-lora starts it (initial mapper calibrated on the captions, LoRA B at zero), saved
    and loaded as an identity: its render differs from face_scale 0 (the base exactly) by less than
    half of what the same untrained tokens with the gate open do (the tokens at text scale, as before
    the gate), and by under 0.5 grey levels on average. What is left is the 4 zero tokens themselves:
    padding added to a 16-token tiny context with 12 padding rows (in the real 512-token context, ~500
    padding rows, 4 more barely move the attention). tests/test_conditioning.py bounds it against a
    trained identity."""
    from faceid.model.base_model import base_model_id, build_components
    from faceid.model.generate import encode_text, generate_video
    from faceid.model.identity import load_identity, save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import caption_token_rms, initial_mapper

    transformer = build_components(params.model)["transformer"]
    with torch.no_grad():
        text_rms = caption_token_rms([encode_text(pipe, c)[0] for c in CAPTIONS])
    mapper = initial_mapper(128, params.model.tiny.text_dim, params.train_lora.num_face_tokens, 0, seed=0).calibrate(text_rms)
    add_lora(transformer, params.train_lora.lora)
    emb = torch.nn.functional.normalize(torch.randn(128, generator=torch.Generator().manual_seed(2)), dim=0)
    card = {"base_model": base_model_id(params.model), "embedder": "dlib"}
    save_identity(tmp_path / "start", name="start", card=card, mapper=mapper, embedding=emb, transformer=transformer)
    with torch.no_grad():
        mapper.gate_param.fill_(1.0 / mapper.gate_multiplier)  # the same tokens, gate open
    save_identity(tmp_path / "open", name="open", card=card, mapper=mapper, embedding=emb, transformer=transformer)
    start, opened = load_identity(tmp_path / "start"), load_identity(tmp_path / "open")
    assert start.card["face_gate"] == 0.0 and math.isclose(start.card["face_token_scale"], text_rms)
    assert start.mapper.output_scale == text_rms and math.isclose(float(opened.mapper.gate), 1.0, rel_tol=1e-6)

    def render(ident, face_scale):
        return generate_video(pipe, ident, pose(5, 48), "a person dancing", face_scale=face_scale, lora_scale=1.0,
                              guidance_scale=3.0, num_inference_steps=4, seed=0).astype(np.float64)

    base = render(start, 0.0)
    step0 = float(np.abs(render(start, 1.0) - base).mean())
    gate_open = float(np.abs(render(opened, 1.0) - base).mean())
    assert step0 < 0.5 and step0 < gate_open / 2, (step0, gate_open)


def test_a_mapper_file_without_scale_or_gate_loads_as_it_computed(params, tmp_path):
    """Identities written before the output scale and the gate: output_scale 1, gate open at 1, so
    their face tokens are exactly LayerNorm(net(e)) as they were trained."""
    import json

    from safetensors.torch import load_file, save_file

    from faceid.model.base_model import base_model_id, build_components
    from faceid.model.identity import MAPPER_FILE, load_identity, save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    transformer = build_components(params.model)["transformer"]
    add_lora(transformer, params.train_lora.lora)
    torch.manual_seed(3)
    mapper = FaceMapper(128, params.model.tiny.text_dim, 4)
    emb = torch.nn.functional.normalize(torch.randn(128), dim=0)
    folder = save_identity(tmp_path / "old", name="old", card={"base_model": base_model_id(params.model), "embedder": "dlib"},
                           mapper=mapper, embedding=emb, transformer=transformer)
    old = {k: v for k, v in load_file(str(folder / MAPPER_FILE)).items() if k != "gate_param"}
    config = {k: v for k, v in mapper.config().items() if k not in ("output_scale", "gate_multiplier")}
    save_file(old, str(folder / MAPPER_FILE), metadata={"config": json.dumps(config)})
    loaded = load_identity(folder)
    with torch.no_grad():
        expected = mapper.norm(mapper.net(emb[None]).view(1, 4, -1))[0]  # the mapper as it was: no scale, no gate
    assert loaded.mapper.output_scale == 1.0 and torch.allclose(loaded.face_tokens(), expected, atol=1e-6)


def test_mid_weighted_is_diffsynths_bell_on_the_shifted_timestep_values():
    """DiffSynth-Studio (FlowMatchScheduler.set_timesteps(1000, training=True)): x = the schedule's
    timestep values (sigma * 1000 after the shift), y = exp(-2 ((x - 500) / 1000)^2), y - min(y),
    times 1000 / sum. Written out here from the shift formula, not from the scheduler."""
    from faceid.train.step import timestep_weights, training_scheduler

    shift, n = 3.0, 1000
    scheduler = training_scheduler(shift)
    u = torch.arange(n, 0, -1, dtype=torch.float64) / n  # 1, ..., 1/1000: the unshifted sigmas
    sigma = shift * u / (1 + (shift - 1) * u)
    assert torch.allclose(scheduler.timesteps.double(), sigma * n, atol=1e-3)
    y = torch.exp(-2 * ((sigma * n - n / 2) / n) ** 2)
    expected = (y - y.min()) * n / (y - y.min()).sum()
    weights = timestep_weights("mid_weighted", scheduler.timesteps)
    assert torch.allclose(weights.double(), expected, atol=1e-5)
    assert torch.equal(timestep_weights("uniform", scheduler.timesteps), torch.ones(n))
    # the index version (what faceid did before) weighs sigma 0.2-0.3, where faces form, 2.4-3x too little
    i = torch.arange(n, dtype=torch.float64)
    y_index = torch.exp(-2 * ((i - n / 2) / n) ** 2)
    by_index = (y_index - y_index.min()) * n / (y_index - y_index.min()).sum()
    band = (sigma >= 0.2) & (sigma <= 0.3)
    ratio = weights.double()[band] / by_index[band]
    assert 2.4 < float(ratio.min()) and float(ratio.max()) < 3.0, ratio


def test_the_real_profile_validates_with_the_settings_users_render_with(repo):
    """Training renders take render_validation's settings (no copy under train_lora.validation); in the
    real profile those equal what `faceid infer` / batch-infer render with, so the best step and the
    gate are judged on what a user sees. The real profile renders >= 2 held-out clips during training
    and trains DiffSynth-Studio's LoRA targets (README "The identity adapter")."""
    from faceid.config import load_params

    real = load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}"])
    rv, bi, v = real.render_validation, real.batch_infer, real.train_lora.validation
    assert (rv.num_inference_steps, rv.guidance_scale, rv.face_scale) == (bi.num_inference_steps, bi.guidance_scale, bi.face_scale)
    assert not hasattr(v, "num_inference_steps") and not hasattr(v, "guidance_scale")
    assert v.render_every > 0 and v.num_clips >= 2 and real.train_lora.holdout_clips >= v.num_clips
    assert rv.gate.min_facesim_gain > 0 and rv.gate.min_face_detection_rate > 0 and rv.gate.min_facesim == 0.0
    assert (real.train_lora.lora.targets, real.train_lora.lora.rank, real.train_lora.lora.alpha) == ("main-attn-ffn", 32, 32)
    assert real.train_lora.timestep_sampling == "mid_weighted"


def test_a_checkpoint_from_before_the_gate_is_refused_with_what_to_do(params):
    """A Ray checkpoint written before the mapper had a scale and a gate cannot resume this mapper:
    a TrainingError that says to start afresh, not a state-dict traceback."""
    from faceid.errors import TrainingError
    from faceid.model.base_model import build_components
    from faceid.model.mapper import FaceMapper
    from faceid.train.step import FaceConditionedDiT, load_trainable_state, trainable_state

    model = FaceConditionedDiT(build_components(params.model)["transformer"], FaceMapper(128, params.model.tiny.text_dim, 4))
    state = trainable_state(model)
    load_trainable_state(model, state)  # today's checkpoints resume
    with pytest.raises(TrainingError, match="older faceid.*delete the checkpoint"):
        load_trainable_state(model, {k: v for k, v in state.items() if k != "mapper.gate_param"})
