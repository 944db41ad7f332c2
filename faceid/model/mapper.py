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
"""

from __future__ import annotations

import torch
from torch import nn


class FaceMapper(nn.Module):
    """``[B, embed_dim] -> [B, num_tokens, text_dim]``: Linear -> GELU -> Linear, then LayerNorm per token."""

    def __init__(self, embed_dim: int, text_dim: int, num_tokens: int = 4, hidden_dim: int = 0):
        super().__init__()
        hidden_dim = hidden_dim or text_dim
        self.embed_dim, self.text_dim, self.num_tokens, self.hidden_dim = embed_dim, text_dim, num_tokens, hidden_dim
        self.net = nn.Sequential(
            nn.Linear(embed_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, num_tokens * text_dim),
        )
        self.norm = nn.LayerNorm(text_dim)
        self.null_face = nn.Parameter(torch.zeros(num_tokens, text_dim))

    def config(self) -> dict:
        return {"embed_dim": self.embed_dim, "text_dim": self.text_dim, "num_tokens": self.num_tokens, "hidden_dim": self.hidden_dim}

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        if embedding.shape[-1] != self.embed_dim:
            raise ValueError(f"FaceMapper: expected embeddings of dim {self.embed_dim}, got shape {tuple(embedding.shape)}")
        tokens = self.net(embedding).view(*embedding.shape[:-1], self.num_tokens, self.text_dim)
        return self.norm(tokens)

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
