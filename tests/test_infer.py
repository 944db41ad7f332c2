"""faceid infer: one video per pose video on the tiny profile (CPU); identity from a folder or the
MLflow registry; blends and interpolation endpoints equal the pure identities; bad input is one
clear error (unreadable video, frame count, size, incompatible identity, GPU out of memory)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from faceid.config import params_from_dict, to_dict
from faceid.errors import FaceidError, InputError
from test_pose_video import write_audio_only
from test_processes import held_lock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

H = W = 32


def make_identity(folder: Path, params, name: str, seed: int, reference: np.ndarray | None = None,
                  reference_in_training: bool = False) -> Path:
    """An identity folder as train-lora writes it: a random mapper, null face and non-zero LoRA
    (so identities differ), saved with the training engineer's ``save_identity``; ``reference``:
    its reference.png (card key ``reference_image``)."""
    import torch

    from faceid.model.base_model import base_model_id, build_components
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
        mapper.gate_param.fill_(1.0 / mapper.gate_multiplier)  # the gate open, as training opens it
    embedding = torch.nn.functional.normalize(torch.randn(128, generator=gen), dim=0)
    card = {"base_model": base_model_id(params.model), "profile": params.model.profile,
            "embedder": params.embed_faces.embedder, "train": {"seed": seed}}
    if reference is not None:
        card["reference_image"] = {"file": "reference.png", "source": f"{name}.jpg", "in_training": reference_in_training}
    return save_identity(folder, name=name, card=card, mapper=mapper, embedding=embedding, transformer=transformer,
                         reference=reference)


def reference_photo(seed: int = 0, height: int = 40, width: int = 28) -> np.ndarray:
    """A stand-in face crop (non-square: the pipeline fits it into the frame)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), (200, 160, 130), np.uint8)
    image[8:16, 4:10] = image[8:16, 18:24] = 30  # eyes
    image[26:30, 8:20] = (150, 40, 40)  # mouth
    return np.clip(image + rng.integers(-20, 20, image.shape), 0, 255).astype(np.uint8)


def real_photo(name: str) -> np.ndarray:
    """A real photo (RGB) from the face_recognition sdist's test images."""
    import io
    import tarfile

    from PIL import Image

    from conftest import ARCHIVE

    with tarfile.open(ARCHIVE) as tar:
        data = tar.extractfile(f"face_recognition-1.3.0/tests/test_images/{name}").read()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


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
    a = make_identity(root / "a", p, "a", seed=1, reference=reference_photo())  # reference.png, not trained with
    b = make_identity(root / "b", p, "b", seed=2)  # no reference.png
    pose = write_pose_video(root / "pose.mp4", 11)  # 11 frames -> 9 (4n+1) with policy "fix"
    return {"root": root, "params": p, "a": a, "b": b, "pose": pose}


SETTINGS = ("face_scale", "lora_scale", "guidance_scale", "num_inference_steps", "seed", "prompt")


def infer_one(params, identity=None, pose_video=None, output=None, **kwargs):
    """The infer stage as the CLI calls it: the render settings built once from the flags given."""
    from faceid import stages
    from faceid.render import settings_from

    settings = settings_from(params.batch_infer, **{k: kwargs.pop(k) for k in SETTINGS if k in kwargs})
    return stages.infer(params, pose_video, output, settings, identity=identity, **kwargs)



@pytest.fixture(scope="module")
def generator(world):
    from faceid.render import Generator

    return Generator(world["params"])


# --------------------------------------------------------------------------- pure helpers


def test_parse_blend_and_interpolate():
    from faceid.render import parse_blend, parse_interpolate

    assert parse_blend("a=0.7, models:/faceid-b@validated=0.3") == [("a", 0.7), ("models:/faceid-b@validated", 0.3)]
    for bad, msg in [("a=0.7,b=0.2", "sum to 1"), ("a", "NAME=WEIGHT"), ("a=x", "not a number"), ("a=-1,b=2", ">= 0")]:
        with pytest.raises(InputError, match=msg):
            parse_blend(bad)
    assert parse_interpolate("a,b") == ("a", "b")
    assert parse_interpolate("b", identity="a") == ("a", "b")
    with pytest.raises(InputError, match="two identities"):
        parse_interpolate("a,b,c")


def test_frame_count_policy():
    from faceid.model.shapes import frames_to_keep

    assert frames_to_keep(17, "reject") == 17
    assert frames_to_keep(20, "fix") == 17
    with pytest.raises(InputError, match="not 4n\\+1.*frame_count_policy=fix"):
        frames_to_keep(20, "reject")
    with pytest.raises(InputError, match="at least 5"):
        frames_to_keep(3, "fix")


# --------------------------------------------------------------------------- end to end


def test_infer_one_writes_the_pose_videos_frames_size_and_fps(world, capsys):
    from faceid.pose.video import probe

    out = world["root"] / "out" / "a.mp4"
    row = infer_one(world["params"], str(world["a"]), world["pose"], out, seed=3, prompt="a person dancing")
    info = probe(out)
    assert (info["frames"], info["height"], info["width"]) == (9, H, W)
    assert info["fps"] == pytest.approx(16.0)
    assert row["seed"] == 3 and row["num_inference_steps"] == 2 and row["trimmed_frames"] == 2
    assert row["identity"] == "a" and row["generate_s"] > 0
    printed = capsys.readouterr().out
    assert "wrote" in printed
    assert f"{world['pose']}: 11 frames trimmed to 9 (Wan needs 4n+1; batch_infer.frame_count_policy=fix" in printed


def test_identity_from_the_mlflow_registry(world, tmp_path, monkeypatch):
    import mlflow

    from faceid import tracking
    from faceid.render import resolve_identity
    from faceid.train.launch import log_to_mlflow

    uri = tracking.local_store_uri(tmp_path / "mlruns")
    log_to_mlflow(world["params"], "a", world["a"], {}, uri)
    # the download names its store: MLflow's process-wide URIs pointing elsewhere (as in a fresh task
    # process, where they are the defaults) must not matter
    elsewhere = tracking.local_store_uri(tmp_path / "elsewhere")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(name, elsewhere)
    mlflow.set_tracking_uri(elsewhere)
    mlflow.set_registry_uri(elsewhere)
    downloads = tmp_path / "downloads"
    folder = resolve_identity("models:/faceid-a@candidate", uri, downloads)
    assert json.loads((folder / "identity.json").read_text()) == json.loads((world["a"] / "identity.json").read_text())
    # downloaded once per registry version, no temporary folders left behind
    assert resolve_identity("models:/faceid-a/1", uri, downloads) == folder
    assert [p.name for p in downloads.glob("*/faceid-a/*") if p.is_dir()] == ["1"]

    out_reg, out_dir = tmp_path / "reg.mp4", tmp_path / "dir.mp4"
    reg = infer_one(world["params"], "models:/faceid-a@candidate", world["pose"], out_reg, mlflow_uri=uri)
    direct = infer_one(world["params"], str(world["a"]), world["pose"], out_dir)
    assert reg["frames_sha256"] == direct["frames_sha256"]

    with pytest.raises(InputError, match="faceid-a@nope.*MLflow registry"):
        resolve_identity("models:/faceid-a@nope", uri, downloads)


def test_blend_and_interpolation_endpoints_equal_the_pure_identities(world, generator):
    from faceid.render import load_pose_video, settings_from

    g, s = generator, settings_from(world["params"].batch_infer)
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


def sha(frames: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


@pytest.fixture
def pipe_calls(generator, monkeypatch):
    """The ``reference_images`` of every call of the pipeline (a spy on ``WanVACEPipeline.__call__``)."""
    calls = []
    original = type(generator.pipe).__call__

    def spy(self, *args, **kwargs):
        calls.append(kwargs.get("reference_images"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(generator.pipe), "__call__", spy)
    return calls


def test_face_scale_and_lora_scale_travel_in_settings(world, generator):
    """--face-scale / --lora-scale reach generate_video; face_scale 0 is the base model exactly,
    for one identity and for a blend (a trained, non-zero LoRA and mapper)."""
    from faceid.render import load_pose_video, settings_from

    g, p = generator, world["params"]
    pose, _, _ = load_pose_video(world["pose"], "fix")
    a = g.conditioning(str(world["a"]))
    blend = g.conditioning(blend=f"{world['a']}=0.5,{world['b']}=0.5")

    def render(cond, **flags):
        return g.generate(cond, pose, "a person dancing", settings_from(p.batch_infer, **flags))

    base = render(None)
    assert not np.array_equal(render(a), base)
    assert np.array_equal(render(a, face_scale=0.0), base)
    assert np.array_equal(render(blend, face_scale=0.0, lora_scale=3.0), base)
    assert sha(render(a, lora_scale=0.0)) not in {sha(render(a)), sha(base)}  # LoRA off, face tokens still on


def test_face_scale_flag_reaches_generate_video_through_the_cli(world, tmp_path, repo, monkeypatch):
    """``faceid infer --face-scale`` travels in the one Settings down to ``generate_video``; without
    the flag, batch_infer.face_scale does (no other default on the way)."""
    import faceid.model.generate as gen
    from faceid.cli import main

    seen = []
    original = gen.generate_video

    def spy(*args, **kwargs):
        seen.append((kwargs["face_scale"], kwargs["lora_scale"], kwargs["guidance_scale"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_video", spy)
    base = ["--params", str(repo / "params.yaml"), "--set", "batch_infer.num_inference_steps=1",
            "--set", "batch_infer.face_scale=0.75", "infer", "--identity", str(world["a"]), "--pose-video", str(world["pose"])]
    assert main(base + ["--output", str(tmp_path / "a.mp4"), "--face-scale", "0.25", "--lora-scale", "2",
                        "--guidance-scale", "1.5"]) == 0
    assert main(base + ["--output", str(tmp_path / "b.mp4")]) == 0
    defaults = world["params"].batch_infer
    assert seen == [(0.25, 2.0, 1.5), (0.75, defaults.lora_scale, defaults.guidance_scale)]


def test_bad_face_scale_or_lora_scale_names_the_flag_or_key(world, tmp_path, capsys, repo):
    from faceid.cli import main
    from faceid.config import ConfigError

    with pytest.raises(InputError, match="--face-scale: expected a finite number >= 0, got nan"):
        infer_one(world["params"], str(world["a"]), world["pose"], tmp_path / "o.mp4", face_scale=float("nan"))
    with pytest.raises(InputError, match="--lora-scale: expected a finite number >= 0, got -0.5"):
        infer_one(world["params"], str(world["a"]), world["pose"], tmp_path / "o.mp4", lora_scale=-0.5)
    # the params keys are checked when the config loads
    with pytest.raises(ConfigError, match="batch_infer.face_scale: expected a finite number >= 0, got -1.0"):
        small(world["params"], batch_infer__face_scale=-1)
    with pytest.raises(ConfigError, match="batch_infer.lora_scale: expected a finite number >= 0, got inf"):
        small(world["params"], batch_infer__lora_scale=".inf")
    for flag, value in (("--face-scale", "-1"), ("--face-scale", "nan"), ("--lora-scale", "-2")):
        rc = main(["--params", str(repo / "params.yaml"), "infer", "--identity", str(world["a"]), "--pose-video",
                   str(world["pose"]), "--output", str(tmp_path / "x.mp4"), flag, value])
        assert rc == 2
        assert f"{flag}: expected a finite number >= 0, got {float(value)!r}" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))


def test_reference_only_is_base_vace_with_the_reference_photo(world, generator, tmp_path, capsys, repo):
    """--reference-only: no adapter, no face tokens; the identity's reference.png or --reference-image."""
    from PIL import Image

    from faceid.cli import main
    from faceid.render import load_pose_video, settings_from

    p, a = world["params"], str(world["a"])
    pose, _, _ = load_pose_video(world["pose"], "fix")
    base = generator.generate(None, pose, "a person dancing", settings_from(p.batch_infer))
    with_identity = generator.generate(generator.conditioning(a), pose, "a person dancing", settings_from(p.batch_infer))

    row = infer_one(p, a, world["pose"], tmp_path / "ref.mp4", prompt="a person dancing", reference_only=True)
    assert row["identity"] == "reference-only" and row["reference_source"] == str(world["a"] / "reference.png")
    assert row["reference_image"] is True and row["face_scale"] is None and row["lora_scale"] is None
    assert row["frames_sha256"] not in {sha(base), sha(with_identity)}

    # --reference-image: a real photo (crop-faces' checks: a face is found); as an identity's
    # reference.png, the same picture gives the same video
    photo = tmp_path / "photo.png"
    Image.fromarray(real_photo("obama2.jpg")).save(photo)
    again = infer_one(p, None, world["pose"], tmp_path / "photo.mp4", prompt="a person dancing", reference_only=True,
                      reference_image=photo)
    assert again["reference_source"] == str(photo) and again["frames_sha256"] != row["frames_sha256"]
    same = shutil.copytree(world["a"], tmp_path / "same")
    shutil.copy(photo, same / "reference.png")
    assert infer_one(p, str(same), world["pose"], tmp_path / "same.mp4", prompt="a person dancing",
                     reference_only=True)["frames_sha256"] == again["frames_sha256"]

    other = tmp_path / "other.png"
    Image.fromarray(real_photo("obama.jpg")[:, ::-1]).save(other)
    rc = main(["--params", str(repo / "params.yaml"), "--set", "batch_infer.num_inference_steps=2", "infer",
               "--reference-only", "--reference-image", str(other), "--pose-video", str(world["pose"]),
               "--output", str(tmp_path / "cli.mp4")])
    assert rc == 0 and (tmp_path / "cli.mp4").is_file()
    assert f"reference-only ({other})" in capsys.readouterr().out

    for kwargs, msg in [
        (dict(identity=str(world["b"])), "has no reference.png.*--reference-image PATH"),
        (dict(identity=None), "expected --reference-image PATH.*or --identity"),
        (dict(identity=None, blend=f"{a}=1", reference_image=photo), "--blend"),
        (dict(identity=None, reference_image=tmp_path / "missing.png"), "missing.png: image not found"),
    ]:
        with pytest.raises(InputError, match=msg):
            infer_one(p, pose_video=world["pose"], output=tmp_path / "x.mp4", reference_only=True, **kwargs)
    with pytest.raises(InputError, match="--reference-image is the photo of --reference-only"):
        infer_one(p, a, world["pose"], tmp_path / "x.mp4", reference_image=photo)
    for flags in (["--identity", a, "--face-scale", "0.5"], ["--identity", a, "--lora-scale", "0"]):
        rc = main(["--params", str(repo / "params.yaml"), "infer", "--reference-only", *flags, "--pose-video",
                   str(world["pose"]), "--output", str(tmp_path / "x.mp4")])
        assert rc == 2 and f"--reference-only uses no identity adapter: {flags[2]}" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_identity_trained_with_its_reference_passes_it(world, generator, pipe_calls, tmp_path):
    """Card reference_image.in_training: the identity's reference.png goes to VACE (for a blend:
    the dominant identity's, first on ties); never at face_scale 0."""
    from faceid.render import load_pose_video, settings_from

    g, p = generator, world["params"]
    pose, _, _ = load_pose_video(world["pose"], "fix")
    card = json.loads((world["a"] / "identity.json").read_text())["reference_image"]
    a_ref = str(copy_with_card(world["a"], tmp_path / "a_ref", reference_image={**card, "in_training": True}))
    a_plain, b = str(world["a"]), str(world["b"])

    def render(cond, **flags):
        return g.generate(cond, pose, "a person dancing", settings_from(p.batch_infer, **flags))

    with_ref, plain, base = render(g.conditioning(a_ref)), render(g.conditioning(a_plain)), render(None)
    passed = pipe_calls[0]
    assert len(passed) == 1 and np.array_equal(np.asarray(passed[0]), reference_photo())
    assert pipe_calls[1:] == [None, None]
    assert not np.array_equal(with_ref, plain)  # the same adapter; only the reference differs
    assert np.array_equal(render(g.conditioning(a_ref), face_scale=0.0), base) and pipe_calls[-1] is None

    pipe_calls.clear()
    for blend in (f"{a_ref}=0.6,{b}=0.4", f"{a_ref}=0.5,{b}=0.5", f"{a_ref}=0.4,{b}=0.6", f"{b}=0.5,{a_ref}=0.5"):
        render(g.conditioning(blend=blend))
    assert [call is not None for call in pipe_calls] == [True, True, False, False]


# --------------------------------------------------------------------------- bad input


def test_bad_pose_videos_are_clear_errors(world, tmp_path):
    from faceid.render import load_pose_video

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
    from faceid.render import load_pose_video, settings_from

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(gen, "generate_video", oom)
    pose, _, _ = load_pose_video(world["pose"], "fix")
    with pytest.raises(FaceidError, match="GPU out of memory generating 9 frames at 32x32.*fewer frames.*smaller size.*offload"):
        generator.generate(generator.conditioning(str(world["a"])), pose, "a person dancing", settings_from(world["params"].batch_infer))


# --------------------------------------------------------------------------- at the door


def test_guidance_steps_seed_and_blend_weights_are_checked_at_the_door(world, tmp_path, capsys, repo):
    """Flags, params keys and generate_video itself refuse NaN, inf and out-of-range values, naming
    the flag or the key; nothing is written."""
    from faceid.cli import main
    from faceid.config import ConfigError
    from faceid.render import parse_blend

    base = ["--params", str(repo / "params.yaml"), "infer", "--identity", str(world["a"]), "--pose-video",
            str(world["pose"]), "--output", str(tmp_path / "x.mp4")]
    for flag, value, message in [
        ("--guidance-scale", "nan", "--guidance-scale: expected a finite number >= 1 (1 = no classifier-free guidance), got nan"),
        ("--guidance-scale", "inf", "--guidance-scale: expected a finite number >= 1"),
        ("--cfg-scale", "0.5", "--guidance-scale: expected a finite number >= 1"),  # the old name of the flag
        ("--steps", "0", "--steps: expected an integer from 1 to 1000, got 0"),
        ("--steps", "100000", "--steps: expected an integer from 1 to 1000, got 100000"),
        ("--seed", "-1", "--seed: expected an integer from 0 to 2^63-1, got -1"),
        ("--blend", f"{world['a']}=nan,{world['b']}=0.5", "must be a finite number >= 0, got 'nan'"),
        ("--blend", f"{world['a']}=inf,{world['b']}=0", "must be a finite number >= 0, got 'inf'"),
    ]:
        assert main(base + [flag, value]) == 2, (flag, value)
        assert message in capsys.readouterr().err, (flag, value)
    for key, value, message in [
        ("batch_infer.guidance_scale", ".nan", "batch_infer.guidance_scale: expected a finite number >= 1"),
        ("batch_infer.num_inference_steps", "0", "batch_infer.num_inference_steps: expected an integer from 1 to 1000"),
        ("batch_infer.interpolation_steps", "1", "batch_infer.interpolation_steps: expected >= 2"),
        ("render_validation.guidance_scale", "-.inf", "render_validation.guidance_scale: expected a finite number >= 1"),
        ("render_validation.face_scale", ".nan", "render_validation.face_scale: expected a finite number >= 0"),
        ("render_validation.seed", "-5", "render_validation.seed: expected an integer from 0 to 2^63-1"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            small(world["params"], **{key.replace(".", "__"): value})
    with pytest.raises(InputError, match="sum to 1"):
        parse_blend("a=0.5,b=0.4")
    assert not list(tmp_path.glob("*.mp4"))


def test_generate_video_checks_guidance_steps_and_seed(world, generator):
    from faceid.render import load_pose_video
    from faceid.model.generate import generate_video

    pose, _, _ = load_pose_video(world["pose"], "fix")
    for kwargs, message in [(dict(guidance_scale=float("nan")), "guidance_scale: expected a finite number >= 1"),
                            (dict(num_inference_steps=0), "num_inference_steps: expected an integer from 1 to 1000"),
                            (dict(seed=-1), "seed: expected an integer from 0")]:
        with pytest.raises(InputError, match=re.escape(message)):
            generate_video(generator.pipe, None, pose, "a person dancing",
                           **{"face_scale": 1.0, "lora_scale": 1.0, "guidance_scale": 1.0, "num_inference_steps": 1, "seed": 0, **kwargs})


def test_scales_above_the_bound_are_refused_at_the_door(world, tmp_path, capsys, repo, no_model):
    """Issue 21 item 3: face_scale / lora_scale have an upper bound (MAX_SCALE, 4): `--face-scale 1e9`
    (which rendered an all-black video) is exit 2 before any model loads; the params keys at load."""
    from faceid.cli import main
    from faceid.config import ConfigError
    from faceid.model.checks import MAX_SCALE

    assert MAX_SCALE == 4
    base = ["--params", str(repo / "params.yaml"), "infer", "--identity", str(world["a"]), "--pose-video",
            str(world["pose"]), "--output", str(tmp_path / "x.mp4")]
    for flag, value in (("--face-scale", "1e9"), ("--lora-scale", "4.5")):
        assert main(base + [flag, value]) == 2
        assert f"{flag}: {float(value)!r} is above the upper bound 4 (1 = the identity as trained" in capsys.readouterr().err
    for key in ("batch_infer__face_scale", "batch_infer__lora_scale", "render_validation__face_scale"):
        with pytest.raises(ConfigError, match=re.escape(f"{key.replace('__', '.')}: 10.0 is above the upper bound 4")):
            small(world["params"], **{key: 10})
    small(world["params"], batch_infer__face_scale=4, batch_infer__lora_scale=4)  # the bound itself is allowed
    assert not list(tmp_path.glob("*.mp4"))


def test_a_non_finite_or_blank_render_is_an_error_not_a_video(world, generator, tmp_path):
    """Issue 21 item 3: frames are checked before they are written. An identity whose weights overflow
    (an embedding scaled by 1e30: the real pipeline turns it into NaN, which used to become an
    all-black video) fails naming the settings; a blank (one-colour) render is refused too."""
    import dataclasses

    from faceid.model.generate import RenderError, blank_render
    from faceid.render import render_one, settings_from

    ident = generator.identity(str(world["a"]))
    broken = dataclasses.replace(ident, embedding=ident.embedding * 1e30)
    with pytest.raises(RenderError, match=rf"{re.escape(str(world['pose']))}: the model produced non-finite values "
                                          r"\(NaN/inf\) in \d+ of \d+ output values; settings face_scale=1, lora_scale=1.*"
                                          rf"Likely causes: a face_scale or lora_scale far above 1.*; {re.escape(str(tmp_path / 'o.mp4'))} not written"):
        render_one(generator, broken, world["pose"], tmp_path / "o.mp4", settings_from(world["params"].batch_infer))
    assert not (tmp_path / "o.mp4").exists()
    # blank: the pure rule on frames (a real render and a real pose video are not blank)
    real = read(world["pose"])
    assert blank_render(real) == "" and blank_render(read(world["root"] / "pose.mp4")) == ""
    assert blank_render(np.zeros_like(real)).startswith("every frame is black")
    grey = np.full_like(real, 128) + (np.random.default_rng(0).random(real.shape) < 0.01).astype(np.uint8)
    assert blank_render(grey).startswith("every frame is one colour, RGB (128, 128, 128)")


def test_reference_image_gets_the_photo_checks_before_any_model(world, tmp_path, capsys, repo, no_model):
    """Issue 21 item 4: --reference-image gets crop-faces' checks before a model loads: a blank image,
    one above crop_faces.max_image_pixels (12000x9000, refused from its header), a photo with no
    face, a folder, an unreadable file: exit 2 naming the file and the rule."""
    from PIL import Image

    from faceid.cli import main

    blank, huge, faceless, broken = (tmp_path / n for n in ("blank.png", "huge.png", "faceless.png", "broken.jpg"))
    Image.new("RGB", (640, 480), (200, 200, 200)).save(blank)
    Image.new("1", (12000, 9000)).save(huge)
    Image.fromarray(np.ascontiguousarray(real_photo("obama3.jpg")[-200:, :300])).save(faceless)  # legs, no face
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "folder").mkdir()
    for image, message in [
        (blank, "blank.png: not usable as a reference image: image looks blank: almost uniform"),
        (huge, "huge.png: not usable as a reference image: 12000x9000 px exceeds max_image_pixels 64000000 "
               "(crop_faces.max_image_pixels)"),
        (faceless, "faceless.png: not usable as a reference image: mediapipe found no face"),
        (broken, "broken.jpg: not usable as a reference image: not an image PIL can decode"),
        (tmp_path / "folder", f"{tmp_path / 'folder'}: image not found (a folder; expected a photo)"),
    ]:
        rc = main(["--params", str(repo / "params.yaml"), "infer", "--reference-only", "--reference-image", str(image),
                   "--pose-video", str(world["pose"]), "--output", str(tmp_path / "x.mp4")])
        assert rc == 2, image
        assert message in capsys.readouterr().err, image
    assert not (tmp_path / "x.mp4").exists()


def test_pose_videos_larger_than_the_model_or_without_frames_are_refused(world, tmp_path, capsys, repo, no_model):
    """Issue 21 items 4, 8: a pose video above 720p (here 1296x736: more than 1280 px on the long side)
    is refused from its container before any frame is decoded or a model loads, naming the file, its
    size and the limit; a file with no video stream says so."""
    from faceid.cli import main

    big = write_pose_video(tmp_path / "big.mp4", 2, height=736, width=1296)
    audio = write_audio_only(tmp_path / "audio.mp4")
    for video, message in [
        (big, f"{big} (pose video): 736x1296 (HxW) is larger than the model takes: at most 1280 px on the long side "
              "and 921600 pixels"),
        (audio, f"{audio}: no video stream (the file holds 1 audio); expected a video"),
    ]:
        rc = main(["--params", str(repo / "params.yaml"), "infer", "--identity", str(world["a"]), "--pose-video",
                   str(video), "--output", str(tmp_path / "x.mp4")])
        assert rc == 2 and message in capsys.readouterr().err, video
    assert not (tmp_path / "x.mp4").exists()


def test_inputs_are_checked_before_the_model_is_built(world, tmp_path, no_model):

    p, a, pose = world["params"], str(world["a"]), world["pose"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for kwargs, message in [
        (dict(identity=str(tmp_path / "nobody")), "nobody: identity folder not found"),
        (dict(identity="models:/faceid-nobody@validated", mlflow_uri=uri),
         "models:/faceid-nobody@validated: cannot load from the MLflow registry"),
        (dict(identity=None, blend=f"{a}=0.5,{tmp_path / 'nobody'}=0.5"), "nobody: identity folder not found"),
        (dict(identity=None), "expected --identity, --blend or --reference-only"),
        (dict(identity=a, pose_video=tmp_path / "missing.mp4"), "missing.mp4"),
        (dict(identity=str(copy_with_card(world["a"], tmp_path / "other", base_model="wan2.1-vace-1.3b"))),
         "trained on base model 'wan2.1-vace-1.3b'"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            infer_one(p, pose_video=kwargs.pop("pose_video", pose), output=tmp_path / "o.mp4", **kwargs)
    assert not (tmp_path / "o.mp4").exists()


def test_a_second_writer_of_the_same_video_fails_at_once(world, tmp_path, no_model):
    from faceid.io import LockedError

    out = tmp_path / "o.mp4"
    with held_lock("infer", out) as holder:
        with pytest.raises(LockedError, match=rf"another infer run \(pid {holder.pid}\) is writing {out}"):
            infer_one(world["params"], str(world["a"]), world["pose"], out)
    assert not out.exists()
