"""Where a stage may write (faceid.outputs): never into, over or above its inputs, never over a folder or
file faceid did not write; outputs readable as the user's umask says; messages that name the problem.

Through the real command line (``faceid.cli.main``, exit code 2 for a user's error) on the real sample
data: the refused runs must leave every byte where it was, and must be refused before any work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from faceid import outputs
from faceid.cli import main
from faceid.errors import InputError
from faceid.io import atomic_dir, atomic_path, lock_path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
PARAMS = ["--params", str(REPO / "params.yaml")]
SAMPLE = [*PARAMS, "--set", f"sample_data.photo_archive={ARCHIVE}", "--set", "sample_data.num_videos=1",
          "--set", "sample_data.video_seconds=0.5"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def faceid(argv: list[str], capsys) -> tuple[int, str]:
    rc = main(argv)
    return rc, capsys.readouterr().err


@pytest.fixture
def photos(tmp_path, sample_dir) -> Path:
    """A user's own folder of photos (real photos of one person)."""
    folder = tmp_path / "photos"
    shutil.copytree(sample_dir / "identities" / "obama", folder)
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model or starting Ray fails the test: a refused output must be refused before any work."""
    import faceid.faces.crop
    import faceid.infer
    import faceid.ray_session
    import faceid.render

    def started(*args, **kwargs):
        raise AssertionError("work started although the output must be refused first")

    monkeypatch.setattr(faceid.faces.crop, "face_models", started)
    monkeypatch.setattr(faceid.ray_session, "session", started)
    for module in (faceid.render, faceid.infer):
        monkeypatch.setattr(module, "Generator", started)
        monkeypatch.setattr(module, "load_identities", started)


# --------------------------------------------------------------------------- output vs inputs


def test_crop_faces_into_its_own_input_is_refused_and_the_photos_are_intact(photos, no_work, capsys):
    before = snapshot(photos.parent)
    rc, err = faceid([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(photos)], capsys)
    assert rc == 2
    assert f"output {photos} is also an input of this run: crop-faces would replace or change its input" in err
    assert "Traceback" not in err
    assert snapshot(photos.parent) == before  # not a byte changed, no lock file left anywhere


def test_an_output_inside_or_above_an_input_is_refused(photos, no_work, capsys, monkeypatch):
    before = snapshot(photos.parent)
    inside, above = photos / "crops", photos.parent
    rc, err = faceid([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(inside)], capsys)
    assert rc == 2 and f"output {inside} lies inside the input {photos}" in err
    rc, err = faceid([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(above)], capsys)
    assert rc == 2 and f"output {above} holds the input {photos}" in err
    # compared after resolving: a relative path, '..' and a symbolic link to the input are the input
    (photos.parent / "link").symlink_to(photos)
    monkeypatch.chdir(photos)
    for given in (".", "../photos", str(photos.parent / "link"), "../link"):
        rc, err = faceid([*PARAMS, "crop-faces", "--input", str(photos), "--output", given], capsys)
        assert rc == 2 and f"output {given} is also an input of this run" in err, given
    (photos.parent / "link").unlink()
    assert snapshot(photos.parent) == before
    # the same rule for every stage, e.g. prepare-pose into its videos and train-lora into its crops
    rc, err = faceid([*PARAMS, "prepare-pose", "--videos", str(photos), "--output", str(photos / "clips")], capsys)
    assert rc == 2 and "prepare-pose would replace or change its input" in err
    rc, err = faceid([*PARAMS, "train-lora", "--identity", "x", "--crops", str(photos), "--embeddings", str(photos),
                      "--clips", str(photos), "--output", str(photos / "identity")], capsys)
    assert rc == 2 and "train-lora would replace or change its input" in err
    rc, err = faceid([*PARAMS, "render-validation", "--identity", str(photos), "--clips", str(photos), "--reference",
                      str(photos), "--output", str(photos.parent)], capsys)
    assert rc == 2 and f"output {photos.parent} holds the input {photos}" in err
    assert snapshot(photos.parent) == before


def test_sample_data_never_replaces_a_folder_faceid_did_not_write(tmp_path, photos, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes\n")
    (mine / "sub").mkdir()
    (mine / "sub" / "more.txt").write_text("more\n")
    before = snapshot(mine)
    rc, err = faceid([*SAMPLE, "sample-data", "--output", str(mine)], capsys)
    assert rc == 2
    assert f"output folder {mine} is not empty and was not written by faceid sample-data" in err
    assert f"nothing in {mine} was changed" in err
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine", "photos"]
    # nor one another stage wrote: a crop-faces output is not sample-data's to replace (and the reverse)
    crops = tmp_path / "crops"
    assert main([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(crops)]) == 0
    before = snapshot(crops)
    rc, err = faceid([*SAMPLE, "sample-data", "--output", str(crops)], capsys)
    assert rc == 2 and f"output folder {crops} holds the output of faceid crop-faces" in err
    rc, err = faceid([*PARAMS, "embed-faces", "--crops", str(photos), "--output", str(crops)], capsys)
    assert rc == 2 and f"output folder {crops} holds the output of faceid crop-faces" in err
    assert snapshot(crops) == before


def test_a_rerun_into_its_own_earlier_output_works_and_earlier_versions_outputs_are_recognised(tmp_path, photos, capsys):
    out, sample = tmp_path / "crops", tmp_path / "sample"
    for _ in range(2):
        assert main([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(out)]) == 0
        assert main([*SAMPLE, "sample-data", "--output", str(sample)]) == 0
    assert (out / outputs.MARKER).read_bytes() == b'{"stage": "crop_faces"}\n'  # the same bytes every run (DVC)
    assert outputs.written_by(sample) == {"stage": "sample_data"}
    assert (sample / "videos" / "dance_00.mp4").is_file()
    # an output of faceid before the marker existed: recognised by the files the stage writes, marked by the rerun
    (out / outputs.MARKER).unlink()
    assert outputs.is_output_of(out, "crop_faces") and not outputs.is_output_of(out, "embed_faces")
    assert main([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(out)]) == 0
    assert outputs.written_by(out) == {"stage": "crop_faces"}
    # a symbolic link to its own earlier output (data on other storage): written through, the link stays
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "crops").symlink_to(out)
    assert main([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(tmp_path / "elsewhere" / "crops")]) == 0
    assert (tmp_path / "elsewhere" / "crops").is_symlink() and outputs.written_by(out) == {"stage": "crop_faces"}
    # an empty folder is fine (a KFP output path, a folder made beforehand)
    (tmp_path / "empty").mkdir()
    assert main([*SAMPLE, "sample-data", "--output", str(tmp_path / "empty")]) == 0
    capsys.readouterr()


def test_legacy_outputs_of_each_stage_are_told_apart(tmp_path, sample_identity):
    crops, embeddings = sample_identity
    assert outputs.written_by(crops) == {"stage": "crop_faces"} and outputs.written_by(embeddings) == {"stage": "embed_faces"}
    legacy = tmp_path / "legacy"
    shutil.copytree(crops, legacy)
    (legacy / outputs.MARKER).unlink()
    assert [s for s in outputs.LEGACY if outputs.is_output_of(legacy, s)] == ["crop_faces"]
    legacy_emb = tmp_path / "legacy_emb"
    shutil.copytree(embeddings, legacy_emb)
    (legacy_emb / outputs.MARKER).unlink()
    assert [s for s in outputs.LEGACY if outputs.is_output_of(legacy_emb, s)] == ["embed_faces"]
    # told by content, not a common file name: a user's own metrics.json is not a render-validation output
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "metrics.json").write_text('{"accuracy": 0.9}\n')
    assert [s for s in outputs.LEGACY if outputs.is_output_of(tmp_path / "mine", s)] == []
    # a many-identities parent of an earlier version: every visible sub-folder is an output of the stage
    parent = tmp_path / "many"
    shutil.copytree(legacy, parent / "ann")
    assert outputs.is_output_of(parent, "crop_faces", identities=True)
    (parent / "notes.txt").write_text("mine\n")
    assert not outputs.is_output_of(parent, "crop_faces", identities=True)
    with pytest.raises(InputError, match="not written by faceid crop-faces"):
        outputs.check_folder("crop_faces", parent, identities=True)
    # a batch-infer manifest is told by its columns, not by its name (crop-faces writes a manifest.parquet too)
    assert not outputs.is_output_of(legacy, "batch_infer")
    # test weights are told by their model_index.json (a diffusers folder: nothing is added to it)
    from faceid.model.base_model import TEST_WEIGHTS_MARKER

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model_index.json").write_text('{"_class_name": "WanVACEPipeline"}')
    assert not outputs.is_output_of(weights, "make_test_weights")
    (weights / "model_index.json").write_text(f'{{"{TEST_WEIGHTS_MARKER}": {{"id": "x"}}}}')
    assert outputs.is_output_of(weights, "make_test_weights")


def test_make_test_weights_never_replaces_a_folder_it_did_not_write(tmp_path, photos, capsys):
    before = snapshot(photos)
    rc, err = faceid([*PARAMS, "make-test-weights", "--size", "tiny", "--output", str(photos)], capsys)
    assert rc == 2 and f"output folder {photos} is not empty and was not written by faceid make-test-weights" in err
    assert snapshot(photos) == before


def test_batch_infer_into_its_pose_videos_folder_is_refused(tmp_path, sample_dir, no_work, capsys):
    videos = tmp_path / "poses"
    shutil.copytree(sample_dir / "videos", videos)
    before = snapshot(videos)
    rc, err = faceid([*PARAMS, "batch-infer", "--identity", str(tmp_path / "identity"), "--pose-videos", str(videos),
                      "--output", str(videos)], capsys)
    assert rc == 2 and f"output {videos} is also an input of this run: batch-infer" in err
    rc, err = faceid([*PARAMS, "batch-infer", "--identity", str(videos), "--pose-videos", str(tmp_path / "x"),
                      "--output", str(videos / "out")], capsys)
    assert rc == 2 and f"output {videos / 'out'} lies inside the input {videos}" in err  # an identity folder
    assert snapshot(videos) == before


# --------------------------------------------------------------------------- output files


def test_infer_output_that_is_a_folder_or_not_a_video_is_refused_before_a_model_loads(tmp_path, sample_dir, no_work,
                                                                                       no_model, capsys):
    pose = sample_dir / "videos" / "dance_00.mp4"
    folder = tmp_path / "out.mp4"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine\n")
    argv = [*PARAMS, "infer", "--identity", str(tmp_path / "identity"), "--pose-video", str(pose), "--output"]
    rc, err = faceid([*argv, str(folder)], capsys)
    assert rc == 2 and f"output {folder} is a folder; expected the path of an MP4 video to write" in err
    assert (folder / "keep.txt").read_text() == "mine\n"
    notes = tmp_path / "notes.mp4"
    notes.write_text("not a video\n")
    rc, err = faceid([*argv, str(notes)], capsys)
    assert rc == 2 and f"output {notes} exists and is not an MP4 video" in err and notes.read_text() == "not a video\n"
    rc, err = faceid([*argv, str(pose)], capsys)  # the pose video itself
    assert rc == 2 and f"output {pose} is also an input of this run" in err
    rc, err = faceid([*argv, str(notes / "x.mp4")], capsys)
    assert rc == 2 and f"output {notes / 'x.mp4'} cannot be made: {notes} is a file, not a folder" in err
    # an earlier render (an MP4 video) may be replaced: the check passes it on to the identity check
    earlier = tmp_path / "earlier.mp4"
    shutil.copy(pose, earlier)
    assert outputs.check_file("infer", earlier, [pose], replaceable=outputs.is_mp4, what="an MP4 video") == earlier


def test_similarity_replaces_only_its_own_report(tmp_path, sample_dir, capsys):
    notes = tmp_path / "report.json"
    notes.write_text('{"my": "settings"}\n')
    argv = [*PARAMS, "similarity", "--reference", str(tmp_path / "emb"), "--video", str(sample_dir / "videos")]
    rc, err = faceid([*argv, "--output", str(notes)], capsys)
    assert rc == 2 and f"output {notes} exists and is not a similarity report" in err
    assert notes.read_text() == '{"my": "settings"}\n'
    rc, err = faceid([*argv, "--output", str(tmp_path)], capsys)
    assert rc == 2 and f"output {tmp_path} is a folder" in err
    report = tmp_path / "earlier.json"
    report.write_text('{"metric": "facesim", "videos": {}}\n')
    assert outputs.check_file("similarity", report, replaceable=outputs.is_json_report("metric", "videos"),
                              what="a report") == report


# --------------------------------------------------------------------------- modes (umask)


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(folder: Path) -> set[tuple[str, int]]:
    """``{("dir" | "file", permission bits)}`` of ``folder`` and everything under it."""
    return {("dir" if p.is_dir() else "file", stat.S_IMODE(p.stat().st_mode)) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_are_readable_as_the_umask_says(tmp_path, photos, mask, capsys):
    with umask(mask):
        assert main([*SAMPLE, "sample-data", "--output", str(tmp_path / "sample")]) == 0
        assert main([*PARAMS, "crop-faces", "--input", str(photos), "--output", str(tmp_path / "crops")]) == 0
        with atomic_path(tmp_path / "file.txt") as tmp:
            tmp.write_text("x")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "f").write_text("x")
    expected = {("dir", 0o777 & ~mask), ("file", 0o666 & ~mask)}
    for out in ("sample", "crops", "folder"):  # videos, PNGs, Parquet (atomic_path), the folders (atomic_dir)
        assert modes(tmp_path / out) == expected, out
    assert stat.S_IMODE((tmp_path / "file.txt").stat().st_mode) == 0o666 & ~mask
    capsys.readouterr()


# --------------------------------------------------------------------------- messages


def test_a_file_where_a_folder_is_expected_is_named(tmp_path, photos, sample_identity, no_work, capsys):
    photo = photos / "obama.jpg"
    rc, err = faceid([*PARAMS, "crop-faces", "--input", str(photo), "--output", str(tmp_path / "crops")], capsys)
    assert rc == 2 and f"{photo} is a file; expected a folder (a folder of photos of one person)" in err
    crops, embeddings = sample_identity
    rc, err = faceid([*PARAMS, "train-lora", "--identity", "obama", "--crops", str(crops), "--embeddings",
                      str(embeddings), "--clips", str(photo), "--output", str(tmp_path / "identity")], capsys)
    assert rc == 2 and f"{photo} is a file; expected a folder (the output folder of prepare-pose)" in err
    rc, err = faceid([*SAMPLE, "sample-data", "--output", str(photo)], capsys)
    assert rc == 2 and f"output {photo} is a file; expected a folder" in err
    rc, err = faceid([*PARAMS, "render-validation", "--identity", str(photo), "--clips", str(photos),
                      "--reference", str(embeddings), "--output", str(tmp_path / "val")], capsys)
    assert rc == 2 and f"{photo} is a file; expected a folder (an identity folder" in err
    rc, err = faceid([*PARAMS, "batch-infer", "--identity", str(photos), "--pose-videos", str(photo),
                      "--output", str(tmp_path / "videos")], capsys)
    assert rc == 2 and f"{photo} is a file; expected a folder of pose videos" in err
    assert not (tmp_path / "crops").exists() and not (tmp_path / "identity").exists()


def test_a_lock_that_cannot_be_made_says_so(tmp_path, capsys):
    out = tmp_path / "sample"
    lock_path(out).mkdir()  # something in the way of the lock file (as a folder one cannot write to is)
    rc, err = faceid([*SAMPLE, "sample-data", "--output", str(out)], capsys)
    assert rc == 2 and f"cannot create the lock file {lock_path(out)}" in err
    assert "another" not in err and not out.exists()


def test_read_json_names_a_binary_or_unreadable_file(tmp_path):
    """An identity.json (or any JSON faceid reads) that holds binary bytes is an InputError naming it,
    not a UnicodeDecodeError traceback."""
    from faceid.errors import InputError
    from faceid.io import read_json

    bad = tmp_path / "identity.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match=r"identity.json: not valid JSON"):
        read_json(bad)
