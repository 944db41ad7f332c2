"""``model.compile``: regional compilation of the transformer for rendering, and its compile time.

``torch.compile`` of the whole Wan-VACE transformer compiles one large graph (minutes); the
transformer is 30 main blocks and 15 VACE blocks of two classes, so diffusers compiles each repeated
block instead (``ModelMixin.compile_repeated_blocks``: the classes in ``_repeated_blocks``,
``WanTransformerBlock`` and ``WanVACETransformerBlock``): every block of a class reuses one compiled
graph, so compile time stays that of two blocks. Compilation is lazy: the first forward pays it.

What it costs and wins (``benchmarks/bench_infer_gpu.py`` measures it end to end):

- The first video of a process (``faceid infer``) or of a batch-infer worker compiles; the same
  pipeline then renders every later video with the compiled blocks. A new frame size, a different
  text length (the base model without face tokens), a LoRA loaded or disabled, or new adapter
  weights (a blend, each interpolation step) make torch compile again for that case; past
  ``torch._dynamo.config.recompile_limit`` variants it runs those blocks eagerly.
- Outputs equal the uncompiled ones up to floating-point reassociation (tests/test_render_speed.py
  states the tolerance on the tiny model).

:class:`CompileClock` reports the compile time: forward hooks on the transformer (not on the
compiled blocks) time its first two forwards after compilation was switched on; the first compiles,
the second (the unconditional branch of the same step, or the next step) runs the compiled graph:
``compile_s = first - second``.
"""

from __future__ import annotations

import time


def compile_blocks(transformer) -> int:
    """``torch.compile`` each repeated block of ``transformer`` (lazily: compiled on its first call);
    the number of blocks wrapped. :class:`ValueError` from diffusers for a model without repeated blocks."""
    transformer.compile_repeated_blocks()
    names = set(getattr(transformer, "_repeated_blocks", ()))
    return sum(type(m).__name__ in names for m in transformer.modules())


def is_compiled(transformer) -> bool:
    """Whether every repeated block of ``transformer`` is wrapped by ``torch.compile``."""
    names = set(getattr(transformer, "_repeated_blocks", ()))
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    return bool(blocks) and all(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)


class CompileClock:
    """The duration of the transformer's first two forwards from now on; ``compile_s`` is their
    difference (None until both ran). The hooks remove themselves after the second forward."""

    def __init__(self, transformer):
        self.forwards: list[float] = []
        self._start = 0.0
        self._device = transformer.device
        self._handles = [transformer.register_forward_pre_hook(self._pre), transformer.register_forward_hook(self._post)]

    def _sync(self) -> None:
        import torch

        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _pre(self, module, args) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _post(self, module, args, output) -> None:
        self._sync()
        self.forwards.append(time.perf_counter() - self._start)
        if len(self.forwards) >= 2:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    @property
    def compile_s(self) -> float | None:
        if len(self.forwards) < 2:
            return None
        return max(self.forwards[0] - self.forwards[1], 0.0)
