"""craftfn.testing: every law passes on a good rule and fails, with a precise message, on a broken one."""

import pytest
import torch
from hypothesis import given, settings

from craftfn import optim, testing, tree
from craftfn.optim import GradientTransformation


def good_momentum(lr=0.1, decay=0.9):
    """A correct custom rule: heavy-ball momentum, pure, torch.optim.SGD's numerics."""

    def init(params):
        return {"buf": tree.zeros_like(params)}

    def update(updates, state, params=None, **extra):
        buf = tree.map(lambda b, g: decay * b + g, state["buf"], updates)
        return tree.map(lambda b: -lr * b, buf), {"buf": buf}

    return GradientTransformation(init, update)


def mutates_grads():
    def update(updates, state, params=None, **extra):
        for g in tree.leaves(updates):
            g.mul_(-0.1)  # in place: the caller's gradients change
        return updates, state

    return GradientTransformation(lambda p: (), update)


def mutates_state(lr=0.1, decay=0.9):
    def init(params):
        return {"buf": tree.zeros_like(params)}

    def update(updates, state, params=None, **extra):
        for b, g in zip(tree.leaves(state["buf"]), tree.leaves(updates)):
            b.mul_(decay).add_(g)  # torch.optim style: the input state is overwritten
        return tree.map(lambda b: -lr * b, state["buf"]), state

    return GradientTransformation(init, update)


def nondeterministic():
    def update(updates, state, params=None, **extra):
        return tree.map(lambda g: g + 1e-3 * torch.randn_like(g), updates), state  # unkeyed randomness

    return GradientTransformation(lambda p: (), update)


def dtype_drift():
    """The count starts int64 and turns float after one step; moments turn fp64."""

    def init(params):
        return {"count": torch.zeros((), dtype=torch.int64), "mu": tree.zeros_like(params)}

    def update(updates, state, params=None, **extra):
        mu = tree.map(lambda m, g: 0.9 * m.double() + g.double(), state["mu"], updates)
        return tree.map(lambda m, g: (-0.1 * m).to(g.dtype), mu, updates), {"count": state["count"] + 0.5, "mu": mu}

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------- check_pure


def test_check_pure_passes_on_pure_rules():
    params, grads = testing.default_params(), testing.random_grads(testing.default_params(), seed=1)
    testing.check_pure(good_momentum(), params, grads)
    testing.check_pure(optim.sgd(0.1, momentum=0.9, nesterov=True), params, grads, steps=3)


@pytest.mark.parametrize(
    "rule, message",
    [
        (mutates_grads, r"check_pure: step 0: update mutated its input updates \(grads\): leaf 'block.bias' is not bit-identical: 3 of 3 elements differ, max abs diff"),
        (mutates_state, r"check_pure: step 0: update mutated its input opt_state: leaf 'buf.block.bias' is not bit-identical"),
        (nondeterministic, r"check_pure: step 0: a repeated update gave different updates: leaf 'block.bias'"),
    ],
)
def test_check_pure_catches_broken_rules(rule, message):
    params = testing.default_params()
    grads = testing.random_grads(params, seed=1)
    with pytest.raises(AssertionError, match=message):
        testing.check_pure(rule(), params, grads)


# --------------------------------------------------------------------------- check_matches_torch


def test_check_matches_torch_passes_for_a_correct_rule():
    params = testing.default_params()
    testing.check_matches_torch(good_momentum(0.1, 0.9), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), params, steps=20)
    grads_seq = [testing.random_grads(params, seed=s) for s in range(5)]
    testing.check_matches_torch(optim.sgd(0.05), lambda ps: torch.optim.SGD(ps, lr=0.05), params, grads_seq)


def test_check_matches_torch_names_the_step_leaf_and_difference():
    params = testing.default_params()
    with pytest.raises(AssertionError, match=r"check_matches_torch: step 0: params \(torch as reference\): leaf 'block.bias': 3 of 3 elements differ, max abs diff [0-9.e-]+ \(max rel [0-9.e-]+\) > atol 1e-06 \+ rtol 1e-05"):
        testing.check_matches_torch(good_momentum(0.1, 0.9), lambda ps: torch.optim.SGD(ps, lr=0.11, momentum=0.9), params, steps=3)
    # Momentum differs only from the second step on: the first step agrees, the message says step 1.
    with pytest.raises(AssertionError, match=r"step 1: params"):
        testing.check_matches_torch(good_momentum(0.1, 0.5), lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), params, steps=3)
    with pytest.raises(ValueError, match="steps"):
        testing.check_matches_torch(good_momentum(), lambda ps: torch.optim.SGD(ps, lr=0.1), params)


# --------------------------------------------------------------------------- check_state_stable


def test_check_state_stable_passes_and_catches_dtype_drift():
    params = testing.default_params()
    testing.check_state_stable(good_momentum(), params, steps=3)
    testing.check_state_stable(optim.sgd(0.1, momentum=0.9), testing.default_params(dtype=torch.bfloat16), steps=3)
    with pytest.raises(AssertionError, match=r"check_state_stable: after step 0: state leaf 'count' changed from int64\[\] on cpu to float32\[\] on cpu"):
        testing.check_state_stable(dtype_drift(), params, steps=2)


def test_check_state_stable_catches_shape_and_structure_changes():
    def growing():
        def update(updates, state, params=None, **extra):
            return updates, {"history": torch.cat([state["history"], torch.zeros(1)])}

        return GradientTransformation(lambda p: {"history": torch.zeros(0)}, update)

    def restructuring():
        def update(updates, state, params=None, **extra):
            return updates, {**state, "extra": torch.zeros(())}

        return GradientTransformation(lambda p: {"count": torch.zeros(())}, update)

    params = testing.default_params()
    with pytest.raises(AssertionError, match=r"state leaf 'history' changed from float32\[0\] on cpu to float32\[1\]"):
        testing.check_state_stable(growing(), params)
    with pytest.raises(AssertionError, match=r"state tree structure changed: missing leaves \[\], unexpected leaves \['extra'\]"):
        testing.check_state_stable(restructuring(), params)


# --------------------------------------------------------------------------- check_injected_equivalent


def test_check_injected_equivalent_passes_and_catches_a_type_dependent_factory():
    testing.check_injected_equivalent(optim.sgd, learning_rate=0.1, momentum=0.9)

    def type_dependent(learning_rate):
        # Wrong on purpose: treats a tensor learning rate differently from a float one.
        factor = learning_rate if isinstance(learning_rate, float) else 2 * learning_rate
        return optim.scale_by_learning_rate(factor)

    with pytest.raises(AssertionError, match=r"check_injected_equivalent: step 0: updates \(plain rule as reference\): leaf 'block.bias'"):
        testing.check_injected_equivalent(type_dependent, learning_rate=0.1)


# --------------------------------------------------------------------------- check_multisteps_equivalent


def test_check_multisteps_equivalent_passes_and_catches_a_call_counting_rule():
    testing.check_multisteps_equivalent(good_momentum(), k=3)
    testing.check_multisteps_equivalent(optim.sgd(0.1, momentum=0.9), k=2, steps=3)

    def call_counting():
        calls = [0]

        def update(updates, state, params=None, **extra):
            calls[0] += 1  # hidden Python state: the rule depends on how often it is called
            return tree.scale(-0.1 * calls[0], updates), state

        return GradientTransformation(lambda p: (), update)

    with pytest.raises(AssertionError, match=r"check_multisteps_equivalent: update 0: params \(tx on the mean gradient as reference\): leaf"):
        testing.check_multisteps_equivalent(call_counting(), k=3)
    with pytest.raises(ValueError, match="k must be"):
        testing.check_multisteps_equivalent(good_momentum(), k=0)


# --------------------------------------------------------------------------- strategies


@settings(max_examples=20, deadline=None)
@given(testing.param_trees().flatmap(lambda p: testing.grads_like(p).map(lambda g: (p, g))))
def test_param_trees_and_grads_like_agree_in_structure_shape_dtype(pg):
    params, grads = pg
    assert tree.structure(params) == tree.structure(grads)
    for p, g in zip(tree.leaves(params), tree.leaves(grads)):
        assert p.shape == g.shape and p.dtype == g.dtype
        assert p.dtype in (torch.float32, torch.float64, torch.bfloat16)
        assert p.dim() <= 3 and all(1 <= s <= 4 for s in p.shape)
    assert 1 <= len(tree.leaves(params)) <= 4
    assert tree.all_finite(grads)


@settings(max_examples=10, deadline=None)
@given(testing.param_trees(dtypes=[torch.float32], min_dims=1).flatmap(lambda p: testing.grads_like(p, nonfinite=True)))
def test_grads_like_nonfinite_draws_a_nonfinite_value(grads):
    assert not tree.all_finite(grads)
    assert all(g.dtype == torch.float32 and g.dim() >= 1 for g in tree.leaves(grads))


@settings(max_examples=15, deadline=None)
@given(testing.param_trees(max_leaves=3).flatmap(lambda p: testing.grads_like(p).map(lambda g: (p, g))))
def test_laws_hold_for_sgd_over_random_trees(pg):
    params, grads = pg
    tx = optim.sgd(0.1, momentum=0.9)
    testing.check_pure(tx, params, grads)
    testing.check_state_stable(tx, params, steps=2)
    testing.check_multisteps_equivalent(tx, k=2, params=params, steps=1, rtol=1e-2, atol=1e-2)


def test_strategy_arguments_are_validated():
    with pytest.raises(ValueError, match="dtypes"):
        testing.param_trees(dtypes=[torch.int64])
    with pytest.raises(ValueError, match="min_leaves"):
        testing.param_trees(min_leaves=3, max_leaves=2)
    with pytest.raises(ValueError, match="grads_like"):
        testing.grads_like({"n": torch.tensor(3)})
