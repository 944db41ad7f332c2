"""Shared fixtures: the repository's params.yaml and one sample-data folder per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from faceid.config import load_params

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / ".cache" / "packages" / "face_recognition-1.3.0.tar.gz"


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def params():
    """The demo params.yaml of the repository (tiny profile), archive path made absolute."""
    return load_params(REPO / "params.yaml", [f"sample_data.photo_archive={ARCHIVE}"])


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, params) -> Path:
    """``faceid sample-data`` output: real photos and short real-person dance videos."""
    from faceid import sample_data

    out = tmp_path_factory.mktemp("sample") / "sample"
    sample_data.run(params.sample_data, out)
    return out


@pytest.fixture(scope="session")
def sample_identity(tmp_path_factory, params, sample_dir) -> tuple[Path, Path]:
    """``(crops, embeddings)``: the real crop-faces and embed-faces outputs of the sample identity."""
    from faceid.faces import crop, embed

    root = tmp_path_factory.mktemp("sample_identity")
    crop.run(params.crop_faces, sample_dir / "identities" / "obama", root / "crops")
    embed.run(params.embed_faces, root / "crops", root / "embeddings")
    return root / "crops", root / "embeddings"


@pytest.fixture
def no_model(monkeypatch):
    """Building the pipeline fails the test: inputs must be checked before any model loads."""
    import faceid.model.generate

    def built(*args, **kwargs):
        raise AssertionError("the model was built before the inputs were checked")

    monkeypatch.setattr(faceid.model.generate, "build_pipeline", built)
