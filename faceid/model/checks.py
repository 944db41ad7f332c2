"""The render settings' rules, in one place: identity/LoRA scales, guidance, denoising steps, seed.

The same checks run on the params keys (at config load, :mod:`faceid.config`), on the command-line
flags (:func:`faceid.render.settings_from`) and in ``generate_video`` itself; each error names the
flag or the key (``name``) and the range.
"""

from __future__ import annotations

import math

import numpy as np

from faceid.errors import InputError


def _number(value) -> float:
    """``value`` as a float, NaN when it is not a number (so every check rejects it)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


# face_scale / lora_scale: 1 = the identity as trained, 0 = none. Above 1 the face tokens move further
# from the null face and the LoRA delta grows, linearly, past anything training saw: a little
# exaggerates the identity, a lot saturates the transformer (face_scale 1e9 rendered an all-black
# video). 4 leaves room to exaggerate (4x the trained LoRA delta already dominates the base weights'
# update) and refuses values that can only break the render.
MAX_SCALE = 4.0


def check_scale(name: str, value) -> float:
    """``value`` as a float; :class:`InputError` naming ``name`` (a flag or a params key) unless it
    is a finite number from 0 to :data:`MAX_SCALE`."""
    number = _number(value)
    if not math.isfinite(number) or number < 0:
        raise InputError(f"{name}: expected a finite number >= 0, got {value!r}")
    if number > MAX_SCALE:
        raise InputError(f"{name}: {value!r} is above the upper bound {MAX_SCALE:g} (1 = the identity as trained; "
                         f"larger values extrapolate past anything training saw and break the render, "
                         f"e.g. an all-black video); use a value from 0 to {MAX_SCALE:g}")
    return number


MAX_STEPS = 1000  # denoising steps: at most the schedulers' num_train_timesteps
MAX_SEED = 2**63 - 1


def check_guidance(name: str, value) -> float:
    """Classifier-free guidance scale: a finite number >= 1 (1 = no guidance; the pipeline runs the
    unconditional branch only above 1, so a value below 1 would silently mean 1)."""
    number = _number(value)
    if not math.isfinite(number) or number < 1:
        raise InputError(f"{name}: expected a finite number >= 1 (1 = no classifier-free guidance), got {value!r}")
    return number


def check_steps(name: str, value) -> int:
    """Denoising steps: an integer in [1, MAX_STEPS]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_STEPS:
        raise InputError(f"{name}: expected an integer from 1 to {MAX_STEPS}, got {value!r}")
    return int(value)


def check_seed(name: str, value) -> int:
    """A seed for ``torch.Generator.manual_seed``: an integer in [0, 2^63)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{name}: expected an integer from 0 to 2^63-1, got {value!r}")
    return int(value)
