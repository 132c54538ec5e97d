"""Primitive transformations: known values, laws, and clear errors on bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import optim, random, tree
from craftfn.testing import check_pure, check_state_stable, param_trees


def _p() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}


def _g(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: optim.adam(-1e-3), r"learning_rate must be >= 0.0, got -0.001"),
        (lambda: optim.adamw(1e-3, eps=-1e-8), r"eps must be >= 0.0, got -1e-08"),
        (lambda: optim.adam(1e-3, b1=1.0), r"b1 must be < 1.0, got 1.0"),
        (lambda: optim.adam(1e-3, b2=-0.1), r"b2 must be >= 0.0, got -0.1"),
        (lambda: optim.nadam(1e-3, b1=1.5, momentum_decay=4e-3), r"b1 must be < 1.0"),
        (lambda: optim.radam(1e-3, eps_root=-1.0), r"eps_root must be >= 0.0"),
        (lambda: optim.rmsprop(1e-3, decay=1.0), r"decay must be < 1.0"),
        (lambda: optim.rmsprop(1e-3, eps=-1.0), r"eps must be >= 0.0"),
        (lambda: optim.adagrad(-0.1), r"learning_rate must be >= 0.0"),
        (lambda: optim.adagrad(0.1, initial_accumulator_value=-1.0), r"initial_accumulator_value must be >= 0.0"),
        (lambda: optim.lion(1e-4, b2=1.0), r"b2 must be < 1.0"),
        (lambda: optim.adadelta(1.0, rho=-0.5), r"rho must be >= 0.0"),
        (lambda: optim.adamax(1e-3, b1=2.0), r"b1 must be < 1.0"),
        (lambda: optim.amsgrad(1e-3, eps=-1.0), r"eps must be >= 0.0"),
        (lambda: optim.lamb(-1.0), r"learning_rate must be >= 0.0"),
        (lambda: optim.muon(1e-3, beta=1.0), r"beta must be < 1.0"),
        (lambda: optim.muon(1e-3, ns_dtype=torch.int8), r"ns_dtype must be None or a floating torch.dtype.*got torch.int8"),
        (lambda: optim.radam(1e-3, rectification_dtype=torch.float16), r"rectification_dtype must be torch.float32.*got torch.float16"),
        (lambda: optim.schedule_free_adamw(1e-3, b1=0.0), r"b1 must be > 0.0"),
        (lambda: optim.clip_by_global_norm(0.0), r"max_norm must be > 0.0"),
        (lambda: optim.ema(1.2), r"decay must be < 1.0"),
        (lambda: optim.add_decayed_weights(-0.1), r"weight_decay must be >= 0.0"),
    ],
)
def test_bad_hyperparameters_raise_value_error_naming_them(factory, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        factory()


ALL = {
    "adam": lambda: optim.adam(1e-3),
    "adamw": lambda: optim.adamw(1e-3),
    "amsgrad": lambda: optim.amsgrad(1e-3),
    "nadam_torch": lambda: optim.nadam(1e-3, momentum_decay=4e-3),
    "rmsprop": lambda: optim.rmsprop(1e-3),
    "scale_by_adam": lambda: optim.scale_by_adam(),
    "scale_by_lion": lambda: optim.scale_by_lion(),
    "trace": lambda: optim.trace(0.9),
    "muon": lambda: optim.muon(1e-3),
    "schedule_free_adamw": lambda: optim.schedule_free_adamw(1e-3),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_update_before_init_is_a_clear_error(name: str) -> None:
    tx = ALL[name]()
    with pytest.raises(ValueError, match=r"init"):
        tx.update(_g(), None, _p())


@pytest.mark.parametrize("name", sorted(ALL))
def test_updates_with_another_tree_are_rejected(name: str) -> None:
    tx = ALL[name]()
    state = tx.init(_p())
    with pytest.raises(ValueError, match=r"tree|structure|label"):
        tx.update({"w": torch.ones(5, 4), "other": torch.ones(4)}, state, {"w": torch.ones(5, 4), "other": torch.ones(4)})


def test_donated_update_with_another_tree_is_rejected() -> None:
    tx = optim.adamw(1e-3)
    state = tx.init(_p())
    with pytest.raises(ValueError, match=r"tree structure"):
        tx.donated_update({"w": torch.ones(5, 4)}, state, {"w": torch.ones(5, 4)})


# ----------------------------------------------------------------------------- known values and laws


def test_scale_by_adam_nesterov_is_optax_nadam() -> None:
    b1, b2, eps = 0.9, 0.99, 1e-8
    tx = optim.scale_by_adam(b1, b2, eps, nesterov=True)
    g1, g2 = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    s = tx.init({"w": torch.zeros(2)})
    _, s = tx.update({"w": g1}, s)
    u, s = tx.update({"w": g2}, s)
    mu = b1 * (1 - b1) * g1 + (1 - b1) * g2
    nu = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
    mu_hat = b1 * mu / (1 - b1**3) + (1 - b1) * g2 / (1 - b1**2)
    expected = mu_hat / (torch.sqrt(nu / (1 - b2**2)) + eps)
    assert torch.allclose(u["w"], expected, rtol=1e-5)


def test_radam_uses_momentum_until_rectification_is_tractable() -> None:
    tx = optim.scale_by_radam(b1=0.9, b2=0.999)
    s = tx.init({"w": torch.zeros(2)})
    g = torch.tensor([1.0, -3.0])
    for _ in range(1, 5):  # rho_t < 5 for the first steps with b2 = 0.999
        u, s = tx.update({"w": g}, s)
        assert torch.allclose(u["w"], g, rtol=1e-5)  # bias-corrected mean of a constant gradient


def test_amsgrad_keeps_a_running_maximum() -> None:
    tx = optim.scale_by_amsgrad(b2=0.5)
    s = tx.init({"w": torch.zeros(1)})
    _, s = tx.update({"w": torch.tensor([4.0])}, s)
    before = s.nu_max["w"].clone()
    _, s = tx.update({"w": torch.tensor([0.0])}, s)
    assert torch.equal(s.nu_max["w"], before) and bool(s.nu["w"] < before)


def test_ema_debiased_of_a_constant_is_the_constant() -> None:
    tx = optim.ema(0.9)
    s = tx.init({"w": torch.zeros(3)})
    for _ in range(4):
        u, s = tx.update({"w": torch.full((3,), 2.0)}, s)
        assert torch.allclose(u["w"], torch.full((3,), 2.0))


def test_rms_and_stddev_first_steps() -> None:
    g = {"w": torch.tensor([3.0, -4.0])}
    u, _ = optim.scale_by_rms(decay=0.9, eps=0.0, bias_correction=True).update(g, optim.scale_by_rms(bias_correction=True).init(g))
    assert torch.allclose(u["w"], torch.tensor([1.0, -1.0]))
    tx = optim.scale_by_stddev(decay=0.5, eps=0.0, initial_scale=1.0)
    u, s = tx.update(g, tx.init(g))
    # nu = 0.5 + 0.5 g^2, mu = 0.5 g: var = 0.5 + 0.25 g^2
    assert torch.allclose(u["w"], g["w"] / torch.sqrt(0.5 + 0.25 * g["w"] ** 2))


def test_rss_is_zero_where_nothing_accumulated() -> None:
    tx = optim.scale_by_rss(initial_accumulator_value=0.0, eps=0.0)
    u, _ = tx.update({"w": torch.tensor([0.0, 2.0])}, tx.init({"w": torch.zeros(2)}))
    assert torch.equal(u["w"], torch.tensor([0.0, 1.0]))


def test_lion_known_values() -> None:
    tx = optim.scale_by_lion(b1=0.9, b2=0.5)
    s = tx.init({"w": torch.zeros(2)})
    u, s = tx.update({"w": torch.tensor([2.0, -1.0])}, s)
    assert torch.equal(u["w"], torch.tensor([1.0, -1.0])) and torch.allclose(s.mu["w"], torch.tensor([1.0, -0.5]))
    u, s = tx.update({"w": torch.tensor([-1.0, -1.0])}, s)
    # sign(0.1 * g + 0.9 * mu) = sign([-0.1 + 0.9, -0.1 - 0.45])
    assert torch.equal(u["w"], torch.tensor([1.0, -1.0]))


def test_factored_rms_of_a_constant_gradient() -> None:
    tx = optim.scale_by_factored_rms(min_dim_size_to_factor=4, epsilon=0.0)
    g = {"w": torch.full((6, 5), 2.0), "b": torch.full((5,), 2.0)}
    u, s = tx.update(g, tx.init(g))
    # Factored: rows and columns all see g^2 = 4, so the update is g / sqrt(4) = 1; unfactored the same.
    assert torch.allclose(u["w"], torch.ones(6, 5)) and torch.allclose(u["b"], torch.ones(5))
    assert s.v_row["w"].shape == (5,) and s.v_col["w"].shape == (6,) and int(s.count) == 1


def test_trust_ratio_and_param_block_rms() -> None:
    p = {"w": torch.tensor([3.0, 4.0]), "z": torch.zeros(2)}
    u = {"w": torch.tensor([0.6, 0.8]), "z": torch.ones(2)}
    out, _ = optim.scale_by_trust_ratio().update(u, optim.scale_by_trust_ratio().init(p), p)
    assert torch.allclose(out["w"], torch.tensor([3.0, 4.0])) and torch.equal(out["z"], torch.ones(2))  # zero param norm: ratio 1
    out, _ = optim.scale_by_param_block_rms(min_scale=0.5).update(u, optim.ScaleByParamBlockRMSState(), p)
    assert torch.allclose(out["w"], u["w"] * math.sqrt(12.5)) and torch.allclose(out["z"], 0.5 * u["z"])


def test_add_decayed_weights_mask_callable_by_name() -> None:
    tx = optim.add_decayed_weights(0.5, mask=lambda name, p: name == "w")
    p = _p()
    out, _ = tx.update(tree.zeros_like(p), tx.init(p), p)
    assert torch.allclose(out["w"], 0.5 * p["w"]) and torch.equal(out["b"], torch.zeros(4))


def test_add_noise_is_a_pure_function_of_the_state() -> None:
    tx = optim.add_noise(eta=1.0, gamma=0.55, seed=random.key(3))
    params = {"w": torch.zeros(200, 50)}
    s = tx.init(params)
    a, s1 = tx.update(tree.zeros_like(params), s, params)
    b, _ = tx.update(tree.zeros_like(params), s, params)
    c, _ = tx.update(tree.zeros_like(params), s1, params)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    assert abs(float(a["w"].std()) - 1.0) < 0.05  # variance eta / 1**gamma at the first step
    assert abs(float(c["w"].std()) - math.sqrt(1.0 / 2**0.55)) < 0.05


def test_clipping_rules() -> None:
    u = {"w": torch.tensor([[3.0, -4.0], [0.0, 0.1]]), "b": torch.tensor([10.0, -10.0])}
    out, _ = optim.clip(1.0).update(u, optim.clip(1.0).init(None))
    assert float(tree.leaves(tree.map(lambda x: x.abs().max(), out))[0]) <= 1.0
    out, _ = optim.clip_by_block_rms(1.0).update(u, optim.clip_by_block_rms(1.0).init(None))
    assert torch.allclose(out["b"], torch.tensor([1.0, -1.0]))
    p = {"w": torch.tensor([[1.0, 0.0], [0.0, 100.0]]), "b": torch.tensor([1.0, 1.0])}
    out, _ = optim.adaptive_grad_clip(0.1).update(u, optim.adaptive_grad_clip(0.1).init(p), p)
    assert torch.allclose(out["w"][0], torch.tensor([0.06, -0.08]), atol=1e-6)  # row norm 5 clipped to 0.1 * 1
    assert torch.allclose(out["w"][1], u["w"][1])  # row norm 0.1 < 0.1 * 100: unchanged
    assert torch.allclose(out["b"].norm(), torch.tensor(0.1 * math.sqrt(2)), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(params=param_trees(dtypes=(torch.float32,)), max_norm=st.floats(0.01, 10.0))
def test_clip_by_global_norm_law(params, max_norm: float) -> None:
    tx = optim.clip_by_global_norm(max_norm)
    out, _ = tx.update(params, tx.init(params))
    n_in, n_out = float(tree.global_norm(params)), float(tree.global_norm(out))
    assert n_out <= max_norm * (1 + 1e-5) + 1e-6
    if n_in <= max_norm:
        assert tree.allclose(out, params)
    else:
        assert abs(n_out - max_norm) <= 1e-4 * max_norm


def test_zero_nans_centralize_nonnegative_set_to_zero_stateless() -> None:
    u = {"w": torch.tensor([[1.0, float("nan")], [2.0, 4.0]])}
    out, s = optim.zero_nans().update(u, optim.zero_nans().init(u))
    assert torch.equal(out["w"], torch.tensor([[1.0, 0.0], [2.0, 4.0]])) and bool(s.found_nan["w"])
    out, _ = optim.centralize().update(out, optim.centralize().init(None))
    assert torch.allclose(out["w"].mean(dim=1), torch.zeros(2))
    p = {"w": torch.tensor([1.0, 2.0])}
    out, _ = optim.keep_params_nonnegative().update({"w": torch.tensor([-5.0, -1.0])}, optim.keep_params_nonnegative().init(p), p)
    assert torch.equal(optim.apply_updates(p, out)["w"], torch.tensor([0.0, 1.0]))
    out, _ = optim.set_to_zero().update(p, optim.set_to_zero().init(p))
    assert torch.equal(out["w"], torch.zeros(2))
    tx = optim.stateless(lambda upd, params: tree.map(lambda a, b: a * b, upd, params))
    out, _ = tx.update(p, tx.init(p), p)
    assert torch.equal(out["w"], torch.tensor([1.0, 4.0]))


PRIMITIVES = {
    "trace_nesterov": lambda: optim.trace(0.9, nesterov=True),
    "ema": lambda: optim.ema(0.9),
    "scale_by_adam_nesterov": lambda: optim.scale_by_adam(nesterov=True, eps_root=1e-8, mu_dtype=torch.float64),
    "scale_by_amsgrad": lambda: optim.scale_by_amsgrad(),
    "scale_by_nadam": lambda: optim.scale_by_nadam(),
    "scale_by_adamax": lambda: optim.scale_by_adamax(),
    "scale_by_radam": lambda: optim.scale_by_radam(),
    "scale_by_rms": lambda: optim.scale_by_rms(bias_correction=True),
    "scale_by_stddev": lambda: optim.scale_by_stddev(bias_correction=True),
    "scale_by_rss": lambda: optim.scale_by_rss(),
    "scale_by_lion": lambda: optim.scale_by_lion(mu_dtype=torch.float64),
    "scale_by_adadelta": lambda: optim.scale_by_adadelta(),
    "scale_by_factored_rms": lambda: optim.scale_by_factored_rms(min_dim_size_to_factor=4),
    "scale_by_trust_ratio": lambda: optim.scale_by_trust_ratio(),
    "scale_by_sign": lambda: optim.scale_by_sign(),
    "add_noise": lambda: optim.add_noise(0.1, 0.55, seed=0),
    "clip": lambda: optim.clip(0.5),
    "clip_by_block_rms": lambda: optim.clip_by_block_rms(0.5),
    "adaptive_grad_clip": lambda: optim.adaptive_grad_clip(0.1),
    "zero_nans": lambda: optim.zero_nans(),
    "centralize": lambda: optim.centralize(),
    "keep_params_nonnegative": lambda: optim.keep_params_nonnegative(),
    "scale_by_muon": lambda: optim.scale_by_muon(),
}


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitives_are_pure_and_state_stable(name: str) -> None:
    params = {"w": torch.randn(5, 4, generator=torch.Generator().manual_seed(0))}
    if name != "scale_by_muon":
        params["b"] = torch.randn(4, generator=torch.Generator().manual_seed(1))
    grads = tree.map(lambda x: x * 0.5 + 0.1, params)
    check_pure(PRIMITIVES[name](), params, grads, steps=2)
    check_state_stable(PRIMITIVES[name](), params, steps=2)
