"""Sample data: real photos of one person and of others; videos of a real person moving."""

from __future__ import annotations

import csv

import numpy as np

from faceid.sample_data import IDENTITY_NAME, dance_frames, package_photos


def test_layout_and_real_photos(sample_dir):
    from PIL import Image

    ident = sorted(p.name for p in (sample_dir / "identities" / IDENTITY_NAME).iterdir())
    assert ident == ["obama.jpg", "obama2.jpg", "obama2_copy_rgba.png", "obama3.jpg", "obama_partial_face.jpg"]
    others = sorted(p.name for p in (sample_dir / "others").iterdir())
    assert others == ["astronaut.png", "biden.jpg", "grace_hopper.png"]
    assert Image.open(sample_dir / "identities" / IDENTITY_NAME / "obama2_copy_rgba.png").mode == "RGBA"
    for name in ident:
        assert min(Image.open(sample_dir / "identities" / IDENTITY_NAME / name).size) > 400


def test_videos_are_real_h264_with_a_moving_person(sample_dir, params):
    import av

    cfg = params.sample_data
    videos = sorted((sample_dir / "videos").glob("*.mp4"))
    assert len(videos) == cfg.num_videos
    with open(sample_dir / "videos" / "captions.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [v.stem for v in videos]
    with av.open(str(videos[0])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    assert len(frames) == round(cfg.video_seconds * cfg.video_fps)
    assert frames[0].shape == (cfg.video_height, cfg.video_width, 3)
    # the person moves: consecutive frames differ, and the content is not constant
    diffs = [np.abs(frames[i + 1].astype(int) - frames[i].astype(int)).mean() for i in range(len(frames) - 1)]
    assert min(diffs) > 0.5


def test_dance_frames_are_deterministic():
    photo = package_photos()["astronaut"]
    a = dance_frames(photo, 5, 64, 48, seed=3)
    b = dance_frames(photo, 5, 64, 48, seed=3)
    c = dance_frames(photo, 5, 64, 48, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_same_inputs_give_the_same_bytes(sample_dir, params, tmp_path):
    """Issue 21 item 6: sample-data run again into another folder writes byte-identical files, videos
    included (x264 with one thread: faceid.pose.video.encoder_options)."""
    from faceid import sample_data

    again = tmp_path / "again"
    sample_data.run(params.sample_data, again)
    files = sorted(p.relative_to(sample_dir) for p in sample_dir.rglob("*") if p.is_file())
    assert sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()) == files
    assert any(p.suffix == ".mp4" for p in files)
    different = [str(p) for p in files if (sample_dir / p).read_bytes() != (again / p).read_bytes()]
    assert different == []
