"""The CLI lists every stage and reports bad input as one clear line, exit code 2."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from faceid.cli import main

STAGES = ["sample-data", "crop-faces", "embed-faces", "similarity", "prepare-pose", "train-lora", "train-shared",
          "render-validation", "infer", "batch-infer", "pipeline"]


def _listed_commands(help_text: str) -> list[str]:
    """The whole command names of ``faceid --help`` (the STAGE group: one indented name per line)."""
    lines = help_text.split("STAGE\n", 1)[1].split("\n\n", 1)[0].splitlines()
    return [line.split()[0] for line in lines if line.startswith("    ") and not line.startswith("      ")]


def test_help_lists_every_stage_by_its_whole_name():
    out = subprocess.run([sys.executable, "-m", "faceid.cli", "--help"], capture_output=True, text=True, check=True).stdout
    listed = _listed_commands(out)
    assert sorted(listed) == sorted(STAGES + ["train", "make-test-weights"]), listed


def test_a_stage_has_one_name_at_every_layer(repo):
    """CLI ``crop-faces`` = ``faceid.stages.crop_faces`` = DVC stage ``crop_faces`` (whose cmd is
    ``faceid crop-faces``) = KFP component ``crop_faces``. A second instance of a stage in dvc.yaml (the
    shared-adapter branch: ``crop_faces_people``, ``render_validation_shared``) is the stage's name and
    ``_<what>``, its cmd the same ``faceid`` command."""
    import inspect

    import yaml

    from faceid import stages

    functions = {name for name, fn in inspect.getmembers(stages, inspect.isfunction) if fn.__module__ == stages.__name__}
    assert functions == {s.replace("-", "_") for s in STAGES + ["make-test-weights"] if s != "pipeline"}
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    instances = {"people", "shared"}  # dvc.yaml's second instances of a stage (on the sample people)
    for name, stage in dvc.items():
        base, _, instance = name.rpartition("_")
        stage_name = name if name in functions else base if instance in instances else name
        assert stage_name in functions and stage["cmd"].split()[:2] == ["faceid", stage_name.replace("_", "-")], name
    components = {p.stem for p in (repo / "components").glob("*.py") if p.stem != "__init__"}
    assert components <= functions, components - functions


def test_bad_params_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  profile: tiny\n")
    rc = main(["--params", str(bad), "crop-faces", "--input", "x", "--output", "y"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "faceid crop-faces: error:" in err and "missing key(s)" in err


def test_bad_override_is_a_clear_error(repo, capsys):
    rc = main(["--params", str(repo / "params.yaml"), "--set", "train_lora.stage1.steps=many", "sample-data", "--output", "x"])
    assert rc == 2
    assert "train_lora.stage1.steps: expected an integer, got 'many'" in capsys.readouterr().err


def test_missing_archive_names_the_file_and_the_fix(repo, tmp_path, capsys):
    rc = main(["--params", str(repo / "params.yaml"), "--set", f"sample_data.photo_archive={tmp_path}/none.tar.gz",
               "sample-data", "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "none.tar.gz: photo archive not found" in err and "pip download" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_a_set_value_with_a_yaml_tag_is_one_line_naming_the_key(repo, tmp_path, capsys):
    for value in ("!!python/object:os.system x", "!!binary aGVsbG8=", "[unclosed"):
        rc = main(["--params", str(repo / "params.yaml"), "--set", f"train_lora.seed={value}", "sample-data",
                   "--output", str(tmp_path / "out")])
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("faceid sample-data: error: ") and "train_lora.seed: expected a" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sig, workers, code, said", [
    (signal.SIGINT, 1, 130, "interrupted"),  # Ctrl-C, clips made in this process
    (signal.SIGTERM, 2, 143, "stopped by SIGTERM"),  # on a local Ray: its handler dumped a native stack (exit 134)
])
def test_a_signal_stops_a_stage_cleanly_and_says_how_to_resume(repo, sample_dir, tmp_path, sig, workers, code, said):
    """Ctrl-C and SIGTERM during prepare-pose (a stage with a local Ray when workers > 1): exit 130 /
    143, one line saying how to resume, no traceback or native stack dump; the output folder is not
    created (clips made so far wait in the staging folder for the rerun); no Ray process survives."""
    from process_tree import alive, descendants

    out = tmp_path / "clips"
    cmd = [sys.executable, "-m", "faceid.cli", "--params", str(repo / "params.yaml"),
           "--set", "prepare_pose.stride=2", "--set", "prepare_pose.max_clips_per_video=0", "--set", "ray.num_cpus=2",
           "prepare-pose", "--videos", str(sample_dir / "videos"), "--output", str(out), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        working = False
        while not working:  # clips are being made: one in the staging folder / the Ray actors making them
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
            session = descendants(proc.pid)
            working = any((workers == 1 and any(staging.iterdir())) for staging in tmp_path.glob(".clips.staging"))
            working = working or (workers > 1 and any("ClipMaker" in line for line in _cmdlines(session)))
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == code, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (f"faceid prepare-pose: {said}; rerun the same command to resume "
                                              "(finished work is kept)"), stderr[-3000:]
    for dump in ("Traceback", "SIGTERM received", "PC: @", "Aborted", "core dumped"):
        assert dump not in stderr + stdout, stderr[-3000:]
    assert not out.exists()  # nothing half-written: the output folder appears only when the run is done
    deadline = time.monotonic() + 30
    while alive(session) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(session)


def _cmdlines(procs) -> list[str]:
    """The command lines of those of ``procs`` still running."""
    import psutil

    lines = []
    for proc, _ in procs:
        try:
            lines.append(" ".join(proc.cmdline()))
        except psutil.Error:
            pass
    return lines
