"""The train-lora plan (faceid.train.plan) on real photos and real videos: face sizes of full-body
clips vs head-and-shoulders photos and the small-face views that close the gap (measured, and seen
by a face detector in the pixels); the schedule from the number of photos; captions in the
inference prompt's family; ``faceid train-lora --plan`` prints the plan, loads no diffusion model
and writes nothing."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from faceid.config import load_params, params_from_dict, to_dict
from faceid.errors import ConfigError
from faceid.train import plan as pl
from faceid.train import photos as ph

HEADSHOTS = ("obama.jpg", "obama2.jpg", "obama_partial_face.jpg")  # head-and-shoulders photos of the sample identity
CLIP_H, CLIP_W = 832, 480  # full-body portrait dance clips


@pytest.fixture(scope="module")
def headshots(tmp_path_factory, params, sample_dir):
    """``(crops, embeddings)`` of the identity's head-and-shoulders photos only (real crop/embed-faces)."""
    from faceid.faces import crop, embed

    root = tmp_path_factory.mktemp("headshots")
    (root / "photos").mkdir()
    for name in HEADSHOTS:
        shutil.copy(sample_dir / "identities" / "obama" / name, root / "photos" / name)
    crop.run(params.crop_faces, root / "photos", root / "crops")
    embed.run(params.embed_faces, root / "crops", root / "emb")
    return root / "crops", root / "emb"


@pytest.fixture(scope="module")
def fullbody(tmp_path_factory, params):
    """prepare-pose clips (832x480, portrait) of a sample video of the identity standing (obama3: head
    to below the knees fills the frame's height)."""
    from faceid import sample_data
    from faceid.pose import prepare

    root = tmp_path_factory.mktemp("fullbody")
    sample = dataclasses.replace(params.sample_data, num_videos=1, video_seconds=1.25, video_height=CLIP_H,
                                 video_width=CLIP_W)
    assert sample_data.VIDEO_SOURCES[0] == "obama3.jpg"
    sample_data.run(sample, root / "sample")
    cfg = dataclasses.replace(params.prepare_pose, num_frames=9, height=CLIP_H, width=CLIP_W, max_clips_per_video=2,
                              workers=1, face_samples=2)
    prepare.run(cfg, root / "sample" / "videos", None, root / "clips")
    return root / "clips"


def plan_params(params, **values):
    """Validation off; the clips routed as priors (threshold 0.999), so only the photos show the face."""
    return params_from_dict(to_dict(params), values={"train_lora.validation.validate_every": 0,
                                                     "train_lora.clip_identity_threshold": 0.999, **values})


@pytest.fixture(scope="module")
def plans(params, headshots, fullbody):
    """The plan of the headshots against the full-body clips, without and with small-face views."""
    crops, emb = headshots
    return {n: pl.make_plan(plan_params(params, **{"train_lora.photos.small_face_views": n}), crops, emb, fullbody)
            for n in (0, 3)}


def test_the_photo_and_clip_face_measures_agree_on_real_photos(headshots):
    """A photo view's face is the detector's box, a clip frame's the head box of its keypoints: on the
    same real photos the two agree within 25 %, so the sizes compare."""
    from faceid.faces.crop import read_photos
    from faceid.pose.estimate import MediapipePoseEstimator
    from faceid.train.data import face_box_from_keypoints

    est = MediapipePoseEstimator()
    try:
        for rec in read_photos(*headshots):
            kps, source = ph.estimate_photo_pose(est, ph.read_rgb(rec.photo_path), rec.landmarks)
            assert source == "pose-estimator"
            head = face_box_from_keypoints(kps)
            assert abs(ph.face_height(head) / ph.face_height(rec.box) - 1) < 0.25, rec.name
    finally:
        est.close()


def test_small_face_views_bring_headshots_to_full_body_clip_sizes(plans):
    plain, small = plans[0], plans[3]
    clips = small.face_sizes["clips"]
    assert clips["n"] >= 10 and 40 <= clips["median"] <= 140  # a standing person's face in an 832 px tall frame
    # person-aware crops of head-and-shoulders photos: faces 1.5x or more the clips' largest, none covered
    assert plain.face_sizes["identity_examples"]["min"] > 1.5 * clips["max"]
    assert plain.face_sizes["coverage"] == 0.0
    assert any("faces too small to cover" in w and "small_face_views" in w for w in plain.warnings)
    # three small-face views per photo at the clips' 5th / 50th / 95th percentiles
    assert small.face_sizes["coverage"] >= 0.9
    assert not any("faces too small to cover" in w for w in small.warnings)
    targets = small.face_sizes["small_face_targets"]
    assert len(targets) == 3 and clips["min"] <= targets[0] < targets[1] < targets[2] <= clips["max"]
    for p in small.photos:
        assert [round(h, 1) for h in p.view_face_px[-3:]] == targets
        assert min(p.view_face_px[:-3]) > 1.5 * clips["max"]


def test_clips_of_the_person_are_identity_examples_of_their_own_size(params, headshots, fullbody, plans):
    """Routed with the calibrated threshold, the standing clips show the person: their frames count as
    identity examples (covering themselves), and the plan warns that stage 2 has no motion prior."""
    plan = pl.make_plan(plan_params(params, **{"train_lora.clip_identity_threshold": 0.0}), *headshots, fullbody)
    trained = [c.clip_id for c in plan.clips]
    assert [r.role for r in plan.routes] == ["identity"] * len(trained)
    frames = sum(len(plan.clip_face_px[c]) for c in trained)
    assert plan.face_sizes["identity_examples"]["n"] == plans[0].face_sizes["identity_examples"]["n"] + frames
    assert plan.face_sizes["coverage"] > 0 and plan.schedule.passes_per_photo < plans[0].schedule.passes_per_photo
    assert any(w.startswith("no prior clip") for w in plan.warnings)


def test_a_small_face_view_shows_the_face_at_the_planned_size(plans):
    """In the pixels: a face detector finds the face of the zoomed-out view at the planned height and
    place; the fill outside the photo is flat and out of the loss box; the pose keeps the head."""
    from faceid.faces.detect import build_detector, select_main_face
    from faceid.pose.prepare import DRAW_MIN_CONFIDENCE

    plan = plans[3]
    pp = next(p for p in plan.photos if p.name.startswith("obama2"))
    rec = next(r for r in plan.records if r.name == pp.name)
    view = pp.views[-2]  # the clips' median face height
    photo = ph.read_rgb(rec.photo_path)
    ex = ph.make_small_face_example(photo, rec.box, pp.keypoints, (CLIP_H, CLIP_W), view, DRAW_MIN_CONFIDENCE)
    assert ex.target.shape == (1, CLIP_H, CLIP_W, 3) and ex.pose.shape == ex.target.shape
    assert abs(ph.face_height(ex.face_box) - view.face_px) < 1.0
    det = build_detector("mediapipe", 0.5)
    try:
        faces = det.detect(ex.target[0])
    finally:
        det.close()
    found = faces[select_main_face(faces, CLIP_H, CLIP_W)].box
    assert abs(ph.face_height(found) / view.face_px - 1) < 0.3
    cx, cy = (found[0] + found[2]) / 2 / CLIP_W, (found[1] + found[3]) / 2 / CLIP_H
    assert abs(cx - view.face_cx) < 0.05 and abs(cy - view.face_cy) < 0.05
    x0, y0, x1, y1 = (int(v) for v in ex.valid)
    assert (x1 - x0) * (y1 - y0) < 0.5 * CLIP_H * CLIP_W  # a headshot zoomed out fills part of the frame
    outside = np.ones((CLIP_H, CLIP_W), bool)
    outside[y0:y1, x0:x1] = False
    fill = ex.target[0][outside]
    assert (fill == fill[0]).all()  # one flat colour, the photo's mean
    assert (ex.keypoints[[0, 14, 15], 2] > 0).all()  # nose and eyes drawn where the face is


def test_schedule_follows_the_number_of_photos(repo):
    real = load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}"]).train_lora
    sc = real.schedule
    assert sc.mode == "per_photo" and 100 <= sc.steps_per_photo <= 250 and real.validation.patience > 0
    three = pl.resolve_schedule(real, num_photos=3, views_per_photo=7, identity_clips=0, world_size=1)
    # 3 photos x 200 draws: 150 stage-1 steps, 450 identity draws in stage 2 at identity_share 0.6 -> 750 steps
    assert (three.stage1_steps, three.stage2_steps) == (150, 750)
    assert three.passes_per_photo == pytest.approx(200) and three.passes_per_example == pytest.approx(200 / 7)
    ten = pl.resolve_schedule(real, 10, 7, 0, 1)  # 2000 draws: 500 + 1500 / 0.6
    assert (ten.stage1_steps, ten.stage2_steps) == (500, 2500) and ten.passes_per_photo == pytest.approx(200)
    many = pl.resolve_schedule(real, 15, 7, 0, 1)  # 3000 draws: 750 + 2250 / 0.6 = 3750 > the stage-2 cap
    assert (many.stage1_steps, many.stage2_steps) == (750, real.stage2.steps)
    assert many.passes_per_photo < 200 and "at most" in many.why
    one = pl.resolve_schedule(real, 1, 7, 0, 1)
    assert (one.stage1_steps, one.stage2_steps) == (sc.min_steps, 250)  # 50 stage-1 steps raised to min_steps
    two_workers = pl.resolve_schedule(real, 3, 7, 0, 2)  # each step draws on both workers
    assert (two_workers.stage1_steps, two_workers.stage2_steps) == (sc.min_steps, 375)  # 75 raised to min_steps
    clips = pl.resolve_schedule(real, 3, 7, 4, 1)  # identity clips share the identity draws
    assert clips.stage2_steps == 750 and clips.passes_per_photo == pytest.approx(600 * 7 / 25)
    capped = dataclasses.replace(real, stage1=dataclasses.replace(real.stage1, steps=0))
    with pytest.raises(ConfigError, match=r"trains 0 \+ 750 steps.*expected steps > 0"):
        pl.resolve_schedule(capped, 3, 7, 0, 1)


def test_tiny_profile_keeps_its_fixed_steps(params):
    t = params.train_lora
    assert t.schedule.mode == "fixed"
    s = pl.resolve_schedule(t, 3, 2, 0, 1)
    assert (s.stage1_steps, s.stage2_steps) == (t.stage1.steps, t.stage2.steps)
    assert s.passes_per_photo == pytest.approx((t.stage1.steps + t.stage2.steps * t.identity_share) / 3)
    none = dataclasses.replace(t, stage1=dataclasses.replace(t.stage1, steps=0), stage2=dataclasses.replace(t.stage2, steps=0))
    with pytest.raises(ConfigError, match="trains 0 \\+ 0 steps"):
        pl.resolve_schedule(none, 3, 2, 0, 1)


def test_photo_captions_are_the_inference_prompt(params, repo):
    from faceid.render import choose_prompt, settings_from

    for p in (params, load_params(repo / "params.yaml", [f"@{repo / 'configs' / 'wan2.1-vace-1.3b.yaml'}"])):
        inference = choose_prompt(settings_from(p.batch_infer), None, p.prepare_pose.default_caption)
        assert pl.photo_caption("", p) == inference == "a person dancing"
        assert pl.photo_caption("a woman in a red coat", p) == "a woman in a red coat"  # a <photo>.txt sidecar wins
    own = params_from_dict(to_dict(params), values={"train_lora.photos.default_caption": "a person"})
    assert pl.photo_caption("", own) == "a person"


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_plan_flag_prints_the_plan_loads_no_diffusion_model_and_writes_nothing(repo, headshots, fullbody, tmp_path):
    crops, emb = headshots
    work = tmp_path / "work"
    work.mkdir()
    before = {d: _tree(d) for d in (crops, emb, fullbody, work)}
    code = ("import sys; from faceid.cli import main; rc = main(sys.argv[1:]); "
            "heavy = [m for m in ('diffusers', 'transformers', 'ray', 'mlflow') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    args = ["--params", str(repo / "params.yaml"), "--set", "train_lora.photos.small_face_views=3",
            "--set", "train_lora.validation.validate_every=0", "--set", "train_lora.clip_identity_threshold=0.999",
            "train-lora", "--identity", "ann", "--crops", str(crops), "--embeddings", str(emb), "--clips", str(fullbody),
            "--output", str(work / "identity"), "--plan"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for section in ("train-lora plan for ann", "identity examples:", "views per photo: 5 (2 person-aware, 3 small-face)",
                    "clips: 0 identity", "face sizes (face box height, px", "coverage:", "schedule:",
                    "passes per photo:", "estimate on CPU, tiny profile", "warnings:"):
        assert section in text, (section, text)
    assert "caption 'a person dancing'" in text
    assert "no identity clip" in text  # the threshold routes every clip to the prior
    assert "HEAVY []" in text  # no diffusion model, no Ray, no MLflow
    assert {d: _tree(d) for d in before} == before  # nothing written: no output, lock, cache, mlruns, Ray folder
