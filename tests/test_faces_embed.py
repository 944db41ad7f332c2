"""embed-faces on real photos: same person above different people, a planted photo flagged, other embedders."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
from group_photos import HEAD_BOXES, head, side_by_side
from PIL import Image

from faceid.errors import InputError
from faceid.faces import crop, embed
from faceid.io import read_json, read_parquet
from faceid.sample_data import extract_archive_photos, package_photos

ARCHIVE = Path(__file__).resolve().parents[1] / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"
OBAMA = ("obama.jpg", "obama2.jpg", "obama3.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg")


@pytest.fixture(scope="module")
def crops_all(tmp_path_factory, params):
    """crop-faces over five photos of one person and three of other people (all accepted)."""
    photos = extract_archive_photos(ARCHIVE)
    src = tmp_path_factory.mktemp("embed_in")
    for name in (*OBAMA, "biden.jpg"):
        (src / name).write_bytes(photos[name])
    for name, pixels in package_photos().items():
        Image.fromarray(pixels).save(src / f"{name}.png")
    out = tmp_path_factory.mktemp("embed_crops") / "crops"
    crop.run(params.crop_faces, src, out)
    return out


@pytest.fixture(scope="module")
def dlib_embeddings(crops_all):
    embedder = embed.DlibEmbedder()
    items = crop.read_accepted(crops_all, embedder.input_size)
    crops = [np.asarray(Image.open(p).convert("RGB")) for _, p in items]
    return [n for n, _ in items], embedder.embed(crops)


@pytest.fixture(scope="module")
def planted(tmp_path_factory, params):
    """The obama photos plus one planted photo of biden, cropped and embedded."""
    photos = extract_archive_photos(ARCHIVE)
    src = tmp_path_factory.mktemp("planted_in")
    for name in (*OBAMA, "biden.jpg"):
        (src / name).write_bytes(photos[name])
    crops = tmp_path_factory.mktemp("planted_crops") / "crops"
    crop.run(params.crop_faces, src, crops)
    out = tmp_path_factory.mktemp("planted_emb") / "emb"
    report = embed.run(params.embed_faces, crops, out)
    return crops, out, report


def test_same_person_scores_clearly_above_different_people(dlib_embeddings):
    names, emb = dlib_embeddings
    assert len(names) == 8 and emb.shape == (8, 128) and emb.dtype == np.float32
    unit = embed.l2_normalize(emb)
    sim = unit @ unit.T
    obama = [i for i, n in enumerate(names) if n.startswith("obama")]
    others = [i for i, n in enumerate(names) if not n.startswith("obama")]
    same = [sim[i, j] for i in obama for j in obama if i < j]
    different = [sim[i, j] for i in obama for j in others]
    assert len(same) == 10 and len(different) == 15
    assert min(same) > 0.93 and max(different) < 0.88
    assert min(same) - max(different) > 0.08
    # dlib's own rule on raw descriptors: same person below 0.6
    dist = np.linalg.norm(emb[:, None] - emb[None], axis=-1)
    assert max(dist[i, j] for i in obama for j in obama) < 0.45
    assert min(dist[i, j] for i in obama for j in others) > 0.6


def test_planted_photo_is_flagged_exactly(planted):
    _, out, report = planted
    assert [o["name"] for o in report["outliers"]] == ["biden"]
    assert sorted(report["inliers"]) == sorted(Path(n).stem for n in OBAMA)
    assert report["embedder"] == "dlib" and report["dim"] == 128 and report["threshold"] == 0.90
    assert all(report["similarity"][Path(n).stem] > 0.95 for n in OBAMA)
    assert report["similarity"]["biden"] < 0.86
    assert read_json(out / "report.json") == json.loads(json.dumps(report))
    rows = {r["name"]: r for r in read_parquet(out / "embeddings.parquet")}
    assert rows["biden"]["outlier"] is True and "another person" in rows["biden"]["reason"]
    assert rows["obama"]["outlier"] is False and rows["obama"]["reason"] is None
    assert rows["obama"]["crop_path"] == "crops/150/obama.png"


def test_several_planted_people_are_all_flagged(crops_all, params, tmp_path):
    report = embed.run(params.embed_faces, crops_all, tmp_path / "emb")
    assert sorted(o["name"] for o in report["outliers"]) == ["astronaut", "biden", "grace_hopper"]
    assert min(report["similarity"][Path(n).stem] for n in OBAMA) > 0.95
    assert max(o["similarity"] for o in report["outliers"]) < 0.86


def test_identity_embedding_excludes_the_outlier(planted):
    from safetensors.numpy import load_file

    _, out, _ = planted
    identity, meta = embed.load_identity_embedding(out)
    assert identity.shape == (128,) and identity.dtype == np.float32
    assert abs(np.linalg.norm(identity) - 1) < 1e-5
    assert meta["embedder"] == "dlib" and meta["dim"] == 128 and "biden" in meta["names"]
    tensors = load_file(str(out / "embeddings.safetensors"))
    names = meta["names"]
    inliers = [i for i, n in enumerate(names) if n != "biden"]
    np.testing.assert_allclose(identity, embed.identity_embedding(tensors["per_image"], np.array(inliers)), atol=1e-6)
    again, _ = embed.load_identity_embedding(out / "embeddings.safetensors")
    np.testing.assert_array_equal(identity, again)


def test_too_strict_a_threshold_leaves_no_clear_majority(planted, params, tmp_path):
    crops, _, _ = planted
    strict = dataclasses.replace(params.embed_faces, outlier_threshold=0.999)
    with pytest.raises(InputError) as err:
        embed.run(strict, crops, tmp_path / "emb")
    msg = str(err.value)
    assert "the photos show 6 different people with no clear majority" in msg and "cosine >= 0.999" in msg
    assert "largest groups have 1 photo each" in msg and "group 1 (1 photo): biden" in msg
    assert not (tmp_path / "emb").exists()


def test_too_few_consistent_photos_fails_and_writes_nothing(planted, params, tmp_path):
    crops, _, _ = planted
    with pytest.raises(InputError) as err:
        embed.run(dataclasses.replace(params.embed_faces, min_photos=6), crops, tmp_path / "emb")
    msg = str(err.value)
    assert "only 5 photo(s) agree on one identity, embed_faces.min_photos is 6" in msg
    assert "group 1 (5 photos, the identity): obama, obama2, obama3, obama_partial_face, obama_partial_face2" in msg
    assert "group 2 (1 photo): biden" in msg
    assert not (tmp_path / "emb").exists()


def test_same_person_groups_pure():
    def unit(degrees):
        return np.stack([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1)

    threshold = float(np.cos(np.radians(20)))
    a, b = unit([0, 5, 10]), unit([40, 45, 50])
    assert embed.same_person_groups(np.vstack([b, a]), threshold) == [[0, 1, 2], [3, 4, 5]]
    # a photo between the two people: single linkage (connected components) would chain all seven
    # into one group (every neighbour within 15 degrees); average linkage keeps the people apart
    # (and the in-between photo on its own: its mean cosine to either side is below the threshold)
    assert embed.same_person_groups(np.vstack([a, unit([25]), b]), threshold) == [[0, 1, 2], [4, 5, 6], [3]]
    assert embed.same_person_groups(unit([0, 60, 120]), threshold) == [[0], [1], [2]]
    assert embed.same_person_groups(unit([7]), threshold) == [[0]]
    # ties go to the first photos: 2 + 2 gives the group of photo 0 first
    assert embed.same_person_groups(np.vstack([unit([45]), a[:1], unit([44]), a[1:2]]), threshold) == [[0, 2], [1, 3]]


def test_clear_majority_definition():
    assert embed.has_clear_majority([[0, 1, 2, 3, 4], [5]])
    assert embed.has_clear_majority([[0, 1, 2], [3, 4], [5]])
    assert embed.has_clear_majority([[0]])
    assert not embed.has_clear_majority([[0, 1], [2, 3]])
    assert not embed.has_clear_majority([[0, 1, 2], [3, 4, 5], [6]])
    assert not embed.has_clear_majority([[0], [1]])


def test_decide_identity_picks_the_one_matching_face_pure():
    rng = np.random.default_rng(1)
    person, stranger, other = rng.normal(size=(3, 64))
    near = lambda v: v + 0.05 * rng.normal(size=64)  # noqa: E731
    single = [near(person)[None] for _ in range(3)] + [near(stranger)[None]]
    group = np.stack([near(stranger), near(person)])  # the stranger first (the larger face)
    twins = np.stack([near(person), near(person)])
    strangers = np.stack([near(stranger), near(other)])
    d = embed.decide_identity(single + [group, twins, strangers], threshold=0.9)
    assert d.majority and d.groups == [[0, 1, 2], [3]]
    assert d.inlier.tolist() == [True, True, True, False, True, False, False]
    assert d.face[4] == 1 and d.group[4] == 1 and d.reason[4] is None
    assert d.match[4][0] < 0.9 < d.match[4][1]
    assert d.reason[3].startswith("another person: same-person group 2")
    assert d.reason[5].startswith("ambiguous: 2 of its faces match the identity") and d.group[5] is None
    assert d.reason[6].startswith("none of its 2 faces is the person") and d.group[6] is None
    tie = embed.decide_identity([near(person)[None], near(person)[None], near(stranger)[None], near(stranger)[None], group], 0.9)
    assert not tie.majority and not tie.inlier.any() and tie.groups == [[0, 1], [2, 3]]


def test_leave_one_out_similarity_pure():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    same = base + 0.1 * rng.normal(size=(4, 16))
    other = rng.normal(size=(1, 16))
    sims = embed.leave_one_out_similarity(np.vstack([same, other]))
    assert sims[:4].min() > 0.9 and sims[4] < 0.6
    assert np.isnan(embed.leave_one_out_similarity(base[None])).all()
    inliers = np.array([True] * 4 + [False, False])
    sims = embed.leave_one_out_similarity(np.vstack([same, other, other + 0.01]), inliers)
    assert sims[:4].min() > 0.95 and sims[4:].max() < 0.6  # the excluded rows never join the centroid


def test_load_identity_embedding_errors(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(InputError, match="file not found"):
        embed.load_identity_embedding(tmp_path / "missing")
    save_file({"other": np.zeros(3, np.float32)}, str(tmp_path / "x.safetensors"), metadata={"embedder": "dlib"})
    with pytest.raises(InputError, match="no 'identity' tensor"):
        embed.load_identity_embedding(tmp_path / "x.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable safetensors"):
        embed.load_identity_embedding(tmp_path / "bad.safetensors")


def test_load_identity_embedding_rejects_a_dim_its_embedder_cannot_give(tmp_path):
    from safetensors.numpy import save_file

    identity = embed.l2_normalize(np.random.default_rng(0).normal(size=512)).astype(np.float32)
    save_file({"identity": identity}, str(tmp_path / "e.safetensors"), metadata={"embedder": "dlib", "dim": "512"})
    with pytest.raises(InputError, match=r"metadata says embedder 'dlib', which gives 128-D embeddings, but the identity "
                                         r"has 512 dims: the file is inconsistent; rerun embed-faces"):
        embed.load_identity_embedding(tmp_path / "e.safetensors")
    save_file({"identity": identity}, str(tmp_path / "e.safetensors"), metadata={"embedder": "dlib"})  # no dim: still
    with pytest.raises(InputError, match="which gives 128-D"):
        embed.load_identity_embedding(tmp_path / "e.safetensors")
    save_file({"identity": identity}, str(tmp_path / "e.safetensors"), metadata={"embedder": "dlib", "dim": "128"})
    with pytest.raises(InputError, match="metadata dim 128 != identity length 512"):
        embed.load_identity_embedding(tmp_path / "e.safetensors")
    for name in ("arcface-onnx", "clip"):  # their dimension is the user's model's: not known here
        save_file({"identity": identity}, str(tmp_path / "e.safetensors"), metadata={"embedder": name, "dim": "512"})
        assert embed.load_identity_embedding(tmp_path / "e.safetensors")[1]["dim"] == 512
    save_file({"identity": identity[:128]}, str(tmp_path / "e.safetensors"), metadata={"embedder": "dlib", "dim": "128"})
    assert embed.load_identity_embedding(tmp_path / "e.safetensors")[1]["dim"] == 128


def test_model_path_required_for_user_supplied_embedders(params):
    for name in ("arcface-onnx", "clip"):
        with pytest.raises(InputError, match="needs embed_faces.model_path"):
            embed.build_embedder(dataclasses.replace(params.embed_faces, embedder=name, model_path=""))


# --------------------------------------------------------------------------- arcface-onnx with a hand-built ONNX file
# (the `onnx` package is not installed; ONNX files are protobuf, written here field by field)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    data = value.encode() if isinstance(value, str) else value
    return _varint(num << 3 | 2) + _varint(len(data)) + data


def _value_info(name: str, dims: list) -> bytes:
    shape = b"".join(_field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims)
    return _field(1, name) + _field(2, _field(1, _field(1, 1) + _field(2, shape)))


def _tiny_arcface_onnx(path: Path, dim: int = 16) -> None:
    """[N,3,112,112] -> AveragePool 28x28 -> Flatten -> MatMul [48, dim] (a fixed random projection)."""
    weight = np.random.default_rng(0).normal(size=(48, dim)).astype(np.float32)
    ints = lambda name, vals: _field(5, _field(1, name) + b"".join(_field(8, v) for v in vals) + _field(20, 7))  # noqa: E731
    pool = _field(1, "x") + _field(2, "p") + _field(4, "AveragePool") + ints("kernel_shape", [28, 28]) + ints("strides", [28, 28])
    flat = _field(1, "p") + _field(2, "f") + _field(4, "Flatten")
    matmul = _field(1, "f") + _field(1, "W") + _field(2, "y") + _field(4, "MatMul")
    init = _field(1, 48) + _field(1, dim) + _field(2, 1) + _field(8, "W") + _field(9, weight.tobytes())
    graph = (
        _field(1, pool) + _field(1, flat) + _field(1, matmul) + _field(2, "tiny_arcface") + _field(5, init)
        + _field(11, _value_info("x", ["n", 3, 112, 112])) + _field(12, _value_info("y", ["n", dim]))
    )
    model = _field(1, 8) + _field(2, "faceid-test") + _field(7, graph) + _field(8, _field(1, "") + _field(2, 13))
    path.write_bytes(model)


def test_arcface_onnx_embedder_runs_a_real_onnx_file(tmp_path, planted, params):
    crops, _, _ = planted
    _tiny_arcface_onnx(tmp_path / "arc.onnx")
    cfg = dataclasses.replace(params.embed_faces, embedder="arcface-onnx", model_path=str(tmp_path / "arc.onnx"), outlier_threshold=0.01)
    embedder = embed.build_embedder(cfg)
    assert (embedder.name, embedder.dim, embedder.input_size) == ("arcface-onnx", 16, 112)
    chips = [np.asarray(Image.open(p).convert("RGB")) for _, p in crop.read_accepted(crops, 112)]
    out = embedder.embed(chips)
    assert out.shape == (6, 16) and np.isfinite(out).all()
    # matches the same arithmetic in numpy: 112 px chip, [-1, 1], 4x4 average pool, projection
    x = (embed._resize(chips[0], 112).astype(np.float32) - 127.5) / 127.5
    pooled = x.reshape(4, 28, 4, 28, 3).mean(axis=(1, 3)).transpose(2, 0, 1).reshape(-1)
    weight = np.random.default_rng(0).normal(size=(48, 16)).astype(np.float32)
    np.testing.assert_allclose(out[0], pooled @ weight, rtol=1e-4, atol=1e-4)
    report = embed.run(cfg, crops, tmp_path / "emb")
    assert report["embedder"] == "arcface-onnx" and report["dim"] == 16
    identity, meta = embed.load_identity_embedding(tmp_path / "emb")
    assert identity.shape == (16,) and meta["embedder"] == "arcface-onnx"


def test_arcface_onnx_rejects_a_missing_or_wrong_file(tmp_path, params):
    cfg = dataclasses.replace(params.embed_faces, embedder="arcface-onnx", model_path=str(tmp_path / "none.onnx"))
    with pytest.raises(InputError, match="file not found"):
        embed.build_embedder(cfg)


def test_clip_embedder_from_a_local_folder(tmp_path, planted, params):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=224, patch_size=32, projection_dim=24)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil().save_pretrained(tmp_path / "clip")
    cfg = dataclasses.replace(params.embed_faces, embedder="clip", model_path=str(tmp_path / "clip"))
    embedder = embed.build_embedder(cfg)
    assert (embedder.name, embedder.dim, embedder.input_size) == ("clip", 24, 224)
    crops, _, _ = planted
    chips = [np.asarray(Image.open(p).convert("RGB")) for _, p in crop.read_accepted(crops, 224)[:2]]
    out = embedder.embed(chips)
    assert out.shape == (2, 24) and np.isfinite(out).all()
    np.testing.assert_allclose(embedder.embed(chips[:1])[0], out[0], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- mixed sets and group photos (real photos)

@pytest.fixture(scope="module")
def mixed(tmp_path_factory, params):
    """One crop-faces run over photos of the person (3 obama), of another man (biden and a mirrored
    copy) and three group photos: ``group`` (biden's larger face beside the person's), ``twins``
    (the person twice) and ``strangers`` (biden beside grace_hopper). Tests embed subsets of it."""
    from PIL import ImageOps

    photos = extract_archive_photos(ARCHIVE)
    rgb = {n: Image.open(io.BytesIO(photos[n])).convert("RGB") for n in (*OBAMA, "biden.jpg")}
    src = tmp_path_factory.mktemp("mixed_in")
    for name in ("obama.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg", "biden.jpg"):
        (src / name).write_bytes(photos[name])
    ImageOps.mirror(rgb["biden.jpg"]).save(src / "biden_mirrored.png")
    biden, obama2 = head(rgb["biden.jpg"], HEAD_BOXES["biden.jpg"], 0.6), head(rgb["obama2.jpg"], HEAD_BOXES["obama2.jpg"], 0.42)
    side_by_side(biden, obama2).save(src / "group.png")
    side_by_side(obama2, ImageOps.mirror(head(rgb["obama.jpg"], HEAD_BOXES["obama.jpg"], 0.5))).save(src / "twins.png")
    hopper = Image.fromarray(package_photos()["grace_hopper"])
    side_by_side(ImageOps.mirror(biden), head(hopper, (166, 128, 366, 329), 0.75)).save(src / "strangers.png")
    out = tmp_path_factory.mktemp("mixed_crops") / "crops"
    crop.run(params.crop_faces, src, out)
    return out


def _subset(crops: Path, names: list[str], dest: Path) -> Path:
    """A copy of the crop-faces output in which only ``names`` are accepted."""
    import shutil

    from faceid.io import write_parquet

    shutil.copytree(crops, dest)
    rows = read_parquet(dest / "manifest.parquet")
    assert {n for n in names} <= {r["name"] for r in rows if r["status"] == "accepted"}
    for r in rows:
        if r["name"] not in names:
            r.update(status="rejected", reason="not_in_test", detail="left out by the test")
    write_parquet(dest / "manifest.parquet", rows, schema=crop._manifest_schema((150, 512)))
    return dest


def test_mixed_crop_run_keeps_the_group_photos_faces(mixed):
    rows = {r["name"]: r for r in read_parquet(mixed / "manifest.parquet")}
    assert {n for n, r in rows.items() if r["status"] == "accepted"} == {
        "obama", "obama_partial_face", "obama_partial_face2", "biden", "biden_mirrored", "group", "twins", "strangers"}
    for name in ("group", "twins", "strangers"):
        assert rows[name]["num_faces"] == 2 and rows[name]["num_candidates"] == 2
    assert rows["obama"]["num_candidates"] == 1
    others = {r["name"]: r for r in read_parquet(mixed / "other_faces.parquet")}
    assert set(others) == {"group", "twins", "strangers"} and all(r["candidate"] == 1 for r in others.values())
    assert rows["group"]["face_size"] > others["group"]["face_size"]  # the stranger's face is the main (largest) one
    assert (mixed / "other_faces" / "512" / "group.1.png").is_file()
    assert dict(crop.read_candidates(mixed, 150))["group"] == [mixed / "crops/150/group.png", mixed / "other_faces/150/group.1.png"]
    assert "group.png: face" in (mixed / "summary.txt").read_text()
    assert "(2 faces: 2 candidates, embed-faces picks the person's)" in (mixed / "summary.txt").read_text()


def test_two_plus_two_stops_and_names_both_groups(mixed, params, tmp_path):
    crops = _subset(mixed, ["obama", "obama_partial_face", "biden", "biden_mirrored"], tmp_path / "crops")
    with pytest.raises(InputError) as err:
        embed.run(dataclasses.replace(params.embed_faces, min_photos=2), crops, tmp_path / "emb")
    msg = str(err.value)
    assert "the photos show 2 different people with no clear majority (dlib, same person at mean pairwise cosine >= 0.900)" in msg
    assert "the largest groups have 2 photos each. Keep only photos of one person" in msg
    assert "group 1 (2 photos): biden, biden_mirrored" in msg and "group 2 (2 photos): obama, obama_partial_face" in msg
    assert not (tmp_path / "emb").exists()


def test_three_plus_one_excludes_and_names_the_one(mixed, params, tmp_path, capsys):
    crops = _subset(mixed, ["obama", "obama_partial_face", "obama_partial_face2", "biden"], tmp_path / "crops")
    report = embed.run(params.embed_faces, crops, tmp_path / "emb")
    assert report["groups"] == [
        {"group": 1, "identity": True, "photos": ["obama", "obama_partial_face", "obama_partial_face2"]},
        {"group": 2, "identity": False, "photos": ["biden"]},
    ]
    assert [o["name"] for o in report["outliers"]] == ["biden"] and report["several_faces"] == {}
    rows = {r["name"]: r for r in read_parquet(tmp_path / "emb" / "embeddings.parquet")}
    assert (rows["biden"]["group"], rows["biden"]["outlier"], rows["obama"]["group"], rows["obama"]["outlier"]) == (2, True, 1, False)
    assert rows["biden"]["reason"].startswith("another person: same-person group 2, mean cosine to the identity (group 1, 3 photos) 0.8")
    printed = capsys.readouterr().out
    assert "embed-faces: 3/4 photos agree on one identity" in printed and "groups of 3 + 1" in printed
    assert "\n  excluded biden: another person: same-person group 2" in printed
    # 3 + 2 is a clear majority too: both photos of the other man go, named as one group
    crops = _subset(mixed, ["obama", "obama_partial_face", "obama_partial_face2", "biden", "biden_mirrored"], tmp_path / "crops5")
    report = embed.run(params.embed_faces, crops, tmp_path / "emb5")
    assert [g["photos"] for g in report["groups"]] == [["obama", "obama_partial_face", "obama_partial_face2"], ["biden", "biden_mirrored"]]
    assert sorted(o["name"] for o in report["outliers"]) == ["biden", "biden_mirrored"]


def test_group_photo_uses_the_persons_face_never_the_larger_strangers(mixed, params, tmp_path, capsys):
    from safetensors.numpy import load_file

    crops = _subset(mixed, ["group", "obama", "obama_partial_face", "obama_partial_face2"], tmp_path / "crops")
    report = embed.run(params.embed_faces, crops, tmp_path / "emb")
    assert report["inliers"] == ["group", "obama", "obama_partial_face", "obama_partial_face2"] and report["outliers"] == []
    group = report["several_faces"]["group"]
    assert group["face"] == 1 and group["match"][1] > 0.93 and group["match"][0] < 0.86  # biden's face: another person
    rows = {r["name"]: r for r in read_parquet(tmp_path / "emb" / "embeddings.parquet")}
    assert (rows["group"]["face"], rows["group"]["faces"], rows["group"]["group"]) == (1, 2, 1)
    assert rows["group"]["crop_path"] == "other_faces/150/group.1.png"
    assert "group: face 1 of 2 is the person" in capsys.readouterr().out
    # what training reads: per_image is the person's face, and read_photos returns that face
    embedder = embed.DlibEmbedder()
    person, stranger = embedder.embed([np.asarray(Image.open(crops / p).convert("RGB"))
                                       for p in ("other_faces/150/group.1.png", "crops/150/group.png")])
    tensors = load_file(str(tmp_path / "emb" / "embeddings.safetensors"))
    names = embed.load_identity_embedding(tmp_path / "emb")[1]["names"]
    np.testing.assert_allclose(tensors["per_image"][names.index("group")], person, atol=1e-6)
    unit = embed.l2_normalize(np.stack([person, stranger]))
    assert float(unit[0] @ tensors["identity"]) > 0.95 and float(unit[1] @ tensors["identity"]) < 0.86
    others = {r["name"]: r for r in read_parquet(crops / "other_faces.parquet")}
    record = {r.name: r for r in crop.read_photos(crops, tmp_path / "emb")}["group"]
    assert record.crop_path == (crops / "other_faces/512/group.1.png").resolve()
    np.testing.assert_allclose(record.box, others["group"]["box"], rtol=1e-5)
    assert {r.name: r for r in crop.read_photos(crops, tmp_path / "emb" / "embeddings.safetensors")}["group"].box == record.box
    main = {r.name: r for r in crop.read_photos(crops)}["group"]  # without embed-faces: crop-faces' main face
    assert main.box[2] < record.box[0] and main.crop_path == (crops / "crops/512/group.png").resolve()  # biden, left


def test_group_photos_where_no_face_or_two_faces_match_are_excluded(mixed, params, tmp_path):
    crops = _subset(mixed, ["twins", "strangers", "obama", "obama_partial_face", "obama_partial_face2"], tmp_path / "crops")
    report = embed.run(params.embed_faces, crops, tmp_path / "emb")
    assert report["inliers"] == ["obama", "obama_partial_face", "obama_partial_face2"]
    reasons = {o["name"]: o["reason"] for o in report["outliers"]}
    assert reasons["twins"].startswith("ambiguous: 2 of its faces match the identity (face 0 0.9")
    assert reasons["strangers"].startswith("none of its 2 faces is the person: best face")
    assert report["several_faces"]["twins"]["face"] is None and report["several_faces"]["strangers"]["face"] is None
    rows = {r["name"]: r for r in read_parquet(tmp_path / "emb" / "embeddings.parquet")}
    assert rows["twins"]["outlier"] and rows["strangers"]["outlier"] and rows["twins"]["group"] is None
    from faceid.train.data import load_photo_embeddings

    kept, excluded = load_photo_embeddings(tmp_path / "emb")
    assert sorted(kept) == ["obama", "obama_partial_face", "obama_partial_face2"] and excluded == ["strangers", "twins"]
    # only photos with several faces: nothing to tell who the person is
    crops = _subset(mixed, ["group", "twins", "strangers"], tmp_path / "crops3")
    with pytest.raises(InputError, match=r"every photo shows several faces \(group, strangers, twins\)"):
        embed.run(params.embed_faces, crops, tmp_path / "emb3")


def test_read_photos_needs_the_choice_for_a_photo_with_several_faces(mixed, params, tmp_path):
    crops = _subset(mixed, ["group", "obama", "obama_partial_face", "obama_partial_face2"], tmp_path / "crops")
    embed.run(params.embed_faces, crops, tmp_path / "emb")
    rows = read_parquet(tmp_path / "emb" / "embeddings.parquet")
    from faceid.io import write_parquet

    write_parquet(tmp_path / "emb" / "embeddings.parquet", [{k: v for k, v in r.items() if k != "face"} for r in rows])
    with pytest.raises(InputError, match=r"no 'face' entry for group.png .*rerun embed-faces"):
        crop.read_photos(crops, tmp_path / "emb")


def test_embeddings_record_the_sha256_of_each_crop_they_embedded(sample_identity):
    """Issue 21 item 4: embeddings.parquet names the crop file each photo's embedding came from and its
    sha256 (train-lora checks them: tests/test_train.py::test_crops_and_embeddings_of_different_photos_are_refused)."""
    from faceid.io import sha256_file

    crops, emb = sample_identity
    rows = read_parquet(emb / "embeddings.parquet")
    assert rows and all(r["crop_sha256"] == sha256_file(crops / r["crop_path"]) for r in rows)
    assert len({r["crop_sha256"] for r in rows}) == len(rows)  # one crop per photo, each its own
