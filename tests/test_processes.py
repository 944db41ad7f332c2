"""Processes and folders: one writer per output (faceid.io.output_lock, tested with real second
processes) and no orphans (faceid.ray_session's watchdog stops a dead driver's processes). The
stage-specific checks live with each stage's tests (they import :func:`held_lock` from here);
the Ray kill test of train-lora is in tests/test_train.py."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from faceid.cli import main
from faceid.io import LockedError, lock_path, output_lock
from faceid.outputs import MARKER, mark

REPO = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from faceid.io import output_lock
with output_lock(sys.argv[1], sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes the pipe (or kills this process)
"""


@contextlib.contextmanager
def held_lock(stage: str, output: Path):
    """Another real process holding the lock of ``output``, as a run of ``stage`` does, for the block."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, stage, str(output)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.stdin.close()
        proc.wait(timeout=30)


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "clips"
    with held_lock("prepare-pose", out) as holder:
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=rf"another prepare-pose run \(pid {holder.pid}\) is writing {out}"):
            with output_lock("prepare-pose", out):
                pass
        assert time.monotonic() - t0 < 5  # at once, not after a timeout
    # the lock file sits beside the output (never inside the folder a stage writes), and taking
    # the lock creates no output
    assert lock_path(out) == tmp_path / ".clips.lock" and lock_path(out).is_file()
    assert not out.exists()
    with output_lock("prepare-pose", out):  # released: free again
        pass


def test_a_killed_writer_releases_its_lock(tmp_path):
    out = tmp_path / "out.mp4"
    with held_lock("infer", out) as holder:
        holder.kill()  # SIGKILL: no cleanup code runs; the kernel drops the lock with the process
        holder.wait(timeout=30)
        with output_lock("infer", out):
            pass


def test_second_cli_run_fails_at_once_or_waits_with_lock_wait(repo, tmp_path, capsys):

    archive = repo / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
    out = tmp_path / "sample"
    argv = ["--params", str(repo / "params.yaml"), "--set", f"sample_data.photo_archive={archive}",
            "--set", "sample_data.num_videos=1", "--set", "sample_data.video_seconds=0.5"]
    with held_lock("sample-data", out) as holder:
        assert main(argv + ["sample-data", "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"faceid sample-data: error: another sample-data run (pid {holder.pid}) is writing {out}" in err
        assert "--lock-wait" in err and not out.exists()
        holder.stdin.close()  # the other run finishes in a moment...
        # ...and a run that may wait does its work after it
        assert main(["--lock-wait", "60"] + argv + ["sample-data", "--output", str(out)]) == 0
    assert (out / "videos" / "dance_00.mp4").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sample.lock", "sample"]


def test_prepare_pose_subprocess_refuses_a_locked_folder_and_touches_nothing(repo, tmp_path):
    """Two real `faceid` processes: one holds the clips folder, the second stage run fails at once."""
    videos, out = tmp_path / "videos", tmp_path / "clips"
    videos.mkdir()
    (videos / "notes.txt").write_text("no videos here")
    out.mkdir()
    (out / "manifest.parquet").write_bytes(b"earlier manifest")
    mark(out, "prepare_pose")  # an earlier prepare-pose output (faceid.outputs), so only the lock stops this run
    with held_lock("prepare-pose", out) as holder:
        proc = subprocess.run([sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml"), "prepare-pose",
                               "--videos", str(videos), "--output", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"another prepare-pose run (pid {holder.pid}) is writing {out}" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "manifest.parquet"]
    assert (out / "manifest.parquet").read_bytes() == b"earlier manifest"


def test_lock_wait_must_be_a_number(tmp_path):
    from faceid.errors import InputError

    with pytest.raises(InputError, match="lock wait"):
        with output_lock("infer", tmp_path / "x.mp4", wait=float("nan")):
            pass


# --------------------------------------------------------------------------- no orphans (without Ray)

FAKE_DRIVER = """
import os, subprocess, sys, time
from faceid import ray_session
from faceid.io import environ_set

token = "test-" + str(os.getpid())
watchdog = ray_session.start_watchdog(token)
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
with environ_set(ray_session.TOKEN_ENV, token):
    raylet = subprocess.Popen(sleep)  # like the raylet: a child with the token
    # like a worker that lost its parent: not a descendant any more, but it has the token
    subprocess.run(["sh", "-c", " ".join(sleep[:2]) + " 'import time; time.sleep(600)' & echo $! > " + sys.argv[1] + "/worker"])
# like Ray's agents: no token, reparented away, but their raylet is ours
agent_env = {k: v for k, v in os.environ.items() if k != ray_session.TOKEN_ENV}
agent_env["RAY_RAYLET_PID"] = str(raylet.pid)
subprocess.run(["sh", "-c", " ".join(sleep[:2]) + " 'import time; time.sleep(600)' & echo $! > " + sys.argv[1] + "/agent"],
               env=agent_env)
print(raylet.pid, flush=True)
time.sleep(1.0)  # the watchdog notes the descendants
print("ready", flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_watchdog_stops_a_dead_drivers_processes_and_nothing_else(tmp_path):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # not of the session
    driver = subprocess.Popen([sys.executable, "-c", FAKE_DRIVER, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        raylet = int(driver.stdout.readline())
        assert driver.stdout.readline().strip() == "ready"
        session = [raylet, int((tmp_path / "worker").read_text()), int((tmp_path / "agent").read_text())]
        assert all(_alive(pid) for pid in session)
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in session if _alive(pid)], "processes of the dead driver's session still alive"
        assert _alive(bystander.pid)
        assert f"stopped 3 process(es) of the local Ray session of pid {driver.pid}" in driver.stderr.read()
    finally:
        bystander.kill()
        for name in ("worker", "agent"):
            with contextlib.suppress(Exception):
                os.kill(int((tmp_path / name).read_text()), signal.SIGKILL)


GOOD_DRIVER = """
import os, subprocess, sys
from faceid import ray_session
from faceid.io import environ_set

token = "test-" + str(os.getpid())
watchdog = ray_session.start_watchdog(token)
sleep = [sys.executable, "-c", "import time; time.sleep(600)"]
quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
mine = subprocess.Popen(sleep, **quiet)  # the driver's own child, not of the Ray session
with environ_set(ray_session.TOKEN_ENV, token):
    straggler = subprocess.Popen(sleep, **quiet)  # a session process that outlived ray.shutdown()
print(mine.pid, straggler.pid, flush=True)
import time; time.sleep(1.0)
ray_session.stop_watchdog(watchdog)  # the normal exit: goodbye, then the pipe closes
print(watchdog.returncode, flush=True)
"""


def test_after_a_normal_exit_the_watchdog_stops_only_the_sessions_processes(tmp_path):
    driver = subprocess.run([sys.executable, "-c", GOOD_DRIVER], capture_output=True, text=True, cwd=REPO, timeout=60)
    mine, straggler = (int(x) for x in driver.stdout.split()[:2])
    try:
        assert driver.stdout.split()[2] == "0"  # the watchdog exited
        assert not _alive(straggler)
        assert _alive(mine)  # not marked as the session's: left alone
        assert "stopped" not in driver.stderr  # quiet on a normal exit
    finally:
        for pid in (mine, straggler):
            with contextlib.suppress(Exception):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("stage", ["crop-faces", "embed-faces"])
def test_face_stages_refuse_a_locked_output(stage, params, sample_dir, tmp_path):
    """crop-faces and embed-faces take the same lock as every stage: a second writer fails at once
    and the output folder is not created."""
    from faceid.faces import crop, embed

    out = tmp_path / "out"
    with held_lock(stage, out) as holder:
        with pytest.raises(LockedError, match=rf"another {stage} run \(pid {holder.pid}\) is writing {out}"):
            if stage == "crop-faces":
                crop.run(params.crop_faces, sample_dir / "identities" / "obama", out)
            else:
                embed.run(params.embed_faces, sample_dir / "identities" / "obama", out)  # the lock comes first
    assert not out.exists()
