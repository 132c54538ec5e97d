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
(``KVCache.prefix``). ``compile=True`` compiles that step once per (batch, beams, length) shape (the
prefix length is a dynamic size of the graph); a prompt's completion is checked on the host every
``sync_every`` tokens only, to stop early.

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
from craftfn.generation.sampling import _compile_options, _memo_jit, check_max_new_tokens
from craftfn.models.gpt import GPT

__all__ = ["BeamSearchOutput", "beam_search_generate"]


class BeamSearchOutput(NamedTuple):
    """``sequences`` ``(B * R, P + max_new_tokens)``: prompt then tokens, pad-filled after EOS, the
    ``R = num_return_sequences`` best of each prompt in order (rows ``b*R .. b*R+R-1``);
    ``scores`` ``(B * R,)`` float64: their length-normalised scores."""

    sequences: torch.Tensor
    scores: torch.Tensor


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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


def _beam_step(
    module: Any, params: Any, cache: Any, logits: torch.Tensor, beams: _Beams, t: torch.Tensor, norms: torch.Tensor,
    input_pos: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
    k: int, eos: int, pad: int, early_stopping: bool,
) -> tuple[_Beams, Any, torch.Tensor]:
    """Bookkeeping for position ``t``, then the decode step of its tokens: the unit ``compile=True`` compiles.

    A cache with a row table (a craftfn GPT's, see ``KVCache.select_rows``) is reordered through
    the table, written back into the given one, so the caller keeps its cache (views of it, here
    the filled prefix); any other cache is reordered by copying its rows and returned.
    """
    beams, origin, new_token = _select(logits, beams, t, norms, k, eos, pad, early_stopping)
    rows = getattr(cache, "rows", None)
    logits, stepped = kvc.call_model(
        module, params, new_token[:, None], kv_cache=cache.index_select(origin) if rows is None else cache.select_rows(origin),
        input_pos=input_pos, attention_mask=attention_mask, position_ids=position_ids[:, None],
    )
    if rows is not None:
        rows.copy_(stepped.rows)  # in place, as the model writes keys and values: the caller's cache follows
    return beams, stepped, logits[:, -1]


def _mark_length_dynamic(view: Any, mask: torch.Tensor) -> None:
    """The prefix grows by one slot per token: its length is a dynamic size of the one compiled graph
    (marked before the first call, which compiles; later calls reuse the graph whatever the length)."""
    for tensor in (*view.k, *view.v):
        torch._dynamo.mark_dynamic(tensor, 2)
    torch._dynamo.mark_dynamic(view.rows, 1)
    torch._dynamo.mark_dynamic(mask, 1)


def _compiled_beam_step(compile_options: dict[str, Any]) -> Any:
    """``craftfn.jit(_beam_step)`` with ``dynamic=False``, built once per compile options.

    ``k``, ``eos``, ``pad`` and ``early_stopping`` are static; positions, scores and masks are
    tensors, so dynamo keeps one graph per (model, batch, beams, length) and reuses it for every
    token. The cache is not donated: the step reorders it by beam into a new one.
    """
    return _memo_jit(_beam_step, compile_options, static_argnums=(10, 11, 12, 13))


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
            only host read of the loop); the tokens are the same whatever its value.

    Returns:
        :class:`BeamSearchOutput`.

    Example:
        >>> beam_search_generate(model, ids, num_beams=4, max_new_tokens=10, eos_token_id=0).sequences  # doctest: +SKIP
    """
    _positive_int("num_beams", num_beams)
    _positive_int("num_return_sequences", num_return_sequences)
    _positive_int("sync_every", sync_every)
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
    batch, prompt_len = prompt_ids.shape
    k, n_new = num_beams, max_new_tokens
    device = prompt_ids.device
    length_penalty = float(length_penalty)

    with decoder.inference(), contextlib.ExitStack() as later_steps:
        beam_mask = attention_mask.repeat_interleave(k, dim=0)
        if use_cache:
            decoder.check_length(prompt_len + n_new, "max_new_tokens", max_new_tokens)
            full_mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, n_new)], dim=1)
            cache = decoder.init_cache(batch, prompt_len + n_new)
            logits, cache = kvc.prefill(decoder, prompt_ids, attention_mask, full_mask[::k], cache)
            cache = cache.index_select(torch.arange(batch, device=device).repeat_interleave(k))
            # A craftfn GPT reads its cache through a row table: the search reorders the table, not
            # the keys and values, and each step attends over the filled prefix only.
            through_rows = isinstance(decoder.module, GPT)
            if through_rows:
                cache = cache.select_rows(torch.arange(batch * k, device=device))
            logits = logits.repeat_interleave(k, dim=0)
            next_pos = beam_mask.sum(dim=1)
            step = _beam_step if compile_options is None else _compiled_beam_step(compile_options)
        else:
            logits = decoder.forward_window(prompt_ids, attention_mask).repeat_interleave(k, dim=0)
            beam_prompts = prompt_ids.repeat_interleave(k, dim=0)
        beams = _init_beams(batch, k, n_new, pad, device)
        # The score normalisers (as the host computes them) and the counters go to the device once:
        # between syncs the loop only launches work, no copy to or from the host.
        norms = torch.tensor([float((t + 1) ** length_penalty) for t in range(n_new)], dtype=torch.float64, device=device)
        t_ = torch.zeros((), dtype=torch.int64, device=device)
        if use_cache:
            input_pos, position_ids = torch.full((1,), prompt_len, dtype=torch.int64, device=device), next_pos
        gen_len = n_new
        for t in range(n_new):
            if t == n_new - 1:
                beams, _, _ = _select(logits, beams, t_, norms, k, eos, pad, early_stopping)
                break
            if use_cache:
                filled = prompt_len + t + 1
                view, mask = (cache.prefix(filled), full_mask[:, :filled]) if through_rows else (cache, full_mask)
                if through_rows and t == 0 and compile_options is not None:
                    _mark_length_dynamic(view, mask)
                beams, stepped, logits = step(
                    decoder.module, decoder.params, view, logits, beams, t_, norms,
                    input_pos, position_ids, mask, k, eos, pad, early_stopping,
                )
                if t == 0 and compile_options is not None:
                    # The first call checked every guard (and compiled if needed). The later ones pass the
                    # same structure, dtypes, devices and shapes, but the prefix length, a dynamic size of
                    # the graph: dynamo's guard check per token (~0.1-0.3 ms here) would only repeat it.
                    later_steps.enter_context(torch.compiler.set_stance("default", skip_guard_eval_unsafe=True))
                cache = cache if through_rows else stepped  # through rows, the step wrote into cache's views
                input_pos, position_ids = input_pos + 1, position_ids + 1
            else:
                beams, _, _ = _select(logits, beams, t_, norms, k, eos, pad, early_stopping)
                ids = torch.cat([beam_prompts, beams.tokens[:, : t + 1]], dim=1)
                logits = decoder.forward_window(ids, torch.cat([beam_mask, beam_mask.new_ones(batch * k, t + 1)], dim=1))
            t_ = t_ + 1
            if eos >= 0 and (t + 1) % sync_every == 0 and bool(beams.done.all()):
                gen_len = t + 1
                break  # every prompt is done: the remaining steps would change nothing
    return _results(beams, prompt_ids, k, num_return_sequences, gen_len, length_penalty, pad)
