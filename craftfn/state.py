"""``TrainState``: everything a training step reads and writes, as one immutable pytree.

Example:
    >>> import torch
    >>> from craftfn import TrainState, optim
    >>> model = torch.nn.Linear(3, 1)
    >>> state = TrainState.create(model=model, tx=optim.sgd(0.1), seed=0)
    >>> sorted(state.params)
    ['bias', 'weight']
    >>> y = state.apply(state.params, torch.ones(2, 3))
    >>> y.shape
    torch.Size([2, 1])
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from craftfn import _context, random, struct, tree
from craftfn._donated import DONATED_MESSAGE as _DONATED_MESSAGE
from craftfn._donated import Donated as _Donated
from craftfn._donated import DonatedStateError
from craftfn.optim.base import GradientTransformation, apply_updates, apply_updates_, check_updates_match

__all__ = ["TrainState", "DonatedStateError", "check_live"]


_LEAF_FIELDS = ("step", "params", "buffers", "opt_state", "rng")


def check_live(state: Any, argname: str = "state") -> None:
    """Raise ``DonatedStateError`` if ``state`` was donated to a step, ``TypeError`` if it is no TrainState."""
    if not isinstance(state, TrainState):
        raise TypeError(f"{argname} must be a craftfn.TrainState, got {type(state).__name__}")
    if isinstance(state.__dict__.get("params"), _Donated):
        raise DonatedStateError(f"{argname}: {_DONATED_MESSAGE}")


class TrainState(struct.PyTreeNode):
    """The training state: leaves ``step``, ``params``, ``buffers``, ``opt_state``, ``rng``.

    ``apply_fn`` (an ``nn.Module`` used as a stateless template, or a function
    ``apply_fn(params, *args, **kwargs)``) and ``tx`` (the gradient transformation)
    are static: part of the tree structure, not leaves. ``step`` and ``rng`` live on
    the CPU, so deriving per-step keys never stalls an accelerator.

    Subclass to add fields (give them defaults); subclasses are pytrees too.

    Example:
        >>> state = TrainState.create(model=torch.nn.Linear(2, 2), tx=optim.sgd(0.1))
        >>> leaves, treedef = tree.flatten(state)
        >>> tree.unflatten(treedef, leaves).tx is state.tx
        True
    """

    step: torch.Tensor
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    opt_state: Any
    rng: torch.Tensor
    apply_fn: Optional[Callable[..., Any]] = struct.field(static=True, default=None)
    tx: Optional[GradientTransformation] = struct.field(static=True, default=None)

    @classmethod
    def create(
        cls,
        *,
        model: Optional[nn.Module] = None,
        apply_fn: Optional[Callable[..., Any]] = None,
        params: Any = None,
        buffers: Optional[dict[str, torch.Tensor]] = None,
        tx: Optional[GradientTransformation],
        seed: int = 0,
        copy: bool = True,
        **extra_fields: Any,
    ) -> TrainState:
        """Build a state from an ``nn.Module`` (``model=``) or from ``apply_fn`` and ``params``.

        Args:
            model: a module; its ``named_parameters()`` become ``params`` and its
                ``named_buffers()`` become ``buffers``. The module is then only a template.
            apply_fn: instead of ``model``, a function ``apply_fn(params, *args, **kwargs)``.
            params: with ``apply_fn``, the parameter pytree.
            buffers: with ``apply_fn``, non-trained state (default empty).
            tx: the gradient transformation (``None`` gives a state for evaluation only).
            seed: the seed of the state's root key.
            copy: copy the module's tensors (default), so donated in-place steps never
                write into the module; ``False`` shares storage and saves memory.
            extra_fields: values for fields added by a subclass.

        Example:
            >>> s = TrainState.create(apply_fn=lambda p, x: x @ p["w"], params={"w": torch.ones(2, 1)}, tx=optim.sgd(0.1))
            >>> s.apply(s.params, torch.ones(1, 2))
            tensor([[2.]])
        """
        if tx is not None and not isinstance(tx, GradientTransformation):
            raise TypeError(f"tx must be a craftfn.optim.GradientTransformation (e.g. optim.sgd(0.1)), got {type(tx).__name__}")
        if model is not None:
            if apply_fn is not None or params is not None or buffers is not None:
                raise ValueError("TrainState.create: pass either model=, or apply_fn= with params=, not both")
            if not isinstance(model, nn.Module):
                raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
            take = (lambda t: t.detach().clone()) if copy else (lambda t: t.detach())
            params = {name: take(p) for name, p in model.named_parameters()}
            buffers = {name: take(b) for name, b in model.named_buffers()}
            apply_fn = model
        else:
            if apply_fn is None or params is None:
                raise ValueError("TrainState.create needs model=, or both apply_fn= and params=")
            if not callable(apply_fn):
                raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
            buffers = dict(buffers or {})
        opt_state = tx.init(params) if tx is not None else None
        return cls(
            step=torch.zeros((), dtype=torch.int64),
            params=params,
            buffers=buffers,
            opt_state=opt_state,
            rng=random.key(seed),
            apply_fn=apply_fn,
            tx=tx,
            **extra_fields,
        )

    def apply(
        self,
        params: Any,
        *args: Any,
        rng: Optional[torch.Tensor] = None,
        mutable: bool = False,
        training: Optional[bool] = None,
        **kwargs: Any,
    ) -> Any:
        """Run the model functionally with ``params`` (and the state's buffers).

        Args:
            params: the parameters to use (usually ``state.params``, or the traced
                copy a loss function receives).
            rng: a key; module randomness (dropout, attention dropout) is then drawn from it
                (:func:`craftfn.random.module_rng`): the same key gives the same masks, eagerly
                and compiled. Inside a step the step's key is already in effect, so ``rng`` is
                only needed for forwards that should draw from another key (SAM's second pass).
            mutable: also return the buffers as the forward left them (BatchNorm statistics):
                ``(output, new_buffers)``.
            training: run the module in train (True) or eval (False) mode; default: the
                mode of the enclosing step (train in ``make_train_step``, eval in
                ``make_eval_step``), else the module's own.

        The state itself is never modified: outside a step, buffers are copied before the
        forward; inside one, the step hands the loss a private copy.

        Example:
            >>> bn = TrainState.create(model=torch.nn.BatchNorm1d(2), tx=None)
            >>> out, new_buffers = bn.apply(bn.params, torch.randn(4, 2), mutable=True, training=True)
            >>> int(new_buffers["num_batches_tracked"]), int(bn.buffers["num_batches_tracked"])
            (1, 0)
        """
        check_live(self)
        ctx = _context.current()
        in_step = ctx is not None
        buffers = self.buffers if in_step else tree.clone(self.buffers)
        module = self.apply_fn
        if training is None and ctx is not None:
            training = ctx.training
        # Module randomness draws from the key (traceable; no host read). Without rng, a step's
        # own scope (its per-step key) is already in effect; outside a step torch's RNG is.
        rng_scope = random.module_rng(rng) if rng is not None else contextlib.nullcontext()
        if isinstance(module, nn.Module):
            with rng_scope, _train_mode(module, training):
                out = functional_call(module, {**params, **buffers}, args, kwargs, tie_weights=True, strict=False)
        elif callable(module):
            if rng is not None:
                kwargs["rng"] = rng
            with rng_scope:
                out = module(params, *args, **kwargs)
        else:
            raise ValueError("TrainState.apply: this state has no apply_fn; create it with model= or apply_fn=")
        return (out, buffers) if mutable else out

    def apply_gradients(self, grads: Any, *, donate: bool = False, **extra: Any) -> TrainState:
        """One optimizer step: ``tx.update`` then add the updates; ``step`` advances by one.

        Args:
            grads: gradients with the structure of ``params``.
            donate: allow the update to reuse this state's parameter and optimizer-state
                buffers in place (fast, fused kernels where the rule has them). This state
                must not be used afterwards; doing so raises ``DonatedStateError``.
            extra: passed to ``tx.update`` (e.g. ``value=loss`` for rules that use it).

        Example:
            >>> s = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
            >>> s2 = s.apply_gradients(tree.zeros_like(s.params))
            >>> int(s2.step)
            1
        """
        check_live(self)
        if self.tx is None:
            raise ValueError(
                "TrainState has no tx (optimizer): create it with TrainState.create(..., tx=optim.sgd(...)) "
                "or state.replace(tx=..., opt_state=tx.init(state.params))"
            )
        if donate:
            _check_donation_allowed()
        new_state = _updated(self, grads, in_place=donate, extra=extra)
        if donate and _context.current() is None and _context.current_jit() is None:
            # Inside a step or craftfn.jit, the state is marked after the (possibly compiled)
            # call returns: placeholders cannot be built inside a graph.
            _mark_donated(self)
        return new_state


def _check_donation_allowed() -> None:
    jit_ctx = _context.current_jit()
    if jit_ctx is None and torch.compiler.is_compiling():
        raise ValueError(
            "apply_gradients(donate=True) inside torch.compile: compile the step with "
            "craftfn.jit(step, donate_argnums=<position of the state>) instead; it marks the donated state "
            "after the call (outside the graph) so that reusing it raises DonatedStateError"
        )
    if jit_ctx is not None and not jit_ctx.donating:
        raise ValueError(
            "apply_gradients(donate=True) inside craftfn.jit without donate_argnums: the caller's state would be "
            "overwritten yet stay usable; pass donate_argnums=<position of the state>, or donate=False"
        )


def _updated(state: TrainState, grads: Any, *, in_place: bool, extra: dict[str, Any]) -> TrainState:
    """One optimizer step, in place on ``state``'s buffers or not (no checks of liveness or donation)."""
    # Once here, before any kernel; the update paths below see the same objects and skip it.
    check_updates_match(grads, state.params, "grads")
    marked = tree._trust(grads, state.params)
    try:
        if in_place:
            if state.tx.donated_update is not None:
                params, opt_state = state.tx.donated_update(grads, state.opt_state, state.params, **extra)
            else:
                updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
                params = apply_updates_(state.params, updates)
        else:
            updates, opt_state = state.tx.update(grads, state.opt_state, state.params, **extra)
            params = apply_updates(state.params, updates)
    finally:
        tree._untrust(marked)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def _mark_donated(state: TrainState) -> None:
    for name in _LEAF_FIELDS:
        object.__setattr__(state, name, _Donated(name))


@contextlib.contextmanager
def _train_mode(module: nn.Module, training: Optional[bool]):
    if training is None or module.training == training:
        yield
        return
    # Only modules whose flag differs are flipped back, so a module mixing modes keeps them.
    changed = [m for m in module.modules() if m.training != training]
    for m in changed:
        m.training = training
    try:
        yield
    finally:
        for m in changed:
            m.training = not training
