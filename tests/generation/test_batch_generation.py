"""Batched generation: each row of a left-padded batch equals generating its prompt alone."""

import pytest
import torch

import craftfn
from craftfn.generation import (
    batch_generate,
    beam_search_generate,
    generate_text_sampling,
    left_pad,
    positions_from_mask,
)
from craftfn.models import GPT, GPTConfig

PROMPTS = [[1, 2, 3, 4, 5, 6], [7], [8, 9, 10], [11, 12]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=29, block_size=32, n_layer=2, n_head=2, n_embd=16)).eval()


def alone(model, prompt, **kwargs):
    return generate_text_sampling(model, torch.tensor([prompt]), **kwargs)[0]


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        left_pad([[1], []])


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_rows_equal_each_prompt_alone(model, use_cache):
    outs = batch_generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, use_cache=use_cache)
    for prompt, out in zip(PROMPTS, outs):
        assert out[: len(prompt)].tolist() == prompt
        assert torch.equal(out, alone(model, prompt, max_new_tokens=10, temperature=0.0))


def test_batched_rows_with_eos_equal_alone(model):
    free = alone(model, PROMPTS[2], max_new_tokens=10, temperature=0.0)
    eos = int(free[5])
    kwargs = dict(max_new_tokens=10, temperature=0.0, eos_token_id=eos, pad_token_id=0)
    outs = batch_generate(model, PROMPTS, **kwargs)
    for prompt, out in zip(PROMPTS, outs):
        assert torch.equal(out, alone(model, prompt, **kwargs))


def test_batch_from_trainstate_and_tensors(model):
    state = craftfn.TrainState.create(model=model, tx=None)
    outs = batch_generate(state, [torch.tensor(p) for p in PROMPTS], max_new_tokens=4, temperature=0.0)
    assert [o.tolist() for o in outs] == [o.tolist() for o in batch_generate(model, PROMPTS, max_new_tokens=4, temperature=0.0)]


def test_batched_beam_search_rows_equal_alone(model):
    outs = batch_generate(model, PROMPTS, max_new_tokens=5, num_beams=3, num_return_sequences=2)
    assert len(outs) == 8
    for i, prompt in enumerate(PROMPTS):
        single = beam_search_generate(model, torch.tensor([prompt]), num_beams=3, max_new_tokens=5, num_return_sequences=2)
        assert [o.tolist() for o in outs[2 * i : 2 * i + 2]] == single.sequences.tolist()


def test_bad_input(model):
    with pytest.raises(ValueError, match="at least one prompt"):
        batch_generate(model, [], max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        batch_generate(model, [[1], []], max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        batch_generate(model, [[1]], max_new_tokens=-3)
    with pytest.raises(ValueError, match="num_return_sequences=4 must be <= num_beams=2"):
        batch_generate(model, [[1]], max_new_tokens=3, num_beams=2, num_return_sequences=4)
