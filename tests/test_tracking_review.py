"""Issue 24: MLflow runs a person can tell apart and trace. The doors say where they run (the
command, ``$DVC_STAGE`` under ``dvc repro``, the KFP run and task); the library turns that into the
run's name and tags. (The store read back: tests/test_train.py's Ray test for train-lora, kept-step
metrics on the model; tests/test_validate.py for render-validation, nothing not measurable logged.)"""

from __future__ import annotations

import pytest


def test_the_cli_door_passes_its_command_and_dvc_stage(monkeypatch):
    from faceid import cli, tracking

    monkeypatch.setenv("DVC_STAGE", "train_lora")  # what `dvc repro` sets for the stage's command
    origin = cli._origin("train-lora")
    tags = tracking.run_tags({"stage": "train_lora"}, origin)
    assert tags["dvc.stage"] == "train_lora" and tags["mlflow.source.name"] == "faceid train-lora"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"] and tags["stage"] == "train_lora"
    assert tracking.run_name("train-lora", "obama", "3f2a9c1", origin) == "train-lora obama 3f2a9c1"
    monkeypatch.delenv("DVC_STAGE")
    assert "dvc.stage" not in tracking.run_tags({}, cli._origin("train-lora"))  # not under DVC: no empty tag


def test_inside_kfp_the_run_is_named_after_the_kfp_run():
    from faceid import tracking

    origin = {"source": "kfp train_lora", "kfp_run": "faceid-train-20261206-150000", "kfp_task": "train-lora"}
    tags = tracking.run_tags({}, origin)
    assert (tags["kfp.run"], tags["kfp.task"], tags["mlflow.source.type"]) == (origin["kfp_run"], "train-lora", "JOB")
    assert tracking.run_name("train-lora", "obama", "3f2a9c1", origin) == "train-lora obama faceid-train-20261206-150000"
    with pytest.raises(ValueError, match="unknown keys \\['kfp'\\]"):
        tracking.run_tags({}, {"kfp": "x"})


def test_the_short_hash_tells_inputs_apart_and_is_stable():
    from faceid.tracking import short_hash

    a = short_hash({"lr": 1e-4, "steps": 40}, ["c0", "c1"])
    assert a == short_hash({"steps": 40, "lr": 1e-4}, ["c0", "c1"]) and len(a) == 7
    assert a != short_hash({"lr": 1e-4, "steps": 41}, ["c0", "c1"]) != short_hash({"lr": 1e-4, "steps": 40}, ["c0"])
