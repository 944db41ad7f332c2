"""Prompt encoding paid once: text embeddings kept per distinct text for the pipeline that made them.

The real profile's text encoder (UMT5-XXL, 11.4 GB bf16) is the largest part of the model and the
least used: with ``model.text_encoder_offload`` it lives on the CPU and visits the device to encode
(:func:`faceid.model.memory.text_encoder_on_device`). A batch-infer worker renders many videos with
one prompt (and one negative prompt); render-validation renders three arms per clip with the same
prompt. :class:`PromptCache` encodes each distinct text once and moves the encoder to the device only
when a text it has not seen needs it::

    cache = PromptCache()
    cond, uncond = cache.encode(pipe, "a person dancing", "")     # encoder visits the device once
    cond, uncond = cache.encode(pipe, "a person dancing", "")     # kept: no encoder call, no move

Keys: the text and the encoder that embeds it (the pipeline's text encoder object, its dtype, the
tokenizer and the token length): a cache used with another pipeline starts empty. The kept
embeddings are on the CPU (``[1, text_len, text_dim]``, 4 MB each in the real profile), at most
:data:`MAX_TEXTS` of them (least recently used dropped). The embeddings are those of
:func:`encode_text`, bit for bit (``faceid.model.generate`` re-exports it and :func:`text_len`).

``encoded`` (texts encoded), ``hits`` (texts reused) and ``encode_s`` (seconds spent encoding,
encoder moves included) add up over the cache's life: a caller reads them before and after a video
for its per-video cost (``faceid.render.render_one``: manifest column ``prompt_encode_s``).
"""

from __future__ import annotations

import time
import weakref
from collections import OrderedDict

MAX_TEXTS = 64  # distinct texts kept (batch-infer with per-clip captions: one each, the oldest dropped)


def text_len(pipe) -> int:
    """Text tokens per prompt: the tokenizer's max length, at most 512 (UMT5 in Wan)."""
    return int(min(pipe.tokenizer.model_max_length, 512))


def encode_text(pipe, prompt: str):
    """``[1, text_len, text_dim]`` text embeddings (zero-padded after the prompt, as Wan does).
    An offloaded text encoder visits the device for the call (``faceid.model.memory``)."""
    from faceid.model.memory import text_encoder_on_device

    with text_encoder_on_device(pipe):
        prompt_embeds, _ = pipe.encode_prompt(
            prompt=prompt, do_classifier_free_guidance=False, max_sequence_length=text_len(pipe), device=pipe._execution_device
        )
    return prompt_embeds


class PromptCache:
    """Text embeddings per distinct text, for one pipeline's text encoder at a time."""

    def __init__(self):
        self._texts: OrderedDict[str, object] = OrderedDict()
        self._encoder_key: tuple | None = None
        self._encoder_ref = None
        self.encoded = 0
        self.hits = 0
        self.encode_s = 0.0

    def _check_encoder(self, pipe) -> None:
        """Forget what another encoder (or tokenizer / token length) made."""
        encoder = pipe.text_encoder
        key = (id(encoder), str(encoder.dtype), getattr(pipe.tokenizer, "name_or_path", ""), text_len(pipe))
        if self._encoder_ref is None or self._encoder_ref() is not encoder or key != self._encoder_key:
            self._texts.clear()
            self._encoder_key, self._encoder_ref = key, weakref.ref(encoder)

    def encode(self, pipe, prompt: str, negative_prompt: str | None):
        """``(cond, uncond)`` text embeddings on the pipeline's device (``uncond`` None when
        ``negative_prompt`` is None: no classifier-free guidance). Texts not seen yet are encoded
        together, in one visit of an offloaded text encoder; the others are reused."""
        import torch

        from faceid.model.memory import text_encoder_on_device

        self._check_encoder(pipe)
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        new = [t for t in dict.fromkeys(texts) if t not in self._texts]
        self.hits += len(set(texts)) - len(new)
        if new:
            t0 = time.perf_counter()
            with torch.no_grad(), text_encoder_on_device(pipe):
                for text in new:
                    self._texts[text] = encode_text(pipe, text).to("cpu")
            if pipe.transformer.device.type == "cuda":
                torch.cuda.synchronize(pipe.transformer.device)
            self.encode_s += time.perf_counter() - t0
            self.encoded += len(new)
        for text in texts:
            self._texts.move_to_end(text)
        while len(self._texts) > MAX_TEXTS:
            self._texts.popitem(last=False)
        device = pipe._execution_device
        cond = self._texts[prompt].to(device)
        return cond, None if negative_prompt is None else self._texts[negative_prompt].to(device)

    def stats(self) -> dict:
        return {"encoded": self.encoded, "hits": self.hits, "encode_s": self.encode_s}
