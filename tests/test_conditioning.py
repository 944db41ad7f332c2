"""The key test: the adapter learns the person in the PHOTOS, not the dancers in the clips
(tiny scale, CPU, fixed seeds, the recipe's own sampling, loss and two stages).

Synthetic world. The tiny base model is random, so first it is "pretrained" (all DiT weights) to
draw a person wherever the pose control puts one, with an appearance from a continuum (A, C, their
opposites and mixes) for the neutral caption, and A or C when the caption names it ("a person in
red / blue") — as a real base model follows poses, draws many people and is steered by words — on
1-frame images and 9-frame videos alike (Wan is trained on both). Its VAE is random too, so an
appearance is a latent direction: target latents are ``appearance x person mask`` (the mask follows
the pose video), compared after decoding through the same VAE. The base is a little wider than
params.yaml's tiny model (4 heads of 32): at width 32 a DiT cannot even pass a 64-value patch of
noise through, so it could not learn to denoise at all.

The real situation: the identity's photos show appearance A (1-frame examples, each with its own
pose and its own embedding); the dance clips show a different person, appearance C, moving with
their poses. Trained the new way (photos = identity examples with face tokens; clips = motion prior
with the null face; stage 1 photos only, stage 2 mixed by ``identity_share``), the identity rendered
on a held-out pose video looks like A. Trained the old way (the clips as identity targets under the
identity's embedding), it looks like C: the test documents why the design changed. The output
follows the pose: on two pose videos, each output is closer to the person drawn at its own pose
than at the other one.

The random tiny VAE barely reacts to its input (the latents of a white and a black frame differ by
~0.04 after normalisation), so no model could follow a pose through it; the test scales its
encoder's output projection x25 — a stand-in for a trained VAE whose latents carry the picture.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

F, H, W, S = 9, 64, 64, 8  # frames, pixels, VAE scale
CAPTION, RED, BLUE = "a person dancing", "a person in red", "a person in blue"  # RED draws A, BLUE draws C
PRETRAIN_STEPS, STAGE1_STEPS, STAGE2_STEPS = 700, 120, 200
VALIDATE_EVERY = 40


def rect_pose(x0: int, y0: int, dx: int, dy: int = 0, frames: int = F, size=(32, 24)) -> np.ndarray:
    """A pose video: a white "person" block (h x w = ``size``) moving by (dx, dy) px per frame."""
    pose = np.zeros((frames, H, W, 3), np.uint8)
    for f in range(frames):
        y, x = y0 + dy * f, x0 + dx * f
        pose[f, max(y, 0): y + size[0], max(x, 0): x + size[1]] = 255
    return pose


def latent_mask(pose: np.ndarray) -> torch.Tensor:
    """``[f, H/8, W/8]``: the person's area in each latent frame (frame 0, then frames 4t)."""
    frames = [0] + [4 * t for t in range(1, (len(pose) - 1) // 4 + 1)]
    m = torch.from_numpy((pose[frames, :, :, 0] > 0).astype(np.float32))
    return torch.nn.functional.avg_pool2d(m[:, None], S)[:, 0].round()


def build(p):
    """The tiny pipeline with an encoder whose latents carry the picture (see the module doc)."""
    from faceid.model.generate import build_pipeline

    pipe = build_pipeline(p.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.vae.quant_conv.weight.mul_(25.0)
    return pipe


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are microseconds long: one thread is ~10x faster than two that spin
    against each other (and than many on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(params, tmp_path_factory, one_thread):
    """Pretrained tiny base + the identity trained the new way and the old way (identity folders)."""
    from faceid.config import params_from_dict, to_dict
    from faceid.model.generate import build_pipeline, encode_text
    from faceid.model.identity import load_identity, save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper, caption_token_rms
    from faceid.train import recipe
    from faceid.train.cache import encode_example
    from faceid.train.examples import IDENTITY, PRIOR
    from faceid.train.validation import Validation

    p = params_from_dict(to_dict(params), [
        f"train_lora.stage1.steps={STAGE1_STEPS}", f"train_lora.stage2.steps={STAGE2_STEPS}",
        "train_lora.stage1.learning_rate=0.01", "train_lora.stage2.learning_rate=0.005",
        "train_lora.batch_size=4", "train_lora.checkpoint_every=100000", "train_lora.face_dropout=0.1",
        "train_lora.identity_share=0.5",
        "model.tiny.num_attention_heads=4", "model.tiny.attention_head_dim=32", "model.tiny.ffn_dim=256",
    ])
    tcfg = p.train_lora
    pipe = build(p)
    gen = torch.Generator().manual_seed(0)
    app_a = torch.randn(16, generator=gen)
    app_c = torch.randn(16, generator=gen)
    app_c = app_c - (app_c @ app_a) / (app_a @ app_a) * app_a  # C orthogonal to A, same norm
    app_c = app_c * app_a.norm() / app_c.norm()
    emb_a = torch.nn.functional.normalize(torch.randn(128, generator=gen), dim=0)
    with torch.no_grad():
        text = {c: encode_text(pipe, c)[0] for c in (CAPTION, RED, BLUE)}
    controls: dict[bytes, torch.Tensor] = {}

    def example(pose, appearance, emb, face: bool, example_id: str, caption: str = CAPTION) -> dict:
        key = pose.tobytes()
        if key not in controls:
            controls[key] = encode_example(pipe, pose, pose, CAPTION)["control"]
        target = appearance.view(16, 1, 1, 1) * latent_mask(pose)[None]
        return {"target": target, "control": controls[key], "text": text[caption], "embedding": emb, "face": torch.tensor(face),
                "weight": torch.ones(target.shape[1:]), "ref_frames": 0, "example_id": example_id,
                "role": IDENTITY if face else PRIOR}

    # the identity's photos: appearance A, six 1-frame shots in their own poses, each its own embedding
    photo_poses = [rect_pose(x, y, 0, frames=1) for x, y in ((4, 4), (20, 8), (40, 4), (8, 32), (28, 36), (44, 30))]
    photo_embs = [torch.nn.functional.normalize(emb_a + 0.05 * torch.randn(128, generator=gen), dim=0) for _ in photo_poses]
    photos = [example(pp, app_a, e, True, f"photo:{i}") for i, (pp, e) in enumerate(zip(photo_poses, photo_embs))]
    # the dance clips: another person (appearance C) moving
    clip_poses = [rect_pose(2, 6, 3), rect_pose(40, 30, -3), rect_pose(20, 2, 1, 3), rect_pose(30, 36, -2, -3)]
    held_out = [rect_pose(36, 34, -3, -1), rect_pose(44, 10, -2, 3)]  # never seen in any training

    # 0. "Pretrain" the base: follow the pose, draw any appearance of the continuum (null face always)
    base = recipe.FaceConditionedDiT(pipe.transformer, FaceMapper(128, p.model.tiny.text_dim, tcfg.num_face_tokens))
    pretrain = []
    for k, appearance in enumerate((app_a, app_c, -app_a, -app_c, (app_a + app_c) / 2, (app_a - app_c) / 2)):
        poses = photo_poses[k % 3::3] + clip_poses[k % 2::2] + [rect_pose(6 * k, 12, 2), rect_pose(50 - 5 * k, 28, 0, frames=1)]
        pretrain += [example(pp, appearance, emb_a, False, f"pre:{k}") for pp in poses]
    for k, pp in enumerate(photo_poses + clip_poses + [rect_pose(6 * k, 12, 2) for k in range(4)]):
        pretrain += [example(pp, app_a, emb_a, False, f"red:{k}", RED), example(pp, app_c, emb_a, False, f"blue:{k}", BLUE)]
    common = dict(device=torch.device("cpu"), noise_scheduler=recipe.training_scheduler(p.model.flow_shift))
    recipe.run_stage("pretrain", base, list(pipe.transformer.parameters()), {IDENTITY: pretrain, PRIOR: []}, 1.0,
                     dataclasses.replace(tcfg.stage1, steps=PRETRAIN_STEPS, learning_rate=0.005),
                     dataclasses.replace(tcfg, face_dropout=1.0, batch_size=8), {"step": 0, "history": []},
                     first_step=0, **common)
    pipe.transformer.requires_grad_(False)
    base_weights = copy.deepcopy(pipe.transformer.state_dict())
    out = tmp_path_factory.mktemp("conditioning")

    def train(name: str, pools: dict, held_out: dict | None = None) -> tuple[dict, object, object]:
        fresh = build_pipeline(p.model, torch.device("cpu"))
        fresh.transformer.load_state_dict(base_weights)
        torch.manual_seed(tcfg.seed)
        mapper = FaceMapper(128, p.model.tiny.text_dim, tcfg.num_face_tokens, tcfg.mapper_hidden_dim)
        mapper.calibrate(caption_token_rms(ex["text"] for pool in pools.values() for ex in pool))  # as the recipe does
        add_lora(fresh.transformer, tcfg.lora)
        model = recipe.FaceConditionedDiT(fresh.transformer, mapper)
        if name == "new":  # the untrained adapter, as training starts it
            save_identity(out / "start", name="start", card={"base_model": "tiny-pretrained-in-test", "embedder": "dlib"},
                          mapper=mapper, embedding=emb_a, transformer=fresh.transformer)
        state = {"step": 0, "history": []}
        validation = None
        if held_out is not None:  # measures only: the training itself is the same with or without it
            vcfg = dataclasses.replace(tcfg.validation, validate_every=VALIDATE_EVERY)
            validation = Validation(vcfg, held_out, state.setdefault("validation", {}), seed=tcfg.seed,
                                    final_step=STAGE1_STEPS + STAGE2_STEPS, timestep_sampling=tcfg.timestep_sampling,
                                    amp_dtype=None, **common)
        recipe.fit(model, pools, tcfg, state, validation=validation, **common)
        save_identity(out / name, name=name, card={"base_model": "tiny-pretrained-in-test", "embedder": "dlib"},
                      mapper=mapper, embedding=emb_a, transformer=fresh.transformer, loss_rows=state["history"])
        return state, model, validation

    # 1. The new way: photos are identity examples, the clips a motion prior with the null face; held out
    #    for validation: a seventh photo of A (a pose and an embedding of its own) and an unseen dance of C
    clips_prior = [example(cp, app_c, emb_a, False, f"clip:{i}") for i, cp in enumerate(clip_poses)]
    held_emb = torch.nn.functional.normalize(emb_a + 0.05 * torch.randn(128, generator=gen), dim=0)
    held_photo = example(rect_pose(16, 20, 0, frames=1), app_a, held_emb, True, "photo:held")
    held_clip = example(held_out[0], app_c, emb_a, False, "clip:held")
    new_state, new_model, validation = train("new", {IDENTITY: photos, PRIOR: clips_prior},
                                             held_out={IDENTITY: [held_photo], PRIOR: [held_clip]})
    # 2. The old way: the clips are the identity's targets (under its mean embedding), no photo
    clips_as_identity = [example(cp, app_c, emb_a, True, f"clip:{i}") for i, cp in enumerate(clip_poses)]
    old_state = train("old", {IDENTITY: clips_as_identity, PRIOR: []})[0]

    # 3. A fresh pipeline with the pretrained base weights; identities loaded from their folders
    render = build(p)
    render.transformer.load_state_dict(base_weights)

    def decode(latent):
        cfg = render.vae.config
        z = latent[None] * torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1) + torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
        with torch.no_grad():
            video = render.vae.decode(z).sample
        return np.round(render.video_processor.postprocess_video(video, output_type="np")[0] * 255)

    refs = [{"A": decode(app_a.view(16, 1, 1, 1) * latent_mask(hp)[None]),
             "C": decode(app_c.view(16, 1, 1, 1) * latent_mask(hp)[None])} for hp in held_out]
    return dict(pipe=render, new=load_identity(out / "new"), old=load_identity(out / "old"), held_out=held_out, refs=refs,
                start=load_identity(out / "start"),
                new_history=new_state["history"], old_history=old_state["history"], photos=photos, clips=clips_prior,
                new_model=new_model, validation=validation)


def gen(world, who, pose, face_scale=1.0, guidance=1.0, seed=0, caption=CAPTION):
    from faceid.model.generate import generate_video

    return generate_video(world["pipe"], who, pose, caption, face_scale=face_scale, lora_scale=1.0, guidance_scale=guidance,
                          num_inference_steps=10, seed=seed)


def position(video, ref_a, ref_c) -> float:
    """Projection of ``video`` on the segment A -> C (0 = A, 1 = C)."""
    v = (ref_c - ref_a).ravel()
    return float((video.astype(np.float64) - ref_a).ravel() @ v / (v @ v))


def test_stage1_trains_on_photos_only_and_stage2_mixes_in_the_prior(world):
    from faceid.train.examples import IDENTITY, PRIOR
    from faceid.train.recipe import make_batch

    pools = {IDENTITY: world["photos"], PRIOR: world["clips"]}
    stage1 = [make_batch(pools, 1.0, s, 0, 4, 0) for s in range(40)]
    assert all(b["face"].all() and b["target"].shape[2] == 1 for b in stage1)  # 1-frame photos, face tokens on
    stage2 = [make_batch(pools, 0.5, s, 0, 4, 0) for s in range(200)]
    prior = [b for b in stage2 if not b["face"].any()]
    assert 0.35 < len(prior) / len(stage2) < 0.65  # identity_share 0.5
    assert all(b["target"].shape[2] == 3 for b in prior)  # prior batches are the 9-frame clips, null face
    stages = [r["stage"] for r in world["new_history"]]
    assert stages == ["stage1"] * STAGE1_STEPS + ["stage2"] * STAGE2_STEPS


def words(world, k: int) -> tuple[float, float]:
    """Where the base itself lands on held-out pose ``k`` when the caption names A, and C: its best
    reproduction of each (the tiny base and its random decoder under-shoot both)."""
    pose, ref = world["held_out"][k], world["refs"][k]
    return (position(gen(world, None, pose, caption=RED), ref["A"], ref["C"]),
            position(gen(world, None, pose, caption=BLUE), ref["A"], ref["C"]))


def test_identity_looks_like_the_photos_not_the_dancers(world):
    for k, (pose, ref) in enumerate(zip(world["held_out"], world["refs"])):
        new = position(gen(world, world["new"], pose), ref["A"], ref["C"])
        old = position(gen(world, world["old"], pose), ref["A"], ref["C"])
        red, blue = words(world, k)
        span = blue - red
        assert span > 0.2, (red, blue)  # the base draws A and C apart (through its random decoder)
        # trained on its photos, the identity is rendered as A on an unseen dance, as close to A as the
        # base gets when told "A" in words ...
        assert abs(new - red) < 0.25 * span, (new, red, blue)
        # ... while the old design (clips as the identity's targets) learns the dancer C
        assert abs(old - blue) < 0.25 * span, (old, red, blue)
        assert old - new > 0.6 * span, (new, old, span)


def test_the_untrained_adapter_is_close_to_the_base(world):
    """Step 0 (the face-token gate closed, LoRA B at zero) renders within 10 % of the change the trained
    identity makes to the base (face_scale 0) on the held-out poses (issue 20)."""
    for pose in world["held_out"]:
        base = gen(world, world["start"], pose, face_scale=0.0).astype(np.float64)
        start = float(np.abs(gen(world, world["start"], pose) - base).mean())
        trained = float(np.abs(gen(world, world["new"], pose) - base).mean())
        assert start < 0.1 * trained, (start, trained)


def test_output_follows_the_pose(world):
    def dist(x, y) -> float:
        return float(np.abs(x.astype(np.float64) - y).mean())

    (p1, p2), (r1, r2) = world["held_out"], world["refs"]
    out1, out2 = gen(world, world["new"], p1), gen(world, world["new"], p2)
    # each output is the identity drawn at its own pose, not at the other one
    assert dist(out1, r1["A"]) < dist(out1, r2["A"]) and dist(out2, r2["A"]) < dist(out2, r1["A"])
    assert dist(out1, out2) > 0.5 * dist(r1["A"], r2["A"])  # the outputs differ as much as the poses do


def test_classifier_free_guidance_keeps_the_identity(world):
    pose, ref = world["held_out"][0], world["refs"][0]
    red, blue = words(world, 0)
    assert position(gen(world, world["new"], pose, guidance=3.0), ref["A"], ref["C"]) < red + 0.25 * (blue - red)


def test_held_out_loss_is_deterministic_and_falls_as_the_identity_is_learnt(world):
    """Validation during training (``faceid.train.validation``) on examples never trained on: a photo
    of A in an unseen pose, an unseen dance of C. The held-out identity loss (fixed noise, fixed
    timesteps) falls over the run as the training loss does, from the untrained adapter at step 0;
    measured twice on the trained model it gives the same numbers, equal to the last point's."""
    validation, model = world["validation"], world["new_model"]
    points = validation.state["points"]
    assert [pt["step"] for pt in points] == list(range(0, STAGE1_STEPS + STAGE2_STEPS + 1, VALIDATE_EVERY))
    history = world["new_history"]
    for stage in ("stage1", "stage2"):  # the training loss falls in each stage ...
        losses = [h["loss"] for h in history if h["stage"] == stage]
        assert np.mean(losses[-20:]) < 0.85 * np.mean(losses[:20]), stage
    first, last = points[0]["identity_loss"], points[-1]["identity_loss"]
    assert last < 0.65 * first, (first, last)  # ... and so does the held-out identity loss (0.16 -> 0.08)
    # the held-out prior loss (null face; it rises while stage 1 moves the null face) ends near where it
    # started: stage 2's prior examples keep the motion prior
    assert points[-1]["prior_loss"] < 1.2 * points[0]["prior_loss"], [pt["prior_loss"] for pt in points]
    again = [validation.losses(model) for _ in range(2)]
    assert again[0] == again[1] == {"identity_loss": last, "prior_loss": points[-1]["prior_loss"]}
    # the best step is the lowest held-out identity loss after step 0, and its weights were kept
    best = min(points[1:], key=lambda pt: pt["identity_loss"])
    assert validation.state["best"]["step"] == best["step"] and validation.best_weights is not None
