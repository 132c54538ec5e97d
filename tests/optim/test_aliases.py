"""Every named optimizer (optax's core and contrib aliases) converges on a quadratic and on Rosenbrock,
keeps its state stable, and is pure."""

from __future__ import annotations

import pytest
import torch

from craftfn import optim, tree
from craftfn.optim import contrib
from craftfn.testing import check_injected_equivalent, check_pure, check_state_stable


def quadratic(p: dict) -> torch.Tensor:
    w = p["w"]
    curvature = torch.arange(1, w.numel() + 1, dtype=w.dtype).reshape(w.shape) * (4.0 / w.numel())
    return 0.5 * (curvature * w * w).sum()


def rosenbrock(p: dict) -> torch.Tensor:
    x, y = p["xy"][0], p["xy"][1]
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def minimise(tx: optim.GradientTransformation, f, params: dict, steps: int) -> float:
    state = tx.init(params)
    for _ in range(steps):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        value = f(leaves)
        grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))
        # value= is the loss, for the rules that read it (polyak_sgd, momo, reduce_on_plateau); others ignore it.
        updates, state = tx.update(grads, state, params, value=value.detach())
        params = optim.apply_updates(params, updates)
    return float(f(params))


# dpsgd takes per-example gradients (a leading batch axis): a batch of one here.
BATCH_OF_ONE = optim.stateless(lambda u, p: tree.map(lambda g: g.unsqueeze(0), u))


def decay(lr: float, rate: float):
    return lambda n: lr * rate**n


# alias -> (factory for the quadratic, factory for Rosenbrock). Learning rates were picked per
# rule (sign-based rules and Adadelta need a decaying step to settle).
ALIASES = {
    "sgd": (lambda: optim.sgd(0.1, momentum=0.9), lambda: optim.sgd(1e-3, momentum=0.9)),
    "adam": (lambda: optim.adam(0.1), lambda: optim.adam(0.05)),
    "adamw": (lambda: optim.adamw(0.1), lambda: optim.adamw(0.05)),
    "nadam": (lambda: optim.nadam(0.1), lambda: optim.nadam(0.05)),
    "nadam_torch": (lambda: optim.nadam(0.1, momentum_decay=4e-3), lambda: optim.nadam(0.02, momentum_decay=4e-3)),
    "nadamw": (lambda: optim.nadamw(0.1), lambda: optim.nadamw(0.05, weight_decay=1e-5)),
    "radam": (lambda: optim.radam(0.1), lambda: optim.radam(0.05)),
    "adamax": (lambda: optim.adamax(0.1), lambda: optim.adamax(0.05)),
    "amsgrad": (lambda: optim.amsgrad(0.1), lambda: optim.amsgrad(0.05)),
    "lion": (lambda: optim.lion(decay(0.1, 0.98), weight_decay=0.0), lambda: optim.lion(decay(0.01, 0.995), weight_decay=0.0)),
    "rmsprop": (lambda: optim.rmsprop(decay(0.05, 0.98)), lambda: optim.rmsprop(decay(0.01, 0.997), momentum=0.9)),
    "rmsprop_centered": (lambda: optim.rmsprop(decay(0.05, 0.98), centered=True), lambda: optim.rmsprop(decay(0.01, 0.997), centered=True, momentum=0.9)),
    "adagrad": (lambda: optim.adagrad(0.5), lambda: optim.adagrad(1.0)),
    "adadelta": (lambda: optim.adadelta(0.5, rho=0.95, eps=1e-3), lambda: optim.adadelta(decay(0.5, 0.997), rho=0.95, eps=1e-3)),
    "adafactor": (
        lambda: optim.adafactor(decay(0.1, 0.98), multiply_by_parameter_scale=False),
        lambda: optim.adafactor(decay(0.05, 0.997), multiply_by_parameter_scale=False, momentum=0.9),
    ),
    "lamb": (lambda: optim.lamb(0.05), lambda: optim.lamb(decay(0.05, 0.997))),
    "lars": (lambda: optim.lars(1.0, trust_coefficient=0.1), lambda: optim.lars(1.0, trust_coefficient=0.01)),
    "sign_sgd": (lambda: optim.sign_sgd(decay(0.1, 0.99)), lambda: optim.sign_sgd(decay(0.01, 0.997))),
    "muon": (lambda: optim.muon(decay(0.1, 0.98)), lambda: optim.muon(0.05)),
    "schedule_free_adamw": (lambda: optim.schedule_free_adamw(0.1, warmup_steps=10), lambda: optim.schedule_free_adamw(0.05, warmup_steps=10)),
    # optax's other core aliases
    "adabelief": (lambda: optim.adabelief(0.1), lambda: optim.adabelief(0.05)),
    "adamaxw": (lambda: optim.adamaxw(0.1, weight_decay=0.0), lambda: optim.adamaxw(0.05, weight_decay=0.0)),
    "adan": (lambda: optim.adan(0.1), lambda: optim.adan(0.05)),
    "fromage": (lambda: optim.fromage(0.1), lambda: optim.fromage(decay(0.1, 0.995))),
    # Without a line search L-BFGS reaches the quadratic's minimum in ~15 steps; past it the curvature
    # pairs are rounding noise (as in optax), so it runs 20 steps there.
    "lbfgs": (lambda: optim.lbfgs(), lambda: optim.lbfgs(learning_rate=0.1), 20),
    "noisy_sgd": (lambda: optim.noisy_sgd(0.1, eta=1e-4, key=0), lambda: optim.noisy_sgd(1.8e-3, eta=1e-8, key=0)),
    "novograd": (lambda: optim.novograd(0.1), lambda: optim.novograd(decay(0.05, 0.997))),
    "optimistic_gradient_descent": (lambda: optim.optimistic_gradient_descent(0.1), lambda: optim.optimistic_gradient_descent(1.8e-3, beta=0.1)),
    "optimistic_adam": (lambda: optim.optimistic_adam(0.05), lambda: optim.optimistic_adam(0.02)),
    "optimistic_adam_v2": (lambda: optim.optimistic_adam_v2(0.05), lambda: optim.optimistic_adam_v2(0.02)),
    "polyak_sgd": (lambda: optim.polyak_sgd(), lambda: optim.polyak_sgd(max_learning_rate=0.01)),
    "rprop": (lambda: optim.rprop(1e-2), lambda: optim.rprop(1e-3)),
    "signum": (lambda: optim.signum(decay(0.1, 0.99)), lambda: optim.signum(decay(0.01, 0.997))),
    "sm3": (lambda: optim.sm3(1.0), lambda: optim.sm3(0.1)),
    "yogi": (lambda: optim.yogi(0.1), lambda: optim.yogi(0.05)),
    # optax.contrib
    # ACProp divides by the previous second moment: Rosenbrock's y gradient is 0 at the start, so eps_root keeps it bounded.
    "contrib.acprop": (lambda: contrib.acprop(0.1), lambda: contrib.acprop(5e-3, eps_root=1e-4)),
    "contrib.ademamix": (lambda: contrib.ademamix(0.05, b3=0.99, alpha=2.0), lambda: contrib.ademamix(0.02, b3=0.99, alpha=2.0)),
    "contrib.simplified_ademamix": (lambda: contrib.simplified_ademamix(1e-2, b1=0.9), lambda: contrib.simplified_ademamix(5e-3, b1=0.9)),
    "contrib.adopt": (lambda: contrib.adopt(0.1), lambda: contrib.adopt(0.05)),
    "contrib.cocob": (lambda: contrib.cocob(), lambda: contrib.cocob(alpha=1.0)),
    "contrib.dadapt_adamw": (lambda: contrib.dadapt_adamw(), lambda: contrib.dadapt_adamw()),
    "contrib.dog": (lambda: contrib.dog(), lambda: contrib.dog()),
    "contrib.dowg": (lambda: contrib.dowg(), lambda: contrib.dowg(learning_rate=0.5)),
    "contrib.prodigy": (lambda: contrib.prodigy(), lambda: contrib.prodigy()),
    "contrib.mechanize": (lambda: contrib.mechanize(optim.adam(0.1)), lambda: contrib.mechanize(optim.adam(0.05))),
    "contrib.momo": (lambda: contrib.momo(), lambda: contrib.momo(learning_rate=0.01)),
    "contrib.momo_adam": (lambda: contrib.momo_adam(learning_rate=0.1), lambda: contrib.momo_adam(learning_rate=0.05)),
    "contrib.madgrad": (lambda: contrib.madgrad(0.1), lambda: contrib.madgrad(0.01)),
    "contrib.sam": (
        lambda: contrib.sam(optim.sgd(0.1), optim.chain(contrib.normalize(), optim.sgd(0.01))),
        lambda: contrib.sam(optim.adam(0.05), optim.chain(contrib.normalize(), optim.sgd(1e-3))),
    ),
    "contrib.schedule_free_sgd": (lambda: contrib.schedule_free_sgd(0.2), lambda: contrib.schedule_free_sgd(3e-3, b1=0.95)),
    "contrib.dpsgd": (
        lambda: optim.chain(BATCH_OF_ONE, contrib.dpsgd(0.1, l2_norm_clip=100.0, noise_multiplier=0.0, seed=0)),
        lambda: optim.chain(BATCH_OF_ONE, contrib.dpsgd(1e-3, l2_norm_clip=100.0, noise_multiplier=0.0, seed=0, momentum=0.9)),
    ),
    "contrib.reduce_on_plateau": (
        lambda: optim.chain(optim.sgd(0.1), contrib.reduce_on_plateau()),
        lambda: optim.chain(optim.sgd(1e-3, momentum=0.9), contrib.reduce_on_plateau(patience=5)),
    ),
}
ALIASES["contrib.muon"] = ALIASES["muon"]
ALIASES["contrib.schedule_free_adamw"] = ALIASES["schedule_free_adamw"]


def test_at_least_45_named_optimizers_are_covered() -> None:
    # One entry per optimizer name (nadam_torch / rmsprop_centered are variants of named ones).
    named = {n.split("_torch")[0] for n in ALIASES if n not in ("rmsprop_centered",)}
    assert len(named) >= 45, sorted(named)
    for name in named:
        module = contrib if name.startswith("contrib.") else optim
        assert callable(getattr(module, name.removeprefix("contrib."))), name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_converges_on_quadratic(name: str) -> None:
    params = {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(0))}
    start = float(quadratic(params))
    steps = ALIASES[name][2] if len(ALIASES[name]) > 2 else 300
    assert minimise(ALIASES[name][0](), quadratic, params, steps) < 1e-3 * start


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_converges_on_rosenbrock(name: str) -> None:
    params = {"xy": torch.tensor([0.0, 0.0])}  # f = 1 here; the minimum is f(1, 1) = 0
    assert minimise(ALIASES[name][1](), rosenbrock, params, 1000) < 5e-2


def _params(dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(4, 3, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype), "s": torch.randn((), generator=g).to(dtype)}


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_pure_and_state_stable(name: str) -> None:
    tx = ALIASES[name][0]()
    params = _params()
    grads = tree.map(lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel())), params)
    value = torch.tensor(2.0)  # the loss, for the rules that read it
    check_pure(tx, params, grads, steps=2, value=value)
    check_state_stable(tx, params, steps=3, value=value)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_bf16_params_stay_bf16(name: str) -> None:
    tx = ALIASES[name][0]()
    params = _params(torch.bfloat16)
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update(tree.ones_like(params), state, params, value=torch.tensor(2.0))
        params = optim.apply_updates(params, updates)
    assert all(x.dtype == torch.bfloat16 for x in tree.leaves(params))
    assert all(x.dtype == torch.bfloat16 for x in tree.leaves(updates))
    check_state_stable(tx, params, steps=2, value=torch.tensor(2.0))


def test_adafactor_factors_large_matrices() -> None:
    tx = optim.adafactor(1e-2)
    params = {"w": torch.randn(130, 128), "b": torch.randn(128)}
    state = tx.init(params)
    assert state[0].v_row["w"].shape == (128,) and state[0].v_col["w"].shape == (130,)  # means over dim 0 and dim 1
    assert state[0].v["b"].shape == (128,)
    check_state_stable(tx, params, steps=2)


def test_muon_routes_matrices_through_newton_schulz() -> None:
    tx = optim.muon(1.0, adam_weight_decay=0.0, nesterov=False, muon_weight_dimension_numbers=optim.TORCH_LAYOUT)
    params = {"w": torch.zeros(8, 4), "b": torch.zeros(4)}
    g = {"w": torch.randn(8, 4, generator=torch.Generator().manual_seed(0)), "b": torch.ones(4)}
    updates, state = tx.update(g, tx.init(params), params)
    s = torch.linalg.svdvals(-updates["w"] / 2.0**0.5)  # scaled by sqrt(8 / 4)
    assert ((s > 0.5) & (s < 1.3)).all()
    assert torch.allclose(updates["b"], -torch.ones(4), atol=1e-4)  # adam's first step: -lr * sign(g)
    assert isinstance(state.inner_states["muon"][0], optim.MuonState)


def test_schedule_free_eval_params() -> None:
    tx = optim.schedule_free_adamw(0.1, warmup_steps=2)
    params = {"w": torch.randn(3, generator=torch.Generator().manual_seed(0))}
    state = tx.init(params)
    for _ in range(5):
        updates, state = tx.update(tree.map(lambda w: 2 * w, params), state, params)
        params = optim.apply_updates(params, updates)
    x = optim.schedule_free_eval_params(state, params)
    b1 = 0.9
    assert torch.allclose(x["w"], (params["w"] - (1 - b1) * state.z["w"]) / b1)
    # y is the interpolation of x and z
    assert torch.allclose(params["w"], b1 * x["w"] + (1 - b1) * state.z["w"], atol=1e-6)
    with pytest.raises(ValueError, match="ScheduleFreeState"):
        optim.schedule_free_eval_params(optim.adam(0.1).init(params), params)


INJECTABLE = {
    "sgd": (optim.sgd, {"learning_rate": 0.1, "momentum": 0.9}),
    "sgd_nesterov": (optim.sgd, {"learning_rate": 0.1, "momentum": 0.9, "nesterov": True}),
    "adam": (optim.adam, {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6}),
    "adamw": (optim.adamw, {"learning_rate": 1e-2, "b1": 0.8, "b2": 0.99, "eps": 1e-6, "weight_decay": 0.1}),
    "amsgrad": (optim.amsgrad, {"learning_rate": 1e-2, "b2": 0.99}),
    "nadam": (optim.nadam, {"learning_rate": 1e-2, "b1": 0.8}),
    "nadam_torch": (optim.nadam, {"learning_rate": 1e-2, "b1": 0.8, "momentum_decay": 4e-3}),
    "radam": (optim.radam, {"learning_rate": 1e-2, "b2": 0.9}),
    "adamax": (optim.adamax, {"learning_rate": 1e-2, "b1": 0.8, "eps": 1e-6}),
    "lion": (optim.lion, {"learning_rate": 1e-3, "b1": 0.8, "b2": 0.9, "weight_decay": 0.1}),
    "rmsprop": (optim.rmsprop, {"learning_rate": 1e-2, "decay": 0.8, "eps": 1e-6, "momentum": 0.5}),
    "rmsprop_centered": (optim.rmsprop, {"learning_rate": 1e-2, "decay": 0.8, "centered": True, "eps_in_sqrt": False}),
    "adagrad": (optim.adagrad, {"learning_rate": 1e-2, "initial_accumulator_value": 0.1, "eps": 1e-6}),
    "adadelta": (optim.adadelta, {"learning_rate": 0.5, "rho": 0.8, "eps": 1e-4, "weight_decay": 0.01}),
    "lamb": (optim.lamb, {"learning_rate": 1e-2, "b1": 0.8, "weight_decay": 0.1}),
    "lars": (optim.lars, {"learning_rate": 0.1, "weight_decay": 0.01, "momentum": 0.8}),
    "sign_sgd": (optim.sign_sgd, {"learning_rate": 1e-2}),
    "muon": (optim.muon, {"learning_rate": 1e-2, "beta": 0.9}),
}


@pytest.mark.parametrize("name", sorted(INJECTABLE))
def test_tensor_hyperparameters_give_the_same_rule(name: str) -> None:
    """inject_hyperparams hands the factory 0-d tensors; every alias must take them (no host reads)."""
    factory, hparams = INJECTABLE[name]
    check_injected_equivalent(factory, params=_params(), steps=3, rtol=1e-5, atol=1e-6, **hparams)
