"""``faceid crop-faces``: detect, align, quality-filter and crop reference photos of one person.

Pure core: :func:`load_image` (EXIF rotation, any mode -> RGB), :func:`crop_face` (one image ->
:class:`FaceCrop` or :class:`Rejection`), :func:`downscale_photo`, :func:`find_duplicates` (set
level), :func:`choose_reference`. Thin shell: :func:`run` writes ``<out>/manifest.parquet``,
``photos/<name>.png`` (the upright photo, long side <= ``photo_max_side``), ``crops/<size>/<name>.png``,
``summary.txt`` and ``contact_sheet.png`` atomically. Every input photo gets a manifest row; rejections
carry a reason code (``unreadable``, ``image_too_small``, ``image_too_large``, ``no_face``,
``face_too_small``, ``extreme_pose``, ``too_blurry``, ``duplicate``) and a human-readable detail.
``<stem>.txt`` files are caption sidecars of the photos named ``<stem>.*``, not inputs.
Readers: :func:`read_accepted` (aligned crops) and :func:`read_photos` (photos, for training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.config import CropFacesConfig
from faceid.errors import InputError
from faceid.faces.detect import Aligner, Face, build_detector, estimate_yaw, select_main_face
from faceid.io import atomic_dir, progress, read_parquet, require_dir, sha256_file, write_parquet

QUALITY_SIZE = 150  # sharpness is measured on the aligned chip at this size (dlib's recogniser input)
CAPTION_SUFFIX = ".txt"  # <stem>.txt beside a photo is its caption
PHOTO_COLUMNS = ("photo_path", "photo_scale", "caption")  # what read_photos needs beyond the original manifest


class UnreadableImage(Exception):
    """A file that is not a decodable image (or is too large); becomes an ``unreadable`` rejection."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class LoadedImage:
    pixels: np.ndarray  # [H, W, 3] uint8 RGB, upright
    exif_rotated: bool
    had_alpha: bool


@dataclass(frozen=True)
class FaceCrop:
    face: Face
    face_index: int  # which detection was chosen as the main face
    num_faces: int
    landmarks: np.ndarray  # [5, 2] float32, image pixels
    crops: dict[int, np.ndarray]  # size -> aligned square RGB crop
    sharpness: float  # Laplacian variance of the aligned QUALITY_SIZE crop
    yaw: float  # degrees, rough


@dataclass(frozen=True, eq=False)  # eq=False: an ndarray field has no truth value
class PhotoRecord:
    """One accepted photo of a crop-faces output, as training reads it (coordinates in photo pixels)."""

    name: str
    photo_path: Path  # absolute: <crops>/photos/<name>.png
    sha256: str  # of the original input file
    box: tuple[float, float, float, float]  # face box x0, y0, x1, y1, photo pixels (may extend past the edges)
    landmarks: np.ndarray  # [5, 2] float32, photo pixels, dlib 5-point order; read-only
    sharpness: float  # Laplacian variance of the aligned QUALITY_SIZE crop
    yaw_degrees: float
    caption: str | None
    crop_path: Path  # absolute: the aligned crop at the largest size written


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str
    found: FaceCrop | None = None  # measurements of a face that failed a quality check


# --------------------------------------------------------------------------- pure core


def load_image(path: Path, max_pixels: int) -> LoadedImage:
    """Decode any PIL-readable photo upright (EXIF orientation applied) as RGB; alpha is composited on white."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise UnreadableImage(
                        "image_too_large", f"{im.width}x{im.height} px exceeds max_image_pixels {max_pixels}"
                    )
                im.load()
                exif_rotated = im.getexif().get(0x0112, 1) not in (0, 1)
                im = ImageOps.exif_transpose(im)
                had_alpha = "A" in im.getbands() or (im.mode == "P" and "transparency" in im.info)
                if had_alpha:
                    rgba = im.convert("RGBA")
                    im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
                pixels = np.asarray(im.convert("RGB"))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("unreadable", f"not an image PIL can decode ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt data
        raise UnreadableImage("unreadable", f"corrupt image data ({exc})") from exc
    return LoadedImage(np.ascontiguousarray(pixels), exif_rotated, had_alpha)


def sharpness(crop: np.ndarray) -> float:
    """Variance of the Laplacian of the grayscale crop (low = blurry)."""
    import cv2

    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def phash64(image: np.ndarray) -> int:
    """64-bit perceptual hash: signs of the 8x8 low-frequency DCT of a 32x32 grayscale thumbnail."""
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    thumb = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(thumb)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def crop_face(image: np.ndarray, detector, aligner: Aligner, cfg: CropFacesConfig) -> FaceCrop | Rejection:
    """Detect the main face of one RGB photo, align it, crop it at ``cfg.crop_sizes`` and check quality."""
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_face_size:
        return Rejection("image_too_small", f"image is {w}x{h} px, smaller than min_face_size {cfg.min_face_size} px")
    faces = detector.detect(image)
    if not faces:
        return Rejection("no_face", f"{detector.name} found no face (min_detection_confidence {cfg.min_detection_confidence})")
    index = select_main_face(faces, h, w)
    face = faces[index]
    sizes = tuple(sorted(set(cfg.crop_sizes) | {QUALITY_SIZE}))
    aligned = aligner.align(image, face, sizes, cfg.crop_padding)
    found = FaceCrop(
        face=face,
        face_index=index,
        num_faces=len(faces),
        landmarks=aligned.landmarks,
        crops=aligned.crops,
        sharpness=sharpness(aligned.crops[QUALITY_SIZE]),
        yaw=estimate_yaw(aligned.landmarks),
    )
    if face.size < cfg.min_face_size:
        return Rejection("face_too_small", f"face is {face.size:.0f} px, smaller than min_face_size {cfg.min_face_size} px", found)
    if abs(found.yaw) > cfg.max_yaw_degrees:
        return Rejection("extreme_pose", f"head yaw ~{found.yaw:.0f} deg exceeds max_yaw_degrees {cfg.max_yaw_degrees:g}", found)
    if found.sharpness < cfg.min_sharpness:
        return Rejection("too_blurry", f"sharpness {found.sharpness:.1f} below min_sharpness {cfg.min_sharpness:g}", found)
    return found


def downscale_photo(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """``(photo, scale)``: ``image`` shrunk (INTER_AREA) so its long side is ``max_side`` if longer
    (0 = keep full size; never enlarged). Photo px = image px * scale."""
    h, w = image.shape[:2]
    if max_side == 0 or max(h, w) <= max_side:
        return image, 1.0
    import cv2

    scale = max_side / max(h, w)
    size = (max_side, max(1, round(h * scale))) if w >= h else (max(1, round(w * scale)), max_side)
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def choose_reference(records: list[PhotoRecord]) -> PhotoRecord:
    """The identity's reference for VACE ``reference_images`` (use its ``crop_path``): sharp and frontal.

    Rule: among the records whose sharpness is at least the median sharpness of ``records``, the one
    with the smallest |yaw|; ties go to the higher sharpness, then to the lower name.
    """
    if not records:
        raise InputError("choose_reference: no photos to choose from (expected the accepted photos of read_photos)")
    median = float(np.median([r.sharpness for r in records]))
    sharp = [r for r in records if r.sharpness >= median]
    return min(sharp, key=lambda r: (abs(r.yaw_degrees), -r.sharpness, r.name))


def find_duplicates(hashes: list[int], ranks: list[tuple], max_distance: int) -> dict[int, int]:
    """``{index: index kept instead}`` for near-identical images (Hamming distance <= ``max_distance``).

    Within a group the image with the best rank (lowest tuple) is kept.
    """
    kept: list[int] = []
    duplicate_of: dict[int, int] = {}
    for i in sorted(range(len(hashes)), key=lambda k: ranks[k]):
        match = next((j for j in kept if bin(hashes[i] ^ hashes[j]).count("1") <= max_distance), None)
        if match is None:
            kept.append(i)
        else:
            duplicate_of[i] = match
    return duplicate_of


# --------------------------------------------------------------------------- I/O shell


def _list_inputs(input_dir: Path) -> tuple[list[Path], list[Path]]:
    """``(photos, caption sidecars)``: every visible file; ``.txt`` files are captions, not photos."""
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    photos = [p for p in files if p.suffix.lower() != CAPTION_SUFFIX]
    sidecars = [p for p in files if p.suffix.lower() == CAPTION_SUFFIX]
    if not photos:
        only = f"; found only caption sidecars: {', '.join(p.name for p in sidecars)}" if sidecars else ""
        raise InputError(f"{input_dir}: no photos (expected photos of one person: JPEG/PNG/WebP{only})")
    return photos, sidecars


def _read_captions(sidecars: list[Path]) -> dict[str, str]:
    """``{stem: caption}`` of ``<stem>.txt`` sidecars (UTF-8, stripped; empty ones left out)."""
    captions = {}
    for path in sidecars:
        try:
            text = path.read_text(encoding="utf-8-sig").strip()
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: caption sidecar is not UTF-8 text ({exc})") from exc
        if text:
            captions[path.stem] = text
    return captions


def _unique_names(files: list[Path]) -> list[str]:
    names, seen = [], set()
    for path in files:
        name = path.stem if path.stem not in seen else f"{path.stem}_{path.suffix.lstrip('.')}"
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names


def _row(path: Path, name: str, sizes: tuple[int, ...]) -> dict:
    row = {
        "path": path.name, "name": name, "sha256": sha256_file(path), "status": "rejected", "reason": None,
        "detail": None, "width": None, "height": None, "exif_rotated": None, "num_faces": None, "face_index": None,
        "box": None, "det_score": None, "face_size": None, "landmarks": None, "sharpness": None,
        "yaw_degrees": None, "phash": None, "duplicate_of": None, "caption": None, "photo_path": None,
        "photo_scale": None,
    }
    row.update({f"crop_{s}": None for s in sizes})
    return row


def _manifest_schema(sizes: tuple[int, ...]):
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("name", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
        ("reason", pa.string()), ("detail", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("exif_rotated", pa.bool_()), ("num_faces", pa.int32()), ("face_index", pa.int32()),
        ("box", pa.list_(pa.float32())), ("det_score", pa.float32()), ("face_size", pa.float32()),
        ("landmarks", pa.list_(pa.float32())), ("sharpness", pa.float32()), ("yaw_degrees", pa.float32()),
        ("phash", pa.string()), ("duplicate_of", pa.string()), ("caption", pa.string()),
        ("photo_path", pa.string()), ("photo_scale", pa.float64()),
    ]
    fields += [(f"crop_{s}", pa.string()) for s in sizes]
    return pa.schema(fields)


def _thumb(result: FaceCrop | Rejection | None, image: np.ndarray | None, size: int = 128) -> np.ndarray:
    import cv2

    found = result if isinstance(result, FaceCrop) else getattr(result, "found", None)
    if found is not None:
        return cv2.resize(found.crops[QUALITY_SIZE], (size, size), interpolation=cv2.INTER_AREA)
    tile = np.full((size, size, 3), 96, np.uint8)
    if image is not None:
        h, w = image.shape[:2]
        s = size / max(h, w)
        small = cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        y, x = (size - small.shape[0]) // 2, (size - small.shape[1]) // 2
        tile[y:y + small.shape[0], x:x + small.shape[1]] = small
    return tile


def contact_sheet(tiles: list[tuple[np.ndarray, str, str, bool]], columns: int = 6):
    """PIL image: one 128 px tile per input, green frame accepted / red rejected, name and reason below."""
    from PIL import Image, ImageDraw

    tile, label, pad = 128, 30, 4
    cols = max(1, min(columns, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    sheet = Image.new("RGB", (cols * (tile + 2 * pad), rows * (tile + 2 * pad + label)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (thumb, name, note, ok) in enumerate(tiles):
        x, y = (k % cols) * (tile + 2 * pad), (k // cols) * (tile + 2 * pad + label)
        draw.rectangle([x, y, x + tile + 2 * pad - 1, y + tile + 2 * pad - 1], fill=(40, 160, 60) if ok else (200, 40, 40))
        sheet.paste(Image.fromarray(thumb), (x + pad, y + pad))
        draw.text((x + pad, y + tile + 2 * pad + 1), name[:22], fill=(0, 0, 0))
        draw.text((x + pad, y + tile + 2 * pad + 14), note[:22], fill=(0, 0, 0) if ok else (200, 40, 40))
    return sheet


def run(cfg: CropFacesConfig, input_dir: Path, output_dir: Path) -> dict:
    """Crop every photo in ``input_dir``; write the manifest, photos, crops, summary and contact sheet to ``output_dir``."""
    from PIL import Image

    # 1. Check inputs
    input_dir = require_dir(input_dir, "a folder of photos of one person")
    files, sidecars = _list_inputs(input_dir)
    captions = _read_captions(sidecars)
    unused = [p.name for p in sidecars if p.stem not in {f.stem for f in files}]
    names = _unique_names(files)
    sizes = tuple(sorted(set(cfg.crop_sizes)))

    with atomic_dir(output_dir) as tmp:  # nothing appears at output_dir unless every step succeeds
        # 2. Per image: decode once, detect, align, quality; the photo of each image that passes is written now
        (tmp / "photos").mkdir()
        detector, aligner = build_detector(cfg.detector, cfg.min_detection_confidence), Aligner()
        rows, results, tiles, hashes, photo_scales = [], [], [], {}, {}
        try:
            for path, name in progress(list(zip(files, names)), desc="crop-faces"):
                row = _row(path, name, sizes)
                row["caption"] = captions.get(path.stem)
                image = None
                try:
                    loaded = load_image(path, cfg.max_image_pixels)
                    image = loaded.pixels
                    row.update(height=image.shape[0], width=image.shape[1], exif_rotated=loaded.exif_rotated)
                    result = crop_face(image, detector, aligner, cfg)
                    phash = phash64(image)
                    row["phash"] = f"{phash:016x}"
                    hashes[len(rows)] = (phash, (-image.shape[0] * image.shape[1], loaded.had_alpha, name))
                except UnreadableImage as exc:
                    result = Rejection(exc.reason, exc.detail)
                found = result if isinstance(result, FaceCrop) else result.found
                if found is not None:
                    row.update(
                        num_faces=found.num_faces, face_index=found.face_index, box=list(found.face.box),
                        det_score=found.face.score, face_size=found.face.size, landmarks=found.landmarks.flatten().tolist(),
                        sharpness=found.sharpness, yaw_degrees=found.yaw,
                    )
                if isinstance(result, Rejection):
                    row.update(reason=result.reason, detail=result.detail)
                else:
                    photo, photo_scales[len(rows)] = downscale_photo(image, cfg.photo_max_side)
                    Image.fromarray(photo).save(tmp / "photos" / f"{name}.png", compress_level=1)
                rows.append(row)
                results.append(result)
                tiles.append(_thumb(result, image))
        finally:
            detector.close()

        # 3. Duplicates among the images that passed the per-image checks (keep the largest; no alpha first)
        candidates = [i for i, r in enumerate(results) if isinstance(r, FaceCrop)]
        dups = find_duplicates([hashes[i][0] for i in candidates], [hashes[i][1] for i in candidates], cfg.duplicate_max_distance)
        for k, kept in dups.items():
            i, j = candidates[k], candidates[kept]
            rows[i].update(reason="duplicate", detail=f"near-identical to {rows[j]['path']} (perceptual hash)", duplicate_of=rows[j]["path"])
            results[i] = Rejection("duplicate", rows[i]["detail"], results[i])
            (tmp / "photos" / f"{rows[i]['name']}.png").unlink()
        accepted = [i for i, r in enumerate(results) if isinstance(r, FaceCrop)]

        # 4. Enough usable photos?
        if len(accepted) < cfg.min_photos:
            listing = "\n".join(f"  {r['path']}: {r['reason']}: {r['detail']}" for r in rows if r["reason"])
            raise InputError(
                f"{input_dir}: only {len(accepted)} usable photo(s) of {len(rows)}, crop_faces.min_photos is {cfg.min_photos}. "
                f"Rejected:\n{listing or '  (none)'}"
            )

        # 5. Write crops, manifest, summary, contact sheet
        counts: dict[str, int] = {}
        for r in rows:
            if r["reason"]:
                counts[r["reason"]] = counts.get(r["reason"], 0) + 1
        rejected_text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        line = f"crop-faces: {len(accepted)}/{len(rows)} photos accepted" + (f" (rejected: {rejected_text})" if counts else "") + f" -> {output_dir}"
        for size in sizes:
            (tmp / "crops" / str(size)).mkdir(parents=True)
        for i in accepted:
            rows[i].update(status="accepted", photo_path=f"photos/{rows[i]['name']}.png", photo_scale=photo_scales[i])
            for size in sizes:
                rel = f"crops/{size}/{rows[i]['name']}.png"
                Image.fromarray(results[i].crops[size]).save(tmp / rel)
                rows[i][f"crop_{size}"] = rel
        write_parquet(tmp / "manifest.parquet", rows, schema=_manifest_schema(sizes))
        details = [
            f"  {r['status']:8s} {r['path']}: "
            + (f"{r['reason']}: {r['detail']}" if r["reason"] else f"face {r['face_size']:.0f} px, sharpness {r['sharpness']:.0f}, yaw {r['yaw_degrees']:.0f} deg")
            + (f" (main face of {r['num_faces']})" if (r["num_faces"] or 0) > 1 else "")
            + (" (captioned)" if r["caption"] else "")
            for r in rows
        ]
        details += [f"  unused   {n}: caption sidecar without a photo named {Path(n).stem}.*" for n in unused]
        (tmp / "summary.txt").write_text("\n".join([line, *details]) + "\n")
        notes = [(t, r["name"], "accepted" if i in accepted else r["reason"], i in accepted) for i, (t, r) in enumerate(zip(tiles, rows))]
        contact_sheet(notes).save(tmp / "contact_sheet.png")
    print(line)
    return {
        "accepted": len(accepted), "rejected": len(rows) - len(accepted), "reasons": counts,
        "unused_sidecars": unused, "output": str(output_dir),
    }


def read_accepted(crops_dir: Path, size: int) -> list[tuple[str, Path]]:
    """``[(name, crop path)]`` of the accepted photos of a crop_faces output at ``size`` (exact size if
    written, else the smallest larger one: every size shares the same framing)."""
    crops_dir = require_dir(crops_dir, "a crop-faces output folder")
    rows = [r for r in read_parquet(crops_dir / "manifest.parquet") if r["status"] == "accepted"]
    available = sorted(int(k[len("crop_"):]) for k in (rows[0] if rows else {}) if k.startswith("crop_"))
    larger = [s for s in available if s >= size]
    if not larger:
        raise InputError(f"{crops_dir}: crops of size >= {size} px needed, found {available or 'none'} (crop_faces.crop_sizes)")
    chosen = larger[0]
    return [(r["name"], crops_dir / r[f"crop_{chosen}"]) for r in rows]


def read_photos(crops_dir: Path) -> list[PhotoRecord]:
    """The accepted photos of a crop_faces output, in manifest order, with box and landmarks scaled to
    photo pixels (``photo_scale``) and ``crop_path`` the aligned crop at the largest size written."""
    crops_dir = require_dir(crops_dir, "a crop-faces output folder").resolve()
    rows = read_parquet(crops_dir / "manifest.parquet")
    missing = [c for c in PHOTO_COLUMNS if rows and c not in rows[0]]
    if missing:
        raise InputError(
            f"{crops_dir}: manifest.parquet lacks column(s) {', '.join(missing)}: written by an older crop-faces; rerun crop-faces"
        )
    sizes = sorted(int(k[len("crop_"):]) for k in (rows[0] if rows else {}) if k.startswith("crop_"))
    if rows and not sizes:
        raise InputError(f"{crops_dir}: manifest.parquet has no crop_<size> column (crop_faces.crop_sizes is empty?)")
    records = []
    for r in (r for r in rows if r["status"] == "accepted"):
        photo, crop_path = crops_dir / r["photo_path"], crops_dir / r[f"crop_{sizes[-1]}"]
        for path, what in ((photo, "photo"), (crop_path, "aligned crop")):
            if not path.is_file():
                raise InputError(f"{crops_dir}: {what} {path.relative_to(crops_dir)} of accepted {r['path']} is missing; rerun crop-faces")
        scale = float(r["photo_scale"])
        landmarks = np.asarray(r["landmarks"], np.float32).reshape(5, 2) * np.float32(scale)
        landmarks.flags.writeable = False
        records.append(PhotoRecord(
            name=r["name"], photo_path=photo, sha256=r["sha256"], box=tuple(float(v) * scale for v in r["box"]),
            landmarks=landmarks, sharpness=float(r["sharpness"]), yaw_degrees=float(r["yaw_degrees"]),
            caption=r["caption"], crop_path=crop_path,
        ))
    return records
