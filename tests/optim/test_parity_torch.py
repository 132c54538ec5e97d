"""Trajectories of craftfn's aliases equal torch.optim's over 200 steps (fp32, rtol 1e-5).

Each case names the optax-style arguments that select torch's variant of the rule
(``rmsprop(eps_in_sqrt=False)``, ``adagrad(initial_accumulator_value=0.0, eps_in_sqrt=False)``,
``nadam(momentum_decay=...)``, ``amsgrad(max_raw_nu=True)``). Hypothesis draws the hyperparameters and the shapes;
both optimizers see the same seeded random gradients and the params are compared every step.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from craftfn import optim
from craftfn.testing import check_matches_torch

topt = torch.optim
STEPS = 200

shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=2).map(tuple), min_size=1, max_size=3)
lrs = st.sampled_from([1e-3, 3e-3, 1e-2])
b1s = st.sampled_from([0.0, 0.5, 0.9])
b2s = st.sampled_from([0.9, 0.99, 0.999])
epss = st.sampled_from([1e-8, 1e-6, 1e-3])
wds = st.sampled_from([0.0, 1e-2, 0.1])
moms = st.sampled_from([0.5, 0.9, 0.99])
decays = st.sampled_from([0.9, 0.99])


def _params(shape_list: list[tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g) for i, s in enumerate(shape_list)}


# name -> hyperparameter strategy, craftfn factory, torch factory
CASES = {
    "sgd_momentum": (
        st.fixed_dictionaries({"lr": lrs, "m": moms}),
        lambda h: optim.sgd(h["lr"], momentum=h["m"]),
        lambda h: lambda ps: topt.SGD(ps, lr=h["lr"], momentum=h["m"]),
    ),
    "sgd_nesterov": (
        st.fixed_dictionaries({"lr": lrs, "m": moms}),
        lambda h: optim.sgd(h["lr"], momentum=h["m"], nesterov=True),
        lambda h: lambda ps: topt.SGD(ps, lr=h["lr"], momentum=h["m"], nesterov=True),
    ),
    "adam": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": epss}),
        lambda h: optim.adam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"]),
        lambda h: lambda ps: topt.Adam(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"]),
    ),
    "adamw": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": epss, "wd": wds}),
        lambda h: optim.adamw(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["wd"]),
        lambda h: lambda ps: topt.AdamW(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], weight_decay=h["wd"]),
    ),
    "amsgrad": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": epss}),
        lambda h: optim.amsgrad(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], max_raw_nu=True),
        lambda h: lambda ps: topt.Adam(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], amsgrad=True),
    ),
    "nadam": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": epss, "psi": st.sampled_from([4e-3, 1e-2, 0.0])}),
        lambda h: optim.nadam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"], momentum_decay=h["psi"]),
        lambda h: lambda ps: topt.NAdam(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"], momentum_decay=h["psi"]),
    ),
    "nadamw": (
        st.fixed_dictionaries({"lr": lrs, "wd": wds}),
        lambda h: optim.nadamw(h["lr"], weight_decay=h["wd"], momentum_decay=4e-3),
        lambda h: lambda ps: topt.NAdam(ps, lr=h["lr"], weight_decay=h["wd"], decoupled_weight_decay=True),
    ),
    "radam": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": st.sampled_from([1e-8, 1e-7])}),
        lambda h: optim.radam(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"]),
        lambda h: lambda ps: topt.RAdam(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"]),
    ),
    "adamax": (
        st.fixed_dictionaries({"lr": lrs, "b1": b1s, "b2": b2s, "eps": epss}),
        lambda h: optim.adamax(h["lr"], b1=h["b1"], b2=h["b2"], eps=h["eps"]),
        lambda h: lambda ps: topt.Adamax(ps, lr=h["lr"], betas=(h["b1"], h["b2"]), eps=h["eps"]),
    ),
    "adagrad": (
        st.fixed_dictionaries({"lr": lrs, "init": st.sampled_from([0.0, 0.1]), "eps": st.sampled_from([1e-10, 1e-6])}),
        lambda h: optim.adagrad(h["lr"], initial_accumulator_value=h["init"], eps=h["eps"], eps_in_sqrt=False),
        lambda h: lambda ps: topt.Adagrad(ps, lr=h["lr"], initial_accumulator_value=h["init"], eps=h["eps"]),
    ),
    "rmsprop": (
        st.fixed_dictionaries({"lr": lrs, "d": decays, "eps": epss}),
        lambda h: optim.rmsprop(h["lr"], decay=h["d"], eps=h["eps"], eps_in_sqrt=False),
        lambda h: lambda ps: topt.RMSprop(ps, lr=h["lr"], alpha=h["d"], eps=h["eps"]),
    ),
    "rmsprop_centered": (
        st.fixed_dictionaries({"lr": lrs, "d": decays, "eps": st.sampled_from([1e-6, 1e-3])}),
        lambda h: optim.rmsprop(h["lr"], decay=h["d"], eps=h["eps"], eps_in_sqrt=False, centered=True),
        lambda h: lambda ps: topt.RMSprop(ps, lr=h["lr"], alpha=h["d"], eps=h["eps"], centered=True),
    ),
    "rmsprop_momentum": (
        st.fixed_dictionaries({"lr": lrs, "d": decays, "eps": epss, "m": moms}),
        lambda h: optim.rmsprop(h["lr"], decay=h["d"], eps=h["eps"], eps_in_sqrt=False, momentum=h["m"]),
        lambda h: lambda ps: topt.RMSprop(ps, lr=h["lr"], alpha=h["d"], eps=h["eps"], momentum=h["m"]),
    ),
    "adadelta": (
        st.fixed_dictionaries({"lr": st.sampled_from([0.1, 1.0]), "rho": st.sampled_from([0.9, 0.95]), "eps": st.sampled_from([1e-6, 1e-4]), "wd": wds}),
        lambda h: optim.adadelta(h["lr"], rho=h["rho"], eps=h["eps"], weight_decay=h["wd"]),
        lambda h: lambda ps: topt.Adadelta(ps, lr=h["lr"], rho=h["rho"], eps=h["eps"], weight_decay=h["wd"]),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_torch(name: str) -> None:
    hparams, ours, theirs = CASES[name]

    @settings(max_examples=10, deadline=None)
    @given(h=hparams, shape_list=shapes, seed=st.integers(0, 2**16))
    def run(h: dict, shape_list: list, seed: int) -> None:
        check_matches_torch(ours(h), theirs(h), _params(shape_list, seed), steps=STEPS, rtol=1e-5, atol=1e-6, seed=seed)

    run()


def test_torch_defaults_documented_variants_match() -> None:
    """The exact argument sets the docstrings name for torch's defaults."""
    params = _params([(3, 2), (4,)], 0)
    check_matches_torch(optim.adagrad(0.01, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False), lambda ps: topt.Adagrad(ps, lr=0.01), params, steps=50)
    check_matches_torch(optim.rmsprop(0.01, decay=0.99, eps=1e-8, eps_in_sqrt=False), lambda ps: topt.RMSprop(ps, lr=0.01), params, steps=50)
    check_matches_torch(optim.nadam(0.002, momentum_decay=4e-3), lambda ps: topt.NAdam(ps, lr=0.002), params, steps=50)
    check_matches_torch(optim.adamw(0.001, weight_decay=0.01), lambda ps: topt.AdamW(ps, lr=0.001), params, steps=50)
