"""Real decode/encode round trips: PyAV H.264 writes, decord reads (resample, resize, rotation, VFR)."""

from __future__ import annotations

import io
import tarfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from faceid.errors import InputError
from faceid.pose.video import probe, read_video, write_video

ARCHIVE = Path(__file__).resolve().parents[1] / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"


def person_frames(num_frames: int = 40, height: int = 288, width: int = 160, boxes: list | None = None) -> np.ndarray:
    """A real person (obama3.jpg) pasted on a textured background, moving left to right and scaling.

    ``boxes``, when given, receives the pasted photo's (x0, y0, w, h) per frame.
    """
    from PIL import Image

    with tarfile.open(ARCHIVE) as tar:
        data = tar.extractfile("face_recognition-1.3.0/tests/test_images/obama3.jpg").read()
    photo = Image.open(io.BytesIO(data)).convert("RGB")
    rng = np.random.default_rng(0)
    background = (rng.normal(0, 8, (height, width, 3)) + np.array([70, 90, 110])).clip(0, 255).astype(np.uint8)
    frames = []
    for i in range(num_frames):
        t = i / max(1, num_frames - 1)
        ph = int(height * (0.7 + 0.12 * np.sin(2 * np.pi * t)))
        pw = int(ph * photo.width / photo.height)
        person = np.asarray(photo.resize((pw, ph), Image.BILINEAR))
        x0 = int((width - pw) * (0.2 + 0.6 * t))
        y0 = height - ph - 4
        frame = background.copy()
        xs, xe = max(0, x0), min(width, x0 + pw)
        frame[y0 : y0 + ph, xs:xe] = person[:, xs - x0 : xe - x0]
        frames.append(frame)
        if boxes is not None:
            boxes.append((x0, y0, pw, ph))
    return np.stack(frames)


def write_counter_video(path: Path, n: int, fps: float, height: int = 48, width: int = 64) -> None:
    """Frame i is a flat grey of value 5 * i (readable back after lossy coding)."""
    write_video(path, [np.full((height, width, 3), 5 * i, np.uint8) for i in range(n)], fps)


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 5)) for f in frames]


@pytest.fixture(scope="module")
def person_video(tmp_path_factory):
    frames = person_frames()
    path = tmp_path_factory.mktemp("video") / "person.mp4"
    write_video(path, frames, 16)
    return path, frames


def test_round_trip_is_h264_yuv420p_and_close(person_video):
    import av

    path, frames = person_video
    decoded, fps = read_video(path)
    assert fps == pytest.approx(16)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    error = float(np.abs(decoded.astype(int) - frames.astype(int)).mean())
    assert error < 6  # crf 18; the noisy background loses some chroma to 4:2:0 subsampling
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    assert [p.name for p in path.parent.iterdir()] == ["person.mp4"]  # no temp files left


def test_probe_reports_size_fps_duration(person_video):
    info = probe(person_video[0])
    assert (info["frames"], info["height"], info["width"]) == (40, 288, 160)
    assert info["fps"] == pytest.approx(16)
    assert info["duration"] == pytest.approx(2.5, abs=0.01)
    assert info["vfr"] is False and info["rotation"] == 0


def test_resample_resize_and_max_frames(tmp_path):
    path = tmp_path / "counter.mp4"
    write_counter_video(path, 40, 32)
    frames, fps = read_video(path, fps=16)
    assert fps == 16 and frame_numbers(frames) == list(range(0, 40, 2))
    frames, _ = read_video(path, fps=64, size=(24, 32), max_frames=8)
    assert frames.shape == (8, 24, 32, 3)
    assert frame_numbers(frames) == [0, 0, 1, 1, 2, 2, 3, 3]  # upsampling repeats frames


def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path):
    import av

    path = tmp_path / "vfr.mp4"
    times_ms = [0, 40, 80, 200, 240, 280, 500, 540, 580, 620]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 25 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert probe(path)["vfr"] is True
    frames, _ = read_video(path, fps=25)
    shown = [int(round(f.mean() / 25)) for f in frames]
    # at t = 0, 40, ..., 600 ms the frame on screen is the last one that started
    expected = [int(np.searchsorted(times_ms, t, side="right") - 1) for t in range(0, 640, 40)]
    assert shown == expected


def test_rotated_phone_video_decodes_upright(tmp_path):
    import av

    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for _ in range(3):
            frame = np.zeros((48, 64, 3), np.uint8)
            frame[:8, :16] = 255  # marker in the stored top-left corner
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    info = probe(path)
    assert info["rotation"] == 90 and (info["height"], info["width"]) == (64, 48)
    frames, _ = read_video(path)
    assert frames.shape == (3, 64, 48, 3)
    assert frames[0, -16:, :8].mean() > 200  # rotated 90 degrees counter-clockwise: now bottom-left
    frames, _ = read_video(path, size=(32, 24))
    assert frames.shape == (3, 32, 24, 3)


@pytest.mark.parametrize("content", [b"", b"this is not a video" * 10])
def test_unreadable_files_raise_input_error(tmp_path, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.mp4"):
        probe(path)
    with pytest.raises(InputError):
        read_video(path)


def test_write_rejects_odd_size_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", np.zeros((3, 33, 32, 3), np.uint8), 16)
    with pytest.raises(ValueError, match="frame 1"):
        write_video(tmp_path / "mixed.mp4", [np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], 16)
    assert list(tmp_path.iterdir()) == []


def test_same_frames_give_the_same_bytes_with_no_version_or_time_in_the_file(tmp_path):
    """Issue 21 item 6: x264 with one thread (faceid.pose.video.encoder_options): the same frames
    encoded twice are byte-identical; the container carries no creation time and no muxer version."""
    import av

    frames = person_frames(24, 96, 64)
    write_video(tmp_path / "a.mp4", frames, 16)
    write_video(tmp_path / "b.mp4", frames, 16)
    data = (tmp_path / "a.mp4").read_bytes()
    assert data == (tmp_path / "b.mp4").read_bytes()
    with av.open(str(tmp_path / "a.mp4")) as container:
        tags = {**container.metadata, **container.streams.video[0].metadata}
    assert "creation_time" not in tags and "encoder" not in tags and b"Lavf" not in data


def write_audio_only(path: Path) -> Path:
    """An MP4 holding one AAC audio stream and no video stream (a real file, written with PyAV)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def test_no_video_stream_is_named_and_a_long_read_shows_progress(tmp_path, capsys):
    """Issue 21 item 8: a file with only an audio stream says so; a long video (> LONG_READ_FRAMES)
    shows a progress bar while it decodes."""
    from faceid.pose.video import LONG_READ_FRAMES

    audio = write_audio_only(tmp_path / "audio.mp4")
    for read in (probe, read_video):
        with pytest.raises(InputError, match=f"{audio}: no video stream \\(the file holds 1 audio\\); expected a video"):
            read(audio)
    long = tmp_path / "long.mp4"
    write_video(long, np.zeros((LONG_READ_FRAMES + 1, 32, 32, 3), np.uint8), 16)
    capsys.readouterr()
    assert len(read_video(long)[0]) == LONG_READ_FRAMES + 1
    assert f"reading long.mp4 ({LONG_READ_FRAMES + 1} frames)" in capsys.readouterr().err
    write_video(tmp_path / "short.mp4", np.zeros((LONG_READ_FRAMES, 32, 32, 3), np.uint8), 16)
    read_video(tmp_path / "short.mp4")
    assert "reading" not in capsys.readouterr().err
