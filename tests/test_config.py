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
        # training renders use render_validation's settings: one setting, no copy under validation
        ("train_lora.validation.guidance_scale=3.0", "unknown key(s) train_lora.validation.guidance_scale"),
        ("render_validation.gate.min_facesim=1.2", "render_validation.gate.min_facesim: expected a cosine in [0, 1)"),
        ("render_validation.gate.min_face_detection_rate=2", "render_validation.gate.min_face_detection_rate: expected a value in [0, 1]"),
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


@pytest.mark.parametrize(
    "overrides, message",
    [
        # nothing untrained is registered (issue 21): a run that cannot train is refused at load
        (["train_lora.stage1.steps=0", "train_lora.stage2.steps=0"],
         "train_lora.stage1.steps, train_lora.stage2.steps: expected at least one training step in all, got 0 and 0"),
        (["train_lora.stage1.learning_rate=0"], "train_lora.stage1.learning_rate: expected a number > 0 for a stage with "
                                                "steps (train_lora.stage1.steps=20"),
        (["train_lora.stage2.learning_rate=-0.001"], "train_lora.stage2.learning_rate: expected a finite number >= 0, got -0.001"),
        (["train_lora.stage1.learning_rate=.nan"], "train_lora.stage1.learning_rate: expected a finite number >= 0, got nan"),
        (["train_lora.stage2.learning_rate=.inf"], "train_lora.stage2.learning_rate: expected a finite number >= 0, got inf"),
        (["train_lora.stage1.warmup_steps=-1"], "train_lora.stage1.warmup_steps: expected >= 0, got -1"),
        (["train_lora.stage1.steps=0", "train_lora.stage1.learning_rate=0"], None),  # a skipped stage needs no rate
        # values that cannot work (issue 21 item 4), one message style: "<key>: expected ..., got ..."
        (["train_lora.batch_size=0"], "train_lora.batch_size: expected >= 1, got 0"),
        (["train_lora.batch_size=-2"], "train_lora.batch_size: expected >= 1, got -2"),
        (["train_lora.num_workers=0"], "train_lora.num_workers: expected >= 1 (Ray Train workers), got 0"),
        (["train_lora.checkpoint_every=0"], "train_lora.checkpoint_every: expected >= 1"),
        (["train_lora.grad_clip=-1"], "train_lora.grad_clip: expected >= 0 (0 = no clipping), got -1.0"),
        (["train_lora.grad_clip=.nan"], "train_lora.grad_clip: expected >= 0 (0 = no clipping), got nan"),
        (["train_lora.weight_decay=-0.1"], "train_lora.weight_decay: expected >= 0, got -0.1"),
        (["train_lora.face_dropout=1"], "train_lora.face_dropout: expected a probability in [0, 1), got 1.0"),
        (["train_lora.face_dropout=-0.1"], "train_lora.face_dropout: expected a probability in [0, 1)"),
        (["train_lora.lora.alpha=0"], "train_lora.lora.alpha: expected > 0"),
        (["train_lora.lora.dropout=1.5"], "train_lora.lora.dropout: expected a probability in [0, 1), got 1.5"),
        (["train_lora.num_face_tokens=0"], "train_lora.num_face_tokens: expected >= 1, got 0"),
        (["train_lora.mapper_hidden_dim=-1"], "train_lora.mapper_hidden_dim: expected >= 0 (0 = text_dim), got -1"),
        (["train_lora.seed=-1"], "train_lora.seed: expected >= 0, got -1"),
        (["train_lora.seed=99999999999999999999999"], "train_lora.seed: expected an integer within 64 bits"),
        (["train_lora.cache_dir="], "train_lora.cache_dir: expected a non-empty path, got ''"),
        (["train_lora.face_loss_weight=.inf"], "train_lora.face_loss_weight: expected a finite number, got inf"),
        (["sample_data.num_videos=0"], "sample_data.num_videos: expected >= 1, got 0"),
        (["sample_data.video_seconds=0"], "sample_data.video_seconds: expected a number > 0, got 0.0"),
        (["sample_data.video_fps=0"], "sample_data.video_fps: expected >= 1, got 0"),
        (["sample_data.video_height=481"], "sample_data.video_height: expected a positive even number of pixels"),
        (["sample_data.video_width=-320"], "sample_data.video_width: expected a positive even number of pixels"),
        (["crop_faces.min_photos=0"], "crop_faces.min_photos: expected >= 1, got 0"),
        (["crop_faces.min_detection_confidence=1.5"], "crop_faces.min_detection_confidence: expected a value in [0, 1]"),
        (["crop_faces.crop_sizes=[]"], "crop_faces.crop_sizes: expected a non-empty list of sizes >= 16 px, got ()"),
        (["crop_faces.crop_padding=.nan"], "crop_faces.crop_padding: expected >= 0, got nan"),
        (["crop_faces.duplicate_max_distance=65"], "crop_faces.duplicate_max_distance: expected 0..64"),
        (["embed_faces.min_photos=0"], "embed_faces.min_photos: expected >= 1, got 0"),
        (["embed_faces.outlier_threshold=1.2"], "embed_faces.outlier_threshold: expected a cosine in [0, 1)"),
        (["prepare_pose.fps=0"], "prepare_pose.fps: expected >= 1, got 0"),
        (["prepare_pose.max_clips_per_video=-1"], "prepare_pose.max_clips_per_video: expected >= 0 (0 = no limit)"),
        (["prepare_pose.min_pose_detection_rate=2"], "prepare_pose.min_pose_detection_rate: expected a value in [0, 1]"),
        (["model.flow_shift=0"], "model.flow_shift: expected a number > 0, got 0.0"),
        (["model.tiny.vace_layers=[0, 9]"], "model.tiny.vace_layers: expected block indices in 0..3 (num_layers)"),
        (["batch_infer.num_workers=0"], "batch_infer.num_workers: expected >= 1 (Ray Data workers), got 0"),
        (["render_validation.num_clips=0"], "render_validation.num_clips: expected >= 1, got 0"),
        (["render_validation.gate.min_pose_pck=1.5"], "render_validation.gate.min_pose_pck: expected a value in [0, 1]"),
        (["render_validation.gate.min_retrieval=-0.1"], "render_validation.gate.min_retrieval: expected a value in [0, 1]"),
        (["render_validation.gate.min_facesim_gain=.nan"], "render_validation.gate.min_facesim_gain: expected a finite number, got nan"),
        (["ray.num_cpus=-1"], "ray.num_cpus: expected >= 0 (0 = all cores), got -1"),
        (["tracking.validated_alias=candidate"], "tracking.validated_alias: expected another alias than register_alias"),
        (["tracking.experiment="], "tracking.experiment: expected a non-empty name, got ''"),
        # --set values safe_load would refuse or turn into something else: ConfigError naming the key
        (["train_lora.seed=!!python/object:os.system x"], "train_lora.seed: expected a plain value (a number, true/false, "
                                                          "a string or a list), got a YAML tag '!!python/object:os.system'"),
        (["train_lora.seed=!!binary aGVsbG8="], "train_lora.seed: expected a plain value"),
        (["crop_faces.crop_sizes=!!set {1: null}"], "crop_faces.crop_sizes: expected a plain value"),
        (["tracking.experiment=!x"], "tracking.experiment: expected a plain value"),
        (["train_lora.seed=[1"], "train_lora.seed: expected a YAML value, got '[1'"),
        (["train_lora.seed=*anchor"], "train_lora.seed: expected a YAML value, got '*anchor'"),
        (["train_lora.seed={a: 1}"], "train_lora.seed: expected an integer, got {'a': 1}"),
        (["tracking.experiment='!x'"], None),  # quoted: a string
        (["train_lora.seed.x=1"], "override 'train_lora.seed.x=1': expected train_lora.seed to be a section, got the value 0"),
        (["train_lora..seed=1"], "override 'train_lora..seed=1': expected a dotted key such as train_lora.stage1.steps"),
    ],
)
def test_values_that_cannot_work_name_the_key(repo, overrides, message):
    if message is None:
        load_params(repo / "params.yaml", overrides)
        return
    with pytest.raises(ConfigError) as err:
        load_params(repo / "params.yaml", overrides)
    assert message in str(err.value)
    assert str(err.value).startswith(f"{repo / 'params.yaml'}: ")


def test_overlay_that_is_missing_not_yaml_or_not_a_mapping(repo, tmp_path):
    def error(overlay) -> str:
        with pytest.raises(ConfigError) as err:
            load_params(repo / "params.yaml", [f"@{overlay}"])
        return str(err.value)

    assert f"{tmp_path / 'none.yaml'}: overlay '@{tmp_path / 'none.yaml'}' not found" in error(tmp_path / "none.yaml")
    assert "not found" in error(tmp_path)  # a folder
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    assert f"{binary}: overlay '@{binary}' not readable as YAML text" in error(binary)
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("train_lora: !!python/object/apply:os.system [echo hi]\n")
    assert f"{tagged}: not valid YAML" in error(tagged)
    listed = tmp_path / "list.yaml"
    listed.write_text("- train_lora\n")
    assert f"{listed}: expected a mapping of sections at the top level, got list" in error(listed)


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
