"""Activation checkpointing (rematerialization) for chosen submodules, without touching the model.

:func:`checkpoint_modules` returns a *structural copy* of a model in which the chosen
submodules recompute their activations in the backward pass instead of storing them
(``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``). The copy shares every
parameter and buffer with the original and has the same ``named_parameters()`` names, so
it is a drop-in ``apply_fn`` for a :class:`~craftfn.TrainState`; the original module is not
modified. Only the modules on the path to a chosen submodule are copied (shallowly).

``make_train_step(loss_fn, remat=...)`` does this for you: it builds the copy once (cached
per model), runs the step with it, and hands back a state whose ``apply_fn`` is your
model again. It works with the default ``functional_call`` + ``autograd.grad`` engine and
under ``torch.compile`` (dynamo turns checkpointed regions into recompute-tagged graphs).
It does not work under ``torch.func.grad`` (saved-tensor hooks, pytorch#122729).

Targets (``targets=``) select submodules by:
- a glob over the module's dotted name (``"blocks.*"``, ``"*.mlp"``; ``fnmatch`` rules),
- a module class (every instance, subclasses included),
- a predicate ``fn(name, module) -> bool``,
- or a list mixing these. The first (outermost) match wins: children of a checkpointed
  module are not checkpointed again.

Example:
    >>> import torch
    >>> from craftfn import remat
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> ckpt = remat.checkpoint_modules(model, torch.nn.Linear)
    >>> remat.checkpointed_names(ckpt)
    ['0', '2']
    >>> [n for n, _ in ckpt.named_parameters()] == [n for n, _ in model.named_parameters()]
    True
    >>> type(model[0]).__name__   # the original is untouched
    'Linear'
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from typing import Any, Callable, Sequence, Union

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from craftfn import random

__all__ = ["Targets", "checkpoint_modules", "select", "checkpointed_names", "is_checkpointed"]

Target = Union[str, type, Callable[[str, nn.Module], bool]]
Targets = Union[Target, Sequence[Target]]

_REMAT_CLASSES: dict[type, type] = {}


def _as_matchers(targets: Targets) -> list[Callable[[str, nn.Module], bool]]:
    items: list[Any] = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    if not items:
        raise ValueError("remat targets must not be empty: give name patterns, module classes or predicates")
    matchers: list[Callable[[str, nn.Module], bool]] = []
    for t in items:
        if isinstance(t, str):
            if not t:
                raise ValueError("remat target pattern must be a non-empty string (the root module cannot be checkpointed)")
            matchers.append(lambda name, m, pattern=t: fnmatch.fnmatchcase(name, pattern))
        elif isinstance(t, type) and issubclass(t, nn.Module):
            matchers.append(lambda name, m, cls=t: isinstance(m, cls))
        elif callable(t):
            matchers.append(t)
        else:
            raise TypeError(
                f"remat target {t!r} must be a name pattern (str), an nn.Module subclass or a predicate fn(name, module)"
            )
    return matchers


def select(model: nn.Module, targets: Targets) -> list[str]:
    """Names of the submodules ``targets`` selects (outermost matches only; the root excluded).

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(1, 1)), torch.nn.Linear(1, 1))
        >>> select(m, "*")
        ['0', '1']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    matchers = _as_matchers(targets)
    chosen: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if any(match(name, child) for match in matchers):
                chosen.append(name)
            else:
                visit(child, name)

    visit(model, "")
    return chosen


def _save_random_ops(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    # Functional random ops (SDPA's kernel is tagged random for its dropout; under compile,
    # dropout itself) are saved, not recomputed: torch.compile's forward-loss-backward remat
    # pass rejects random ops in recompute regions. In-place ones (eager dropout's bernoulli_)
    # cannot be cached and are replayed instead (checkpoint restores the RNG state, so the
    # recompute draws the same mask). Everything else is recomputed.
    if torch.Tag.nondeterministic_seeded in getattr(op, "tags", ()) and not op._schema.is_mutable:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _save_rng_ops_context() -> Any:
    return create_selective_checkpoint_contexts(_save_random_ops)


def _remat_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward runs under activation checkpointing (cached per class)."""
    if getattr(cls, "_craftfn_remat", False):
        return cls
    if cls not in _REMAT_CLASSES:
        base_forward = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            # Only worth it when a backward will follow; eval and no_grad run plainly.
            if not torch.is_grad_enabled():
                return base_forward(self, *args, **kwargs)
            # The recompute runs during backward, after functional_call has put the module's
            # own tensors back. Capture the tensors in use now (the step's traced params) and
            # swap them in again for the recompute; otherwise the recomputed activations would
            # silently come from stale weights.
            current = {
                **dict(self.named_parameters(remove_duplicate=False)),
                **dict(self.named_buffers(remove_duplicate=False)),
            }

            # Keyed module randomness (craftfn.random.module_rng) is replayed like torch's RNG:
            # the recompute draws from the counters the forward drew from.
            scope = random._active_module_rng()
            if scope is None:

                def run(*a: Any, **kw: Any) -> Any:
                    with _reparametrize_module(self, current):
                        return base_forward(self, *a, **kw)

                return checkpoint(run, *args, use_reentrant=False, context_fn=_save_rng_ops_context, **kwargs)
            key, start, end = scope.key, scope.offset, [scope.offset]

            def run(*a: Any, **kw: Any) -> Any:
                with _reparametrize_module(self, current), random._KeyedRandomness(key, start) as replay:
                    out = base_forward(self, *a, **kw)
                end[0] = replay.offset
                return out

            out = checkpoint(run, *args, use_reentrant=False, context_fn=_save_rng_ops_context, **kwargs)
            scope.offset = end[0]
            return out

        _REMAT_CLASSES[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {"forward": forward, "_craftfn_remat": True, "__module__": cls.__module__, "__qualname__": f"Checkpointed{cls.__qualname__}"},
        )
    return _REMAT_CLASSES[cls]


def _shallow_copy(module: nn.Module) -> nn.Module:
    # Own dicts, so functional_call's temporary swaps on the copy never reach the original.
    new = copy.copy(module)
    new._parameters = OrderedDict(module._parameters)
    new._buffers = OrderedDict(module._buffers)
    new._modules = OrderedDict(module._modules)
    return new


def checkpoint_modules(model: nn.Module, targets: Targets) -> nn.Module:
    """A copy of ``model`` whose ``targets`` submodules run under activation checkpointing.

    Parameters and buffers are shared (no tensor is copied); names are unchanged; the
    original model is not modified. Selected modules keep their class (the copy's class
    is a subclass), so ``isinstance`` checks still hold.

    Args:
        model: the module.
        targets: see the module docstring (patterns, classes, predicates, or a list).

    Returns:
        The checkpointed copy.

    Raises:
        ValueError: nothing in ``model`` matches ``targets``.

    Example:
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> checkpointed_names(checkpoint_modules(m, "0"))
        ['0']
    """
    chosen = select(model, targets)
    if not chosen:
        names = [n for n, _ in model.named_modules() if n][:12]
        raise ValueError(f"remat targets {targets!r} match no submodule of {type(model).__name__}; some names: {names}")
    root = _shallow_copy(model)
    for name in chosen:
        parent = root
        parts = name.split(".")
        # Copy every module on the path (once), so the original tree stays as it was.
        for part in parts[:-1]:
            child = parent._modules[part]
            if not getattr(child, "_craftfn_path_copy", False):
                child = _shallow_copy(child)
                child._craftfn_path_copy = True
                parent._modules[part] = child
            parent = child
        target = _shallow_copy(parent._modules[parts[-1]])
        target.__class__ = _remat_class(type(target))
        parent._modules[parts[-1]] = target
    for m in root.modules():
        m.__dict__.pop("_craftfn_path_copy", None)
    return root


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` itself runs under activation checkpointing."""
    return bool(getattr(type(module), "_craftfn_remat", False))


def checkpointed_names(model: nn.Module) -> list[str]:
    """Names of the submodules of ``model`` that run under activation checkpointing.

    Example:
        >>> checkpointed_names(torch.nn.Linear(1, 1))
        []
    """
    return [name for name, m in model.named_modules() if name and is_checkpointed(m)]
