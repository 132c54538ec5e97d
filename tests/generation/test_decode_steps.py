"""Sampling in calls of several decode steps (``steps_per_call``): the tokens of one step per call and
of the recompute loop, compiled or not; one graph per shape; EOS and the early stop between calls."""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from craftfn.generation import generate_text_sampling, left_pad
from craftfn.models import GPT, GPTConfig

V = 23
IDS, MASK = left_pad([[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]])  # rows of 5, 2 and 3 tokens
P = IDS.shape[1]


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_gpt()


GREEDY = dict(temperature=0.0)
SAMPLING = dict(temperature=0.9, top_k=8, top_p=0.9, repetition_penalty=1.3, seed=2)


@pytest.mark.parametrize(
    "options, max_new_tokens, steps_per_call",
    [(GREEDY, 27, 4), (SAMPLING, 12, 3), (SAMPLING, 4, 8), (GREEDY, 1, 3)],
    ids=[
        "greedy, to the end of the context in calls of 4 (the last compiled call drops 2 steps)",
        "top-k, top-p, repetition penalty, 11 decodes in calls of 3 (the last compiled call drops one)",
        "top-k, top-p, repetition penalty, fewer tokens than steps_per_call",
        "greedy, one token: no decode",
    ],
)
def test_calls_of_several_steps_give_the_tokens_of_one_step_and_of_recomputation(model, options, max_new_tokens, steps_per_call):
    """Left-padded rows; the Gumbel keys are a function of (key, position), so the steps a call unrolls
    (and a compiled call's dropped steps) must not change a token, compiled or not. Steps dropped past
    the end of the model's context (32) must not index past the cache or the position table."""
    kwargs = dict(options, attention_mask=MASK, max_new_tokens=max_new_tokens)
    recomputed = generate_text_sampling(model, IDS, use_cache=False, **kwargs)
    assert torch.equal(generate_text_sampling(model, IDS, steps_per_call=1, **kwargs), recomputed)
    assert torch.equal(generate_text_sampling(model, IDS, steps_per_call=steps_per_call, **kwargs), recomputed)
    counter = CompileCounter()
    compiled = generate_text_sampling(model, IDS, compile={"backend": counter}, steps_per_call=steps_per_call, **kwargs)
    assert torch.equal(compiled, recomputed)
    assert counter.frame_count == (max_new_tokens > 1)  # one graph for all the calls (none without a decode)


def test_eos_inside_a_call_pads_the_row_from_the_next_step(model):
    """A row that emits EOS in the middle of a call emits pad at the call's later steps and after."""
    kwargs = dict(attention_mask=MASK, max_new_tokens=14, temperature=1.0, seed=11)
    free = generate_text_sampling(model, IDS, use_cache=False, **kwargs)[:, P:].tolist()
    # An EOS whose first occurrence in row 0 is the middle step of a call of 3 (token i comes from decode i - 1).
    first = {tok: free[0].index(tok) for tok in free[0]}
    eos = next(tok for tok, i in first.items() if i >= 1 and (i - 1) % 3 == 1)
    pad = next(t for t in range(V) if t != eos)
    kwargs.update(eos_token_id=eos, pad_token_id=pad, sync_every=2)
    expected = generate_text_sampling(model, IDS, use_cache=False, **kwargs)
    stop = first[eos]
    assert expected[0, P:].tolist() == free[0][: stop + 1] + [pad] * (13 - stop)
    assert torch.equal(generate_text_sampling(model, IDS, steps_per_call=1, **kwargs), expected)
    assert torch.equal(generate_text_sampling(model, IDS, steps_per_call=3, **kwargs), expected)
    assert torch.equal(generate_text_sampling(model, IDS, steps_per_call=3, compile={"backend": CompileCounter()}, **kwargs), expected)


@pytest.mark.parametrize("sync_every, decodes", [(4, 6), (3, 3), (100, 19)])
def test_the_early_stop_is_read_at_the_end_of_the_call_that_reaches_a_multiple_of_sync_every(model, sync_every, decodes):
    """The one row emits EOS as its first token. In calls of 3 decodes (tokens 1-3, 4-6, ...) the host
    reads ``done`` after the call that reaches a multiple of sync_every, and stops there."""
    prompt = IDS[:1]
    eos = int(generate_text_sampling(model, prompt, max_new_tokens=1, temperature=0.0)[0, -1])
    calls = []
    hook = model.register_forward_pre_hook(lambda module, args: calls.append(tuple(args[0].shape)))
    try:
        kwargs = dict(max_new_tokens=20, temperature=0.0, eos_token_id=eos, pad_token_id=0, sync_every=sync_every, steps_per_call=3)
        out = generate_text_sampling(model, prompt, **kwargs)
    finally:
        hook.remove()
    assert out[0, P:].tolist() == [eos] + [0] * 19
    assert calls == [(1, P)] + [(1, 1)] * decodes  # the prefill, then the decodes run


def test_one_graph_per_batch_and_length_across_calls_and_generations(model):
    """The attended prefix grows by steps_per_call slots per call (a dynamic size, its views never the
    whole cache): every call and every generation of one (batch, length) reuses the graph."""
    counter = CompileCounter()
    kwargs = dict(attention_mask=MASK, max_new_tokens=12, top_k=5, compile={"backend": counter}, steps_per_call=2)
    first = generate_text_sampling(model, IDS, seed=0, **kwargs)
    second = generate_text_sampling(model, IDS, seed=1, **kwargs)
    assert counter.frame_count == 1
    assert not torch.equal(first, second)  # the key is an input, not a constant of the graph
    generate_text_sampling(model, IDS[:2], seed=0, **{**kwargs, "attention_mask": MASK[:2]})
    assert counter.frame_count == 2  # another batch: one more graph


@pytest.mark.parametrize("value", [0, -2, 2.0, True, "8"])
def test_bad_steps_per_call_is_named(model, value):
    with pytest.raises(ValueError, match=f"steps_per_call must be a positive int, got {value!r}"):
        generate_text_sampling(model, IDS, max_new_tokens=3, steps_per_call=value)


@pytest.mark.compile
def test_aot_functionalized_calls_of_several_steps_write_the_cache_prefix_in_place():
    """Under AOT autograd (aot_eager: functionalization without inductor's compile time), the in-place
    cache writes through the prefix views of a multi-step call must land in the cache: a lost write
    changes the next call's tokens. The weights are scaled up 5x: at the default init (std 0.02) the
    attended values barely move the logits, and a cache that lost every write still gave these tokens."""
    model = tiny_gpt()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(5.0)
    kwargs = dict(SAMPLING, attention_mask=MASK, max_new_tokens=12, eos_token_id=4)
    recomputed = generate_text_sampling(model, IDS, use_cache=False, **kwargs)  # no cache to lose a write to
    compiled = generate_text_sampling(model, IDS, compile={"backend": "aot_eager", "fullgraph": True}, steps_per_call=3, **kwargs)
    assert torch.equal(compiled, recomputed)
