"""Batched generation for prompts of different lengths.

Prompts are left-padded to a common length so every row's next token lands in the same cache
slot; the attention mask hides the padding and position ids are counted from the mask, so each
row sees exactly what it would see alone (row ``i`` of a greedy batch equals generating prompt
``i`` by itself).

Example:
    >>> import torch
    >>> from craftfn.models import GPT, GPTConfig
    >>> from craftfn.generation import batch_generate
    >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
    >>> outs = batch_generate(model, [[1, 2, 3], [4]], max_new_tokens=3, temperature=0.0)
    >>> [o.tolist()[:-3] for o in outs]
    [[1, 2, 3], [4]]
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch

from craftfn.generation import kv_cache as kvc
from craftfn.generation.beam_search import beam_search_generate
from craftfn.generation.sampling import generate_text_sampling

__all__ = ["batch_generate"]


def batch_generate(
    model: Any,
    prompts: Sequence[Union[Sequence[int], torch.Tensor]],
    *,
    max_new_tokens: int,
    num_beams: int = 1,
    pad_token_id: Optional[int] = None,
    eos_token_id: Optional[int] = None,
    device: Optional[Union[str, torch.device]] = None,
    **kwargs: Any,
) -> list[torch.Tensor]:
    """Generate for a list of prompts of any lengths in one batch.

    Args:
        model: an ``nn.Module`` or ``TrainState`` (as in :func:`generate_text_sampling`).
        prompts: token id sequences (lists or 1-d tensors), each non-empty.
        max_new_tokens: tokens to add to each prompt.
        num_beams: 1 samples (or greedy with ``temperature=0``); more runs beam search and
            returns ``num_return_sequences`` results per prompt.
        pad_token_id: the left-padding token and the filler after EOS (default EOS, else 0).
        eos_token_id: rows that emit it stop (and are filled with ``pad_token_id``).
        device: where to run (default: the model's device).
        kwargs: options of :func:`generate_text_sampling` (``temperature``, ``top_k``, ``seed``,
            ``compile`` ...) or of :func:`beam_search_generate` when ``num_beams > 1``.

    Returns:
        One 1-d tensor per result, unpadded on the left: the prompt then ``max_new_tokens`` tokens.

    Example:
        >>> from craftfn.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
        >>> batch_generate(model, [[1, 2], [3]], max_new_tokens=2, temperature=0.0)[1].shape
        torch.Size([3])
    """
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 1:
        raise ValueError("prompts must be a list of prompts; wrap a single prompt in a list")
    if len(prompts) == 0:
        raise ValueError("prompts must hold at least one prompt")
    _, pad = kvc.eos_and_pad(eos_token_id, pad_token_id)
    device = kvc.model_device(model) if device is None else torch.device(device)
    ids, mask = kvc.left_pad(prompts, pad, device=device)
    lengths = mask.sum(dim=1).tolist()
    width = ids.shape[1]
    if num_beams == 1 and kwargs.get("num_return_sequences", 1) == 1:
        kwargs.pop("num_return_sequences", None)
        out = generate_text_sampling(
            model, ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad, **kwargs,
        )
        per_prompt = 1
    else:
        result = beam_search_generate(
            model, ids, attention_mask=mask, num_beams=num_beams, max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id, pad_token_id=pad, **kwargs,
        )
        out = result.sequences
        per_prompt = out.shape[0] // ids.shape[0]
    return [out[i, width - lengths[i // per_prompt] :] for i in range(out.shape[0])]
