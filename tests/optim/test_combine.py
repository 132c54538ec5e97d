"""Combinators: named_chain, partition, masked, freeze."""

import pytest
import torch
from hypothesis import given, settings

import craftfn
from craftfn import TrainState, optim, testing, tree


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return {
        "embed": {"weight": torch.randn(5, 3, generator=gen).to(dtype)},
        "blocks": [
            {"weight": torch.randn(3, 3, generator=gen).to(dtype), "bias": torch.randn(3, generator=gen).to(dtype)},
            {"weight": torch.randn(3, 3, generator=gen).to(dtype), "bias": torch.randn(3, generator=gen).to(dtype)},
        ],
        "norm": {"scale": torch.randn(3, generator=gen).to(dtype)},
    }


def _decay_label(name, p):
    return "no_decay" if name.endswith("bias") or p.ndim < 2 else "decay"


def _grads(params, seed=1):
    return testing.random_grads(params, seed=seed)


# --------------------------------------------------------------------------- partition


def test_partition_by_parameter_name_applies_each_rule_to_its_group():
    params, grads = _params(), _grads(_params())
    tx = optim.partition({"decay": optim.sgd(0.1), "no_decay": optim.sgd(1.0)}, _decay_label)
    updates, state = tx.update(grads, tx.init(params), params)
    for (name, u), (_, g), (_, p) in zip(*(tree.flatten_with_path(t)[0] for t in (updates, grads, params))):
        lr = 1.0 if _decay_label(name, p) == "no_decay" else 0.1
        assert torch.allclose(u, -lr * g), name
    # Each inner state only covers its own leaves.
    assert set(state.inner_states) == {"decay", "no_decay"}


def test_partition_label_forms_agree():
    params = _params()
    transforms = {"decay": optim.sgd(0.1, momentum=0.9), "no_decay": optim.sgd(0.5)}
    by_name = optim.partition(transforms, _decay_label)
    labels_tree = tree.map_with_path(_decay_label, params)
    by_tree = optim.partition(transforms, labels_tree)
    by_fn = optim.partition(transforms, lambda ps: tree.map_with_path(_decay_label, ps))
    prefix = {"embed": "decay", "blocks": [{"weight": "decay", "bias": "no_decay"}] * 2, "norm": "no_decay"}
    by_prefix = optim.partition(transforms, prefix)
    results = []
    for tx in (by_name, by_tree, by_fn, by_prefix):
        s = tx.init(params)
        p = params
        for i in range(3):
            u, s = tx.update(_grads(params, seed=i), s, p)
            p = optim.apply_updates(p, u)
        results.append(p)
    for r in results[1:]:
        assert tree.equal(results[0], r)


def test_partition_donated_equals_pure():
    inner = optim.adamw(1e-2, weight_decay=0.1)
    tx = optim.partition({"decay": inner, "no_decay": optim.sgd(0.05, momentum=0.5)}, _decay_label)
    params = _params()
    pure = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    donated = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    for i in range(4):
        g = _grads(params, seed=i)
        pure = pure.apply_gradients(g)
        donated = donated.apply_gradients(g, donate=True)
    assert tree.allclose(pure.params, donated.params, rtol=1e-6, atol=1e-7)
    assert tree.allclose(pure.opt_state, donated.opt_state, rtol=1e-6, atol=1e-7)


def test_partition_bad_labels_and_states():
    params = _params()
    with pytest.raises(ValueError, match=r"param_labels: parameter 'blocks.0.bias' has label 'oops'.*\['decay', 'no_decay'\]"):
        optim.partition({"decay": optim.sgd(0.1), "no_decay": optim.sgd(0.1)},
                        lambda n, p: "oops" if n == "blocks.0.bias" else "decay").init(params)
    with pytest.raises(ValueError, match="param_labels"):
        optim.partition({"a": optim.sgd(0.1)}, {"w": "a"}).init(params)
    tx = optim.partition({"a": optim.sgd(0.1)}, lambda n, p: "a")
    with pytest.raises(ValueError, match="init"):
        tx.update(params, optim.EmptyState(), params)
    with pytest.raises(TypeError, match="transforms"):
        optim.partition({}, lambda n, p: "a")


# --------------------------------------------------------------------------- masked / freeze


def test_masked_updates_pass_through_unchanged_outside_the_mask():
    params, grads = _params(), _grads(_params())
    tx = optim.masked(optim.sgd(0.1, momentum=0.9), lambda name, p: p.ndim >= 2)
    state = tx.init(params)
    # The inner state only holds the masked-in (matrix) leaves.
    assert all(x.ndim >= 2 for x in tree.leaves(state.inner_state))
    updates, state = tx.update(grads, state, params)
    for (name, u), g in zip(tree.flatten_with_path(updates)[0], tree.leaves(grads)):
        if u.ndim >= 2:
            assert torch.allclose(u, -0.1 * g), name
        else:
            assert u is g, name  # passed through as it came


def test_masked_with_bool_tree_and_prefix_and_donation():
    params = _params()
    mask = {"embed": False, "blocks": True, "norm": False}  # a prefix of the params tree
    inner = optim.adamw(1e-2, weight_decay=0.1)
    tx = optim.masked(inner, mask)
    pure = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    donated = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    for i in range(3):
        g = _grads(params, seed=i)
        pure = pure.apply_gradients(g)
        donated = donated.apply_gradients(g, donate=True)
    assert tree.allclose(pure.params, donated.params, rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="mask"):
        optim.masked(optim.sgd(0.1), {"embed": torch.tensor(True), "blocks": True, "norm": False}).init(params)
    with pytest.raises(ValueError, match="mask"):
        optim.masked(optim.sgd(0.1), {"embed": True}).init(params)


def test_freeze_zeroes_frozen_updates_even_when_nan():
    params = _params()
    grads = _grads(params)
    grads["embed"]["weight"][0, 0] = float("nan")
    tx = optim.chain(optim.freeze(lambda name, p: name.startswith("embed")), optim.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert torch.equal(updates["embed"]["weight"], torch.zeros(5, 3))
    assert torch.allclose(updates["norm"]["scale"], -0.1 * grads["norm"]["scale"])


# --------------------------------------------------------------------------- named_chain


def test_named_chain_equals_chain_and_names_its_states():
    params = _params()
    a = optim.chain(optim.trace(0.9), optim.scale_by_learning_rate(0.1))
    b = optim.named_chain(("momentum", optim.trace(0.9)), ("lr", optim.scale_by_learning_rate(0.1)))
    sa, sb = a.init(params), b.init(params)
    assert sorted(sb) == ["lr", "momentum"]
    for i in range(3):
        g = _grads(params, seed=i)
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(g, sb, params)
        assert tree.equal(ua, ub)
    assert tree.equal(sa[0], sb["momentum"])
    with pytest.raises(ValueError, match="twice"):
        optim.named_chain(("x", optim.sgd(0.1)), ("x", optim.sgd(0.1)))
    with pytest.raises(ValueError, match="init"):
        b.update(params, sa, params)


def test_named_chain_donated_when_last_rule_has_one():
    tx = optim.named_chain(("clip", optim.clip_by_global_norm(1.0)), ("adamw", optim.adamw(1e-2)))
    assert tx.donated_update is not None
    params = _params()
    pure = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    donated = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
    for i in range(3):
        g = _grads(params, seed=i)
        pure, donated = pure.apply_gradients(g), donated.apply_gradients(g, donate=True)
    assert tree.allclose(pure.params, donated.params, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- laws over random trees


def _combined_rules():
    label = lambda name, p: "a" if p.ndim >= 2 else "b"  # noqa: E731
    return {
        "partition": optim.partition({"a": optim.sgd(0.1, momentum=0.9), "b": optim.sgd(0.01)}, label),
        "masked": optim.masked(optim.sgd(0.1, momentum=0.9), lambda name, p: p.ndim >= 2),
        "freeze": optim.chain(optim.freeze(lambda name, p: name.endswith("bias")), optim.sgd(0.1)),
        "named_chain": optim.named_chain(("m", optim.trace(0.9)), ("lr", optim.scale_by_learning_rate(0.1))),
    }


@settings(max_examples=12, deadline=None)
@given(testing.param_trees(max_leaves=4).flatmap(lambda p: testing.grads_like(p).map(lambda g: (p, g))))
def test_combinators_are_pure_stable_and_keep_dtypes(pg):
    params, grads = pg
    for name, tx in _combined_rules().items():
        testing.check_pure(tx, params, grads, steps=2)
        testing.check_state_stable(tx, params, steps=2)
        updates, _ = tx.update(grads, tx.init(params), params)
        new = optim.apply_updates(params, updates)
        assert [x.dtype for x in tree.leaves(new)] == [x.dtype for x in tree.leaves(params)], name


def test_bf16_params_stay_bf16_through_combinators():
    params = _params(torch.bfloat16)
    for name, tx in _combined_rules().items():
        for donate in (False, True):
            state = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
            for i in range(2):
                state = state.apply_gradients(_grads(params, seed=i), donate=donate)
            assert all(x.dtype == torch.bfloat16 for x in tree.leaves(state.params)), (name, donate)


def test_combinators_trace_into_one_graph_with_nested_trees():
    # A nested group whose leaves all fall on one side used to break Dynamo's optree support.
    params = {"w": torch.randn(3, 2), "b": torch.randn(2), "blk": {"x": torch.randn(2), "y": torch.randn(2)}}
    rules = {
        "partition by name": optim.partition({"a": optim.sgd(0.1, momentum=0.9), "b": optim.sgd(0.01)},
                                             lambda n, p: "a" if p.ndim >= 2 else "b"),
        "partition by prefix tree": optim.partition({"a": optim.sgd(0.1, momentum=0.9), "b": optim.sgd(0.01)},
                                                    {"w": "a", "b": "b", "blk": "a"}),
        "masked tree": optim.masked(optim.sgd(0.1, momentum=0.9), {"w": True, "b": False, "blk": {"x": True, "y": False}}),
        "freeze": optim.freeze({"w": True, "b": False, "blk": True}),
    }
    for name, tx in rules.items():
        compiled = torch.compile(tx.update, backend="eager", fullgraph=True)
        state = tx.init(params)
        g = testing.random_grads(params, seed=0)
        u_c, s_c = compiled(g, state, params)
        u_e, s_e = tx.update(g, state, params)
        assert tree.allclose(u_c, u_e) and tree.allclose(s_c, s_e), name


def test_a_partition_with_an_empty_side_compiles_and_equals_eager():
    # A label no parameter has (as Muon's AdamW side on a model of matrices only: Muon is such a
    # partition), a mask that selects nothing: Dynamo (torch 2.13) cannot flatten a tensor-free tree
    # holding a dict, which is what an empty side was.
    params = {"w1": torch.randn(4, 3), "w2": torch.randn(3, 2)}
    rules = {
        "unused label": optim.partition({"a": optim.adamw(1e-2), "b": optim.adam(1e-2)}, lambda n, p: "a"),
        "empty mask": optim.masked(optim.adam(1e-2), lambda n, p: False),
    }
    for name, tx in rules.items():
        # The donated path once (a partition's fused AdamW side beside an empty one): traces cost seconds.
        for donate in (False, True) if name == "unused label" else (False,):
            state = tx.init(params)
            g = testing.random_grads(params, seed=1)
            torch._dynamo.reset()
            if donate:
                step = lambda s, g: s.apply_gradients(g, donate=True)  # noqa: E731
                compiled = craftfn.jit(step, donate_argnums=0, backend="eager")
                a = TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params), tx=tx)
                b = tree.clone(a)
                for i in range(2):
                    a, b = compiled(a, testing.random_grads(params, seed=i)), step(b, testing.random_grads(params, seed=i))
                assert tree.allclose(a.params, b.params) and tree.allclose(a.opt_state, b.opt_state), name
            else:
                u_c, s_c = torch.compile(tx.update, backend="eager", fullgraph=True)(g, state, params)
                u_e, s_e = tx.update(g, state, params)
                assert tree.allclose(u_c, u_e) and tree.allclose(s_c, s_e), name


def test_partition_prefix_entries_must_match_parameters():
    params = _params()
    with pytest.raises(ValueError, match=r"param_labels entries \['nrom'\] match no parameter"):
        optim.partition({"a": optim.sgd(0.1)}, {"embed": "a", "blocks": "a", "norm": "a", "nrom": "a"}).init(params)
    with pytest.raises(ValueError, match=r"mask has no entry for parameter 'norm.scale'"):
        optim.masked(optim.sgd(0.1), {"embed": True, "blocks": False}).init(params)
