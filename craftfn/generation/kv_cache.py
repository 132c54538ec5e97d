"""The static KV cache and the model adapter the generation loops share.

The cache itself (:class:`~craftfn.models.gpt.KVCache`) lives with the model that fills it; this
module gives the loops one view of any model:

* a craftfn ``GPT`` (or any module with ``init_kv_cache``): prefill once, then one-token decode
  steps on the preallocated cache (gpt-fast style);
* any other ``nn.Module`` mapping ids to logits (an output with ``.logits`` is fine, e.g. a
  Hugging Face model): the whole window is recomputed for every token (nanoGPT style);
* a ``TrainState``: its ``apply_fn`` module runs with the state's params (``functional_call``).

Example:
    >>> import torch
    >>> from craftfn.models import GPT, GPTConfig
    >>> from craftfn.generation import kv_cache
    >>> model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8))
    >>> cache = kv_cache.init_cache(model, batch_size=2, max_len=10)
    >>> tuple(cache.k[0].shape)
    (2, 2, 10, 4)
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.func import functional_call

from craftfn.models.gpt import KVCache

__all__ = [
    "KVCache",
    "init_cache",
    "Decoder",
    "as_decoder",
    "call_model",
    "prefill",
    "positions_from_mask",
    "left_pad",
    "check_prompt",
    "strip_after_eos",
]


def init_cache(model: Any, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
    """A zeroed cache for ``model`` (a module with ``init_kv_cache``, or a ``TrainState`` of one)."""
    return as_decoder(model).init_cache(batch_size, max_len, dtype)


def call_model(module: nn.Module, params: Optional[Mapping[str, torch.Tensor]], idx: torch.Tensor, **kwargs: Any) -> Any:
    """Run ``module(idx, **kwargs)``, with ``params`` swapped in when given; unwrap ``.logits``."""
    if params is None:
        out = module(idx, **kwargs)
    else:
        out = functional_call(module, params, (idx,), kwargs, tie_weights=True, strict=False)
    if hasattr(out, "logits"):  # Hugging Face ModelOutput
        return out.logits
    return out


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: each row's first real token is position 0 (padding gets 0).

    Example:
        >>> positions_from_mask(torch.tensor([[0, 0, 1, 1, 1]]))
        tensor([[0, 0, 0, 1, 2]])
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class Decoder:
    """One view of a model for the generation loops (see the module docstring)."""

    def __init__(self, module: nn.Module, params: Optional[dict[str, torch.Tensor]]) -> None:
        self.module = module
        self.params = params
        self.supports_cache = callable(getattr(module, "init_kv_cache", None))
        self.block_size = _context_length(module)
        vocab = getattr(getattr(module, "config", None), "vocab_size", None)
        self.vocab_size = vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None
        self.takes_mask = _accepts(module, "attention_mask")

    def init_cache(self, batch_size: int, max_len: int, dtype: Optional[torch.dtype] = None) -> KVCache:
        if not self.supports_cache:
            raise ValueError(f"{type(self.module).__name__} has no init_kv_cache; it cannot use a KV cache")
        if self.params is None:
            cache = self.module.init_kv_cache(batch_size, max_len, dtype=dtype)
        else:
            weight = next(iter(self.params.values()))
            cache = self.module.init_kv_cache(batch_size, max_len, dtype=dtype or weight.dtype, device=weight.device)
        # A user's model may bring its own init_kv_cache: the loops index, reorder and slice the
        # cache, so it must be craftfn's, of the size asked for (a wrong one fails here, not mid-search).
        name = f"{type(self.module).__name__}.init_kv_cache({batch_size}, {max_len})"
        if not isinstance(cache, KVCache):
            raise TypeError(
                f"{name} returned a {type(cache).__name__}; the generation loops need a craftfn.models.KVCache "
                "(per-layer key and value tensors of shape (batch, heads, max_len, head_dim)) that the model's "
                "forward fills in place, or use_cache=False to recompute the window"
            )
        if not cache.k or len(cache.k) != len(cache.v) or cache.batch_size != batch_size or cache.max_len < max_len:
            raise ValueError(
                f"{name} returned a cache of {len(cache.k)} key and {len(cache.v)} value tensors with batch "
                f"{cache.batch_size if cache.k else None} and {cache.max_len if cache.k else None} slots; "
                f"it must hold one key and one value tensor per layer, {batch_size} rows and at least {max_len} slots"
            )
        return cache

    def check_length(self, total: int, argname: str, value: Any) -> None:
        """With a cache, prompt + new tokens must fit the context (positions are absolute)."""
        if self.block_size is not None and total > self.block_size:
            raise ValueError(
                f"{argname}={value!r} with the prompt makes {total} tokens, more than the model's context of "
                f"{self.block_size}; lower {argname}, or pass use_cache=False to slide the window (nanoGPT style)"
            )

    def __call__(self, idx: torch.Tensor, **kwargs: Any) -> Any:
        return call_model(self.module, self.params, idx, **kwargs)

    def forward_window(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits ``(B, V)``, recomputed over the last ``block_size`` tokens."""
        if self.block_size is not None and ids.shape[1] > self.block_size:
            ids, mask = ids[:, -self.block_size :], mask[:, -self.block_size :]
        if self.takes_mask:
            logits = self(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        else:
            logits = self(ids)
        return logits[:, -1]

    @contextlib.contextmanager
    def inference(self) -> Iterator[None]:
        """No autograd, and the module in eval mode (dropout off), restored afterwards."""
        changed = [m for m in self.module.modules() if m.training]
        for m in changed:
            m.training = False
        try:
            with torch.no_grad():
                yield
        finally:
            for m in changed:
                m.training = True


def _context_length(module: nn.Module) -> Optional[int]:
    config = getattr(module, "config", None)
    for name in ("block_size", "n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def as_decoder(model: Any) -> Decoder:
    """A :class:`Decoder` for an ``nn.Module`` or a ``TrainState`` (its ``apply_fn`` module and params)."""
    if isinstance(model, Decoder):
        return model
    if isinstance(model, nn.Module):
        return Decoder(model, None)
    from craftfn.state import TrainState, check_live

    if isinstance(model, TrainState):
        check_live(model, "model")
        if not isinstance(model.apply_fn, nn.Module):
            raise TypeError("model: generation needs a TrainState created with model=<nn.Module>")
        return Decoder(model.apply_fn, {**model.params, **model.buffers})
    raise TypeError(f"model must be an nn.Module or a craftfn.TrainState, got {type(model).__name__}")


def model_device(model: Any) -> torch.device:
    decoder = as_decoder(model)
    tensors = list(decoder.params.values()) if decoder.params else list(decoder.module.parameters())
    return tensors[0].device if tensors else torch.device("cpu")


def check_prompt(prompt_ids: Any, attention_mask: Optional[torch.Tensor], decoder: Decoder) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(B, P)`` prompt ids and return them with a mask (all ones when not given)."""
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.is_floating_point() or prompt_ids.dim() != 2:
        desc = f"shape {tuple(prompt_ids.shape)}, dtype {prompt_ids.dtype}" if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be an int64 tensor of shape (batch, prompt_len), got {desc}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must hold at least one token per row (empty prompt), got shape {tuple(prompt_ids.shape)}")
    if decoder.block_size is not None and prompt_ids.shape[1] > decoder.block_size:
        raise ValueError(
            f"prompt_ids has {prompt_ids.shape[1]} tokens, longer than the model's context of {decoder.block_size}"
        )
    prompt_ids = prompt_ids.long()
    # Value checks read to the host once per generate call (not per token): the ids must index the
    # embedding, and the mask must be 0/1 left padding with a token in every row.
    low, high = (int(v) for v in torch.stack([prompt_ids.min(), prompt_ids.max()]).tolist())
    if low < 0 or (decoder.vocab_size is not None and high >= decoder.vocab_size):
        bad = low if low < 0 else high
        allowed = f"[0, {decoder.vocab_size})" if decoder.vocab_size is not None else "non-negative ids"
        raise ValueError(f"prompt_ids holds the token id {bad}, outside the model's vocabulary: ids must be in {allowed}")
    if attention_mask is None:
        return prompt_ids, torch.ones_like(prompt_ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a tensor of 0s and 1s shaped like prompt_ids, got {type(attention_mask).__name__}")
    if attention_mask.shape != prompt_ids.shape:
        raise ValueError(f"attention_mask must have the prompt's shape {tuple(prompt_ids.shape)}, got {tuple(attention_mask.shape)}")
    if not decoder.takes_mask:
        raise ValueError(f"attention_mask: {type(decoder.module).__name__}.forward takes no attention_mask; generate unpadded prompts")
    mask = attention_mask.to(prompt_ids.device)
    not_binary, empty_row, right_padded = torch.stack([
        ((mask != 0) & (mask != 1)).any(),
        (mask.sum(dim=1) == 0).any(),
        (mask[:, 1:] < mask[:, :-1]).any(),
    ]).tolist()
    if not_binary:
        raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), got values {sorted(set(mask.unique().tolist()))[:8]}")
    if empty_row:
        rows = (mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows[:8]} are all 0: every prompt needs at least one token")
    if right_padded:
        rows = (mask[:, 1:] < mask[:, :-1]).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            f"attention_mask rows {rows[:8]} have padding after a token (right padding); generation continues every "
            "row at its end, so pad on the left: zeros first, then ones (craftfn.generation.kv_cache.left_pad does this)"
        )
    return prompt_ids, mask.long()


def eos_and_pad(eos_token_id: Optional[int], pad_token_id: Optional[int]) -> tuple[int, int]:
    """Resolve EOS (-1: none) and pad (default: EOS, else 0)."""
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"{name} must be a non-negative int or None, got {value!r}")
    eos = -1 if eos_token_id is None else eos_token_id
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    return eos, pad


def prefill(
    decoder: Decoder, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, full_mask: torch.Tensor, cache: KVCache
) -> tuple[torch.Tensor, KVCache]:
    """Run the prompt through the model into cache slots ``0..P-1``; return last-position logits ``(B, V)``."""
    prompt_len = prompt_ids.shape[1]
    logits, cache = decoder(
        prompt_ids,
        kv_cache=cache,
        input_pos=torch.arange(prompt_len, device=prompt_ids.device),
        attention_mask=full_mask,
        position_ids=positions_from_mask(prompt_mask),
    )
    return logits[:, -1], cache


def left_pad(prompts: Any, pad_token_id: int = 0, device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts of different lengths, padding on the left: ``(ids, attention_mask)`` ``(B, P_max)``.

    Example:
        >>> left_pad([[5, 6, 7], [8]])
        (tensor([[5, 6, 7],
                [0, 0, 8]]), tensor([[1, 1, 1],
                [0, 0, 1]]))
    """
    rows = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in prompts]
    if not rows:
        raise ValueError("prompts must not be empty")
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_token_id] * (width - len(r)) + r for r in rows], dtype=torch.int64, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64, device=device)
    return ids, mask


def strip_after_eos(ids: list[int], eos_token_id: Optional[int], prompt_len: int = 0) -> list[int]:
    """``ids`` up to (not including) the first EOS after the prompt."""
    if eos_token_id is None:
        return ids
    for i in range(prompt_len, len(ids)):
        if ids[i] == eos_token_id:
            return ids[:i]
    return ids
