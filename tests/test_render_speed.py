"""Rendering's fast paths on the tiny profile (CPU): prompts encoded once per distinct text
(faceid.model.prompts, counted on the real tiny text encoder's forward calls) with outputs equal to
the uncached path; ``model.compile`` (faceid.model.compiled): the repeated blocks compiled in the
rendering pipelines only, an ``--identity`` pipeline's LoRA fused and nothing else rendered with it,
and (extended: CPU inductor compiles for ~30 s) the compiled output equal to the eager one within
the tolerance below."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from faceid.errors import FaceidError
from test_infer import make_identity, small, write_pose_video

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")

# compiled (LoRA fused) vs eager (LoRA unfused) frames, uint8: inductor reorders float32 sums and the
# fused weight W + s B A rounds differently from W x + s B (A x). Seen on the tiny model: 1 grey level
# at most, on < 0.01 % of the values
MAX_LEVELS, MAX_SHARE = 2, 0.001


@pytest.fixture(scope="module")
def world(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("speed")
    p = small(params)
    return {"root": root, "params": p, "a": make_identity(root / "a", p, "a", seed=1),
            "pose": write_pose_video(root / "pose.mp4", 9)}


def settings(**kw):
    from faceid.render import Settings

    return Settings(**{"face_scale": 1.0, "lora_scale": 1.0, "guidance_scale": 3.0, "num_inference_steps": 2, "seed": 0,
                       "prompt": "", **kw})


def count_forwards(module) -> list:
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append(1))
    return calls


def test_one_prompt_is_encoded_once_for_many_videos_with_the_uncached_output(world, tmp_path):
    from faceid.model.generate import generate_video
    from faceid.render import Generator, load_pose_video, render_one

    gen = Generator(world["params"])
    calls = count_forwards(gen.pipe.text_encoder)
    ident = gen.conditioning(str(world["a"]))
    pose = load_pose_video(world["pose"], "fix")
    rows = [render_one(gen, ident, world["pose"], tmp_path / f"{i}.mp4", settings(), "a person dancing", pose=pose)
            for i in range(2)]
    assert len(calls) == 2  # the prompt and the negative prompt (CFG), once for both videos
    assert rows[0]["prompt_encode_s"] > 0 and rows[1]["prompt_encode_s"] == 0
    assert gen.prompts.stats()["encoded"] == 2 and gen.prompts.stats()["hits"] == 2

    uncached = generate_video(gen.pipe, ident, pose[0], "a person dancing", face_scale=1.0, lora_scale=1.0,
                              guidance_scale=3.0, num_inference_steps=2, seed=0)
    assert len(calls) == 4  # no cache: both texts encoded again
    assert all(r["frames_sha256"] == rows[0]["frames_sha256"] for r in rows)
    assert hashlib.sha256(uncached.tobytes()).hexdigest() == rows[0]["frames_sha256"]

    # a new prompt encodes only itself (the negative is kept); the summary line adds the costs up
    gen.prompts.encode(gen.pipe, "a person waving", "")
    assert len(calls) == 5

    from faceid.batch import speed_lines

    ok = [{**r, "status": "ok"} for r in rows]
    assert speed_lines(ok)[0].startswith("  prompt encoding: 1 of 2 videos encoded a new prompt")


def test_the_cache_belongs_to_one_text_encoder(world):
    from faceid.model.generate import build_pipeline
    from faceid.model.prompts import PromptCache

    cache = PromptCache()
    pipe_a, pipe_b = build_pipeline(world["params"].model), build_pipeline(world["params"].model)
    calls_a, calls_b = count_forwards(pipe_a.text_encoder), count_forwards(pipe_b.text_encoder)
    cond, uncond = cache.encode(pipe_a, "a person dancing", "")
    assert uncond is not None and cache.encode(pipe_a, "a person dancing", None)[1] is None
    assert (len(calls_a), len(calls_b)) == (2, 0)
    cond_b, _ = cache.encode(pipe_b, "a person dancing", "")  # another encoder object: encoded again
    assert (len(calls_a), len(calls_b)) == (2, 2)
    assert cond.equal(cond_b)  # same seed, same tiny weights


def test_model_compile_wraps_the_blocks_of_rendering_pipelines_and_fuses_one_identity(world, capsys):
    from faceid.config import params_from_dict, to_dict
    from faceid.model.compiled import is_compiled
    from faceid.model.generate import build_pipeline
    from faceid.model.lora import fused_adapters
    from faceid.render import Generator

    p = params_from_dict(to_dict(world["params"]), ["model.compile=true"])
    gen = Generator(p)
    assert is_compiled(gen.pipe.transformer) and gen.compile_clock is not None
    assert not is_compiled(build_pipeline(p.model).transformer)  # training builds its own: not compiled
    assert not is_compiled(Generator(world["params"]).pipe.transformer)  # model.compile false

    # --identity: its LoRA is fused at face_scale x lora_scale; nothing else renders with that pipeline
    assert gen.fuse_identity(str(world["a"]), settings(face_scale=0.5))
    assert fused_adapters(gen.pipe.transformer) == {next(iter(gen.pipe.get_list_adapters()["transformer"]))}
    pose = np.zeros((5, 32, 32, 3), np.uint8)
    a = gen.conditioning(str(world["a"]))
    for conditioning, s in ((a, settings(face_scale=1.0)), ([(a, 0.5), (a, 0.5)], settings(face_scale=0.5)),
                            (None, settings(face_scale=0.5))):
        with pytest.raises(FaceidError, match="fused at weight 0.5"):
            gen.generate(conditioning, pose, "a person", s)
    assert not Generator(world["params"]).fuse_identity(str(world["a"]), settings())  # uncompiled: never fused


@pytest.mark.extended
def test_compiled_render_equals_the_eager_one_within_tolerance(world, tmp_path):
    from faceid.config import params_from_dict, to_dict
    from faceid.render import Generator, load_pose_video, render_one

    pose = load_pose_video(world["pose"], "fix")
    eager = Generator(world["params"])
    ref = render_one(eager, eager.conditioning(str(world["a"])), world["pose"], tmp_path / "eager.mp4", settings(),
                     "a person", pose=pose)
    assert ref["compile_s"] is None
    fast = Generator(params_from_dict(to_dict(world["params"]), ["model.compile=true"]))
    assert fast.fuse_identity(str(world["a"]), settings())
    rows = [render_one(fast, fast.conditioning(str(world["a"])), world["pose"], tmp_path / f"fast{i}.mp4", settings(),
                       "a person", pose=pose) for i in range(2)]
    assert rows[0]["compile_s"] > 0 and rows[1]["compile_s"] is None  # compiled once, on the first video
    assert rows[0]["frames_sha256"] == rows[1]["frames_sha256"]
    # the frames themselves (the MP4 adds its own rounding): rendered again, not written
    frames_eager = eager.generate(eager.conditioning(str(world["a"])), pose[0], "a person", settings())
    frames_fast = fast.generate(fast.conditioning(str(world["a"])), pose[0], "a person", settings())
    diff = np.abs(frames_eager.astype(int) - frames_fast.astype(int))
    assert diff.max() <= MAX_LEVELS and (diff > 0).mean() <= MAX_SHARE, (diff.max(), (diff > 0).mean())
