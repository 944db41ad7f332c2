"""The CLI lists every stage and reports bad input as one clear line, exit code 2."""

from __future__ import annotations

import subprocess
import sys

from faceid.cli import main

STAGES = ["sample-data", "crop-faces", "embed-faces", "similarity", "prepare-pose", "train-lora",
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
    ``faceid crop-faces``) = KFP component ``crop_faces``."""
    import inspect

    import yaml

    from faceid import stages

    functions = {name for name, fn in inspect.getmembers(stages, inspect.isfunction) if fn.__module__ == stages.__name__}
    assert functions == {s.replace("-", "_") for s in STAGES + ["make-test-weights"] if s != "pipeline"}
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        assert name in functions and stage["cmd"].split()[:2] == ["faceid", name.replace("_", "-")], name
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
