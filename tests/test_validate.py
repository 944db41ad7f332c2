"""render-validation on the tiny profile: real pose clips (prepare-pose on the sample videos) and a
real reference embedding (crop + embed of the sample photos); the three arms (base, reference-only,
identity), outputs, metrics.json, metrics read back from a local MLflow store, and the gate (with
its tolerance) that moves the alias only when it passes."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceid.errors import ConfigError, InputError
from test_infer import copy_with_card, make_identity, small
from previews import check_preview
from test_processes import held_lock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


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


# --------------------------------------------------------------------------- zero-shot: a shared adapter (issue 25)


def test_retrieval_finds_the_person_a_real_video_shows(world, people, sample_dir):
    """Retrieval on real frames: the faces of a sample video (a real person's photo dancing) are closest to
    that person's embedding among the four sample people, by a clear margin; told to look for another
    person, the rank drops and the margin is negative. No face: not measurable. Pure but for the scorer."""
    from faceid.faces.embed import load_identity_embedding
    from faceid.faces.similarity import FaceSimScorer
    from faceid.pose.video import read_video
    from faceid.faces.similarity import retrieval

    p, emb_root = world["params"], people["emb"]
    candidates = {d.name: load_identity_embedding(d)[0] for d in sorted(emb_root.iterdir()) if d.is_dir()}
    assert sorted(candidates) == ["astronaut", "biden", "grace_hopper", "obama"]
    shows = {"dance_00": "obama", "dance_02": "biden"}  # sample_data.VIDEO_SOURCES: obama3.jpg, obama2.jpg, biden.jpg
    with FaceSimScorer(candidates["obama"], p.crop_faces, p.embed_faces) as scorer:
        for video, person in shows.items():
            frames = read_video(sample_dir / "videos" / f"{video}.mp4")[0][::6]  # 8 frames, 480x320
            faces = scorer.faces(frames)
            assert len(faces[1]) == len(frames) and faces[0].shape == (len(frames), 128)
            right = retrieval(faces[0], person, candidates)
            assert right["retrieval_rank"] == 1.0 and right["retrieval_correct"] == 1.0 and right["retrieved"] == person
            assert right["retrieval_margin"] > 0.05, right  # same person ~0.95+, strangers ~0.80-0.84 (embed.py)
            # the same faces looked up as someone else: not retrieved, margin below zero by as much
            other = "grace_hopper"
            wrong = retrieval(faces[0], other, candidates)
            assert wrong["retrieval_rank"] >= 2.0 and wrong["retrieval_correct"] == 0.0 and wrong["retrieved"] == person
            assert wrong["retrieval_margin"] < -0.05
            # FaceSim to a given reference from the same detections equals the scorer's own
            assert scorer.score(frames, reference=candidates[person], faces=faces)["mean"] > 0.9
        blank = np.zeros((3, 64, 64, 3), np.uint8)
        assert retrieval(scorer.faces(blank)[0], "obama", candidates) == {
            "retrieval_rank": None, "retrieval_correct": None, "retrieval_margin": None, "retrieved": None}
    with pytest.raises(InputError, match="at least two people"):
        retrieval(np.ones((1, 128), np.float32), "obama", {"obama": candidates["obama"]})


def test_the_gate_judges_the_zero_shot_arm_with_retrieval(params):
    from faceid.validate import evaluate_gate

    gate = params.render_validation.gate  # min_retrieval 1: every render retrieved as its own person
    assert gate.min_retrieval == 1.0

    def check(retrieved, facesim=0.95):
        return evaluate_gate({"base": {"facesim": 0.8}, "reference_only": None,
                              "zero_shot": {"facesim": facesim, "pose_pck": 0.5, "face_detection_rate": 0.9,
                                            "retrieval_correct": retrieved}},
                             gate, 0.9, candidate="zero_shot", retrieval=True)

    ok = check(1.0)
    assert ok["passed"] and ok["arm"] == "zero_shot" and ok["retrieval"] == 1.0
    assert ok["checks"]["retrieval"]["status"] == "passed" and ok["checks"]["vs_reference_only"]["status"] == "not_applicable"
    half = check(0.5)  # one of two held-out people rendered closer to someone else
    assert not half["passed"] and half["reasons"] == [
        "retrieval 0.5000 < min_retrieval 1 (share of renders closest to their own person)"]
    unmeasured = check(None, facesim=None)
    assert "retrieval not measurable (no face detected in the zero_shot videos)" in unmeasured["reasons"]
    assert "FaceSim not measurable (no face detected in the zero_shot videos)" in unmeasured["reasons"]


def make_shared_adapter(folder, params, people: dict, held_out: list[str], seed: int = 3):
    """A shared adapter as train-shared writes it (card kind ``shared``, the people trained and held out,
    every person's mean embedding beside the adapter's), with random weights as :func:`test_infer.make_identity`
    makes them (the random mapper and LoRA change the render, which is what these tests need)."""
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
        for q in list(mapper.parameters()) + [q for n, q in transformer.named_parameters() if "lora_" in n]:
            q.copy_(torch.randn(q.shape, generator=gen) * 0.3)
        mapper.gate_param.fill_(1.0 / mapper.gate_multiplier)
    trained = sorted(p for p in people if p not in held_out)
    card = {"base_model": base_model_id(params.model), "profile": params.model.profile,
            "embedder": params.embed_faces.embedder, "train": {"seed": seed}, "kind": "shared",
            "people": {"trained": trained, "held_out": sorted(held_out)}}
    return save_identity(folder, name="shared", card=card, mapper=mapper, transformer=transformer,
                         embedding=np.mean([people[p] for p in trained], axis=0), people=people)


@pytest.fixture(scope="module")
def people(world, sample_dir):
    """The sample people (``data/sample/people``) cropped and embedded as a folder of people, and a shared
    adapter that holds grace_hopper out, registered in MLflow as train-shared registers (``faceid-shared``)."""
    from faceid.faces import crop, embed
    from faceid.faces.embed import load_identity_embedding
    from faceid.train.launch import log_to_mlflow

    root, p = world["root"], world["params"]
    crop.run_many(p.crop_faces, sample_dir / "people", root / "people_crops")
    embed.run_many(p.embed_faces, root / "people_crops", root / "people_emb")
    embs = {d.name: load_identity_embedding(d)[0] for d in sorted((root / "people_emb").iterdir()) if d.is_dir()}
    adapter = make_shared_adapter(root / "shared", p, embs, ["grace_hopper"])
    registered = log_to_mlflow(p, "shared", adapter, {}, world["uri"])
    return {"emb": root / "people_emb", "adapter": adapter, "embeddings": embs, "registered": registered}


@pytest.fixture(scope="module")
def zero_shot(world, people):
    from faceid import validate

    p = small(world["params"], render_validation__num_clips=1)
    out = world["root"] / "validation_shared"
    result = validate.run(p, None, world["root"] / "clips", people["emb"], out, world["uri"], adapter=people["adapter"])
    return out, result


def test_zero_shot_arm_renders_the_held_out_people_beside_the_base(world, people, zero_shot):
    """render-validation --adapter on a folder of people: every person the adapter held out (grace_hopper)
    rendered zero-shot from their embed-faces output beside the base; retrieval among the adapter's people;
    the gate judges the zero_shot arm; the numbers reach MLflow and the adapter's registered version."""
    from mlflow.tracking import MlflowClient

    from faceid.pose.video import probe, read_video
    from faceid.validate import flat_metrics

    out, result = zero_shot
    written = json.loads((out / "metrics.json").read_text())
    assert written["gate"] == result["gate"] and written["identity_name"] == "shared"
    assert written["adapter"]["people_held_out"] == ["grace_hopper"] and list(written["people"]) == ["grace_hopper"]
    assert written["retrieval_people"] == ["astronaut", "biden", "grace_hopper", "obama"]
    assert written["reference_only"]["skipped"] and written["identity"]["skipped"]
    assert "embed-faces output has none" in written["reference_only"]["reason"]
    clip = result["clips"][0]
    key = f"grace_hopper/{clip}"
    assert list(written["videos"]) == [key] and list(written["videos"][key]) == ["base", "zero_shot"]
    base = read_video(out / "videos" / "grace_hopper" / f"{clip}_base.mp4")[0].astype(int)
    zero = read_video(out / "videos" / "grace_hopper" / f"{clip}_zero_shot.mp4")[0].astype(int)
    assert base.shape == zero.shape == (9, 64, 64, 3) and np.abs(base - zero).mean() > 1.0  # the adapter renders
    assert probe(out / "side_by_side" / "grace_hopper" / f"{clip}.mp4")["width"] == 3 * 4 * 64  # pose | base | zero-shot
    for arm in ("base", "zero_shot"):
        video = written["videos"][key][arm]
        assert {"retrieval_rank", "retrieval_correct", "retrieval_margin", "retrieved"} <= set(video)
        assert written[arm]["num_videos"] == 1 and written["people"]["grace_hopper"][arm]["num_videos"] == 1
    assert written["people"]["grace_hopper"]["held_out"] is True
    gate = written["gate"]
    assert gate["arm"] == "zero_shot" and set(gate["checks"]) >= {"facesim", "retrieval"}
    # the tiny model renders no face (README): FaceSim and retrieval are not measurable, and fail the gate
    assert written["zero_shot"]["face_detection_rate"] == 0.0 and written["zero_shot"]["retrieval_correct"] is None
    assert gate["checks"]["retrieval"] == {"status": "failed", "value": None, "threshold": 1.0,
                                           "reason": "retrieval not measurable (no face detected in the zero_shot videos)"}
    assert not gate["passed"]

    flat = flat_metrics(result)
    assert flat["identity.skipped"] == flat["reference_only.skipped"] == 1.0 and flat["gate.min_retrieval"] == 1.0
    assert flat["person.grace_hopper.zero_shot.face_detection_rate"] == 0.0 and flat["gate.retrieval.passed"] == 0.0
    client = MlflowClient(world["uri"])
    run = client.get_run(result["mlflow"]["run_id"])
    assert (run.data.tags["adapter"], run.data.tags["people"], run.data.tags["gated_arm"]) == ("shared", "grace_hopper",
                                                                                                "zero_shot")
    assert run.data.tags["not_measured.zero_shot.retrieval_correct"] == "no face detected in any frame"
    assert run.data.metrics[f"clip.{key}.zero_shot.face_detection_rate"] == 0.0
    assert result["mlflow"]["model_name"] == "faceid-shared"
    assert result["mlflow"]["model_version"] == people["registered"]["model_version"]
    mv = client.get_model_version("faceid-shared", result["mlflow"]["model_version"])
    assert mv.tags["validation_gate"] == "failed" and mv.tags["validation_side_by_side"] == f"side_by_side/{key}.mp4"
    assert "pose | base | zero-shot)" in mv.description


def test_zero_shot_inputs_are_checked_before_the_model_is_built(world, people, tmp_path, no_model, capsys):
    from faceid import validate

    p, root, adapter = world["params"], world["root"], people["adapter"]

    def run(identity=None, reference=people["emb"], adapter=adapter):
        validate.run(p, identity, root / "clips", reference, tmp_path / "out", None, adapter=adapter)

    for kwargs, message in [
        (dict(adapter=None), "expected --identity \\(a train-lora folder\\) and/or --adapter"),
        (dict(adapter=world["identity"]), "not a shared adapter \\(train-shared writes those\\)"),
        (dict(identity=world["identity"]), "is one person's adapter, but .* is a folder of people; pass --reference <that person's"),
        (dict(reference=root / "emb"), None),  # one person (obama, trained on): checked, then the model: no_model fires
    ]:
        if message is None:
            with pytest.raises(AssertionError, match="the model was built before the inputs were checked"):
                run(**kwargs)
        else:
            with pytest.raises(InputError, match=message):
                run(**kwargs)
    # the command: --identity is optional, but one of --identity / --adapter is needed (exit 2, one line)
    from faceid.cli import main

    rc = main(["--params", str(REPO_PARAMS), "render-validation", "--clips", str(root / "clips"), "--reference",
               str(people["emb"]), "--output", str(tmp_path / "out")])
    assert rc == 2 and "expected --identity (a train-lora folder) and/or --adapter" in capsys.readouterr().err
    nobody_out = make_shared_adapter(tmp_path / "all_in", p, people["embeddings"], [])
    with pytest.raises(InputError, match="held no person out .* pass --reference <one person's embed-faces folder>"):
        run(adapter=nobody_out)
    partial = tmp_path / "some_people"
    (partial / "obama").mkdir(parents=True)
    with pytest.raises(InputError, match="no embed-faces output for grace_hopper \\(held out by the shared adapter"):
        run(reference=partial)
    assert not (tmp_path / "out").exists()
