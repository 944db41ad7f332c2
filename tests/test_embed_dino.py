"""DINOv2 / DINOv3 embedders: tiny random transformers models from a local folder run embed-faces and
FaceSim on the sample identity's crops; a wrong embed_faces.model_path is a clear error."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from faceid.config import load_params
from faceid.errors import ConfigError, InputError
from faceid.faces import crop, embed, similarity
from faceid.sample_data import dance_frames

# The preprocessor_config.json of the released DINOv3 checkpoints (facebook/dinov3-*): its processor
# class needs torchvision, so the embedder reads the same settings with a PIL processor. 64 px here.
DINOV3_PREPROCESSOR = {
    "crop_size": None, "do_center_crop": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_processor_type": "DINOv3ViTImageProcessorFast",
    "image_std": [0.229, 0.224, 0.225], "resample": 2, "rescale_factor": 1 / 255, "size": {"height": 64, "width": 64},
}
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{embedder: folder}``: tiny random DINOv2 (patch 14, 56 px, BitImageProcessor) and DINOv3
    (patch 16, 64 px, the released checkpoints' processor config) models saved with save_pretrained."""
    import torch
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model, DINOv3ViTConfig, DINOv3ViTModel

    root = tmp_path_factory.mktemp("dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(**TINY, patch_size=14, image_size=56)).save_pretrained(root / "dinov2")
    BitImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, image_mean=[0.485, 0.456, 0.406],
                         image_std=[0.229, 0.224, 0.225]).save_pretrained(root / "dinov2")
    DINOv3ViTModel(DINOv3ViTConfig(**TINY, patch_size=16, image_size=64)).save_pretrained(root / "dinov3")
    (root / "dinov3" / "preprocessor_config.json").write_text(json.dumps(DINOV3_PREPROCESSOR))
    return {"dinov2": root / "dinov2", "dinov3": root / "dinov3"}


def _cfg(params, embedder: str, model_path, **kwargs):
    return dataclasses.replace(params.embed_faces, embedder=embedder, model_path=str(model_path), **kwargs)


@pytest.mark.parametrize("name, side", [("dinov2", 56), ("dinov3", 64)])
def test_embed_faces_with_a_tiny_dino_model(name, side, models, sample_identity, params, tmp_path):
    from safetensors import safe_open

    crops, _ = sample_identity
    # a random model does not know faces: a low threshold keeps the sample photos one person
    cfg = _cfg(params, name, models[name], outlier_threshold=0.01)
    embedder = embed.build_embedder(cfg)
    assert (embedder.name, embedder.dim, embedder.input_size) == (name, 32, side)
    report = embed.run(cfg, crops, tmp_path / "emb", embedder=embedder)
    n = len(crop.read_candidates(crops, side))
    assert report["embedder"] == name and report["dim"] == 32 and len(report["inliers"]) == n >= 3

    with safe_open(str(tmp_path / "emb" / "embeddings.safetensors"), framework="numpy") as f:
        meta, per_image, identity = f.metadata(), f.get_tensor("per_image"), f.get_tensor("identity")
    assert (meta["embedder"], meta["dim"]) == (name, "32")
    assert per_image.shape == (n, 32) and identity.shape == (32,) and per_image.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(per_image, axis=1), 1.0, atol=1e-5)  # pooled CLS, L2-normalised
    assert np.linalg.norm(identity) == pytest.approx(1.0, abs=1e-5)
    cos = per_image @ per_image.T
    assert cos[~np.eye(n, dtype=bool)].max() < 0.9999  # different crops, different vectors
    loaded, loaded_meta = embed.load_identity_embedding(tmp_path / "emb")
    np.testing.assert_array_equal(loaded, identity)
    assert (loaded_meta["embedder"], loaded_meta["dim"]) == (name, 32)


def test_embedding_is_the_normalised_pooler_output_of_the_folders_processor(models, sample_identity, params):
    """The DINOv3 embedder reads the released checkpoints' processor settings (64 x 64, ImageNet mean/std)."""
    import torch
    from transformers import DINOv3ViTModel

    crops, _ = sample_identity
    embedder = embed.build_embedder(_cfg(params, "dinov3", models["dinov3"]))
    chip = np.asarray(Image.open(crop.read_candidates(crops, 64)[0][1][0]).convert("RGB"))
    x = np.asarray(Image.fromarray(chip).resize((64, 64), Image.BILINEAR), np.float32) / 255
    x = (x - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.inference_mode():
        pooled = DINOv3ViTModel.from_pretrained(models["dinov3"]).eval()(
            pixel_values=torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)).pooler_output[0].numpy()
    np.testing.assert_allclose(embedder.embed([chip])[0], pooled / np.linalg.norm(pooled), atol=1e-4)


def test_a_folder_without_a_processor_config_uses_the_default_preprocessing(models, params, tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        (folder / f).write_bytes((models["dinov2"] / f).read_bytes())
    embedder = embed.build_embedder(_cfg(params, "dinov2", folder))
    assert embedder.input_size == 224  # docs/embedders.md: 224 px, ImageNet mean/std
    chips = np.random.default_rng(0).integers(0, 255, size=(2, 150, 150, 3), dtype=np.uint8)
    out = embedder.embed(list(chips))
    assert out.shape == (2, 32) and embedder.embed([]).shape == (0, 32)


def test_facesim_scores_frames_with_a_dino_embedder(models, sample_dir, params):
    cfg = _cfg(params, "dinov2", models["dinov2"])
    reference = embed.l2_normalize(np.random.default_rng(1).normal(size=32)).astype(np.float32)
    photo = np.asarray(Image.open(sorted((sample_dir / "identities" / "obama").iterdir())[0]).convert("RGB"))
    frames = np.concatenate([dance_frames(photo, 2, 480, 320, seed=0), np.full((1, 480, 320, 3), 90, np.uint8)])
    with similarity.FaceSimScorer(reference, params.crop_faces, cfg) as scorer:
        result = scorer.score(frames)
    assert result["metric"] == "FaceSim-dinov2" and result["num_detected"] == 2 and result["per_frame"][2] is None
    assert all(-1.0 <= v <= 1.0 for v in result["per_frame"][:2]) and "mean_euclidean" not in result
    with pytest.raises(InputError, match="128 dims but embedder dinov2 gives 32"):
        similarity.FaceSimScorer(np.ones(128, np.float32), params.crop_faces, cfg)


# --------------------------------------------------------------------------- wrong embed_faces.model_path


def test_wrong_model_folders_are_clear_errors(models, params, tmp_path):
    def error(name: str, path) -> str:
        with pytest.raises(InputError) as info:
            embed.build_embedder(_cfg(params, name, path))
        return str(info.value)

    missing = error("dinov2", tmp_path / "nowhere")
    assert missing.startswith(f"embed_faces.model_path={tmp_path / 'nowhere'}: folder not found; expected a local DINOv2 "
                              "model folder for Dinov2Model (config.json with model_type 'dinov2', and its weights")
    assert "never a hub id" in error("dinov3", "facebook/dinov3-vits16-pretrain-lvd1689m")
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert "a file, not a folder" in error("dinov3", tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    assert "no config.json in the folder; expected a local DINOv3 model folder" in error("dinov3", tmp_path / "empty")
    # the other DINO, and a CLIP folder
    assert ("config.json has model_type 'dinov3_vit', but embed_faces.embedder=dinov2 expects 'dinov2'; that is a "
            "DINOv3 model: set embed_faces.embedder=dinov3") in error("dinov2", models["dinov3"])
    assert "that is a DINOv2 model: set embed_faces.embedder=dinov2" in error("dinov3", models["dinov2"])
    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
    assert "that is a CLIP vision model: set embed_faces.embedder=clip" in error("dinov2", tmp_path / "clip")
    (tmp_path / "vit").mkdir()
    (tmp_path / "vit" / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "config.json has model_type 'vit', but embed_faces.embedder=dinov3 expects 'dinov3_vit'; expected a local" in error(
        "dinov3", tmp_path / "vit")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_bytes((models["dinov2"] / "config.json").read_bytes())
    assert "cannot load a Dinov2Model from it" in error("dinov2", tmp_path / "noweights")
    for name in ("dinov2", "dinov3"):
        with pytest.raises(InputError, match=f"embed_faces.embedder={name} needs embed_faces.model_path"):
            embed.build_embedder(_cfg(params, name, ""))


def test_params_accept_the_dino_embedders(repo):
    for name in ("dinov2", "dinov3"):
        assert load_params(repo / "params.yaml", [f"embed_faces.embedder={name}"]).embed_faces.embedder == name
    with pytest.raises(ConfigError, match="embed_faces.embedder"):
        load_params(repo / "params.yaml", ["embed_faces.embedder=dinov4"])


def test_dino_default_thresholds_are_marked_uncalibrated(params):
    for name in ("dinov2", "dinov3"):
        assert name in embed.DEFAULT_OUTLIER_THRESHOLDS and name not in embed.CALIBRATED_EMBEDDERS
        assert embed._threshold_source(_cfg(params, name, "")) == "uncalibrated default"
    assert embed._threshold_source(params.embed_faces) == "calibrated default"  # dlib
