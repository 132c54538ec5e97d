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

The search bookkeeping (which hypotheses finished) runs on the host, one read per step; the
model calls reuse the sampling loop's prefill/decode and reorder the cache rows by beam.

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

import math
from typing import Any, NamedTuple, Optional

import torch

from craftfn.generation import kv_cache as kvc
from craftfn.generation.sampling import check_max_new_tokens

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

    Returns:
        :class:`BeamSearchOutput`.

    Example:
        >>> beam_search_generate(model, ids, num_beams=4, max_new_tokens=10, eos_token_id=0).sequences  # doctest: +SKIP
    """
    _positive_int("num_beams", num_beams)
    _positive_int("num_return_sequences", num_return_sequences)
    check_max_new_tokens(max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 for beam search, got {max_new_tokens!r}")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    decoder = kvc.as_decoder(model)
    prompt_ids, attention_mask = kvc.check_prompt(prompt_ids, attention_mask, decoder)
    eos, pad = kvc.eos_and_pad(eos_token_id, pad_token_id)
    use_cache = decoder.supports_cache if use_cache is None else use_cache
    if use_cache and not decoder.supports_cache:
        raise ValueError("use_cache=True needs a model with a KV cache (init_kv_cache)")
    batch, prompt_len = prompt_ids.shape
    k = num_beams
    device = prompt_ids.device

    with decoder.inference():
        # Every beam starts as the prompt; only beam 0 is live, so the first step does not pick
        # the same extension k times.
        beam_mask = attention_mask.repeat_interleave(k, dim=0)
        if use_cache:
            decoder.check_length(prompt_len + max_new_tokens, "max_new_tokens", max_new_tokens)
            full_mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, max_new_tokens)], dim=1)
            cache = decoder.init_cache(batch, prompt_len + max_new_tokens)
            logits, cache = kvc.prefill(decoder, prompt_ids, attention_mask, full_mask[::k], cache)
            cache = cache.index_select(torch.arange(batch, device=device).repeat_interleave(k))
            logits = logits.repeat_interleave(k, dim=0)
            next_pos = beam_mask.sum(dim=1)
        else:
            logits = decoder.forward_window(prompt_ids, attention_mask).repeat_interleave(k, dim=0)
        tokens = torch.empty(batch * k, 0, dtype=torch.int64, device=device)
        scores = torch.full((batch, k), -math.inf, dtype=torch.float64, device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch

        for t in range(max_new_tokens):
            logprobs = torch.log_softmax(logits.double(), dim=-1)  # (B*k, V)
            vocab = logprobs.shape[-1]
            cand = (scores.reshape(-1, 1) + logprobs).reshape(batch, k * vocab)
            top_scores, top_idx = torch.topk(cand, min(2 * k, k * vocab), dim=1)
            top_scores_h, top_idx_h = top_scores.tolist(), top_idx.tolist()  # the one host read per step
            gen_len = t + 1
            new_origin, new_token, new_score = [], [], []
            for b in range(batch):
                chosen: list[tuple[int, int, float]] = []
                if not done[b]:
                    for rank, (s, flat) in enumerate(zip(top_scores_h[b], top_idx_h[b])):
                        if s == -math.inf:
                            break
                        beam, tok = divmod(flat, vocab)
                        if tok == eos:
                            if rank < k:
                                seq = tokens[b * k + beam].tolist() + [tok]
                                finished[b].append((s / gen_len**length_penalty, seq))
                            continue
                        chosen.append((beam, tok, s))
                        if len(chosen) == k:
                            break
                # Fill with dead beams (score -inf) when fewer than k extensions are live.
                while len(chosen) < k:
                    chosen.append((0, pad, -math.inf))
                for beam, tok, s in chosen:
                    new_origin.append(b * k + beam)
                    new_token.append(tok)
                    new_score.append(s)
            origin = torch.tensor(new_origin, device=device)
            new_tokens = torch.tensor(new_token, device=device)
            tokens = torch.cat([tokens.index_select(0, origin), new_tokens[:, None]], dim=1)
            scores = torch.tensor(new_score, dtype=torch.float64, device=device).reshape(batch, k)
            for b in range(batch):
                if not done[b]:
                    done[b] = _is_done(finished[b], scores[b], k, gen_len, length_penalty, early_stopping)
            if all(done) or t == max_new_tokens - 1:
                break
            if use_cache:
                cache = cache.index_select(origin)
                slot = torch.tensor([prompt_len + t], device=device)
                step_logits, cache = decoder(
                    new_tokens[:, None], kv_cache=cache, input_pos=slot, attention_mask=full_mask,
                    position_ids=(next_pos + t)[:, None],
                )
                logits = step_logits[:, -1]
            else:
                ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens], dim=1)
                mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, tokens.shape[1])], dim=1)
                logits = decoder.forward_window(ids, mask)

    # Prompts still running at the end: their live beams are hypotheses too.
    final_scores = scores.tolist()
    for b in range(batch):
        if done[b]:
            continue
        for j in range(k):
            if final_scores[b][j] > -math.inf:
                seq = tokens[b * k + j].tolist()
                finished[b].append((final_scores[b][j] / len(seq) ** length_penalty, seq))
    out_seqs, out_scores = [], []
    for b in range(batch):
        best = sorted(finished[b], key=lambda h: -h[0])[:num_return_sequences]
        while len(best) < num_return_sequences:  # fewer distinct continuations than requested
            best.append((-math.inf, []))
        for score, seq in best:
            seq = seq + [pad] * (max_new_tokens - len(seq))
            out_seqs.append(prompt_ids[b].tolist() + seq)
            out_scores.append(score)
    return BeamSearchOutput(
        torch.tensor(out_seqs, dtype=torch.int64, device=device),
        torch.tensor(out_scores, dtype=torch.float64, device=device),
    )


def _is_done(finished, running_scores, num_beams, gen_len, length_penalty, early_stopping) -> bool:
    if len(finished) < num_beams:
        return False
    if early_stopping:
        return True
    worst_kept = sorted(h[0] for h in finished)[-num_beams]
    best_running = float(running_scores.max()) / gen_len**length_penalty
    return best_running <= worst_kept
