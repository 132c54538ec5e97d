"""craftfn.remat: activation checkpointing of chosen submodules, without touching the model."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from craftfn import TrainState, make_eval_step, make_train_step, optim, remat, tree
from craftfn.models.gpt import GPT, GPTConfig, lm_loss
from craftfn.models.gpt import Block as GPTBlock

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def gpt(cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return GPT(cfg)


def lm_batch(seed=1, b=4, t=16, v=64):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, v, (b, t), generator=g), "labels": torch.randint(0, v, (b, t), generator=g)}


def test_selection_by_pattern_class_predicate_and_list():
    model = gpt()
    blocks = ["transformer.h.0", "transformer.h.1"]
    assert remat.select(model, "transformer.h.*") == blocks  # outermost match wins, no nesting
    assert remat.select(model, GPTBlock) == blocks
    assert remat.select(model, lambda name, m: name.endswith(".mlp")) == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert remat.select(model, ["*.attn", torch.nn.LayerNorm]) == [
        "transformer.h.0.ln_1", "transformer.h.0.attn", "transformer.h.0.ln_2",
        "transformer.h.1.ln_1", "transformer.h.1.attn", "transformer.h.1.ln_2", "transformer.ln_f",
    ]


def test_checkpointed_copy_shares_tensors_and_leaves_the_model_alone():
    model = gpt()
    before = [(n, type(m)) for n, m in model.named_modules()]
    ckpt = remat.checkpoint_modules(model, "transformer.h.*")
    assert [(n, type(m)) for n, m in model.named_modules()] == before  # original untouched
    assert remat.checkpointed_names(model) == []
    assert remat.checkpointed_names(ckpt) == ["transformer.h.0", "transformer.h.1"]
    assert isinstance(ckpt.transformer.h[0], GPTBlock)  # a subclass: isinstance still holds
    named = dict(model.named_parameters())
    assert [n for n, _ in ckpt.named_parameters()] == list(named)
    assert all(p is named[n] for n, p in ckpt.named_parameters())  # shared, not copied
    # Modules off the path to a checkpointed one are shared as they are.
    assert ckpt.transformer.wte is model.transformer.wte and ckpt.lm_head is model.lm_head
    idx = lm_batch()["input_ids"]
    assert torch.equal(ckpt(idx), model(idx))


def _grads(model, params, batch):
    traced = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    logits = functional_call(model, traced, (batch["input_ids"],), tie_weights=True)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
    return dict(zip(traced, torch.autograd.grad(loss, list(traced.values()))))


def test_remat_gradients_equal_plain_gradients_on_gpt():
    model = gpt()
    # Parameters that differ from the module's own: the recompute (during backward, after
    # functional_call has restored the module) must still use these.
    params = {k: v.detach() * 1.5 + 0.01 for k, v in model.named_parameters()}
    batch = lm_batch()
    plain = _grads(model, params, batch)
    for targets in ("transformer.h.*", GPTBlock, ["*.attn", "*.mlp"]):
        ckpt = _grads(remat.checkpoint_modules(model, targets), params, batch)
        assert tree.allclose(ckpt, plain, rtol=1e-5, atol=1e-7), targets


def test_remat_train_step_equals_plain_step_with_dropout():
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.2)
    model = gpt(cfg)
    state = TrainState.create(model=model, tx=optim.adamw(1e-2))
    plain, ckpt = make_train_step(lm_loss), make_train_step(lm_loss, remat="transformer.h.*")
    a, b = state, state
    for i in range(2):
        (a, ma), (b, mb) = plain(a, lm_batch(i)), ckpt(b, lm_batch(i))
        # Dropout masks are replayed exactly in the recompute.
        assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-6)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-7)
    assert b.apply_fn is model  # the returned state holds the user's model, not the copy
    # Donated steps and eval steps work on the same state.
    d, _ = make_train_step(lm_loss, remat=GPTBlock, donate=True)(tree.clone(state), lm_batch(0))
    assert d.apply_fn is model
    assert "loss" in make_eval_step(lm_loss)(b, lm_batch(0))


def _saved_bytes(fn):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def test_remat_saves_fewer_activations():
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=64)
    model = gpt(cfg)
    params = dict(model.named_parameters())
    idx = torch.randint(0, 64, (8, 32))

    def forward(m):
        return lambda: functional_call(m, {k: v.detach().requires_grad_(True) for k, v in params.items()}, (idx,))

    plain = _saved_bytes(forward(model))
    ckpt = _saved_bytes(forward(remat.checkpoint_modules(model, "transformer.h.*")))
    # Each block keeps its input (plus its SDPA output, saved rather than recomputed) instead of
    # every intermediate.
    assert ckpt < 0.5 * plain, (ckpt, plain)


def test_remat_errors():
    model = gpt()
    with pytest.raises(ValueError, match=r"remat targets 'decoder.\*' match no submodule of GPT; some names: \['transformer'"):
        remat.checkpoint_modules(model, "decoder.*")
    with pytest.raises(TypeError, match="must be a name pattern"):
        remat.select(model, 3)
    with pytest.raises(ValueError, match="must not be empty"):
        make_train_step(lm_loss, remat=[])
    fn_state = TrainState.create(apply_fn=lambda p, x: x, params={"w": torch.ones(1)}, tx=optim.sgd(0.1))
    with pytest.raises(TypeError, match="remat= needs a state created from an nn.Module"):
        make_train_step(lambda s, p, b, r: (p["w"] * b["x"]).sum(), remat="*")(fn_state, {"x": torch.ones(2)})
