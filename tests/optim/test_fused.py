"""The Adam family's fused paths: pure ``update`` and ``donated_update`` give the generic chain's numbers."""

from __future__ import annotations

import pytest
import torch

from craftfn import optim, tree
from craftfn.optim.fused import fused_adam_step_, fused_supported
from craftfn.state import TrainState
from craftfn.testing import check_pure, check_state_stable


def _params(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(6, 5, generator=g).to(dtype), "b": torch.randn(5, generator=g).to(dtype), "v": torch.randn(3, generator=g).to(dtype)}


def _grads(params: dict, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) for k, v in params.items()}


def _run_pure(tx, params, steps, *, through_update=True):
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(_grads(params, t), state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _run_donated(tx, params, steps):
    params = tree.clone(params)
    state = tx.init(params)
    for t in range(steps):
        params, state = tx.donated_update(_grads(params, t), state, params)
    return params, state


def _generic(name: str, lr, wd=None, mask=None):
    core = optim.scale_by_amsgrad(max_raw_nu=True) if name == "amsgrad" else optim.scale_by_adam()
    parts = [core] + ([optim.add_decayed_weights(wd, mask)] if wd is not None else []) + [optim.scale_by_learning_rate(lr)]
    return optim.chain(*parts)


FAMILY = {
    "adam": (lambda lr: optim.adam(lr), lambda lr: _generic("adam", lr)),
    "adamw": (lambda lr: optim.adamw(lr, weight_decay=0.1), lambda lr: _generic("adamw", lr, 0.1)),
    "adamw_masked": (
        lambda lr: optim.adamw(lr, weight_decay=0.1, mask=lambda name, p: p.ndim >= 2),
        lambda lr: _generic("adamw", lr, 0.1, lambda name, p: p.ndim >= 2),
    ),
    # torch's AMSGrad (the fused kernel's): the maximum of the raw second moment.
    "amsgrad": (lambda lr: optim.amsgrad(lr, max_raw_nu=True), lambda lr: _generic("amsgrad", lr)),
}
LRS = {"float": 1e-2, "tensor": torch.tensor(1e-2), "schedule": lambda n: 1e-2 / (1.0 + n)}


@pytest.mark.parametrize("lr_kind", sorted(LRS))
@pytest.mark.parametrize("name", sorted(FAMILY))
def test_pure_donated_and_generic_agree(name: str, lr_kind: str) -> None:
    fast, generic = FAMILY[name]
    lr = LRS[lr_kind]
    tx = fast(lr)
    assert tx.donated_update is not None
    p0 = _params()
    ref_p, ref_s = _run_pure(generic(lr), p0, 20)
    pure_p, pure_s = _run_pure(tx, p0, 20)
    don_p, don_s = _run_donated(tx, p0, 20)
    assert tree.allclose(pure_p, ref_p, rtol=1e-5, atol=1e-6)
    assert tree.allclose(don_p, ref_p, rtol=1e-5, atol=1e-6)
    assert tree.allclose(pure_s, ref_s, rtol=1e-5, atol=1e-6)
    assert tree.allclose(don_s, ref_s, rtol=1e-5, atol=1e-6)
    assert int(don_s[0].count) == 20 and don_s[0].count.dtype == torch.int64


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_fused_pure_path_is_pure_and_stable(name: str) -> None:
    tx = FAMILY[name][0](1e-2)
    check_pure(tx, _params(), _grads(_params(), 0), steps=3)
    check_state_stable(tx, _params(), steps=3)


def test_donated_update_works_in_place() -> None:
    tx = optim.adamw(1e-2, weight_decay=0.1)
    params = _params()
    state = tx.init(params)
    ptrs = [x.data_ptr() for x in tree.leaves(params)] + [x.data_ptr() for x in tree.leaves(state[0].mu)]
    new_params, new_state = tx.donated_update(_grads(params, 0), state, params)
    assert [x.data_ptr() for x in tree.leaves(new_params)] + [x.data_ptr() for x in tree.leaves(new_state[0].mu)] == ptrs


@pytest.mark.parametrize("name", ["adam", "amsgrad", "adamw"])
def test_bf16_params_stay_bf16(name: str) -> None:
    fast, generic = FAMILY[name]
    lr = 3e-2
    # Small parameters (|p| < 0.3) keep bf16 rounding (~1e-3 over 5 steps) well below one step's
    # movement (~7e-3 or more per element, 0.14 in all), so the bf16 paths are checked against the fp32
    # rule tightly enough that a missing step or a partial update cannot pass.
    p0 = tree.map(lambda x: (0.03 * x).to(torch.bfloat16), _params())
    ref, _ = _run_pure(generic(lr), tree.map(lambda x: x.float(), p0), 5)
    for params, state in (_run_pure(fast(lr), p0, 5), _run_donated(fast(lr), p0, 5)):
        assert all(x.dtype == torch.bfloat16 for x in tree.leaves(params))
        assert all(x.dtype == torch.bfloat16 for x in tree.leaves(state[0].mu))
        err = max(float((p.float() - r).abs().max()) for p, r in zip(tree.leaves(params), tree.leaves(ref)))
        assert err <= 2.5e-3, f"bf16 parameters are {err:.4f} away from the fp32 rule after 5 steps"


def test_ineligible_variants_have_no_fused_path_but_donate_generically() -> None:
    assert optim.adam(1e-2, nesterov=True).donated_update is None
    assert optim.adam(1e-2, eps_root=1e-8).donated_update is None
    # A state whose dtypes the kernel cannot take (fp32 moments for bf16 params via
    # mu_dtype is excluded at build time; here: mixed dtypes per leaf) falls back.
    tx = optim.adamw(1e-2)
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    state = (state[0]._replace(nu={"w": torch.zeros(3, dtype=torch.float64)}), *state[1:])
    new_params, new_state = tx.donated_update({"w": torch.ones(3)}, state, params)
    assert new_params["w"].dtype == torch.float32 and int(new_state[0].count) == 1


def test_chain_with_clipping_keeps_the_fused_donated_path() -> None:
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    assert tx.donated_update is not None
    p0 = _params()
    pure_p, _ = _run_pure(tx, p0, 10)
    don_p, _ = _run_donated(tx, p0, 10)
    assert tree.allclose(pure_p, don_p, rtol=1e-5, atol=1e-6)


def test_train_state_donated_step_equals_pure_step() -> None:
    model = torch.nn.Linear(4, 3)
    s_pure = TrainState.create(model=model, tx=optim.adamw(1e-2, weight_decay=0.1))
    s_don = TrainState.create(model=model, tx=optim.adamw(1e-2, weight_decay=0.1))
    for t in range(5):
        grads = _grads(dict(s_pure.params), t)
        s_pure = s_pure.apply_gradients(grads)
        s_don = s_don.apply_gradients(tree.clone(grads), donate=True)
    assert tree.allclose(s_pure.params, s_don.params, rtol=1e-5, atol=1e-6)


def test_fused_adam_step_tensor_hyperparameters_match_floats() -> None:
    def run(**h):
        p, m, v, mx = (list(tree.leaves(tree.clone(_params()))) for _ in range(4))
        for x in m + v + mx:
            x.zero_()
        for t in range(1, 6):
            g = list(tree.leaves(_grads(_params(), t)))
            fused_adam_step_(p, g, m, v, mx, torch.tensor(t), amsgrad=True, **h)
        return p + m + v + mx

    floats = run(lr=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.1)
    tensors = run(lr=torch.tensor(1e-2), b1=torch.tensor(0.9), b2=torch.tensor(0.99), eps=torch.tensor(1e-8), weight_decay=torch.tensor(0.1))
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(floats, tensors))


def test_fused_adam_step_rejects_mismatched_lists() -> None:
    assert not fused_supported([torch.zeros(2)], [torch.zeros(2, dtype=torch.float64)])
    with pytest.raises(ValueError, match="same length"):
        fused_adam_step_([torch.zeros(2)], [], [torch.zeros(2)], [torch.zeros(2)], None, torch.tensor(1), lr=0.1, b1=0.9, b2=0.9, eps=0.0)
    with pytest.raises(ValueError, match="max_nu"):
        fused_adam_step_([torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], [torch.zeros(2)], None, torch.tensor(1), lr=0.1, b1=0.9, b2=0.9, eps=0.0, amsgrad=True)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["update", "donated_update"])
def test_adamw_paths_trace_without_graph_breaks(path: str) -> None:
    torch._dynamo.reset()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(lambda n: 1e-2 * 0.9**n, weight_decay=0.1))
    params, grads = _params(), _grads(_params(), 0)
    fn = getattr(tx, path)
    compiled = torch.compile(lambda g, s, p: fn(g, s, p), backend="eager", fullgraph=True)
    expected = fn(tree.clone(grads), tx.init(params), tree.clone(params))
    got = compiled(tree.clone(grads), tx.init(params), tree.clone(params))
    assert tree.allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_muon_donated_equals_pure() -> None:
    """muon's AdamW part (non-matrix leaves) keeps the fused donated path through partition
    (without Nesterov: optax's default muon sends the other leaves through NAdamW, which has no kernel)."""
    assert optim.muon(1e-2).donated_update is None
    tx = optim.muon(1e-2, adam_weight_decay=0.1, nesterov=False)
    assert tx.donated_update is not None
    p0 = _params()
    pure_p, pure_s = _run_pure(tx, p0, 5)
    don_p, don_s = _run_donated(tx, p0, 5)
    assert tree.allclose(pure_p, don_p, rtol=1e-5, atol=1e-6)
    assert tree.allclose(pure_s, don_s, rtol=1e-5, atol=1e-6)


def test_chain_donated_path_clips_the_donated_gradients_in_place():
    # chain's donated path runs clip_by_global_norm's inplace_update: the gradients are scaled
    # where they lie (no second gradient-sized buffer) and the result equals the pure path.
    params = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    grads = {"w": torch.randn(4, 3) * 10, "b": torch.randn(3) * 10}
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    pure_updates, pure_state = tx.update(tree.clone(grads), tx.init(params), params)
    pure_params = optim.apply_updates(params, pure_updates)
    donated_grads = tree.clone(grads)
    ptrs = [g.data_ptr() for g in tree.leaves(donated_grads)]
    new_params, new_state = tx.donated_update(donated_grads, tx.init(params), tree.clone(params))
    assert tree.allclose(new_params, pure_params, rtol=1e-6, atol=1e-7)
    assert tree.allclose(new_state, pure_state, rtol=1e-6, atol=1e-7)
    assert [g.data_ptr() for g in tree.leaves(donated_grads)] == ptrs
    assert torch.allclose(tree.global_norm(donated_grads), torch.tensor(1.0), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# clip_by_global_norm folded into the fused kernel (grad_divisor / fused_divide)
# --------------------------------------------------------------------------------------------


def _unfolded(clip: optim.GradientTransformation) -> optim.GradientTransformation:
    """The same clip without ``grad_divisor``: a donated chain then scales the gradients in a pass of their own."""
    return optim.GradientTransformation(clip.init, clip.update, inplace_update=clip.inplace_update)


RULES = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "adamw_masked_schedule": lambda: optim.adamw(lambda n: 1e-2 / (1.0 + n), weight_decay=0.1, mask=lambda name, p: p.ndim >= 2),
    "amsgrad": lambda: optim.amsgrad(1e-2, max_raw_nu=True),  # torch's rule: the one with a fused path
    "inject_lr": lambda: optim.inject_hyperparams(optim.adamw, static_args=("b1", "b2", "eps", "weight_decay"))(
        learning_rate=1e-2, weight_decay=0.1),
    # every hyperparameter a tensor: the in-place _foreach path, which divides first
    "inject_all": lambda: optim.inject_hyperparams(optim.adamw)(learning_rate=1e-2, weight_decay=0.1),
}


def _big_grads(params: dict, step: int) -> dict:
    return {k: v * 30.0 for k, v in _grads(params, step).items()}  # global norm well above the clip


@pytest.mark.parametrize("rule", sorted(RULES))
def test_clip_folded_into_the_kernel_equals_the_separate_pass(rule: str) -> None:
    clip = optim.clip_by_global_norm(1.0)
    folded, separate = optim.chain(clip, RULES[rule]()), optim.chain(_unfolded(clip), RULES[rule]())
    assert folded.donated_update is not None and RULES[rule]().fused_divide
    p0 = _params()
    p_f, s_f, p_s, s_s = tree.clone(p0), folded.init(p0), tree.clone(p0), separate.init(p0)
    p_pure, s_pure = p0, folded.init(p0)
    for t in range(5):
        grads = _big_grads(p0, t)
        g_f, g_s = tree.clone(grads), tree.clone(grads)
        p_f, s_f = folded.donated_update(g_f, s_f, p_f)
        p_s, s_s = separate.donated_update(g_s, s_s, p_s)
        # float32: the kernel divides by the same float32 divisor the separate pass divides by.
        assert tree.allclose(p_f, p_s, rtol=0, atol=0) and tree.allclose(s_f, s_s, rtol=0, atol=0)
        # the donated gradients end clipped either way (the kernel writes the quotient back)
        assert torch.allclose(tree.global_norm(g_f), torch.tensor(1.0), rtol=1e-5)
        updates, s_pure = folded.update(grads, s_pure, p_pure)
        p_pure = optim.apply_updates(p_pure, updates)
    assert tree.allclose(p_f, p_pure, rtol=1e-5, atol=1e-6)


def test_folded_clip_reaches_the_kernel_as_its_gradient_scale(monkeypatch) -> None:
    """No scaling pass over the gradients: the divisor is the kernel's grad_scale."""
    calls: list[dict] = []
    kernel = torch._fused_adamw_

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    def no_scaling_pass(*args, **kwargs):
        raise AssertionError("the gradients were scaled in a pass of their own")

    monkeypatch.setattr(torch, "_fused_adamw_", spy)
    monkeypatch.setattr(torch, "_foreach_div_", no_scaling_pass)
    monkeypatch.setattr(torch, "_foreach_mul_", no_scaling_pass)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    p0 = _params()
    grads = _big_grads(p0, 0)
    norm = tree.global_norm(grads)
    tx.donated_update(grads, tx.init(p0), tree.clone(p0))
    assert len(calls) == 1 and torch.allclose(calls[0]["grad_scale"], norm / 1.0)


def test_no_fold_without_a_kernel_or_below_the_norm() -> None:
    # Below max_norm the divisor is exactly 1: the step equals plain adamw.
    p0 = _params()
    grads = {k: v * 1e-3 for k, v in _grads(p0, 0).items()}
    clipped = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    plain = optim.adamw(1e-2, weight_decay=0.1)
    a, _ = clipped.donated_update(tree.clone(grads), clipped.init(p0), tree.clone(p0))
    b, _ = plain.donated_update(tree.clone(grads), plain.init(p0), tree.clone(p0))
    assert tree.allclose(a, b, rtol=0, atol=0)
    # A state the kernel cannot take (mixed dtypes) falls back to the generic chain, still clipped.
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
    params = {"w": torch.ones(3)}
    state = tx.init(params)
    state = (state[0], (state[1][0]._replace(nu={"w": torch.zeros(3, dtype=torch.float64)}), *state[1][1:]))
    g = {"w": torch.full((3,), 10.0)}
    new_params, _ = tx.donated_update(g, state, tree.clone(params))
    assert torch.allclose(tree.global_norm(g), torch.tensor(1.0), rtol=1e-6)
    assert not torch.equal(new_params["w"], params["w"])
