"""ZeRO-3 on torch's DTensor: parameters, gradients and optimizer state sharded across ranks.

:func:`fully_shard` turns a state into its fully sharded form: every parameter becomes a
``DTensor`` sharded along its first dimension (``Shard(0)``) over a 1-D device mesh of all
ranks, and the optimizer state is built on the shards (its parameter-shaped entries are
``DTensor``\\ s sharded like their parameters). The data-parallel step
(:func:`craftfn.distributed.make_data_parallel_step`) then, inside the differentiated
function, gathers each parameter for the forward with
``p.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])``: an all-gather
forward whose backward is a reduce-scatter, so the gradients come back already sharded (and
their reductions run while the backward goes on). The user's ``loss_fn`` sees whole, plain
tensors and is unchanged; so is the optimizer, which runs on each rank's local shards (plain
tensors: every fused kernel works) inside :func:`craftfn.optim.sharded`, so rules that need
whole tensors are either exact (global-norm clipping, LAMB/LARS trust ratios, masks by shape,
``apply_if_finite``) or refused with an error naming them.

(``p.full_tensor()`` in place of the redistribute would be wrong: its backward does not
reduce, and the gradients would silently be this rank's alone.)

Example (one process: nothing to shard, the same code runs under torchrun):
    >>> state = distributed.fully_shard(TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.adamw(1e-3)))
    >>> distributed.is_fully_sharded(state)
    True
    >>> step = distributed.make_data_parallel_step(lambda s, p, b, rng: s.apply(p, b["x"]).pow(2).mean())
    >>> state, metrics = step(state, distributed.shard_batch({"x": torch.ones(4, 3)}))
    >>> int(state.step)
    1
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, Optional

import torch

from craftfn import tree
from craftfn.distributed.collectives import _shard_sum, broadcast_tree
from craftfn.distributed.dp_state import DataParallelState, _check_dp_state, _Config, _config_or_none, _norm_init
from craftfn.distributed.process import world_size
from craftfn.optim.base import GradientTransformation, Params, Updates, apply_updates_
from craftfn.optim.sharding import Sharding, ShardingError, sharded
from craftfn.state import TrainState, check_live

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

__all__ = ["fully_shard", "is_fully_sharded", "default_mesh", "gather_params"]

_MESHES: dict[tuple[str, int], DeviceMesh] = {}


def is_dtensor(x: Any) -> bool:
    """Whether ``x`` is a ``DTensor``, without importing torch's DTensor package (~1 s) when nothing uses it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def default_mesh(device_type: str = "cpu") -> Optional[DeviceMesh]:
    """The 1-D device mesh over all ranks (``None`` without a process group); built once per device type.

    Example:
        >>> distributed.default_mesh() is None  # one process
        True
    """
    n = world_size()
    if n == 1:
        return None
    key = (device_type, n)
    if key not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[key] = init_device_mesh(device_type, (n,))
    return _MESHES[key]


def _local(x: Any) -> Any:
    return x.to_local() if is_dtensor(x) else x


def _shard_like(local: torch.Tensor, like: Any) -> Any:
    """Wrap this rank's ``local`` shard as a DTensor laid out like ``like`` (a no-op for plain tensors)."""
    if not is_dtensor(like):
        return local
    return type(like).from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def gather_params(params: Any) -> Any:
    """Whole, plain parameters for the forward, differentiable back to their shards.

    Each ``DTensor`` leaf is all-gathered (``redistribute`` to ``Replicate``) and unwrapped
    with ``grad_placements=[Partial()]``: in the backward the gradient of the whole tensor
    is a partial sum per rank, reduce-scattered into the shard's gradient (a sum over ranks).
    Plain tensors pass through. A collective when there are DTensors: every rank calls it.

    Example:
        >>> distributed.gather_params({"w": torch.ones(2)})
        {'w': tensor([1., 1.])}
    """

    if "torch.distributed.tensor" not in sys.modules:
        return params  # no DTensor can exist
    from torch.distributed.tensor import Partial, Replicate

    def one(x: Any) -> Any:
        if not is_dtensor(x):
            return x
        replicated = [Replicate()] * x.device_mesh.ndim
        return x.redistribute(x.device_mesh, replicated).to_local(grad_placements=[Partial()] * x.device_mesh.ndim)

    return tree.map(one, params)


def is_fully_sharded(state: Any) -> bool:
    """Whether ``state`` was made by :func:`fully_shard` (its ``tx`` is the ZeRO-3 wrapper).

    Example:
        >>> distributed.is_fully_sharded(TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1)))
        False
    """
    cfg = _config_or_none(getattr(state, "tx", None))
    return cfg is not None and cfg.fully_sharded


def _check_shardable(params: Params) -> None:
    for name, p in tree.flatten_with_path(params)[0]:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"fully_shard: parameter {name!r} must be a tensor, got {type(p).__name__}")
        if p.dim() == 0:
            raise ValueError(
                f"fully_shard: parameter {name!r} is 0-d; ZeRO-3 shards every parameter along its first dimension. "
                "Give it shape (1,) (e.g. nn.Parameter(torch.ones(1))), or train with data_parallel(...)"
            )


def _opt_layout(opt_leaves: list[Any], opt_paths: list[str], names: list[str], locals_: list[torch.Tensor]) -> list[Optional[int]]:
    """For each optimizer-state leaf: the index of the parameter it is sharded like, or None (kept whole).

    An entry belongs to a parameter when its tree path ends with the parameter's dotted name (the
    rules keep parameter-shaped state keyed by the parameters' names, possibly nested, e.g.
    ``0.mu.fc.weight`` or a masked rule's ``inner_state.mu.fc.weight``) and it has the shape of
    that parameter's local shard. Other entries must be scalars or integer tensors (counts,
    hyperparameters, keys), kept whole on every rank.
    """
    index = {name: i for i, name in enumerate(names)}
    out: list[Optional[int]] = []
    for path, leaf in zip(opt_paths, opt_leaves):
        if not isinstance(leaf, torch.Tensor):
            out.append(None)
            continue
        match = None
        for name in names:
            if (path == name or path.endswith("." + name)) and (match is None or len(name) > len(match)):
                match = name
        if match is not None and leaf.shape == locals_[index[match]].shape:
            out.append(index[match])
        elif leaf.dim() == 0 or not leaf.is_floating_point():
            out.append(None)  # counts, hyperparameters, keys: the same on every rank
        else:
            raise ShardingError(
                f"fully_shard: optimizer state entry {path!r} has shape {tuple(leaf.shape)}, the shape of no parameter "
                "shard: the rule keeps statistics of whole tensors, which ZeRO-3 cannot shard exactly. Use an "
                "elementwise rule, or data_parallel(...) without fully sharding"
            )
    return out


def _fully_sharded(tx: GradientTransformation) -> GradientTransformation:
    """The ZeRO-3 wrapper: the rule runs on local shards; its state's parameter-shaped entries are DTensors."""
    layouts: dict[Any, list[Optional[int]]] = {}
    wholes: dict[Any, dict[str, torch.Tensor]] = {}

    def signature(params: Params) -> tuple[Any, ...]:
        leaves, treedef = tree.flatten(params)
        return (treedef, tuple((tuple(x.shape), x.dtype, tuple(getattr(x, "placements", ()))) for x in leaves))

    def on_shards(params: Params) -> Any:
        key = signature(params)
        if key not in wholes:
            wholes.clear()  # one model per run
            wholes[key] = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in tree.flatten_with_path(params)[0]}
        return sharded(Sharding("ZeRO-3", wholes[key], _shard_sum))

    def unwrap(inner_state: Any) -> Any:
        return tree.map(_local, inner_state)

    def wrap(inner_state: Any, params: Params) -> Any:
        """Put the rule's local state back into DTensors sharded like the parameters."""
        leaves, treedef = tree.flatten(inner_state)
        p_leaves = tree.leaves(params)
        key = (treedef, signature(params))
        if key not in layouts:
            if len(layouts) > 8:
                layouts.clear()
            layouts[key] = _opt_layout(leaves, tree.paths(inner_state), tree.paths(params), [_local(p) for p in p_leaves])
        return tree.unflatten(treedef, [x if i is None else _shard_like(x, p_leaves[i]) for x, i in zip(leaves, layouts[key])])

    def local_views(grads: Updates, params: Params) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, list[Any]]:
        p_leaves, treedef = tree.flatten(params)
        g_leaves = treedef.flatten_up_to(grads)
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
            if is_dtensor(p) and is_dtensor(g) and g.placements != p.placements:
                g_leaves[i] = g.redistribute(p.device_mesh, p.placements)
        return [_local(g) for g in g_leaves], [_local(p) for p in p_leaves], treedef, p_leaves

    def mean_and_norm(g_local: list[torch.Tensor], in_place: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        # The reduce-scatter in the backward summed the ranks' gradients; one process's gradient is their mean.
        n = world_size()
        if n > 1:
            if in_place:
                torch._foreach_mul_(g_local, 1.0 / n)
            else:
                g_local = torch._foreach_mul(g_local, 1.0 / n)
        sq = tree.sum_of_squares(g_local) if g_local else torch.zeros(())
        return g_local, torch.sqrt(_shard_sum(sq.float()))

    def init_fn(params: Params) -> DataParallelState:
        _check_shardable(params)
        local = tree.map(_local, params)
        with on_shards(params):
            inner = tx.init(local)
        return DataParallelState(inner=wrap(inner, params), grad_norm=_norm_init(local))

    def update_fn(updates: Updates, state: DataParallelState, params: Optional[Params] = None, **extra: Any) -> tuple[Updates, DataParallelState]:
        _check_dp_state(state)
        if params is None:
            raise ValueError("fully sharded update needs params (TrainState.apply_gradients passes them)")
        g_local, p_local, treedef, p_leaves = local_views(updates, params)
        g_local, norm = mean_and_norm(g_local, in_place=False)
        with on_shards(params):
            u, inner = tx.update(tree.unflatten(treedef, g_local), unwrap(state.inner), tree.unflatten(treedef, p_local), shard_sum=_shard_sum, **extra)
        u_leaves = treedef.flatten_up_to(u)
        out = tree.unflatten(treedef, [_shard_like(x, p) for x, p in zip(u_leaves, p_leaves)])
        return out, DataParallelState(wrap(inner, params), norm)

    def donated_fn(updates: Updates, state: DataParallelState, params: Params, **extra: Any) -> tuple[Params, DataParallelState]:
        _check_dp_state(state)
        g_local, p_local, treedef, p_leaves = local_views(updates, params)
        g_local, norm = mean_and_norm(g_local, in_place=True)  # the gradients are donated too
        g_tree, p_tree = tree.unflatten(treedef, g_local), tree.unflatten(treedef, p_local)
        # The local views share the DTensors' storage, so in-place kernels update the shards.
        with on_shards(params):
            if tx.donated_update is not None:
                new_p, inner = tx.donated_update(g_tree, unwrap(state.inner), p_tree, shard_sum=_shard_sum, **extra)
            else:
                u, inner = tx.update(g_tree, unwrap(state.inner), p_tree, shard_sum=_shard_sum, **extra)
                new_p = apply_updates_(p_tree, u)
        new_leaves = treedef.flatten_up_to(new_p)
        out = tree.unflatten(treedef, [_shard_like(x, p) for x, p in zip(new_leaves, p_leaves)])
        return out, DataParallelState(wrap(inner, params), norm)

    update_fn.craftfn_data_parallel = _Config(tx, False, 0, fully_sharded=True)  # type: ignore[attr-defined]
    return GradientTransformation(init_fn, update_fn, donated_fn)


def fully_shard(state: TrainState, *, mesh: Optional[DeviceMesh] = None) -> TrainState:
    """ZeRO-3: shard the parameters and the optimizer state of ``state`` across all ranks.

    Every rank calls it with the same state (made from the same model and optimizer). Each
    parameter becomes a ``DTensor`` sharded along its first dimension, taken from rank 0's
    values, so the ranks start alike; ``step``, ``buffers`` and the key are broadcast from
    rank 0 and stay replicated. ``state.tx`` is wrapped so that it runs on the local shards,
    and the optimizer state is built on them. Train it with
    :func:`craftfn.distributed.make_data_parallel_step` (unchanged ``loss_fn``), checkpoint it
    with :class:`craftfn.distributed.ShardedCheckpointManager`, and get the single-process
    form back with :func:`craftfn.distributed.gather_state`. Without a process group the
    parameters stay plain tensors (one shard: the whole). The module given to
    ``TrainState.create(model=...)`` still holds its own whole parameters; it is only a template
    now, so ``model.to("meta")`` frees them (the state's ``apply`` passes the shards' gathered values).

    Args:
        state: a plain :class:`craftfn.TrainState` whose ``tx`` is the optimizer (not wrapped by
            :func:`data_parallel`). Parameters must have at least one dimension.
        mesh: a 1-D ``DeviceMesh`` over the ranks (default: all ranks, on the parameters' device type).

    Returns:
        The fully sharded state.

    Raises:
        ShardingError: the optimizer needs whole tensors (e.g. Adafactor's factored moments).

    Example:
        >>> state = distributed.fully_shard(TrainState.create(model=torch.nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9)))
        >>> distributed.local_bytes(state.params) <= 4 * 8
        True
    """
    check_live(state)
    if state.tx is None or not isinstance(state.tx, GradientTransformation):
        raise TypeError(f"fully_shard: state.tx must be an optimizer (craftfn.optim.GradientTransformation), got {state.tx!r:.80}")
    if _config_or_none(state.tx) is not None:
        raise ValueError(
            "fully_shard: state.tx is already data-parallel; pass a state created with the plain optimizer, "
            "e.g. fully_shard(TrainState.create(model=model, tx=optim.adamw(...)))"
        )
    _check_shardable(state.params)
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"fully_shard: mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}")
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"fully_shard: mesh must be 1-D (one dimension of data-parallel ranks), got {mesh.ndim} dimensions")
    if mesh is None:
        first = next(iter(tree.leaves(state.params)), None)
        mesh = default_mesh(first.device.type if isinstance(first, torch.Tensor) else "cpu")
    tx = _fully_sharded(state.tx)
    replicated = broadcast_tree({"step": state.step, "buffers": state.buffers, "rng": state.rng})
    if mesh is None:
        params = state.params
    else:
        # distribute_tensor scatters rank 0's values: every rank starts from the same parameters.
        params = tree.map(lambda p: distribute_tensor(p.detach(), mesh, [Shard(0)]), state.params)
    return state.replace(params=params, opt_state=tx.init(params), tx=tx, **replicated)


def _full(x: Any) -> Any:
    return x.full_tensor() if is_dtensor(x) else x


def full_tree(x: Any, keep: bool = True) -> Any:
    """Whole tensors of a pytree with DTensor leaves (a collective; on ranks with ``keep=False`` the result is None).

    Leaves are gathered one at a time, so at most one whole leaf more than the shards is held.
    """
    leaves, treedef = tree.flatten(x)
    out = []
    for leaf in leaves:
        whole = _full(leaf)
        out.append(whole if keep else None)
    return tree.unflatten(treedef, out) if keep else None


def _shard_whole_like(whole: torch.Tensor, like: DTensor) -> DTensor:
    """This rank's shard of a whole tensor, as a DTensor laid out like ``like`` (no communication)."""
    n, r = like.device_mesh.size(), like.device_mesh.get_local_rank()
    rows = whole.shape[0]
    chunk = math.ceil(rows / n) if rows else 0
    local = whole[min(r * chunk, rows) : min((r + 1) * chunk, rows)].clone()
    return _shard_like(local, like)


def shard_like(whole: Any, template: Any) -> Any:
    """Put whole tensors back into the sharding of ``template`` (the inverse of gathering; no communication)."""
    return tree.map(lambda w, t: _shard_whole_like(w, t) if is_dtensor(t) else w, whole, template)

