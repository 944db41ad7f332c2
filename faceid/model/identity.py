"""Identity folders: what ``train-lora`` writes and ``infer`` / ``render-validation`` read.

Layout (docs/architecture.md)::

    <identity>/
      pytorch_lora_weights.safetensors   diffusers LoRA (transformer.-prefixed keys)
      face_mapper.safetensors            FaceMapper weights (+ its config as metadata: dims, output_scale, gate_multiplier)
      identity_embedding.safetensors     tensor "identity" [D] (the embedding the mapper was trained on)
      identity.json                      the card (below)
      reference.png                      the identity's best aligned face crop (sharp, frontal), RGB
      metrics/train_loss.csv             step,stage,loss,lr (DVC plot)
      metrics/validation.csv             held-out losses and FaceSim per validation step (train_lora.validation)
      last/                              the last step's identity folder, when the folder above holds another (best) step

``reference.png`` is optional (folders written before it existed have none). It is what
``faceid infer --reference-only`` gives base VACE as ``reference_images`` (the training-free
baseline), and what an identity trained with ``train_lora.reference_image`` passes at inference
(card key ``reference_image``: ``{"file", "source", "in_training"}``).

The card's ``kept`` says which training step the folder holds and why (``faceid.train.validation``).

The card names the base model, the embedder and every dimension; :func:`load_identity` refuses
a folder whose card does not match the model or embedder it is used with (``InputError``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceid.errors import InputError

CARD_FILE = "identity.json"
MAPPER_FILE = "face_mapper.safetensors"
EMBEDDING_FILE = "identity_embedding.safetensors"
LOSS_FILE = "metrics/train_loss.csv"
VALIDATION_FILE = "metrics/validation.csv"
VALIDATION_COLUMNS = ("step", "stage", "identity_loss", "prior_loss", "facesim", "facesim_base", "best")
LAST_SUBDIR = "last"
REFERENCE_FILE = "reference.png"
CARD_VERSION = 1
SHARED_KIND = "shared"  # card "kind" of an adapter trained on many people (faceid.train.shared)


@dataclass
class Identity:
    """A trained identity, loaded on CPU. ``embedding`` is ``[D]`` float32; ``mapper`` is in eval mode."""

    name: str
    path: Path
    card: dict[str, Any]
    embedding: Any  # torch.Tensor [D]
    mapper: Any  # FaceMapper
    reference: Any = None  # np.ndarray [H, W, 3] uint8 RGB (reference.png), or None

    @property
    def reference_in_training(self) -> bool:
        """True when the adapter was trained with the reference image as VACE ``reference_images``
        (then inference must pass it too)."""
        return bool((self.card.get("reference_image") or {}).get("in_training"))

    @property
    def lora_path(self) -> Path:
        from faceid.model.lora import LORA_FILE

        return self.path / LORA_FILE

    def face_tokens(self) -> Any:
        """``[num_tokens, text_dim]``: the mapper applied to this identity's embedding."""
        import torch

        with torch.no_grad():
            return self.mapper(self.embedding.unsqueeze(0))[0]


def save_identity(
    folder: str | Path,
    *,
    name: str,
    card: dict[str, Any],
    mapper,
    embedding,
    transformer,
    loss_rows: list[dict] = (),
    adapter_name: str = "default",
    reference=None,
    validation_rows: list[dict] = (),
    people: dict | None = None,
) -> Path:
    """Write the identity folder atomically. ``card`` holds the training facts (base_model, embedder,
    lora, train_config_hash, data hashes...); dims are filled in from ``mapper``. ``reference``:
    the best aligned face crop ([H, W, 3] uint8 RGB) written as ``reference.png``, or None.
    ``validation_rows``: the validation points (``VALIDATION_COLUMNS``; None = not measured), if any.
    ``people``: a shared adapter's ``{person: mean embedding}`` (trained and held out), saved beside
    ``identity`` as tensor ``people`` [P, D] with the names in the metadata (:func:`read_people`)."""
    import torch
    from safetensors.torch import save_file

    from faceid.io import atomic_dir
    from faceid.model.lora import LORA_FILE, save_lora

    folder = Path(folder)
    embedding = torch.as_tensor(embedding, dtype=torch.float32).detach().cpu().contiguous()
    mcfg = mapper.config()
    if embedding.shape != (mcfg["embed_dim"],):
        raise InputError(f"identity {name}: embedding of shape {tuple(embedding.shape)} does not fit a mapper of dim {mcfg['embed_dim']}")
    full_card = {
        "card_version": CARD_VERSION,
        "name": name,
        **card,
        "embed_dim": mcfg["embed_dim"],
        "text_dim": mcfg["text_dim"],
        "num_face_tokens": mcfg["num_tokens"],
        "mapper_hidden_dim": mcfg["hidden_dim"],
        # face tokens: output scale = the text tokens' RMS measured in the run; the learned gate (0 untrained)
        "face_token_scale": mcfg["output_scale"],
        "face_gate": float(mapper.gate.detach().cpu()),
        "files": {"lora": LORA_FILE, "mapper": MAPPER_FILE, "embedding": EMBEDDING_FILE, "train_loss": LOSS_FILE},
    }
    with atomic_dir(folder) as tmp:
        save_lora(tmp, transformer, adapter_name)
        mapper_state = {k: v.detach().float().cpu().contiguous() for k, v in mapper.state_dict().items()}
        save_file(mapper_state, str(tmp / MAPPER_FILE), metadata={"config": json.dumps(mcfg)})
        tensors, meta = {"identity": embedding}, {"embedder": str(card.get("embedder", "")), "dim": str(embedding.numel())}
        if people:
            names = sorted(people)
            tensors["people"] = torch.stack([torch.as_tensor(people[n], dtype=torch.float32).reshape(-1) for n in names])
            meta["people"] = json.dumps(names)
        save_file(tensors, str(tmp / EMBEDDING_FILE), metadata=meta)
        if reference is not None:
            from PIL import Image

            Image.fromarray(_check_rgb(reference, f"identity {name}: reference image")).save(tmp / REFERENCE_FILE)
        (tmp / CARD_FILE).write_text(json.dumps(full_card, indent=2, sort_keys=True) + "\n")
        (tmp / "metrics").mkdir()
        lines = ["step,stage,loss,lr"] + [f"{r['step']},{r['stage']},{r['loss']:.6g},{r['lr']:.6g}" for r in loss_rows]
        (tmp / LOSS_FILE).write_text("\n".join(lines) + "\n")
        if validation_rows:
            cells = [",".join("" if r.get(c) is None else f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                              for c in VALIDATION_COLUMNS) for r in validation_rows]
            (tmp / VALIDATION_FILE).write_text("\n".join([",".join(VALIDATION_COLUMNS)] + cells) + "\n")
    return folder


def load_identity(path: str | Path, model_cfg=None, embedder: str | None = None, embed_dim: int | None = None) -> Identity:
    """Read an identity folder (on CPU). With ``model_cfg`` / ``embedder`` / ``embed_dim`` given,
    raise ``InputError`` if the identity was trained for another base model, embedder or dim."""
    import torch

    from faceid.io import read_json
    from faceid.model.lora import LORA_FILE, RETRAIN, read_weights
    from faceid.model.mapper import FaceMapper, legacy_state

    path = Path(path)
    if path.is_file():
        raise InputError(f"{path} is a file; expected a folder (an identity folder: the output folder of train-lora)")
    if not path.is_dir():
        raise InputError(f"{path}: identity folder not found (expected the output folder of train-lora)")
    for f in (CARD_FILE, MAPPER_FILE, EMBEDDING_FILE):
        if not (path / f).is_file():
            raise InputError(f"{path}: {f} missing; not an identity folder written by train-lora")
    card = read_json(path / CARD_FILE)
    for key in ("name", "base_model", "embedder", "embed_dim", "text_dim", "num_face_tokens"):
        if key not in card:
            raise InputError(f"{path / CARD_FILE}: key {key!r} missing from the identity card")

    # every weights file is read (headers and data) before anything is built: a truncated one is named
    mapper_state, mapper_meta = read_weights(path / MAPPER_FILE)
    embedding = read_weights(path / EMBEDDING_FILE)[0].get("identity")
    if (path / LORA_FILE).is_file():
        read_weights(path / LORA_FILE)
    try:
        mcfg = json.loads(mapper_meta.get("config", "{}"))
        if not isinstance(mcfg, dict):
            raise ValueError(f"a {type(mcfg).__name__}, not an object")
    except ValueError as exc:
        raise InputError(f"{path / MAPPER_FILE}: metadata 'config' is not a JSON object ({exc}); {RETRAIN}") from None
    if mcfg.get("embed_dim") != card["embed_dim"] or mcfg.get("text_dim") != card["text_dim"]:
        raise InputError(f"{path}: {MAPPER_FILE} (config {mcfg}) does not match the card (embed_dim {card['embed_dim']}, text_dim {card['text_dim']})")
    try:
        # files written before the output scale and the gate existed: scale 1, gate open (what they computed)
        mcfg, mapper_state = legacy_state(mcfg, mapper_state)
        mapper = FaceMapper(mcfg["embed_dim"], mcfg["text_dim"], mcfg["num_tokens"], mcfg["hidden_dim"],
                            output_scale=mcfg["output_scale"], gate_multiplier=mcfg["gate_multiplier"])
        mapper.load_state_dict(mapper_state)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise InputError(f"{path / MAPPER_FILE}: the tensors do not fit the mapper its metadata describes "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0]}); {RETRAIN}") from None
    mapper.eval().requires_grad_(False)
    if embedding is None or embedding.shape != (card["embed_dim"],):
        raise InputError(f"{path / EMBEDDING_FILE}: expected tensor 'identity' of shape [{card['embed_dim']}]")
    reference = None
    if (path / REFERENCE_FILE).is_file():
        from PIL import Image

        try:
            with Image.open(path / REFERENCE_FILE) as im:
                reference = np.asarray(im.convert("RGB"))
        except OSError as exc:
            raise InputError(f"{path / REFERENCE_FILE}: unreadable reference image ({exc})") from None
    if (card.get("reference_image") or {}).get("in_training") and reference is None and card.get("kind") != SHARED_KIND:
        raise InputError(f"{path}: the card says the adapter was trained with {REFERENCE_FILE}, but the file is missing")
    identity = Identity(name=card["name"], path=path, card=card, embedding=embedding.to(torch.float32), mapper=mapper,
                        reference=reference)
    check_compatible(identity, model_cfg=model_cfg, embedder=embedder, embed_dim=embed_dim)
    return identity


def check_compatible(identity: Identity, model_cfg=None, embedder: str | None = None, embed_dim: int | None = None) -> None:
    """Raise ``InputError`` naming the mismatch (base model, text dim, embedder, embedding dim)."""
    from faceid.model.base_model import base_model_id, text_dim

    card, where = identity.card, identity.path / CARD_FILE
    if model_cfg is not None:
        if card["base_model"] != base_model_id(model_cfg):
            raise InputError(
                f"{where}: identity {identity.name} was trained on base model {card['base_model']!r}, "
                f"but the model is {base_model_id(model_cfg)!r} (model.profile={model_cfg.profile}); retrain or switch profile"
            )
        if card["text_dim"] != text_dim(model_cfg):
            raise InputError(f"{where}: face tokens of width {card['text_dim']}, model text_dim is {text_dim(model_cfg)}")
    if embedder is not None and card["embedder"] != embedder:
        raise InputError(f"{where}: identity {identity.name} uses embedder {card['embedder']!r}, not {embedder!r}")
    if embed_dim is not None and card["embed_dim"] != embed_dim:
        raise InputError(f"{where}: identity {identity.name} expects {card['embed_dim']}-D embeddings, got {embed_dim}-D")


def _check_rgb(image, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise InputError(f"{where}: expected a uint8 RGB array [H, W, 3], got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)


# --------------------------------------------------------------------------- shared adapters (train-shared)

def is_shared(identity: Identity) -> bool:
    return identity.card.get("kind") == SHARED_KIND


def read_people(adapter: Identity) -> dict[str, np.ndarray]:
    """A shared adapter's ``{person: mean embedding}`` (``people`` in ``identity_embedding.safetensors``);
    {} for a folder without them."""
    from faceid.model.lora import read_weights

    tensors, meta = read_weights(adapter.path / EMBEDDING_FILE)
    if "people" not in tensors:
        return {}
    try:
        names = json.loads(meta.get("people", "[]"))
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != len(tensors["people"]):
        raise InputError(f"{adapter.path / EMBEDDING_FILE}: 'people' has {len(tensors['people'])} rows but its metadata "
                         "names do not match; retrain the shared adapter")
    return {str(n): tensors["people"][i].numpy() for i, n in enumerate(names)}


def zero_shot(adapter: Identity, embedding, name: str, reference=None, source: dict | None = None) -> Identity:
    """A person the shared ``adapter`` never trained on, rendered from their own embedding (embed-faces'
    mean) through the adapter's one mapper and LoRA: an :class:`Identity` whose weights are the
    adapter's (its ``path``) and whose embedding and reference image are the person's. ``source``:
    where the embedding came from (recorded on the card). Blends and interpolations of such identities
    mix embeddings through the same mapper (``faceid.model.generate``)."""
    import torch

    if not is_shared(adapter):
        raise InputError(f"{adapter.path}: not a shared adapter (its card has no kind {SHARED_KIND!r}); a person's "
                         "identity folder renders only that person: pass it with --identity alone")
    emb = torch.as_tensor(np.asarray(embedding, np.float32)).reshape(-1)
    if emb.shape != (adapter.card["embed_dim"],):
        raise InputError(f"{name}: a {emb.numel()}-D embedding; the shared adapter {adapter.path} maps "
                         f"{adapter.card['embed_dim']}-D ones ({adapter.card['embedder']})")
    if not torch.isfinite(emb).all():
        raise InputError(f"{name}: the embedding holds NaN/inf values")
    if adapter.reference_in_training and reference is None:
        raise InputError(f"{name}: the shared adapter {adapter.path} was trained with each person's reference image; "
                         "pass this person's best aligned crop (a crop-faces crop) with --reference-image")
    card = {**adapter.card, "name": name, "zero_shot": {"adapter": str(adapter.path), "adapter_name": adapter.name,
                                                        **(source or {})}}
    return Identity(name=name, path=adapter.path, card=card, embedding=emb, mapper=adapter.mapper,
                    reference=None if reference is None else _check_rgb(reference, f"{name}: reference image"))
