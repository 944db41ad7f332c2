"""crop-faces and embed-faces on a folder of identity folders: one job, one model load, each identity
exactly as a single run writes it; a failing identity keeps its output and does not stop the others."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from PIL import Image

from faceid.cli import main
from faceid.errors import InputError
from faceid.faces import crop, embed
from faceid import outputs
from faceid.io import read_json, read_parquet
from faceid.outputs import MARKER, mark
from faceid.sample_data import extract_archive_photos

ARCHIVE = Path(__file__).resolve().parents[1] / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
IDENTITIES = {  # small real photos: three of one person per identity
    "ann": ("obama.jpg", "obama2.jpg", "obama_partial_face.jpg"),
    "bob": ("obama3.jpg", "obama_partial_face2.jpg", "obama.jpg"),
}


@pytest.fixture(scope="module")
def many(tmp_path_factory, repo):
    """``faceid crop-faces`` then ``embed-faces`` on a folder of three identities, ``bad`` having one
    usable photo; ``bad``'s outputs hold an earlier file that must survive. Returns (root, rc crop, rc embed,
    what they printed)."""
    photos = extract_archive_photos(ARCHIVE)
    root = tmp_path_factory.mktemp("many")
    for name, files in IDENTITIES.items():
        (root / "people" / name).mkdir(parents=True)
        for file in files:
            (root / "people" / name / file).write_bytes(photos[file])
    (root / "people" / "bad").mkdir()
    (root / "people" / "bad" / "obama.jpg").write_bytes(photos["obama.jpg"])
    Image.open(io.BytesIO(photos["obama.jpg"])).resize((40, 50)).save(root / "people" / "bad" / "tiny.jpg")
    (root / "people" / ".DS_Store").write_bytes(b"\0")  # hidden entries are not identities
    for out in ("crops", "emb"):
        (root / out / "bad").mkdir(parents=True)
        (root / out / "bad" / "earlier.txt").write_text("an earlier run's output\n")
        mark(root / out / "bad", "crop_faces" if out == "crops" else "embed_faces")  # one faceid wrote (faceid.outputs)
    params, printed = ["--params", str(repo / "params.yaml")], io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc_crop = main([*params, "crop-faces", "--input", str(root / "people"), "--output", str(root / "crops")])
        rc_embed = main([*params, "embed-faces", "--crops", str(root / "crops"), "--output", str(root / "emb")])
    return root, rc_crop, rc_embed, printed.getvalue()


def test_each_identity_is_written_as_a_single_run_writes_it(many, params):
    root = many[0]
    for name in IDENTITIES:
        single = root / "single" / name
        crop.run(params.crop_faces, root / "people" / name, single / "crops")
        embed.run(params.embed_faces, single / "crops", single / "emb")
        assert read_parquet(root / "crops" / name / "manifest.parquet") == read_parquet(single / "crops" / "manifest.parquet")
        assert sorted(p.relative_to(root / "crops" / name) for p in (root / "crops" / name).rglob("*")) == \
            sorted(p.relative_to(single / "crops") for p in (single / "crops").rglob("*"))
        assert read_parquet(root / "emb" / name / "embeddings.parquet") == read_parquet(single / "emb" / "embeddings.parquet")
        assert read_json(root / "emb" / name / "report.json") == read_json(single / "emb" / "report.json")


def test_a_failing_identity_keeps_its_output_and_the_job_fails_at_the_end(many):
    root, rc_crop, rc_embed, printed = many
    assert rc_crop == 2 and rc_embed == 2  # not 0: one identity failed, after the others were done
    for out in ("crops", "emb"):
        assert sorted(p.name for p in (root / out).iterdir() if not p.name.startswith(".")) == ["ann", "bad", "bob"]
        assert sorted(p.name for p in (root / out / "bad").iterdir()) == [MARKER, "earlier.txt"]  # as it was
    # one output lock per identity; embed-faces found no crop-faces output in crops/bad, so never took its lock
    assert {p.name for p in (root / "crops").iterdir() if p.name.startswith(".")} == {".ann.lock", ".bad.lock", ".bob.lock"}
    assert {p.name for p in (root / "emb").iterdir() if p.name.startswith(".")} == {".ann.lock", ".bob.lock"}
    assert all(outputs.written_by(root / out) is None for out in ("crops", "emb"))  # an earlier version's: marked on success
    lines = printed.splitlines()
    assert f"crop-faces: 3 identities in {root / 'people'} -> {root / 'crops'}/<identity>/" in lines
    assert "crop-faces [1/3] ann" in lines and "crop-faces [3/3] bob" in lines  # progress across identities
    assert any(ln.startswith(f"crop-faces [2/3] bad: FAILED, {root / 'crops' / 'bad'} left as it was: ") and "only 1 usable photo" in ln
               for ln in lines)
    assert "crop-faces: 2/3 identities done, 1 failed: bad" in lines
    assert any(ln.startswith("embed-faces [2/3] bad: FAILED") and "manifest.parquet" in ln for ln in lines)
    assert "embed-faces: 2/3 identities done, 1 failed: bad" in lines


def test_folder_of_identities_rule(tmp_path, params):
    (tmp_path / "people" / "ann").mkdir(parents=True)
    (tmp_path / "people" / ".hidden").mkdir()
    assert crop.holds_identities(tmp_path / "people")
    (tmp_path / "people" / "notes.txt").write_text("a caption is not a photo")
    assert crop.holds_identities(tmp_path / "people")
    with pytest.raises(InputError, match=r"caption sidecar\(s\) notes\.txt directly in a folder of identity folders"):
        crop.run_many(params.crop_faces, tmp_path / "people", tmp_path / "out")
    (tmp_path / "people" / "photo.jpg").write_bytes(b"")
    assert not crop.holds_identities(tmp_path / "people")  # a photo in it: one identity, as before
    assert not crop.holds_identities(tmp_path / "people" / "ann")  # empty: neither
    (tmp_path / "crops" / "ann").mkdir(parents=True)
    assert embed.holds_identities(tmp_path / "crops")
    (tmp_path / "crops" / "manifest.parquet").write_bytes(b"")
    assert not embed.holds_identities(tmp_path / "crops")
    (tmp_path / "people" / "notes.txt").unlink()
    (tmp_path / "people" / "photo.jpg").unlink()
    for out in (tmp_path / "people", tmp_path / "people" / "ann" / "crops"):  # would replace or become an input
        with pytest.raises(InputError, match="the output must be a folder outside the identity folders"):
            crop.run_many(params.crop_faces, tmp_path / "people", out)
