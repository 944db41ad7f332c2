"""render-validation on the tiny profile: real pose clips (prepare-pose on the sample videos) and a
real reference embedding (crop + embed of the sample photos); the three arms (base, reference-only,
identity), outputs, metrics.json, metrics read back from a local MLflow store, and the gate (with
its tolerance) that moves the alias only when it passes."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from PIL import Image

from faceid.errors import ConfigError, InputError
from test_infer import copy_with_card, make_identity, small
from previews import check_preview
from test_processes import held_lock

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

    import dataclasses

    tiny = params.render_validation.gate  # min_facesim 0 (the embedder's threshold), detection >= 0.5, gain >= 0
    assert (tiny.min_facesim, tiny.min_face_detection_rate, tiny.min_facesim_gain, tiny.tolerance) == (0.0, 0.5, 0.0, 0.02)
    gate = dataclasses.replace(tiny, min_facesim=0.65)  # the rules other than the same-person threshold

    def check(identity, base=0.6, reference_only=0.7, pck=0.5, detected=0.75, g=gate, threshold=0.9):
        ref = None if reference_only is None else {"facesim": reference_only}
        return evaluate_gate({"base": {"facesim": base}, "reference_only": ref,
                              "identity": {"facesim": identity, "pose_pck": pck, "face_detection_rate": detected}}, g, threshold)

    ok = check(0.69)  # above base; within the tolerance of reference-only
    assert ok["passed"] and ok["facesim_gain"] == pytest.approx(0.09) and ok["facesim_vs_reference_only"] == pytest.approx(-0.01)
    assert {k: c["status"] for k, c in ok["checks"].items()} == {"facesim": "passed", "face_detection_rate": "passed",
                                                                "facesim_gain": "passed", "vs_reference_only": "passed",
                                                                "pose_pck": "passed", "retrieval": "not_applicable"}
    # min_facesim 0 = the embedder's same-person threshold: 0.69 beats the base but is not the same person
    stranger = check(0.69, g=tiny)
    assert not stranger["passed"] and stranger["reasons"] == ["FaceSim 0.6900 < min_facesim 0.9 (the same-person threshold)"]
    assert check(0.95, reference_only=0.9, g=tiny)["passed"] and tiny.min_facesim == 0.0
    # a face on too few frames: the mean FaceSim is a few lucky frames
    rare = check(0.69, detected=0.25)
    assert not rare["passed"] and rare["reasons"] == ["face detection rate 0.2500 < min_face_detection_rate 0.5"]
    # a real-profile gain: above base by less than min_facesim_gain fails
    small_gain = check(0.69, base=0.66, g=dataclasses.replace(gate, min_facesim_gain=0.05))
    assert not small_gain["passed"] and small_gain["reasons"] == ["FaceSim gain over base 0.0300 < min_facesim_gain 0.05"]
    assert check(0.6, reference_only=0.6, g=dataclasses.replace(gate, min_facesim=0.5))["passed"]  # gain 0 >= min_facesim_gain 0
    below_base = check(0.55, reference_only=0.5, g=dataclasses.replace(gate, min_facesim=0.5))
    assert not below_base["passed"] and below_base["reasons"] == ["FaceSim gain over base -0.0500 < min_facesim_gain 0"]
    behind_ref = check(0.67)
    assert not behind_ref["passed"] and behind_ref["checks"]["vs_reference_only"]["status"] == "failed"
    assert behind_ref["reasons"] == ["FaceSim over reference-only -0.0300 < -tolerance (-0.02)"]
    skipped = check(0.67, reference_only=None)  # no reference.png: not applicable, not failed
    assert skipped["passed"] and skipped["checks"]["vs_reference_only"]["status"] == "not_applicable"
    assert skipped["facesim_vs_reference_only"] is None
    no_face = check(None)
    assert not no_face["passed"] and all("not measurable" in r for r in no_face["reasons"]) and len(no_face["reasons"]) == 3
    assert "pose PCK not measurable" in check(0.8, pck=None)["reasons"][0]


def test_clip_selection_and_images():
    from faceid.render import frames_sheet
    from faceid.validate import select_clips

    rows = [{"clip_id": c} for c in ("c2", "c0", "c1")]
    assert select_clips(rows, {"c0", "c1"}, 2) == ([{"clip_id": "c2"}], True)
    assert select_clips(rows, {"c0", "c1", "c2"}, 2) == ([{"clip_id": "c1"}, {"clip_id": "c2"}], False)
    v = np.zeros((9, 16, 24, 3), np.uint8)
    assert frames_sheet([v, v, v, v], num_frames=4, gap=2).shape == (4 * 16 + 6, 4 * 24 + 6, 3)


def test_previews_are_enlarged_exactly_labelled_and_deterministic(tmp_path):
    """Preview videos (faceid.preview): a tiny render enlarged by an integer factor, nearest neighbour
    (each render pixel a k x k block: the render comes back exactly), a label drawn only in its box;
    real-size renders reduced to MAX_SIDE; the same frames give the same bytes (video and sheet)."""
    from faceid.preview import (MAX_SIDE, SHEET_FRAMES, SHEET_GAP, label_box, preview_panels, preview_scale, preview_sheet,
                                preview_video, write_preview)

    rng = np.random.default_rng(0)
    panels = {n: rng.integers(0, 256, (5, 64, 64, 3), dtype=np.uint8) for n in ("pose", "base", "reference_only", "identity")}
    plain, k = preview_panels(panels, labels=False)
    labelled, _ = preview_panels(panels)
    assert k == 4 and preview_video(panels).shape == (5, 256, 1024, 3)
    for (name, render), big, marked in zip(panels.items(), plain, labelled):
        assert np.array_equal(big[:, ::k, ::k], render)  # downsampling by k gives the render back
        assert np.array_equal(big, render.repeat(k, 1).repeat(k, 2))  # and every block is one pixel
        x0, y0, x1, y1 = label_box(256, {"reference_only": "reference-only"}.get(name, name))
        changed = np.argwhere((marked != big).any(axis=(0, 3)))
        assert len(changed) > 0 and changed.min(0).tolist() >= [y0, x0] and changed.max(0).tolist() < [y1, x1], name
    assert preview_scale(64, 64, 1) == 8  # one panel: the frame's long side still >= 512
    assert preview_scale(256, 448, 4) == 1  # already watchable: kept
    real = {n: np.zeros((9, 480, 832, 3), np.uint8) for n in panels}
    video = preview_video(real)
    assert max(video.shape[1:3]) <= MAX_SIDE and video.shape[1] % 2 == 0 and video.shape[2] % 2 == 0
    assert preview_sheet(real).shape[1] <= MAX_SIDE + SHEET_FRAMES * SHEET_GAP  # 8 frames a row, reduced too
    for out in ("a", "b"):
        write_preview(tmp_path / out / "x.mp4", tmp_path / out / "x.png", panels, 16)
    for name in ("x.mp4", "x.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory, params, sample_dir):
    from faceid import tracking
    from faceid.faces import crop, embed
    from faceid.pose import prepare
    from faceid.train.launch import log_to_mlflow

    root = tmp_path_factory.mktemp("validate")
    p = small(params, prepare_pose__num_frames=9, prepare_pose__max_clips_per_video=1, prepare_pose__workers=1,
              render_validation__num_inference_steps=2, render_validation__num_clips=2)
    prepare.run(p.prepare_pose, sample_dir / "videos", None, root / "clips")
    crop.run(p.crop_faces, sample_dir / "identities" / "obama", root / "crops")
    embed.run(p.embed_faces, root / "crops", root / "emb")
    crop = np.asarray(Image.open(sorted((root / "crops").glob("crops/*/*.png"))[0]).convert("RGB"))
    identity = make_identity(root / "identity", p, "obama", seed=1, reference=crop)
    uri = tracking.local_store_uri(root / "mlruns")
    registered = log_to_mlflow(p, "obama", identity, {}, uri)
    return {"root": root, "params": p, "identity": identity, "uri": uri, "registered": registered}


@pytest.fixture(scope="module")
def validation(world):
    from faceid import validate

    out = world["root"] / "validation"
    result = validate.run(world["params"], world["identity"], world["root"] / "clips", world["root"] / "emb", out, world["uri"])
    return out, result


def test_three_arms_outputs_and_metrics_json(world, validation):
    from faceid.pose.video import probe, read_video
    from faceid.validate import _clip_rows

    out, result = validation
    written = json.loads((out / "metrics.json").read_text())
    assert written["gate"] == result["gate"] and written["identity_name"] == "obama"
    assert len(result["clips"]) == 2 and result["held_out"] is True  # the card lists no training clips
    assert result["metric"] == "FaceSim-dlib"
    for clip in result["clips"]:
        videos = {}
        names = {"identity": f"{clip}.mp4", "base": f"{clip}_base.mp4", "reference_only": f"{clip}_reference_only.mp4"}
        for arm, name in names.items():
            info = probe(out / "videos" / name)
            assert (info["frames"], info["height"], info["width"], info["fps"]) == (9, 64, 64, 16.0)
            videos[arm] = read_video(out / "videos" / name)[0].astype(int)
        # three different renders (H.264: compare with a margin)
        for a, b in (("base", "reference_only"), ("base", "identity"), ("reference_only", "identity")):
            assert np.abs(videos[a] - videos[b]).mean() > 1.0, (a, b)
        # pose | base | reference-only | identity: the preview, enlarged x4 (nearest) and labelled, its sheet beside it
        pose = read_video(next(r["pose_path"] for r in _clip_rows(world["root"] / "clips") if r["clip_id"] == clip))[0]
        assert check_preview(out / "side_by_side" / f"{clip}.mp4", out / "side_by_side" / f"{clip}.png",
                             {"pose": pose, **{arm: videos[arm] for arm in ("base", "reference_only", "identity")}}) == 4
        sheet = np.asarray(Image.open(out / "sheets" / f"{clip}.png"))
        assert sheet.shape[0] == 4 * 64 + 3 * 2  # four rows
        per_video = result["videos"][clip]
        assert list(per_video) == ["base", "reference_only", "identity"]
        for arm in per_video:
            assert set(per_video[arm]) >= {"facesim", "face_detection_rate", "facesim_std", "pose_pck", "pose_error"}
            assert 0.0 <= per_video[arm]["face_detection_rate"] <= 1.0
            assert len(per_video[arm]["per_frame_facesim"]) == 9
    for arm in ("base", "reference_only", "identity"):
        assert written[arm]["num_videos"] == 2 and "skipped" not in written[arm]
    gate = written["gate"]
    assert set(gate["checks"]) == {"facesim", "face_detection_rate", "facesim_gain", "vs_reference_only", "pose_pck",
                                   "retrieval"}
    assert gate["arm"] == "identity" and gate["checks"]["retrieval"]["status"] == "not_applicable"  # one person
    assert gate["tolerance"] == 0.02 and gate["min_facesim"] == 0.90  # dlib's same-person threshold
    assert not gate["passed"]  # the tiny model renders no face (README): its gate never passes
    assert all(c["status"] in ("passed", "failed") for k, c in gate["checks"].items() if k != "retrieval")
    assert gate["passed"] == (not gate["reasons"]) == all(c["status"] == "passed" for c in gate["checks"].values())


def test_metrics_logged_to_mlflow_and_alias_follows_the_gate(world, validation):
    from mlflow.tracking import MlflowClient

    out, result = validation
    client = MlflowClient(world["uri"])
    run = client.get_run(result["mlflow"]["run_id"])
    assert run.data.tags["identity"] == "obama" and run.data.tags["stage"] == "render_validation"
    for arm in ("base", "reference_only", "identity"):
        assert run.data.metrics[f"{arm}.face_detection_rate"] == pytest.approx(result[arm]["face_detection_rate"])
        clip = result["clips"][0]
        assert run.data.metrics[f"clip.{clip}.{arm}.face_detection_rate"] == pytest.approx(
            result["videos"][clip][arm]["face_detection_rate"])
    assert run.data.metrics["gate.passed"] == float(result["gate"]["passed"])
    assert run.data.metrics["gate.tolerance"] == pytest.approx(0.02)
    assert run.data.metrics["gate.pose_pck.passed"] == float(result["gate"]["checks"]["pose_pck"]["status"] == "passed")
    assert run.data.params["render_validation.num_inference_steps"] == "2"
    clip = result["clips"][0]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "sheets")} >= {f"sheets/{clip}.png"}
    assert {f.path for f in client.list_artifacts(run.info.run_id, "videos")} >= {
        f"videos/{clip}.mp4", f"videos/{clip}_base.mp4", f"videos/{clip}_reference_only.mp4"}

    name, version = "faceid-obama", world["registered"]["model_version"]
    assert result["mlflow"]["model_version"] == version
    mv = client.get_model_version(name, version)
    assert mv.tags["validation_gate"] == ("passed" if result["gate"]["passed"] else "failed")
    aliases = {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}
    assert aliases.get("candidate") == version
    assert (aliases.get("validated") == version) == result["gate"]["passed"]


def test_mlflow_numbers_are_true_and_runs_traceable(world, validation):
    """Issue 24: a number that could not be measured is absent from the run (never a 0) with a tag
    saying why; the run's name has the identity and a hash, Source and Created by are set; the
    registered version names its training run, its validation run and the side-by-side videos."""
    import re

    from mlflow.tracking import MlflowClient

    out, result = validation
    client = MlflowClient(world["uri"])
    run = client.get_run(result["mlflow"]["run_id"])
    unmeasured = [(arm, k) for arm in ("base", "reference_only", "identity") for k, v in result[arm].items() if v is None]
    assert ("base", "facesim") in unmeasured  # the tiny model renders no face: "n/a" in the terminal
    for arm, key in unmeasured:
        assert f"{arm}.{key}" not in run.data.metrics and run.data.tags[f"not_measured.{arm}.{key}"], (arm, key)
    assert run.data.tags["not_measured.base.facesim"] == "no face detected in any frame"
    assert not any(k.startswith("not_measured.") and k.split(".", 1)[1] in run.data.metrics for k in run.data.tags)
    assert re.fullmatch(r"render-validation obama [0-9a-f]{7}", run.info.run_name)
    assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    mv = client.get_model_version("faceid-obama", world["registered"]["model_version"])
    training = world["registered"]["mlflow_run_id"]
    assert mv.tags["training_run_id"] == training and mv.tags["validation_run_id"] == run.info.run_id
    videos = mv.tags["validation_side_by_side"].split()
    assert videos == [f"side_by_side/{c}.mp4" for c in result["clips"]]
    assert set(videos) <= {f.path for f in client.list_artifacts(run.info.run_id, "side_by_side")}
    assert training in mv.description and run.info.run_id in mv.description and videos[0] in mv.description


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


def test_without_reference_png_the_reference_only_arm_is_skipped(world, tmp_path):
    from faceid import validate
    from faceid.pose.video import probe

    p = small(world["params"], render_validation__num_clips=1)
    plain = make_identity(tmp_path / "plain", p, "obama", seed=1)  # written without reference.png
    result = validate.run(p, plain, world["root"] / "clips", world["root"] / "emb", tmp_path / "out", None)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["reference_only"] == {"skipped": True, "reason": f"{plain / 'reference.png'} not found "
                                                                     "(identity folder written before it existed)"}
    check = written["gate"]["checks"]["vs_reference_only"]
    assert check["status"] == "not_applicable" and not any("reference-only" in r for r in written["gate"]["reasons"])
    assert written["base"]["num_videos"] == written["identity"]["num_videos"] == 1
    clip = result["clips"][0]
    assert list(written["videos"][clip]) == ["base", "identity"]
    assert not (tmp_path / "out" / "videos" / f"{clip}_reference_only.mp4").exists()
    assert probe(tmp_path / "out" / "side_by_side" / f"{clip}.mp4")["width"] == 3 * 4 * 64  # pose | base | identity, x4
    flat = validate.flat_metrics(result)
    assert flat["reference_only.skipped"] == 1.0 and "gate.vs_reference_only.passed" not in flat
    assert not any(k.startswith("reference_only.") and k != "reference_only.skipped" for k in flat)


def test_bad_inputs_are_clear_errors(world, tmp_path):
    from faceid import validate

    p = world["params"]
    bad = copy_with_card(world["identity"], tmp_path / "identity", embedder="arcface-onnx")
    with pytest.raises(InputError, match="uses embedder 'arcface-onnx', not 'dlib'"):
        validate.run(p, bad, world["root"] / "clips", world["root"] / "emb", tmp_path / "out", None)
    with pytest.raises(InputError, match="manifest not found|folder not found"):
        validate.run(p, world["identity"], tmp_path / "noclips", world["root"] / "emb", tmp_path / "out", None)
    with pytest.raises(ConfigError, match="render_validation.face_scale: expected a finite number >= 0, got -0.5"):
        small(p, render_validation__face_scale=-0.5)  # checked when the config loads
    assert not (tmp_path / "out").exists()


def test_inputs_are_checked_before_the_model_is_built(world, tmp_path, no_model):
    from faceid import validate

    p, root = world["params"], world["root"]
    good = dict(identity_dir=world["identity"], clips_dir=root / "clips", reference=root / "emb")
    for change, message in [
        (dict(identity_dir=tmp_path / "nobody"), "nobody: identity folder not found"),
        (dict(clips_dir=tmp_path / "noclips"), "noclips"),
        (dict(reference=tmp_path / "noemb"), "noemb"),
        (dict(identity_dir=copy_with_card(world["identity"], tmp_path / "other", base_model="wan2.1-vace-1.3b")),
         "trained on base model 'wan2.1-vace-1.3b'"),
    ]:
        with pytest.raises(InputError, match=message):
            validate.run(p, output_dir=tmp_path / "out", mlflow_uri=None, **{**good, **change})
    assert not (tmp_path / "out").exists()


def test_a_second_writer_fails_at_once(world, tmp_path, no_model):
    from faceid import validate
    from faceid.io import LockedError

    out, root = tmp_path / "out", world["root"]
    with held_lock("render-validation", out) as holder:
        with pytest.raises(LockedError, match=rf"another render-validation run \(pid {holder.pid}\) is writing {out}"):
            validate.run(world["params"], world["identity"], root / "clips", root / "emb", out, None)
    assert not out.exists()
