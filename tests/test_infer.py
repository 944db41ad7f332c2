"""faceid infer: one video per pose video on the tiny profile (CPU); identity from a folder or the
MLflow registry; blends and interpolation endpoints equal the pure identities; bad input is one
clear error (unreadable video, frame count, size, incompatible identity, GPU out of memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from faceid.config import params_from_dict, to_dict
from faceid.errors import FaceidError, InputError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

H = W = 32


def make_identity(folder: Path, params, name: str, seed: int) -> Path:
    """An identity folder as train-lora writes it: a random mapper, null face and non-zero LoRA
    (so identities differ), saved with the training engineer's ``save_identity``."""
    import torch

    from faceid.model.components import base_model_id, build_components
    from faceid.model.identity import save_identity
    from faceid.model.lora import add_lora
    from faceid.model.mapper import FaceMapper

    transformer = build_components(params.model)["transformer"]
    gen = torch.Generator().manual_seed(seed)
    mapper = FaceMapper(128, params.model.tiny.text_dim, params.train_lora.num_face_tokens)
    add_lora(transformer, params.train_lora.lora)
    with torch.no_grad():
        for p in list(mapper.parameters()) + [p for n, p in transformer.named_parameters() if "lora_" in n]:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    embedding = torch.nn.functional.normalize(torch.randn(128, generator=gen), dim=0)
    card = {"base_model": base_model_id(params.model), "profile": params.model.profile,
            "embedder": params.embed_faces.embedder, "train": {"seed": seed}}
    return save_identity(folder, name=name, card=card, mapper=mapper, embedding=embedding, transformer=transformer)


def copy_with_card(src: Path, dst: Path, **card_changes) -> Path:
    """A copy of the identity folder ``src`` whose identity.json has ``card_changes`` applied."""
    shutil.copytree(src, dst)
    card = json.loads((dst / "identity.json").read_text())
    card.update(card_changes)
    (dst / "identity.json").write_text(json.dumps(card))
    return dst


def write_pose_video(path: Path, num_frames: int, height: int = H, width: int = W, fps: int = 16) -> Path:
    from faceid.pose.video import write_video

    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    for f in range(num_frames):
        frames[f, 4:20, 2 + f : 10 + f] = (255, 128, 0)
    write_video(path, frames, fps)
    return path


def small(params, **kw):
    overrides = ["batch_infer.num_inference_steps=2"] + [f"{k.replace('__', '.')}={v}" for k, v in kw.items()]
    return params_from_dict(to_dict(params), overrides)


def read(path: Path) -> np.ndarray:
    from faceid.pose.video import read_video

    return read_video(path)[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory, params):
    root = tmp_path_factory.mktemp("infer")
    p = small(params)
    a = make_identity(root / "a", p, "a", seed=1)
    b = make_identity(root / "b", p, "b", seed=2)
    pose = write_pose_video(root / "pose.mp4", 11)  # 11 frames -> 9 (4n+1) with policy "fix"
    return {"root": root, "params": p, "a": a, "b": b, "pose": pose}


@pytest.fixture(scope="module")
def generator(world):
    from faceid.infer import Generator

    return Generator(world["params"])


# --------------------------------------------------------------------------- pure helpers


def test_parse_blend_and_interpolate():
    from faceid.infer import parse_blend, parse_interpolate

    assert parse_blend("a=0.7, models:/faceid-b@validated=0.3") == [("a", 0.7), ("models:/faceid-b@validated", 0.3)]
    for bad, msg in [("a=0.7,b=0.2", "sum to 1"), ("a", "NAME=WEIGHT"), ("a=x", "not a number"), ("a=-1,b=2", ">= 0")]:
        with pytest.raises(InputError, match=msg):
            parse_blend(bad)
    assert parse_interpolate("a,b") == ("a", "b")
    assert parse_interpolate("b", identity="a") == ("a", "b")
    with pytest.raises(InputError, match="two identities"):
        parse_interpolate("a,b,c")


def test_frame_count_policy():
    from faceid.infer import frames_to_keep

    assert frames_to_keep(17, "reject") == 17
    assert frames_to_keep(20, "fix") == 17
    with pytest.raises(InputError, match="not 4n\\+1.*frame_count_policy=fix"):
        frames_to_keep(20, "reject")
    with pytest.raises(InputError, match="at least 5"):
        frames_to_keep(3, "fix")


# --------------------------------------------------------------------------- end to end


def test_infer_one_writes_the_pose_videos_frames_size_and_fps(world, capsys):
    from faceid.infer import infer_one
    from faceid.pose.video import probe

    out = world["root"] / "out" / "a.mp4"
    row = infer_one(world["params"], str(world["a"]), world["pose"], out, seed=3, prompt="a person dancing")
    info = probe(out)
    assert (info["frames"], info["height"], info["width"]) == (9, H, W)
    assert info["fps"] == pytest.approx(16.0)
    assert row["seed"] == 3 and row["num_inference_steps"] == 2 and row["trimmed_frames"] == 2
    assert row["identity"] == "a" and row["generate_s"] > 0
    assert "wrote" in capsys.readouterr().out


def test_identity_from_the_mlflow_registry(world, tmp_path):
    from faceid import tracking
    from faceid.infer import infer_one, resolve_identity
    from faceid.train.launch import log_to_mlflow

    uri = tracking.local_store_uri(tmp_path / "mlruns")
    log_to_mlflow(world["params"], "a", world["a"], {}, uri)
    folder = resolve_identity("models:/faceid-a@candidate", uri)
    assert json.loads((folder / "identity.json").read_text()) == json.loads((world["a"] / "identity.json").read_text())

    out_reg, out_dir = tmp_path / "reg.mp4", tmp_path / "dir.mp4"
    reg = infer_one(world["params"], "models:/faceid-a@candidate", world["pose"], out_reg, mlflow_uri=uri)
    direct = infer_one(world["params"], str(world["a"]), world["pose"], out_dir)
    assert reg["frames_sha256"] == direct["frames_sha256"]

    with pytest.raises(InputError, match="faceid-a@nope.*MLflow registry"):
        resolve_identity("models:/faceid-a@nope", uri)


def test_blend_and_interpolation_endpoints_equal_the_pure_identities(world, generator):
    from faceid.infer import load_pose_video, settings_from

    g, s = generator, settings_from(world["params"])
    pose, _, _ = load_pose_video(world["pose"], "fix")
    a, b = str(world["a"]), str(world["b"])

    def render(cond):
        return g.generate(cond, pose, "a person dancing", s)

    pure_a, pure_b = render(g.conditioning(a)), render(g.conditioning(b))
    assert not np.array_equal(pure_a, pure_b)
    assert np.array_equal(render(g.conditioning(blend=f"{a}=1,{b}=0")), pure_a)
    assert np.array_equal(render(g.conditioning(blend=f"{a}=0,{b}=1")), pure_b)
    mixed = render(g.conditioning(blend=f"{a}=0.5,{b}=0.5"))
    assert not np.array_equal(mixed, pure_a) and not np.array_equal(mixed, pure_b)

    steps = g.interpolation(a, b, 3)
    assert [t for t, _ in steps] == [0.0, 0.5, 1.0]
    frames = [render(cond) for _, cond in steps]
    assert np.array_equal(frames[0], pure_a) and np.array_equal(frames[-1], pure_b)
    assert not np.array_equal(frames[1], pure_a) and not np.array_equal(frames[1], pure_b)


# --------------------------------------------------------------------------- bad input


def test_bad_pose_videos_are_clear_errors(world, tmp_path):
    from faceid.infer import infer_one, load_pose_video

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 255, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(InputError, match="garbage.mp4: not a readable video"):
        infer_one(world["params"], str(world["a"]), garbage, tmp_path / "o.mp4")
    with pytest.raises(InputError, match="11 frames is not 4n\\+1"):
        load_pose_video(world["pose"], "reject")
    odd = write_pose_video(tmp_path / "odd.mp4", 9, height=40, width=32)
    with pytest.raises(InputError, match="40x32.*multiples of 16"):
        load_pose_video(odd, "fix")
    assert not (tmp_path / "o.mp4").exists()


def test_incompatible_or_missing_identity(world, generator, tmp_path, capsys, repo):
    from faceid.cli import main

    bad = copy_with_card(world["a"], tmp_path / "other_base", base_model="wan2.1-vace-1.3b")
    with pytest.raises(InputError, match="trained on base model 'wan2.1-vace-1.3b'.*retrain or switch profile"):
        generator.identity(str(bad))
    (bad / "face_mapper.safetensors").unlink()
    with pytest.raises(InputError, match="face_mapper.safetensors missing"):
        generator.identity(str(bad))

    rc = main(["--params", str(repo / "params.yaml"), "infer", "--identity", str(tmp_path / "none"),
               "--pose-video", str(world["pose"]), "--output", str(tmp_path / "x.mp4")])
    assert rc == 2
    assert "identity folder not found" in capsys.readouterr().err


def test_gpu_out_of_memory_is_a_clear_error(world, generator, monkeypatch):
    import torch

    import faceid.model.generate as gen
    from faceid.infer import load_pose_video, settings_from

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gen, "generate_video", oom)
    pose, _, _ = load_pose_video(world["pose"], "fix")
    with pytest.raises(FaceidError, match="GPU out of memory generating 9 frames at 32x32.*fewer frames.*smaller size.*offload"):
        generator.generate(generator.conditioning(str(world["a"])), pose, "a person dancing", settings_from(world["params"]))
