"""Wrappers: MultiSteps, apply_if_finite, inject_hyperparams, lookahead, tree_get/tree_set."""

import pytest
import torch
from compile_backends import CountingBackend
from hypothesis import given, settings
from hypothesis import strategies as st

import craftfn
from craftfn import TrainState, optim, testing, tree


def _params(dtype=torch.float32, seed=0):
    return testing.default_params(seed=seed, dtype=dtype)


# --------------------------------------------------------------------------- inject_hyperparams


def test_injected_adamw_equals_plain_adamw_pure_and_donated():
    adamw = optim.adamw
    testing.check_injected_equivalent(adamw, learning_rate=1e-2, weight_decay=0.1, steps=5)
    testing.check_injected_equivalent(adamw, learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0, steps=5,
                                      static_args=("b1", "b2", "eps"))


def test_injected_adamw_with_tensor_betas_equals_plain_adamw():
    testing.check_injected_equivalent(optim.adamw, learning_rate=3e-3, b1=0.8, b2=0.99, eps=1e-6, weight_decay=0.0, steps=5)


def test_injected_adamw_donated_reaches_torch_fused_kernel(monkeypatch):
    adamw = optim.adamw
    calls = []
    real = torch._fused_adamw_

    def counting(*args, **kwargs):
        calls.append(kwargs.get("lr"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adamw_", counting)
    # The kernel takes only the learning rate as a tensor; the other hyperparameters stay Python numbers.
    factory = optim.inject_hyperparams(adamw, static_args=("b1", "b2", "eps", "weight_decay"))
    tx = factory(learning_rate=lambda n: 1e-2 / (1.0 + n), weight_decay=0.1)
    plain = adamw(lambda n: 1e-2 / (1.0 + n), weight_decay=0.1)
    params = _params()
    injected = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    reference = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=plain)
    for i in range(3):
        g = testing.random_grads(params, seed=i)
        injected = injected.apply_gradients(g, donate=True)
        reference = reference.apply_gradients(g)
    assert len(calls) >= 3 and all(isinstance(lr, torch.Tensor) for lr in calls[-3:])
    assert tree.allclose(injected.params, reference.params, rtol=1e-6, atol=1e-7)
    assert float(optim.tree_get(injected.opt_state, "learning_rate")) == pytest.approx(1e-2 / 3)


def test_injected_sgd_equals_plain_sgd():
    testing.check_injected_equivalent(optim.sgd, learning_rate=0.1, momentum=0.9, steps=5)
    testing.check_injected_equivalent(optim.sgd, learning_rate=0.05, momentum=0.5, nesterov=True, steps=5)


def test_injected_hyperparams_are_readable_settable_and_scheduled():
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=lambda n: 0.1 * (n + 1), momentum=0.9)
    params = {"w": torch.zeros(2)}
    state = tx.init(params)
    assert torch.equal(optim.tree_get(state, "learning_rate"), torch.tensor(0.1))
    assert optim.tree_get(state, "momentum").dtype == torch.float32
    lrs = []
    for _ in range(3):
        updates, state = tx.update({"w": torch.ones(2)}, state, params)
        lrs.append(float(optim.tree_get(state, "learning_rate")))
    assert lrs == pytest.approx([0.1, 0.2, 0.3])
    # A constant hyperparameter changed in the state takes effect at the next update.
    tx2 = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    s2 = optim.tree_set(tx2.init(params), learning_rate=torch.tensor(0.5))
    u2, s2 = tx2.update({"w": torch.ones(2)}, s2, params)
    assert torch.allclose(u2["w"], torch.full((2,), -0.5))
    assert float(s2.hyperparams["learning_rate"]) == 0.5


def test_injected_schedule_matches_plain_schedule():
    sched = lambda n: 0.1 / (1.0 + n)  # noqa: E731
    testing.check_injected_equivalent(optim.sgd, learning_rate=sched, momentum=0.9, steps=4)


@pytest.mark.slow
def test_changing_injected_hyperparams_never_recompiles():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    tx = optim.inject_hyperparams(optim.adamw)(learning_rate=0.1)
    state = TrainState.create(model=model, tx=tx)

    def loss_fn(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    backend = CountingBackend("eager")
    step = craftfn.make_train_step(loss_fn, compile={"backend": backend, "fullgraph": True})
    eager = craftfn.make_train_step(loss_fn)
    batch = {"x": torch.randn(8, 3), "y": torch.randn(8, 1)}
    eager_state = state
    for lr in (0.1, 0.01, 0.3, 0.05):
        state = state.replace(opt_state=optim.tree_set(state.opt_state, learning_rate=torch.tensor(lr)))
        eager_state = eager_state.replace(opt_state=optim.tree_set(eager_state.opt_state, learning_rate=torch.tensor(lr)))
        state, _ = step(state, batch)
        eager_state, _ = eager(eager_state, batch)
    assert backend.graphs == 1, f"changing the learning rate recompiled: {backend.graphs} graphs"
    assert tree.allclose(state.params, eager_state.params, rtol=1e-5, atol=1e-6)
    assert float(optim.tree_get(state.opt_state, "learning_rate")) == pytest.approx(0.05)


def test_inject_hyperparams_bad_input():
    with pytest.raises(ValueError, match="learning_rate"):
        optim.inject_hyperparams(optim.sgd)(learning_rate=-1.0)
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    with pytest.raises(ValueError, match="init"):
        tx.update({"w": torch.ones(1)}, optim.EmptyState())
    with pytest.raises(TypeError, match="inner_factory"):
        optim.inject_hyperparams(0.1)


# --------------------------------------------------------------------------- MultiSteps


def test_multisteps_equals_tx_on_mean_gradient():
    testing.check_multisteps_equivalent(optim.sgd(0.1, momentum=0.9), k=3, steps=2)
    testing.check_multisteps_equivalent(optim.sgd(0.1), k=1, steps=2)


def test_multisteps_adamw_equals_tx_on_mean_gradient():
    testing.check_multisteps_equivalent(optim.adamw(1e-2, weight_decay=0.1), k=4, steps=2)


def test_multisteps_over_microbatches_equals_one_step_on_their_concatenation():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    k, b = 3, 5
    x, y = torch.randn(k * b, 4), torch.randn(k * b, 2)

    def loss(params, xb, yb):
        return torch.mean((xb @ params["weight"].T + params["bias"] - yb) ** 2)

    grad_fn = craftfn.value_and_grad(loss)
    inner = optim.adamw(1e-2, weight_decay=0.01)
    params0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    multi = optim.MultiSteps(inner, every_k_schedule=k)
    p_multi, s_multi = tree.clone(params0), multi.init(params0)
    p_big, s_big = tree.clone(params0), inner.init(params0)
    for _ in range(2):  # two full updates
        for i in range(k):
            _, g = grad_fn(p_multi, x[i * b:(i + 1) * b], y[i * b:(i + 1) * b])
            u, s_multi = multi.update(g, s_multi, p_multi)
            p_multi = optim.apply_updates(p_multi, u)
        _, g_big = grad_fn(p_big, x, y)
        u, s_big = inner.update(g_big, s_big, p_big)
        p_big = optim.apply_updates(p_big, u)
        assert tree.allclose(p_multi, p_big, rtol=1e-5, atol=1e-6)
    assert int(s_multi.gradient_step) == 2 and int(s_multi.mini_step) == 0


def test_multisteps_skips_nonfinite_microbatches():
    params = {"w": torch.zeros(2)}
    tx = optim.MultiSteps(optim.sgd(1.0), every_k_schedule=2)
    s = tx.init(params)
    u, s = tx.update({"w": torch.tensor([1.0, 2.0])}, s, params)
    u, s = tx.update({"w": torch.tensor([float("nan"), 0.0])}, s, params)  # skipped: not counted
    assert torch.equal(u["w"], torch.zeros(2)) and not bool(tx.has_updated(s))
    assert int(s.mini_step) == 1 and int(s.skip_state["num_not_finite"]) == 1
    u, s = tx.update({"w": torch.tensor([3.0, 4.0])}, s, params)
    assert torch.allclose(u["w"], torch.tensor([-2.0, -3.0])) and bool(tx.has_updated(s))


def test_multisteps_schedule_sum_and_errors():
    params = {"w": torch.zeros(1)}
    # k = 1 for the first update, then 2.
    tx = optim.MultiSteps(optim.sgd(1.0), every_k_schedule=lambda step: torch.where(step < 1, 1, 2), use_grad_mean=False)
    s = tx.init(params)
    outs = []
    for g in (1.0, 2.0, 3.0):
        u, s = tx.update({"w": torch.tensor([g])}, s, params)
        outs.append(float(u["w"]))
    assert outs == [-1.0, 0.0, -5.0]
    assert tx.gradient_transformation() is tx
    with pytest.raises(ValueError, match="every_k_schedule"):
        optim.MultiSteps(optim.sgd(1.0), every_k_schedule=0)
    with pytest.raises(ValueError, match="init"):
        tx.update({"w": torch.ones(1)}, optim.EmptyState(), params)
    with pytest.raises(ValueError, match="updates"):
        tx.update({"v": torch.ones(1)}, s, params)


def test_multisteps_works_as_train_state_tx_with_donation():
    params = _params()
    tx = optim.MultiSteps(optim.sgd(0.1, momentum=0.9), every_k_schedule=2)
    pure = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    donated = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    for i in range(4):
        g = testing.random_grads(params, seed=i)
        pure = pure.apply_gradients(g)
        donated = donated.apply_gradients(g, donate=True)
    assert tree.allclose(pure.params, donated.params, rtol=1e-6, atol=1e-7)
    assert int(pure.opt_state.gradient_step) == 2


# --------------------------------------------------------------------------- apply_if_finite


def test_apply_if_finite_skips_nan_step_leaving_params_and_state_as_they_were():
    inner = optim.adamw(1e-2, weight_decay=0.1)
    tx = optim.apply_if_finite(inner, max_consecutive_errors=2)
    state = TrainState.create(apply_fn=lambda p, x: x, params=_params(), tx=tx)
    state = state.apply_gradients(testing.random_grads(state.params, seed=0))
    before = tree.clone(state)
    bad = testing.random_grads(state.params, seed=1)
    bad["weight"][1, 2] = float("nan")
    for donate in (False, True):
        skipped = tree.clone(state).apply_gradients(bad, donate=donate)
        assert tree.equal(skipped.params, before.params)
        assert tree.equal(skipped.opt_state.inner_state, before.opt_state.inner_state)
        assert int(skipped.opt_state.total_notfinite) == 1 and int(skipped.opt_state.notfinite_count) == 1
        assert not bool(skipped.opt_state.last_finite)
    # A finite step afterwards applies and resets the consecutive count.
    good = skipped.apply_gradients(testing.random_grads(state.params, seed=2))
    assert not tree.allclose(good.params, before.params)
    assert int(good.opt_state.notfinite_count) == 0 and int(good.opt_state.total_notfinite) == 1


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
    tx = optim.apply_if_finite(optim.sgd(1.0), max_consecutive_errors=1)
    params = {"w": torch.zeros(1)}
    s = tx.init(params)
    nan = {"w": torch.tensor([float("inf")])}
    u, s = tx.update(nan, s, params)
    assert torch.equal(u["w"], torch.zeros(1))
    u, s = tx.update(nan, s, params)  # the 2nd in a row exceeds max_consecutive_errors=1: applied
    assert torch.isinf(u["w"]).all() and int(s.total_notfinite) == 2
    with pytest.raises(ValueError, match="max_consecutive_errors"):
        optim.apply_if_finite(optim.sgd(1.0), max_consecutive_errors=-1)
    with pytest.raises(ValueError, match="init"):
        tx.update(nan, optim.EmptyState(), params)


# --------------------------------------------------------------------------- lookahead


def test_lookahead_matches_hand_computation():
    fast = optim.sgd(0.5)
    tx = optim.lookahead(fast, sync_period=3, slow_step_size=0.5)
    p = {"w": torch.tensor([1.0, -2.0])}
    s = tx.init(p)
    g = {"w": torch.tensor([1.0, 1.0])}
    slow = p["w"].clone()
    fast_w = p["w"].clone()
    for step in range(7):
        u, s = tx.update(g, s, p)
        p = optim.apply_updates(p, u)
        fast_w = fast_w - 0.5 * g["w"]
        if step % 3 == 2:
            slow = slow + 0.5 * (fast_w - slow)
            fast_w = slow.clone()
        assert torch.allclose(p["w"], fast_w, atol=1e-6), step
        assert torch.allclose(optim.tree_get(s, "slow")["w"], slow, atol=1e-6)
    with pytest.raises(ValueError, match="params"):
        tx.update(g, s)
    with pytest.raises(ValueError, match="sync_period"):
        optim.lookahead(fast, sync_period=0, slow_step_size=0.5)
    with pytest.raises(ValueError, match="slow_step_size"):
        optim.lookahead(fast, sync_period=2, slow_step_size=1.5)


def test_lookahead_reset_state_zeroes_momentum_at_sync():
    tx = optim.lookahead(optim.sgd(0.1, momentum=0.9), sync_period=2, slow_step_size=0.5, reset_state=True)
    p = {"w": torch.zeros(2)}
    s = tx.init(p)
    for _ in range(2):
        u, s = tx.update({"w": torch.ones(2)}, s, p)
        p = optim.apply_updates(p, u)
    assert torch.equal(optim.tree_get(s, "trace")["w"], torch.zeros(2))


# --------------------------------------------------------------------------- tree_get


def test_tree_get_finds_fields_anywhere_and_reports_ambiguity():
    tx = optim.chain(optim.trace(0.9), optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.5))
    state = TrainState.create(apply_fn=lambda p, x: x, params={"w": torch.ones(2)}, tx=tx)
    assert float(optim.tree_get(state.opt_state, "learning_rate")) == pytest.approx(0.1)
    assert float(optim.tree_get(state, "momentum")) == pytest.approx(0.5)
    with pytest.raises(KeyError, match="found 2 times"):
        optim.tree_get(state.opt_state, "trace")
    assert optim.tree_get(state.opt_state, "nope") is None  # optax's default
    assert optim.tree_get(state.opt_state, "nope", default=0) == 0
    first = optim.tree_get(state.opt_state, "trace", filtering=lambda path, v: path.startswith("0."))
    assert first is not None
    with pytest.raises(KeyError, match="exactly one"):
        optim.tree_set(state.opt_state, nope=torch.tensor(1.0))


# --------------------------------------------------------------------------- purity, stability, bf16


def _wrapped_rules():
    inner = optim.sgd(0.1, momentum=0.9)
    return {
        "MultiSteps": optim.MultiSteps(inner, every_k_schedule=2),
        "apply_if_finite": optim.apply_if_finite(inner, max_consecutive_errors=3),
        "inject_hyperparams": optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9),
        "lookahead": optim.lookahead(inner, sync_period=2, slow_step_size=0.5),
    }


@settings(max_examples=10, deadline=None)
@given(
    testing.param_trees(max_leaves=3).flatmap(lambda p: testing.grads_like(p).map(lambda g: (p, g))),
    st.sampled_from(sorted(_wrapped_rules())),
)
def test_wrappers_are_pure_and_keep_their_state_stable(pg, name):
    params, grads = pg
    tx = _wrapped_rules()[name]
    testing.check_pure(tx, params, grads, steps=3)
    testing.check_state_stable(tx, params, steps=3)


@pytest.mark.parametrize("name", sorted(_wrapped_rules()))
def test_bf16_params_stay_bf16_through_wrappers(name):
    tx = _wrapped_rules()[name]
    params = _params(dtype=torch.bfloat16)  # includes a 0-d leaf: tensor hyperparameters must not promote it
    testing.check_state_stable(tx, params, steps=3)
    for donate in (False, True):
        state = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
        for i in range(3):
            state = state.apply_gradients(testing.random_grads(params, seed=i), donate=donate)
        assert all(x.dtype == torch.bfloat16 for x in tree.leaves(state.params)), name
        assert tree.all_finite(state.params)


def test_injected_tensor_hyperparams_keep_0d_bf16_state_dtype():
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9)
    testing.check_state_stable(tx, {"temperature": torch.tensor(1.0, dtype=torch.bfloat16)}, steps=2)


@pytest.mark.parametrize("name", ["MultiSteps", "apply_if_finite", "lookahead"])
def test_wrappers_trace_into_one_graph_without_host_syncs(name):
    # fullgraph=True fails on any .item()/bool(tensor): the where-based decisions must not sync.
    tx = _wrapped_rules()[name]
    params = {"w": torch.randn(3, 2), "b": torch.randn(2)}
    backend = CountingBackend("eager")
    compiled = torch.compile(tx.update, backend=backend, fullgraph=True)
    s_eager = s_comp = tx.init(params)
    for i in range(3):
        g = testing.random_grads(params, seed=i)
        if i == 1:
            g["b"][0] = float("nan")
        u_eager, s_eager = tx.update(g, s_eager, params)
        u_comp, s_comp = compiled(g, s_comp, params)
        assert tree.allclose(u_eager, u_comp, equal_nan=True) and tree.allclose(s_eager, s_comp, equal_nan=True)
    assert backend.graphs == 1
