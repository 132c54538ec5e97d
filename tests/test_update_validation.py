"""Updates are checked against the parameters in every update path before any kernel runs.

A hypothesis fuzz draws parameter trees and, for one leaf, an update of another shape (often the
same number of elements: a transpose or reshape, which a kernel would silently misread, or fewer,
which the fused Adam kernel would read past). Every path must raise ``ValueError`` naming the leaf
and both shapes, and leave the parameters and optimizer state bit-for-bit as they were: nothing
was computed from the bad update. The check must also trace under torch.compile without graph breaks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend

from craftfn import TrainState, _context, make_train_step, optim, random, tree
from craftfn.jit import engine_config
from craftfn.optim.fused import fused_adam_step_

shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


@st.composite
def mismatched(draw):
    """(param shapes by name, the bad leaf's name, the bad update shape)."""
    names = draw(st.lists(st.sampled_from(["a", "b.w", "b.bias", "c"]), min_size=1, max_size=4, unique=True))
    param_shapes = {n: draw(shapes) for n in names}
    bad = draw(st.sampled_from(names))
    good = param_shapes[bad]
    numel = math.prod(good)
    # Same numel in another layout (transpose, reshape), fewer elements, or more.
    candidates = [tuple(reversed(good)), (numel,), (1, numel), (max(numel - 1, 1),), (numel + 1,), draw(shapes)]
    update_shape = draw(st.sampled_from([c for c in candidates if c != good] or [(numel + 1,)]))
    return param_shapes, bad, update_shape


def _nest(flat: dict[str, torch.Tensor]) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _trees(param_shapes, bad, update_shape):
    gen = torch.Generator().manual_seed(0)
    params = _nest({n: torch.randn(s, generator=gen) for n, s in param_shapes.items()})
    grads = _nest({n: torch.randn(update_shape if n == bad else s, generator=gen) for n, s in param_shapes.items()})
    return params, grads


def _paths():
    """Every way an update reaches the parameters: (name, run(params, grads))."""

    def pure(tx):
        return lambda p, g: TrainState.create(apply_fn=lambda *a: None, params=p, tx=tx).apply_gradients(g)

    def donated(tx):
        return lambda p, g: TrainState.create(apply_fn=lambda *a: None, params=p, tx=tx, copy=False).apply_gradients(g, donate=True)

    def tx_update(tx):
        return lambda p, g: tx.update(g, tx.init(p), p)

    def fused(p, g):
        ps, gs = tree.leaves(p), tree.leaves(g)
        return fused_adam_step_(ps, gs, tree.leaves(tree.zeros_like(p)), tree.leaves(tree.zeros_like(p)), None, torch.tensor(1), lr=0.1, b1=0.9, b2=0.999, eps=1e-8)

    clip_adamw = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1, weight_decay=0.1))
    return [
        ("apply_updates", lambda p, g: optim.apply_updates(p, g)),
        ("apply_updates_", lambda p, g: optim.apply_updates_(p, g)),
        ("sgd pure", pure(optim.sgd(0.1, momentum=0.9))),
        ("sgd donated", donated(optim.sgd(0.1))),
        ("adamw pure (fused)", pure(optim.adamw(0.1, weight_decay=0.1))),
        ("adamw donated (fused)", donated(optim.adamw(0.1, weight_decay=0.1))),
        ("amsgrad donated (fused)", donated(optim.amsgrad(0.1))),
        ("clip+adamw chained, donated", donated(clip_adamw)),
        ("adamw tx.update", tx_update(optim.adamw(0.1))),
        ("lion tx.update", tx_update(optim.lion(0.1))),
        ("create_optimizer donated", donated(optim.create_optimizer("adamw", learning_rate=0.1, clip_norm=1.0, accum_steps=2))),
        ("fused_adam_step_", fused),
    ]


PATHS = _paths()


@settings(max_examples=25)
@given(case=mismatched(), path=st.sampled_from(PATHS))
def test_every_mismatched_update_is_rejected_before_any_kernel(case, path):
    param_shapes, bad, update_shape = case
    name, run = path
    params, grads = _trees(param_shapes, bad, update_shape)
    before = tree.clone(params)
    with pytest.raises(ValueError) as info:
        run(params, grads)
    message = str(info.value)
    assert str(update_shape) in message and str(param_shapes[bad]) in message, (name, message)
    if name != "fused_adam_step_":  # the kernel's own entry point names list positions
        assert repr(bad) in message, (name, message)
    assert tree.equal(params, before), f"{name} changed the parameters before rejecting the update"


@settings(max_examples=10)
@given(param_shapes=st.dictionaries(st.sampled_from(["a", "b.w", "c"]), shapes, min_size=1), path=st.sampled_from(PATHS))
def test_matching_updates_pass_every_path(param_shapes, path):
    name, run = path
    params, grads = _trees(param_shapes, None, None)
    run(params, grads)  # no error
    if name == "apply_updates":
        assert tree.allclose(run(params, grads), tree.add(params, grads))


def test_checks_trace_without_graph_breaks_and_still_reject_under_compile():
    params = {"fc": {"weight": torch.randn(3, 2), "bias": torch.randn(3)}}
    grads = tree.map(torch.ones_like, params)
    # The generic path (SGD) and the fused AdamW path behind a chain (AdamW's own check runs inside it).
    for tx in (optim.sgd(0.1, momentum=0.9), optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1, weight_decay=0.1))):
        state = tx.init(params)

        def update(g, s, p, tx=tx):
            updates, s = tx.update(g, s, p)
            return optim.apply_updates(p, updates), s

        torch._dynamo.reset()
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(update, backend=counter, fullgraph=True)  # a graph break raises here
        expected = update(grads, state, params)
        assert tree.allclose(compiled(grads, state, params), expected, rtol=1e-6, atol=1e-7)
        compiled(tree.map(torch.zeros_like, grads), state, params)
        assert counter.frame_count == 1  # the checks add no recompiles (same shapes)
        bad = {"fc": {"weight": torch.ones(2, 3), "bias": torch.ones(3)}}
        with pytest.raises(ValueError, match=r"fc.weight.*\(2, 3\).*\(3, 2\)"):
            torch.compile(update, backend="eager")(bad, state, params)  # dynamo falls back: the same error


def test_a_compiled_donated_train_step_has_no_graph_breaks():
    model = torch.nn.Linear(3, 2)

    def loss_fn(state, p, batch, rng):
        return torch.mean((state.apply(p, batch["x"]) - batch["y"]) ** 2)

    state = TrainState.create(model=model, tx=optim.adamw(0.1, weight_decay=0.1))
    batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 2)}
    torch._dynamo.reset()
    for donate in (False, True):
        step = make_train_step(loss_fn, donate=donate)
        with engine_config(), _context.step_context(training=True):
            explanation = torch._dynamo.explain(step.core)(state, batch, random.key(0))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1
