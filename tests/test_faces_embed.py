"""embed-faces on real photos: same person above different people, a planted photo flagged, other embedders."""

from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest
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


def test_too_few_consistent_photos_fails_and_writes_nothing(planted, params, tmp_path):
    crops, _, _ = planted
    strict = dataclasses.replace(params.embed_faces, outlier_threshold=0.999)
    with pytest.raises(InputError) as err:
        embed.run(strict, crops, tmp_path / "emb")
    assert "min_photos is 3" in str(err.value) and "obama2: similarity" in str(err.value)
    assert not (tmp_path / "emb").exists()


def test_leave_one_out_similarity_pure():
    rng = np.random.default_rng(0)
    base = rng.normal(size=16)
    same = base + 0.1 * rng.normal(size=(4, 16))
    other = rng.normal(size=(1, 16))
    sims = embed.leave_one_out_similarity(np.vstack([same, other]))
    assert sims[:4].min() > 0.9 and sims[4] < 0.6
    assert np.isnan(embed.leave_one_out_similarity(base[None])).all()
    sims, outlier = embed.find_outliers(np.vstack([same, other, other + 0.01]), threshold=0.8)
    assert outlier.tolist() == [False] * 4 + [True, True]
    assert sims[:4].min() > 0.95 and sims[4:].max() < 0.6


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
