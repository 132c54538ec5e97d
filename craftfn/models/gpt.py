"""A decoder-only transformer of nanoGPT's class, with a static KV cache for generation.

Read top to bottom: config, KV cache, attention, MLP, block, the model, the loss.
Parameter names follow nanoGPT (``transformer.wte.weight``, ``transformer.h.0.attn.c_attn.weight``,
...), so checkpoints and habits carry over. The output head is tied to the token embedding,
so ``named_parameters()`` lists ``transformer.wte.weight`` only.

Two ways to run it:

* training / scoring: ``model(idx) -> logits`` with causal attention (``is_causal=True``), no
  buffers at all, so ``TrainState.buffers`` stays empty;
* generation (gpt-fast style): ``cache = model.init_kv_cache(batch_size, max_len)``, then
  ``logits, cache = model(idx, kv_cache=cache, input_pos=pos)`` for the prompt (prefill) and
  for one token at a time (decode). The cache is preallocated, positions are tensors, and every
  decode call has the same shapes, so ``torch.compile(fullgraph=True)`` compiles it once.

Example:
    >>> import torch
    >>> from craftfn.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8))
    >>> model(torch.zeros(3, 5, dtype=torch.long)).shape
    torch.Size([3, 5, 11])
"""

# nanoGPT's shape names (B, T, C, ...) read better than lowercase here.
# ruff: noqa: N806

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from craftfn import struct

__all__ = [
    "GPTConfig",
    "GPT",
    "KVCache",
    "lm_loss",
    "lm_eval_metrics",
    "ACTIVATIONS",
    "config_from_hf_gpt2",
    "hf_gpt2_config",
    "state_dict_from_hf_gpt2",
    "state_dict_to_hf_gpt2",
    "from_hf_gpt2",
    "to_hf_gpt2",
]

# GPTConfig.activation -> nn.GELU's `approximate`.
ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of a :class:`GPT` (nanoGPT's names).

    Args:
        vocab_size: number of token ids.
        block_size: the context length (number of position embeddings).
        n_layer: transformer blocks.
        n_head: attention heads; must divide ``n_embd``.
        n_embd: width of the residual stream.
        dropout: dropout probability on embeddings, attention weights and residual branches.
        bias: biases in the Linear and LayerNorm layers (GPT-2 has them).
        activation: the MLP's nonlinearity: ``"gelu"`` (exact, erf) or ``"gelu_tanh"`` (the tanh
            approximation GPT-2 was trained with; Hugging Face's ``"gelu_new"``).

    Example:
        >>> GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=32).n_embd
        32
    """

    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    dropout: float = 0.0
    bias: bool = True
    activation: str = "gelu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig.n_head={self.n_head} must divide n_embd={self.n_embd}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")


@struct.dataclass
class KVCache:
    """Preallocated keys and values: per layer, one ``(B, n_head, max_len, head_dim)`` tensor each.

    A pytree (``craftfn.tree`` sees the ``2 * n_layer`` tensors as leaves). The model writes a call's
    keys and values into the slots ``input_pos`` in place: the cache is *donated* to the forward,
    which returns it; keep using the returned one. Slot ``i`` holds the token at cache position
    ``i`` (with left padding, a row's padding occupies its first slots and is masked). One tensor
    per layer (not one stacked tensor) lets ``torch.compile`` write each in place: a write into a
    slice of a stacked input is compiled as a copy of the whole input.
    """

    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]
    # (B, max_len) int64 or None: row i's slot j holds the keys/values stored in batch row rows[i, j]
    # (see select_rows); None: every row reads its own.
    rows: Optional[torch.Tensor] = None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    def index_select(self, indices: torch.Tensor) -> KVCache:
        """A new cache whose batch row ``i`` is a copy of this cache's row ``indices[i]`` (copies every layer)."""
        if self.rows is not None:
            raise ValueError("index_select: this cache reads through rows (select_rows); keep reordering it with select_rows")
        return KVCache(tuple(t.index_select(0, indices) for t in self.k), tuple(t.index_select(0, indices) for t in self.v))

    def prefix(self, length: int) -> KVCache:
        """The first ``length`` slots as views: the model writes through them into this cache and attends no further.

        A decode step at slot ``p`` needs slots ``0..p`` only; passing ``cache.prefix(p + 1)``
        spares attention the empty rest of a static cache. Compiled, call
        :meth:`mark_length_dynamic` on the first prefix so one graph serves every length.

        Example:
            >>> model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
            >>> cache = model.init_kv_cache(batch_size=1, max_len=8)
            >>> logits, _ = model(torch.tensor([[1, 2, 3]]), kv_cache=cache.prefix(3), input_pos=torch.arange(3))
            >>> bool(cache.k[0][:, :, :3].any()), bool(cache.k[0][:, :, 3:].any())
            (True, False)
        """
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= self.max_len:
            raise ValueError(f"length must be an int in [1, max_len={self.max_len}], got {length!r}")
        rows = None if self.rows is None else self.rows[:, :length]
        return KVCache(tuple(t[:, :, :length] for t in self.k), tuple(t[:, :, :length] for t in self.v), rows)

    def mark_length_dynamic(self) -> KVCache:
        """Mark the slot dimension of this cache's tensors (and row table) as a dynamic size for
        ``torch.compile``/``craftfn.jit``, so the prefixes of a growing length share one graph; returns self.

        Example:
            >>> cache = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8)).init_kv_cache(1, 8)
            >>> cache.prefix(3).mark_length_dynamic().max_len
            3
        """
        for tensor in (*self.k, *self.v):
            torch._dynamo.mark_dynamic(tensor, 2)
        if self.rows is not None:
            torch._dynamo.mark_dynamic(self.rows, 1)
        return self

    def select_rows(self, indices: torch.Tensor) -> KVCache:
        """The cache whose row ``i`` reads as this cache's row ``indices[i]``, without copying keys or values.

        Beam search reorders rows every token; copying the whole cache for it costs more than the
        model's step. Here only the ``(B, max_len)`` table ``rows`` is reordered: attention reads
        slot ``j`` of row ``i`` from batch row ``rows[i, j]``, and the model's next write into slot
        ``p`` (row ``i`` into row ``i``, as always) sets ``rows[:, p]`` back to each row itself.
        The keys and values tensors are shared with this cache, which must not be used afterwards.

        Example:
            >>> model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
            >>> cache = model.init_kv_cache(batch_size=2, max_len=4).select_rows(torch.tensor([1, 1]))
            >>> cache.rows
            tensor([[1, 1, 1, 1],
                    [1, 1, 1, 1]])
        """
        if self.rows is None:
            rows = torch.arange(self.batch_size, device=indices.device)[:, None].expand(-1, self.max_len)
        else:
            rows = self.rows
        return KVCache(self.k, self.v, rows.index_select(0, indices))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        layer_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        dropout_p = self.dropout if self.training else 0.0
        if layer_cache is not None:
            # Write this call's keys/values into their slots, then attend over the whole static-size
            # cache; the mask hides empty, future and padding slots. index_put_ (as gpt-fast) stays in
            # place when compiled, and casts happen only when dtypes differ: compiled, even a
            # same-dtype .to() would copy the whole cache every token.
            k_cache, v_cache, rows = layer_cache
            k_cache[:, :, input_pos] = k if k.dtype == k_cache.dtype else k.to(k_cache.dtype)
            v_cache[:, :, input_pos] = v if v.dtype == v_cache.dtype else v.to(v_cache.dtype)
            if rows is not None:
                y = _attend_through_rows(q, k_cache, v_cache, rows, mask)
                return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
            k, v = (k_cache, v_cache) if k_cache.dtype == q.dtype else (k_cache.to(q.dtype), v_cache.to(q.dtype))
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=ACTIVATIONS[config.activation])
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, mask=None, layer_cache=None, input_pos=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, layer_cache, input_pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The model: embeddings, ``n_layer`` blocks, final LayerNorm, head tied to ``wte``.

    Example:
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=8))
        >>> cache = model.init_kv_cache(batch_size=1, max_len=8)
        >>> logits, cache = model(torch.tensor([[1, 2, 3]]), kv_cache=cache, input_pos=torch.arange(3))
        >>> logits.shape
        torch.Size([1, 3, 11])
    """

    #: Its attention reads a KV cache through the cache's row table (``KVCache.select_rows``), so
    #: beam search reorders the table instead of copying the cache. A model of one's own that does
    #: the same sets this to True.
    attends_through_kv_rows: bool = True

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf): one matrix embeds tokens and scores them.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), one per residual add.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters (tied weights counted once).

        Args:
            non_embedding: leave out the position embeddings (nanoGPT's convention; the token
                embedding stays in because it doubles as the output head).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> int:
        """Training FLOPs per token (forward + backward), the PaLM / nanoGPT estimate.

        ``6 * N + 12 * n_layer * n_head * head_dim * seq_len``: 6 FLOPs per parameter per token
        for the matmuls, plus attention scores and values. MFU = tokens/s * this / peak FLOP/s.

        Args:
            seq_len: the attended length (default ``block_size``).
        """
        cfg = self.config
        T = cfg.block_size if seq_len is None else seq_len
        L, H, Q = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head
        return 6 * self.num_params() + 12 * L * H * Q * T

    def init_kv_cache(
        self,
        batch_size: int,
        max_len: Optional[int] = None,
        *,
        dtype: Optional[torch.dtype] = None,
        device: Optional[torch.device | str] = None,
    ) -> KVCache:
        """A zeroed :class:`KVCache` for ``batch_size`` rows and ``max_len`` positions (default ``block_size``)."""
        cfg = self.config
        max_len = cfg.block_size if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= cfg.block_size:
            raise ValueError(f"max_len must be an int in [1, block_size={cfg.block_size}], got {max_len!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        weight = self.transformer.wte.weight
        shape = (batch_size, cfg.n_head, max_len, cfg.n_embd // cfg.n_head)
        dtype = weight.dtype if dtype is None else dtype
        device = weight.device if device is None else device

        def zeros() -> tuple[torch.Tensor, ...]:
            return tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer))

        return KVCache(zeros(), zeros())

    def forward(
        self,
        idx: torch.Tensor,
        *,
        kv_cache: Optional[KVCache] = None,
        input_pos: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
    ) -> Any:
        """Logits ``(B, T, vocab_size)`` for token ids ``idx`` ``(B, T)``.

        Args:
            idx: int64 token ids.
            kv_cache: a cache from :meth:`init_kv_cache`; then ``input_pos`` is required and
                the call returns ``(logits, kv_cache)`` (the cache is updated in place).
            input_pos: ``(T,)`` int64 cache slots of the ``T`` tokens (prefill ``arange(P)``,
                decode ``tensor([p])``); also their positions unless ``position_ids`` is given.
            attention_mask: 1/True for real tokens, 0/False for padding: ``(B, T)`` without a
                cache, ``(B, max_len)`` (over cache slots) with one.
            position_ids: ``(B, T)`` positions for the position embedding; with left padding
                pass ``attention_mask.cumsum(-1) - 1`` so each row starts at position 0.
        """
        B, T = idx.shape
        cfg = self.config
        if kv_cache is None:
            if cfg.block_size < T:
                raise ValueError(f"idx has {T} tokens, more than block_size={cfg.block_size}")
            if input_pos is not None:
                raise ValueError("input_pos is only meaningful with kv_cache")
            pos = torch.arange(T, device=idx.device) if position_ids is None else position_ids
            mask = None if attention_mask is None else _padded_causal_mask(attention_mask, torch.arange(T, device=idx.device))
        else:
            if input_pos is None:
                raise ValueError("kv_cache needs input_pos: the (T,) cache slots of the tokens in idx")
            pos = input_pos if position_ids is None else position_ids
            slots = torch.arange(kv_cache.max_len, device=idx.device)
            if attention_mask is None:
                mask = (slots[None, :] <= input_pos[:, None])[None, None]  # (1, 1, T, max_len)
            else:
                mask = _padded_causal_mask(attention_mask, input_pos)

            if kv_cache.rows is not None:
                # This call writes slots input_pos of every row into that row: from now on they read themselves.
                kv_cache.rows[:, input_pos] = torch.arange(B, device=idx.device)[:, None]
        x = self.transformer.drop(self._embed_tokens(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if kv_cache is None else (kv_cache.k[i], kv_cache.v[i], kv_cache.rows)
            x = block(x, mask, layer_cache, input_pos)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits if kv_cache is None else (logits, kv_cache)


    def _embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.transformer.wte(idx)
        try:
            return self.transformer.wte(idx)
        except IndexError:
            # torch says only "index out of range in self"; the ids are read on this error path alone.
            raise ValueError(
                f"idx holds token ids from {int(idx.min())} to {int(idx.max())}, outside the model's vocabulary: "
                f"ids must be in [0, {self.config.vocab_size}) (GPTConfig.vocab_size); check the tokenizer and the data"
            ) from None


def _attend_through_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Attention of ``q`` ``(B, H, T, D)`` over the cache slots, slot ``j`` of row ``i`` read from row ``rows[i, j]``.

    Written as products and sums (not ``scaled_dot_product_attention`` on gathered tensors) so a
    compiled step fuses the gather into the reductions and never materialises a reordered cache;
    eagerly it is as exact as SDPA's math path (same softmax over the same masked scores).
    """
    slots = torch.arange(k_cache.shape[2], device=rows.device)
    k = k_cache[rows, :, slots].to(q.dtype).permute(0, 2, 1, 3)  # (B, H, S, D)
    v = v_cache[rows, :, slots].to(q.dtype).permute(0, 2, 1, 3)
    scores = (q.unsqueeze(3) * k.unsqueeze(2)).sum(-1) * (1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, S)
    weights = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
    return (weights.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)  # (B, H, T, D)


def _padded_causal_mask(attention_mask: torch.Tensor, query_slots: torch.Tensor) -> torch.Tensor:
    """Boolean ``(B, 1, T, S)`` mask: key slot ``j`` is visible to the query in slot ``q`` when
    ``j <= q`` and ``j`` is not padding. A query always sees itself, so a padding query's row is
    never empty (an all-False row would make softmax produce NaN)."""
    key_slots = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S)
    itself = key_slots[None, :] == query_slots[:, None]
    return ((causal[None] & attention_mask.bool()[:, None, :]) | itself[None])[:, None]


def lm_loss(state: Any, params: Any, batch: dict[str, torch.Tensor], rng: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, a ``loss_fn`` for :func:`craftfn.make_train_step`.

    ``batch`` holds ``input_ids`` and ``labels`` ``(B, T)`` (labels -100 are ignored), as
    :func:`craftfn.data.random_window_batch` makes them.

    Example:
        >>> import craftfn
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8))
        >>> state = craftfn.TrainState.create(model=model, tx=craftfn.optim.adamw(1e-3))
        >>> x = torch.randint(0, 11, (2, 8))
        >>> step = craftfn.make_train_step(lm_loss)
        >>> state, metrics = step(state, {"input_ids": x, "labels": x.roll(-1, 1)})
        >>> int(state.step)
        1
    """
    logits = state.apply(params, batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)


def lm_eval_metrics(state: Any, params: Any, batch: dict[str, torch.Tensor], rng: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"loss": mean token cross-entropy, "num_tokens": counted tokens}``, a ``metric_fn`` for
    :func:`craftfn.make_eval_step`; weight batch means by ``num_tokens`` for an exact mean."""
    labels = batch["labels"]
    loss = lm_loss(state, params, batch, rng)
    return {"loss": loss, "num_tokens": (labels != -100).sum()}


# --------------------------------------------------------------------------------------------
# Hugging Face GPT-2 (the optional `hf` extra): the same architecture, other conventions.
# GPT-2 stores its four projection matrices as Conv1D weights, (in, out): the transposes of
# nn.Linear's (out, in). Every other tensor has the same name and layout.
# --------------------------------------------------------------------------------------------

_CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Hugging Face activation names -> GPTConfig.activation (gelu_new and gelu_pytorch_tanh are the same function).
_FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, GPT-2's layer_norm_epsilon


def config_from_hf_gpt2(hf_config: Any, **overrides: Any) -> GPTConfig:
    """The :class:`GPTConfig` of a Hugging Face ``GPT2Config`` (or its ``to_dict()``).

    Args:
        hf_config: a ``transformers.GPT2Config`` or a dict of its fields.
        **overrides: GPTConfig fields to set instead (e.g. ``dropout=0.0``).

    Raises:
        ValueError: for a GPT-2 variant this model does not implement (naming the field).

    Example:
        >>> config_from_hf_gpt2({"vocab_size": 50, "n_positions": 16, "n_embd": 8, "n_layer": 2, "n_head": 2}).activation
        'gelu_tanh'
    """
    c = dict(hf_config if isinstance(hf_config, dict) else hf_config.to_dict())
    activation = c.get("activation_function", "gelu_new")
    if activation not in _FROM_HF_ACTIVATION:
        raise ValueError(f"activation_function {activation!r} is not supported; supported: {sorted(_FROM_HF_ACTIVATION)}")
    n_embd = c.get("n_embd", 768)
    unsupported = {
        "layer_norm_epsilon": (c.get("layer_norm_epsilon", _LAYER_NORM_EPS), _LAYER_NORM_EPS),
        "n_inner": (c.get("n_inner") or 4 * n_embd, 4 * n_embd),
        "scale_attn_weights": (c.get("scale_attn_weights", True), True),
        "scale_attn_by_inverse_layer_idx": (c.get("scale_attn_by_inverse_layer_idx", False), False),
        "tie_word_embeddings": (c.get("tie_word_embeddings", True), True),
        "add_cross_attention": (c.get("add_cross_attention", False), False),
    }
    for name, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"GPT-2 config {name}={value!r} is not supported: craftfn's GPT implements {name}={wanted!r}")
    dropouts = {c.get(k, 0.1) for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}
    if "dropout" not in overrides and len(dropouts) > 1:
        raise ValueError(
            f"the GPT-2 config has different dropouts (resid_pdrop, embd_pdrop, attn_pdrop = {sorted(dropouts)}); "
            "craftfn's GPT has one: pass dropout=..."
        )
    fields = dict(
        vocab_size=c.get("vocab_size", 50257), block_size=c.get("n_positions", 1024), n_layer=c.get("n_layer", 12),
        n_head=c.get("n_head", 12), n_embd=n_embd, dropout=dropouts.pop(), bias=True,
        activation=_FROM_HF_ACTIVATION[activation],
    )
    return GPTConfig(**{**fields, **overrides})


def hf_gpt2_config(config: GPTConfig, **kwargs: Any) -> Any:
    """The ``transformers.GPT2Config`` of a :class:`GPTConfig` (needs the ``hf`` extra).

    Token ids 50256 (GPT-2's ``<|endoftext|>``) are kept as bos/eos only when the vocabulary
    has them; pass ``bos_token_id=``/``eos_token_id=`` (any ``GPT2Config`` field) to set them.

    Example:
        >>> hf_gpt2_config(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8)).n_positions
        16
    """
    from transformers import GPT2Config

    if not config.bias:
        raise ValueError("GPT-2 has biases in every Linear and LayerNorm: a GPTConfig with bias=False has no GPT-2 equivalent")
    endoftext = 50256 if config.vocab_size > 50256 else None
    fields = dict(
        vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, activation_function=_TO_HF_ACTIVATION[config.activation], resid_pdrop=config.dropout,
        embd_pdrop=config.dropout, attn_pdrop=config.dropout, layer_norm_epsilon=_LAYER_NORM_EPS,
        bos_token_id=endoftext, eos_token_id=endoftext, tie_word_embeddings=True,
    )
    return GPT2Config(**{**fields, **kwargs})


def state_dict_from_hf_gpt2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``GPT2LMHeadModel`` (or ``GPT2Model``) state dict, keyed and laid out as :class:`GPT`'s.

    The Conv1D weights are transposed, a bare ``GPT2Model``'s keys get the ``transformer.`` prefix,
    the head is the token embedding (tied), and GPT-2's attention-mask buffers are dropped. The
    tensors are not copied unless transposed.

    Example:
        >>> sd = state_dict_from_hf_gpt2(hf_model.state_dict())  # doctest: +SKIP
        >>> GPT(config_from_hf_gpt2(hf_model.config)).load_state_dict(sd)  # doctest: +SKIP
    """
    out = {}
    for key, value in state_dict.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers of older transformers
            continue
        out[name] = value.t() if name.endswith(_CONV1D_WEIGHTS) else value
    if "transformer.wte.weight" not in out:
        raise ValueError("not a GPT-2 state dict: no transformer.wte.weight")
    out.setdefault("lm_head.weight", out["transformer.wte.weight"])
    return out


def state_dict_to_hf_gpt2(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`GPT` state dict (tied head stored once or twice), keyed and laid out as ``GPT2LMHeadModel``'s.

    Example:
        >>> GPT2LMHeadModel(hf_gpt2_config(model.config)).load_state_dict(state_dict_to_hf_gpt2(model.state_dict()))  # doctest: +SKIP
    """
    out = {k: (v.t() if k.endswith(_CONV1D_WEIGHTS) else v) for k, v in state_dict.items()}
    embedding = out.get("transformer.wte.weight", out.get("lm_head.weight"))
    if embedding is None:
        raise ValueError("not a craftfn GPT state dict: no transformer.wte.weight or lm_head.weight")
    out["transformer.wte.weight"] = out["lm_head.weight"] = embedding
    return out


def from_hf_gpt2(hf_model: Any, **overrides: Any) -> GPT:
    """A :class:`GPT` with the weights of a Hugging Face ``GPT2LMHeadModel`` (or ``GPT2Model``).

    Logits match the Hugging Face model's (float32: to ~1e-6); the result is in eval mode.

    Args:
        hf_model: the Hugging Face model.
        **overrides: :class:`GPTConfig` fields to set (e.g. ``dropout=0.0`` for fine-tuning).

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> hf = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=8, n_layer=2, n_head=2))
        >>> from_hf_gpt2(hf).config.activation
        'gelu_tanh'
    """
    model = GPT(config_from_hf_gpt2(hf_model.config, **overrides))
    weights = state_dict_from_hf_gpt2(hf_model.state_dict())
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)  # copies
    return model.eval()


def to_hf_gpt2(model: GPT, **config_kwargs: Any) -> Any:
    """A Hugging Face ``GPT2LMHeadModel`` with the weights of ``model`` (needs the ``hf`` extra), in eval mode.

    Args:
        model: a craftfn :class:`GPT` with ``bias=True``.
        **config_kwargs: ``GPT2Config`` fields to set (e.g. ``eos_token_id=0``).

    Example:
        >>> gpt = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=8, activation="gelu_tanh"))
        >>> type(to_hf_gpt2(gpt)).__name__
        'GPT2LMHeadModel'
    """
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(hf_gpt2_config(model.config, **config_kwargs))
    weights = state_dict_to_hf_gpt2(model.state_dict())
    with torch.no_grad():
        hf_model.load_state_dict(weights, strict=True)  # copies
    return hf_model.eval()
