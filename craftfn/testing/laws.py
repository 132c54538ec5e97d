"""Laws every update rule should satisfy, as functions that raise ``AssertionError`` with a precise message.

Call them from your own tests (with fixed inputs or under hypothesis):

- :func:`check_pure`: ``init``/``update`` never mutate their inputs; the same inputs give
  bit-identical outputs.
- :func:`check_matches_torch`: the parameter trajectory equals a ``torch.optim`` optimizer's.
- :func:`check_state_stable`: the state's structure, shapes, dtypes and devices never change
  (so a compiled step never recompiles and checkpoints stay loadable).
- :func:`check_injected_equivalent`: ``inject_hyperparams(factory)(**hp)`` equals ``factory(**hp)``.
- :func:`check_multisteps_equivalent`: ``MultiSteps(tx, k)`` over k micro-batches equals ``tx`` on
  their mean gradient.

Messages name the step, the tree (``params``, ``state``, ...), the leaf's dotted path and the
largest difference, e.g. ``check_matches_torch: step 3: params leaf 'block0.weight' differs
from torch: max abs diff 2.4e-03 (max rel 1.1e-02) > atol 1e-06 + rtol 1e-05``.

Example:
    >>> import torch
    >>> from craftfn import optim, testing
    >>> params = {"w": torch.randn(3, 2)}
    >>> testing.check_pure(optim.sgd(0.1, momentum=0.9), params, {"w": torch.ones(3, 2)})
    >>> testing.check_matches_torch(optim.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1), params, steps=5)
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from craftfn import tree
from craftfn.optim.base import GradientTransformation, apply_updates

__all__ = [
    "check_pure",
    "check_matches_torch",
    "check_state_stable",
    "check_injected_equivalent",
    "check_multisteps_equivalent",
    "default_params",
    "random_grads",
]

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# ----------------------------------------------------------------------------- helpers


def default_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A small parameter tree (a matrix, a vector, a nested block) for laws called without ``params``.

    Example:
        >>> sorted(default_params())
        ['block', 'weight']
    """
    gen = torch.Generator().manual_seed(seed)
    return {
        "weight": torch.randn(4, 3, generator=gen).to(dtype),
        "block": {"bias": torch.randn(3, generator=gen).to(dtype), "scale": torch.randn((), generator=gen).to(dtype)},
    }


def random_grads(params: Any, seed: int, scale: float = 1.0) -> Any:
    """Deterministic normal gradients with the structure, shapes and dtypes of ``params``.

    Example:
        >>> random_grads({"w": torch.zeros(2)}, seed=0)["w"].shape
        torch.Size([2])
    """
    gen = torch.Generator().manual_seed(seed)
    return tree.map(lambda p: (torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(dtype=p.dtype, device=p.device), params)


def _check_tx(tx: Any, fn: str) -> None:
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"{fn}: tx must be a craftfn.optim.GradientTransformation, got {type(tx).__name__}")


def _grads_at(grads_seq: Optional[Sequence[Any]], params: Any, step: int, seed: int) -> Any:
    if grads_seq is None:
        return random_grads(params, seed=seed * 7919 + step)
    return grads_seq[step]


def _num_steps(grads_seq: Optional[Sequence[Any]], steps: Optional[int], fn: str) -> int:
    if grads_seq is not None:
        if steps is not None and steps != len(grads_seq):
            raise ValueError(f"{fn}: steps={steps} but grads_seq has {len(grads_seq)} entries; give one of them")
        return len(grads_seq)
    if steps is None or steps < 1:
        raise ValueError(f"{fn}: give grads_seq (a list of gradient trees) or steps >= 1, got steps={steps!r}")
    return steps


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point() or t.is_complex():
        return t.contiguous().view(_INT_VIEW[t.element_size()]) if t.element_size() in _INT_VIEW else t
    return t


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    if not (a.is_floating_point() or b.is_floating_point()):
        return f"{int((a.long() - b.long()).abs().max())}" if a.numel() else "0"
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    nan_mismatch = int((torch.isnan(x) != torch.isnan(y)).sum())
    finite = torch.isfinite(x) & torch.isfinite(y)
    d = (x - y).abs()[finite]
    text = f"max abs diff {float(d.max()):.3g}" if d.numel() else "max abs diff n/a"
    if nan_mismatch:
        text += f", {nan_mismatch} NaN mismatches"
    return text


def _structure_message(expected: Any, actual: Any) -> str:
    ne, na = set(tree.paths(expected)), set(tree.paths(actual))
    missing, extra = sorted(ne - na), sorted(na - ne)
    if missing or extra:
        return f"missing leaves {missing[:6]}, unexpected leaves {extra[:6]}"
    return f"{tree.structure(expected)} vs {tree.structure(actual)}"


def _assert_bitwise(expected: Any, actual: Any, what: str) -> None:
    """Assert two trees are bit-identical (same structure, shapes, dtypes, bits; NaN equals NaN)."""
    e_leaves, e_def = tree.flatten(expected)
    a_leaves, a_def = tree.flatten(actual)
    if e_def != a_def:
        raise AssertionError(f"{what}: tree structure differs: {_structure_message(expected, actual)}")
    for name, x, y in zip(tree.paths(expected), e_leaves, a_leaves):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            raise AssertionError(f"{what}: leaf {name!r} is {type(x).__name__} then {type(y).__name__}")
        if not isinstance(x, torch.Tensor):
            if x != y:
                raise AssertionError(f"{what}: leaf {name!r} differs: {x!r} vs {y!r}")
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            raise AssertionError(f"{what}: leaf {name!r} changed from {x.dtype}{list(x.shape)} to {y.dtype}{list(y.shape)}")
        if not torch.equal(_bits(x.detach().cpu()), _bits(y.detach().cpu())):
            n = int((_bits(x.detach().cpu()) != _bits(y.detach().cpu())).sum())
            raise AssertionError(f"{what}: leaf {name!r} is not bit-identical: {n} of {x.numel()} elements differ, {_max_abs_diff(x, y)}")


def _assert_close(expected: Any, actual: Any, what: str, rtol: float, atol: float) -> None:
    """Assert ``actual`` is within ``atol + rtol * |expected|`` of ``expected``, leaf by leaf."""
    e_leaves, e_def = tree.flatten(expected)
    a_leaves, a_def = tree.flatten(actual)
    if e_def != a_def:
        raise AssertionError(f"{what}: tree structure differs: {_structure_message(expected, actual)}")
    for name, x, y in zip(tree.paths(expected), e_leaves, a_leaves):
        if not isinstance(x, torch.Tensor):
            if x != y:
                raise AssertionError(f"{what}: leaf {name!r} differs: expected {x!r}, got {y!r}")
            continue
        if x.shape != y.shape:
            raise AssertionError(f"{what}: leaf {name!r} has shape {list(y.shape)}, expected {list(x.shape)}")
        xe, ya = x.detach().double().cpu(), y.detach().double().cpu()
        if not torch.allclose(ya, xe, rtol=rtol, atol=atol, equal_nan=True):
            finite = torch.isfinite(xe) & torch.isfinite(ya)
            d = (xe - ya).abs()[finite]
            rel = (d / xe.abs()[finite].clamp_min(1e-30)) if d.numel() else d
            detail = f"max abs diff {float(d.max()):.3g} (max rel {float(rel.max()):.3g})" if d.numel() else "non-finite values differ"
            bad = int((~torch.isclose(ya, xe, rtol=rtol, atol=atol, equal_nan=True)).sum())
            raise AssertionError(f"{what}: leaf {name!r}: {bad} of {x.numel()} elements differ, {detail} > atol {atol:g} + rtol {rtol:g}")


def _signature(t: Any) -> tuple[Any, list[tuple[str, Any]]]:
    leaves_, treedef = tree.flatten(t)
    meta = []
    for name, x in zip(tree.paths(t), leaves_):
        meta.append((name, (tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x).__name__))
    return treedef, meta


def _describe(meta: Any) -> str:
    if isinstance(meta, tuple) and len(meta) == 3:
        shape, dtype, device = meta
        return f"{str(dtype).replace('torch.', '')}{list(shape)} on {device}"
    return str(meta)


# ----------------------------------------------------------------------------- laws


def check_pure(tx: GradientTransformation, params: Any, grads: Any, *, steps: int = 2, **extra: Any) -> None:
    """Assert ``tx`` is pure: no input is mutated and repeating a call gives bit-identical results.

    For ``steps`` steps: ``init`` leaves ``params`` untouched and is deterministic;
    ``update(grads, state, params)`` leaves all three untouched; calling it twice on the same
    inputs gives bit-identical updates and states. ``apply_updates`` then advances the params.

    Args:
        tx: the transformation under test.
        params: a parameter tree.
        grads: a gradient tree like ``params`` (used at every step).
        steps: how many steps to check (states after the first differ from the initial one).
        extra: keyword arguments passed to ``update`` (e.g. ``value=loss``).

    Raises:
        AssertionError: naming the step, the mutated or differing tree, the leaf and the max abs diff.

    Example:
        >>> check_pure(optim.sgd(0.1), {"w": torch.ones(2)}, {"w": torch.ones(2)})
    """
    _check_tx(tx, "check_pure")
    params_copy, grads_copy = tree.clone(params), tree.clone(grads)
    state = tx.init(params)
    _assert_bitwise(params_copy, params, "check_pure: init mutated its input params")
    _assert_bitwise(state, tx.init(params), "check_pure: init is not deterministic (two calls differ in the state)")
    for step in range(steps):
        state_copy = tree.clone(state)
        updates, new_state = tx.update(grads, state, params, **extra)
        _assert_bitwise(params_copy, params, f"check_pure: step {step}: update mutated its input params")
        _assert_bitwise(grads_copy, grads, f"check_pure: step {step}: update mutated its input updates (grads)")
        _assert_bitwise(state_copy, state, f"check_pure: step {step}: update mutated its input opt_state")
        updates_again, state_again = tx.update(grads, state, params, **extra)
        _assert_bitwise(updates, updates_again, f"check_pure: step {step}: a repeated update gave different updates")
        _assert_bitwise(new_state, state_again, f"check_pure: step {step}: a repeated update gave a different state")
        new_params = apply_updates(params, updates)
        _assert_bitwise(params_copy, params, f"check_pure: step {step}: apply_updates mutated params")
        params, state = new_params, new_state
        params_copy = tree.clone(params)


def check_matches_torch(
    tx: GradientTransformation,
    torch_optimizer_factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: Any,
    grads_seq: Optional[Sequence[Any]] = None,
    *,
    steps: Optional[int] = None,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """Assert that ``tx`` moves the parameters exactly as a ``torch.optim`` optimizer does.

    Both start from ``params`` and get the same gradient at each step; the parameter trees
    are compared after every step.

    Args:
        tx: the transformation under test.
        torch_optimizer_factory: ``list of tensors -> torch.optim.Optimizer``, e.g.
            ``lambda ps: torch.optim.AdamW(ps, lr=1e-3)``; the list is ``tree.leaves(params)`` order.
        params: the starting parameters (not modified).
        grads_seq: gradient trees, one per step; or give ``steps`` for seeded normal gradients.
        steps: number of steps when ``grads_seq`` is not given.
        rtol: relative tolerance.
        atol: absolute tolerance.
        seed: seed of the generated gradients.

    Raises:
        AssertionError: ``check_matches_torch: step 3: params leaf 'w' ...: max abs diff ...``.

    Example:
        >>> check_matches_torch(optim.sgd(0.1), lambda ps: torch.optim.SGD(ps, lr=0.1), {"w": torch.ones(2)}, steps=3)
    """
    _check_tx(tx, "check_matches_torch")
    n = _num_steps(grads_seq, steps, "check_matches_torch")
    leaves_, treedef = tree.flatten(params)
    torch_params = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in leaves_]
    opt = torch_optimizer_factory(torch_params)
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"check_matches_torch: torch_optimizer_factory must return a torch.optim.Optimizer, got {type(opt).__name__}")
    ours = tree.clone(params)
    state = tx.init(ours)
    for step in range(n):
        grads = _grads_at(grads_seq, params, step, seed)
        g_leaves = treedef.flatten_up_to(grads)
        for p, g in zip(torch_params, g_leaves):
            p.grad = g.detach().clone().to(p.dtype)
        opt.step()
        updates, state = tx.update(grads, state, ours)
        ours = apply_updates(ours, updates)
        reference = tree.unflatten(treedef, [p.detach() for p in torch_params])
        _assert_close(reference, ours, f"check_matches_torch: step {step}: params (torch as reference)", rtol, atol)


def check_state_stable(
    tx: GradientTransformation,
    params: Any,
    steps: int = 3,
    grads: Any = None,
    *,
    seed: int = 0,
    **extra: Any,
) -> None:
    """Assert that the state's tree structure and each leaf's shape, dtype and device never change.

    A state that changes dtype (say fp32 moments turning fp64 after a step) or shape would
    make a compiled step recompile and a checkpoint fail to load. Updates must also keep
    the gradients' structure, shapes and devices.

    Args:
        tx: the transformation under test.
        params: a parameter tree.
        steps: number of steps to run.
        grads: a gradient tree used at every step, a list of them (one per step), or
            ``None`` for seeded normal gradients.
        seed: seed of the generated gradients.
        extra: keyword arguments passed to ``update``.

    Raises:
        AssertionError: ``check_state_stable: after step 0: state leaf '0.mu.w' changed from float32[3] ...``.

    Example:
        >>> check_state_stable(optim.sgd(0.1, momentum=0.9), {"w": torch.ones(2, dtype=torch.bfloat16)})
    """
    _check_tx(tx, "check_state_stable")
    state = tx.init(params)
    def0, meta0 = _signature(state)
    for step in range(steps):
        if grads is None:
            g = random_grads(params, seed=seed * 7919 + step)
        elif isinstance(grads, list) and tree.structure(grads) != tree.structure(params):
            g = grads[step]
        else:
            g = grads
        updates, state = tx.update(g, state, params, **extra)
        d, meta = _signature(state)
        if d != def0:
            raise AssertionError(f"check_state_stable: after step {step}: state tree structure changed: {_structure_message(tx.init(params), state)}")
        for (name, before), (_, after) in zip(meta0, meta):
            if before != after:
                raise AssertionError(f"check_state_stable: after step {step}: state leaf {name!r} changed from {_describe(before)} to {_describe(after)}")
        ud, umeta = _signature(updates)
        gd, gmeta = _signature(g)
        if ud != gd:
            raise AssertionError(f"check_state_stable: step {step}: updates do not have the gradients' tree structure: {_structure_message(g, updates)}")
        for (name, gm), (_, um) in zip(gmeta, umeta):
            if isinstance(gm, tuple) and (gm[0] != um[0] or gm[2] != um[2]):
                raise AssertionError(f"check_state_stable: step {step}: update leaf {name!r} is {_describe(um)}, its gradient {_describe(gm)}")
        params = apply_updates(params, updates)


def check_injected_equivalent(
    factory: Callable[..., GradientTransformation],
    *,
    params: Any = None,
    grads_seq: Optional[Sequence[Any]] = None,
    steps: int = 3,
    rtol: float = 1e-6,
    atol: float = 1e-7,
    static_args: tuple[str, ...] = (),
    **hparams: Any,
) -> None:
    """Assert ``inject_hyperparams(factory)(**hparams)`` gives the updates of ``factory(**hparams)``.

    Checks the pure path every step, and the donated path too when the plain rule has one
    (that is how an injected adamw must still reach its fused kernel). Tolerances allow for
    hyperparameters held as fp32 tensors instead of Python floats.

    Args:
        factory: a rule factory, e.g. ``optim.adamw``.
        params: a parameter tree (default :func:`default_params`).
        grads_seq: one gradient tree per step (default: ``steps`` seeded normal gradients).
        steps: number of steps when ``grads_seq`` is not given.
        rtol: relative tolerance.
        atol: absolute tolerance.
        static_args: passed to ``inject_hyperparams`` (names kept as Python values).
        hparams: the hyperparameters, as keyword arguments.

    Raises:
        AssertionError: naming the path (pure or donated), the step and the leaf.

    Example:
        >>> check_injected_equivalent(optim.sgd, learning_rate=0.1, momentum=0.9)
    """
    from craftfn.optim.wrappers import inject_hyperparams

    params = default_params() if params is None else params
    n = len(grads_seq) if grads_seq is not None else steps
    plain = factory(**hparams)
    injected = inject_hyperparams(factory, static_args=static_args)(**hparams)
    p_plain, p_inj = tree.clone(params), tree.clone(params)
    s_plain, s_inj = plain.init(p_plain), injected.init(p_inj)
    for step in range(n):
        g = _grads_at(grads_seq, params, step, seed=1)
        u_plain, s_plain = plain.update(g, s_plain, p_plain)
        u_inj, s_inj = injected.update(g, s_inj, p_inj)
        _assert_close(u_plain, u_inj, f"check_injected_equivalent: step {step}: updates (plain rule as reference)", rtol, atol)
        p_plain, p_inj = apply_updates(p_plain, u_plain), apply_updates(p_inj, u_inj)
    if plain.donated_update is None:
        return
    if injected.donated_update is None:
        raise AssertionError("check_injected_equivalent: the plain rule has a donated_update (fused path) but the injected one has none")
    p_plain, p_inj = tree.clone(params), tree.clone(params)
    s_plain, s_inj = plain.init(p_plain), injected.init(p_inj)
    for step in range(n):
        g = _grads_at(grads_seq, params, step, seed=1)
        p_plain, s_plain = plain.donated_update(tree.clone(g), s_plain, p_plain)
        p_inj, s_inj = injected.donated_update(tree.clone(g), s_inj, p_inj)
        _assert_close(p_plain, p_inj, f"check_injected_equivalent: donated step {step}: params (plain rule as reference)", rtol, atol)


def check_multisteps_equivalent(
    tx: GradientTransformation,
    k: int,
    *,
    params: Any = None,
    micro_grads: Optional[Sequence[Sequence[Any]]] = None,
    steps: int = 2,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    seed: int = 0,
) -> None:
    """Assert ``MultiSteps(tx, k)`` over k micro-batches equals one ``tx`` step on their mean gradient.

    The k-1 first micro-steps must return exactly zero updates (``has_updated`` False);
    the k-th must leave the parameters where ``tx`` takes them with the mean gradient
    (``has_updated`` True). This is what accumulating over micro-batches of a mean loss means:
    the mean of the micro-batch gradients is the gradient on their concatenation.

    Args:
        tx: the rule to wrap.
        k: micro-steps per update (>= 1).
        params: a parameter tree (default :func:`default_params`).
        micro_grads: ``steps`` lists of ``k`` gradient trees; default seeded normal gradients.
        steps: number of full (k micro-step) updates when ``micro_grads`` is not given.
        rtol: relative tolerance.
        atol: absolute tolerance.
        seed: seed of the generated gradients.

    Raises:
        AssertionError: naming the update, the micro-step and the leaf.

    Example:
        >>> check_multisteps_equivalent(optim.sgd(0.1, momentum=0.9), k=3)
    """
    from craftfn.optim.wrappers import MultiSteps

    _check_tx(tx, "check_multisteps_equivalent")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"check_multisteps_equivalent: k must be an int >= 1, got {k!r}")
    params = default_params() if params is None else params
    if micro_grads is None:
        micro_grads = [[random_grads(params, seed=seed * 7919 + s * k + i) for i in range(k)] for s in range(steps)]
    multi = MultiSteps(tx, every_k_schedule=k)
    p_ref, p_multi = tree.clone(params), tree.clone(params)
    s_ref, s_multi = tx.init(p_ref), multi.init(p_multi)
    for s, group in enumerate(micro_grads):
        if len(group) != k:
            raise ValueError(f"check_multisteps_equivalent: micro_grads[{s}] has {len(group)} gradients, expected k={k}")
        for i, g in enumerate(group):
            before = tree.clone(p_multi)
            updates, s_multi = multi.update(g, s_multi, p_multi)
            p_multi = apply_updates(p_multi, updates)
            final = i == k - 1
            flag = bool(multi.has_updated(s_multi))
            if flag != final:
                raise AssertionError(f"check_multisteps_equivalent: update {s}, micro-step {i}: has_updated is {flag}, expected {final}")
            if not final:
                _assert_bitwise(before, p_multi, f"check_multisteps_equivalent: update {s}, micro-step {i} (not the k-th): params must not move")
        mean = tree.map(lambda *gs: torch.stack([x.double() for x in gs]).mean(0).to(gs[0].dtype), *group)
        u_ref, s_ref = tx.update(mean, s_ref, p_ref)
        p_ref = apply_updates(p_ref, u_ref)
        _assert_close(p_ref, p_multi, f"check_multisteps_equivalent: update {s}: params (tx on the mean gradient as reference)", rtol, atol)

