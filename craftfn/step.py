"""The gradient engine and the pure train/eval steps.

``make_train_step(loss_fn)`` turns a loss function into
``step(state, batch) -> (new_state, metrics)``: pure (inputs are never mutated,
the same state and batch give bit-identical results, dropout included) and free of
host syncs (metrics are 0-d tensors for the caller to read when it likes).

Example:
    >>> import torch
    >>> from craftfn import TrainState, make_train_step, optim
    >>> model = torch.nn.Linear(3, 1)
    >>> def loss_fn(state, params, batch, rng):
    ...     pred = state.apply(params, batch["x"])
    ...     return torch.mean((pred - batch["y"]) ** 2)
    >>> step = make_train_step(loss_fn)
    >>> state = TrainState.create(model=model, tx=optim.sgd(0.1))
    >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}
    >>> state, metrics = step(state, batch)
    >>> sorted(metrics)
    ['grad_norm', 'loss']

Gradient engine: ``value_and_grad`` runs the function on parameters that require
grad and calls ``torch.autograd.grad`` (the "functional_call + autograd.grad"
engine). It works with activation checkpointing, autocast and ``torch.compile``.
Use ``torch.func.grad``/``vmap`` instead when you need to *transform* the gradient
computation, e.g. per-example gradients (``vmap(grad(loss))``); torch.func does not
support saved-tensor hooks, so activation checkpointing fails under it.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping, Optional, Union

import torch

from craftfn import _context, precision, random, tree
from craftfn import remat as remat_lib
from craftfn.jit import jit
from craftfn.state import TrainState, _mark_donated, _updated, check_live

__all__ = ["value_and_grad", "make_train_step", "make_eval_step", "LossFn", "MetricFn"]

LossFn = Callable[[TrainState, Any, Any, torch.Tensor], Union[torch.Tensor, tuple[torch.Tensor, Mapping[str, Any]]]]
MetricFn = Callable[[TrainState, Any, Any, torch.Tensor], Union[torch.Tensor, Mapping[str, Any]]]

# Distinguishes the eval stream of keys from the train stream at the same step.
_EVAL_KEY_TAG = 0x7E5A1


def _check_scalar_loss(loss: Any) -> None:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"the loss function must return a 0-d tensor (or (loss, aux_dict)), got {type(loss).__name__}")
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (0-d tensor), got shape {tuple(loss.shape)}; reduce it, e.g. loss.mean()"
        )
    if not loss.is_floating_point():
        raise TypeError(f"the loss must be a floating-point tensor, got dtype {loss.dtype}")


def _under_functorch_transform() -> bool:
    # Dynamo (torch 2.13) wraps this query's None result in an object that is not None, so
    # traced code never asks: compiled steps keep the autograd.grad engine.
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def value_and_grad(fn: Callable[..., Any], has_aux: bool = False) -> Callable[..., Any]:
    """Return ``f(params, *args, **kwargs) -> (value, grads)`` (``((value, aux), grads)`` with aux).

    ``grads`` has the structure of ``params``; parameters that do not affect the value
    get zero gradients. Values and aux come back detached.

    It composes with ``craftfn.jit``/``torch.compile`` (the default engine, ``autograd.grad``,
    which also runs activation checkpointing) and with the ``torch.func`` transforms: under
    ``torch.func.vmap`` (per-example gradients: ``vmap(value_and_grad(loss), in_dims=(None, 0))``)
    and ``torch.func.jvp`` (forward-over-reverse: Hessian-vector products) it switches to
    ``torch.func.grad_and_value``, which does not run activation checkpointing.

    Example:
        >>> f = value_and_grad(lambda p, x: (p["w"] * x).sum())
        >>> value, grads = f({"w": torch.ones(2)}, torch.tensor([1.0, 2.0]))
        >>> value, grads["w"]
        (tensor(3.), tensor([1., 2.]))
    """

    def split(out: Any) -> tuple[torch.Tensor, Any]:
        if has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError("value_and_grad(has_aux=True): the function must return (value, aux)")
            value, aux = out
        else:
            value, aux = out, None
        _check_scalar_loss(value)
        return value, aux

    def wrapped(params: Any, *args: Any, **kwargs: Any) -> Any:
        leaves, treedef = tree.flatten(params)
        # A loop, not all(<generator>): under torch.compile dynamo traces a generator at ~5 ms per item.
        for x in leaves:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                # Names only for the message: under torch.compile every tree walk is traced (slowly).
                for name, y in zip(tree.paths(params), leaves):
                    if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                        raise TypeError(f"value_and_grad: parameter {name!r} must be a floating-point tensor, got {y!r:.60}")
        if _under_functorch_transform():
            # Under a torch.func transform (vmap for per-example gradients, jvp for
            # Hessian-vector products), autograd.grad on requires_grad_ copies cannot see the
            # transform's wrapped tensors; torch.func's own grad composes with it.
            def objective(flat: list[torch.Tensor]) -> Any:
                value, aux = split(fn(tree.unflatten(treedef, flat), *args, **kwargs))
                return (value, aux) if has_aux else value

            grads, out = torch.func.grad_and_value(objective, has_aux=has_aux)(leaves)
            value, aux = out if has_aux else (out, None)
        else:
            traced = [x.detach().requires_grad_(True) for x in leaves]
            with torch.enable_grad():
                value, aux = split(fn(tree.unflatten(treedef, traced), *args, **kwargs))
                grads = torch.autograd.grad(value, traced, allow_unused=True, materialize_grads=True)
        grads_tree = tree.unflatten(treedef, list(grads))
        value = value.detach()
        if has_aux:
            return (value, tree.detach(aux)), grads_tree
        return value, grads_tree

    return wrapped


# Metric names the step (and the Trainer, NanGuard) report themselves: an aux entry of the same
# name would silently replace the real value.
RESERVED_METRICS = ("loss", "grad_norm", "loss_scale", "grads_finite", "lr", "skipped", "compile_seconds")


def _split_loss_output(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError("the loss function must return a loss tensor or a pair (loss, aux_dict)")
        aux = dict(out[1])
        clash = [k for k in aux if k in RESERVED_METRICS or k == _UNSCALED_LOSS]
        if clash:
            raise ValueError(
                f"the loss function's aux dict uses the reserved metric name(s) {clash}: the step reports "
                f"{list(RESERVED_METRICS)} itself; rename the aux entries (e.g. 'aux_{clash[0]}')"
            )
        return out[0], aux
    return out, {}


def _check_batch(batch: Any, accum_steps: int) -> int:
    """Validate the batch's leading sizes (static shapes: no sync) and return the batch size.

    Runs every step, so the common case only reads shapes; leaf names are computed for errors.
    """
    leaves = tree.leaves(batch)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ValueError("batch must contain at least one tensor (a pytree whose leaves share a leading dimension)")
    if any(x.dim() == 0 for x in tensors) or len({x.shape[0] for x in tensors}) > 1:
        named = [(n or "<batch>", x) for n, x in tree.flatten_with_path(batch)[0] if isinstance(x, torch.Tensor)]
        for name, x in named:
            if x.dim() == 0:
                raise ValueError(f"batch leaf {name!r} is 0-d; every batch leaf needs a leading batch dimension")
        sizes = {name: int(x.shape[0]) for name, x in named}
        raise ValueError(f"batch leaves disagree in leading (batch) size: {sizes}")
    size = int(tensors[0].shape[0])
    if size == 0:
        raise ValueError("batch is empty (leading size 0): a step needs at least one example; check the data (an exhausted or filtered-out batch?)")
    if size % accum_steps != 0:
        raise ValueError(
            f"accum_steps={accum_steps} does not divide the batch size {size}; "
            f"use a batch size that is a multiple of {accum_steps}"
        )
    return size


def _microbatch(batch: Any, accum_steps: int, i: int) -> Any:
    def take(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        b = x.shape[0] // accum_steps
        return x[i * b : (i + 1) * b]

    return tree.map(take, batch)


def _maybe_compile(fn: Callable[..., Any], compile: Union[bool, Mapping[str, Any]], donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
    """``fn`` itself, or ``craftfn.jit(fn, ...)`` with the options of ``compile=``."""
    if not compile:
        return fn
    if not isinstance(compile, (bool, Mapping)):
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
    return jit(fn, donate_argnums=donate_argnums, **(dict(compile) if isinstance(compile, Mapping) else {}))


def _check_accum(accum_steps: Any) -> None:
    if isinstance(accum_steps, bool) or not isinstance(accum_steps, int) or accum_steps < 1:
        raise ValueError(f"accum_steps must be a positive int, got {accum_steps!r}")


# aux key under which the loss before scaling travels next to the scaled (differentiated) one.
_UNSCALED_LOSS = "__craftfn_unscaled_loss"


def _initial_loss_scale(loss_scale: Any) -> Optional[precision.DynamicLossScale]:
    if loss_scale is None or loss_scale is False:
        return None
    if loss_scale is True or (isinstance(loss_scale, str) and loss_scale == "dynamic"):
        return precision.DynamicLossScale()
    if isinstance(loss_scale, precision.DynamicLossScale):
        return loss_scale
    raise ValueError(
        f"loss_scale must be None, True, 'dynamic' or a precision.DynamicLossScale (the initial value), got {loss_scale!r}"
    )


def _check_param_dtypes(params: Any, policy: precision.Policy) -> None:
    for name, x in tree.flatten_with_path(params)[0]:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != policy.param_dtype:
            raise ValueError(
                f"policy {policy} stores parameters in {policy.param_dtype}, but parameter {name!r} is {x.dtype}; "
                f"cast the state first: state = precision.cast_state(state, policy)"
            )


def _cast_metrics(metrics: dict[str, Any], policy: precision.Policy) -> dict[str, Any]:
    return {
        k: v.to(policy.output_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in metrics.items()
    }


def _select(pred: torch.Tensor, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``torch.where(pred, a, b)``: a skipped update without reading ``pred`` to the host."""
    return tree.map(lambda a, b: torch.where(pred, a, b), on_true, on_false)


class _RematCache:
    """The checkpointed copy of the state's model, built once per model (see craftfn.remat)."""

    def __init__(self, targets: remat_lib.Targets) -> None:
        self.targets = targets
        self.model: Any = None
        self.copy: Any = None

    def __call__(self, model: Any) -> Any:
        if model is not self.model:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(
                    f"remat= needs a state created from an nn.Module (model=...), got apply_fn {type(model).__name__}"
                )
            self.copy, self.model = remat_lib.checkpoint_modules(model, self.targets), model
        return self.copy


def _apply_own_gradients(state: TrainState, grads: Any, donate: bool, value: torch.Tensor) -> TrainState:
    """``state.apply_gradients`` for gradients the step computed itself (nobody else holds them).

    Without donation the result must be a new state, but it need not be built the way
    ``tx.update`` + ``apply_updates`` builds it (new moments, an updates tree, new parameters:
    four fresh buffers per parameter). When the rule has an in-place path, copying the
    parameters and optimizer state and updating the copies in place gives the same values
    with one buffer fewer and the fused kernel (measured 90 ms vs 115 ms for AdamW on 50M
    parameters, torch fused 34 ms). The gradients may be overwritten: they are the step's own.
    ``value`` (the step's loss) goes to the update as ``value=``, as optax's ``value_and_grad``
    loops pass it: rules such as ``polyak_sgd`` need it, the others ignore it.
    """
    extra = {"value": value.detach()}
    in_place = donate
    if not donate and state.tx is not None and state.tx.donated_update is not None:
        state, in_place = state.replace(params=tree.clone(state.params), opt_state=tree.clone(state.opt_state)), True
    # value_and_grad made the gradients leaf for leaf from these parameters (same structure, shapes,
    # dtypes, devices): marked as checked, so no update path walks them again (seconds of tracing).
    marked = tree._trust(grads, state.params)
    try:
        return _updated(state, grads, in_place=in_place, extra=extra)
    finally:
        tree._untrust(marked)


def make_train_step(
    loss_fn: LossFn,
    *,
    accum_steps: int = 1,
    donate: bool = False,
    compile: Union[bool, Mapping[str, Any]] = False,
    policy: Union[None, str, precision.Policy] = None,
    loss_scale: Union[None, bool, str, precision.DynamicLossScale] = None,
    remat: Optional[remat_lib.Targets] = None,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
    """Build the pure training step ``step(state, batch) -> (new_state, metrics)``.

    The optimizer update receives the step's loss as ``value=`` (``tx.update(grads, opt_state,
    params, value=loss)``), so rules that need it (``optim.polyak_sgd``, ``contrib.momo``) train
    through this step as they do in an optax loop; rules that do not use it ignore it.

    Args:
        loss_fn: ``loss_fn(state, params, batch, rng) -> loss`` or ``(loss, aux_dict)``.
            Run the model with ``state.apply(params, ...)``; ``rng`` is this step's key
            (``fold_in(state.rng, state.step)``) for any explicit randomness; module
            dropout is already seeded from it.
        accum_steps: split the batch (every leaf along its leading dimension) into this
            many microbatches and accumulate their mean gradient inside the step. The
            result equals one step on the whole batch.
        donate: let the step reuse the input state's buffers in place (JAX's
            donate_argnums). Much faster for big models; the input state must not be used
            afterwards (doing so raises ``DonatedStateError``).
        compile: ``True`` or a dict of ``torch.compile`` options: compile the differentiated
            forward (``loss_fn`` with the model) with :func:`craftfn.jit`; AOT autograd builds
            its backward graph, as for ``torch.compile(model)`` in a plain loop, and the update
            runs as without ``compile=`` (one fused kernel for the AdamW family). For the whole
            step as one graph, use ``step.compile_whole(**options)``. The step's attribute
            ``compile_seconds`` is set on the first call to that call's wall time (tracing +
            compiling + one run). Steps and schedule counts are tensors, so training compiles
            once.
        policy: a :class:`craftfn.precision.Policy` or its name (``"fp32"``, ``"bf16"``,
            ``"bf16_pure"``, ``"fp16"``). Mixed policies run ``loss_fn`` (forward and
            loss) under ``torch.autocast`` inside the differentiated function; pure ones
            expect the parameters already in ``param_dtype`` (``precision.cast_state``)
            and cast floating batch leaves to the compute dtype. The loss is cast to
            ``output_dtype``. ``None`` (default): nothing is cast.
        loss_scale: dynamic loss scaling (for fp16): ``True``/``"dynamic"`` or a
            :class:`craftfn.precision.DynamicLossScale` giving the initial value. The scale
            is pure state carried in the train state's ``loss_scale`` field (a plain
            ``TrainState`` comes back as a ``precision.LossScaledTrainState``; a state that
            already carries one keeps its own). The loss is scaled, gradients unscaled; on
            non-finite gradients the parameters and optimizer state stay as they were
            (``torch.where``, no host sync; ``step`` still advances) and the scale backs
            off. Metrics gain ``loss_scale`` (the scale used) and ``grads_finite`` (1.0/0.0).
            With ``donate=True`` the update then runs out of place (an in-place update could
            not be undone), and the old buffers are released.
        remat: activation checkpointing for these submodules (name patterns such as
            ``"transformer.h.*"``, module classes or predicates; see :mod:`craftfn.remat`).
            The step runs a checkpointed copy of the state's model (built once, sharing its
            tensors); the returned state's ``apply_fn`` is the original model.

    Returns:
        The step. ``metrics`` holds 0-d tensors: ``loss``, ``grad_norm`` (before any
        clipping the optimizer does) and the entries of ``aux`` (averaged over microbatches).

    Example:
        >>> from craftfn import TrainState, optim
        >>> def loss_fn(state, params, batch, rng):
        ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
        >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1))
        >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}
        >>> step = make_train_step(loss_fn, accum_steps=2)
        >>> state, metrics = step(state, batch)
        >>> sorted(metrics), int(state.step)
        (['grad_norm', 'loss'], 1)

        The options for a transformer on an accelerator (nothing compiles until the first call):

        >>> fast = make_train_step(loss_fn, policy="bf16", remat="transformer.h.*", donate=True, compile=True)
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_accum(accum_steps)
    policy_ = precision.get_policy(policy) if policy is not None else None
    initial_scale = _initial_loss_scale(loss_scale)
    use_loss_scale = initial_scale is not None
    remat_cache = _RematCache(remat) if remat is not None else None
    if remat is not None:
        remat_lib._as_matchers(remat)  # bad targets fail here, not at the first step
    # Pure low-precision policies feed the model batches in its dtype; mixed ones leave that to autocast.
    cast_batch = policy_ is not None and not policy_.is_mixed and policy_.compute_dtype != torch.float32

    def forward(
        state: TrainState, params: Any, batch: Any, rng: torch.Tensor, scale: Optional[torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The differentiated function: ``loss_fn`` under the step's key (and autocast), scaled.

        What ``compile=`` compiles: a graph whose outputs need gradients, so AOT autograd builds
        the backward graph next to it (as for ``torch.compile(model)``)."""
        # Module dropout draws from this (micro)step's key, inside the graph when compiled.
        if policy_ is None:
            with random.module_rng(rng):
                loss, aux = _split_loss_output(loss_fn(state, params, batch, rng))
        else:
            # Autocast must wrap the forward inside the differentiated function.
            device_type = next((x.device.type for x in tree.leaves(params)), "cpu")
            with policy_.autocast(device_type), random.module_rng(rng):
                loss, aux = _split_loss_output(loss_fn(state, params, batch, rng))
            if isinstance(loss, torch.Tensor) and loss.is_floating_point():
                loss = loss.to(policy_.output_dtype)
        if scale is None:
            return loss, aux
        return loss * scale.to(loss.dtype), {**aux, _UNSCALED_LOSS: loss}

    def make_core(forward_fn: Callable[..., tuple[torch.Tensor, dict[str, Any]]]) -> Callable[..., Any]:
        """The step's body around ``forward_fn`` (the eager ``forward`` or its compiled graph)."""

        def loss_and_grad(
            state: TrainState, batch: Any, rng: torch.Tensor, scale: Optional[torch.Tensor]
        ) -> tuple[torch.Tensor, dict[str, Any], Any]:
            def objective(params: Any) -> tuple[torch.Tensor, dict[str, Any]]:
                return forward_fn(state, params, batch, rng, scale)

            (loss, aux), grads = value_and_grad(objective, has_aux=True)(state.params)
            if scale is not None:
                loss = aux.pop(_UNSCALED_LOSS)
            return loss, aux, grads

        def core(state: TrainState, batch: Any, rng: torch.Tensor) -> tuple[TrainState, dict[str, torch.Tensor]]:
            # Traced (compile_whole): flattening a tree seen before in this trace reuses its treedef.
            memo = tree._begin_treedef_memo()
            try:
                return train_core(state, batch, rng)
            finally:
                tree._end_treedef_memo(memo)

        def train_core(state: TrainState, batch: Any, rng: torch.Tensor) -> tuple[TrainState, dict[str, torch.Tensor]]:
            # The loss sees a private copy of the buffers, so BatchNorm-style updates land in the
            # new state and never in the caller's (a donated state's buffers are reused instead).
            work = state if donate else state.replace(buffers=tree.clone(state.buffers))
            ls = getattr(work, "loss_scale", None) if use_loss_scale else None
            scale = ls.scale if ls is not None else None
            if cast_batch:
                batch = policy_.cast_to_compute(batch)
            if accum_steps == 1:
                loss, aux, grads = loss_and_grad(work, batch, rng, scale)
            else:
                loss, aux, grads = None, None, None
                for i in range(accum_steps):
                    l_i, a_i, g_i = loss_and_grad(work, _microbatch(batch, accum_steps, i), random.fold_in(rng, i), scale)
                    if grads is None:
                        loss, aux, grads = l_i, a_i, g_i
                    else:
                        loss, aux, grads = loss + l_i, {k: aux[k] + a_i[k] for k in aux}, tree.add(grads, g_i)
                inv = 1.0 / accum_steps
                loss, aux, grads = loss * inv, {k: v * inv for k, v in aux.items()}, tree.scale(inv, grads)
            if ls is None:
                metrics = {"loss": loss, "grad_norm": tree.global_norm(grads), **aux}
                if policy_ is not None:
                    metrics = _cast_metrics(metrics, policy_)
                return _apply_own_gradients(work, grads, donate, loss), metrics
            grads = ls.unscale(grads)
            finite = tree.all_finite(grads)
            metrics = {"loss": loss, "grad_norm": tree.global_norm(grads), **aux}
            if policy_ is not None:
                metrics = _cast_metrics(metrics, policy_)
            metrics.update(loss_scale=ls.scale, grads_finite=finite.to(torch.float32))
            # Out of place, so a non-finite step can keep the old values.
            updated = _apply_own_gradients(work, grads, donate=False, value=loss)
            new_state = updated.replace(
                params=_select(finite, updated.params, work.params),
                opt_state=_select(finite, updated.opt_state, work.opt_state),
                loss_scale=ls.adjust(finite),
            )
            return new_state, metrics

        return core

    # compile= compiles the differentiated forward, not the whole step: AOT autograd then builds
    # and partitions the backward as it does for torch.compile(model) (saved activations chosen
    # by its min-cut, forward and backward kernels deduplicated), and the update runs as without
    # compile= (AdamW-family rules: one fused kernel, nothing left for a compiler to fuse).
    # Measured at 0.8M (GPT 4x128, 2 CPU cores): the whole step as one graph compiled in 47-66 s
    # against 31-40 s for the plain loop's torch.compile(model), with the same step time; see
    # benchmarks/RESULTS.md, "Issue 16j". One whole-step graph: step.compile_whole().
    core = make_core(forward)
    compiled_forward = _maybe_compile(forward, compile) if compile else None
    run = make_core(compiled_forward) if compiled_forward is not None else core

    def prepare(state: TrainState) -> TrainState:
        """Outside the compiled core: attach the loss scale and the checkpointed model (same objects every step)."""
        if policy_ is not None:
            _check_param_dtypes(state.params, policy_)
        if initial_scale is not None:
            ls = getattr(state, "loss_scale", None)
            if ls is None:
                # Fresh tensors: the compiled core must not see the closure's own (guards on identity).
                ls = tree.clone(initial_scale)
            if not isinstance(ls, precision.DynamicLossScale):
                raise TypeError(f"state.loss_scale must be a precision.DynamicLossScale, got {type(ls).__name__}")
            device = next((x.device for x in tree.leaves(state.params)), ls.scale.device)
            if ls.scale.device != device:
                ls = ls.to(device)
            if ls is not getattr(state, "loss_scale", None):
                state = precision.with_loss_scale(state, ls)
        if remat_cache is not None:
            state = state.replace(apply_fn=remat_cache(state.apply_fn))
        return state

    def build_step(run: Callable[..., Any], compiled: Optional[Callable[..., Any]]) -> Callable[..., Any]:
        def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
            check_live(state)
            if state.tx is None:
                raise ValueError(
                    "the state has no tx (optimizer); create it with TrainState.create(..., tx=optim.sgd(...)) "
                    "or pass it via state.replace(tx=..., opt_state=tx.init(state.params))"
                )
            _check_batch(batch, accum_steps)
            first_compiled = compiled is not None and step.compile_seconds is None  # type: ignore[attr-defined]
            t0 = time.perf_counter() if first_compiled else 0.0
            rng = random.fold_in(state.rng, state.step)
            state_in = prepare(state)
            with _context.step_context(training=True):
                new_state, metrics = run(state_in, batch, rng)
            if first_compiled:
                # The whole first step: tracing, compiling forward and backward, one run (the plain
                # loop's torch.compile(model) compiles its backward at the first backward, too).
                step.compile_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
            if remat_cache is not None:
                new_state = new_state.replace(apply_fn=state.apply_fn)
            if donate:
                _mark_donated(state)
            return new_state, metrics

        step.accum_steps = accum_steps  # type: ignore[attr-defined]
        step.donate = donate  # type: ignore[attr-defined]
        step.policy = policy_  # type: ignore[attr-defined]
        step.loss_scale = initial_scale  # type: ignore[attr-defined]
        step.remat = remat  # type: ignore[attr-defined]
        # Wall time of the first compiled call (None until then, and without compile=).
        step.compile_seconds = None  # type: ignore[attr-defined]
        # The craftfn.jit this step calls (None without compile=): of the differentiated forward,
        # ``compiled(state, params, batch, rng, scale)``, or with ``compile_whole`` of the core.
        step.compiled = compiled  # type: ignore[attr-defined]
        # The pure core, ``core(state, batch, rng)``, all eager (what ``compile_whole`` compiles):
        # ``craftfn.jit(step.core).explain(...)`` inspects its trace.
        step.core = core  # type: ignore[attr-defined]
        step.compile_whole = compile_whole  # type: ignore[attr-defined]
        return step

    def compile_whole(**options: Any) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, torch.Tensor]]]:
        """This step with forward, backward, update and metrics compiled as one graph.

        ``options`` are ``torch.compile``'s (as in ``compile=``); the core is compiled by
        :func:`craftfn.jit`, donating the state when the step donates. Same results as the step.
        It lets inductor fuse a non-fused optimizer's update with the rest; with the fused AdamW
        kernel there is nothing to fuse, and on a 2-core CPU it compiled longer than ``compile=``
        for the same step time (benchmarks/RESULTS.md, "Issue 16j").

        Example:
            >>> def loss_fn(state, params, batch, rng):
            ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
            >>> from craftfn import optim
            >>> step = make_train_step(loss_fn).compile_whole(backend="eager")
            >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1))
            >>> state, metrics = step(state, {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)})
            >>> int(state.step)
            1
        """
        whole = jit(core, donate_argnums=(0,) if donate else (), **options)
        return build_step(whole, whole)

    return build_step(run, compiled_forward)


def make_eval_step(
    metric_fn: MetricFn,
    *,
    compile: Union[bool, Mapping[str, Any]] = False,
    policy: Union[None, str, precision.Policy] = None,
) -> Callable[[TrainState, Any], dict[str, torch.Tensor]]:
    """Build ``eval_step(state, batch) -> metrics``: no gradients, eval mode, nothing mutated.

    Args:
        metric_fn: ``metric_fn(state, params, batch, rng) -> loss | dict of 0-d tensors``.
            A bare tensor is reported as ``{"loss": value}``.
        compile: as in :func:`make_train_step`.
        policy: as in :func:`make_train_step`: ``metric_fn`` runs under the policy's
            autocast and floating metrics come out in its ``output_dtype``.

    Example:
        >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=None)
        >>> batch = {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)}
        >>> eval_step = make_eval_step(lambda s, p, b, rng: {"mse": torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2)})
        >>> sorted(eval_step(state, batch))
        ['mse']
    """
    if not callable(metric_fn):
        raise TypeError(f"metric_fn must be callable, got {type(metric_fn).__name__}")

    policy_ = precision.get_policy(policy) if policy is not None else None
    cast_batch = policy_ is not None and not policy_.is_mixed and policy_.compute_dtype != torch.float32

    def core(state: TrainState, batch: Any, rng: torch.Tensor) -> dict[str, torch.Tensor]:
        work = state.replace(buffers=tree.clone(state.buffers))
        if cast_batch:
            batch = policy_.cast_to_compute(batch)
        device_type = next((x.device.type for x in tree.leaves(work.params)), "cpu")
        autocast = policy_.autocast(device_type) if policy_ is not None else contextlib.nullcontext()
        with torch.no_grad(), autocast, random.module_rng(rng):
            out = metric_fn(work, work.params, batch, rng)
        if isinstance(out, torch.Tensor):
            out = {"loss": out}
        if not isinstance(out, Mapping):
            raise TypeError(f"metric_fn must return a tensor or a dict of tensors, got {type(out).__name__}")
        return _cast_metrics(dict(out), policy_) if policy_ is not None else dict(out)

    run = _maybe_compile(core, compile)

    def eval_step(state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        check_live(state)
        _check_batch(batch, 1)
        rng = random.fold_in(random.fold_in(state.rng, state.step), _EVAL_KEY_TAG)
        with _context.step_context(training=False):
            return run(state, batch, rng)

    eval_step.compiled = run if compile else None  # type: ignore[attr-defined]
    return eval_step



