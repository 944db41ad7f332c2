"""The building blocks of one training step: the model (frozen Wan-VACE + LoRA + FaceMapper as one
module), batches, timesteps, the flow-matching loss, optimizer and the trainable state.

:mod:`faceid.train.recipe` puts them together (the recipe, checkpoints, Ray); held-out validation
(:mod:`faceid.train.validation`) measures the same loss at fixed noise and timesteps.
"""

from __future__ import annotations

import torch
from torch import nn

from faceid.train.routing import IDENTITY, PRIOR

BATCH_KEYS = ("target", "control", "text", "embedding", "face", "weight")  # the tensors of an example


def shape_key(example: dict) -> tuple:
    """Examples that can share a batch: same latent shapes and reference frames."""
    return (tuple(example["target"].shape), tuple(example["control"].shape), example["ref_frames"])


class FaceConditionedDiT(nn.Module):
    """The frozen Wan-VACE transformer (+ LoRA) and the FaceMapper as one module (one DDP wrapper)."""

    def __init__(self, transformer: nn.Module, mapper: nn.Module):
        super().__init__()
        self.transformer, self.mapper = transformer, mapper
        self.num_vace_layers = len(transformer.config.vace_layers)

    def forward(self, noisy, timestep, text, control, embedding, drop_face):
        face = self.mapper(embedding)
        null = self.mapper.null_tokens(face.shape[0]).to(face.dtype)
        face = torch.where(drop_face[:, None, None], null, face)  # both branches stay in the graph (DDP)
        context = torch.cat([text, face.to(text.dtype)], dim=1)
        scale = torch.ones(self.num_vace_layers, device=noisy.device, dtype=noisy.dtype)
        return self.transformer(
            hidden_states=noisy, timestep=timestep, encoder_hidden_states=context,
            control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False,
        )[0]


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """Everything random about global step ``step`` (resume-safe). Training uses ``rank`` 0 on every
    rank: each rank draws the whole global batch's noise, timesteps and face dropout and keeps its
    slice (:func:`flow_matching_loss`), so the ranks together draw what one worker would."""
    return torch.Generator("cpu").manual_seed(seed * 1_000_003 + step * 101 + rank)


def make_batch(pools: dict[str, list[dict]], share: float, step: int, rank: int, batch_size: int, seed: int,
               world_size: int = 1) -> dict:
    """``rank``'s share of global ``step``'s batch: the global batch (``batch_size * world_size``
    samples) is drawn from ``seed, step`` only -- the identity pool with probability ``share``
    (always when the prior pool is empty), an anchor example drawn from it, and the rest from the
    examples of the anchor's shape (with replacement) -- and rank r takes samples ``[r b, (r + 1) b)``.
    So every rank draws its own samples, and the ranks together train exactly the samples one
    worker with ``world_size`` times the batch would. ``global_slice``: ``(first, global batch size)``
    (:func:`flow_matching_loss` draws the global batch's noise and keeps this slice)."""
    gen = torch.Generator().manual_seed(seed * 7919 + step * 131 + 3)
    total = batch_size * world_size
    use_identity = not pools[PRIOR] or float(torch.rand(1, generator=gen)) < share
    pool = pools[IDENTITY] if use_identity else pools[PRIOR]
    anchor = pool[int(torch.randint(len(pool), (1,), generator=gen))]
    group = [e for e in pool if shape_key(e) == shape_key(anchor)]
    items = [anchor] + [group[int(i)] for i in torch.randint(len(group), (total - 1,), generator=gen)]
    first = rank * batch_size
    mine = items[first : first + batch_size]
    batch = {k: torch.stack([it[k] for it in mine]) for k in BATCH_KEYS}
    batch["ref_frames"] = anchor["ref_frames"]
    batch["global_slice"] = (first, total)
    return batch


def timestep_weights(scheme: str, timesteps: torch.Tensor) -> torch.Tensor:
    """Loss weight per entry of the training schedule (``timesteps``: its timestep *values*,
    ``sigma * 1000`` of the shifted schedule, as ``noise_scheduler.timesteps``): ones, or
    ``mid_weighted`` as DiffSynth-Studio computes it (``FlowMatchScheduler.set_timesteps(training=True)``):
    the bell ``exp(-2 ((t - N/2) / N)^2)`` of the timestep value t, N the schedule's length, shifted to
    0 at its minimum and normalised to mean 1. On the value, not the index: with shift 3 the
    schedule crowds high noise, and the weight follows where the noise level actually is."""
    n = len(timesteps)
    if scheme != "mid_weighted":
        return torch.ones(n)
    t = timesteps.detach().to(torch.float64).cpu()
    y = torch.exp(-2 * ((t - n / 2) / n) ** 2)
    y = y - y.min()
    return (y * n / y.sum()).float()


def sample_timestep_index(scheme: str, bsz: int, num_timesteps: int, gen: torch.Generator) -> torch.Tensor:
    """Indices into the training schedule: uniform (``uniform``, ``mid_weighted``) or logit-normal."""
    u = torch.rand(bsz, generator=gen)
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.randn(bsz, generator=gen))
    return (u * num_timesteps).long().clamp_max(num_timesteps - 1)


def flow_matching_loss(model: nn.Module, batch: dict, noise_scheduler, gen: torch.Generator, face_dropout: float,
                       device: torch.device, amp_dtype: torch.dtype | None, timestep_sampling: str = "uniform") -> torch.Tensor:
    """One flow-matching loss on ``batch`` (tensors on CPU; moved to ``device`` here): noise, timesteps
    and face dropout drawn from ``gen`` for the whole global batch, this batch's slice kept
    (``batch["global_slice"]``, :func:`make_batch`; the batch itself when absent)."""
    x0 = clean_latents(batch)
    bsz = x0.shape[0]
    first, total = batch.get("global_slice", (0, bsz))
    mine = slice(first, first + bsz)
    noise = torch.randn((total, *x0.shape[1:]), generator=gen)[mine]
    idx = sample_timestep_index(timestep_sampling, total, noise_scheduler.config.num_train_timesteps, gen)[mine]
    drop_face = (torch.rand(total, generator=gen)[mine] < face_dropout) | ~batch["face"].bool()
    return loss_at(model, batch, noise_scheduler, noise, idx, drop_face, device, amp_dtype, timestep_sampling)


def clean_latents(batch: dict) -> torch.Tensor:
    """x0: the target latents, with the reference latent in front (as the pipeline puts it in front of the noise)."""
    x0 = batch["target"]
    n_ref = int(batch.get("ref_frames", 0))
    if n_ref:
        x0 = torch.cat([batch["control"][:, : x0.shape[1], :n_ref], x0], dim=2)
    return x0


def loss_at(model: nn.Module, batch: dict, noise_scheduler, noise: torch.Tensor, idx: torch.Tensor, drop_face: torch.Tensor,
            device: torch.device, amp_dtype: torch.dtype | None, timestep_sampling: str = "uniform") -> torch.Tensor:
    """The flow-matching loss of ``batch`` for given ``noise``, timestep indices ``idx`` and null-face mask
    (training draws them in :func:`flow_matching_loss`; validation fixes them, ``faceid.train.validation``)."""
    x0 = clean_latents(batch)
    n_ref = int(batch.get("ref_frames", 0))
    timesteps = noise_scheduler.timesteps[idx]
    sigmas = noise_scheduler.sigmas[idx].view(-1, 1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    target = noise - x0

    def to(t):
        return t.to(device)

    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        pred = model(to(noisy), to(timesteps), to(batch["text"]), to(batch["control"]), to(batch["embedding"]), to(drop_face))
    err = ((pred.float() - to(target)) ** 2)[:, :, n_ref:]
    weight = to(batch["weight"]).unsqueeze(1)  # [B, 1, f, h, w]
    per_sample = (err * weight).sum(dim=(1, 2, 3, 4)) / (weight.sum(dim=(1, 2, 3, 4)) * err.shape[1])
    return (per_sample * to(timestep_weights(timestep_sampling, noise_scheduler.timesteps)[idx])).mean()


def training_scheduler(flow_shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)


def make_optimizer(params: list[nn.Parameter], stage_cfg, weight_decay: float):
    """AdamW + linear warmup to a constant learning rate."""
    optimizer = torch.optim.AdamW(params, lr=stage_cfg.learning_rate, weight_decay=weight_decay)
    warmup = max(stage_cfg.warmup_steps, 0)
    lr_lambda = (lambda s: min(1.0, (s + 1) / warmup)) if warmup else (lambda s: 1.0)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def trainable_state(model: FaceConditionedDiT) -> dict[str, torch.Tensor]:
    """Mapper + LoRA tensors (what training changes), CPU float32, flat keys: copies, never views of
    the parameters (a snapshot must not change with the next optimizer step)."""
    from faceid.model.lora import lora_state_dict

    state = {f"mapper.{k}": v for k, v in model.mapper.state_dict().items()}
    if getattr(model.transformer, "peft_config", None):
        state.update({f"lora.{k}": v for k, v in lora_state_dict(model.transformer).items()})
    return {k: v.detach().to(device="cpu", dtype=torch.float32, copy=True).contiguous() for k, v in state.items()}


def load_trainable_state(model: FaceConditionedDiT, state: dict[str, torch.Tensor]) -> None:
    from faceid.errors import TrainingError
    from faceid.model.lora import set_lora_state_dict

    if "mapper.gate_param" not in state:  # written before the face-token scale and gate (faceid.model.mapper)
        raise TrainingError("checkpoint written by an older faceid (its face mapper has no output scale or gate): it "
                            "cannot resume this run's mapper; delete the checkpoint (or its Ray run folder) to train "
                            "from the start")
    model.mapper.load_state_dict({k[len("mapper."):]: v for k, v in state.items() if k.startswith("mapper.")})
    lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
    if lora:
        set_lora_state_dict(model.transformer, lora)


def check_adapter(adapter, lora_cfg, where: str, **mapper_shape) -> None:
    """An adapter can start this run only with the configured LoRA (targets, rank, alpha, dropout) and a
    face mapper of this shape (``mapper_shape``: FaceMapper attributes, e.g. ``num_tokens=4``): anything
    else is an :class:`~faceid.errors.InputError` naming the difference. ``where``: how the message names it."""
    from faceid.config import to_dict
    from faceid.errors import InputError

    if adapter.card.get("lora") != to_dict(lora_cfg):
        raise InputError(f"{where}: the adapter's LoRA is {adapter.card.get('lora')}, train_lora.lora is "
                         f"{to_dict(lora_cfg)}; set train_lora.lora to the adapter's")
    have = {k: getattr(adapter.mapper, k) for k in mapper_shape}
    if have != mapper_shape:
        raise InputError(f"{where}: the adapter's face mapper has {have}, this run's has {mapper_shape}; "
                         "set train_lora to the adapter's")


def load_adapter(model: FaceConditionedDiT, adapter, lora_cfg) -> None:
    """Start ``model``'s mapper and LoRA from a trained adapter (``train-lora --init-from``: a shared
    adapter, :mod:`faceid.train.shared`): its mapper weights (output scale and gate included) and its
    LoRA tensors, after :func:`check_adapter` against this model's mapper."""
    from faceid.model.lora import read_weights, set_lora_state_dict

    own, theirs = model.mapper, adapter.mapper
    check_adapter(adapter, lora_cfg, f"--init-from {adapter.path}",
                  **{k: getattr(own, k) for k in ("embed_dim", "text_dim", "num_tokens", "hidden_dim")})
    own.output_scale, own.gate_multiplier = theirs.output_scale, theirs.gate_multiplier
    own.load_state_dict(theirs.state_dict())
    lora = read_weights(adapter.lora_path)[0]
    set_lora_state_dict(model.transformer, {k.removeprefix("transformer."): v.float() for k, v in lora.items()})
