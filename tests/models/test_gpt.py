"""GPT: shapes, parameter count, tying, causality, KV cache, and training with craftfn steps."""

import math

import pytest
import torch

import craftfn
from craftfn import optim
from craftfn.models import GPT, GPTConfig, lm_eval_metrics, lm_loss

CFG = GPTConfig(vocab_size=13, block_size=16, n_layer=2, n_head=2, n_embd=16)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG.__dict__, **overrides})).eval()


def test_shapes_and_names():
    model = make()
    x = torch.randint(0, 13, (3, 7))
    assert model(x).shape == (3, 7, 13)
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "transformer.wte.weight"
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.h.1.mlp.c_proj.bias" in names
    assert "lm_head.weight" not in names  # tied: listed once
    assert list(model.named_buffers()) == []


def test_param_count_formula():
    model = make()
    V, T, C, L = 13, 16, 16, 2
    per_block = 2 * (2 * C) + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C) + (4 * C * C + C)
    total = V * C + T * C + L * per_block + 2 * C
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - T * C
    assert model.flops_per_token() == 6 * model.num_params() + 12 * L * 2 * (C // 2) * T
    no_bias = make(bias=False)
    assert no_bias.num_params(False) == total - L * (2 * C + 3 * C + C + 4 * C + C) - C


def test_tied_head_and_init():
    model = make(n_layer=4, n_embd=64, n_head=4, vocab_size=512, block_size=64)
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.002
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def test_causal_future_tokens_do_not_change_past_logits():
    model = make()
    x = torch.randint(0, 13, (2, 10))
    y = x.clone()
    y[:, 6:] = (y[:, 6:] + 1) % 13
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_kv_cache_prefill_and_decode_match_full_forward():
    model = make()
    x = torch.randint(0, 13, (2, 12))
    full = model(x)
    cache = model.init_kv_cache(2, 14)
    logits, cache = model(x[:, :5], kv_cache=cache, input_pos=torch.arange(5))
    outs = [logits]
    for t in range(5, 12):
        logits, cache = model(x[:, t : t + 1], kv_cache=cache, input_pos=torch.tensor([t]))
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_padding_mask_and_position_ids_match_unpadded():
    model = make()
    x = torch.randint(0, 13, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos)
    torch.testing.assert_close(out[:, 3:], model(x), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_bad_input():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=3, n_embd=8)
    with pytest.raises(ValueError, match="block_size"):
        GPTConfig(vocab_size=5, block_size=0, n_layer=1, n_head=1, n_embd=8)
    model = make()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        model.init_kv_cache(1, 17)
    with pytest.raises(ValueError, match="input_pos"):
        model(torch.zeros(1, 2, dtype=torch.long), kv_cache=model.init_kv_cache(1, 4))


def test_trains_with_make_train_step():
    model = make(dropout=0.1)
    state = craftfn.TrainState.create(model=model, tx=optim.adamw(1e-2), seed=0)
    assert state.buffers == {}
    step = craftfn.make_train_step(lm_loss)
    seq = torch.arange(17) % 5  # a periodic sequence is easy to learn
    batch = {"input_ids": seq[:-1].repeat(4, 1), "labels": seq[1:].repeat(4, 1)}
    eval_step = craftfn.make_eval_step(lm_eval_metrics)
    first = eval_step(state, batch)
    assert int(first["num_tokens"]) == 64
    for _ in range(15):
        state, metrics = step(state, batch)
    assert torch.isfinite(metrics["loss"])
    assert eval_step(state, batch)["loss"] < first["loss"] - 0.3
    # Same state and batch -> the same step, dropout included.
    a, _ = step(state, batch)
    b, _ = step(state, batch)
    assert craftfn.tree.equal(a.params, b.params)
