"""crop-faces on real photos (face_recognition 1.3.0 test images): EXIF, modes, sizes, junk, duplicates,
photo copies, caption sidecars, read_photos and choose_reference."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceid.config import load_params
from faceid.errors import ConfigError, InputError
from faceid.faces import crop
from faceid.faces.detect import Aligner, build_detector, estimate_yaw
from faceid.io import read_parquet, sha256_file, write_parquet
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
    (src / "notes.txt").write_text("not a photo\n")  # a caption sidecar without a photo
    (src / "obama.txt").write_text("  Barack Obama — Porträt im Anzug\n", encoding="utf-8")
    (src / "rgba.txt").write_text(" \n")  # empty: no caption
    (src / "coffee.txt").write_text("a cup of coffee")  # caption of a rejected photo
    out = tmp_path_factory.mktemp("crop_out") / "crops"
    summary = crop.run(cfg, src, out)
    rows = {r["path"]: r for r in read_parquet(out / "manifest.parquet")}
    return src, out, rows, summary


def test_every_input_has_a_row_with_the_expected_status(crop_run):
    src, out, rows, summary = crop_run
    assert set(rows) == {p.name for p in src.iterdir() if p.suffix != ".txt"}
    expected = {
        "obama.jpg": None, "obama2.jpg": None, "exif_rotated.jpg": None, "gray.png": None, "rgba.png": None,
        "huge.jpg": None, "32bit.png": "duplicate", "tiny.jpg": "image_too_small", "blurry.jpg": "too_blurry",
        "coffee.png": "no_face", "corrupt.jpg": "unreadable",
    }
    assert {p: r["reason"] for p, r in rows.items()} == expected
    for path, r in rows.items():
        assert r["status"] == ("accepted" if expected[path] is None else "rejected")
        assert len(r["sha256"]) == 64
        assert (r["detail"] is None) == (expected[path] is None)
    assert summary["accepted"] == 6 and summary["rejected"] == 5


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
    assert sorted(p.name for p in out.iterdir()) == ["contact_sheet.png", "crops", "manifest.parquet", "photos", "summary.txt"]


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
    assert rows["corrupt.jpg"]["width"] is None


def test_summary_and_contact_sheet(crop_run):
    _, out, rows, _ = crop_run
    first = (out / "summary.txt").read_text().splitlines()[0]
    assert first.startswith("crop-faces: 6/11 photos accepted") and "duplicate 1" in first and "unreadable 1" in first
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 128 * 6 and sheet.height > 128 * 2


def test_too_few_usable_photos_lists_each_rejection(tmp_path, photos, cfg):
    src = tmp_path / "in"
    src.mkdir()
    (src / "obama.jpg").write_bytes(photos["obama.jpg"])
    (src / "notes.txt").write_text("hello")
    (src / "corrupt.jpg").write_bytes(photos["obama.jpg"][:4000])
    _rgb(photos["obama.jpg"]).resize((40, 50)).save(src / "tiny.jpg")
    with pytest.raises(InputError) as err:
        crop.run(cfg, src, tmp_path / "out")
    msg = str(err.value)
    assert "only 1 usable photo(s) of 3" in msg and "min_photos is 3" in msg
    assert "corrupt.jpg: unreadable" in msg and "tiny.jpg: image_too_small" in msg and "notes.txt" not in msg
    assert not (tmp_path / "out").exists()  # nothing half-written
    assert [p.name for p in tmp_path.iterdir()] == ["in"]


def test_empty_or_missing_folder(tmp_path, cfg):
    with pytest.raises(InputError, match="folder not found"):
        crop.run(cfg, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no photos"):
        crop.run(cfg, tmp_path / "empty", tmp_path / "out")
    (tmp_path / "empty" / "a.txt").write_text("a caption")
    with pytest.raises(InputError, match="no photos .*found only caption sidecars: a.txt"):
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


# --------------------------------------------------------------------------- photos, captions, read_photos


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


def test_photos_written_for_accepted_rows_only(crop_run, cfg):
    src, out, rows, _ = crop_run
    assert cfg.photo_max_side == 1536
    accepted = {r["name"] for r in rows.values() if r["status"] == "accepted"}
    assert {p.name for p in (out / "photos").iterdir()} == {f"{n}.png" for n in accepted}  # no duplicate left behind
    for path, r in rows.items():
        if r["status"] != "accepted":
            assert r["photo_path"] is None and r["photo_scale"] is None
            continue
        assert r["photo_path"] == f"photos/{r['name']}.png"
        w, h = r["width"], r["height"]
        assert r["photo_scale"] == pytest.approx(min(1.0, 1536 / max(w, h)))
        photo = _load(out / r["photo_path"])
        assert max(photo.shape[:2]) == min(1536, max(w, h))
        assert photo.shape[:2] == (round(h * r["photo_scale"]), round(w * r["photo_scale"]))
    # full-size photos are exactly what load_image returns (RGBA composited on white, grey -> RGB)
    for path in ("obama.jpg", "rgba.png", "gray.png"):
        assert rows[path]["photo_scale"] == 1.0
        np.testing.assert_array_equal(_load(out / rows[path]["photo_path"]), crop.load_image(src / path, cfg.max_image_pixels).pixels)
    assert (_load(out / rows["rgba.png"]["photo_path"])[:, :40] == 255).all()  # the transparent margin
    # downscaled ones stay upright: the EXIF-rotated phone photo and the 6000x7497 one are portrait
    assert _load(out / rows["exif_rotated.jpg"]["photo_path"]).shape == (1536, round(1434 * 1536 / 2333), 3)
    assert (rows["huge.jpg"]["height"], rows["huge.jpg"]["photo_scale"]) == (7497, 1536 / 7497)
    assert _load(out / rows["huge.jpg"]["photo_path"]).shape == (1536, round(6000 * 1536 / 7497), 3)


def test_caption_sidecars(crop_run):
    _, out, rows, summary = crop_run
    assert not any(p.endswith(".txt") for p in rows)  # sidecars are not inputs, not rejections
    assert rows["obama.jpg"]["caption"] == "Barack Obama — Porträt im Anzug"
    assert rows["rgba.png"]["caption"] is None  # empty sidecar
    assert rows["obama2.jpg"]["caption"] is None  # no sidecar
    assert rows["coffee.png"]["caption"] == "a cup of coffee"  # kept on the rejected row too
    assert summary["unused_sidecars"] == ["notes.txt"]
    text = (out / "summary.txt").read_text()
    assert "unused   notes.txt: caption sidecar without a photo named notes.*" in text
    assert "obama.txt" not in text and "coffee.txt" not in text


def test_caption_sidecar_must_be_utf8(tmp_path, photos, cfg):
    src = tmp_path / "in"
    src.mkdir()
    (src / "obama.jpg").write_bytes(photos["obama.jpg"])
    (src / "obama.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(InputError, match=r"obama\.txt: caption sidecar is not UTF-8 text"):
        crop.run(cfg, src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_photos_on_the_full_run(crop_run):
    src, out, rows, _ = crop_run
    records = crop.read_photos(out)
    manifest = read_parquet(out / "manifest.parquet")
    assert [r.name for r in records] == [m["name"] for m in manifest if m["status"] == "accepted"]
    by_name = {r.name: r for r in records}
    huge, row = by_name["huge"], rows["huge.jpg"]
    s = 1536 / 7497  # huge.jpg is 6000x7497
    assert huge.box == pytest.approx(tuple(v * s for v in row["box"]), rel=1e-6)
    np.testing.assert_allclose(huge.landmarks, np.reshape(row["landmarks"], (5, 2)) * s, rtol=1e-6)
    assert huge.landmarks.dtype == np.float32 and huge.landmarks.shape == (5, 2) and not huge.landmarks.flags.writeable
    assert huge.photo_path == out.resolve() / "photos" / "huge.png" and huge.photo_path.is_absolute()
    assert huge.crop_path == out.resolve() / "crops" / "512" / "huge.png"
    assert huge.sha256 == sha256_file(src / "huge.jpg")
    assert huge.sharpness == pytest.approx(row["sharpness"]) and huge.yaw_degrees == pytest.approx(row["yaw_degrees"])
    assert by_name["obama"].caption == "Barack Obama — Porträt im Anzug" and by_name["rgba"].caption is None


def test_read_photos_scales_box_and_landmarks_to_the_photo(tmp_path, photos, cfg):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("obama.jpg", "obama2.jpg", "obama3.jpg"):
        (src / name).write_bytes(photos[name])
    (src / "obama2.txt").write_text("upper body\n")
    small = dataclasses.replace(cfg, photo_max_side=256)
    crop.run(small, src, tmp_path / "out")
    records = crop.read_photos(tmp_path / "out")
    assert [r.name for r in records] == ["obama", "obama2", "obama3"]
    assert [r.caption for r in records] == [None, "upper body", None]
    for rec in records:
        original = crop.load_image(src / f"{rec.name}.jpg", cfg.max_image_pixels).pixels
        photo = _load(rec.photo_path)
        scale = 256 / max(original.shape[:2])
        assert max(photo.shape[:2]) == 256
        x0, y0, x1, y1 = rec.box
        H, W = photo.shape[:2]
        assert -1 <= x0 < x1 <= W + 1 and -1 <= y0 < y1 <= H + 1  # the face lies inside the small photo
        assert x1 - x0 > 20  # a real face, not a degenerate box
        inside = (rec.landmarks[:, 0] > x0) & (rec.landmarks[:, 0] < x1) & (rec.landmarks[:, 1] > y0) & (rec.landmarks[:, 1] < y1)
        assert inside.all()
        assert rec.landmarks[:4, 1].mean() < rec.landmarks[4, 1]  # eyes above the nose base

        # the photo cut at the scaled box shows the same face as the original cut at the original box
        import cv2

        def cut(img, box, size=24):
            a, b, c, d = (int(round(v)) for v in box)
            return cv2.resize(img[max(b, 0):d, max(a, 0):c], (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)

        ref = cut(original, tuple(v / scale for v in rec.box))
        same = np.abs(cut(photo, rec.box) - ref).mean()
        shift = (x1 - x0) * 0.5
        shifted = np.abs(cut(photo, (x0 + shift, y0 + shift, x1 + shift, y1 + shift)) - ref).mean()
        assert same < 8, (rec.name, same)  # grey levels; measured 2-6 (a 34 px face at 24 px)
        assert shifted > 40, (rec.name, same, shifted)  # measured ~70


def test_read_photos_rejects_an_old_manifest_or_a_missing_photo(tmp_path, crop_run):
    import shutil

    out = tmp_path / "crops"
    shutil.copytree(crop_run[1], out)
    rows = read_parquet(out / "manifest.parquet")
    old = [{k: v for k, v in r.items() if k not in ("photo_path", "photo_scale", "caption")} for r in rows]
    write_parquet(out / "manifest.parquet", old)
    with pytest.raises(InputError) as err:
        crop.read_photos(out)
    assert str(out.resolve()) in str(err.value)
    assert "caption, photo_path, photo_scale" not in str(err.value)  # listed in manifest order
    assert "photo_path, photo_scale, caption" in str(err.value) and "older crop-faces; rerun crop-faces" in str(err.value)

    write_parquet(out / "manifest.parquet", rows)
    assert len(crop.read_photos(out)) == 6
    (out / "photos" / "obama2.png").unlink()
    with pytest.raises(InputError, match=r"crops: photo photos/obama2\.png of accepted obama2\.jpg is missing; rerun crop-faces"):
        crop.read_photos(out)


def _record(name: str, sharpness: float, yaw: float) -> crop.PhotoRecord:
    return crop.PhotoRecord(
        name=name, photo_path=Path(f"/p/{name}.png"), sha256="0" * 64, box=(0.0, 0.0, 10.0, 10.0),
        landmarks=np.zeros((5, 2), np.float32), sharpness=sharpness, yaw_degrees=yaw, caption=None,
        crop_path=Path(f"/c/{name}.png"),
    )


def test_choose_reference_prefers_frontal_among_the_sharp_half():
    records = [
        _record("blurry_frontal", 10.0, 0.5),  # the most frontal, but below the median sharpness (80)
        _record("soft", 50.0, 3.0),
        _record("median", 80.0, -2.0),
        _record("sharpest_turned", 200.0, 15.0),
        _record("sharp", 120.0, 2.0),  # ties |yaw| 2 with "median": the sharper one wins
    ]
    assert crop.choose_reference(records).name == "sharp"
    assert crop.choose_reference(records[:4]).name == "median"  # median 65: median, sharpest_turned qualify
    twins = [_record("b", 90.0, -1.0), _record("a", 90.0, 1.0), _record("c", 5.0, 0.0)]
    assert crop.choose_reference(twins).name == "a"  # same sharpness and |yaw|: by name
    assert crop.choose_reference([records[3]]).name == "sharpest_turned"
    with pytest.raises(InputError, match="no photos"):
        crop.choose_reference([])


def test_downscale_photo():
    image = np.random.default_rng(0).integers(0, 255, (400, 600, 3), dtype=np.uint8)
    small, scale = crop.downscale_photo(image, 256)
    assert small.shape == (171, 256, 3) and scale == 256 / 600
    tall, scale = crop.downscale_photo(image.transpose(1, 0, 2), 300)
    assert tall.shape == (300, 200, 3) and scale == 0.5
    assert crop.downscale_photo(image, 0)[0] is image
    same, scale = crop.downscale_photo(image, 600)
    assert same is image and scale == 1.0


def test_photo_max_side_is_validated(repo):
    path = repo / "params.yaml"
    assert load_params(path, ["crop_faces.photo_max_side=0"]).crop_faces.photo_max_side == 0
    assert load_params(path, ["crop_faces.photo_max_side=256"]).crop_faces.photo_max_side == 256
    for bad in (100, -1):
        with pytest.raises(ConfigError, match=rf"crop_faces\.photo_max_side: expected 0 \(full size\) or >= 256 px, got {bad}"):
            load_params(path, [f"crop_faces.photo_max_side={bad}"])
