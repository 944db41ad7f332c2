"""crop-faces on real photos (face_recognition 1.3.0 test images): EXIF, modes, sizes, junk, duplicates."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceid.errors import InputError
from faceid.faces import crop
from faceid.faces.detect import Aligner, build_detector, estimate_yaw
from faceid.io import read_parquet
from faceid.sample_data import extract_archive_photos

ARCHIVE = Path(__file__).resolve().parents[1] / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"


def _rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return extract_archive_photos(ARCHIVE)


@pytest.fixture(scope="module")
def cfg(params):
    return params.crop_faces


@pytest.fixture(scope="module")
def crop_run(tmp_path_factory, photos, cfg):
    """One crop-faces run over a folder with every kind of input; returns (input dir, output dir, rows by path)."""
    src = tmp_path_factory.mktemp("crop_in")
    for name in ("obama.jpg", "obama2.jpg", "32bit.png"):
        (src / name).write_bytes(photos[name])
    # EXIF-rotated phone photo: pixels stored rotated, Orientation=6 says "rotate 90 clockwise to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    _rgb(photos["obama3.jpg"]).transpose(Image.Transpose.ROTATE_90).save(src / "exif_rotated.jpg", exif=exif.tobytes())
    _rgb(photos["obama_partial_face.jpg"]).convert("L").save(src / "gray.png")
    rgba = _rgb(photos["obama_partial_face2.jpg"]).convert("RGBA")
    alpha = np.full((rgba.height, rgba.width), 255, np.uint8)
    alpha[:, :40] = 0  # transparent margin
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(src / "rgba.png")
    big = _rgb(photos["obama.jpg"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    big.resize((6000, round(6000 * big.height / big.width))).save(src / "huge.jpg", quality=80)
    _rgb(photos["obama.jpg"]).resize((40, 50)).save(src / "tiny.jpg")
    from PIL import ImageFilter

    _rgb(photos["biden.jpg"]).filter(ImageFilter.GaussianBlur(12)).save(src / "blurry.jpg")
    from skimage import data

    Image.fromarray(data.coffee()).save(src / "coffee.png")  # no face
    (src / "corrupt.jpg").write_bytes(photos["obama.jpg"][:4000])
    (src / "notes.txt").write_text("not a photo\n")
    out = tmp_path_factory.mktemp("crop_out") / "crops"
    summary = crop.run(cfg, src, out)
    rows = {r["path"]: r for r in read_parquet(out / "manifest.parquet")}
    return src, out, rows, summary


def test_every_input_has_a_row_with_the_expected_status(crop_run):
    src, out, rows, summary = crop_run
    assert set(rows) == {p.name for p in src.iterdir()}
    expected = {
        "obama.jpg": None, "obama2.jpg": None, "exif_rotated.jpg": None, "gray.png": None, "rgba.png": None,
        "huge.jpg": None, "32bit.png": "duplicate", "tiny.jpg": "image_too_small", "blurry.jpg": "too_blurry",
        "coffee.png": "no_face", "corrupt.jpg": "unreadable", "notes.txt": "unreadable",
    }
    assert {p: r["reason"] for p, r in rows.items()} == expected
    for path, r in rows.items():
        assert r["status"] == ("accepted" if expected[path] is None else "rejected")
        assert len(r["sha256"]) == 64
        assert (r["detail"] is None) == (expected[path] is None)
    assert summary["accepted"] == 6 and summary["rejected"] == 6


def test_duplicate_keeps_the_original_and_names_it(crop_run):
    rows = crop_run[2]
    assert rows["32bit.png"]["duplicate_of"] == "obama2.jpg"
    assert "obama2.jpg" in rows["32bit.png"]["detail"]


def test_accepted_crops_are_written_at_every_size(crop_run, cfg):
    _, out, rows, _ = crop_run
    for r in rows.values():
        for size in cfg.crop_sizes:
            if r["status"] == "accepted":
                assert r[f"crop_{size}"] == f"crops/{size}/{r['name']}.png"
                with Image.open(out / r[f"crop_{size}"]) as im:
                    assert im.size == (size, size) and im.mode == "RGB"
            else:
                assert r[f"crop_{size}"] is None
    assert {p.stem for p in (out / "crops" / "150").iterdir()} == {r["name"] for r in rows.values() if r["status"] == "accepted"}
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "crops", "manifest.parquet", "summary.txt"]


def test_exif_rotation_is_applied(crop_run):
    r = crop_run[2]["exif_rotated.jpg"]
    assert r["exif_rotated"] is True
    assert (r["width"], r["height"]) == (1434, 2333)  # upright again
    lm = np.asarray(r["landmarks"]).reshape(5, 2)
    assert lm[:4, 1].mean() < lm[4, 1]  # eyes above the nose: the face is upright


def test_huge_image_boxes_are_in_original_pixels(crop_run):
    r = crop_run[2]["huge.jpg"]
    assert r["width"] == 6000
    x0, y0, x1, y1 = r["box"]
    assert x1 - x0 > 1000 and 0 <= x0 < x1 <= 6000
    lm = np.asarray(r["landmarks"]).reshape(5, 2)
    assert (lm[:, 0] > x0).all() and (lm[:, 0] < x1).all()


def test_quality_scores_recorded(crop_run):
    rows = crop_run[2]
    ok = rows["obama.jpg"]
    assert ok["num_faces"] == 1 and ok["face_index"] == 0 and ok["det_score"] > 0.5
    assert ok["sharpness"] > 100 and abs(ok["yaw_degrees"]) < 30 and len(ok["phash"]) == 16
    assert rows["blurry.jpg"]["sharpness"] < 20  # face found, but blurred
    assert rows["notes.txt"]["width"] is None


def test_summary_and_contact_sheet(crop_run):
    _, out, rows, _ = crop_run
    first = (out / "summary.txt").read_text().splitlines()[0]
    assert first.startswith("crop-faces: 6/12 photos accepted") and "duplicate 1" in first and "unreadable 2" in first
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 128 * 6 and sheet.height > 128 * 2


def test_too_few_usable_photos_lists_each_rejection(tmp_path, photos, cfg):
    src = tmp_path / "in"
    src.mkdir()
    (src / "obama.jpg").write_bytes(photos["obama.jpg"])
    (src / "notes.txt").write_text("hello")
    _rgb(photos["obama.jpg"]).resize((40, 50)).save(src / "tiny.jpg")
    with pytest.raises(InputError) as err:
        crop.run(cfg, src, tmp_path / "out")
    msg = str(err.value)
    assert "only 1 usable photo(s) of 3" in msg and "min_photos is 3" in msg
    assert "notes.txt: unreadable" in msg and "tiny.jpg: image_too_small" in msg
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_empty_or_missing_folder(tmp_path, cfg):
    with pytest.raises(InputError, match="folder not found"):
        crop.run(cfg, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no files"):
        crop.run(cfg, tmp_path / "empty", tmp_path / "out")


def test_main_face_is_the_largest_central_one(photos, cfg):
    canvas = np.full((900, 1200, 3), 200, np.uint8)
    obama = np.asarray(_rgb(photos["obama2.jpg"]).resize((313, 600)))
    biden = np.asarray(_rgb(photos["biden.jpg"]).resize((340, 773)))
    canvas[150:750, 450:763] = obama
    canvas[0:773, 0:340] = biden
    detector = build_detector("mediapipe", cfg.min_detection_confidence)
    result = crop.crop_face(canvas, detector, Aligner(), dataclasses.replace(cfg, min_face_size=32))
    detector.close()
    assert isinstance(result, crop.FaceCrop)
    assert result.num_faces == 2
    assert 450 < result.landmarks[:, 0].mean() < 763


def test_select_main_face_prefers_large_then_central():
    from faceid.faces.detect import Face, select_main_face

    corner_big = Face((0, 0, 120, 120), 0.9)
    centre = Face((440, 340, 560, 460), 0.9)
    centre_small = Face((480, 380, 520, 420), 0.9)
    assert select_main_face([corner_big, centre], 800, 1000) == 1  # same size: the central one
    assert select_main_face([centre_small, corner_big], 800, 1000) == 1  # 3x larger wins off-centre


def test_dlib_hog_detector_crops_the_same_face(photos, cfg):
    image = np.asarray(_rgb(photos["obama.jpg"]))
    results = {}
    for name in ("mediapipe", "dlib-hog"):
        detector = build_detector(name, cfg.min_detection_confidence)
        results[name] = crop.crop_face(image, detector, Aligner(), cfg)
        detector.close()
        assert isinstance(results[name], crop.FaceCrop), results[name]
    gap = np.abs(results["mediapipe"].landmarks - results["dlib-hog"].landmarks).max()
    assert gap < 10  # pixels, on a ~290 px face


def test_estimate_yaw_on_synthetic_landmarks():
    eyes = np.array([[140, 100], [120, 100], [80, 100], [60, 100]], np.float32)
    frontal = np.vstack([eyes, [[100, 150]]])
    turned = np.vstack([eyes, [[130, 150]]])  # nose base 30 px off a 40 px half eye distance
    assert abs(estimate_yaw(frontal)) < 1
    assert 45 < abs(estimate_yaw(turned)) < 60


def test_load_image_modes_and_errors(tmp_path):
    Image.fromarray(np.zeros((20, 30), np.uint16)).save(tmp_path / "i16.png")
    Image.new("P", (30, 20)).save(tmp_path / "p.gif")
    Image.new("RGB", (30, 20)).save(tmp_path / "x.webp")
    for name in ("i16.png", "p.gif", "x.webp"):
        loaded = crop.load_image(tmp_path / name, max_pixels=10_000)
        assert loaded.pixels.shape == (20, 30, 3) and loaded.pixels.dtype == np.uint8
    with pytest.raises(crop.UnreadableImage) as err:
        crop.load_image(tmp_path / "x.webp", max_pixels=100)
    assert err.value.reason == "image_too_large"
