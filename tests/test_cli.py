"""The CLI lists every stage and reports bad input as one clear line, exit code 2."""

from __future__ import annotations

import subprocess
import sys

from faceid.cli import main

STAGES = ["sample-data", "crop-faces", "embed-faces", "similarity", "prepare-pose", "train-lora",
          "render-validation", "infer", "batch-infer", "pipeline"]


def test_help_lists_every_stage():
    out = subprocess.run([sys.executable, "-m", "faceid.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for stage in STAGES:
        assert stage in out


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
