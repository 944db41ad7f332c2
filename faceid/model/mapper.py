"""FaceMapper: an identity embedding -> N face tokens in the text-encoder space.

The tokens are appended to ``prompt_embeds`` (after the text tokens) and reach the DiT through its
cross-attention, exactly like text tokens (the transformer's ``text_embedder`` projects every
token from ``text_dim``). The unconditional branch gets ``null_face`` instead: a learned set of N
tokens, initialised at zero, trained on the ``face_dropout`` share of steps (for CFG and
``face_scale``).

``face_scale`` s interpolates from the null face to the identity: ``null + s * (tokens - null)``.
With the null face at zero this is a plain scaling of the face tokens; s=0 is the null face,
s=1 the trained identity, s>1 extrapolates. (``generate_video`` also scales the LoRA by s, and at
s=0 appends no tokens at all: the base model exactly.)

Where the tokens start (README "The identity adapter"):

- **Scale.** The LayerNorm gives every token RMS ~1, whatever the text encoder's own tokens look
  like; so the normalised tokens are multiplied by ``output_scale``, set once at initialisation by
  :meth:`FaceMapper.calibrate` to the RMS of the run's own caption tokens (non-padding, measured
  with the loaded text encoder, :func:`caption_token_rms`): UMT5-XXL and the tiny encoder alike.
  It is saved with the mapper (file metadata and card), so inference uses the same.
- **Gate.** ``tokens = gate * output_scale * LayerNorm(...)`` with a learned scalar gate that
  starts at 0: the untrained face tokens are zero vectors, which is what Wan's zero-padded prompt
  embeddings already hold after the caption (~500 of 512 tokens), so the untrained adapter adds
  padding and nothing else, and the step-0 render is close to the base (LoRA B starts at zero
  too). The gate is ``GATE_MULTIPLIER * gate_param``: Adam moves a parameter by ~lr a step
  whatever its scale, so a plain scalar would need ~1/lr steps to open (10 000 at lr 1e-4); the
  multiplier lets it open within ~1/(100 lr) steps (~100 at lr 1e-4) while the mapper learns, as a
  zero-initialised layer with fan-in would. The gradient reaches the rest of the mapper as soon as
  the gate is non-zero (after the first step).

Mapper files written before the scale and gate existed have neither: they load with
``output_scale`` 1 and the gate open at 1, which is exactly what they computed (:func:`legacy_state`).
"""

from __future__ import annotations

import torch
from torch import nn


GATE_MULTIPLIER = 100.0  # gate = GATE_MULTIPLIER * gate_param (see the module doc)


class FaceMapper(nn.Module):
    """``[B, embed_dim] -> [B, num_tokens, text_dim]``: Linear -> GELU -> Linear, LayerNorm per token,
    times ``output_scale`` (the text tokens' RMS, :meth:`calibrate`) and the learned gate (0 at init)."""

    def __init__(self, embed_dim: int, text_dim: int, num_tokens: int = 4, hidden_dim: int = 0,
                 output_scale: float = 1.0, gate_multiplier: float = GATE_MULTIPLIER):
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        self.embed_dim, self.text_dim, self.num_tokens, self.hidden_dim = embed_dim, text_dim, num_tokens, hidden_dim
        self.output_scale, self.gate_multiplier = float(output_scale), float(gate_multiplier)
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_tokens * text_dim),
        )
        self.norm = nn.LayerNorm(text_dim)
        self.null_face = nn.Parameter(torch.zeros(num_tokens, text_dim))
        self.gate_param = nn.Parameter(torch.zeros(1))  # closed at init: the face tokens start as padding

    def config(self) -> dict:
        return {"embed_dim": self.embed_dim, "text_dim": self.text_dim, "num_tokens": self.num_tokens,
                "hidden_dim": self.hidden_dim, "output_scale": self.output_scale, "gate_multiplier": self.gate_multiplier}

    def calibrate(self, text_rms: float) -> FaceMapper:
        """Set ``output_scale`` to the RMS of the text encoder's caption tokens (:func:`caption_token_rms`)."""
        import math

        if not (math.isfinite(text_rms) and text_rms > 0):
            raise ValueError(f"FaceMapper.calibrate: expected a finite RMS > 0, got {text_rms}")
        self.output_scale = float(text_rms)
        return self

    @property
    def gate(self) -> torch.Tensor:
        return self.gate_multiplier * self.gate_param

    def ungated(self, embedding: torch.Tensor) -> torch.Tensor:
        """The tokens before the gate: ``output_scale * LayerNorm(net(embedding))`` (at text scale)."""
        if embedding.shape[-1] != self.embed_dim:
            raise ValueError(f"FaceMapper: expected embeddings of dim {self.embed_dim}, got shape {tuple(embedding.shape)}")
        tokens = self.net(embedding).view(*embedding.shape[:-1], self.num_tokens, self.text_dim)
        return self.output_scale * self.norm(tokens)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.gate * self.ungated(embedding)

    def null_tokens(self, batch_size: int = 1) -> torch.Tensor:
        """``[B, num_tokens, text_dim]``: the null face (unconditional branch)."""
        return self.null_face.unsqueeze(0).expand(batch_size, -1, -1)


def initial_mapper(embed_dim: int, text_dim: int, num_tokens: int, hidden_dim: int, seed: int) -> FaceMapper:
    """The mapper train-lora starts from: built right after ``torch.manual_seed(seed)`` (the global RNG,
    so what the recipe draws next, the LoRA's A matrices, follows from the seed too). The check that a
    run trained (``faceid.train.launch.check_trained``) compares the result with it."""
    torch.manual_seed(seed)
    return FaceMapper(embed_dim, text_dim, num_tokens, hidden_dim)


def scale_face(tokens: torch.Tensor, null: torch.Tensor, face_scale: float) -> torch.Tensor:
    """``null + face_scale * (tokens - null)``; 0 = null face, 1 = the tokens."""
    return null + face_scale * (tokens - null)


def caption_token_rms(texts) -> float:
    """RMS of the text encoder's caption tokens: ``texts`` are prompt embeddings ``[L, D]`` (or
    ``[1, L, D]``) as the pipeline encodes them, zero-padded after the caption; the padding rows
    (all zero) are left out, every distinct caption counts once. ``ValueError`` without any token."""
    seen, total, count = set(), 0.0, 0
    for text in texts:
        if id(text) in seen:
            continue
        seen.add(id(text))
        rows = text.detach().reshape(-1, text.shape[-1]).double()
        rows = rows[rows.abs().sum(dim=-1) > 0]
        total += float(rows.pow(2).sum())
        count += rows.numel()
    if not count:
        raise ValueError("caption_token_rms: no caption token (every prompt embedding is padding)")
    return (total / count) ** 0.5


def legacy_state(config: dict, state: dict) -> tuple[dict, dict]:
    """``(config, state)`` of a mapper file written before ``output_scale`` and the gate existed:
    scale 1 and the gate open at 1, exactly what such a mapper computed. Newer files pass unchanged."""
    if "output_scale" in config or "gate_param" in state:
        return config, state
    multiplier = GATE_MULTIPLIER
    return ({**config, "output_scale": 1.0, "gate_multiplier": multiplier},
            {**state, "gate_param": torch.full((1,), 1.0 / multiplier)})
