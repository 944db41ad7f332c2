"""render-validation on the tiny profile: real pose clips (prepare-pose on the sample videos) and a
real reference embedding (crop + embed of the sample photos); outputs, metrics.json, metrics read
back from a local MLflow store, and the gate that moves the alias only when it passes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from faceid.errors import InputError
from test_infer import copy_with_card, make_identity, small

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


# --------------------------------------------------------------------------- pure parts


def test_metrics_aggregate_and_gate(params):
    from faceid.validate import aggregate, evaluate_gate, identity_jitter, video_metrics

    face = {"mean": 0.8, "min": 0.6, "std": 0.1, "detection_rate": 0.75, "per_frame": [0.7, None, 0.9, 0.8]}
    pose = {"pck": 0.5, "mean_error": 0.2, "detection_rate": 1.0}
    m = video_metrics(face, pose)
    assert m["facesim"] == 0.8 and m["facesim_std"] == 0.1 and m["pose_pck"] == 0.5
    assert m["facesim_jitter"] == pytest.approx(0.1)  # only the 0.9 -> 0.8 pair has two faces
    assert identity_jitter([None, None]) is None
    no_face = video_metrics({**face, "mean": None, "min": None, "std": None, "per_frame": [None] * 4}, {**pose, "pck": float("nan")})
    agg = aggregate([m, no_face])
    assert agg["facesim"] == 0.8 and agg["pose_pck"] == 0.5 and agg["num_videos"] == 2

    gate = params.render_validation.gate  # min_facesim_gain 0.0, min_pose_pck 0.0
    assert evaluate_gate({"facesim": 0.8, "pose_pck": 0.5}, {"facesim": 0.6}, gate)["passed"]
    failed = evaluate_gate({"facesim": 0.6, "pose_pck": 0.5}, {"facesim": 0.6}, gate)
    assert not failed["passed"] and "FaceSim gain 0.0000 <= min_facesim_gain 0" in failed["reasons"][0]
    assert "not measurable" in evaluate_gate({"facesim": None, "pose_pck": 0.5}, {"facesim": 0.6}, gate)["reasons"][0]


def test_clip_selection_and_images():
    from faceid.validate import contact_sheet, select_clips, side_by_side

    rows = [{"clip_id": c} for c in ("c2", "c0", "c1")]
    assert select_clips(rows, {"c0", "c1"}, 2) == ([{"clip_id": "c2"}], True)
    assert select_clips(rows, {"c0", "c1", "c2"}, 2) == ([{"clip_id": "c1"}, {"clip_id": "c2"}], False)
    v = np.zeros((9, 16, 24, 3), np.uint8)
    assert contact_sheet([v, v, v], num_frames=4, gap=2).shape == (3 * 16 + 4, 4 * 24 + 6, 3)
    assert side_by_side(v, v[:5], v).shape == (5, 16, 72, 3)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory, params, sample_dir):
    from faceid import tracking
    from faceid.faces import crop, embed
    from faceid.pose import prepare
    from faceid.train.launch import log_to_mlflow

    root = tmp_path_factory.mktemp("validate")
    p = small(params, prepare_pose__num_frames=9, prepare_pose__max_clips_per_video=1,
              render_validation__num_inference_steps=2, render_validation__num_clips=2)
    prepare.run(p.prepare_pose, sample_dir / "videos", None, root / "clips")
    crop.run(p.crop_faces, sample_dir / "identities" / "obama", root / "crops")
    embed.run(p.embed_faces, root / "crops", root / "emb")
    identity = make_identity(root / "identity", p, "obama", seed=1)
    uri = tracking.local_store_uri(root / "mlruns")
    registered = log_to_mlflow(p, "obama", identity, {}, uri)
    return {"root": root, "params": p, "identity": identity, "uri": uri, "registered": registered}


@pytest.fixture(scope="module")
def validation(world):
    from faceid import validate

    out = world["root"] / "validation"
    result = validate.run(world["params"], world["identity"], world["root"] / "clips", world["root"] / "emb", out, world["uri"])
    return out, result


def test_outputs_and_metrics_json(world, validation):
    from faceid.pose.video import probe

    out, result = validation
    assert json.loads((out / "metrics.json").read_text())["gate"] == result["gate"]
    assert len(result["clips"]) == 2 and result["held_out"] is True  # the card lists no training clips
    assert result["metric"] == "FaceSim-dlib"
    for clip in result["clips"]:
        for name in (f"{clip}.mp4", f"{clip}_baseline.mp4"):
            info = probe(out / "videos" / name)
            assert (info["frames"], info["height"], info["width"], info["fps"]) == (9, 64, 64, 16.0)
        assert probe(out / "side_by_side" / f"{clip}.mp4")["width"] == 3 * 64
        assert (out / "sheets" / f"{clip}.png").stat().st_size > 0
        per_video = result["videos"][clip]
        for variant in ("identity", "baseline"):
            assert set(per_video[variant]) >= {"facesim", "face_detection_rate", "facesim_std", "pose_pck", "pose_error"}
            assert 0.0 <= per_video[variant]["face_detection_rate"] <= 1.0
            assert len(per_video[variant]["per_frame_facesim"]) == 9
    assert result["identity"]["num_videos"] == 2 and "facesim_gain" in result["gate"]


def test_metrics_logged_to_mlflow_and_alias_follows_the_gate(world, validation):
    from mlflow.tracking import MlflowClient

    out, result = validation
    client = MlflowClient(world["uri"])
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.data.tags["identity"] == "obama" and run.data.tags["stage"] == "render_validation"
    assert run.data.metrics["identity.face_detection_rate"] == pytest.approx(result["identity"]["face_detection_rate"])
    assert run.data.metrics["gate.passed"] == float(result["gate"]["passed"])
    assert run.data.params["render_validation.num_inference_steps"] == "2"
    clip = result["clips"][0]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "sheets")} >= {f"sheets/{clip}.png"}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "videos")} >= {f"videos/{clip}.mp4", f"videos/{clip}_baseline.mp4"}

    name, version = "faceid-obama", world["registered"]["model_version"]
    assert result["mlflow"]["model_version"] == version
    mv = client.get_model_version(name, version)
    assert mv.tags["validation_gate"] == ("passed" if result["gate"]["passed"] else "failed")
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases.get("candidate") == version
    assert (aliases.get("validated") == version) == result["gate"]["passed"]


def test_a_passing_gate_sets_the_validated_alias_on_this_version_only(world, validation, tmp_path):
    from mlflow.tracking import MlflowClient

    from faceid.model.identity import load_identity
    from faceid.validate import log_to_mlflow

    out, result = validation
    p, client = world["params"], MlflowClient(world["uri"])
    passed = copy.deepcopy({k: v for k, v in result.items() if k != "mlflow"})
    passed["gate"].update(passed=True, reasons=[])

    # another folder with the same name (another training run): not the registered version -> no alias
    other = make_identity(tmp_path / "other", p, "obama", seed=7)
    assert log_to_mlflow(p, load_identity(other), out, passed, world["uri"])["alias"] is None

    logged = log_to_mlflow(p, load_identity(world["identity"]), out, passed, world["uri"])
    assert logged["alias"] == "validated"
    assert str(client.get_model_version_by_alias("faceid-obama", "validated").version) == world["registered"]["model_version"]


def test_bad_inputs_are_clear_errors(world, tmp_path):
    from faceid import validate

    p = world["params"]
    bad = copy_with_card(world["identity"], tmp_path / "identity", embedder="arcface-onnx")
    with pytest.raises(InputError, match="uses embedder 'arcface-onnx', not 'dlib'"):
        validate.run(p, bad, world["root"] / "clips", world["root"] / "emb", tmp_path / "out", None)
    with pytest.raises(InputError, match="manifest not found|folder not found"):
        validate.run(p, world["identity"], tmp_path / "noclips", world["root"] / "emb", tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
