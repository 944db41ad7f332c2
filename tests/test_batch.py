"""faceid batch-infer on local Ray Data (one Ray session for the module): outputs and manifest, a
corrupted pose video fails alone, a second run skips done work, interpolation endpoints equal the
pure identities, prepare-pose folders as input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faceid.errors import InputError
from test_infer import copy_with_card, make_identity, small, write_pose_video
from test_processes import held_lock

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, params, ray_session):
    root = tmp_path_factory.mktemp("batch")
    p = small(params, batch_infer__interpolation_steps=3)
    a = make_identity(root / "a", p, "a", seed=1)
    b = make_identity(root / "b", p, "b", seed=2)
    poses = root / "poses"
    poses.mkdir()
    write_pose_video(poses / "one.mp4", 9)
    write_pose_video(poses / "two.mp4", 10)  # trimmed to 9
    (poses / "broken.mp4").write_bytes((poses / "one.mp4").read_bytes()[:700])  # truncated file
    return {"root": root, "params": p, "a": a, "b": b, "poses": poses}


@pytest.fixture(scope="module")
def first_run(world):
    from faceid import batch

    out = world["root"] / "out"
    summary = batch.run(world["params"], str(world["a"]), world["poses"], out)
    return out, summary


def manifest(out: Path) -> dict[str, dict]:
    from faceid.io import read_parquet

    return {r["key"]: r for r in read_parquet(out / "manifest.parquet")}


def test_outputs_manifest_and_a_corrupted_video_fails_alone(first_run):
    from faceid.pose.video import probe

    out, summary = first_run
    assert (summary["ok"], summary["failed"], summary["skipped"]) == (2, 1, 0)
    rows = manifest(out)
    assert rows["broken"]["status"] == "failed" and "broken.mp4: not a readable video" in rows["broken"]["error"]
    assert not (out / "broken.mp4").exists()
    for key in ("one", "two"):
        r = rows[key]
        assert r["status"] == "ok" and r["error"] is None
        info = probe(out / f"{key}.mp4")
        assert (info["frames"], info["height"], info["width"], info["fps"]) == (9, 32, 32, 16.0)
        assert (r["num_frames"], r["seed"], r["num_inference_steps"], r["identity"]) == (9, 0, 2, "a")
        assert r["generate_s"] > 0 and r["total_s"] >= r["generate_s"]
        assert r["prompt"] == "a person dancing"
        assert "face_detection_rate" in r and "facesim" in r
    assert rows["two"]["trimmed_frames"] == 1 and rows["two"]["source_frames"] == 10  # recorded; printed too (below)


def test_report_lines_name_each_failure_and_each_trim():
    from faceid.batch import report_lines

    rows = [{"key": "one", "status": "ok", "trimmed_frames": 0, "source_frames": 9, "num_frames": 9},
            {"key": "two", "status": "ok", "trimmed_frames": 1, "source_frames": 10, "num_frames": 9},
            {"key": "old", "status": "skipped"},
            {"key": "broken", "status": "failed", "error": "broken.mp4: not a readable video"}]
    assert report_lines(rows) == [
        "  trimmed two: pose video 10 frames -> 9 (4n+1; batch_infer.frame_count_policy=fix drops the last 1)",
        "  failed broken: broken.mp4: not a readable video",
    ]


def test_second_run_skips_done_work(world, first_run):
    from faceid import batch

    out, _ = first_run
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    summary = batch.run(world["params"], str(world["a"]), world["poses"], out)
    assert (summary["ok"], summary["skipped"], summary["failed"]) == (0, 2, 1)  # the broken one is retried
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == mtimes
    rows = manifest(out)
    assert rows["one"]["status"] == "skipped" and rows["one"]["seed"] == 0  # earlier settings kept
    assert rows["broken"]["status"] == "failed"


def test_a_rerun_skips_only_finished_outputs_of_this_run(world, first_run, tmp_path, capsys):
    """Issue 21 item 3: "already done" = the file's sha256 and what it was made with match its manifest
    row; a changed file, a file the manifest does not list and other settings are redone, each said;
    files of the pose-videos folder that are not videos are listed with their reason."""
    from faceid import batch
    from faceid.io import sha256_file
    from faceid.render import settings_from

    out_a, _ = first_run
    poses, out = tmp_path / "poses", tmp_path / "out"
    poses.mkdir()
    for name in ("one", "three"):
        shutil.copy(world["poses"] / "one.mp4", poses / f"{name}.mp4")
    (poses / "notes.txt").write_text("not a video")
    (poses / "more").mkdir()
    shutil.copytree(out_a, out)
    rows = manifest(out)
    assert rows["one"]["output_sha256"] == sha256_file(out / "one.mp4") and len(rows["one"]["made_with"]) == 64
    (out / "one.mp4").write_bytes((out / "one.mp4").read_bytes() + b"x")  # changed after it was written
    (out / "three.mp4").write_bytes((out_a / "two.mp4").read_bytes())  # a file the manifest does not list
    summary = batch.run(world["params"], str(world["a"]), poses, out)
    printed = capsys.readouterr().out
    assert (summary["ok"], summary["skipped"]) == (2, 0)
    assert "redo one: one.mp4 changed since it was written" in printed
    assert "redo three: three.mp4 exists but is not a finished output" in printed
    assert f"ignored {poses / 'notes.txt'}: not a video" in printed and f"ignored {poses / 'more'}: a folder" in printed
    rows = manifest(out)
    assert rows["one"]["output_sha256"] == sha256_file(out / "one.mp4") == manifest(out_a)["one"]["output_sha256"]
    assert rows["three"]["frames_sha256"] == rows["one"]["frames_sha256"]  # the same pose video: the same render

    # the same files with other settings: redone; the same settings again: skipped
    half = settings_from(world["params"].batch_infer, face_scale=0.5)
    summary = batch.run(world["params"], str(world["a"]), poses, out, settings=half)
    assert summary["ok"] == 2 and "was made with other settings" in capsys.readouterr().out
    assert manifest(out)["one"]["face_scale"] == 0.5
    summary = batch.run(world["params"], str(world["a"]), poses, out, settings=half)
    assert (summary["ok"], summary["skipped"]) == (0, 2)


def test_interpolation_endpoints_equal_the_pure_identities(world, first_run, tmp_path):
    from faceid import batch

    out_a, _ = first_run
    poses = tmp_path / "poses"
    poses.mkdir()
    shutil.copy(world["poses"] / "one.mp4", poses / "one.mp4")
    out_b, out_i = tmp_path / "b", tmp_path / "interp"
    batch.run(world["params"], str(world["b"]), poses, out_b)
    summary = batch.run(world["params"], None, poses, out_i, interpolate=f"{world['a']},{world['b']}")
    assert summary["ok"] == 3
    # the raw frames (their hashes) and the files: equal frames give equal bytes in any process (item 6)
    sha = [manifest(out_i)[f"one__t{k:02d}"]["frames_sha256"] for k in range(3)]
    assert sha[0] == manifest(out_a)["one"]["frames_sha256"]
    assert manifest(out_i)["one__t00"]["output_sha256"] == manifest(out_a)["one"]["output_sha256"]
    assert sha[2] == manifest(out_b)["one"]["frames_sha256"]
    assert len(set(sha)) == 3
    assert [manifest(out_i)[f"one__t{k:02d}"]["interp_t"] for k in range(3)] == [0.0, 0.5, 1.0]


def test_face_scale_and_lora_scale_flags_reach_the_manifest(world, first_run, tmp_path, capsys, repo):
    from faceid.cli import main

    out_a, _ = first_run
    poses = tmp_path / "poses"
    poses.mkdir()
    shutil.copy(world["poses"] / "one.mp4", poses / "one.mp4")
    argv = ["--params", str(repo / "params.yaml"), "--set", "batch_infer.num_inference_steps=2", "batch-infer",
            "--identity", str(world["a"]), "--pose-videos", str(poses), "--mlflow-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(argv + ["--output", str(tmp_path / "half"), "--face-scale", "0.5", "--lora-scale", "0.25"]) == 0
    row = manifest(tmp_path / "half")["one"]
    assert (row["status"], row["face_scale"], row["lora_scale"], row["reference_image"]) == ("ok", 0.5, 0.25, False)
    assert row["frames_sha256"] != manifest(out_a)["one"]["frames_sha256"]  # face_scale 1 there
    assert manifest(out_a)["one"]["face_scale"] == 1.0 and manifest(out_a)["one"]["lora_scale"] == 1.0

    assert main(argv + ["--output", str(tmp_path / "bad"), "--face-scale", "nan"]) == 2
    assert "--face-scale: expected a finite number >= 0, got nan" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_pose_videos_from_a_prepare_pose_folder(tmp_path):
    from faceid.batch import list_pose_videos, plan_jobs
    from faceid.io import write_parquet

    (tmp_path / "clips" / "c0").mkdir(parents=True)
    rows = [{"clip_id": "c0", "pose_path": "clips/c0/pose.mp4", "caption": "a man dancing", "status": "ok"},
            {"clip_id": "c1", "pose_path": "clips/c1/pose.mp4", "caption": "", "status": "rejected"}]
    write_parquet(tmp_path / "manifest.parquet", rows)
    items = list_pose_videos(tmp_path)
    assert items == [{"name": "c0", "pose_video": str(tmp_path / "clips/c0/pose.mp4"), "caption": "a man dancing"}]
    jobs = plan_jobs(items, tmp_path / "out", {"interpolate": ["a", "b"]}, 2)
    assert [j["output"] for j in jobs] == [str(tmp_path / "out" / f"c0__t{k:02d}.mp4") for k in range(2)]
    with pytest.raises(InputError, match="no pose videos"):
        list_pose_videos(tmp_path / "clips")


def test_incompatible_identity_fails_before_any_work(world, tmp_path):
    from faceid import batch

    bad = copy_with_card(world["a"], tmp_path / "bad", base_model="wan2.1-vace-1.3b")
    with pytest.raises(InputError, match="trained on base model"):
        batch.run(world["params"], None, world["poses"], tmp_path / "out", blend=f"{world['a']}=0.5,{bad}=0.5")
    assert not (tmp_path / "out").exists()


def test_nothing_usable_fails_and_leaves_the_output_as_it_was(world, first_run, tmp_path, capsys):
    """Every video failed and none existed: the stage fails, an earlier manifest is not replaced and
    a new output folder is not created; each failure is one line on the terminal."""
    from faceid import batch
    from faceid.errors import FaceidError

    poses = tmp_path / "poses"
    poses.mkdir()
    shutil.copy(world["poses"] / "broken.mp4", poses / "broken.mp4")
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(first_run[0] / "manifest.parquet", out / "manifest.parquet")
    before = (out / "manifest.parquet").read_bytes()
    for target in (out, tmp_path / "new"):
        with pytest.raises(FaceidError, match=r"all 1 videos failed \(reasons above.*left as it was"):
            batch.run(world["params"], str(world["a"]), poses, target)
        assert "  failed broken: " in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["manifest.parquet"] and (out / "manifest.parquet").read_bytes() == before
    assert not (tmp_path / "new").exists()


@pytest.fixture
def no_ray_no_model(monkeypatch):
    """Starting Ray or building a model fails the test (inputs must be checked first)."""
    import faceid.batch
    import faceid.model.generate

    def started(*args, **kwargs):
        raise AssertionError("Ray or a model was started before the inputs were checked")

    monkeypatch.setattr(faceid.batch, "_run_ray", started)
    monkeypatch.setattr(faceid.model.generate, "build_pipeline", started)


def test_inputs_are_checked_before_ray_or_a_model_starts(world, tmp_path, no_ray_no_model):
    from faceid import batch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    p, a, poses = world["params"], str(world["a"]), world["poses"]
    for kwargs, message in [
        (dict(identity=str(tmp_path / "nobody"), pose_videos=poses), "nobody: identity folder not found"),
        (dict(identity="models:/faceid-nobody@candidate", pose_videos=poses, mlflow_uri=uri),
         "models:/faceid-nobody@candidate: cannot load from the MLflow registry"),
        (dict(identity=None, blend=f"{a}=0.5,{tmp_path / 'nobody'}=0.5", pose_videos=poses), "identity folder not found"),
        (dict(identity=a, pose_videos=tmp_path / "no_poses"), "no_poses: not found"),
    ]:
        with pytest.raises(InputError, match=message):
            batch.run(p, output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()
    # a pose video above 720p fails before Ray or a model starts, naming the file, its size and the limit
    from faceid.errors import FaceidError

    (tmp_path / "big").mkdir()
    big = write_pose_video(tmp_path / "big" / "big.mp4", 2, height=736, width=1296)
    with pytest.raises(FaceidError, match=f"all 1 videos failed .*first: {big} \\(pose video\\): 736x1296 \\(HxW\\) is "
                                          "larger than the model takes: at most 1280 px on the long side"):
        batch.run(p, a, tmp_path / "big", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_second_writer_fails_at_once(world, tmp_path, no_ray_no_model):
    from faceid import batch
    from faceid.io import LockedError

    out = tmp_path / "out"
    with held_lock("batch-infer", out) as holder:
        with pytest.raises(LockedError, match=rf"another batch-infer run \(pid {holder.pid}\) is writing {out}"):
            batch.run(world["params"], str(world["a"]), world["poses"], out)
    assert not out.exists()
