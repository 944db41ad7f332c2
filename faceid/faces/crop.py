"""``faceid crop-faces``: detect, align, quality-filter and crop reference photos of one person.

Pure core: :func:`load_image` (EXIF rotation, every PIL mode -> 8-bit RGB, 16/32-bit and float
scaled by their real range), :func:`crop_face` (one image -> :class:`FaceCrop` or :class:`Rejection`),
:func:`downscale_photo`, :func:`find_duplicates` (set level), :func:`choose_reference`. Thin shell:
:func:`run` writes ``<out>/manifest.parquet``, ``photos/<name>.png`` (the upright photo, long side <=
``photo_max_side``), ``crops/<size>/<name>.png``, ``other_faces.parquet`` + ``other_faces/<size>/<name>.<k>.png``
(the extra candidate faces of photos with several faces), ``summary.txt`` and ``contact_sheet.png``
atomically. Every input photo gets a manifest row; rejections carry a reason code (``unreadable``,
``image_too_small``, ``image_too_large``, ``blank_image`` (no face, and the image is almost uniform),
``no_face``, ``face_too_small``, ``extreme_pose``, ``too_blurry``, ``duplicate``) and a human-readable detail.
``<stem>.txt`` files are caption sidecars of the photos named ``<stem>.*``, not inputs. While one
photo is detected, the next decodes on a thread and PNGs are written on two more (:func:`run`).
:func:`run_many` crops a folder of identity folders as one job, the models loaded once
(:func:`holds_identities`, :mod:`faceid.faces.many`).

Photos with several faces: the largest face is not necessarily the person (a group photo with a
stranger in front). crop-faces keeps every face that passes the checks, up to ``MAX_FACES``:
candidate 0 in the manifest's face columns and ``crops/``, candidates 1.. in ``other_faces``;
embed-faces decides which one is the person (``face`` column of its embeddings.parquet).
Readers: :func:`read_accepted` (main-face crops), :func:`read_candidates` (every candidate's crop,
for embed-faces) and :func:`read_photos` (photos, for training; with the embed-faces folder it
returns the face embed-faces chose).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from faceid.config import CropFacesConfig
from faceid.errors import InputError
from faceid.faces.detect import Aligner, Face, build_detector, detection_copy, estimate_yaw, rank_faces
from faceid.faces.many import each_identity, identity_folders
from faceid.io import atomic_dir, output_lock, progress, read_parquet, require_dir, sha256_file, write_parquet, write_png
from faceid.outputs import check_folder, in_place, mark

STAGE = "crop_faces"  # its name in faceid.outputs
QUALITY_SIZE = 150  # sharpness is measured on the aligned chip at this size (dlib's recogniser input)
MAX_FACES = 4  # faces of one photo kept as candidates for embed-faces (the main face and 3 others)
BLANK_MAX_STD = 3.0  # grey levels: an image with no face and a smaller std "looks blank" (blank_image)
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
    frames: int = 1  # frames (or pages) in the file: an animated GIF/WebP/PNG or a multi-page TIFF has > 1; the first is used


@dataclass(frozen=True)
class FaceCrop:
    face: Face
    face_index: int  # which detection (of num_faces) this face is
    num_faces: int
    landmarks: np.ndarray  # [5, 2] float32, image pixels
    crops: dict[int, np.ndarray]  # size -> aligned square RGB crop
    sharpness: float  # Laplacian variance of the aligned QUALITY_SIZE crop
    yaw: float  # degrees, rough
    # the photo's other faces that pass the same checks (candidates 1, 2, ... in main-face order, at
    # most MAX_FACES - 1): embed-faces picks the one that is the person
    others: tuple[FaceCrop, ...] = ()


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


def to_uint8(values: np.ndarray, is_float: bool) -> np.ndarray:
    """A single-channel image of 16-bit, 32-bit integer or float samples as uint8, scaled by its real
    range, never clipped: black stays 0 (or the minimum, if negative) and the top is the image's
    maximum; but floats within [0, 1] are read as [0, 1], and samples within [0, 255] as 8-bit values.
    (PIL's own ``convert("L")`` clips at 255: a 16-bit photo turns almost all white.) NaN/inf
    samples (float images) count as black."""
    a = np.asarray(values, np.float64)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, min(0.0, float(a[finite].min())) if finite.any() else 0.0)
    lo, hi = min(0.0, float(a.min())), float(a.max())
    if is_float and lo == 0.0 and hi <= 1.0:
        hi = 1.0
    elif lo == 0.0 and hi <= 255.0:
        hi = 255.0
    if hi <= lo:  # one value throughout: mid grey rather than a division by zero
        return np.full(a.shape, 128, np.uint8)
    return np.clip(np.rint((a - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


def _to_rgb(im) -> tuple[np.ndarray, bool]:
    """``(pixels [H, W, 3] uint8, had_alpha)`` of a decoded PIL image of any mode: 1, L, P, RGB, CMYK,
    YCbCr, LAB, HSV via PIL; I;16 (and I;16B/L/N), I and F scaled by :func:`to_uint8`; alpha (LA, La,
    PA, RGBA, RGBa, P or L/RGB with a transparent colour) composited on white."""
    from PIL import Image

    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = to_uint8(np.asarray(im), is_float=im.mode == "F")
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2)), False
    had_alpha = bool(im.has_transparency_data)
    try:
        if im.mode == "La":  # premultiplied: PIL converts it to LA only
            im = im.convert("LA")
        if had_alpha:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        pixels = np.asarray(im if im.mode == "RGB" else im.convert("RGB"))  # convert("RGB") copies an RGB image
    except ValueError as exc:  # a mode PIL cannot convert
        raise UnreadableImage("unreadable", f"image mode {im.mode} cannot be converted to RGB ({exc})") from exc
    return np.ascontiguousarray(pixels), had_alpha


def load_image(path: Path, max_pixels: int) -> LoadedImage:
    """Decode any PIL-readable photo upright (EXIF orientation applied) as 8-bit RGB (:func:`_to_rgb`).
    An animated image or a multi-page file gives its first frame (``frames`` counts them: the
    manifest and summary.txt say which frame was used)."""
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
                frames = int(getattr(im, "n_frames", 1) or 1)  # counting seeks; back to frame 0 to decode it
                if frames > 1:
                    im.seek(0)
                im.load()
                exif_rotated = im.getexif().get(0x0112, 1) not in (0, 1)
                # exif_transpose copies the image even when there is nothing to turn: call it only then
                pixels, had_alpha = _to_rgb(ImageOps.exif_transpose(im) if exif_rotated else im)
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as exc:
        raise UnreadableImage("image_too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise UnreadableImage("unreadable", f"not an image PIL can decode ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # truncated/corrupt data
        raise UnreadableImage("unreadable", f"corrupt image data ({exc})") from exc
    return LoadedImage(pixels, exif_rotated, had_alpha, frames)


def frames_note(frames: int | None) -> str:
    """What the manifest and summary say of a file with several frames or pages (none for one)."""
    return f"first of {frames} frames used (animated or multi-page image)" if (frames or 1) > 1 else ""


def grey_std(image: np.ndarray) -> float:
    """Standard deviation of the grey levels of an RGB uint8 image (on a <= 512 px copy)."""
    import cv2

    h, w = image.shape[:2]
    step = max(1, max(h, w) // 512)
    return float(cv2.cvtColor(np.ascontiguousarray(image[::step, ::step]), cv2.COLOR_RGB2GRAY).std())


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


def _check_face(image: np.ndarray, faces: list[Face], index: int, aligner: Aligner, cfg: CropFacesConfig) -> FaceCrop | Rejection:
    """Align detection ``index``, crop it at ``cfg.crop_sizes`` and check its size, yaw and sharpness."""
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


def crop_face(image: np.ndarray, detector, aligner: Aligner, cfg: CropFacesConfig,
              small: tuple[np.ndarray, float] | None = None) -> FaceCrop | Rejection:
    """Detect the faces of one RGB photo, align them, crop them at ``cfg.crop_sizes`` and check quality.

    Faces are tried in main-face order (largest, preferring central ones); the first that passes the
    checks is the returned crop, and up to ``MAX_FACES - 1`` more that pass are kept in
    ``FaceCrop.others``: size does not say *who* a face is, so embed-faces picks the person's face
    among them. The photo is rejected only when no face passes, with the main face's reason. No face
    at all on an almost uniform image (grey-level std < ``BLANK_MAX_STD``) is ``blank_image``.
    ``small``: :func:`faceid.faces.detect.detection_copy` of ``image``, if the caller made it already.
    """
    h, w = image.shape[:2]
    if min(h, w) < cfg.min_face_size:
        return Rejection("image_too_small", f"image is {w}x{h} px, smaller than min_face_size {cfg.min_face_size} px")
    faces = detector.detect(image, small)
    if not faces:
        std = grey_std(image)
        if std < BLANK_MAX_STD:
            return Rejection("blank_image", f"image looks blank: almost uniform (grey-level std {std:.1f} < {BLANK_MAX_STD:g}), "
                                            "nothing to detect a face in")
        return Rejection("no_face", f"{detector.name} found no face (min_detection_confidence {cfg.min_detection_confidence})")
    passing, first_rejection = [], None
    for index in rank_faces(faces, h, w):
        result = _check_face(image, faces, index, aligner, cfg)
        if isinstance(result, Rejection):
            first_rejection = first_rejection or result
            continue
        passing.append(result)
        if len(passing) == MAX_FACES:
            break
    if not passing:
        return first_rejection
    return dataclasses.replace(passing[0], others=tuple(passing[1:]))


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
        "num_candidates": None, "box": None, "det_score": None, "face_size": None, "landmarks": None, "sharpness": None,
        "yaw_degrees": None, "phash": None, "duplicate_of": None, "caption": None, "photo_path": None,
        "photo_scale": None, "frames": None,
    }
    row.update({f"crop_{s}": None for s in sizes})
    return row


def _manifest_schema(sizes: tuple[int, ...]):
    import pyarrow as pa

    fields = [
        ("path", pa.string()), ("name", pa.string()), ("sha256", pa.string()), ("status", pa.string()),
        ("reason", pa.string()), ("detail", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("exif_rotated", pa.bool_()), ("num_faces", pa.int32()), ("face_index", pa.int32()),
        ("num_candidates", pa.int32()), ("box", pa.list_(pa.float32())), ("det_score", pa.float32()), ("face_size", pa.float32()),
        ("landmarks", pa.list_(pa.float32())), ("sharpness", pa.float32()), ("yaw_degrees", pa.float32()),
        ("phash", pa.string()), ("duplicate_of", pa.string()), ("caption", pa.string()),
        ("photo_path", pa.string()), ("photo_scale", pa.float64()), ("frames", pa.int32()),
    ]
    fields += [(f"crop_{s}", pa.string()) for s in sizes]
    return pa.schema(fields)


def _face_columns(found: FaceCrop) -> dict:
    return {
        "face_index": found.face_index, "box": list(found.face.box), "det_score": found.face.score,
        "face_size": found.face.size, "landmarks": found.landmarks.flatten().tolist(), "sharpness": found.sharpness,
        "yaw_degrees": found.yaw,
    }


def _other_faces_schema(sizes: tuple[int, ...]):
    """other_faces.parquet: one row per extra candidate face of an accepted photo (candidate >= 1)."""
    import pyarrow as pa

    fields = [
        ("name", pa.string()), ("candidate", pa.int32()), ("face_index", pa.int32()), ("box", pa.list_(pa.float32())),
        ("det_score", pa.float32()), ("face_size", pa.float32()), ("landmarks", pa.list_(pa.float32())),
        ("sharpness", pa.float32()), ("yaw_degrees", pa.float32()),
    ]
    fields += [(f"crop_{s}", pa.string()) for s in sizes]
    return pa.schema(fields)


def _faces_note(row: dict) -> str:
    """`` (3 faces: 2 candidates for embed-faces)`` for a photo with several faces."""
    if (row["num_faces"] or 0) < 2:
        return ""
    if row["status"] != "accepted":
        return f" (main face of {row['num_faces']})"
    if row["num_candidates"] > 1:
        return f" ({row['num_faces']} faces: {row['num_candidates']} candidates, embed-faces picks the person's)"
    return f" (the one of {row['num_faces']} faces that passes the checks)"


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


def crops_sheet(tiles: list[tuple[np.ndarray, str, str, bool]], columns: int = 6):
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


@contextlib.contextmanager
def face_models(cfg: CropFacesConfig) -> Iterator[tuple[object, Aligner]]:
    """``(detector, aligner)`` of ``cfg`` for the block, the detector closed after it: build them once
    and pass them to any number of :func:`run` calls (:func:`run_many` does)."""
    detector = build_detector(cfg.detector, cfg.min_detection_confidence)
    try:
        yield detector, Aligner()
    finally:
        detector.close()


@dataclass(frozen=True, eq=False)
class _Decoded:
    """A photo decoded, with the downscaled copies every step works on (crop-faces' reading thread)."""

    loaded: LoadedImage
    photo: np.ndarray  # long side <= photo_max_side: written as photos/<name>.png; perceptual hash, contact sheet tile
    photo_scale: float
    detection: tuple[np.ndarray, float]  # faceid.faces.detect.detection_copy


def _decode(path: Path, cfg: CropFacesConfig) -> _Decoded | UnreadableImage:
    try:
        loaded = load_image(path, cfg.max_image_pixels)
    except UnreadableImage as exc:
        return exc
    photo, scale = downscale_photo(loaded.pixels, cfg.photo_max_side)
    return _Decoded(loaded, photo, scale, detection_copy(loaded.pixels))


def _read_ahead(pool: ThreadPoolExecutor, paths: list[Path], cfg: CropFacesConfig) -> Iterator[_Decoded | UnreadableImage]:
    """:func:`_decode` of each path in order; the next photo decodes on ``pool`` while the caller works
    on this one (PIL decoding and OpenCV resizing run without the GIL)."""
    pending = pool.submit(_decode, paths[0], cfg) if paths else None
    for k in range(len(paths)):
        current = pending.result()
        if k + 1 < len(paths):
            pending = pool.submit(_decode, paths[k + 1], cfg)
        yield current


class _PngWriter:
    """Writes PNG files (:func:`faceid.io.write_png`) on ``pool``, where they run without the GIL. At
    most ``depth`` images wait, so memory stays bounded; :meth:`wait` returns once every file is written
    and raises the first error."""

    def __init__(self, pool: ThreadPoolExecutor, depth: int = 8):
        self._pool, self._depth, self._pending = pool, depth, collections.deque()

    def save(self, pixels: np.ndarray, path: Path) -> None:
        self._pending.append(self._pool.submit(write_png, path, pixels))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def wait(self) -> None:
        while self._pending:
            self._pending.popleft().result()


def _face_paths(name: str, candidate: int, sizes: tuple[int, ...]) -> dict[int, str]:
    """``{size: path relative to the output}`` of a face's crops: the main face (candidate 0) in
    ``crops/``, the photo's other candidate faces in ``other_faces/``."""
    if candidate == 0:
        return {s: f"crops/{s}/{name}.png" for s in sizes}
    return {s: f"other_faces/{s}/{name}.{candidate}.png" for s in sizes}


def run(cfg: CropFacesConfig, input_dir: Path, output_dir: Path, lock_wait: float = 0.0, models=None,
        desc: str = "crop-faces") -> dict:
    """Crop every photo in ``input_dir``; write the manifest, photos, crops, summary and contact sheet to
    ``output_dir``. ``models``: ``(detector, aligner)`` from :func:`face_models`, shared between runs;
    None builds them here, once the output lock is held. ``desc`` labels the progress bar."""
    # 1. Check inputs; the output: new, empty or an earlier crop-faces output, apart from the input (faceid.outputs)
    input_dir = require_dir(input_dir, "a folder of photos of one person")
    output_dir = check_folder(STAGE, output_dir, [input_dir])
    files, sidecars = _list_inputs(input_dir)
    captions = _read_captions(sidecars)
    unused = [p.name for p in sidecars if p.stem not in {f.stem for f in files}]
    names = _unique_names(files)
    sizes = tuple(sorted(set(cfg.crop_sizes)))

    # one writer (faceid.io.output_lock); nothing appears at output_dir unless every step succeeds; the
    # threads decode the next photo and write PNGs while this one detects (closed before tmp is renamed)
    with (
        output_lock("crop-faces", output_dir, lock_wait),
        atomic_dir(output_dir) as tmp,
        (face_models(cfg) if models is None else contextlib.nullcontext(models)) as (detector, aligner),
        ThreadPoolExecutor(1, thread_name_prefix="crop-faces-read") as reader,
        ThreadPoolExecutor(2, thread_name_prefix="crop-faces-write") as write_pool,
    ):
        # 2. Per image: decode once (one photo ahead, on the reading thread), detect, align, quality; the
        #    photo and crops of each image that passes are written now (on the writing threads)
        writer = _PngWriter(write_pool)
        mark(tmp, STAGE)
        (tmp / "photos").mkdir()
        for size in sizes:
            (tmp / "crops" / str(size)).mkdir(parents=True)
        rows, results, tiles, hashes, photo_scales = [], [], [], {}, {}
        for path, name, decoded in progress(zip(files, names, _read_ahead(reader, files, cfg)), total=len(files), desc=desc):
            row = _row(path, name, sizes)
            row["caption"] = captions.get(path.stem)
            photo = None
            if isinstance(decoded, UnreadableImage):
                result = Rejection(decoded.reason, decoded.detail)
            else:
                image, photo, photo_scales[len(rows)] = decoded.loaded.pixels, decoded.photo, decoded.photo_scale
                row.update(height=image.shape[0], width=image.shape[1], exif_rotated=decoded.loaded.exif_rotated,
                           frames=decoded.loaded.frames)
                result = crop_face(image, detector, aligner, cfg, small=decoded.detection)
                phash = phash64(photo)  # a 32x32 area average: of the photo copy as of the full image
                row["phash"] = f"{phash:016x}"
                hashes[len(rows)] = (phash, (-image.shape[0] * image.shape[1], decoded.loaded.had_alpha, name))
            found = result if isinstance(result, FaceCrop) else result.found
            if found is not None:
                row.update(num_faces=found.num_faces, num_candidates=1 + len(found.others), **_face_columns(found))
            if isinstance(result, Rejection):
                row.update(reason=result.reason, detail=result.detail)
            else:
                writer.save(photo, tmp / "photos" / f"{name}.png")
                for k, face in enumerate((result, *result.others)):
                    for size, rel in _face_paths(name, k, sizes).items():
                        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                        writer.save(face.crops[size], tmp / rel)
            rows.append(row)
            results.append(result)
            tiles.append(_thumb(result, photo))
        writer.wait()

        # 3. Duplicates among the images that passed the per-image checks (keep the largest; no alpha first)
        candidates = [i for i, r in enumerate(results) if isinstance(r, FaceCrop)]
        dups = find_duplicates([hashes[i][0] for i in candidates], [hashes[i][1] for i in candidates], cfg.duplicate_max_distance)
        for k, kept in dups.items():
            i, j = candidates[k], candidates[kept]
            rows[i].update(reason="duplicate", detail=f"near-identical to {rows[j]['path']} (perceptual hash)", duplicate_of=rows[j]["path"])
            for c in range(1 + len(results[i].others)):
                for rel in _face_paths(rows[i]["name"], c, sizes).values():
                    (tmp / rel).unlink()
            (tmp / "photos" / f"{rows[i]['name']}.png").unlink()
            results[i] = Rejection("duplicate", rows[i]["detail"], results[i])
        accepted = [i for i, r in enumerate(results) if isinstance(r, FaceCrop)]

        # 4. Enough usable photos?
        if len(accepted) < cfg.min_photos:
            listing = "\n".join(f"  {r['path']}: {r['reason']}: {r['detail']}" for r in rows if r["reason"])
            raise InputError(
                f"{input_dir}: only {len(accepted)} usable photo(s) of {len(rows)}, crop_faces.min_photos is {cfg.min_photos}. "
                f"Rejected:\n{listing or '  (none)'}"
            )

        # 5. Write manifest, summary, contact sheet (photos and crops are written)
        counts: dict[str, int] = {}
        for r in rows:
            if r["reason"]:
                counts[r["reason"]] = counts.get(r["reason"], 0) + 1
        rejected_text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        line = f"crop-faces: {len(accepted)}/{len(rows)} photos accepted" + (f" (rejected: {rejected_text})" if counts else "") + f" -> {output_dir}"
        other_rows = []
        for i in accepted:
            rows[i].update(status="accepted", photo_path=f"photos/{rows[i]['name']}.png", photo_scale=photo_scales[i],
                           detail=frames_note(rows[i]["frames"]) or None)  # an animated image: which frame
            rows[i].update({f"crop_{size}": rel for size, rel in _face_paths(rows[i]["name"], 0, sizes).items()})
            for k, other in enumerate(results[i].others, start=1):  # a photo with several faces: the candidates
                other_rows.append({"name": rows[i]["name"], "candidate": k, **_face_columns(other)})
                other_rows[-1].update({f"crop_{size}": rel for size, rel in _face_paths(rows[i]["name"], k, sizes).items()})
        write_parquet(tmp / "manifest.parquet", rows, schema=_manifest_schema(sizes))
        write_parquet(tmp / "other_faces.parquet", other_rows, schema=_other_faces_schema(sizes))
        details = [
            f"  {r['status']:8s} {r['path']}: "
            + (f"{r['reason']}: {r['detail']}" if r["reason"] else f"face {r['face_size']:.0f} px, sharpness {r['sharpness']:.0f}, yaw {r['yaw_degrees']:.0f} deg")
            + _faces_note(r)
            + (f" ({frames_note(r['frames'])})" if frames_note(r["frames"]) else "")
            + (" (captioned)" if r["caption"] else "")
            for r in rows
        ]
        details += [f"  unused   {n}: caption sidecar without a photo named {Path(n).stem}.*" for n in unused]
        (tmp / "summary.txt").write_text("\n".join([line, *details]) + "\n")
        notes = [(t, r["name"], "accepted" if i in accepted else r["reason"], i in accepted) for i, (t, r) in enumerate(zip(tiles, rows))]
        write_png(tmp / "contact_sheet.png", np.asarray(crops_sheet(notes)))
    print(line)
    return {
        "accepted": len(accepted), "rejected": len(rows) - len(accepted), "reasons": counts,
        "unused_sidecars": unused, "output": str(output_dir),
    }


def holds_identities(folder: Path) -> bool:
    """True for a folder of identity folders: no photo directly in it (caption sidecars and hidden files
    do not count), and at least one visible sub-folder. :func:`run_many` crops each sub-folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return not any(p.is_file() and p.suffix.lower() != CAPTION_SUFFIX for p in entries) and any(p.is_dir() for p in entries)


def run_many(cfg: CropFacesConfig, input_dir: Path, output_dir: Path, lock_wait: float = 0.0) -> dict[str, dict]:
    """Crop every identity folder of ``input_dir`` (:func:`holds_identities`) into ``output_dir/<folder name>/``
    as one job, loading the models once: ``{identity: run() summary}``. Each identity is a :func:`run`
    (its own output lock, written atomically); one that fails keeps its output as it was and the others
    go on; the job fails at the end naming each failed identity (:mod:`faceid.faces.many`)."""
    folders = identity_folders(input_dir, output_dir, "a folder of identity folders, each holding photos of one person")
    output_dir = check_folder(STAGE, output_dir, [input_dir], identities=True)
    loose = sorted(p.name for p in Path(input_dir).iterdir() if p.is_file() and p.suffix.lower() == CAPTION_SUFFIX
                   and not p.name.startswith("."))
    if loose:
        raise InputError(f"{input_dir}: caption sidecar(s) {', '.join(loose)} directly in a folder of identity folders; "
                         "a caption belongs beside its photo, in the identity's folder")

    def check(folder: Path) -> None:
        _read_captions(_list_inputs(folder)[1])

    with in_place(STAGE, output_dir, identities=True):
        return each_identity(
            "crop-faces", folders, output_dir, check, lambda: face_models(cfg),
            lambda folder, out, models, desc: run(cfg, folder, out, lock_wait, models=models, desc=desc),
        )


def _crop_size(crops_dir: Path, rows: list[dict], size: int) -> int:
    """The crop size to read for ``size``: exact if written, else the smallest larger one."""
    available = sorted(int(k[len("crop_"):]) for k in (rows[0] if rows else {}) if k.startswith("crop_"))
    larger = [s for s in available if s >= size]
    if not larger:
        raise InputError(f"{crops_dir}: crops of size >= {size} px needed, found {available or 'none'} (crop_faces.crop_sizes)")
    return larger[0]


def read_accepted(crops_dir: Path, size: int) -> list[tuple[str, Path]]:
    """``[(name, crop path)]`` of the accepted photos' main faces of a crop_faces output at ``size``
    (exact size if written, else the smallest larger one: every size shares the same framing)."""
    crops_dir = require_dir(crops_dir, "a crop-faces output folder")
    rows = [r for r in read_parquet(crops_dir / "manifest.parquet") if r["status"] == "accepted"]
    chosen = _crop_size(crops_dir, rows, size)
    return [(r["name"], crops_dir / r[f"crop_{chosen}"]) for r in rows]


def _read_other_faces(crops_dir: Path, rows: list[dict]) -> dict[tuple[str, int], dict]:
    """``{(name, candidate): other_faces.parquet row}``; an error if the output predates candidates."""
    if rows and "num_candidates" not in rows[0]:
        raise InputError(f"{crops_dir}: manifest.parquet lacks column num_candidates: written by an older crop-faces; rerun crop-faces")
    others = {(r["name"], int(r["candidate"])): r for r in read_parquet(crops_dir / "other_faces.parquet")} if rows else {}
    for r in rows:
        missing = [k for k in range(1, int(r["num_candidates"])) if (r["name"], k) not in others]
        if missing:
            raise InputError(f"{crops_dir}: other_faces.parquet lacks candidate face(s) {missing} of {r['path']}; rerun crop-faces")
    return others


def read_candidates(crops_dir: Path, size: int) -> list[tuple[str, list[Path]]]:
    """``[(name, [crop path of candidate 0, 1, ...])]`` of the accepted photos at ``size``: one path
    for a photo with one usable face, up to ``MAX_FACES`` for a photo with several (main face first)."""
    crops_dir = require_dir(crops_dir, "a crop-faces output folder")
    rows = [r for r in read_parquet(crops_dir / "manifest.parquet") if r["status"] == "accepted"]
    chosen = _crop_size(crops_dir, rows, size)
    others = _read_other_faces(crops_dir, rows)
    return [
        (r["name"], [crops_dir / r[f"crop_{chosen}"]]
         + [crops_dir / others[(r["name"], k)][f"crop_{chosen}"] for k in range(1, int(r["num_candidates"]))])
        for r in rows
    ]


def check_embedded_crops(table: Path, crops_dir: Path, rows: list[dict], embedded: list[dict]) -> None:
    """The embeddings (``embedded``: the rows of embed-faces' ``table``) were made from these crops:
    each embedded photo is an accepted photo of ``crops_dir`` (``rows``) and the crop file it
    embedded has the sha256 embed-faces recorded (``crop_sha256``). Otherwise :class:`InputError`
    naming the photo and both folders: crops and embeddings of different photos with the same names
    must not train together. An embed-faces output without hashes (older) is refused: rerun it."""
    if embedded and "crop_sha256" not in embedded[0]:
        raise InputError(f"{table}: no crop_sha256 column (written by an older embed-faces), so which crops it embedded "
                         f"cannot be checked against {crops_dir}; rerun embed-faces on these crops")
    accepted = {str(r["name"]): r["path"] for r in rows}
    both = f"the crops in {crops_dir} and the embeddings in {table.parent} are of different photos"
    for r in embedded:
        name, crop = str(r["name"]), Path(str(r["crop_path"]))
        path = crop if crop.is_absolute() else crops_dir / crop
        if name not in accepted:
            raise InputError(f"photo {name}: embedded in {table.parent} but not an accepted photo of {crops_dir}: {both}; "
                             "rerun embed-faces on these crops")
        if not path.is_file() or sha256_file(path) != r["crop_sha256"]:
            found = f"sha256 {sha256_file(path)[:12]}" if path.is_file() else "missing"
            raise InputError(f"photo {accepted[name]}: {both} ({crop}: {found} in {crops_dir}, sha256 "
                             f"{str(r['crop_sha256'])[:12]} when embedded); rerun embed-faces on these crops, or pass "
                             "the crops it was run on")


def _chosen_faces(embeddings_dir: Path, crops_dir: Path, rows: list[dict]) -> dict[str, int]:
    """``{name: candidate}`` embed-faces chose (``face`` column of its embeddings.parquet), after
    checking the embeddings were made from these crops (:func:`check_embedded_crops`)."""
    path = Path(embeddings_dir)
    table = path / "embeddings.parquet" if path.is_dir() else path.parent / "embeddings.parquet"
    if not table.is_file():
        raise InputError(f"{table}: missing (embed-faces writes it beside embeddings.safetensors: which crops were "
                         f"embedded); pass the embed-faces output folder of {crops_dir}, or rerun embed-faces")
    embedded = read_parquet(table)
    check_embedded_crops(table, crops_dir, rows, embedded)
    chosen = {str(r["name"]): int(r["face"]) for r in embedded if r.get("face") is not None}
    several = [r["path"] for r in rows if int(r["num_candidates"]) > 1 and r["name"] not in chosen]
    if several:
        raise InputError(
            f"{table}: no 'face' entry for {', '.join(several)} of {crops_dir} (photos with several faces; embed-faces "
            "records which one is the person); rerun embed-faces on these crops"
        )
    return chosen


def read_photos(crops_dir: Path, embeddings_dir: Path | None = None) -> list[PhotoRecord]:
    """The accepted photos of a crop_faces output, in manifest order, with box and landmarks scaled to
    photo pixels (``photo_scale``) and ``crop_path`` the aligned crop at the largest size written.

    Given the embed-faces folder (or its embeddings.safetensors) of these crops, each record's face is
    the candidate embed-faces chose as the person (the face its ``per_image`` row embeds; an error if
    a photo with several faces has no choice recorded). Without it, each record's face is the photo's
    main face, which in a photo with several faces may be a stranger: pass the embed-faces output
    whenever the photos are used with the identity."""
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
    rows = [r for r in rows if r["status"] == "accepted"]
    others = _read_other_faces(crops_dir, rows)
    chosen = _chosen_faces(embeddings_dir, crops_dir, rows) if embeddings_dir is not None else {}
    records = []
    for r in rows:
        k = chosen.get(r["name"], 0)
        if not 0 <= k < int(r["num_candidates"]):
            raise InputError(f"{crops_dir}: embed-faces chose face {k} of {r['path']}, which has {r['num_candidates']} "
                             "candidate face(s); the embeddings come from other crops, rerun embed-faces")
        face = r if k == 0 else others[(r["name"], k)]
        photo, crop_path = crops_dir / r["photo_path"], crops_dir / face[f"crop_{sizes[-1]}"]
        for path, what in ((photo, "photo"), (crop_path, "aligned crop")):
            if not path.is_file():
                raise InputError(f"{crops_dir}: {what} {path.relative_to(crops_dir)} of accepted {r['path']} is missing; rerun crop-faces")
        scale = float(r["photo_scale"])
        landmarks = np.asarray(face["landmarks"], np.float32).reshape(5, 2) * np.float32(scale)
        landmarks.flags.writeable = False
        records.append(PhotoRecord(
            name=r["name"], photo_path=photo, sha256=r["sha256"], box=tuple(float(v) * scale for v in face["box"]),
            landmarks=landmarks, sharpness=float(face["sharpness"]), yaw_degrees=float(face["yaw_degrees"]),
            caption=r["caption"], crop_path=crop_path,
        ))
    return records
