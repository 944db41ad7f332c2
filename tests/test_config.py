"""params.yaml -> frozen dataclasses: every key required, types checked, errors name the key."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from faceid.config import ConfigError, Params, config_hash, flatten, load_params, params_from_dict


def _data(repo):
    return yaml.safe_load((repo / "params.yaml").read_text())


def test_repo_params_load_into_frozen_sections(repo):
    p = load_params(repo / "params.yaml")
    assert isinstance(p, Params)
    assert p.model.profile == "tiny"
    assert p.prepare_pose.num_frames % 4 == 1
    assert p.model.tiny.vace_layers == (0, 2)  # lists become tuples
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.train_lora.seed = 1  # type: ignore[misc]


def test_every_dataclass_field_is_in_params_yaml(repo):
    # one config source: params.yaml has every key (no defaults hidden in code)
    flat = flatten(load_params(repo / "params.yaml"))
    raw = flatten(_data(repo))
    assert set(flat) == set(raw)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train_lora.stage1.steps=abc", "train_lora.stage1.steps: expected an integer, got 'abc'"),
        ("train_lora.use_gpu=3", "train_lora.use_gpu: expected true or false"),
        ("model.profile=huge", "model.profile: expected one of 'tiny' | 'wan2.1-vace-1.3b'"),
        ("prepare_pose.num_frames=18", "prepare_pose.num_frames: expected 4n+1"),
        ("prepare_pose.height=100", "prepare_pose.height: expected a positive multiple of 16"),
        ("crop_faces.crop_sizes=5", "crop_faces.crop_sizes: expected a list"),
        ("crop_faces.colour=red", "unknown key(s) crop_faces.colour"),
        ("train_lora.lora.rank=0", "train_lora.lora.rank: expected a positive integer"),
        # generation values: finite and in range (the same checks as the infer flags)
        ("batch_infer.guidance_scale=.nan", "batch_infer.guidance_scale: expected a finite number >= 1"),
        ("render_validation.guidance_scale=0.5", "render_validation.guidance_scale: expected a finite number >= 1"),
        ("batch_infer.num_inference_steps=0", "batch_infer.num_inference_steps: expected an integer from 1 to 1000"),
        ("render_validation.num_inference_steps=5000", "render_validation.num_inference_steps: expected an integer from 1 to 1000"),
        ("batch_infer.face_scale=-1", "batch_infer.face_scale: expected a finite number >= 0"),
        ("batch_infer.lora_scale=.inf", "batch_infer.lora_scale: expected a finite number >= 0"),
        ("render_validation.face_scale=.nan", "render_validation.face_scale: expected a finite number >= 0"),
        ("batch_infer.seed=-1", "batch_infer.seed: expected an integer from 0 to 2^63-1"),
        ("batch_infer.interpolation_steps=1", "batch_infer.interpolation_steps: expected >= 2"),
        # validation during training
        ("train_lora.validation.validate_every=-1", "train_lora.validation.validate_every: expected >= 0"),
        ("train_lora.validation.num_timesteps=0", "train_lora.validation.num_timesteps: expected 1..1000"),
        ("train_lora.validation.criterion=fid", "train_lora.validation.criterion: expected one of 'auto' | 'facesim'"),
        ("train_lora.validation.keep=first", "train_lora.validation.keep: expected one of 'best' | 'last'"),
        ("train_lora.validation.criterion=facesim", "train_lora.validation.criterion: facesim is measured on renders, "
                                                    "but render_every is 0"),
        ("train_lora.validation.guidance_scale=0.5", "train_lora.validation.guidance_scale: expected a finite number >= 1"),
        ("train_lora.validation.render_every=5", None),  # fine: 1 held-out clip, 1 rendered
        ("train_lora.validation.num_clips=2", None),  # fine while render_every is 0
    ],
)
def test_bad_values_name_the_key_and_expectation(repo, override, message):
    if message is None:
        load_params(repo / "params.yaml", [override])
        return
    with pytest.raises(ConfigError) as err:
        load_params(repo / "params.yaml", [override])
    assert message in str(err.value)
    assert "params.yaml" in str(err.value)


def test_validation_needs_what_it_measures(repo):
    with pytest.raises(ConfigError, match=r"train_lora.validation.num_clips: renders need held-out clips, but num_clips=2 > "
                                          r"train_lora.holdout_clips=1"):
        load_params(repo / "params.yaml", ["train_lora.validation.render_every=5", "train_lora.validation.num_clips=2"])
    with pytest.raises(ConfigError, match=r"train_lora.validation.patience: early stop counts validations, but "
                                          r"validate_every and render_every are 0"):
        load_params(repo / "params.yaml", ["train_lora.validation.validate_every=0", "train_lora.validation.patience=3"])
    real = load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}"])
    assert real.train_lora.validation.render_every > 0 and real.train_lora.validation.keep == "best"
    assert load_params(repo / "params.yaml").train_lora.validation.render_every == 0  # tiny: losses only


def test_missing_key_is_named(repo):
    data = _data(repo)
    del data["train_lora"]["stage2"]["learning_rate"]
    with pytest.raises(ConfigError, match=r"missing key\(s\) train_lora\.stage2\.learning_rate"):
        params_from_dict(data)


def test_overrides_and_overlay_file(repo, tmp_path):
    overlay = tmp_path / "real.yaml"
    overlay.write_text("model:\n  profile: wan2.1-vace-1.3b\n  weights_dir: /models/wan\nprepare_pose:\n  num_frames: 81\n")
    p = load_params(repo / "params.yaml", [f"@{overlay}", "train_lora.stage1.steps=3", "ray.address=auto"])
    assert (p.model.profile, p.model.weights_dir, p.prepare_pose.num_frames) == ("wan2.1-vace-1.3b", "/models/wan", 81)
    assert p.train_lora.stage1.steps == 3 and p.ray.address == "auto"
    # untouched keys keep the file's values
    assert p.model.tiny.num_layers == _data(repo)["model"]["tiny"]["num_layers"]


def test_the_shipped_real_overlay_loads(repo):
    p = load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}"])
    assert p.model.profile == "wan2.1-vace-1.3b"
    assert (p.prepare_pose.height, p.prepare_pose.width, p.prepare_pose.num_frames) == (480, 832, 81)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_params(bad)


def test_config_hash_changes_with_values(repo):
    a = load_params(repo / "params.yaml")
    b = load_params(repo / "params.yaml", ["train_lora.stage2.steps=99"])
    assert config_hash(a.train_lora) != config_hash(b.train_lora)
    assert config_hash(a.model) == config_hash(b.model)
