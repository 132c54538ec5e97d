"""Sampling: logits processors as pure functions, ``sample_token`` with explicit keys, and the
sampling loop on a static KV cache.

Processors map logits ``(B, V)`` to logits, marking removed tokens with ``-inf``; they are applied
in this order: repetition penalty, suppressed tokens, temperature, top-k, top-p, min-p. Each
truncation keeps at least one token and keeps every token tied with the last one kept (the cut
never splits a tie, so the result does not depend on how a sort orders equal values).

Tokens are drawn with the Gumbel-max trick on craftfn keys: ``argmax(logits + Gumbel noise)``
where the noise comes from ``random.uniform(fold_in(key, position))``. That is an exact sample
of ``softmax(logits)``, a pure function of (key, position), and free of host syncs, so the whole
decode step compiles into one graph.

Example:
    >>> import torch
    >>> from craftfn import random
    >>> from craftfn.generation import sample_token, top_k_filter
    >>> logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    >>> top_k_filter(logits, 2)
    tensor([[2., 1., -inf, -inf]])
    >>> sample_token(logits, random.key(0), temperature=0.0)
    tensor([0])
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from craftfn import random
from craftfn.generation import kv_cache as kvc
from craftfn.jit import jit

__all__ = [
    "SamplingOptions",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "apply_repetition_penalty",
    "suppress_tokens",
    "process_logits",
    "sample_token",
    "generate_text_sampling",
    "sample_text",
]

_NEG_INF = float("-inf")


# ---------------------------------------------------------------------------------------------
# Processors


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` (``temperature > 0``; 0 means greedy and is handled by :func:`sample_token`).

    Example:
        >>> apply_temperature(torch.tensor([2.0, 4.0]), 2.0)
        tensor([1., 2.])
    """
    if temperature <= 0:
        raise ValueError(f"apply_temperature needs temperature > 0, got {temperature!r} (use sample_token for 0 = greedy)")
    return logits if temperature == 1.0 else logits / temperature


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits (and any tied with the k-th); 0 disables the filter.

    Example:
        >>> top_k_filter(torch.tensor([[1.0, 3.0, 3.0, 0.0]]), 1)
        tensor([[-inf, 3., 3., -inf]])
    """
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, _NEG_INF)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``top_p``.

    Always keeps the most likely token (so a tiny ``top_p`` is greedy, never an empty set), keeps
    tokens tied with the last one kept, and leaves the logits untouched when ``top_p >= 1``.

    Example:
        >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.7)
        tensor([[-0.6931, -1.2040,    -inf]])
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, _ = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    # Token i is kept when the mass strictly before it is still below top_p.
    mass_before = torch.cumsum(probs, dim=-1) - probs
    num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)
    threshold = torch.gather(sorted_logits, -1, num_kept - 1)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's; 0 disables it.

    Example:
        >>> min_p_filter(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 0.5)
        tensor([[-0.5108, -1.2040,    -inf]])
    """
    if min_p <= 0.0:
        return logits
    # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p): no softmax needed.
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: for tokens already present (``seen``, bool ``(B, V)``), divide
    positive logits by ``penalty`` and multiply negative ones by it; 1.0 disables it.

    Example:
        >>> apply_repetition_penalty(torch.tensor([[2.0, -1.0, 1.0]]), torch.tensor([[True, True, False]]), 2.0)
        tensor([[ 1., -2.,  1.]])
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def suppress_tokens(logits: torch.Tensor, token_ids: Optional[Sequence[int]]) -> torch.Tensor:
    """Set the logits of ``token_ids`` to ``-inf`` (they are never generated).

    Example:
        >>> suppress_tokens(torch.zeros(1, 3), [1])
        tensor([[0., -inf, 0.]])
    """
    if not token_ids:
        return logits
    index = torch.tensor(list(token_ids), dtype=torch.int64, device=logits.device)
    return logits.index_fill(-1, index, _NEG_INF)


@dataclass(frozen=True)
class SamplingOptions:
    """The sampling settings, validated; hashable, so a compiled decode step is cached per setting.

    Args:
        temperature: > 0 scales logits; 0 picks the most likely token (greedy).
        top_k: keep the k most likely tokens; 0 disables.
        top_p: nucleus mass in (0, 1]; 1 disables.
        min_p: in [0, 1]; 0 disables.
        repetition_penalty: > 0; 1 disables.
        suppress_tokens: token ids never generated.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    suppress_tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        def number(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        number("temperature", self.temperature)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be a non-negative int (0 disables it), got {self.top_k!r}")
        number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        number("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 disables it), got {self.min_p!r}")
        number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        ids = tuple(self.suppress_tokens or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"suppress_tokens must be non-negative token ids, got {self.suppress_tokens!r}")
        object.__setattr__(self, "suppress_tokens", ids)
        # Store plain floats so equal settings hash (and hit the compile cache) alike.
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))


def process_logits(logits: torch.Tensor, options: SamplingOptions, seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """All processors of ``options`` in order (see the module docstring), in float32.

    With ``temperature == 0`` the temperature and truncation steps are skipped (greedy only
    needs the argmax).
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
    logits = suppress_tokens(logits, options.suppress_tokens)
    if options.temperature == 0.0:
        return logits
    logits = apply_temperature(logits, options.temperature)
    logits = top_k_filter(logits, options.top_k)
    logits = top_p_filter(logits, options.top_p)
    return min_p_filter(logits, options.min_p)


def _gumbel_argmax(logits: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    u = random.uniform(key, logits.shape, torch.float32, device=logits.device)
    gumbel = -torch.log(-torch.log(u))  # u == 0 gives -inf: that token is simply not picked
    return torch.argmax(logits + gumbel, dim=-1)


def sample_token(
    logits: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    suppress_tokens: Sequence[int] = (),
    seen: Optional[torch.Tensor] = None,
    options: Optional[SamplingOptions] = None,
) -> torch.Tensor:
    """Draw one token per row of ``logits`` ``(B, V)`` with an explicit key; no host sync.

    Args:
        logits: unnormalised scores.
        key: a craftfn key; the same key and logits give the same tokens.
        temperature, top_k, top_p, min_p, repetition_penalty, suppress_tokens: see
            :class:`SamplingOptions` (or pass ``options=`` instead).
        seen: bool ``(B, V)``, tokens already in each row (for the repetition penalty).

    Returns:
        ``(B,)`` int64 token ids.

    Example:
        >>> sample_token(torch.zeros(2, 5), random.key(1), top_k=1).shape
        torch.Size([2])
    """
    if options is None:
        options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty, tuple(suppress_tokens))
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (batch, vocab), got {tuple(logits.shape)}")
    processed = process_logits(logits, options, seen)
    if options.temperature == 0.0:
        return torch.argmax(processed, dim=-1)
    return _gumbel_argmax(processed, key)


# ---------------------------------------------------------------------------------------------
# The sampling loop


def _sample_steps(
    module: Any,
    params: Optional[Mapping[str, torch.Tensor]],
    cache: Any,
    token: torch.Tensor,
    input_pos: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    key: torch.Tensor,
    done: torch.Tensor,
    seen: torch.Tensor,
    options: SamplingOptions,
    eos_token_id: int,
    pad_token_id: int,
    steps: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` tokens for every row: the unit ``compile=True`` compiles (static shapes, no syncs).

    A step decodes the last token into cache slot ``input_pos`` and samples the next one from its
    logits with ``fold_in(key, input_pos)``. A step past the cache's last slot (in a generation's
    last call, past ``max_new_tokens``) writes that last slot again, at position 0 (valid inputs,
    so one graph serves a generation of any length); its tokens are dropped by the caller, and
    nothing reads that slot afterwards. Returns the ``(B, steps)`` tokens, the last of them, and the
    advanced ``input_pos``, ``position_ids``, ``done`` and ``seen``; the cache is written in place.
    """
    last_slot = cache.max_len - 1
    chosen = []
    for _ in range(steps):
        inside = input_pos < cache.max_len
        logits, cache = kvc.call_model(
            module, params, token[:, None], kv_cache=cache, input_pos=input_pos.clamp(max=last_slot),
            attention_mask=attention_mask, position_ids=torch.where(inside, position_ids, 0)[:, None],
        )
        token, done, seen = _choose(logits[:, -1], key, input_pos[0], done, seen, options, eos_token_id, pad_token_id)
        chosen.append(token)
        input_pos, position_ids = input_pos + 1, position_ids + 1
    return torch.stack(chosen, dim=1), token, input_pos, position_ids, done, seen


def _choose(logits, key, position, done, seen, options, eos_token_id, pad_token_id):
    """Sample, then apply EOS bookkeeping; shared by the cached, compiled and recompute paths."""
    token = sample_token(logits, random.fold_in(key, position), options=options, seen=seen)
    # Finished rows keep emitting the pad token; eos_token_id < 0 means "no EOS".
    token = torch.where(done, torch.full_like(token, pad_token_id), token)
    done = done | (token == eos_token_id)
    if options.repetition_penalty != 1.0:
        seen = seen.scatter(1, token[:, None], True)
    return token, done, seen


_COMPILED: dict[Any, Any] = {}


def _compiled_sample_steps(compile_options: Mapping[str, Any]) -> Any:
    """``craftfn.jit(_sample_steps)`` with ``dynamic=False``, built once per compile options.

    The sampling options, token ids and ``steps`` are static (one graph per value); positions,
    keys and masks are tensors, and the attended cache prefix's length is a dynamic size, so
    dynamo keeps one graph per (model, batch size, cache length, sampling options, steps) and
    reuses it for every call. A ``TrainState``'s params are inputs of the graph, so new weights
    (a later training step) reuse it too. Dynamo keeps at most
    ``torch._dynamo.config.recompile_limit`` graphs per compiled function; past that it runs the
    steps eagerly (same tokens, with a warning).
    """
    return _memo_jit(_sample_steps, compile_options, static_argnums=(10, 11, 12, 13))


def _memo_jit(fn: Callable[..., Any], compile_options: dict[str, Any], **jit_kwargs: Any) -> Any:
    """``craftfn.jit(fn, dynamic=False, **jit_kwargs, **compile_options)``, built once per (fn, options):
    the generation loops share one compiled step per configuration (and so dynamo's graph cache)."""
    options = {"dynamic": False, **compile_options}
    cache_key = (fn, _option_key(options))
    if cache_key not in _COMPILED:
        _COMPILED[cache_key] = jit(fn, **jit_kwargs, **options)
    return _COMPILED[cache_key]


def _option_key(value: Any) -> Any:
    """A hashable key, equal for equal options: ``compile={"options": {...}}`` written anew at every
    call (a new dict each time) must find the step compiled before, not compile (and keep) another.
    An unhashable value of another kind is keyed by identity (the cached jit keeps it alive)."""
    if isinstance(value, Mapping):
        return ("mapping", tuple(sorted(((repr(k), _option_key(v)) for k, v in value.items()), key=lambda kv: kv[0])))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_option_key(v) for v in value))
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return value


def _compile_options(compile: Union[bool, Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    if compile is False or compile is None:
        return None
    if compile is True:
        return {}
    if isinstance(compile, Mapping):
        return dict(compile)
    raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")


def check_max_new_tokens(max_new_tokens: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _mark_length_dynamic(view: Any, mask: torch.Tensor) -> None:
    """The attended prefix grows by ``steps_per_call`` slots per call: its length is a dynamic size of the one
    compiled graph (marked before the first call, which compiles; later calls reuse the graph whatever the length)."""
    view.mark_length_dynamic()
    torch._dynamo.mark_dynamic(mask, 1)


def _all_done(done: torch.Tensor, eos: int, before: int, after: int, sync_every: int) -> bool:
    """With an EOS, once every ``sync_every`` positions (between ``before`` and ``after``): is every
    row done? The loops' only host read; a done row changes no more, so stopping changes nothing."""
    return eos >= 0 and after // sync_every > before // sync_every and bool(done.all())


def generate_text_sampling(
    model: Any,
    prompt_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    suppress_tokens: Sequence[int] = (),
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    key: Optional[torch.Tensor] = None,
    seed: int = 0,
    use_cache: Optional[bool] = None,
    compile: Union[bool, Mapping[str, Any]] = False,
    sync_every: int = 16,
    steps_per_call: int = 8,
) -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens after each prompt row by sampling (or greedy with temperature 0).

    With a model that has a KV cache (craftfn's GPT), the prompt is prefilled once and each new
    token costs one decode step on a static cache, ``steps_per_call`` steps per call; each call
    attends over the cache slots filled so far only (``KVCache.prefix``). ``compile=True``
    compiles those steps, unrolled, with ``torch.compile(fullgraph=True)`` once per (batch, cache
    length) (the prefix length is a dynamic size of the graph) and gives the same tokens as
    ``compile=False``. Other models (any module mapping ids to logits) recompute the whole
    window each token, as nanoGPT does.

    Args:
        model: an ``nn.Module`` mapping ids ``(B, T)`` to logits ``(B, T, V)`` (or an output with
            ``.logits``), or a ``TrainState`` whose params are used.
        prompt_ids: ``(B, P)`` int64, left-padded if rows differ in length (see ``attention_mask``).
        max_new_tokens: tokens to add (>= 0).
        temperature, top_k, top_p, min_p, repetition_penalty, suppress_tokens: see :class:`SamplingOptions`.
        eos_token_id: a row that emits it is finished and emits ``pad_token_id`` from then on.
        pad_token_id: default ``eos_token_id``, else 0.
        attention_mask: ``(B, P)`` 1 for real tokens, 0 for left padding; positions come from it.
        key: a craftfn key (default ``random.key(seed)``); token ``t`` uses ``fold_in(key, slot of t)``.
        seed: used when ``key`` is not given.
        use_cache: default: when the model has ``init_kv_cache``.
        compile: ``True`` or ``torch.compile`` options (e.g. ``{"backend": "aot_eager"}``) for the decode step.
        sync_every: with an EOS, check every this many tokens whether all rows finished (the only
            host read of the loop; at the end of the call that reaches a multiple of it); the tokens
            are the same whatever its value.
        steps_per_call: decode steps (tokens) per call of the decode step, with the KV cache.
            Compiled, the graph is that many steps unrolled: the per-call cost (dynamo's and
            craftfn.jit's Python, the graph's input checks) is paid once per that many tokens, and
            the first compile takes longer (8 against 1, greedy, a 4x128 GPT on a 2-core CPU: 1.8x
            the tokens/s for one row, 1.3x for 8 rows, for a cold compile of 72-89 s against 26-30 s;
            the top-k/top-p processors make each step's graph larger still: ``steps_per_call=1`` or 2
            keeps the first compile short).
            Compiled, every call runs ``min(steps_per_call, max_new_tokens - 1)`` steps (the tokens
            of steps past ``max_new_tokens`` are dropped), so one graph serves every call of a
            generation. Same tokens whatever its value.

    Returns:
        ``(B, P + max_new_tokens)`` int64: the prompts followed by the generated tokens.

    Example:
        >>> from craftfn.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
        >>> out = generate_text_sampling(model, torch.tensor([[1, 2]]), max_new_tokens=5, top_k=10, seed=0)
        >>> out.shape
        torch.Size([1, 7])
    """
    options = SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty, tuple(suppress_tokens or ()))
    check_max_new_tokens(max_new_tokens)
    _positive_int("sync_every", sync_every)
    _positive_int("steps_per_call", steps_per_call)
    decoder = kvc.as_decoder(model)
    prompt_ids, attention_mask = kvc.check_prompt(prompt_ids, attention_mask, decoder)
    eos, pad = kvc.eos_and_pad(eos_token_id, pad_token_id)
    # Keys live with the tokens: deriving per-token keys then never copies to or from the host.
    key = (random.key(seed) if key is None else key).to(prompt_ids.device)
    compile_options = _compile_options(compile)
    use_cache = decoder.supports_cache if use_cache is None else use_cache
    if use_cache and not decoder.supports_cache:
        raise ValueError("use_cache=True needs a model with a KV cache (init_kv_cache), e.g. craftfn.models.GPT")
    if compile_options is not None and not use_cache:
        raise ValueError("compile=True compiles the KV-cache decode step; it needs use_cache (a craftfn GPT)")
    if max_new_tokens == 0:
        return prompt_ids
    if use_cache:
        return _generate_cached(
            decoder, prompt_ids, attention_mask, max_new_tokens, options, eos, pad, key, compile_options, sync_every, steps_per_call
        )
    return _generate_recompute(decoder, prompt_ids, attention_mask, max_new_tokens, options, eos, pad, key)


def _generate_cached(decoder, prompt_ids, attention_mask, max_new_tokens, options, eos, pad, key, compile_options, sync_every, steps_per_call):
    """Prefill, the first token from its logits, then the others ``steps_per_call`` per call of :func:`_sample_steps`."""
    batch, prompt_len = prompt_ids.shape
    max_len = prompt_len + max_new_tokens
    decoder.check_length(max_len, "max_new_tokens", max_new_tokens)
    device = prompt_ids.device
    with decoder.inference():
        cache = decoder.init_cache(batch, max_len)
        full_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, max_new_tokens)], dim=1)
        logits, cache = kvc.prefill(decoder, prompt_ids, attention_mask, full_mask, cache)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        seen = _seen_mask(prompt_ids, attention_mask, logits.shape[-1], options)
        position = torch.tensor(prompt_len - 1, device=device)
        token, done, seen = _choose(logits, key, position, done, seen, options, eos, pad)
        out = torch.full((batch, max_new_tokens), pad, dtype=torch.int64, device=device)
        out[:, 0] = token
        # Decode j writes token j into slot prompt_len + j and samples token j + 1: max_new_tokens - 1
        # decodes (the last token's decode is never read).
        n_decodes = max_new_tokens - 1
        compiled = compile_options is not None
        step = _compiled_sample_steps(compile_options) if compiled else _sample_steps
        input_pos = torch.full((1,), prompt_len, dtype=torch.int64, device=device)
        position_ids = attention_mask.sum(dim=1)  # each row's position for its first generated token
        with contextlib.ExitStack() as later_calls:
            for start in range(0, n_decodes, steps_per_call):
                # Compiled, every call runs the same number of steps (one graph; the last call's extra
                # steps are dropped), at most n_decodes: a shorter generation is one call; eagerly, only the steps left.
                steps = min(steps_per_call, n_decodes) if compiled else min(steps_per_call, n_decodes - start)
                # The slots this call's kept decodes write: always short of the whole cache (the last
                # token's slot is never written), so every call's views have the same strides.
                filled = prompt_len + min(start + steps, n_decodes)
                # The model writes the cache in place (KVCache's contract), here through views of its prefix.
                view, mask = cache.prefix(filled), full_mask[:, :filled]
                if compiled and start == 0:
                    _mark_length_dynamic(view, mask)
                chosen, token, input_pos, position_ids, done, seen = step(
                    decoder.module, decoder.params, view, token, input_pos, position_ids, mask,
                    key, done, seen, options, eos, pad, steps,
                )
                if compiled and start == 0:
                    # The first call checked every guard (and compiled if needed); the later ones differ
                    # only in values and the prefix length, a dynamic size: dynamo's guard check would repeat it.
                    later_calls.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
                out[:, 1 + start : 1 + start + steps] = chosen[:, : n_decodes - start]
                if _all_done(done, eos, start, start + steps, sync_every):
                    break  # the rest of ``out`` is already padding
    return torch.cat([prompt_ids, out], dim=1)


def _generate_recompute(decoder, prompt_ids, attention_mask, max_new_tokens, options, eos, pad, key):
    batch, prompt_len = prompt_ids.shape
    device = prompt_ids.device
    ids, mask = prompt_ids, attention_mask
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    with decoder.inference():
        seen = None
        for t in range(max_new_tokens):
            logits = decoder.forward_window(ids, mask)
            if seen is None:
                seen = _seen_mask(prompt_ids, attention_mask, logits.shape[-1], options)
            position = torch.tensor(prompt_len + t - 1, device=device)
            token, done, seen = _choose(logits, key, position, done, seen, options, eos, pad)
            ids = torch.cat([ids, token[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
    return ids


def _seen_mask(prompt_ids: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int, options: SamplingOptions) -> torch.Tensor:
    seen = torch.zeros(prompt_ids.shape[0], vocab_size, dtype=torch.bool, device=prompt_ids.device)
    if options.repetition_penalty != 1.0:
        seen = seen.scatter(1, prompt_ids, attention_mask.bool())
    return seen


def sample_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int = 100,
    num_samples: int = 1,
    **kwargs: Any,
) -> list[str]:
    """Sample ``num_samples`` continuations of ``prompt`` and return them as strings (prompt included).

    Args:
        model: as in :func:`generate_text_sampling`.
        tokenizer: has ``encode(str) -> list[int]`` and ``decode(ids) -> str`` (craftfn's tokenizers).
        prompt: a non-empty string.
        max_new_tokens: tokens per sample.
        num_samples: independent samples (rows of one batch).
        kwargs: sampling options of :func:`generate_text_sampling` (``temperature``, ``top_k``, ``seed``, ...).

    Returns:
        ``num_samples`` strings; each stops before its EOS token when ``eos_token_id`` is given.

    Example:
        >>> sample_text(model, tokenizer, "def ", max_new_tokens=20, temperature=0.8, seed=0)  # doctest: +SKIP
    """
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    ids = torch.tensor([tokenizer.encode(prompt)] * num_samples, dtype=torch.int64, device=kvc.model_device(model))
    out = generate_text_sampling(model, ids, max_new_tokens=max_new_tokens, **kwargs)
    eos = kwargs.get("eos_token_id")
    return [tokenizer.decode(kvc.strip_after_eos(row.tolist(), eos, ids.shape[1])) for row in out.cpu()]
