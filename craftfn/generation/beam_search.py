"""Beam search on the static KV cache.

Each prompt keeps ``num_beams`` running hypotheses. At every step each beam is extended by every
token, the ``2 * num_beams`` best extensions by total log-probability are considered in order: an
extension ending in EOS (among the first ``num_beams``) becomes a finished hypothesis, the others
fill the next beams. A hypothesis is scored by

    score = sum of the log-probabilities of its generated tokens / generated_length ** length_penalty

where ``generated_length`` counts the generated tokens (EOS included) and never the prompt, so
prompts of any length are scored alike. ``length_penalty > 0`` favours longer outputs, ``< 0``
shorter ones, ``0`` scores by total log-probability. With ``num_beams >= V ** (L - 1)`` and no EOS
the search is exhaustive over continuations of length ``L``; with ``num_beams == 1`` it is greedy.

The whole search runs on tensors of fixed shapes, one step per token: the bookkeeping (best
extensions, finished hypotheses kept as the ``num_beams`` best per prompt, which prompts are done),
then the model's decode step on the static KV cache, without reading anything to the host. With a
craftfn GPT the cache is never copied by beam: its row table is reordered (``KVCache.select_rows``)
and attention reads each slot from the row that wrote it, over the filled prefix only
(``KVCache.prefix``). With the cache the search runs ``steps_per_call`` steps per call;
``compile=True`` compiles those steps, unrolled, once per (batch, beams, length) shape (the prefix
length is a dynamic size of the graph; a search's last call drops the steps past its length on the
device, and a search shorter than ``steps_per_call`` is one call of that many steps); a prompt's completion is checked on the host every ``sync_every`` tokens only, to stop early.

Example:
    >>> import torch
    >>> from craftfn.models import GPT, GPTConfig
    >>> from craftfn.generation import beam_search_generate
    >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
    >>> out = beam_search_generate(model, torch.tensor([[1, 2]]), num_beams=3, max_new_tokens=4, num_return_sequences=2)
    >>> out.sequences.shape, out.scores.shape
    (torch.Size([2, 6]), torch.Size([2]))
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, NamedTuple, Optional, Union

import torch

from craftfn.generation import kv_cache as kvc
from craftfn.generation.sampling import (
    _all_done,
    _compile_options,
    _mark_length_dynamic,
    _memo_jit,
    _positive_int,
    check_max_new_tokens,
)

__all__ = ["BeamSearchOutput", "beam_search_generate"]


class BeamSearchOutput(NamedTuple):
    """``sequences`` ``(B * R, P + max_new_tokens)``: prompt then tokens, pad-filled after EOS, the
    ``R = num_return_sequences`` best of each prompt in order (rows ``b*R .. b*R+R-1``);
    ``scores`` ``(B * R,)`` float64: their length-normalised scores."""

    sequences: torch.Tensor
    scores: torch.Tensor


class _Beams(NamedTuple):
    """The search state: every shape fixed by (batch B, beams k, new tokens N)."""

    tokens: torch.Tensor  # (B*k, N) int64: each running beam's generated tokens, pad after
    scores: torch.Tensor  # (B, k) float64: their total log-probabilities, -inf for dead beams
    fin_scores: torch.Tensor  # (B, k) float64: the k best finished hypotheses' scores, best first, -inf empty
    fin_tokens: torch.Tensor  # (B, k, N) int64: their tokens (EOS included), pad after
    fin_count: torch.Tensor  # (B,) int64: hypotheses finished so far
    done: torch.Tensor  # (B,) bool: the prompt needs no more steps


def _init_beams(batch: int, k: int, n: int, pad: int, device: torch.device) -> _Beams:
    scores = torch.full((batch, k), -math.inf, dtype=torch.float64, device=device)
    scores[:, 0] = 0.0  # only beam 0 is live at first, so the first step does not pick one extension k times
    return _Beams(
        tokens=torch.full((batch * k, n), pad, dtype=torch.int64, device=device),
        scores=scores,
        fin_scores=torch.full((batch, k), -math.inf, dtype=torch.float64, device=device),
        fin_tokens=torch.full((batch, k, n), pad, dtype=torch.int64, device=device),
        fin_count=torch.zeros(batch, dtype=torch.int64, device=device),
        done=torch.zeros(batch, dtype=torch.bool, device=device),
    )


def _best_first(scores: torch.Tensor, *others: torch.Tensor, keep: int) -> tuple[torch.Tensor, ...]:
    """Sort along dim 1 by score, best first, ties in their present order; keep ``keep`` entries."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :keep]
    picked = [torch.gather(scores, 1, order)]
    for x in others:
        idx = order.reshape(order.shape + (1,) * (x.dim() - 2)).expand(order.shape + x.shape[2:])
        picked.append(torch.gather(x, 1, idx))
    return tuple(picked)


def _select(
    logits: torch.Tensor, beams: _Beams, t: torch.Tensor, norms: torch.Tensor,
    k: int, eos: int, pad: int, early_stopping: bool,
) -> tuple[_Beams, torch.Tensor, torch.Tensor]:
    """One step of bookkeeping for generated position ``t``: the new beams, and per row its origin and token.

    Of the ``2k`` best extensions (by total log-probability, in order), one ending in EOS among
    the first ``k`` becomes a finished hypothesis (score: total / ``norms[t]``, i.e. / (t + 1) ** lp);
    the first ``k`` live others become the beams; missing ones are dead (beam 0, pad, -inf).
    """
    batch = beams.done.shape[0]
    n_new = beams.tokens.shape[1]
    # t is a 0-d tensor on the device; index_select (not norms[t], which dynamo reads as an int) reads nothing to the host
    norm = norms.index_select(0, t.reshape(1)).squeeze(0)
    logprobs = torch.log_softmax(logits.double(), dim=-1)  # (B*k, V)
    vocab = logprobs.shape[-1]
    cand = (beams.scores.reshape(-1, 1) + logprobs).reshape(batch, k * vocab)
    top_scores, top_idx = torch.topk(cand, min(2 * k, k * vocab), dim=1)
    beam, tok = top_idx // vocab, top_idx % vocab
    rank = torch.arange(top_idx.shape[1], device=top_idx.device)
    active = (~beams.done)[:, None] & (top_scores > -math.inf)
    ends = tok == eos
    finishing = active & ends & (rank < k)
    extending = active & ~ends
    slot = torch.cumsum(extending.long(), dim=1) - 1
    slot = torch.where(extending & (slot < k), slot, k)  # k: a discarded column
    # Fresh row-major copies: the state keeps one layout from step to step (a compiled step guards on
    # strides; .contiguous() would keep the slice's row stride k + 1 when batch is 1)
    dense = torch.contiguous_format
    origin = torch.zeros(batch, k + 1, dtype=torch.int64, device=beam.device).scatter(1, slot, beam)[:, :k].clone(memory_format=dense)
    new_token = torch.full((batch, k + 1), pad, dtype=torch.int64, device=tok.device).scatter(1, slot, tok)[:, :k].clone(memory_format=dense)
    new_score = torch.full((batch, k + 1), -math.inf, dtype=torch.float64, device=tok.device).scatter(1, slot, top_scores)[:, :k].clone(memory_format=dense)
    row_base = (torch.arange(batch, device=beam.device) * k)[:, None]
    at_t = torch.arange(n_new, device=tok.device) == t  # the column of generated position t

    # Finished hypotheses: the beam's tokens plus EOS, merged into the k best so far.
    rows = (row_base + beam[:, :k]).reshape(-1)
    fin_new = torch.where(at_t, eos, beams.tokens.index_select(0, rows)).reshape(batch, k, n_new)
    fin_new_scores = torch.where(finishing[:, :k], top_scores[:, :k] / norm, -math.inf)
    fin_scores, fin_tokens = _best_first(
        torch.cat([beams.fin_scores, fin_new_scores], dim=1), torch.cat([beams.fin_tokens, fin_new], dim=1), keep=k
    )
    fin_count = beams.fin_count + finishing.sum(dim=1)

    origin = (row_base + origin).reshape(-1)
    new_token = new_token.reshape(-1)
    tokens = torch.where(at_t, new_token[:, None], beams.tokens.index_select(0, origin))
    # A prompt is done with k finished hypotheses and (unless early_stopping) no running beam,
    # scored at its present length, better than the worst of them (Hugging Face's heuristic).
    enough = fin_count >= k
    if not early_stopping:
        enough = enough & (new_score.max(dim=1).values / norm <= fin_scores[:, k - 1])
    new = _Beams(tokens, new_score, fin_scores, fin_tokens, fin_count, beams.done | enough)
    return new, origin, new_token


def _beam_steps(
    module: Any, params: Any, cache: Any, logits: torch.Tensor, beams: _Beams, t: torch.Tensor, norms: torch.Tensor,
    input_pos: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
    k: int, eos: int, pad: int, early_stopping: bool, steps: int, decode_last: bool,
) -> tuple[_Beams, Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``steps`` search steps from generated position ``t``: the unit ``compile=True`` compiles.

    A step is the bookkeeping for position ``t`` (:func:`_select`), then the decode of its tokens
    into cache slot ``input_pos``, whose logits the next step's bookkeeping reads. A step past the
    last position (``t >= max_new_tokens``, in a search's last call) changes nothing: its beams are
    dropped on the device (``torch.where``). The decodes from the last position on are never read:
    their slot is clamped to the given cache's last one, so one graph serves a search of any length.
    ``decode_last=False`` skips the decode of the call's last step, for a caller that knows that
    step is the last position (then the returned logits are the previous step's, read by nobody).

    A cache with a row table (a craftfn GPT's, see ``KVCache.select_rows``) is reordered through
    the table, written back into the given one, so the caller keeps its cache (views of it, here
    the filled prefix); any other cache is reordered by copying its rows and returned. Returns the
    beams, the cache, the last logits and the advanced ``t``, ``input_pos`` and ``position_ids``.
    """
    n_new = norms.shape[0]
    rows = getattr(cache, "rows", None)
    last_slot = cache.max_len - 1
    stepped = cache
    for i in range(steps):
        active = t < n_new
        selected, origin, new_token = _select(logits, beams, t.clamp(max=n_new - 1), norms, k, eos, pad, early_stopping)
        if decode_last or i < steps - 1:
            step_logits, stepped = kvc.call_model(
                module, params, new_token[:, None],
                kv_cache=stepped.index_select(origin) if rows is None else stepped.select_rows(origin),
                input_pos=input_pos.clamp(max=last_slot), attention_mask=attention_mask,
                position_ids=torch.where(active, position_ids, 0)[:, None],
            )
            logits = step_logits[:, -1]  # after the last position's bookkeeping, only dropped steps read them
        beams = _Beams(*(torch.where(active, new, old) for new, old in zip(selected, beams)))
        t, input_pos, position_ids = t + 1, input_pos + 1, position_ids + 1
    if rows is not None and stepped is not cache:
        rows.copy_(stepped.rows)  # in place, as the model writes keys and values: the caller's cache follows
    return beams, stepped, logits, t, input_pos, position_ids


def _compiled_beam_steps(compile_options: dict[str, Any]) -> Any:
    """``craftfn.jit(_beam_steps)`` with ``dynamic=False``, built once per compile options.

    ``k``, ``eos``, ``pad``, ``early_stopping``, ``steps`` and ``decode_last`` are static; positions, scores and
    masks are tensors, so dynamo keeps one graph per (model, batch, beams, length) and reuses it
    for every call. The cache is not donated: the step reorders it by beam into a new one.
    """
    return _memo_jit(_beam_steps, compile_options, static_argnums=(10, 11, 12, 13, 14, 15))


def _results(
    beams: _Beams, prompt_ids: torch.Tensor, k: int, r: int, gen_len: int, length_penalty: float, pad: int
) -> BeamSearchOutput:
    """The ``r`` best hypotheses per prompt: finished ones and, for prompts still running, the live beams."""
    batch, n_new = beams.done.shape[0], beams.tokens.shape[1]
    running = torch.where(beams.done[:, None], -math.inf, beams.scores / float(gen_len**length_penalty))
    scores, tokens = _best_first(
        torch.cat([beams.fin_scores, running], dim=1),
        torch.cat([beams.fin_tokens, beams.tokens.reshape(batch, k, n_new)], dim=1),
        keep=r,
    )
    tokens = torch.where(scores[..., None] > -math.inf, tokens, pad)  # fewer hypotheses than asked: all pad
    prompts = prompt_ids.repeat_interleave(r, dim=0)
    return BeamSearchOutput(torch.cat([prompts, tokens.reshape(batch * r, n_new)], dim=1), scores.reshape(-1))


def beam_search_generate(
    model: Any,
    prompt_ids: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    num_return_sequences: int = 1,
    eos_token_id: Optional[int] = None,
    pad_token_id: Optional[int] = None,
    attention_mask: Optional[torch.Tensor] = None,
    use_cache: Optional[bool] = None,
    compile: Union[bool, Mapping[str, Any]] = False,
    sync_every: int = 16,
    steps_per_call: int = 8,
) -> BeamSearchOutput:
    """Beam search for each prompt row.

    Args:
        model: an ``nn.Module`` mapping ids to logits, or a ``TrainState`` (as in sampling).
        prompt_ids: ``(B, P)`` int64 (left-padded with ``attention_mask`` if lengths differ).
        num_beams: running hypotheses per prompt.
        max_new_tokens: the most tokens a hypothesis generates (>= 1).
        length_penalty: exponent of the generated length in the score (see the module docstring).
        early_stopping: ``True``: a prompt is done as soon as it has ``num_beams`` finished
            hypotheses. ``False``: it also needs that no running beam, scored at its current length,
            beats the worst of them (Hugging Face's heuristic).
        num_return_sequences: best hypotheses returned per prompt, at most ``num_beams``.
        eos_token_id: ends a hypothesis; ``None``: every hypothesis runs ``max_new_tokens``.
        pad_token_id: fills sequences after EOS (default EOS, else 0).
        attention_mask: ``(B, P)`` for left-padded prompts.
        use_cache: default: when the model has a KV cache.
        compile: ``True`` or ``torch.compile`` options: compile the search step (bookkeeping and
            decode, one graph) with :func:`craftfn.jit` once per (batch, beams, length); needs the KV cache. Same tokens
            as ``compile=False``. After the first step of a search, the later ones run under
            ``torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)`` (their arguments
            differ from the first's only in values and the prefix length, a dynamic size).
        sync_every: with an EOS, check every this many tokens whether every prompt is done (the
            only host read of the loop; at the end of the call that reaches a multiple of it);
            the tokens are the same whatever its value.
        steps_per_call: search steps (tokens) per call of the search step, with the KV cache.
            Compiled, the graph is that many steps unrolled: the per-call cost (dynamo's and
            craftfn.jit's Python, the graph's input checks) is paid once per that many tokens,
            and the first compile takes longer (8 against 1, 4 beams of a 4x128 GPT on a CPU:
            ~1.5x the tokens/s for ~4x the compile time). Compiled, every call runs
            ``min(steps_per_call, max_new_tokens)`` steps (steps past ``max_new_tokens`` change
            nothing), so one graph serves every call of a search. Same tokens whatever its value.

    Returns:
        :class:`BeamSearchOutput`.

    Example:
        >>> beam_search_generate(model, ids, num_beams=4, max_new_tokens=10, eos_token_id=0).sequences  # doctest: +SKIP
    """
    _positive_int("num_beams", num_beams)
    _positive_int("num_return_sequences", num_return_sequences)
    _positive_int("sync_every", sync_every)
    _positive_int("steps_per_call", steps_per_call)
    check_max_new_tokens(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens!r}")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if not isinstance(early_stopping, bool):
        raise TypeError(f"early_stopping must be True or False, got {early_stopping!r}")
    compile_options = _compile_options(compile)
    decoder = kvc.as_decoder(model)
    prompt_ids, attention_mask = kvc.check_prompt(prompt_ids, attention_mask, decoder)
    eos, pad = kvc.eos_and_pad(eos_token_id, pad_token_id)
    use_cache = decoder.supports_cache if use_cache is None else use_cache
    if use_cache and not decoder.supports_cache:
        raise ValueError("use_cache=True needs a model with a KV cache (init_kv_cache)")
    if compile_options is not None and not use_cache:
        raise ValueError("compile=True compiles the KV-cache search step; it needs use_cache (a craftfn GPT)")
    batch, device = prompt_ids.shape[0], prompt_ids.device
    k, n_new = num_beams, max_new_tokens
    length_penalty = float(length_penalty)

    with decoder.inference():
        beams = _init_beams(batch, k, n_new, pad, device)
        # The score normalisers (as the host computes them) go to the device once: between syncs the
        # loop only launches work, no copy to or from the host.
        norms = torch.tensor([float((t + 1) ** length_penalty) for t in range(n_new)], dtype=torch.float64, device=device)
        beam_mask = attention_mask.repeat_interleave(k, dim=0)
        if use_cache:
            beams = _search_cached(decoder, prompt_ids, beam_mask, beams, norms, k, eos, pad, early_stopping, compile_options, sync_every, steps_per_call)
        else:
            beams = _search_window(decoder, prompt_ids, beam_mask, beams, norms, k, eos, pad, early_stopping, sync_every)
    return _results(beams, prompt_ids, k, num_return_sequences, n_new, length_penalty, pad)


def _search_cached(
    decoder: kvc.Decoder, prompt_ids: torch.Tensor, beam_mask: torch.Tensor, beams: _Beams, norms: torch.Tensor,
    k: int, eos: int, pad: int, early_stopping: bool, compile_options: Optional[dict[str, Any]], sync_every: int,
    steps_per_call: int,
) -> _Beams:
    """The search on the KV cache, ``steps_per_call`` steps per call of :func:`_beam_steps`."""
    batch, prompt_len = prompt_ids.shape
    n_new = norms.shape[0]
    device = prompt_ids.device
    decoder.check_length(prompt_len + n_new, "max_new_tokens", n_new)
    full_mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, n_new)], dim=1)
    cache = decoder.init_cache(batch, prompt_len + n_new)
    logits, cache = kvc.prefill(decoder, prompt_ids, beam_mask[::k], full_mask[::k], cache)
    cache = cache.index_select(torch.arange(batch, device=device).repeat_interleave(k))
    # A craftfn GPT (any model declaring it) reads its cache through a row table: the search reorders
    # the table, not the keys and values, and each call attends over the prefix its steps fill only.
    through_rows = getattr(decoder.module, "attends_through_kv_rows", False) is True
    if through_rows:
        cache = cache.select_rows(torch.arange(batch * k, device=device))
    logits = logits.repeat_interleave(k, dim=0)
    t = torch.zeros((), dtype=torch.int64, device=device)
    input_pos = torch.full((1,), prompt_len, dtype=torch.int64, device=device)
    position_ids = beam_mask.sum(dim=1)
    compiled = compile_options is not None
    step = _compiled_beam_steps(compile_options) if compiled else _beam_steps
    with contextlib.ExitStack() as later_calls:
        for start in range(0, n_new, steps_per_call):
            # Compiled, every call runs the same number of steps (one graph; the last call's extra steps
            # change nothing), at most n_new: a shorter search is one call; eagerly, only the steps left.
            steps = min(steps_per_call, n_new) if compiled else min(steps_per_call, n_new - start)
            # The last position's decode is never read: skipped in a call that ends there, eagerly, and
            # compiled when the search is that one call (its graph serves no other call; a longer
            # search's calls all keep the decode: one graph).
            decode_last = start + steps != n_new or (compiled and start > 0)
            # The slots these steps' kept decodes write (the last position's decode is never read):
            # always short of the whole cache, so every call's views have the same strides.
            filled = prompt_len + min(start + steps, n_new - 1)
            view, mask = (cache.prefix(filled), full_mask[:, :filled]) if through_rows else (cache, full_mask)
            if through_rows and compiled and start == 0 and filled > 1:  # a size-1 length would be specialised
                _mark_length_dynamic(view, mask)
            beams, stepped, logits, t, input_pos, position_ids = step(
                decoder.module, decoder.params, view, logits, beams, t, norms,
                input_pos, position_ids, mask, k, eos, pad, early_stopping, steps, decode_last,
            )
            if compiled and start == 0:
                # The first call checked every guard (and compiled if needed). The later ones pass the
                # same structure, dtypes, devices and shapes, but the prefix length, a dynamic size of
                # the graph: dynamo's guard check per call would only repeat it.
                later_calls.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
            cache = cache if through_rows else stepped  # through rows, the steps wrote into cache's views
            if _all_done(beams.done, eos, start, start + steps, sync_every):
                break
    return beams


def _search_window(
    decoder: kvc.Decoder, prompt_ids: torch.Tensor, beam_mask: torch.Tensor, beams: _Beams, norms: torch.Tensor,
    k: int, eos: int, pad: int, early_stopping: bool, sync_every: int,
) -> _Beams:
    """The search without a cache: every step recomputes the window (any model mapping ids to logits)."""
    n_new = norms.shape[0]
    logits = decoder.forward_window(prompt_ids, beam_mask[::k]).repeat_interleave(k, dim=0)
    beam_prompts = prompt_ids.repeat_interleave(k, dim=0)
    t_ = torch.zeros((), dtype=torch.int64, device=prompt_ids.device)
    for t in range(n_new):
        beams, _, _ = _select(logits, beams, t_, norms, k, eos, pad, early_stopping)
        if t == n_new - 1 or _all_done(beams.done, eos, t, t + 1, sync_every):
            break
        ids = torch.cat([beam_prompts, beams.tokens[:, : t + 1]], dim=1)
        logits = decoder.forward_window(ids, torch.cat([beam_mask, beam_mask.new_ones(beam_mask.shape[0], t + 1)], dim=1))
        t_ = t_ + 1
    return beams
