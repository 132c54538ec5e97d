"""The pure AdamW update under ``craftfn.jit``: one graph of pointwise ops (what inductor fuses into
out-of-place kernels), no recompile for fresh trees, the eager update's numbers.

A counting ``aot_eager`` backend runs dynamo and AOT autograd without inductor's code generation
(tens of seconds per graph on CI's CPUs); benchmarks/optim_bench.py times the inductor build.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import craftfn
from craftfn import optim, tree
from craftfn.optim.fused import adam_update_out_of_place, fused_adam_step_


def _tree(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g), "ln": torch.randn(5, generator=g)}


def _pure_step(tx: optim.GradientTransformation):
    def step(grads, opt_state, params):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    return step


def test_jitted_pure_adamw_is_one_pointwise_graph_without_recompiles_and_equals_eager() -> None:
    # Masked decay and a schedule: the count and the mask both reach the traced rule.
    tx = optim.adamw(lambda n: 1e-2 * 0.9**n, weight_decay=0.1, mask=lambda name, p: p.ndim >= 2)
    step = _pure_step(tx)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    jitted = craftfn.jit(step, backend=counter)
    params = _tree(0)
    state = tx.init(params)
    want_params, want_state = params, state
    for t in range(3):  # fresh trees every call: the outputs of the previous one
        grads = _tree(10 + t)
        params, state = jitted(grads, state, params)
        want_params, want_state = step(grads, want_state, want_params)  # eager: torch's fused kernel
        assert tree.allclose((params, state), (want_params, want_state), rtol=1e-6, atol=1e-7), f"step {t}"
    assert counter.frame_count == 1  # one graph (fullgraph: no break), no recompile
    # The opaque in-place kernel (a custom op under compile) would keep inductor from fusing; the
    # step's scalars (bias corrections, the schedule's lr) come from one opaque op, computed once.
    targets = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("fused_adamw" in t for t in targets), sorted(set(targets))
    assert sum("adam_step_scalars" in t for t in targets) == 1, sorted(set(targets))


def test_jitted_pure_update_leaves_its_inputs_alone() -> None:
    tx = optim.adamw(1e-2, weight_decay=0.1)
    params, grads = _tree(0), _tree(1)
    state = tx.update(grads, tx.init(params), params)[1]  # count > 0, moments nonzero
    before = tree.clone((grads, state, params))
    torch._dynamo.reset()
    craftfn.jit(_pure_step(tx), backend="aot_eager")(grads, state, params)
    assert tree.equal((grads, state, params), before)


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("hparams", ["floats", "tensors"])
def test_out_of_place_rule_equals_the_fused_kernel(amsgrad: bool, hparams: str) -> None:
    """The traced rule, run eagerly, against torch's kernel in place on copies (second step: count 2)."""
    p, g = list(_tree(0).values()), list(_tree(1).values())
    mu, nu = [torch.rand_like(x) for x in p], [torch.rand_like(x) for x in p]
    max_nu = [v + torch.rand_like(v) for v in nu] if amsgrad else None
    wd = [0.1, 0.0, 0.1]
    hp = {"lr": 1e-2, "b1": 0.9, "b2": 0.99, "eps": 1e-8}
    if hparams == "tensors":
        hp = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()}
    inputs = tree.clone((p, g, mu, nu, max_nu))
    u, new_mu, new_nu, new_max = adam_update_out_of_place(p, g, mu, nu, max_nu, torch.tensor(2), weight_decay=wd, **hp)
    assert tree.equal((p, g, mu, nu, max_nu), inputs)  # nothing written
    want_p, want_mu, want_nu = tree.clone((p, mu, nu))
    want_max = tree.clone(max_nu) if amsgrad else []
    for i in range(len(p)):  # the kernel takes one weight decay per call
        fused_adam_step_([want_p[i]], [g[i]], [want_mu[i]], [want_nu[i]], [want_max[i]] if amsgrad else None, torch.tensor(2),
                         weight_decay=wd[i], amsgrad=amsgrad, **hp)
    assert tree.allclose((optim.apply_updates(p, u), new_mu, new_nu, new_max), (want_p, want_mu, want_nu, want_max), rtol=1e-6, atol=1e-7)
