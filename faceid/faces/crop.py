"""``faceid crop-faces``: detect, align, quality-filter and crop reference photos of one person.

Pure core: :func:`load_image` (EXIF rotation, any mode -> RGB), :func:`crop_face` (one image ->
:class:`FaceCrop` or :class:`Rejection`), :func:`find_duplicates` (set level). Thin shell:
:func:`run` writes ``<out>/manifest.parquet``, ``crops/<size>/<name>.png``, ``summary.txt`` and
``contact_sheet.png`` atomically. Every input file gets a manifest row; rejections carry a reason
code (``unreadable``, ``image_too_small``, ``image_too_large``, ``no_face``, ``face_too_small``,
``extreme_pose``, ``too_blurry``, ``duplicate``) and a human-readable detail.
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


def _list_inputs(input_dir: Path) -> list[Path]:
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"{input_dir}: no files (expected photos of one person: JPEG/PNG/WebP)")
    return files


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
        "yaw_degrees": None, "phash": None, "duplicate_of": None,
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
        ("phash", pa.string()), ("duplicate_of", pa.string()),
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
    """Crop every photo in ``input_dir``; write the manifest, crops, summary and contact sheet to ``output_dir``."""
    from PIL import Image

    # 1. Check inputs
    input_dir = require_dir(input_dir, "a folder of photos of one person")
    files = _list_inputs(input_dir)
    names = _unique_names(files)
    sizes = tuple(sorted(set(cfg.crop_sizes)))

    # 2. Per image: decode, detect, align, quality
    detector, aligner = build_detector(cfg.detector, cfg.min_detection_confidence), Aligner()
    rows, results, tiles, hashes = [], [], [], {}
    try:
        for path, name in progress(list(zip(files, names)), desc="crop-faces"):
            row = _row(path, name, sizes)
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
    accepted = [i for i, r in enumerate(results) if isinstance(r, FaceCrop)]

    # 4. Enough usable photos?
    if len(accepted) < cfg.min_photos:
        listing = "\n".join(f"  {r['path']}: {r['reason']}: {r['detail']}" for r in rows if r["reason"])
        raise InputError(
            f"{input_dir}: only {len(accepted)} usable photo(s) of {len(rows)}, crop_faces.min_photos is {cfg.min_photos}. "
            f"Rejected:\n{listing or '  (none)'}"
        )

    # 5. Write everything atomically
    counts: dict[str, int] = {}
    for r in rows:
        if r["reason"]:
            counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    rejected_text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    line = f"crop-faces: {len(accepted)}/{len(rows)} photos accepted" + (f" (rejected: {rejected_text})" if counts else "") + f" -> {output_dir}"
    with atomic_dir(output_dir) as tmp:
        for size in sizes:
            (tmp / "crops" / str(size)).mkdir(parents=True)
        for i in accepted:
            rows[i]["status"] = "accepted"
            for size in sizes:
                rel = f"crops/{size}/{rows[i]['name']}.png"
                Image.fromarray(results[i].crops[size]).save(tmp / rel)
                rows[i][f"crop_{size}"] = rel
        write_parquet(tmp / "manifest.parquet", rows, schema=_manifest_schema(sizes))
        details = [
            f"  {r['status']:8s} {r['path']}: "
            + (f"{r['reason']}: {r['detail']}" if r["reason"] else f"face {r['face_size']:.0f} px, sharpness {r['sharpness']:.0f}, yaw {r['yaw_degrees']:.0f} deg")
            + (f" (main face of {r['num_faces']})" if (r["num_faces"] or 0) > 1 else "")
            for r in rows
        ]
        (tmp / "summary.txt").write_text("\n".join([line, *details]) + "\n")
        notes = [(t, r["name"], "accepted" if i in accepted else r["reason"], i in accepted) for i, (t, r) in enumerate(zip(tiles, rows))]
        contact_sheet(notes).save(tmp / "contact_sheet.png")
    print(line)
    return {"accepted": len(accepted), "rejected": len(rows) - len(accepted), "reasons": counts, "output": str(output_dir)}


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
