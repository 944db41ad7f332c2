"""prepare-pose at dataset scale on Ray Data, on a generated folder of short real-person videos
(``faceid sample-data`` with more videos): a 2-worker run killed midway (SIGKILL of the driver)
leaves no Ray process behind and resumes to the manifest one process makes, with every clip
exactly once; a rerun redoes nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
from process_tree import alive, descendants

from faceid.io import read_parquet
from faceid.pose import prepare

NUM_VIDEOS = 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, params):
    from faceid import sample_data

    cfg = dataclasses.replace(params.sample_data, num_videos=NUM_VIDEOS, video_seconds=1.1, video_height=240,
                              video_width=160)  # 17 frames: one clip a video
    out = tmp_path_factory.mktemp("many") / "sample"
    sample_data.run(cfg, out)
    return out / "videos"


def _finished(staging):
    return [p for p in staging.iterdir() if not p.name.startswith(".")] if staging.is_dir() else []


def test_two_workers_killed_midway_resume_to_the_single_process_manifest(params, dataset, repo, tmp_path):
    cfg = dataclasses.replace(params.prepare_pose, max_clips_per_video=1, workers=2)
    single = prepare.run(dataclasses.replace(cfg, workers=1), dataset, None, tmp_path / "single")
    reference = read_parquet(tmp_path / "single" / "manifest.parquet")
    assert single["clips_written"] == NUM_VIDEOS
    assert [r["clip_id"] for r in reference] == [f"dance_{i:02d}-00000" for i in range(NUM_VIDEOS)]
    assert all(r["status"] == "ok" for r in reference), [r["reason"] for r in reference if r["status"] != "ok"]

    # 1. 2 workers on local Ray, the driver killed (SIGKILL) once a few clips are finished
    out = tmp_path / "clips"
    staging = prepare.staging_dir(out)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe: a full pipe would stall the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml"),
             "--set", "prepare_pose.max_clips_per_video=1", "prepare-pose", "--videos", str(dataset),
             "--output", str(out), "--workers", "2"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and proc.poll() is None and len(_finished(staging)) < 2:
                time.sleep(0.05)
            assert proc.poll() is None, f"the run ended before the kill:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
            session = descendants(proc.pid)  # its local Ray: raylet, workers, agents
            proc.kill()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
    # no worker of the killed run may still write clips when we count them and rerun (faceid.ray_session's watchdog)
    deadline = time.monotonic() + 30
    while alive(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(session), f"processes of the killed run still alive after 30 s: {alive(session)}"
    done_at_kill = len(_finished(staging))
    assert f"{NUM_VIDEOS} clips on 2 Ray worker(s) (local Ray)" in (tmp_path / "killed.log").read_text()
    assert 2 <= done_at_kill < NUM_VIDEOS and not (out / "manifest.parquet").exists()

    # 2. The rerun (2 workers) makes only what is missing; the manifest is the single process's
    resumed = prepare.run(cfg, dataset, None, out)
    assert resumed["clips_skipped"] >= done_at_kill
    assert resumed["clips_written"] == NUM_VIDEOS - resumed["clips_skipped"]
    assert read_parquet(out / "manifest.parquet") == reference
    assert sorted(p.name for p in (out / "clips").iterdir()) == [r["clip_id"] for r in reference]
    assert not staging.exists()

    # 3. A rerun redoes nothing
    again = prepare.run(cfg, dataset, None, out)
    assert (again["clips_written"], again["clips_skipped"]) == (0, NUM_VIDEOS)
    assert read_parquet(out / "manifest.parquet") == reference


def test_a_worker_that_cannot_see_the_folders_says_so(params, tmp_path):
    from faceid.errors import FaceidError

    job = prepare.ClipJob(clip_id="x-00000", video=str(tmp_path / "elsewhere.mp4"), pose=None, video_indices=list(range(17)),
                          pose_indices=None, size=None, checksum="0")
    maker = prepare.ClipMaker(params.prepare_pose, tmp_path)
    try:
        with pytest.raises(FaceidError, match=rf"cannot see {tmp_path / 'elsewhere.mp4'}; on a cluster"):
            maker({"job": [json.dumps(dataclasses.asdict(job))]})
    finally:
        maker.close()
