"""craftfn.optim computes what optax computes: 50-step trajectories against optax's own (fp32).

The reference trajectories were made by optax itself (tests/optim/reference/make_optax_reference.py,
run in a side environment with jax and optax; the versions are stored in the file). Each case is
written once, against an optimizer namespace ``ox``, and run here with ``ox = craftfn.optim``: the
same names, the same arguments. Parameters are compared at the stored steps: for every leaf,
``max |craftfn - optax| <= 1e-5 * max |optax|`` (relative to the leaf's scale).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import numpy as np
import pytest
import torch

from craftfn import optim

HERE = pathlib.Path(__file__).resolve().parent / "reference"
_spec = importlib.util.spec_from_file_location("optax_cases", HERE / "optax_cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

REFERENCE = np.load(HERE / "optax_reference.npz")
META = json.loads(bytes(REFERENCE["__meta__"]).decode())
RTOL = 1e-5


def trajectory(case: str) -> np.ndarray:
    """Run ``case`` with craftfn.optim; the flattened parameters at each snapshot step."""
    build, extras = cases.CASES[case]
    tx = build(optim)
    params = {k: torch.from_numpy(v) for k, v in cases.initial_params().items()}
    state = tx.init(params)
    rows = []
    for step in range(cases.STEPS):
        value, grads = cases.value_and_grad({k: v.numpy() for k, v in params.items()}, step)
        if "per_example" in extras:
            grads = cases.per_example(grads)
        kwargs = {"value": torch.tensor(value, dtype=torch.float32)} if "value" in extras else {}
        updates, state = tx.update({k: torch.from_numpy(v) for k, v in grads.items()}, state, params, **kwargs)
        params = optim.apply_updates(params, updates)
        if step + 1 in cases.SNAPSHOTS:
            rows.append(cases.flatten({k: v.numpy() for k, v in params.items()}))
    return np.stack(rows)


def test_reference_covers_every_case() -> None:
    assert META["cases"] == list(cases.CASES), "regenerate optax_reference.npz (make_optax_reference.py)"
    assert list(META["snapshots"]) == list(cases.SNAPSHOTS)


def leaf_relative_error(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per snapshot and leaf: ``max |ours - ref| / max |ref|`` over the leaf's elements.

    The error is relative to each leaf's scale rather than to each element: an element crossing
    zero has no meaningful relative error of its own (1e-7 of rounding is "100%" there).
    """
    out = np.zeros((ref.shape[0], len(cases.SHAPES)))
    for row in range(ref.shape[0]):
        a, b = cases.unflatten(ours[row]), cases.unflatten(ref[row])
        for j, k in enumerate(cases.SHAPES):
            scale = max(float(np.max(np.abs(b[k]))), 1e-30)
            out[row, j] = float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) / scale
    return out


# Measured gaps, kept visible: each case must still fail (strict), so a fix shows up.
KNOWN_GAPS = {
    # optax computes RAdam's rectification rho_t = rho_inf - 2 t b2^t / (1 - b2^t) in float32, where
    # 1 - b2^t loses ~5 digits early on; craftfn computes it in float64, as torch.optim.RAdam does
    # (and the torch-parity test holds it to that). Measured: 3.1e-5 leaf-relative at step 50.
    "radam": "optax's float32 rectification term (3.1e-5 at step 50)",
    "radam/nesterov": "optax's float32 rectification term (3.1e-5 at step 50)",
}


def _case_param(case: str) -> object:
    if case in KNOWN_GAPS:
        return pytest.param(case, marks=pytest.mark.xfail(reason=KNOWN_GAPS[case], strict=True))
    return case


@pytest.mark.parametrize("case", [_case_param(c) for c in cases.CASES])
def test_trajectory_equals_optax(case: str) -> None:
    ours, ref = trajectory(case), REFERENCE[case]
    assert ours.shape == ref.shape
    err = leaf_relative_error(ours, ref)
    if not (err <= RTOL).all():  # also fails on NaN
        row, col = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        pytest.fail(
            f"{case}: differs from optax {META['optax']} at step {cases.SNAPSHOTS[row]}, leaf {list(cases.SHAPES)[col]!r}: "
            f"max |diff| / max |optax| = {err[row, col]:.3g} > {RTOL:g}"
        )


def test_noise_of_noisy_sgd_and_dpsgd_has_optax_law() -> None:
    """The noise is craftfn's (keys), so the trajectories above compare eta=0 / noise_multiplier=0; here the
    noise itself: zero mean and optax's variance (eta / t^gamma; (clip * multiplier / batch)^2)."""
    zeros = {"w": torch.zeros(20000)}
    tx = optim.noisy_sgd(1.0, eta=0.5, gamma=0.55, key=0)
    state = tx.init(zeros)
    for t in (1, 2, 3):
        updates, state = tx.update(zeros, state)
        sample = -updates["w"]
        assert abs(float(sample.mean())) < 0.02
        assert float(sample.var()) == pytest.approx(0.5 / t**0.55, rel=0.05)
    tx = optim.contrib.dpsgd(1.0, l2_norm_clip=2.0, noise_multiplier=0.5, seed=0)
    updates, _ = tx.update({"w": torch.zeros(4, 20000)}, tx.init(zeros))
    assert float(updates["w"].var()) == pytest.approx((2.0 * 0.5 / 4) ** 2, rel=0.05)
