"""Beam search: exhaustive search equals brute force, one beam equals greedy, scores as documented."""

import itertools
import math

import pytest
import torch

from craftfn.generation import beam_search_generate, generate_text_sampling, left_pad
from craftfn.models import GPT, GPTConfig

V = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():  # sharper distributions make the ranking non-trivial
        for p in m.parameters():
            p.mul_(8)
    # float64: cached, padded and recomputed logits then agree to ~1e-15, so scores compare tightly.
    return m.double()


def brute_force(model, prompt, length):
    """Every continuation of ``length`` tokens with its total log-probability, best first."""
    conts = torch.tensor(list(itertools.product(range(V), repeat=length)))
    ids = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], 1)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).double(), -1)
    p = len(prompt)
    scores = logprobs[:, p - 1 : -1].gather(-1, ids[:, p:, None]).squeeze(-1).sum(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    return conts[order], scores[order]


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("length", [2, 3])
def test_exhaustive_beam_search_equals_brute_force(model, use_cache, length):
    prompts = [[1, 2, 0], [3, 3, 1]]
    beams = V ** (length - 1)
    out = beam_search_generate(
        model, torch.tensor(prompts), num_beams=beams, max_new_tokens=length,
        length_penalty=0.0, num_return_sequences=beams, use_cache=use_cache,
    )
    for b, prompt in enumerate(prompts):
        conts, scores = brute_force(model, prompt, length)
        got = out.sequences[b * beams : (b + 1) * beams]
        assert torch.equal(got[:, :3], torch.tensor(prompt).expand(beams, -1))
        # The top num_beams continuations, in order, with their exact scores.
        assert got[:, 3:].tolist() == conts[:beams].tolist()
        torch.testing.assert_close(out.scores[b * beams : (b + 1) * beams], scores[:beams], atol=1e-10, rtol=1e-10)


def test_one_beam_is_greedy(model):
    prompts = torch.tensor([[1, 2, 0], [3, 3, 1], [0, 0, 0]])
    greedy = generate_text_sampling(model, prompts, max_new_tokens=8, temperature=0.0)
    assert torch.equal(beam_search_generate(model, prompts, num_beams=1, max_new_tokens=8).sequences, greedy)
    eos = int(greedy[0, 5])
    greedy_eos = generate_text_sampling(model, prompts, max_new_tokens=8, temperature=0.0, eos_token_id=eos)
    beam_eos = beam_search_generate(model, prompts, num_beams=1, max_new_tokens=8, eos_token_id=eos, early_stopping=True)
    assert torch.equal(beam_eos.sequences, greedy_eos)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -1.0])
def test_scores_are_generated_logprob_over_generated_length(model, length_penalty):
    """Every returned score equals its sequence's recomputed log-probability / generated length ** lp,
    with the prompt excluded (two prompts of different lengths, left-padded, are scored alike)."""
    ids, mask = left_pad([[1, 2, 0, 1, 1], [3]])
    eos = 2
    out = beam_search_generate(
        model, ids, attention_mask=mask, num_beams=4, max_new_tokens=6, eos_token_id=eos, pad_token_id=0,
        length_penalty=length_penalty, num_return_sequences=4,
    )
    assert out.scores.view(2, 4).diff(dim=1).le(1e-12).all()  # best first
    for i, (seq, score) in enumerate(zip(out.sequences.tolist(), out.scores.tolist())):
        prompt = [[1, 2, 0, 1, 1], [3]][i // 4]
        gen = seq[5:]
        gen = gen[: gen.index(eos) + 1] if eos in gen else gen
        full = torch.tensor([prompt + gen])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(full).double(), -1)[0]
        total = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(gen))
        assert score == pytest.approx(total / len(gen) ** length_penalty, rel=1e-6, abs=1e-9)
        assert all(t == 0 for t in seq[5 + len(gen) :])  # pad after EOS


def test_length_penalty_changes_which_length_wins(model):
    # Scores are negative: lp = -2 multiplies them by length ** 2 (short wins), lp = 4 divides by
    # length ** 4 (long wins). This prompt and EOS put hypotheses ending at EOS after 1-5 tokens in
    # the beams, so the penalty really chooses: the short end must finish early, the long end must
    # run to max_new_tokens, and the winning length never shrinks as lp grows.
    ids, eos, max_new = torch.tensor([[3, 3, 1]]), 1, 8
    penalties = [-2.0, 0.0, 1.0, 4.0]

    def winning_length(lp):
        out = beam_search_generate(model, ids, num_beams=4, max_new_tokens=max_new, eos_token_id=eos, length_penalty=lp)
        gen = out.sequences[0, ids.shape[1]:].tolist()
        return gen.index(eos) + 1 if eos in gen else max_new

    lengths = [winning_length(lp) for lp in penalties]
    assert lengths == sorted(lengths), f"winning lengths {lengths} for length_penalty {penalties}"
    assert lengths[0] < max_new and lengths[-1] == max_new, f"winning lengths {lengths} for length_penalty {penalties}"


def test_bad_input(model):
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="num_return_sequences=3 must be <= num_beams=2"):
        beam_search_generate(model, ids, num_beams=2, max_new_tokens=3, num_return_sequences=3)
    with pytest.raises(ValueError, match="num_beams"):
        beam_search_generate(model, ids, num_beams=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        beam_search_generate(model, ids, num_beams=2, max_new_tokens=-1)
    with pytest.raises(ValueError, match="length_penalty"):
        beam_search_generate(model, ids, num_beams=2, max_new_tokens=2, length_penalty=math.nan)
    with pytest.raises(ValueError, match="empty prompt"):
        beam_search_generate(model, ids[:, :0], num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="context of 16"):
        beam_search_generate(model, torch.zeros(1, 20, dtype=torch.long), num_beams=2, max_new_tokens=2)


# --------------------------------------------------------------------------------------------
# The tensor search against the host loop it replaced, and compiled against eager
# --------------------------------------------------------------------------------------------


def host_loop_beam_search(model, prompt_ids, mask, k, n, lp, early, r, eos, pad):
    """craftfn's earlier beam search (Python lists, one host read per token), the oracle for the tensor search."""
    batch, plen = prompt_ids.shape
    ids = prompt_ids.repeat_interleave(k, 0)
    beam_mask = mask.repeat_interleave(k, 0)
    tokens = [[] for _ in range(batch * k)]
    scores = [[0.0] + [-math.inf] * (k - 1) for _ in range(batch)]
    finished = [[] for _ in range(batch)]
    done = [False] * batch

    def logprobs():
        full = torch.cat([ids, torch.tensor(tokens, dtype=torch.long).reshape(batch * k, -1)], 1)
        m = torch.cat([beam_mask, beam_mask.new_ones(batch * k, full.shape[1] - plen)], 1)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():
            return torch.log_softmax(model(full, attention_mask=m, position_ids=pos)[:, -1].double(), -1)

    def is_done(b, gen_len):
        if len(finished[b]) < k:
            return False
        if early:
            return True
        return max(scores[b]) / gen_len**lp <= sorted(h[0] for h in finished[b])[-k]

    for t in range(n):
        lp_ = logprobs()
        vocab = lp_.shape[-1]
        cand = (torch.tensor(scores, dtype=torch.float64).reshape(-1, 1) + lp_).reshape(batch, k * vocab)
        top_s, top_i = torch.topk(cand, min(2 * k, k * vocab), dim=1)
        new_tokens, new_scores = [], []
        for b in range(batch):
            chosen = []
            if not done[b]:
                for rank, (s, flat) in enumerate(zip(top_s[b].tolist(), top_i[b].tolist())):
                    if s == -math.inf:
                        break
                    beam, tok = divmod(flat, vocab)
                    if tok == eos:
                        if rank < k:
                            finished[b].append((s / (t + 1) ** lp, tokens[b * k + beam] + [tok]))
                        continue
                    chosen.append((beam, tok, s))
                    if len(chosen) == k:
                        break
            chosen += [(0, pad, -math.inf)] * (k - len(chosen))
            new_tokens += [tokens[b * k + beam] + [tok] for beam, tok, _ in chosen]
            new_scores.append([s for _, _, s in chosen])
        tokens, scores = new_tokens, new_scores
        for b in range(batch):
            done[b] = done[b] or is_done(b, t + 1)
        if all(done):
            break
    seqs, out_scores = [], []
    for b in range(batch):
        hyps = list(finished[b])
        if not done[b]:
            hyps += [(s / len(tokens[b * k + j]) ** lp, tokens[b * k + j]) for j, s in enumerate(scores[b]) if s > -math.inf]
        best = sorted(hyps, key=lambda h: -h[0])[:r]
        best += [(-math.inf, [])] * (r - len(best))
        for s, seq in best:
            seqs.append(prompt_ids[b].tolist() + seq + [pad] * (n - len(seq)))
            out_scores.append(s)
    return seqs, out_scores


@pytest.fixture(scope="module")
def wide_model():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=7, block_size=24, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    return m.double()


@pytest.mark.parametrize(
    "k, n, lp, early, r, eos",
    [(3, 6, 1.0, False, 2, 2), (4, 8, 0.0, True, 4, 1), (2, 7, -1.5, False, 1, 3), (4, 5, 2.0, False, 3, None), (1, 6, 1.0, False, 1, 0)],
)
def test_tensor_search_equals_the_host_loop(wide_model, k, n, lp, early, r, eos):
    ids, mask = left_pad([[1, 2, 0, 5, 1], [3], [6, 6]])
    pad = 4
    out = beam_search_generate(
        wide_model, ids, attention_mask=mask, num_beams=k, max_new_tokens=n, length_penalty=lp,
        early_stopping=early, num_return_sequences=r, eos_token_id=eos, pad_token_id=pad, sync_every=2,
    )
    seqs, scores = host_loop_beam_search(wide_model, ids, mask, k, n, lp, early, r, -1 if eos is None else eos, pad)
    assert out.sequences.tolist() == seqs
    torch.testing.assert_close(out.scores, torch.tensor(scores, dtype=torch.float64), rtol=1e-9, atol=1e-12)


def test_compiled_search_is_one_graph_per_shape_with_the_same_tokens(wide_model):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    ids, mask = left_pad([[1, 2, 0, 5, 1], [3]])
    # Three steps per call: the calls share the graph as the attended prefix grows, and dynamo traces
    # 3 unrolled steps, not the default 8 (test_short_searches_decode_only_the_positions_read compiles the default).
    kwargs = dict(attention_mask=mask, num_beams=3, max_new_tokens=7, steps_per_call=3, eos_token_id=2, num_return_sequences=2)
    eager = beam_search_generate(wide_model, ids, **kwargs)
    compiled = beam_search_generate(wide_model, ids, compile={"backend": counter}, **kwargs)
    assert torch.equal(compiled.sequences, eager.sequences) and torch.equal(compiled.scores, eager.scores)
    assert counter.frame_count == 1  # every position reused the one graph (fullgraph: no breaks)
    beam_search_generate(wide_model, ids, compile={"backend": counter}, **kwargs)
    assert counter.frame_count == 1
    # Batch 1 (a new shape: one more graph, no more): the beam state keeps its strides from step to
    # step and the attended prefix grows as a dynamic size, so no position recompiles.
    one = dict(kwargs, attention_mask=None)
    compiled = beam_search_generate(wide_model, ids[:1], compile={"backend": counter}, **one)
    assert counter.frame_count == 2
    assert torch.equal(compiled.sequences, beam_search_generate(wide_model, ids[:1], **one).sequences)
    with pytest.raises(ValueError, match="needs use_cache"):
        beam_search_generate(wide_model, ids, compile=True, use_cache=False, **kwargs)


def test_decode_through_the_row_table_equals_decode_on_copied_rows(wide_model):
    """KVCache.select_rows + prefix (beam search's cache) give the logits of a cache whose rows are
    copied (index_select) and attended in full, over two reorders, without copying keys or values."""
    ids = torch.tensor([[1, 2, 0], [3, 3, 1], [6, 5, 4]])
    full = wide_model.init_kv_cache(3, 8)
    with torch.no_grad():
        _, full = wide_model(ids, kv_cache=full, input_pos=torch.arange(3))
        table = full.index_select(torch.arange(3))  # an independent copy, read through rows
        table = table.select_rows(torch.arange(3))
        k_storage = table.k[0].data_ptr()
        for pos, (origin, tok) in enumerate([([2, 2, 0], [1, 4, 5]), ([1, 0, 0], [0, 2, 6])], start=3):
            origin, tok = torch.tensor(origin), torch.tensor(tok)[:, None]
            want, full = wide_model(tok, kv_cache=full.index_select(origin), input_pos=torch.tensor([pos]))
            view = table.select_rows(origin).prefix(pos + 1)
            got, view = wide_model(tok, kv_cache=view, input_pos=torch.tensor([pos]))
            table.rows[:, : pos + 1] = view.rows
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert table.k[0].data_ptr() == k_storage
    with pytest.raises(ValueError, match="select_rows"):
        table.index_select(torch.arange(3))
    with pytest.raises(ValueError, match="length must be an int in"):
        table.prefix(9)


def test_search_in_calls_of_several_steps_is_one_graph_with_the_same_tokens(wide_model):
    """steps_per_call > 1: each call runs several steps, the last call drops the steps past
    max_new_tokens on the device, the attended prefix grows by several slots per call, and the early
    stop is checked between calls; the tokens are those of the host loop whatever steps_per_call, and
    the compiled calls reuse one graph (a call whose views changed strides would recompile)."""
    from torch._dynamo.testing import CompileCounter

    ids, mask = left_pad([[1, 2, 0, 5, 1], [3]])
    k, n, eos, pad = 3, 7, 2, 4
    kwargs = dict(attention_mask=mask, num_beams=k, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, num_return_sequences=2, sync_every=2)
    seqs, scores = host_loop_beam_search(wide_model, ids, mask, k, n, 1.0, False, 2, eos, pad)
    assert beam_search_generate(wide_model, ids, steps_per_call=3, **kwargs).sequences.tolist() == seqs
    torch._dynamo.reset()
    counter = CompileCounter()
    # 7 tokens in calls of 2 steps: four calls, the last with one step past the end.
    compiled = beam_search_generate(wide_model, ids, compile={"backend": counter}, steps_per_call=2, **kwargs)
    assert compiled.sequences.tolist() == seqs
    torch.testing.assert_close(compiled.scores, torch.tensor(scores, dtype=torch.float64), rtol=1e-9, atol=1e-12)
    assert counter.frame_count == 1
    # Without EOS every hypothesis runs to the end; calls of 3 steps: the last with two dropped steps.
    seqs, _ = host_loop_beam_search(wide_model, ids, mask, k, n, 1.0, False, 2, -1, pad)
    no_eos = dict(kwargs, eos_token_id=None)
    assert beam_search_generate(wide_model, ids, compile={"backend": counter}, steps_per_call=3, **no_eos).sequences.tolist() == seqs
    assert counter.frame_count == 2  # another steps_per_call: one more graph, no more
    with pytest.raises(ValueError, match="steps_per_call must be a positive int"):
        beam_search_generate(wide_model, ids, steps_per_call=0, **kwargs)


class _CallRecordingGPT(GPT):
    """A GPT that records the shape of every ids batch it is called on, compiled too (dynamo replays
    the list's appends after the graph; beam search checks guards, so replays, in a search's first call)."""

    def __init__(self, config):
        super().__init__(config)
        self.calls = []

    def forward(self, idx, *args, **kwargs):
        self.calls.append(tuple(idx.shape))
        return super().forward(idx, *args, **kwargs)


def test_short_searches_decode_only_the_positions_read(wide_model):
    """max_new_tokens <= steps_per_call: the compiled search is one call of max_new_tokens steps (not
    steps_per_call), and no search decodes the last position's tokens, whose logits nobody reads:
    max_new_tokens - 1 decodes after the prefill, compiled and eager, with the host loop's tokens,
    one graph per length."""
    from torch._dynamo.testing import CompileCounter

    model = _CallRecordingGPT(wide_model.config).double().eval()
    model.load_state_dict(wide_model.state_dict())
    ids, mask = left_pad([[1, 2, 0, 5, 1], [3]])
    k, eos, pad = 3, 2, 4
    decode = (ids.shape[0] * k, 1)

    def search(n, eos=eos, **kw):
        model.calls.clear()
        out = beam_search_generate(
            model, ids, attention_mask=mask, num_beams=k, max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, **kw
        )
        assert model.calls[0] == tuple(ids.shape) and set(model.calls[1:]) <= {decode}  # the prefill, then decodes
        return out.sequences.tolist(), len(model.calls) - 1

    torch._dynamo.reset()
    counter = CompileCounter()
    for n, graphs in [(1, 1), (3, 2)]:  # the default steps_per_call is 8
        seqs, _ = host_loop_beam_search(wide_model, ids, mask, k, n, 1.0, False, 1, eos, pad)
        assert search(n) == (seqs, n - 1)
        assert search(n, compile={"backend": counter}) == (seqs, n - 1)
        assert counter.frame_count == graphs
    assert search(3, compile={"backend": counter}) == (seqs, 2)
    assert counter.frame_count == 2  # the length seen before: its graph
    # Eagerly, calls of 3 steps for 7 tokens: the last call (one step) skips its decode too.
    seqs, _ = host_loop_beam_search(wide_model, ids, mask, k, 7, 1.0, False, 1, -1, pad)
    assert search(7, eos=None, steps_per_call=3) == (seqs, 6)
