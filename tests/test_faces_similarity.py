"""FaceSim on videos of a real person: the identity scores high, another person low, no face -> None."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceid.errors import InputError
from faceid.faces import crop, embed, similarity
from faceid.sample_data import dance_frames, extract_archive_photos

ARCHIVE = Path(__file__).resolve().parents[1] / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    raw = extract_archive_photos(ARCHIVE)
    return {name: np.asarray(Image.open(io.BytesIO(raw[name])).convert("RGB")) for name in ("obama2.jpg", "biden.jpg")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, params):
    """embed-faces output of three obama photos (obama2, the one in the videos, left out)."""
    raw = extract_archive_photos(ARCHIVE)
    src = tmp_path_factory.mktemp("sim_in")
    for name in ("obama.jpg", "obama3.jpg", "obama_partial_face.jpg"):
        (src / name).write_bytes(raw[name])
    crops = tmp_path_factory.mktemp("sim_crops") / "crops"
    crop.run(params.crop_faces, src, crops)
    out = tmp_path_factory.mktemp("sim_emb") / "emb"
    embed.run(params.embed_faces, crops, out)
    return out


@pytest.fixture(scope="module")
def scored(reference, photos, params):
    ref, _ = embed.load_identity_embedding(reference)
    blank = np.full((1, 480, 320, 3), 90, np.uint8)
    obama = np.concatenate([dance_frames(photos["obama2.jpg"], 4, 480, 320, seed=0), blank])
    biden = dance_frames(photos["biden.jpg"], 4, 480, 320, seed=1)
    with similarity.FaceSimScorer(ref, params.crop_faces, params.embed_faces) as scorer:
        return scorer.score(obama), scorer.score(biden)


def test_identity_scores_clearly_above_another_person(scored):
    same, other = scored
    assert same["metric"] == "FaceSim-dlib" and same["embedder"] == "dlib"
    assert same["mean"] > 0.93 and same["min"] > 0.9
    assert other["mean"] < 0.88
    assert same["mean"] - other["mean"] > 0.08
    assert same["mean_euclidean"] < 0.5 < 0.6 < other["mean_euclidean"]  # dlib's 0.6 rule
    assert same["std"] < 0.05


def test_frames_without_a_face_are_none_and_lower_the_detection_rate(scored):
    same, other = scored
    assert same["num_frames"] == 5 and same["num_detected"] == 4 and same["detection_rate"] == 0.8
    assert same["per_frame"][4] is None and same["per_frame_euclidean"][4] is None
    assert all(isinstance(v, float) for v in same["per_frame"][:4])
    assert other["detection_rate"] == 1.0


def test_video_without_any_face(reference, params):
    ref, _ = embed.load_identity_embedding(reference)
    frames = np.zeros((3, 64, 64, 3), np.uint8)
    result = similarity.face_similarity(ref, frames, params.crop_faces, params.embed_faces)
    assert result["detection_rate"] == 0.0 and result["mean"] is None and result["min"] is None
    assert result["per_frame"] == [None, None, None] and result["mean_euclidean"] is None
    empty = similarity.face_similarity(ref, np.zeros((0, 64, 64, 3), np.uint8), params.crop_faces, params.embed_faces)
    assert empty["detection_rate"] == 0.0 and empty["per_frame"] == []


def test_reference_of_another_embedder_is_refused(reference, params, tmp_path):
    with pytest.raises(InputError, match="512 dims but embedder dlib gives 128"):
        similarity.FaceSimScorer(np.ones(512, np.float32), params.crop_faces, params.embed_faces)
    clip_params = dataclasses.replace(params, embed_faces=dataclasses.replace(params.embed_faces, embedder="clip"))
    with pytest.raises(InputError, match="same embedder"):
        similarity.run(clip_params, reference, tmp_path, None)


def test_run_on_a_video_file_and_a_folder(reference, photos, params, tmp_path, capsys):
    from faceid.pose.video import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "obama.mp4", dance_frames(photos["obama2.jpg"], 3, 480, 320, seed=2), fps=8)
    write_video(videos / "blank.mp4", np.full((2, 64, 64, 3), 30, np.uint8), fps=8)
    (videos / "notes.txt").write_text("ignored")

    result = similarity.run(params, reference, videos / "obama.mp4", None)
    printed = json.loads(capsys.readouterr().out)
    assert printed["metric"] == "FaceSim-dlib" and printed["mean"] == pytest.approx(result["mean"])
    assert result["mean"] > 0.93 and result["detection_rate"] == 1.0

    out = tmp_path / "facesim.json"
    result = similarity.run(params, reference, videos, out)
    saved = json.loads(out.read_text())
    assert sorted(saved["videos"]) == ["blank.mp4", "obama.mp4"]
    assert saved["videos"]["blank.mp4"]["mean"] is None and saved["videos"]["blank.mp4"]["detection_rate"] == 0.0
    assert saved["detection_rate"] == pytest.approx(3 / 5) and saved["mean"] > 0.93


def test_missing_or_unreadable_video(reference, params, tmp_path):
    with pytest.raises(InputError, match="not found"):
        similarity.run(params, reference, tmp_path / "none.mp4", None)
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="bad.mp4"):
        similarity.run(params, reference, tmp_path / "bad.mp4", None)
