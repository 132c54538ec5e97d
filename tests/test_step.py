import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import craftfn
from craftfn import DonatedStateError, TrainState, make_eval_step, make_train_step, optim, random, tree, value_and_grad


def make_mlp(seed: int, d_in: int, width: int, depth: int, dropout: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers, d = [], d_in
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.GELU(), torch.nn.Dropout(dropout)]
        d = width
    layers.append(torch.nn.Linear(d, 1))
    return torch.nn.Sequential(*layers)


def mse_loss(state, params, batch, rng):
    pred = state.apply(params, batch["x"])
    loss = torch.mean((pred - batch["y"]) ** 2)
    return loss, {"mean_pred": pred.mean()}


def make_batch(seed: int, n: int, d_in: int) -> dict:
    k1, k2 = random.split(random.key(seed))
    return {"x": random.normal(k1, (n, d_in)), "y": random.normal(k2, (n, 1))}


mlp_cases = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "d_in": st.integers(1, 5),
        "width": st.integers(1, 8),
        "depth": st.integers(1, 3),
        "dropout": st.sampled_from([0.0, 0.3]),
        "n": st.integers(1, 6),
        "momentum": st.sampled_from([None, 0.9]),
        # sgd has no in-place path; clip + adamw takes the fused one (on copies, when not donated).
        "rule": st.sampled_from(["sgd", "clip+adamw"]),
    }
)


def make_tx(case):
    if case["rule"] == "sgd":
        return optim.sgd(0.05, momentum=case["momentum"])
    return optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))


@given(mlp_cases)
def test_step_is_pure_and_deterministic(case):
    model = make_mlp(case["seed"], case["d_in"], case["width"], case["depth"], case["dropout"])
    state = TrainState.create(model=model, tx=make_tx(case), seed=case["seed"])
    batch = make_batch(case["seed"], case["n"], case["d_in"])
    state_before, batch_before = tree.clone(state), tree.clone(batch)
    step = make_train_step(mse_loss)
    s1, m1 = step(state, batch)
    s2, m2 = step(state, batch)
    assert tree.equal(state, state_before), "the step mutated its input state"
    assert tree.equal(batch, batch_before), "the step mutated its input batch"
    assert tree.equal(s1, s2) and tree.equal(m1, m2), "same state and batch gave different results"
    assert int(s1.step) == 1 and sorted(m1) == ["grad_norm", "loss", "mean_pred"]
    assert all(v.dim() == 0 for v in m1.values())


def test_dropout_follows_the_state_key():
    model = make_mlp(0, 4, 16, 2, 0.5)
    batch = make_batch(0, 8, 4)
    step = make_train_step(mse_loss)
    a, _ = step(TrainState.create(model=model, tx=optim.sgd(0.1), seed=1), batch)
    b, _ = step(TrainState.create(model=model, tx=optim.sgd(0.1), seed=2), batch)
    c, _ = step(TrainState.create(model=model, tx=optim.sgd(0.1), seed=1), batch)
    assert tree.equal(a.params, c.params)
    assert not tree.allclose(a.params, b.params)
    # Consecutive steps use different masks: the key is folded with the step.
    s = TrainState.create(model=model, tx=optim.sgd(0.0), seed=1)
    _, m0 = step(s, batch)
    _, m1 = step(s.replace(step=s.step + 1), batch)
    assert m0["loss"] != m1["loss"]


def keyed_dropout_mse(p: float, keys: list):
    """An MSE loss with dropout drawn from the loss's ``rng`` (explicit randomness); records each key."""

    def loss_fn(state, params, batch, rng):
        keys.append(rng.clone())
        pred = state.apply(params, batch["x"])
        if p > 0:
            pred = pred * random.bernoulli(rng, 1.0 - p, pred.shape) / (1.0 - p)
        return torch.mean((pred - batch["y"]) ** 2), {"mean_pred": pred.mean()}

    return loss_fn


@given(
    st.integers(1, 4),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(0, 1000),
    st.sampled_from([None, 0.9]),
    st.sampled_from([0.0, 0.5]),
)
@example(k=3, b=2, d_in=2, seed=0, momentum=None, dropout=0.5)  # always: several microbatches with dropout
def test_accumulation_equals_one_large_batch_step(k, b, d_in, seed, momentum, dropout):
    model = make_mlp(seed, d_in, 6, 2, 0.0)
    state = TrainState.create(model=model, tx=optim.sgd(0.1, momentum=momentum), seed=seed)
    batch = make_batch(seed, k * b, d_in)
    keys = []
    acc, m_acc = make_train_step(keyed_dropout_mse(dropout, keys), accum_steps=k)(state, batch)
    assert len(keys) == k
    if dropout == 0:
        big, m_big = make_train_step(mse_loss)(state, batch)
    else:
        # The large batch with the same dropout: each microbatch's rows under that microbatch's
        # key, one loss (the mean over microbatches), one gradient, one update.
        assert len({tuple(random.key_data(key)) for key in keys}) == k, "microbatches share a key"

        def big_loss(state, params, batch, rng):
            losses = [keyed_dropout_mse(dropout, [])(state, params, {n: v[i * b : (i + 1) * b] for n, v in batch.items()}, key)
                      for i, key in enumerate(keys)]
            return sum(loss for loss, _ in losses) / k, {"mean_pred": sum(aux["mean_pred"] for _, aux in losses) / k}

        big, m_big = make_train_step(big_loss)(state, batch)
    assert tree.allclose(big.params, acc.params, rtol=1e-5, atol=1e-6)
    assert tree.allclose(big.opt_state, acc.opt_state, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m_big["loss"], m_acc["loss"], rtol=1e-5, atol=1e-6)
    assert torch.allclose(m_big["grad_norm"], m_acc["grad_norm"], rtol=1e-5, atol=1e-6)


def test_donated_step_matches_pure_and_reuse_raises():
    model = make_mlp(1, 3, 8, 2, 0.2)
    batch = make_batch(1, 6, 3)
    tx = optim.sgd(0.1, momentum=0.9)
    pure_state = TrainState.create(model=model, tx=tx)
    donated_state = tree.clone(pure_state)
    pure, donated = make_train_step(mse_loss), make_train_step(mse_loss, donate=True)
    for _ in range(3):
        pure_state, mp = pure(pure_state, batch)
        new_donated, md = donated(donated_state, batch)
        assert tree.allclose(pure_state.params, new_donated.params, rtol=1e-6, atol=1e-7)
        assert torch.allclose(mp["loss"], md["loss"])
        old, donated_state = donated_state, new_donated
    with pytest.raises(DonatedStateError, match="donated"):
        donated(old, batch)
    with pytest.raises(DonatedStateError, match="donated"):
        pure(old, batch)


def test_batchnorm_statistics_move_to_the_new_state_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    state = TrainState.create(model=model, tx=optim.sgd(0.1))
    before = tree.clone(state.buffers)
    batch = make_batch(0, 8, 3)
    new_state, _ = make_train_step(mse_loss)(state, batch)
    assert tree.equal(state.buffers, before)
    assert int(new_state.buffers["1.num_batches_tracked"]) == 1
    assert not torch.equal(new_state.buffers["1.running_mean"], before["1.running_mean"])
    # With accumulation the statistics see every microbatch.
    acc_state, _ = make_train_step(mse_loss, accum_steps=2)(state, batch)
    assert int(acc_state.buffers["1.num_batches_tracked"]) == 2
    # Eval runs the module in eval mode (running statistics used, none updated).
    eval_step = make_eval_step(lambda s, p, b, rng: torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2))
    m = eval_step(new_state, batch)
    model.eval()
    with torch.no_grad():
        direct = torch.func.functional_call(model, {**new_state.params, **new_state.buffers}, (batch["x"],))
    assert torch.allclose(m["loss"], torch.mean((direct - batch["y"]) ** 2))
    assert int(new_state.buffers["1.num_batches_tracked"]) == 1


def test_value_and_grad_matches_autograd_and_handles_unused_params():
    params = {"w": torch.tensor([1.0, 2.0]), "unused": torch.ones(3)}
    f = value_and_grad(lambda p, x: (p["w"] ** 2 * x).sum(), has_aux=False)
    value, grads = f(params, torch.tensor([3.0, 4.0]))
    assert value.item() == 3.0 + 16.0
    assert torch.equal(grads["w"], torch.tensor([6.0, 16.0]))
    assert torch.equal(grads["unused"], torch.zeros(3))
    (v, aux), g = value_and_grad(lambda p: (p["w"].sum(), {"n": p["w"].norm()}), has_aux=True)(params)
    assert not v.requires_grad and not aux["n"].requires_grad


def test_bad_input_gets_clear_errors():
    model = make_mlp(0, 2, 4, 1, 0.0)
    state = TrainState.create(model=model, tx=optim.sgd(0.1))
    step = make_train_step(mse_loss)
    with pytest.raises(ValueError, match=r"disagree in leading \(batch\) size: \{'x': 4, 'y': 3\}"):
        step(state, {"x": torch.ones(4, 2), "y": torch.ones(3, 1)})
    with pytest.raises(ValueError, match="accum_steps=3 does not divide the batch size 4"):
        make_train_step(mse_loss, accum_steps=3)(state, make_batch(0, 4, 2))
    with pytest.raises(ValueError, match="accum_steps must be a positive int"):
        make_train_step(mse_loss, accum_steps=0)
    with pytest.raises(ValueError, match="no tx"):
        step(TrainState.create(model=model, tx=None), make_batch(0, 4, 2))
    with pytest.raises(ValueError, match=r"the loss must be a scalar \(0-d tensor\), got shape \(4, 1\)"):
        make_train_step(lambda s, p, b, r: s.apply(p, b["x"]) - b["y"])(state, make_batch(0, 4, 2))
    with pytest.raises(TypeError, match="must be a craftfn.TrainState"):
        step({"params": {}}, make_batch(0, 4, 2))


def _compile_case():
    model = make_mlp(0, 4, 8, 2, 0.0)
    state = TrainState.create(model=model, tx=optim.sgd(0.1, momentum=0.9))
    return state, make_batch(0, 8, 4)


def test_step_core_traces_with_zero_graph_breaks():
    from craftfn import _context

    state, batch = _compile_case()
    for accum in (1, 2):
        step = make_train_step(mse_loss, accum_steps=accum)
        with _context.step_context(training=True):
            explanation = craftfn.jit(step.core).explain(state, batch, random.key(0))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
    # fullgraph=True would raise on any break; aot_eager also runs the AOT autograd pipeline.
    compiled = make_train_step(mse_loss, accum_steps=2, compile={"backend": "aot_eager", "fullgraph": True})
    eager = make_train_step(mse_loss, accum_steps=2)
    s_c, s_e = state, state
    for _ in range(3):
        (s_c, m_c), (s_e, m_e) = compiled(s_c, batch), eager(s_e, batch)
    assert tree.allclose(s_c, s_e, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m_c["loss"], m_e["loss"], rtol=1e-5)


def test_pure_step_with_an_in_place_rule_equals_the_update_path():
    # Without donation the step updates copies in place (fused kernel); the values are those of
    # tx.update + apply_updates, and the input state is untouched.
    model = make_mlp(3, 4, 8, 2, 0.0)
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
    state = TrainState.create(model=model, tx=tx)
    before = tree.clone(state)
    batch = make_batch(3, 8, 4)
    new_state, _ = make_train_step(mse_loss)(state, batch)
    assert tree.equal(state, before)
    grads = value_and_grad(lambda p: mse_loss(state, p, batch, random.key(0))[0])(state.params)[1]
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    assert tree.allclose(new_state.params, optim.apply_updates(state.params, updates), rtol=1e-6, atol=1e-7)
    assert tree.allclose(new_state.opt_state, opt_state, rtol=1e-6, atol=1e-7)


def test_value_and_grad_names_a_non_floating_parameter():
    # The names are computed only when a leaf is bad (they cost tracing time under compile).
    params = {"w": torch.ones(2), "blocks": {"count": torch.ones(2, dtype=torch.int64)}}
    with pytest.raises(TypeError, match=r"parameter 'blocks\.count' must be a floating-point tensor"):
        value_and_grad(lambda p: p["w"].sum())(params)
