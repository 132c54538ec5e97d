"""optax's public names are reachable in craftfn.optim under the same module paths, except a listed few.

The list of optax's names was recorded by the reference generator (make_optax_reference.py) from
optax itself; every name is either present here or excluded below with its reason.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from craftfn import optim

META = json.loads(bytes(np.load(pathlib.Path(__file__).resolve().parent / "reference" / "optax_reference.npz")["__meta__"]).decode())
MODULES = {
    "optax": optim,
    "optax.contrib": optim.contrib,
    "optax.losses": optim.losses,
    "optax.schedules": optim.schedules,
    "optax.tree_utils": optim.tree_utils,
}

_JAX = "JAX-specific, no PyTorch counterpart needed"
_HOST = "a data-dependent loop (line search) would read values on the host every step"
_LATER = "not ported yet"
EXCLUDED = {
    "optax": {
        **dict.fromkeys(["assignment", "experimental", "perturbations", "projections", "second_order", "tree"], "a submodule outside the optimizer API: " + _LATER),
        **dict.fromkeys(["microbatch", "microbatching"], "make_train_step(accum_steps=...) splits a batch inside the step"),
        "scale_gradient": "a JAX custom-vjp trick; use a tensor hook (p.register_hook) in PyTorch",
        "value_and_grad_from_state": "serves the line searches: " + _HOST,
        **dict.fromkeys(["scale_by_backtracking_linesearch", "scale_by_zoom_linesearch", "ScaleByBacktrackingLinesearchState",
                         "ScaleByZoomLinesearchState", "ZoomLinesearchInfo"], _HOST),
        "MaskedNode": "craftfn's masks hand the inner rule a flat dict of the selected leaves (no placeholders)",
        "LookaheadParams": "craftfn's lookahead keeps the slow weights in the optimizer state",
        **dict.fromkeys(["apply_every", "ApplyEvery"], "deprecated in optax (use MultiSteps)"),
        "WrappedSchedule": _LATER,
        **dict.fromkeys(["inject_stateful_hyperparams", "InjectStatefulHyperparamsState"], _LATER),
        **dict.fromkeys(["conditionally_mask", "conditionally_transform", "ConditionallyMaskState", "ConditionallyTransformState",
                         "selective_transform", "flatten", "tree_map_params", "per_example_layer_norm_clip"], _LATER),
        **dict.fromkeys(["monitor", "MonitorState", "measure_with_ema", "snapshot", "SnapshotState"], _LATER),
        **dict.fromkeys(["matrix_inverse_pth_root", "power_iteration", "multi_normal", "nnls"], "linear algebra: torch.linalg has these"),
        **dict.fromkeys(["ctc_loss_with_forward_probs", "ntxent"], _LATER),
    },
    "optax.contrib": dict.fromkeys(
        ["GaLoreDimensionNumbers", "GaLoreState", "galore", "scale_by_galore", "HutchinsonState", "SophiaState", "sophia",
         "hutchinson_estimator_diag_hessian", "SplitRealAndImaginaryState", "split_real_and_imaginary"], _LATER),
    "optax.losses": dict.fromkeys(
        ["binary_dice_loss", "dice_loss", "multiclass_generalized_dice_loss", "make_fenchel_young_loss", "multiclass_sparsemax_loss",
         "sparsemax_loss", "ranking_softmax_loss", "ntxent", "ctc_loss_with_forward_probs"], _LATER),
    "optax.schedules": {
        **dict.fromkeys(["InjectStatefulHyperparamsState", "StatefulSchedule", "WrappedSchedule", "inject_stateful_hyperparams"], _LATER),
    },
    "optax.tree_utils": {
        **dict.fromkeys(["functools", "typing"], "modules optax's namespace leaks, not API"),
        **dict.fromkeys(["tree_random_like", "tree_split_key_like", "tree_unwrap_random_key_data"], "JAX key trees: craftfn keys live in craftfn.random"),
        **dict.fromkeys(["NamedTupleKey", "tree_batch_shape", "tree_map_params"], _LATER),
    },
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_optax_names_are_reachable(module: str) -> None:
    names = META["names"][module]
    missing = [n for n in names if not hasattr(MODULES[module], n) and n not in EXCLUDED[module]]
    assert not missing, f"{module}: names neither in craftfn nor excluded: {missing}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_exclusions_are_still_needed(module: str) -> None:
    stale = [n for n in EXCLUDED[module] if hasattr(MODULES[module], n) or n not in META["names"][module]]
    assert not stale, f"{module}: excluded names that now exist (or optax dropped): {stale}"


def test_coverage_of_optax_names() -> None:
    total = sum(len(v) for v in META["names"].values())
    present = sum(hasattr(MODULES[m], n) for m, v in META["names"].items() for n in v)
    assert present / total >= 0.8, f"{present}/{total} of optax {META['optax']}'s public names"
