"""The key test: identity conditioning really works (tiny scale, CPU, fixed seeds).

Synthetic task. The tiny base model is random, so first it is "pretrained" (all DiT weights,
a few hundred steps) to generate two appearances A and B from text ("a person in red/blue") and
either of them for the neutral caption "a person dancing" -- as a real base model can draw many
people. Its VAE is random too, so the appearances are defined as latent videos (per-channel
constants, B = -A) and compared after decoding through the same VAE.

Then the real recipe (stage 1 mapper only, stage 2 mapper + LoRA) trains face conditioning on the
neutral caption: identity A's embedding -> appearance A, B's -> B. Identity folders are saved and
loaded into a fresh pipeline; ``generate_video`` must reproduce A for A and B for B (as well as
the base reproduces them from words), lose the distinction at ``face_scale=0`` and land in between
for a 50/50 blend.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F, H, W = 9, 32, 32
CAPTION = "a person dancing"
PRETRAIN_STEPS, STAGE1_STEPS, STAGE2_STEPS = 600, 150, 150


def pose_video() -> np.ndarray:
    pose = np.zeros((F, H, W, 3), np.uint8)
    for f in range(F):
        pose[f, 8:20, 2 + 2 * f : 14 + 2 * f] = 255
    return pose


@pytest.fixture(scope="module")
def trained(params, tmp_path_factory):
    from faceid.config import params_from_dict, to_dict
    from faceid.model.generate import build_pipeline, encode_text
    from faceid.model.identity import load_identity, save_identity
    from faceid.model.lora import add_lora, lora_parameters
    from faceid.model.mapper import FaceMapper
    from faceid.train import recipe
    from faceid.train.cache import encode_clip

    out = tmp_path_factory.mktemp("conditioning")
    p = params_from_dict(to_dict(params), [
        f"train_lora.stage1.steps={STAGE1_STEPS}", f"train_lora.stage2.steps={STAGE2_STEPS}",
        "train_lora.stage1.learning_rate=0.01", "train_lora.stage2.learning_rate=0.005",
        "train_lora.batch_size=2", "train_lora.checkpoint_every=100000", "train_lora.face_dropout=0.1",
    ])
    tcfg = p.train_lora
    pipe = build_pipeline(p.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    pose = pose_video()
    control = encode_clip(pipe, pose, pose, CAPTION)["control"]
    gen = torch.Generator().manual_seed(0)
    lat_a = torch.randn(16, 1, 1, 1, generator=gen).expand(16, 3, 4, 4).clone()
    lat_b = -lat_a
    emb_a = torch.nn.functional.normalize(torch.randn(128, generator=gen), dim=0)
    emb_b = torch.nn.functional.normalize(torch.randn(128, generator=gen), dim=0)
    with torch.no_grad():
        text = {c: encode_text(pipe, c)[0] for c in (CAPTION, "a person in red", "a person in blue")}

    def example(caption, latent, emb):
        return {"target": latent, "control": control, "text": text[caption], "embedding": emb}

    common = dict(device=torch.device("cpu"), noise_scheduler=recipe.training_scheduler(p.model.flow_shift))
    transformer = pipe.transformer

    # 0. "Pretrain" the tiny base model (all DiT weights; face tokens always the null face)
    base = recipe.FaceConditionedDiT(transformer, FaceMapper(128, p.model.tiny.text_dim, tcfg.num_face_tokens))
    # the base knows a continuum of appearances between A and B (as a real base model knows many faces)
    pre = [example("a person in red", lat_a, emb_a), example("a person in blue", lat_b, emb_b)]
    pre += [example(CAPTION, s * lat_a, emb_a) for s in (1.0, 0.5, 0.0, -0.5, -1.0)]
    recipe.run_stage("pretrain", base, list(transformer.parameters()), pre,
                     dataclasses.replace(tcfg.stage1, steps=PRETRAIN_STEPS, learning_rate=0.005),
                     dataclasses.replace(tcfg, face_dropout=1.0, batch_size=7), {"step": 0, "history": []},
                     first_step=0, **common)
    transformer.requires_grad_(False)
    base_weights = copy.deepcopy(transformer.state_dict())

    # 1. The recipe's two stages on the face-conditioned task (neutral caption for both identities)
    torch.manual_seed(tcfg.seed)
    mapper = FaceMapper(128, p.model.tiny.text_dim, tcfg.num_face_tokens, tcfg.mapper_hidden_dim)
    add_lora(transformer, tcfg.lora)
    model = recipe.FaceConditionedDiT(transformer, mapper)
    data = [example(CAPTION, lat_a, emb_a), example(CAPTION, lat_b, emb_b)]
    state = {"step": 0, "history": []}
    before = {n: t.detach().clone() for n, t in model.named_parameters()}
    recipe.run_stage("stage1", model, list(mapper.parameters()), data, tcfg.stage1, tcfg, state, first_step=0, **common)
    after_stage1 = {n: t.detach().clone() for n, t in model.named_parameters()}
    recipe.run_stage("stage2", model, list(mapper.parameters()) + lora_parameters(transformer), data, tcfg.stage2,
                     tcfg, state, first_step=STAGE1_STEPS, **common)
    after = {n: t.detach().clone() for n, t in model.named_parameters()}

    for name, emb in (("A", emb_a), ("B", emb_b)):
        save_identity(out / name, name=name, card={"base_model": "tiny-pretrained-in-test", "embedder": "dlib"},
                      mapper=mapper, embedding=emb, transformer=transformer, loss_rows=state["history"])

    # 2. A fresh pipeline with the pretrained base weights; identities loaded from their folders
    fresh = build_pipeline(p.model, torch.device("cpu"))
    fresh.set_progress_bar_config(disable=True)
    fresh.transformer.load_state_dict(base_weights)
    ident_a, ident_b = load_identity(out / "A"), load_identity(out / "B")

    def decode(latent):
        cfg = fresh.vae.config
        z = latent[None] * torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
        with torch.no_grad():
            video = fresh.vae.decode(z).sample
        return np.round(fresh.video_processor.postprocess_video(video, output_type="np")[0] * 255)

    return dict(pipe=fresh, a=ident_a, b=ident_b, pose=pose, ref_a=decode(lat_a), ref_b=decode(lat_b),
                history=state["history"], before=before, after_stage1=after_stage1, after=after)


def dist(x, y) -> float:
    return float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).mean())


def position(video, ref_a, ref_b) -> float:
    """Projection of ``video`` on the segment ref_a -> ref_b (0 = A, 1 = B)."""
    v = (ref_b - ref_a).ravel()
    return float((video.astype(np.float64) - ref_a).ravel() @ v / (v @ v))


def gen(t, who, face_scale=1.0, guidance=1.0, seed=0):
    from faceid.model.generate import generate_video

    return generate_video(t["pipe"], who, t["pose"], CAPTION, face_scale=face_scale, guidance_scale=guidance,
                          num_inference_steps=10, seed=seed)


def test_only_mapper_and_lora_learn_and_loss_decreases(trained):
    h = trained["history"]
    s1 = [r["loss"] for r in h if r["stage"] == "stage1"]
    s2 = [r["loss"] for r in h if r["stage"] == "stage2"]
    assert np.mean(s2[-30:]) < np.mean(s1[:30])
    changed1 = {n for n in trained["before"] if not torch.equal(trained["before"][n], trained["after_stage1"][n])}
    changed2 = {n for n in trained["before"] if not torch.equal(trained["after_stage1"][n], trained["after"][n])}
    assert changed1 and all(n.startswith("mapper.") for n in changed1)  # stage 1: mapper only
    assert any("lora_" in n for n in changed2)
    assert all(n.startswith("mapper.") or "lora_" in n for n in changed2)  # stage 2: mapper + LoRA, DiT frozen


def base_position(t, caption) -> float:
    """Where the base model itself lands for an explicit text prompt (its best reproduction)."""
    from faceid.model.generate import generate_video

    video = generate_video(t["pipe"], None, t["pose"], caption, face_scale=1.0, guidance_scale=1.0,
                           num_inference_steps=10, seed=0)
    return position(video, t["ref_a"], t["ref_b"])


def test_identity_selects_its_target(trained):
    ra, rb = trained["ref_a"], trained["ref_b"]
    out_a, out_b = gen(trained, trained["a"]), gen(trained, trained["b"])
    pa, pb = position(out_a, ra, rb), position(out_b, ra, rb)
    # A lands on A's side, B on B's side, clearly apart
    assert pb - pa > 0.15, (pa, pb)
    assert dist(out_a, ra) < dist(out_b, ra) and dist(out_b, rb) < dist(out_a, rb)
    # ... and as close to each target as the tiny base model gets when told the appearance in words
    # (the tiny random-VAE base under-shoots both targets; that limit is the base's, not the adapter's)
    assert abs(pa - base_position(trained, "a person in red")) < 0.1
    assert abs(pb - base_position(trained, "a person in blue")) < 0.1


def test_face_scale_zero_loses_the_distinction(trained):
    a0, b0 = gen(trained, trained["a"], face_scale=0.0), gen(trained, trained["b"], face_scale=0.0)
    a1, b1 = gen(trained, trained["a"]), gen(trained, trained["b"])
    assert dist(a0, b0) < 0.1 * dist(a1, b1)


def test_blend_lands_between(trained):
    ra, rb = trained["ref_a"], trained["ref_b"]
    pa = position(gen(trained, trained["a"]), ra, rb)
    pb = position(gen(trained, trained["b"]), ra, rb)
    pm = position(gen(trained, [(trained["a"], 0.5), (trained["b"], 0.5)]), ra, rb)
    assert pa + 0.05 < pm < pb - 0.05, (pa, pm, pb)


def test_classifier_free_guidance_keeps_identity(trained):
    ra, rb = trained["ref_a"], trained["ref_b"]
    pa = position(gen(trained, trained["a"], guidance=3.0), ra, rb)
    pb = position(gen(trained, trained["b"], guidance=3.0), ra, rb)
    assert pb - pa > 0.15, (pa, pb)
