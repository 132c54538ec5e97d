"""craftfn.precision: policies, bf16 steps on the reference GPT, dynamic loss scaling as pure state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import TrainState, make_train_step, optim, precision, tree
from craftfn.models.gpt import GPT, GPTConfig, lm_loss
from craftfn.precision import DynamicLossScale, Policy, get_policy

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


def gpt_state(tx=None, seed=0, cfg=CFG):
    torch.manual_seed(seed)
    return TrainState.create(model=GPT(cfg), tx=tx if tx is not None else optim.adamw(1e-2, weight_decay=0.1))


def lm_batch(seed=1, b=4, t=16, v=64):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, v, (b, t), generator=g), "labels": torch.randint(0, v, (b, t), generator=g)}


# ---------------------------------------------------------------------------------------- policies


def test_policy_names_and_parsing():
    assert get_policy("bf16") == Policy(torch.float32, torch.bfloat16, torch.float32)
    assert get_policy("bf16_pure") == Policy(torch.bfloat16, torch.bfloat16, torch.float32)
    assert get_policy("fp16").needs_loss_scale and get_policy("fp16").is_mixed
    assert not get_policy("fp32").is_mixed
    assert get_policy("params=float32,compute=bfloat16,output=float32") == get_policy("bf16")
    assert get_policy("Mixed_BF16") == get_policy("bf16")
    p = Policy("fp32", "bf16", "fp32")
    assert get_policy(p) is p
    assert "bfloat16" in repr(p)
    cast = p.cast_to_compute({"x": torch.ones(2), "ids": torch.arange(2)})
    assert cast["x"].dtype == torch.bfloat16 and cast["ids"].dtype == torch.int64


def test_policy_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"unknown precision policy 'bf17'.*known: \['bf16', 'bf16_pure', 'fp16', 'fp32'\]"):
        get_policy("bf17")
    with pytest.raises(ValueError, match="compute_dtype must be a torch floating dtype"):
        Policy(torch.float32, "int8", torch.float32)
    with pytest.raises(ValueError, match="param_dtype must be a floating dtype"):
        Policy(torch.int32)
    with pytest.raises(ValueError, match="unknown key 'weights'"):
        get_policy("weights=bf16")
    with pytest.raises(TypeError, match="policy must be a precision.Policy or a name"):
        get_policy(3)


def test_autocast_context_only_when_mixed():
    w, x = torch.ones(3, 2), torch.ones(1, 2)
    with get_policy("bf16").autocast("cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    with get_policy("fp32").autocast("cpu"):
        assert torch.nn.functional.linear(x, w).dtype == torch.float32


# ---------------------------------------------------------------------------------------- bf16 steps


def _update_cosine(p0, pa, pb):
    """Cosine between two parameter updates (pa - p0, pb - p0), flattened over all leaves."""
    da = torch.cat([(a.float() - z).flatten() for a, z in zip(tree.leaves(pa), tree.leaves(p0))])
    db = torch.cat([(b.float() - z).flatten() for b, z in zip(tree.leaves(pb), tree.leaves(p0))])
    return float(torch.dot(da, db) / (da.norm() * db.norm()))


def test_bf16_mixed_step_close_to_fp32_on_gpt():
    state, batch = gpt_state(optim.sgd(0.5)), lm_batch()
    s32, m32 = make_train_step(lm_loss)(state, batch)
    s16, m16 = make_train_step(lm_loss, policy="bf16")(state, batch)
    # fp32 master weights: the state stays fp32, the loss is reported in fp32.
    assert all(p.dtype == torch.float32 for p in tree.leaves(s16.params))
    assert m16["loss"].dtype == torch.float32 and m16["grad_norm"].dtype == torch.float32
    assert torch.allclose(m16["loss"], m32["loss"], rtol=1e-2)
    assert torch.allclose(m16["grad_norm"], m32["grad_norm"], rtol=5e-2)
    assert _update_cosine(state.params, s16.params, s32.params) > 0.99
    # bf16 really ran: the result is not bit-identical to fp32.
    assert not torch.equal(m16["loss"], m32["loss"])
    # A few more AdamW steps stay close too.
    step32, step16 = make_train_step(lm_loss), make_train_step(lm_loss, policy="bf16")
    a, b = gpt_state(), gpt_state()
    for i in range(2):
        (a, ma), (b, mb) = step32(a, lm_batch(i)), step16(b, lm_batch(i))
    assert torch.allclose(ma["loss"], mb["loss"], rtol=2e-2)


def test_bf16_pure_step_on_gpt():
    state, batch = gpt_state(optim.sgd(0.5)), lm_batch()
    pure = precision.cast_state(state, "bf16_pure")
    assert all(p.dtype == torch.bfloat16 for p in tree.leaves(pure.params))
    new, m = make_train_step(lm_loss, policy="bf16_pure")(pure, batch)
    assert all(p.dtype == torch.bfloat16 for p in tree.leaves(new.params))
    assert m["loss"].dtype == torch.float32
    _, m32 = make_train_step(lm_loss)(state, batch)
    assert torch.allclose(m["loss"], m32["loss"], rtol=2e-2)
    assert _update_cosine(pure.params, new.params, make_train_step(lm_loss)(state, batch)[0].params) > 0.95


def test_pure_policy_casts_float_batch_leaves():
    model = torch.nn.Linear(3, 1)
    state = precision.cast_state(TrainState.create(model=model, tx=optim.sgd(0.1)), "bf16_pure")

    def mse(s, p, b, rng):
        return torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2)

    _, m = make_train_step(mse, policy="bf16_pure")(state, {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)})
    assert m["loss"].dtype == torch.float32 and torch.isfinite(m["loss"])


def test_policy_param_dtype_mismatch_is_a_clear_error():
    state = gpt_state()
    with pytest.raises(ValueError, match=r"stores parameters in torch.bfloat16, but parameter '.*' is torch.float32.*cast_state"):
        make_train_step(lm_loss, policy="bf16_pure")(state, lm_batch())


# ---------------------------------------------------------------------------------------- loss scale: the rule


def reference_loss_scale(scale, counter, finite_seq, interval, growth, backoff, min_scale):
    """The rule in plain Python, step by step."""
    out = []
    for finite in finite_seq:
        if finite:
            counter += 1
            if counter >= interval:
                if scale * growth < 3.4e38:
                    scale *= growth
                counter = 0
        else:
            scale, counter = max(scale * backoff, min_scale), 0
        out.append((scale, counter))
    return out


@settings(max_examples=25, deadline=None)
@given(
    finite_seq=st.lists(st.booleans(), min_size=1, max_size=30),
    interval=st.integers(1, 5),
    log2_scale=st.integers(0, 20),
)
def test_loss_scale_grows_after_interval_and_halves_on_overflow(finite_seq, interval, log2_scale):
    ls = DynamicLossScale(scale=2.0**log2_scale, growth_interval=interval)
    expected = reference_loss_scale(2.0**log2_scale, 0, finite_seq, interval, 2.0, 0.5, 1.0)
    run = 0
    for finite, (scale, counter) in zip(finite_seq, expected):
        prev = float(ls.scale)
        ls = ls.adjust(torch.tensor(finite))
        assert float(ls.scale) == scale and int(ls.counter) == counter
        run = run + 1 if finite else 0
        if not finite:  # halves (down to min_scale)
            assert float(ls.scale) == max(prev / 2, 1.0)
        elif run % interval == 0:  # grows exactly after growth_interval finite steps in a row
            assert float(ls.scale) == 2 * prev
        else:
            assert float(ls.scale) == prev
    assert ls.scale.dtype == torch.float32 and ls.counter.dtype == torch.int32


def test_loss_scale_caps_at_finite_and_validates():
    ls = DynamicLossScale(scale=2.0**127, growth_interval=1).adjust(torch.tensor(True))
    assert float(ls.scale) == 2.0**127  # growing would overflow fp32: stays
    ls = DynamicLossScale(scale=1.0).adjust(torch.tensor(False))
    assert float(ls.scale) == 1.0  # never below min_scale
    assert tree.leaves(ls) == [ls.scale, ls.counter]  # hyperparameters are static
    with pytest.raises(ValueError, match="growth_interval must be a positive int, got 0"):
        DynamicLossScale(growth_interval=0)
    with pytest.raises(ValueError, match=r"backoff_factor must be in \(0.0, 1.0\), got 1.5"):
        DynamicLossScale(backoff_factor=1.5)
    with pytest.raises(ValueError, match="growth_factor must be > 1.0"):
        DynamicLossScale(growth_factor=1.0)
    with pytest.raises(ValueError, match="loss_scale must be None, True, 'dynamic' or a precision.DynamicLossScale"):
        make_train_step(lm_loss, loss_scale="static")


# ---------------------------------------------------------------------------------------- loss scale in the step


def poisoned_mse(state, params, batch, rng):
    # batch["poison"] is 1.0 or inf per row: a whole non-finite step, decided by data, no sync.
    pred = state.apply(params, batch["x"])
    return torch.mean((pred - batch["y"]) ** 2) * batch["poison"].max()


def mlp_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return TrainState.create(model=model, tx=optim.sgd(0.1, momentum=0.9))


def mlp_batch(i, poison=False):
    g = torch.Generator().manual_seed(100 + i)
    return {
        "x": torch.randn(4, 3, generator=g),
        "y": torch.randn(4, 1, generator=g),
        "poison": torch.full((4,), float("inf") if poison else 1.0),
    }


@settings(max_examples=20, deadline=None)
@given(finite_seq=st.lists(st.booleans(), min_size=1, max_size=8), interval=st.integers(1, 3))
def test_loss_scaled_step_skips_nonfinite_updates_and_matches_plain_otherwise(finite_seq, interval):
    scaled = make_train_step(poisoned_mse, loss_scale=DynamicLossScale(scale=2.0**10, growth_interval=interval))
    plain = make_train_step(poisoned_mse)
    state = mlp_state()
    ref = state  # what a plain loop that drops the bad batches would have
    expected = reference_loss_scale(2.0**10, 0, finite_seq, interval, 2.0, 0.5, 1.0)
    for i, (finite, (scale, _)) in enumerate(zip(finite_seq, expected)):
        before = state
        state, m = scaled(state, mlp_batch(i, poison=not finite))
        assert isinstance(state, precision.LossScaledTrainState)
        assert int(state.step) == i + 1  # the step (data order, keys) always advances
        assert float(state.loss_scale.scale) == scale
        assert float(m["grads_finite"]) == float(finite)
        if finite:
            ref, m_ref = plain(ref, mlp_batch(i))
            # Power-of-two scaling is exact: same as the unscaled step.
            assert tree.allclose(state.params, ref.params, rtol=1e-6, atol=1e-7)
            assert torch.allclose(m["loss"], m_ref["loss"]) and torch.allclose(m["grad_norm"], m_ref["grad_norm"], rtol=1e-6)
        else:
            # Skipped: parameters and momentum unchanged.
            assert tree.equal(state.params, before.params) and tree.equal(state.opt_state, before.opt_state)
        # Keep the reference's step count aligned with the scaled run (keys depend on it).
        ref = ref.replace(step=state.step.clone())


def test_natural_fp16_overflow_backs_off_until_finite_then_trains():
    # Scale 2**24 overflows fp16's range (65504) in the backward of the fp16 matmuls: the
    # step skips and halves until the scaled gradients fit, then trains.
    step = make_train_step(poisoned_mse, policy="fp16", loss_scale=DynamicLossScale(scale=2.0**24, growth_interval=100))
    state = mlp_state()
    p0 = tree.clone(state.params)
    scales, finite = [], []
    for i in range(14):
        state, m = step(state, mlp_batch(i))
        scales.append(float(m["loss_scale"]))
        finite.append(bool(m["grads_finite"]))
    assert finite[0] is False and finite[-1] is True
    first_ok = finite.index(True)
    assert all(finite[first_ok:])
    assert scales[: first_ok + 1] == [2.0 ** (24 - k) for k in range(first_ok + 1)]
    assert not tree.equal(state.params, p0)


def test_loss_scale_state_carried_and_donation():
    state = mlp_state()
    step = make_train_step(poisoned_mse, loss_scale=True, donate=True)
    s1, _ = step(tree.clone(state), mlp_batch(0))
    assert float(s1.loss_scale.scale) == 2.0**15  # the default initial value
    s2, _ = step(s1, mlp_batch(1, poison=True))
    assert float(s2.loss_scale.scale) == 2.0**14
    # A state that already carries a scale keeps it (the step's value is only the initial one).
    own = precision.with_loss_scale(mlp_state(), DynamicLossScale(scale=4.0))
    s3, m3 = make_train_step(poisoned_mse, loss_scale=True)(own, mlp_batch(0))
    assert float(m3["loss_scale"]) == 4.0
    # The optimizer's own skip (apply_if_finite) composes: both keep the params on a bad step.
    guarded = mlp_state().replace(tx=optim.apply_if_finite(optim.sgd(0.1), 3))
    guarded = guarded.replace(opt_state=guarded.tx.init(guarded.params))
    g1, _ = make_train_step(poisoned_mse, loss_scale=True)(guarded, mlp_batch(0, poison=True))
    assert tree.equal(g1.params, guarded.params)


def test_loss_scale_needs_a_field_on_custom_states():
    class MyState(TrainState):
        note: int = 0

    model = torch.nn.Linear(3, 1)
    state = MyState.create(model=model, tx=optim.sgd(0.1))
    with pytest.raises(TypeError, match="MyState has none"):
        make_train_step(poisoned_mse, loss_scale=True)(state, mlp_batch(0))


def test_fp16_autocast_with_loss_scale_on_gpt():
    # fp16 is meant for CUDA; CPU autocast supports it too, which lets the whole path run here.
    state, batch = gpt_state(optim.sgd(0.5)), lm_batch()
    s16, m16 = make_train_step(lm_loss, policy="fp16", loss_scale=True)(state, batch)
    s32, m32 = make_train_step(lm_loss)(state, batch)
    assert bool(m16["grads_finite"])
    assert torch.allclose(m16["loss"], m32["loss"], rtol=1e-2)
    assert _update_cosine(state.params, s16.params, s32.params) > 0.99


def test_eval_step_with_policy():
    from craftfn import make_eval_step

    state, batch = gpt_state(), lm_batch()
    m16 = make_eval_step(lm_loss, policy="bf16")(state, batch)
    m32 = make_eval_step(lm_loss)(state, batch)
    assert m16["loss"].dtype == torch.float32
    assert torch.allclose(m16["loss"], m32["loss"], rtol=1e-2) and not torch.equal(m16["loss"], m32["loss"])
