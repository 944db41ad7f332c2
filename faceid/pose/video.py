"""Video I/O: decord reads (batched, random access, resize while decoding), PyAV writes H.264.

Frames are ``uint8`` RGB arrays ``[F, H, W, 3]``. Frame-rate conversion picks, for each output
time ``k / fps``, the source frame shown at that time (from the container's timestamps), so
variable-frame-rate videos come out evenly timed. decord applies a rotation stored in the
container (phone videos) but its batched read fails on them, so rotated videos are decoded with
PyAV and turned upright with numpy; :func:`probe` reports the rotation.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from faceid.errors import InputError
from faceid.io import atomic_path

VIDEO_EXTENSIONS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")  # what counts as a video in an input folder
LONG_READ_FRAMES = 256  # read_frames shows a progress bar above this many frames
# Relative spread of frame intervals above which a video counts as variable frame rate.
_VFR_TOLERANCE = 0.1


def _open_reader(path: Path, size: tuple[int, int] | None = None):
    """A decord ``VideoReader`` (``size`` = (h, w) of the upright frames), or :class:`InputError`."""
    import decord

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found (expected a video)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file (0 bytes), not a video")
    kwargs = {} if size is None else {"height": int(size[0]), "width": int(size[1])}
    try:
        reader = decord.VideoReader(str(path), ctx=decord.cpu(0), **kwargs)
    except Exception as exc:  # decord raises RuntimeError / DECORDError with ffmpeg's message
        raise InputError(_unreadable(path) or f"{path}: not a readable video ({str(exc).splitlines()[0][:120]})") from None
    if len(reader) == 0:
        raise InputError(f"{path}: the video stream has no frames")
    return reader


def _unreadable(path: Path) -> str:
    """Why decord could not open ``path``, when PyAV can say it plainly: a container with no video
    stream (an audio file, an empty track), or a video stream with no frames; "" otherwise."""
    import av

    try:
        with av.open(str(path)) as container:
            kinds = [s.type for s in container.streams]
            if "video" not in kinds:
                held = ", ".join(f"{kinds.count(k)} {k}" for k in dict.fromkeys(kinds)) or "no streams"
                return f"{path}: no video stream (the file holds {held}); expected a video"
            if next(container.decode(video=0), None) is None:
                return f"{path}: the video stream has no frames"
    except Exception:  # not a container PyAV reads either: decord's message stands
        return ""
    return ""


def _timestamps(reader) -> np.ndarray:
    """Start time in seconds of every frame, relative to the first frame."""
    ts = np.asarray(reader.get_frame_timestamp(range(len(reader))), dtype=np.float64)[:, 0]
    return ts - ts[0]


def _duration(ts: np.ndarray, native_fps: float) -> float:
    step = float(np.median(np.diff(ts))) if len(ts) > 1 else 1.0 / native_fps
    return float(ts[-1] + step)


def resample_indices(timestamps: np.ndarray, fps: float, native_fps: float) -> np.ndarray:
    """Indices of the source frames shown at times ``k / fps`` for the whole duration."""
    duration = _duration(timestamps, native_fps)
    count = max(1, int(np.floor(duration * fps + 1e-6)))
    times = np.arange(count) / fps
    idx = np.searchsorted(timestamps, times + 1e-6, side="right") - 1
    return np.clip(idx, 0, len(timestamps) - 1)


def _rotation(path: Path) -> int:
    """Display rotation in degrees stored in the container (0 when none or unknown)."""
    import av

    try:
        with av.open(str(path)) as container:
            frame = next(container.decode(video=0))
            return int(round(getattr(frame, "rotation", 0) or 0)) % 360
    except Exception:
        return 0


def probe(path: str | Path) -> dict:
    """``frames, fps, height, width, duration`` (upright size), plus ``vfr`` and ``rotation``.

    Raises :class:`InputError` for a missing, empty or unreadable file.
    """
    path = Path(path)
    reader = _open_reader(path)
    native_fps = float(reader.get_avg_fps())
    if not np.isfinite(native_fps) or native_fps <= 0:
        raise InputError(f"{path}: video reports no frame rate ({native_fps})")
    ts = _timestamps(reader)
    height, width = reader[0].shape[:2]
    steps = np.diff(ts)
    vfr = bool(len(steps) > 1 and np.median(steps) > 0 and (steps.max() - steps.min()) / np.median(steps) > _VFR_TOLERANCE)
    return {
        "frames": len(reader),
        "fps": native_fps,
        "height": int(height),
        "width": int(width),
        "duration": _duration(ts, native_fps),
        "vfr": vfr,
        "rotation": _rotation(path),
    }


def _read_frames_rotated(path: Path, indices: list[int], size: tuple[int, int] | None, rotation: int) -> np.ndarray:
    """PyAV fallback for rotated videos (decord's batched read fails on them): decode in order."""
    import av
    import cv2

    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                image = np.rot90(frame.to_ndarray(format="rgb24"), k=rotation // 90)
                if size is not None:
                    image = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)
                found[i] = np.ascontiguousarray(image)
            if i >= max(indices):
                break
    return np.stack([found[i] for i in indices])


def read_frames(path: str | Path, indices, size: tuple[int, int] | None = None, batch: int = 32) -> np.ndarray:
    """Decode source frames ``indices`` (random access, batched), resized to ``size`` = (h, w)."""
    reader = _open_reader(Path(path), size)
    indices = [int(i) for i in indices]
    rotation = _rotation(Path(path))
    if rotation and indices:
        return _read_frames_rotated(Path(path), indices, size, rotation)
    starts = range(0, len(indices), batch)
    if len(indices) > LONG_READ_FRAMES:  # a long video says how far it is
        from faceid.io import progress

        starts = progress(starts, desc=f"reading {Path(path).name} ({len(indices)} frames)")
    chunks = [reader.get_batch(indices[i : i + batch]).asnumpy() for i in starts]
    if not chunks:
        h, w = size if size is not None else reader[0].shape[:2]
        return np.zeros((0, h, w, 3), np.uint8)
    return np.concatenate(chunks)


def frame_indices(path: str | Path, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Source frame indices for reading at ``fps`` (all frames when None) and the resulting fps."""
    reader = _open_reader(Path(path))
    native_fps = float(reader.get_avg_fps())
    if fps is None:
        return np.arange(len(reader)), native_fps
    return resample_indices(_timestamps(reader), fps, native_fps), float(fps)


def read_video(
    path: str | Path,
    fps: float | None = None,
    size: tuple[int, int] | None = None,
    max_frames: int | None = None,
) -> tuple[np.ndarray, float]:
    """Read ``path`` as ``[F, H, W, 3]`` uint8 RGB at ``fps`` (native when None), resized to ``size``."""
    indices, out_fps = frame_indices(path, fps)
    if max_frames is not None:
        indices = indices[:max_frames]
    return read_frames(path, indices, size), out_fps


def encoder_options(crf: int, preset: str) -> dict[str, str]:
    """x264's options for every video faceid writes: the same frames give the same bytes.

    ``threads=1``: x264's frame/slice threads make the bitstream depend on scheduling (the same
    frames encoded twice gave different files; ``codec_context.thread_count = 1`` does not reach
    x264, its own ``threads`` option does). One thread costs encode speed (benchmarks/results/encode.md,
    ``benchmarks/bench_encode.py``); prepare-pose's clips are encoded by several workers at once instead.
    The container carries no creation time (the mp4 muxer writes one only when asked) and
    ``fflags=+bitexact`` drops the muxer's version string, so the bytes do not vary by run or host."""
    return {"crf": str(int(crf)), "preset": preset, "threads": "1"}


CONTAINER_OPTIONS = {"fflags": "+bitexact"}  # no library version string in the file (see encoder_options)


def write_video(path: str | Path, frames, fps: float, crf: int = 18, preset: str = "fast") -> None:
    """Write RGB frames as H.264 (yuv420p) MP4 with PyAV, atomically (temp file, then rename);
    deterministic: the same frames, fps, crf and preset give byte-identical files (:func:`encoder_options`)."""
    import av

    frames = [np.asarray(f) for f in frames]
    if not frames:
        raise ValueError(f"{path}: no frames to write")
    height, width = frames[0].shape[:2]
    if height % 2 or width % 2:
        raise ValueError(f"{path}: H.264 yuv420p needs even height and width, got {height}x{width}")
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options=CONTAINER_OPTIONS) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.options = encoder_options(crf, preset)
            for i, frame in enumerate(frames):
                if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
                    raise ValueError(f"{path}: frame {i} is {frame.shape} {frame.dtype}, expected ({height}, {width}, 3) uint8")
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
