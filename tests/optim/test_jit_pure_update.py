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


# One rounding of the stored dtype is allowed between two computations in float32 (the kernel
# rounds the params once; the pure update rounds the update, then apply_updates the sum).
_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def _assert_close_lowp(got, want, dtype: torch.dtype, what: str) -> None:
    got_l, want_l = tree.leaves(got), tree.leaves(want)
    assert len(got_l) == len(want_l), what
    for a, b in zip(got_l, want_l):
        assert a.dtype == b.dtype == dtype, (what, a.dtype, b.dtype)
        assert not a.isnan().any(), f"{what}: NaN"
        err = (a.float() - b.float()).abs()
        tol = 2 * _ULP[dtype] * b.float().abs() + 2 * _ULP[dtype] * 1e-3
        assert (err <= tol).all(), f"{what}: max |diff| {err.max().item():.3g}"


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_rule_computes_in_float32_like_the_fused_kernel(dtype: torch.dtype, amsgrad: bool) -> None:
    """fp16/bf16 leaves: in their own dtype eps=1e-8 is 0 in fp16 (0/0 where a gradient is 0, NaN)
    and b2=0.999 is 1.0 in bf16 (nu sums g^2 instead of averaging it); 60 steps show the drift."""
    gen = torch.Generator().manual_seed(0)
    p = [torch.randn(4, 8, generator=gen).to(dtype), torch.randn(8, generator=gen).to(dtype)]
    mu, nu = [torch.zeros_like(x) for x in p], [torch.zeros_like(x) for x in p]
    max_nu = [torch.zeros_like(x) for x in p] if amsgrad else None
    want_p, want_mu, want_nu, want_max = tree.clone((p, mu, nu, max_nu if amsgrad else []))
    hp = {"lr": 1e-3, "b1": 0.9, "b2": 0.999, "eps": 1e-8}
    for t in range(1, 61):
        g = [torch.randn(x.shape, generator=gen).to(dtype) * (1.0 if t <= 30 else 1e-2) for x in p]
        g[0][0] = 0  # a row that never gets a gradient
        u, mu, nu, new_max = adam_update_out_of_place(p, g, mu, nu, max_nu, torch.tensor(t), weight_decay=[0.1, 0.0], **hp)
        p = optim.apply_updates(p, u)
        max_nu = new_max if amsgrad else None
        for i in range(len(p)):  # the kernel takes one weight decay per call
            fused_adam_step_([want_p[i]], [g[i].clone()], [want_mu[i]], [want_nu[i]], [want_max[i]] if amsgrad else None,
                             torch.tensor(t), weight_decay=[0.1, 0.0][i], amsgrad=amsgrad, **hp)
        _assert_close_lowp((p, mu, nu, new_max), (want_p, want_mu, want_nu, want_max), dtype, f"step {t}")


@pytest.mark.parametrize(
    ("dtype", "make"),
    [
        (torch.bfloat16, lambda: optim.adamw(1e-3, weight_decay=0.1)),
        (torch.float16, lambda: optim.adamw(1e-3, weight_decay=0.1)),
        (torch.float16, lambda: optim.amsgrad(1e-3, max_raw_nu=True)),  # torch's rule: the fused path
    ],
    ids=["adamw-bf16", "adamw-fp16", "amsgrad-fp16"],
)
def test_jitted_low_precision_pure_update_equals_the_eager_fused_one(dtype: torch.dtype, make) -> None:
    tx = make()
    step = _pure_step(tx)
    torch._dynamo.reset()
    jitted = craftfn.jit(step, backend="aot_eager")
    gen = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(8, 8, generator=gen).to(dtype), "b": torch.randn(8, generator=gen).to(dtype)}
    state = tx.init(params)
    want_params, want_state = params, state
    for t in range(12):
        grads = {k: (torch.randn(v.shape, generator=gen) * (1.0 if t < 6 else 1e-3)).to(dtype) for k, v in params.items()}
        grads["w"][0] = 0
        params, state = jitted(grads, state, params)
        want_params, want_state = step(grads, want_state, want_params)  # eager: torch's fused kernel
        got = (params, [x for x in tree.leaves(state) if x.is_floating_point()])
        want = (want_params, [x for x in tree.leaves(want_state) if x.is_floating_point()])
        _assert_close_lowp(got, want, dtype, f"step {t}")


def _args(n_params: int = 1, **over):
    p = [torch.ones(2) for _ in range(n_params)]
    args = {"params": p, "grads": [torch.ones(2) for _ in p], "mu": [torch.zeros(2) for _ in p], "nu": [torch.zeros(2) for _ in p],
            "max_nu": None, "count": torch.tensor(1), "lr": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": [0.0] * n_params}
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"grads": [torch.ones(2)]}, r"grads must have the same tree structure as params: missing \['1'\]"),
        ({"grads": [torch.ones(1, 2), torch.ones(2)]}, r"grads shape \(1, 2\), params shape \(2\,\)"),
        ({"nu": [torch.zeros(2)]}, r"moments must have the same tree structure as params: missing \['nu.1'\]"),
        ({"max_nu": [torch.zeros(2)]}, r"moments must have the same tree structure as params: missing \['max_nu.1'\]"),
        ({"weight_decay": [0.1]}, r"weight_decay needs one entry per param \(2\), got 1: \[0.1\]"),
        ({"lr": torch.ones(2)}, r"lr must be a number or a 0-d tensor, got a tensor of shape \(2,\)"),
    ],
    ids=["short-grads", "broadcasting-grad", "short-nu", "short-max_nu", "short-weight_decay", "vector-lr"],
)
def test_out_of_place_rule_rejects_mismatched_inputs_naming_them(over: dict, match: str) -> None:
    a = _args(2, **over)
    with pytest.raises(ValueError, match=match):
        adam_update_out_of_place(a.pop("params"), a.pop("grads"), a.pop("mu"), a.pop("nu"), a.pop("max_nu"), a.pop("count"), **a)


def test_scalar_op_checks_its_inputs() -> None:
    f64 = torch.float64
    with pytest.raises(ValueError, match=r"craftfn::adam_step_scalars: inputs must share one dtype"):
        torch.ops.craftfn.adam_step_scalars(torch.tensor(1.0, dtype=f64), torch.tensor(0.1), torch.tensor(0.9, dtype=f64), torch.tensor(0.9, dtype=f64))


def test_learning_rate_requiring_grad_gets_its_gradient() -> None:
    """The scalar op has no autograd formula: a differentiable lr (meta-learning) takes plain ops."""
    lr = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    a = _args(1, lr=lr, weight_decay=[0.1], count=torch.tensor(1))
    u, *_ = adam_update_out_of_place(a.pop("params"), a.pop("grads"), a.pop("mu"), a.pop("nu"), a.pop("max_nu"), a.pop("count"), **a)
    u[0].sum().backward()
    # The update is linear in lr (the bias corrections do not depend on it): d sum(u) / d lr = sum(u) / lr.
    assert lr.grad is not None
    torch.testing.assert_close(lr.grad, (u[0].detach().sum() / lr.detach()).to(torch.float64), rtol=1e-6, atol=0)
    assert lr.grad.item() < -2.0  # two elements, each about -(1 + wd)
