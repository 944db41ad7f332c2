"""Identity routing of clips on real videos and real models: the identity's clips are identity
examples, another person's clips motion priors, even though each clip is only 64x64 pixels."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from faceid.errors import InputError
from faceid.train import routing


@pytest.fixture(scope="module")
def world(tmp_path_factory, params, sample_identity):
    """Sample videos with a third one (biden), the obama identity embedding, and 64x64 clips."""
    from faceid import sample_data
    from faceid.faces import embed
    from faceid.pose import prepare
    from faceid.train.data import load_clips

    root = tmp_path_factory.mktemp("routing")
    # VIDEO_SOURCES = (obama3, obama2, biden): three videos -> dance_02 shows another person
    sample = dataclasses.replace(params.sample_data, num_videos=3, video_seconds=1.25)  # 20 frames
    assert sample_data.VIDEO_SOURCES[2] == "biden.jpg"
    sample_data.run(sample, root / "sample")
    reference, _ = embed.load_identity_embedding(sample_identity[1])  # crop-faces + embed-faces of the obama photos
    cfg = dataclasses.replace(params.prepare_pose, max_clips_per_video=1, workers=1)  # params.yaml: 17 frames, 64x64, 5 samples
    prepare.run(cfg, root / "sample" / "videos", None, root / "clips")
    clips = {c.clip_id: c for c in load_clips(root / "clips")}
    return {"root": root, "reference": reference, "clips": clips, "params": params}


@pytest.fixture(scope="module")
def routes(world):
    p = world["params"]
    return routing.route_clips(list(world["clips"].values()), world["reference"], p.crop_faces, p.embed_faces, 0.0)


def test_identity_clips_are_identity_examples_and_another_person_a_prior(world, routes):
    clips = world["clips"]
    assert sorted(clips) == ["dance_00-00000", "dance_01-00000", "dance_02-00000"]
    assert all((c.height, c.width) == (64, 64) for c in clips.values())  # far too small to show a face
    by_id = {r.clip_id: r for r in routes}
    assert [r.clip_id for r in routes] == list(clips)
    assert {k: r.role for k, r in by_id.items()} == {
        "dance_00-00000": "identity",  # obama3.jpg, full body
        "dance_01-00000": "identity",  # obama2.jpg, upper body
        "dance_02-00000": "prior",  # biden.jpg
    }
    for r in routes:
        assert r.threshold == 0.90  # dlib's calibrated same-person threshold (threshold 0 = default)
        assert r.num_regions == 5 and r.num_faces >= 4
    assert by_id["dance_00-00000"].facesim > 0.94 and by_id["dance_01-00000"].facesim > 0.94
    assert by_id["dance_02-00000"].facesim < 0.87
    assert ">= 0.900" in by_id["dance_00-00000"].reason and "< 0.900" in by_id["dance_02-00000"].reason
    text = routing.summarize_routes(routes)
    assert text.splitlines()[0] == "routing: 2 identity clip(s), 1 prior clip(s) (threshold 0.900)"
    assert len(text.splitlines()) == 4 and all(k in text for k in clips)
    assert f"{by_id['dance_02-00000'].facesim:.3f}" in text  # each clip with its score


def test_explicit_threshold_is_used(world, routes):
    p = world["params"]
    biden = world["clips"]["dance_02-00000"]
    score = next(r.facesim for r in routes if r.clip_id == biden.clip_id)
    (route,) = routing.route_clips([biden], world["reference"], p.crop_faces, p.embed_faces, score - 0.01)
    assert route.role == "identity" and route.threshold == pytest.approx(score - 0.01)
    assert route.facesim == pytest.approx(score, abs=1e-6)  # the same regions, the same score


def test_missing_faces_file_names_it_and_says_rerun(world, tmp_path):
    p = world["params"]
    clip = world["clips"]["dance_00-00000"]
    old = tmp_path / "old_clip"
    shutil.copytree(clip.video_path.parent, old)
    (old / "faces.npz").unlink()
    stale = dataclasses.replace(clip, video_path=old / "video.mp4", pose_path=old / "pose.mp4")
    with pytest.raises(InputError) as err:
        routing.route_clips([clip, stale], world["reference"], p.crop_faces, p.embed_faces, 0.0)
    assert str(old / "faces.npz") in str(err.value) and "rerun prepare-pose" in str(err.value)


def test_clips_without_a_face_are_priors(world, tmp_path):
    p = world["params"]
    clip = world["clips"]["dance_00-00000"]
    made = []
    for name, regions in (("blank", np.full((2, 256, 256, 3), 120, np.uint8)), ("none", np.zeros((0, 256, 256, 3), np.uint8))):
        d = tmp_path / name
        shutil.copytree(clip.video_path.parent, d)
        np.savez(d / "faces.npz", regions=regions, frames=np.arange(len(regions)), boxes=np.zeros((len(regions), 4), np.float32),
                 sizes=np.zeros(len(regions), np.float32), checksum=np.array(clip.checksum))
        made.append(dataclasses.replace(clip, clip_id=name, video_path=d / "video.mp4", pose_path=d / "pose.mp4"))
    blank, none = routing.route_clips(made, world["reference"], p.crop_faces, p.embed_faces, 0.0)
    assert (blank.role, blank.facesim, blank.num_faces, blank.num_regions) == ("prior", None, 0, 2)
    assert (none.role, none.facesim, none.num_faces, none.num_regions) == ("prior", None, 0, 0)
    assert "no face" in blank.reason and "no face" in none.reason
    assert all(r.reason in routing.summarize_routes([blank, none]) for r in (blank, none))
    assert routing.route_clips([], world["reference"], p.crop_faces, p.embed_faces, 0.0) == []


def test_faces_file_from_another_run_is_refused(world, tmp_path):
    p = world["params"]
    clip = world["clips"]["dance_00-00000"]
    other = dataclasses.replace(clip, checksum="0" * 64)
    with pytest.raises(InputError, match="checksum .* does not match .* rerun prepare-pose"):
        routing.route_clips([other], world["reference"], p.crop_faces, p.embed_faces, 0.0)
