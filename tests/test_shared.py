"""train-shared (issue 25) as users run it, on the real photos of four people (sample-data's people/):
one adapter trained through the identity recipe on Ray and registered; a person it never saw rendered
zero-shot from their embed-faces output (face_scale 0 is the base exactly, one LoRA for a blend of
people); per-person training started from it (--init-from); and each misuse refused in one line
before any model loads. Whether a shared adapter *generalises* (held-out people, interpolation, the
fine-tuning speed-up) is proved in the synthetic world of tests/test_shared_adapter.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from faceid.config import params_from_dict, to_dict

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def people(tmp_path_factory, params, sample_dir):
    """``(crops root, embeddings root)``: crop-faces and embed-faces run on sample-data's people/ folder."""
    from faceid.faces import crop, embed

    root = tmp_path_factory.mktemp("people")
    crop.run_many(params.crop_faces, sample_dir / "people", root / "crops")
    embed.run_many(params.embed_faces, root / "crops", root / "emb")
    return root / "crops", root / "emb"


def small(params, tmp: Path, *extra: str):
    return params_from_dict(to_dict(params), [
        f"train_lora.cache_dir={tmp / 'cache'}", f"ray.storage_path={tmp / 'ray'}", "train_lora.stage1.steps=4",
        "train_lora.stage2.steps=4", "train_lora.stage1.learning_rate=0.01", "train_lora.stage2.learning_rate=0.01",
        "train_lora.checkpoint_every=100", "train_lora.validation.validate_every=4", *extra])


@pytest.fixture(scope="module")
def shared(tmp_path_factory, params, people):
    """The shared adapter, trained by ``launch.run_shared`` (Ray Train, MLflow) on the synthetic clips of
    tests/test_train.py (no face in them: every clip is motion prior)."""
    from test_train import write_clips

    from faceid.tracking import local_store_uri
    from faceid.train import launch

    tmp = tmp_path_factory.mktemp("shared")
    clips = write_clips(tmp)
    p = small(params, tmp)
    uri = local_store_uri(tmp / "mlruns")
    summary = launch.run_shared(p, *people, clips, tmp / "adapter", mlflow_uri=uri)
    return {"params": p, "dir": tmp / "adapter", "clips": clips, "summary": summary, "uri": uri, "tmp": tmp}


def test_the_adapter_is_trained_on_every_person_but_the_held_out_one_and_registered(shared, people):
    from mlflow.tracking import MlflowClient

    from faceid.model.identity import load_identity, read_people
    from faceid.train.data import load_embedding

    adapter = load_identity(shared["dir"], model_cfg=shared["params"].model)
    card = adapter.card
    # every clip is prior (no face): each person is shown in 0 clips, so the last by name is held out
    assert card["kind"] == "shared" and card["people"] == {"trained": ["astronaut", "biden", "grace_hopper"],
                                                            "held_out": ["obama"]}
    assert (shared["dir"] / ".faceid-output.json").is_file()
    means = {p: load_embedding(people[1] / p)[0] for p in ("astronaut", "biden", "grace_hopper", "obama")}
    assert set(read_people(adapter)) == set(means)
    assert all(np.allclose(read_people(adapter)[p], e) for p, e in means.items())
    trained = np.mean([means[p] for p in card["people"]["trained"]], axis=0)
    assert np.allclose(adapter.embedding.numpy(), trained, atol=1e-6)
    # identity examples: every trained person's photos, each with its own embedding; the held-out person validates
    photos = [r for r in card["examples"] if r["kind"] == "photo"]
    assert {r["person"] for r in photos if r["role"] == "identity"} == {"astronaut", "biden", "grace_hopper"}
    assert {r["person"] for r in photos if r["role"] == "held_out"} == {"obama"}
    assert shared["summary"]["steps"] == 8 and shared["summary"]["people_trained"] == 3
    client = MlflowClient(tracking_uri=shared["uri"], registry_uri=shared["uri"])
    mv = client.get_model_version_by_alias("faceid-shared", shared["params"].tracking.register_alias)
    run = client.get_run(mv.run_id)
    assert run.data.tags["stage"] == "train_shared" and run.info.run_name.startswith("train-shared shared ")


def test_a_person_the_adapter_never_saw_is_rendered_zero_shot(shared, people):
    from faceid.model.generate import activate_loras, build_pipeline, face_tokens, generate_video
    from faceid.render import load_adapter, load_person

    p = shared["params"]
    adapter = load_adapter(shared["dir"], p)
    obama, biden = load_person(people[1] / "obama", adapter), load_person(people[1] / "biden", adapter)
    assert obama.card["zero_shot"]["embeddings"] == str(people[1] / "obama")
    assert obama.mapper is adapter.mapper and obama.lora_path == adapter.lora_path
    # the one mapper turns each person's own embedding into their tokens
    tokens = {who.name: face_tokens([(who, 1.0)], 1.0)[0] for who in (obama, biden)}
    assert not torch.allclose(tokens["obama"], tokens["biden"])
    with torch.no_grad():
        assert torch.allclose(tokens["obama"][0], adapter.mapper(obama.embedding[None])[0])
    pipe = build_pipeline(p.model, torch.device("cpu"))
    pipe.set_progress_bar_config(disable=True)
    pose = np.zeros((5, 32, 32, 3), np.uint8)
    pose[:, 8:24, 10:22] = 255

    def render(who, scale):
        return generate_video(pipe, who, pose, "a person dancing", face_scale=scale, lora_scale=1.0, guidance_scale=1.0,
                              num_inference_steps=2, seed=0)

    base = render(None, 1.0)
    assert np.array_equal(render(obama, 0.0), base)  # face_scale 0: the base model exactly
    assert not np.array_equal(render(obama, 1.0), base)
    # a blend of two people through one adapter: one LoRA, loaded once, at the blend's full weight
    names = activate_loras(pipe, [(obama, 0.5), (biden, 0.5)])
    assert len(names) == 1 and pipe.get_list_adapters()["transformer"] == names


def test_per_person_training_starts_from_the_shared_adapter(shared, people, tmp_path, sample_identity):
    from safetensors.torch import load_file

    from faceid.model.identity import load_identity
    from faceid.model.lora import read_weights
    from faceid.render import identity_sha256
    from faceid.train import recipe
    from faceid.train.launch import check_init_from

    p = shared["params"]
    parent = check_init_from(p, shared["dir"], "")
    crops, emb = sample_identity
    config = {"params": to_dict(p), "identity": "obama", "crops_dir": str(crops), "embeddings_dir": str(emb),
              "clips_dir": str(shared["clips"]), "output_dir": str(tmp_path / "obama"),
              "init_from": parent["path"], "init_from_sha256": parent["sha256"]}
    starts = []
    summary = recipe.train(config, on_validation=lambda point, folder: starts.append(point))
    card = load_identity(tmp_path / "obama").card
    assert card["init_from"] == {"path": str(shared["dir"].resolve()), "name": "shared",
                                 "sha256": identity_sha256(shared["dir"])}
    # train_lora.init_from_share (0.34) of the 4 + 4 configured steps
    assert (card["train"]["stage1_steps"], card["train"]["stage2_steps"]) == (1, 1) and summary["steps"] == 2
    # it started from the adapter: its step-0 held-out loss is the adapter's, not an untrained mapper's
    scratch = []
    recipe.train({k: v for k, v in config.items() if not k.startswith("init_from")} | {"output_dir": str(tmp_path / "s")},
                 on_validation=lambda point, folder: scratch.append(point))
    assert starts[0]["step"] == scratch[0]["step"] == 0
    assert starts[0]["identity_loss"] != pytest.approx(scratch[0]["identity_loss"], rel=1e-6)
    adapter_lora = read_weights(shared["dir"] / "pytorch_lora_weights.safetensors")[0]
    trained = load_file(str(tmp_path / "obama" / "pytorch_lora_weights.safetensors"))
    assert set(trained) == set(adapter_lora)


def test_misuse_is_one_clear_line_before_any_model(shared, people, repo, tmp_path, sample_identity, capsys, no_model):
    from faceid.cli import main

    crops, emb = people
    pose = next((shared["clips"] / "clips").glob("*/pose.mp4"))
    one = tmp_path / "one_person"
    one.mkdir()
    (one / "obama").symlink_to(emb / "obama")
    nocrops = tmp_path / "no_crops"  # three people's embeddings, crops of only two
    nocrops.mkdir()
    for name in ("astronaut", "biden", "obama"):
        (nocrops / name).symlink_to(emb / name)
    some_crops = tmp_path / "some_crops"
    some_crops.mkdir()
    for name in ("astronaut", "biden"):
        (some_crops / name).symlink_to(crops / name)
    other = tmp_path / "other_embedder"  # a person embedded with another embedder than the adapter's (dlib)
    other.mkdir()
    from safetensors.numpy import save_file

    save_file({"identity": np.ones(128, np.float32)}, str(other / "embeddings.safetensors"),
              metadata={"embedder": "arcface-onnx", "dim": "128"})
    cases = [
        (["train-shared", "--crops", some_crops, "--embeddings", nocrops, "--clips", shared["clips"], "--output",
          tmp_path / "g"], "no crop-faces folder for obama"),
        (["infer", "--adapter", shared["dir"], "--identity", other, "--pose-video", pose, "--output", tmp_path / "h.mp4"],
         "embedded with 'arcface-onnx'; the shared adapter"),
        (["train-shared", "--crops", crops, "--embeddings", one, "--clips", shared["clips"], "--output", tmp_path / "a"],
         "at least 2 must train"),
        (["train-shared", "--crops", crops, "--embeddings", emb / "obama", "--clips", shared["clips"], "--output",
          tmp_path / "b"], "the embed-faces output of ONE person"),
        (["infer", "--adapter", shared["dir"], "--identity", crops / "obama", "--pose-video", pose, "--output",
          tmp_path / "c.mp4"], "a person's embed-faces output folder"),
        (["infer", "--adapter", emb / "obama", "--identity", emb / "obama", "--pose-video", pose, "--output",
          tmp_path / "d.mp4"], "identity.json missing"),
        (["train-lora", "--identity", "x", "--crops", sample_identity[0], "--embeddings", sample_identity[1], "--clips",
          shared["clips"], "--output", tmp_path / "e", "--init-from", emb / "obama"], "identity.json missing"),
        (["--set", "train_lora.lora.rank=4", "train-lora", "--identity", "x", "--crops", sample_identity[0],
          "--embeddings", sample_identity[1], "--clips", shared["clips"], "--output", tmp_path / "f",
          "--init-from", shared["dir"]], "set train_lora.lora to the adapter's"),
    ]
    for args, expected in cases:
        code = main(["--params", str(repo / "params.yaml"), *map(str, args)])
        out = "".join(capsys.readouterr())
        assert code == 2 and expected in out and "Traceback" not in out, (args, out)
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c.mp4", "d.mp4", "e", "f", "g", "h.mp4"))
