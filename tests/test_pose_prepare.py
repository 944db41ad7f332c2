"""The prepare_pose stage end to end on real videos: clips, face regions, pairing, captions, bad inputs, reruns."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from test_pose_video import person_frames

from faceid.config import params_from_dict
from faceid.errors import ConfigError
from faceid.io import read_parquet
from faceid.outputs import written_by
from faceid.pose import prepare
from faceid.pose.video import probe, read_video, write_video

COLUMNS = [
    "clip_id", "source", "start_frame", "num_frames", "fps", "height", "width", "video_path", "pose_path",
    "keypoints_path", "faces_path", "caption", "pose_detection_rate", "num_face_regions", "checksum", "status",
    "reason",
]  # fmt: skip
FACE_ARRAYS = {"regions", "frames", "boxes", "sizes", "checksum"}


@pytest.fixture(scope="module")
def frames():
    return person_frames(num_frames=40)  # 288x160 portrait, 2.5 s at 16 fps


@pytest.fixture(scope="module")
def cfg(params):
    return dataclasses.replace(
        params.prepare_pose, fps=16, num_frames=17, height=96, width=64, stride=8, max_clips_per_video=0,
        min_pose_detection_rate=0.5, default_caption="a person dancing", person_aware_crop=True, face_samples=5,
        workers=1,  # in this process (Ray: tests/test_pose_scale.py)
    )


@pytest.fixture(scope="module")
def videos(tmp_path_factory, frames):
    d = tmp_path_factory.mktemp("videos")
    write_video(d / "dancer.mp4", frames, 16)
    (d / "dancer.txt").write_text("a man in a suit dances\n")
    write_video(d / "short.mp4", frames[:10], 16)
    noise = np.random.default_rng(1).normal(90, 8, (20, 96, 64, 3))  # background only: nobody there
    write_video(d / "blank.mp4", noise.clip(0, 255).astype(np.uint8), 16)
    (d / "broken.mp4").write_bytes(b"not a video at all" * 20)
    (d / "empty.mp4").write_bytes(b"")
    (d / "notes.md").write_text("hello")
    return d


@pytest.fixture(scope="module")
def first_run(cfg, videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("clips")
    summary = prepare.run(cfg, videos, None, out)
    return out, summary, {r["clip_id"]: r for r in read_parquet(out / "manifest.parquet")}


def test_manifest_has_clips_and_reasons(first_run):
    out, summary, rows = first_run
    assert list(next(iter(rows.values()))) == COLUMNS
    ok = {k: r for k, r in rows.items() if r["status"] == "ok"}
    assert sorted(ok) == ["dancer-00000", "dancer-00008", "dancer-00016"]  # 40 frames, 17 per clip, stride 8
    assert summary["clips_ok"] == 3 and summary["clips_written"] == 4 and summary["clips_skipped"] == 0
    reasons = {k: r["reason"] for k, r in rows.items() if r["status"] == "rejected"}
    assert "too short: 10 frames" in reasons["short"]
    assert "not a readable video" in reasons["broken"]
    assert "empty file" in reasons["empty"]
    assert "not a video" in reasons["notes"]
    assert "person detected in 0% of frames" in reasons["blank-00000"]
    for r in ok.values():
        assert r["caption"] == "a man in a suit dances"  # <name>.txt sidecar
        assert r["pose_detection_rate"] >= 0.8
        assert (r["num_frames"], r["fps"], r["height"], r["width"]) == (17, 16.0, 96, 64)
        assert r["source"] == "dancer.mp4" and len(r["checksum"]) == 64


def test_clip_files_follow_the_contract(first_run, frames):
    out, _, rows = first_run
    row = rows["dancer-00008"]
    for key in ("video_path", "pose_path"):
        info = probe(out / row[key])
        assert (info["frames"], info["height"], info["width"]) == (17, 96, 64)
        assert info["fps"] == pytest.approx(16)
    video, _ = read_video(out / row["video_path"])
    pose, _ = read_video(out / row["pose_path"])
    kps = np.load(out / row["keypoints_path"])["keypoints"]
    assert kps.shape == (17, 18, 3)
    # the clip shows the source frames 8..24, cropped to 2:3 (full height of the 288x160 source)
    assert np.abs(video.astype(int) - video.mean()).mean() > 5
    assert pose.reshape(17, -1).max(1).min() > 100  # a skeleton in every pose frame
    # the drawn skeleton lies on the keypoints: pose pixels light up at the neck-to-hip limb midpoints
    for f in range(17):
        for a, b in ((1, 8), (1, 11)):
            if kps[f, a, 2] >= 0.3 and kps[f, b, 2] >= 0.3:
                x, y = ((kps[f, a, :2] + kps[f, b, :2]) / 2).round().astype(int)
                assert pose[f, y, x].max() > 60, (f, a, b)
    # keypoints are in clip pixels: the neck is inside the 96x64 frame
    neck = kps[kps[:, 1, 2] > 0, 1, :2]
    assert len(neck) >= 14 and (neck[:, 0] < 64).all() and (neck[:, 1] < 96).all()


def check_faces_file(path, row):
    """The documented faces.npz arrays, consistent with each other and with the manifest row."""
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == FACE_ARRAYS
        faces = {k: z[k] for k in z.files}
    k = row["num_face_regions"]
    assert faces["regions"].shape == (k, 256, 256, 3) and faces["regions"].dtype == np.uint8
    assert faces["frames"].shape == (k,) and faces["frames"].dtype == np.int64
    assert faces["boxes"].shape == (k, 4) and faces["boxes"].dtype == np.float32
    assert faces["sizes"].shape == (k,) and faces["sizes"].dtype == np.float32
    assert str(faces["checksum"]) == row["checksum"]
    assert set(faces["frames"].tolist()) <= {0, 4, 8, 12, 16}  # 5 samples spread over 17 frames
    box = faces["boxes"]
    np.testing.assert_allclose(faces["sizes"], np.minimum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]), rtol=1e-5)
    return faces


def test_every_ok_clip_has_face_regions(first_run):
    out, _, rows = first_run
    for r in rows.values():
        if r["status"] == "ok":
            assert r["faces_path"] == f"clips/{r['clip_id']}/faces.npz"
            check_faces_file(out / r["faces_path"], r)
    assert rows["short"]["faces_path"] is None and rows["short"]["num_face_regions"] is None


@pytest.fixture(scope="module")
def sample_run(cfg, sample_dir, tmp_path_factory):
    """prepare-pose on the sample dance videos (480x320 sources) at a 96x64 clip size."""
    out = tmp_path_factory.mktemp("sample_clips")
    prepare.run(dataclasses.replace(cfg, max_clips_per_video=1), sample_dir / "videos", None, out)
    return out, [r for r in read_parquet(out / "manifest.parquet") if r["status"] == "ok"]


def test_face_regions_come_from_the_source_resolution(sample_run, sample_dir):
    from faceid.faces.detect import build_detector
    from faceid.pose.video import probe

    out, rows = sample_run
    assert [r["clip_id"] for r in rows] == [f"dance_{i:02d}-00000" for i in range(len(list((sample_dir / "videos").glob("*.mp4"))))]
    detector = build_detector("mediapipe", 0.5)
    try:
        for r in rows:
            faces = check_faces_file(out / r["faces_path"], r)
            assert r["num_face_regions"] >= 4, r  # a real face in (nearly) every sampled frame
            info = probe(sample_dir / "videos" / r["source"])
            box = faces["boxes"]
            # boxes are in source pixels (480x320), far larger than the 96x64 clip could hold
            assert (box[:, 0] > -10).all() and (box[:, 2] < info["width"] + 10).all() and (box[:, 3] < info["height"] + 10).all()
            assert (faces["sizes"] > 30).all()
            # each region is centred on the face, which spans about half its side
            for region in faces["regions"]:
                found = detector.detect(region)
                assert found, r["clip_id"]
                x0, y0, x1, y1 = max(found, key=lambda f: f.size).box
                assert abs((x0 + x1) / 2 - 128) < 30 and abs((y0 + y1) / 2 - 128) < 40
                assert 70 < max(x1 - x0, y1 - y0) < 180
    finally:
        detector.close()


def test_face_samples_zero_writes_empty_arrays(cfg, videos, first_run, tmp_path):
    _, _, rows5 = first_run
    off = dataclasses.replace(cfg, face_samples=0, max_clips_per_video=1)
    prepare.run(off, videos, None, tmp_path / "out")
    row = next(r for r in read_parquet(tmp_path / "out" / "manifest.parquet") if r["clip_id"] == "dancer-00000")
    assert row["status"] == "ok" and row["num_face_regions"] == 0
    faces = check_faces_file(tmp_path / "out" / row["faces_path"], row)
    assert faces["regions"].shape == (0, 256, 256, 3) and faces["boxes"].shape == (0, 4)
    assert row["checksum"] != rows5["dancer-00000"]["checksum"]  # face_samples is part of the checksum


def test_face_region_geometry():
    frame = np.full((100, 200, 3), 200, np.uint8)
    region = prepare.face_region(frame, (0.0, 10.0, 40.0, 50.0))  # 40 px face at the left edge: 80 px square
    assert region.shape == (256, 256, 3) and region.dtype == np.uint8
    # the square spans x -20..60, y -10..70 of the frame (x 3.2 to 256 px): black left of x=0 and above y=0
    assert region[:, :56].max() == 0 and region[:26].max() == 0
    assert region[40:, 72:].min() == 200
    np.testing.assert_array_equal(prepare.face_sample_frames(17, 5), [0, 4, 8, 12, 16])
    np.testing.assert_array_equal(prepare.face_sample_frames(5, 9), [0, 1, 2, 3, 4])
    assert prepare.face_sample_frames(17, 0).shape == (0,)


def test_rerun_does_no_work_and_resumes_after_a_crash(cfg, videos, first_run):
    out, _, rows = first_run
    clip = out / "clips" / "dancer-00000"
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "clips").rglob("*") if p.is_file()}
    summary = prepare.run(cfg, videos, None, out)
    assert summary["clips_written"] == 0 and summary["clips_skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert written_by(out) == {"stage": "prepare_pose"}  # its own earlier output (faceid.outputs): a rerun may write
    assert sum(p.name == "faces.npz" for p in mtimes) == 4
    # a crash mid-clip leaves a temporary folder and no finished clip; the rerun redoes only that clip
    import shutil

    before = {p.name: p.read_bytes() for p in clip.iterdir()}
    shutil.rmtree(clip)
    (out / "clips" / ".dancer-00000.abc.tmp").mkdir()
    summary = prepare.run(cfg, videos, None, out)
    assert summary["clips_written"] == 1 and summary["clips_skipped"] == 3
    # the clip made again is the same bytes, videos included (issue 21 item 6: deterministic x264)
    assert {p.name: p.read_bytes() for p in clip.iterdir()} == before and "video.mp4" in before
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(k for k, r in rows.items() if r["video_path"])
    new_rows = {r["clip_id"]: r for r in read_parquet(out / "manifest.parquet")}
    assert new_rows["dancer-00000"]["checksum"] == rows["dancer-00000"]["checksum"]
    # a clip folder without faces.npz (an older prepare-pose) is not done: only it is redone
    (out / "clips" / "dancer-00008" / "faces.npz").unlink()
    summary = prepare.run(cfg, videos, None, out)
    assert summary["clips_written"] == 1 and summary["clips_skipped"] == 3
    assert (out / "clips" / "dancer-00008" / "faces.npz").is_file()


def test_pipelined_clips_are_the_bytes_of_clips_made_one_at_a_time(cfg, videos, first_run, tmp_path):
    """run() overlaps clips in threads (the next planned and decoded, the previous one's two videos
    encoded at once, while the pose model runs); ClipMaker.make_one makes each alone, step after step."""
    out, _, rows = first_run
    maker = prepare.ClipMaker(cfg, tmp_path / "one-by-one")
    try:
        jobs = [prepare.ClipJob.of(plan, start, cfg.num_frames)
                for plan in prepare.plan_videos(cfg, [(videos / "dancer.mp4", None), (videos / "blank.mp4", None)], {})
                for start in plan.starts]
        assert sorted(j.clip_id for j in jobs) == sorted(k for k, r in rows.items() if r["video_path"])
        for job in jobs:
            outcome = maker.make_one(job)
            assert "error" not in outcome and outcome["num_face_regions"] == rows[job.clip_id]["num_face_regions"]
            one = {p.name: p.read_bytes() for p in (tmp_path / "one-by-one" / job.clip_id).iterdir()}
            assert sorted(one) == sorted(prepare.CLIP_FILES)
            assert one == {p.name: p.read_bytes() for p in (out / "clips" / job.clip_id).iterdir()}, job.clip_id
    finally:
        maker.close()


def test_worker_processes_write_the_same_clips_and_manifest(cfg, videos, first_run, tmp_path):
    """workers 0 on 2 cores: one worker process per core (faceid.pose.worker), the same bytes as in this process."""
    from faceid.errors import FaceidError
    from faceid.pose.clips import where_to_make

    out, summary, _ = first_run
    auto = dataclasses.replace(cfg, workers=0)
    assert where_to_make(auto, num_cpus=2, videos=len(os.listdir(videos))) == "processes"
    assert where_to_make(auto, num_cpus=2, count=1) == "here" and where_to_make(auto, num_cpus=1, count=4) == "here"
    again = prepare.run(auto, videos, None, tmp_path / "out", num_cpus=2)
    assert again["clips_written"] == summary["clips_written"] + summary["clips_skipped"] == 4
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert all((out / f).read_bytes() == (tmp_path / "out" / f).read_bytes() for f in files), "differs from in-process"
    # a worker that cannot build its models: the configuration error, no traceback from the workers
    with pytest.raises(FaceidError, match="prepare_pose.onnx_path"):
        prepare.run(dataclasses.replace(auto, estimator="onnx", onnx_path=""), videos, None, tmp_path / "bad", num_cpus=2)


def test_pose_videos_paired_by_name(cfg, frames, tmp_path):
    videos, poses = tmp_path / "videos", tmp_path / "poses"
    videos.mkdir()
    poses.mkdir()
    for name in ("same", "trimmed", "mismatch", "widescreen", "lonely"):
        write_video(videos / f"{name}.mp4", frames[:34], 16)
    # the "pose video" is the dance video itself at twice the size: the same crop must come out
    big = np.repeat(np.repeat(frames[:34], 2, axis=1), 2, axis=2)
    write_video(poses / "same_pose.mp4", big, 16)
    write_video(poses / "trimmed_pose.mp4", frames[:33], 16)  # one frame short: reconciled
    write_video(poses / "mismatch_pose.mp4", frames[:20], 16)  # far too short: rejected
    write_video(poses / "widescreen_pose.mp4", np.zeros((34, 160, 288, 3), np.uint8), 16)
    write_video(poses / "orphan_pose.mp4", frames[:20], 16)
    # what is not used is said (issue 21 item 3): folders, non-videos, a second pose video of one name
    (videos / "more").mkdir()
    (poses / "old").mkdir()
    (poses / "notes.txt").write_text("not a video")
    (poses / "same.mp4").write_bytes((poses / "same_pose.mp4").read_bytes())
    (tmp_path / "captions.csv").write_text("name,caption\nsame.mp4,caption from csv\n")
    cfg = dataclasses.replace(cfg, stride=0, max_clips_per_video=1)
    prepare.run(cfg, videos, poses, tmp_path / "out", captions=tmp_path / "captions.csv")
    rows = {r["clip_id"]: r for r in read_parquet(tmp_path / "out" / "manifest.parquet")}
    assert rows["same-00000"]["status"] == "ok" and rows["same-00000"]["caption"] == "caption from csv"
    assert "resized" in rows["same-00000"]["reason"]
    video, _ = read_video(tmp_path / "out" / rows["same-00000"]["video_path"])
    pose, _ = read_video(tmp_path / "out" / rows["same-00000"]["pose_path"])
    assert np.abs(video.astype(int) - pose.astype(int)).mean() < 6  # identical crop of both videos
    assert rows["trimmed-00000"]["status"] == "ok" and "trimmed to 33" in rows["trimmed-00000"]["reason"]
    assert rows["trimmed-00000"]["caption"] == "a person dancing"  # default prompt
    assert "length mismatch" in rows["mismatch"]["reason"]
    assert "size mismatch" in rows["widescreen"]["reason"]
    assert "no pose video" in rows["lonely"]["reason"]
    assert "without a dance video" in rows["orphan_pose"]["reason"]
    assert "mismatch-00000" not in rows
    assert rows["more"]["reason"] == f"a folder (videos are read from the top level of {videos} only)"
    assert rows["old"]["reason"] == f"a folder in the pose videos folder {poses}"
    assert rows["notes"]["reason"] == f"not a video (extension .txt) in the pose videos folder {poses}"
    assert rows["same"]["status"] == "rejected" and rows["same"]["reason"].startswith("same_pose.mp4 is the pose video of same")


def test_frame_count_and_size_rules(params):
    from faceid.config import to_dict

    data = to_dict(params)
    for key, value, match in (("num_frames", 20, "4n\\+1"), ("height", 100, "multiple of 16"), ("width", 0, "multiple of 16"),
                              ("face_samples", -1, "face_samples: expected >= 0")):
        bad = {**data, "prepare_pose": {**data["prepare_pose"], key: value}}
        with pytest.raises(ConfigError, match=match):
            params_from_dict(bad)
    assert prepare.clip_starts(40, 17, 8, 0) == [0, 8, 16]
    assert prepare.clip_starts(40, 17, 0, 0) == [0, 17]
    assert prepare.clip_starts(100, 17, 0, 2) == [0, 17]
    assert prepare.clip_starts(16, 17, 0, 0) == []


def test_person_aware_crop_and_keypoint_transform():
    kps = np.zeros((3, 18, 3), np.float32)
    kps[:, :, 2] = 1
    kps[:, :, 0] = np.linspace(300, 340, 18)  # person at the right of a 480x360 landscape frame
    kps[:, :, 1] = np.linspace(100, 300, 18)
    box = prepare.crop_box(360, 480, 96, 64, kps)
    x0, y0, w, h = box
    assert (w, h) == (240, 360) and y0 == 0 and x0 == 200  # centred on x=320
    assert prepare.crop_box(360, 480, 96, 64) == (120, 0, 240, 360)  # centre crop without a person
    out = prepare.transform_keypoints(kps, box, 96, 64)
    np.testing.assert_allclose(out[0, 0, :2], [(300 - 200) * 64 / 240, 100 * 96 / 360], rtol=1e-5)
    kps[0, 0, 0] = 10  # outside the crop -> missing
    assert prepare.transform_keypoints(kps, box, 96, 64)[0, 0, 2] == 0
    assert prepare.reconcile_lengths(40, 39, 16)[0] == 39
    with pytest.raises(prepare.Rejected, match="length mismatch"):
        prepare.reconcile_lengths(40, 20, 16)
    assert prepare.analysis_size(1080, 1920, 480, 832) == (720, 1280)
    h, w = prepare.analysis_size(2160, 3840, 832, 480)  # a portrait crop of a 4K frame needs 832 rows
    assert abs(h - 832) <= 2 and w == round(h * 16 / 9 / 2) * 2
    assert prepare.analysis_size(288, 160, 96, 64) is None


def test_missing_folders_are_reported(cfg, tmp_path):
    from faceid.errors import InputError

    with pytest.raises(InputError, match="folder not found"):
        prepare.run(cfg, tmp_path / "nope", None, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_rotated_phone_video_is_prepared_upright(cfg, frames, tmp_path):
    import av

    (tmp_path / "videos").mkdir()
    stored = np.ascontiguousarray(np.rot90(frames[:20], k=-1, axes=(1, 2)))  # sideways 160x288 + rotation flag
    with av.open(str(tmp_path / "videos" / "phone.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 288, 160, "yuv420p"
        stream.set_display_rotation(90)
        for f in stored:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    prepare.run(dataclasses.replace(cfg, stride=0), tmp_path / "videos", None, tmp_path / "out")
    (row,) = read_parquet(tmp_path / "out" / "manifest.parquet")
    assert row["status"] == "ok" and "rotated 90" in row["reason"]
    assert row["pose_detection_rate"] >= 0.8  # an upright person is found; a sideways one mostly is not
    kps = np.load(tmp_path / "out" / row["keypoints_path"])["keypoints"]
    ok = kps[:, 0, 2] > 0
    assert (kps[ok, 0, 1] < kps[ok, 1, 1]).all()  # nose above neck


def _snapshot(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_nothing_usable_fails_and_leaves_the_output_as_it_was(cfg, frames, tmp_path, capsys, repo):
    """No usable clip: exit code 2, one line per input on the terminal, the earlier output exactly as
    it was (its clips not deleted, its manifest not replaced), a new output folder not created. A
    video at another frame rate is resampled and says so (manifest note and terminal)."""
    from faceid.cli import main

    good, bad, out = tmp_path / "good", tmp_path / "bad", tmp_path / "out"
    good.mkdir()
    bad.mkdir()
    write_video(good / "dancer.mp4", frames[:30], 24)  # 1.25 s at 24 fps: 20 frames at 16 fps, one clip
    summary = prepare.run(dataclasses.replace(cfg, stride=0, max_clips_per_video=1), good, None, out)
    (row,) = read_parquet(out / "manifest.parquet")
    assert summary["clips_ok"] == 1 and row["status"] == "ok"
    assert row["reason"] == "frame rate 24 fps resampled to 16 fps"
    assert "  note dancer.mp4: frame rate 24 fps resampled to 16 fps" in capsys.readouterr().err
    before = _snapshot(out)

    write_video(bad / "short.mp4", frames[:10], 16)
    noise = np.random.default_rng(1).normal(90, 8, (20, 96, 64, 3))  # nobody there: a clip, rejected
    write_video(bad / "blank.mp4", noise.clip(0, 255).astype(np.uint8), 16)
    (bad / "broken.mp4").write_bytes(b"not a video at all" * 20)
    base = ["--params", str(repo / "params.yaml"), "prepare-pose", "--videos", str(bad)]
    for target in (out, tmp_path / "new"):
        assert main(base + ["--output", str(target)]) == 2
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("  rejected ")]
        assert len(lines) == 3, err
        assert "  rejected broken.mp4: not a readable video" in err
        assert "  rejected short.mp4: too short: 10 frames" in err
        assert "  rejected blank-00000: person detected in 0% of frames" in err
        assert f"error: prepare-pose: no usable clip from 3 input(s) in {bad}" in err and "left as it was" in err
        assert not prepare.staging_dir(target).exists()
    assert _snapshot(out) == before
    assert not (tmp_path / "new").exists()
