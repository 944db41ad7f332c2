"""crop-faces on real photos (face_recognition 1.3.0 test images): EXIF, modes, sizes, junk, duplicates,
photo copies, caption sidecars, read_photos and choose_reference."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from group_photos import HEAD_BOXES, head, side_by_side
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
    assert sorted(p.name for p in out.iterdir()) == [
        ".faceid-output.json", "contact_sheet.png", "crops", "manifest.parquet", "other_faces.parquet", "photos",
        "summary.txt"]  # the marker: faceid.outputs
    assert read_parquet(out / "other_faces.parquet") == []  # no photo here has a second face
    assert all(r["num_candidates"] == 1 for r in rows.values() if r["status"] == "accepted")


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "in"]  # no output, only the released lock


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


# --------------------------------------------------------------------------- image modes, blank images, several faces


@pytest.fixture(scope="module")
def detector(cfg):
    detector = build_detector("mediapipe", cfg.min_detection_confidence)
    yield detector
    detector.close()


@pytest.fixture(scope="module")
def portrait(photos) -> np.ndarray:
    """obama.jpg at half size (455x568), the 8-bit original that every mode is made from."""
    im = _rgb(photos["obama.jpg"])
    return np.asarray(im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS))


def _stretch(values: np.ndarray) -> np.ndarray:
    """What crop.load_image must give for 16/32-bit grey: [min(0, lowest), highest] -> [0, 255]."""
    lo = min(0.0, float(values.min()))
    return np.rint((values.astype(np.float64) - lo) * 255 / (float(values.max()) - lo))


def _with_margin(rgb: np.ndarray) -> Image.Image:
    """RGBA copy whose 30 left columns are transparent."""
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :30] = 0
    return Image.fromarray(np.dstack([rgb, alpha]))


def _in_mode(mode: str, rgb: np.ndarray) -> tuple[Image.Image, str, np.ndarray, float]:
    """``(image in mode, file format, expected RGB uint8 [H, W, 3], max mean abs error)``."""
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    g = grey.astype(np.int64)
    white_margin = lambda x: np.concatenate([np.full_like(x[:, :30], 255), x[:, 30:]], axis=1)  # noqa: E731
    as_rgb = lambda x: np.repeat(np.asarray(x, np.float64)[:, :, None], 3, axis=2)  # noqa: E731
    h, w = grey.shape
    if mode == "1":
        return Image.fromarray(grey).convert("1"), "PNG", as_rgb(grey), 2.0  # dithered: only the mean survives
    if mode == "L":
        return Image.fromarray(grey), "PNG", as_rgb(grey), 0.0
    if mode == "LA":
        return _with_margin(rgb).convert("LA"), "PNG", white_margin(as_rgb(grey)), 0.0
    if mode == "P":
        return Image.fromarray(rgb).quantize(256), "PNG", rgb, 4.0
    if mode == "PA":
        return _with_margin(rgb).convert("PA"), "TIFF", white_margin(rgb), 4.0
    if mode == "RGB":
        return Image.fromarray(rgb), "JPEG", rgb, 4.0
    if mode == "RGBA":
        return _with_margin(rgb), "PNG", white_margin(rgb), 0.0
    if mode in ("CMYK", "YCbCr"):
        return Image.fromarray(rgb).convert(mode), "JPEG" if mode == "CMYK" else "TIFF", rgb, 3.0
    if mode == "I;16":  # a 16-bit PNG using the full range
        return Image.fromarray((g * 257).astype(np.uint16)), "PNG", as_rgb(_stretch(g * 257)), 0.5
    if mode == "I;16B":  # 12-bit data, big-endian TIFF
        return Image.frombytes(mode, (w, h), (g * 16).astype(">u2").tobytes()), "TIFF", as_rgb(_stretch(g * 16)), 0.5
    if mode in ("I;16L", "I;16N"):  # 14-bit data; PIL saves no I;16N file, that one is read from memory
        return Image.frombytes(mode, (w, h), (g * 64).astype("<u2").tobytes()), "TIFF", as_rgb(_stretch(g * 64)), 0.5
    if mode == "I":  # 32-bit signed with negative values
        values = g * 65793 - 2**23
        return Image.fromarray(values.astype(np.int32)), "TIFF", as_rgb(_stretch(values)), 0.5
    if mode == "F":  # float in [0, 1]
        return Image.fromarray((g / 255).astype(np.float32)), "TIFF", as_rgb(grey), 0.5
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L",
                                  "I;16N", "I", "F"])
def test_load_image_reads_every_mode_by_its_real_range(mode, portrait, detector, tmp_path):
    image, fmt, expected, tolerance = _in_mode(mode, portrait)
    assert image.mode == mode
    if mode == "I;16N":
        pixels, _ = crop._to_rgb(image)
    else:
        image.save(tmp_path / f"photo.{fmt.lower()}", fmt)
        with Image.open(tmp_path / f"photo.{fmt.lower()}") as back:
            assert back.mode == {"I;16L": "I;16"}.get(mode, mode) or fmt == "JPEG"  # the mode really is read back
        pixels = crop.load_image(tmp_path / f"photo.{fmt.lower()}", max_pixels=10**7).pixels
    assert pixels.shape == portrait.shape and pixels.dtype == np.uint8
    if mode == "1":
        assert set(np.unique(pixels)) <= {0, 255} and abs(pixels.mean() - expected.mean()) < tolerance
        return
    assert np.abs(pixels.astype(np.float64) - expected).mean() <= tolerance, mode
    assert (pixels == 255).mean() < 0.2  # not clipped: PIL's own convert("RGB") turns a 16-bit photo ~all white
    assert detector.detect(pixels), f"{mode}: the face is no longer found"


def test_high_bit_depth_scaling_rule():
    assert crop.to_uint8(np.array([[0, 32768, 65535]], np.uint16), is_float=False).tolist() == [[0, 128, 255]]
    assert crop.to_uint8(np.array([[0, 1000, 4000]], np.uint16), is_float=False).tolist() == [[0, 64, 255]]  # by its top
    assert crop.to_uint8(np.array([[0, 100, 200]], np.uint16), is_float=False).tolist() == [[0, 100, 200]]  # 8-bit values
    assert crop.to_uint8(np.array([[-100, 60, 100]], np.int32), is_float=False).tolist() == [[0, 204, 255]]
    assert crop.to_uint8(np.array([[0.0, 0.25, 1.0]], np.float32), is_float=True).tolist() == [[0, 64, 255]]
    assert crop.to_uint8(np.array([[0.0, 1.4, 3.0]], np.float32), is_float=True).tolist() == [[0, 1, 3]]  # 8-bit values
    assert crop.to_uint8(np.array([[0.0, 150.0, 600.0]], np.float32), is_float=True).tolist() == [[0, 64, 255]]
    assert crop.to_uint8(np.full((2, 2), 40000, np.uint16), is_float=False).tolist() == [[255, 255], [255, 255]]
    assert crop.to_uint8(np.full((2, 2), -5, np.int32), is_float=False).tolist() == [[128, 128], [128, 128]]
    assert crop.to_uint8(np.array([[np.nan, 0.25, np.inf, 1.0]], np.float32), is_float=True).tolist() == [[0, 64, 0, 255]]


def test_blank_image_is_called_blank_not_faceless(tmp_path, detector, cfg):
    rng = np.random.default_rng(0)
    wall = np.clip(200 + rng.normal(0, 1.0, (300, 400)), 0, 255).astype(np.uint8)  # a white wall, sensor noise
    Image.fromarray(wall).save(tmp_path / "wall.jpg")
    Image.fromarray(wall.astype(np.uint16) * 257).save(tmp_path / "wall16.png")  # the same, 16-bit
    Image.new("RGB", (400, 300)).save(tmp_path / "black.png")
    aligner = Aligner()
    for name in ("wall.jpg", "wall16.png", "black.png"):
        result = crop.crop_face(crop.load_image(tmp_path / name, 10**7).pixels, detector, aligner, cfg)
        assert isinstance(result, crop.Rejection) and result.reason == "blank_image", (name, result)
        assert result.detail.startswith("image looks blank: almost uniform (grey-level std")
    from skimage import data

    result = crop.crop_face(np.ascontiguousarray(data.coffee()), detector, aligner, cfg)
    assert result.reason == "no_face"  # a real picture without a face is not "blank"


def test_group_photo_keeps_the_other_faces_as_candidates(photos, detector, cfg):
    # a stranger (biden, face ~200 px) beside the person (obama, ~145 px): the largest face is the stranger's
    group = np.asarray(side_by_side(head(_rgb(photos["biden.jpg"]), HEAD_BOXES["biden.jpg"], 0.6),
                                    head(_rgb(photos["obama2.jpg"]), HEAD_BOXES["obama2.jpg"], 0.42)))
    result = crop.crop_face(group, detector, Aligner(), cfg)
    assert isinstance(result, crop.FaceCrop) and result.num_faces == 2 and len(result.others) == 1
    main, other = result, result.others[0]
    assert main.face.size > other.face.size
    assert main.landmarks[:, 0].max() < group.shape[1] / 2 < other.landmarks[:, 0].min()  # stranger left, person right
    assert other.face_index != main.face_index and set(other.crops) == set(main.crops) and other.others == ()


def test_at_most_max_faces_candidates(photos, detector, cfg):
    from faceid.sample_data import package_photos

    extra = package_photos()
    heads = [
        head(_rgb(photos["biden.jpg"]), HEAD_BOXES["biden.jpg"], 0.45),
        head(_rgb(photos["obama2.jpg"]), HEAD_BOXES["obama2.jpg"], 0.43),
        head(_rgb(photos["obama.jpg"]), HEAD_BOXES["obama.jpg"], 0.5),
        head(Image.fromarray(extra["astronaut"]), (174, 68, 278, 172), 1.4),
        head(Image.fromarray(extra["grace_hopper"]), (166, 128, 366, 329), 0.75),
    ]
    result = crop.crop_face(np.asarray(side_by_side(*heads)), detector, Aligner(), cfg)
    assert result.num_faces == 5 and len(result.others) == crop.MAX_FACES - 1
    indices = [result.face_index] + [o.face_index for o in result.others]
    assert len(set(indices)) == crop.MAX_FACES


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


def test_write_png_round_trips_exactly(tmp_path):
    """crop-faces' PNG writer (photos, crops, contact sheet): Pillow and libpng (OpenCV) read back the
    same pixels. libpng reads in a fresh process: once decord is imported (earlier tests do), its
    bundled zlib makes OpenCV's libpng fail on every PNG ("bad parameters to zlib"), even its own."""
    import subprocess
    import sys

    from faceid.io import write_png

    rng = np.random.default_rng(0)
    shapes = ((1, 1, 3), (1, 7, 3), (5, 1, 3), (31, 17, 3))
    for i, shape in enumerate(shapes):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        write_png(tmp_path / f"{i}.png", pixels)
        np.save(tmp_path / f"{i}.npy", pixels)
        with Image.open(tmp_path / f"{i}.png") as im:
            assert im.format == "PNG" and im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im), pixels)
    check = ("import sys, cv2, numpy as np\n"
             f"for i in range({len(shapes)}):\n"
             "    got = cv2.imread(f'{sys.argv[1]}/{i}.png')\n"
             "    assert got is not None and (got[:, :, ::-1] == np.load(f'{sys.argv[1]}/{i}.npy')).all(), i\n")
    subprocess.run([sys.executable, "-c", check, str(tmp_path)], check=True, timeout=120)
    with pytest.raises(ValueError, match=r"expected an RGB uint8 image"):
        write_png(tmp_path / "grey.png", np.zeros((4, 4), np.uint8))


def test_an_animated_or_multi_page_image_says_its_first_frame_is_used(tmp_path, photos, cfg):
    """A GIF/WebP/PNG animation or a multi-page TIFF: the first frame is cropped, and the manifest
    (``frames`` column, ``detail``) and summary.txt say so instead of silently."""
    size = _rgb(photos["obama3.jpg"]).size
    frames = [_rgb(photos["obama3.jpg"]), _rgb(photos["biden.jpg"]).resize(size), Image.new("RGB", size, (90, 90, 90))]
    small = [f.resize((size[0] // 4, size[1] // 4)) for f in frames]
    for name in ("anim.webp", "pages.tiff", "anim.png", "anim.gif"):
        chosen = frames if name == "anim.gif" else small  # (the GIF is cropped below: full size)
        chosen[0].save(tmp_path / name, save_all=True, append_images=chosen[1:])
        loaded = crop.load_image(tmp_path / name, max_pixels=10**8)
        assert loaded.frames == 3, name
        distance = [np.abs(loaded.pixels.astype(int) - np.asarray(f)).mean() for f in chosen]
        assert int(np.argmin(distance)) == 0, (name, distance)  # the first frame, not another
    still = tmp_path / "still.png"
    small[0].save(still)
    assert crop.load_image(still, max_pixels=10**8).frames == 1

    src = tmp_path / "in"
    src.mkdir()
    for name in ("obama.jpg", "obama2.jpg"):
        (src / name).write_bytes(photos[name])
    (src / "obama3.gif").write_bytes((tmp_path / "anim.gif").read_bytes())
    crop.run(cfg, src, tmp_path / "out")
    rows = {r["path"]: r for r in read_parquet(tmp_path / "out" / "manifest.parquet")}
    note = "first of 3 frames used (animated or multi-page image)"
    assert rows["obama3.gif"]["status"] == "accepted" and rows["obama3.gif"]["frames"] == 3
    assert rows["obama3.gif"]["detail"] == note and rows["obama.jpg"]["frames"] == 1 and rows["obama.jpg"]["detail"] is None
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert next(line for line in summary.splitlines() if "obama3.gif" in line).endswith(f"({note})")
