"""Data parallelism over ``torch.distributed``, launched by ``torchrun``.

One process per device (or per CPU socket); ``torchrun`` starts them and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
:func:`init` joins the process group from that environment (gloo on CPU, NCCL on
GPU) and is a no-op in a single process, so the same script runs either way.

Data parallelism is a transformation of the gradient path, as JAX's ``pmean``:
:func:`data_parallel` wraps an optimizer so that its ``update`` first averages the
gradients over all ranks (bucketed all-reduces over flat buffers), and
:func:`make_data_parallel_step` builds the step that also averages the metrics and
gives each rank its own dropout stream. With ``shard_optimizer_state=True``
(ZeRO-1) each rank keeps only its 1/N slice of the optimizer state: gradients are
reduce-scattered, the rule runs on the slice, and the updates are all-gathered.

Each rank trains on its shard of the global batch (:func:`shard_batch`), so a
batch is a pure function of (seed, step, rank), and a run over N ranks computes
the same update as one process over the whole global batch.

Example (runs as one process here; under ``torchrun`` the same code is data parallel):
    >>> import torch
    >>> from craftfn import TrainState, distributed, optim
    >>> distributed.init()  # False: a single process, nothing to join
    False
    >>> tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9))
    >>> state = TrainState.create(model=torch.nn.Linear(3, 1), tx=tx, seed=0)
    >>> def loss_fn(state, params, batch, rng):
    ...     return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)
    >>> step = distributed.make_data_parallel_step(loss_fn)
    >>> global_batch = {"x": torch.ones(8, 3), "y": torch.zeros(8, 1)}
    >>> state, metrics = step(state, distributed.shard_batch(global_batch))
    >>> sorted(metrics)
    ['grad_norm', 'loss']

Faults: every collective goes through one guard; when another rank dies (its
sockets close) or hangs past ``timeout`` the survivors raise
:class:`DistributedError`, which names the operation, the rank and the likely cause,
instead of hanging.
"""

from craftfn.distributed.batch import rank_key, shard_batch
from craftfn.distributed.checkpoint import (
    CheckpointCoordinator,
    gather_state,
    restore_checkpoint,
    save_checkpoint,
    shard_state,
)
from craftfn.distributed.collectives import (
    DEFAULT_BUCKET_MB,
    all_reduce_mean,
    average_metrics,
    broadcast_object,
    broadcast_tree,
)
from craftfn.distributed.data_parallel import broadcast_state, data_parallel, make_data_parallel_step
from craftfn.distributed.dp_state import DataParallelState, local_bytes, opt_state_bytes
from craftfn.distributed.dropout import global_batch_masks
from craftfn.distributed.evaluation import eval_split, make_data_parallel_eval_step
from craftfn.distributed.fully_sharded import default_mesh, fully_shard, gather_params, is_fully_sharded
from craftfn.distributed.process import (
    DEFAULT_TIMEOUT_S,
    TIMEOUT_ENV,
    DistributedError,
    barrier,
    init,
    is_initialized,
    is_main,
    local_rank,
    rank,
    set_timeout,
    shutdown,
    world_size,
)
from craftfn.distributed.sharded_checkpoint import ShardedCheckpointManager

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_BUCKET_MB",
    "TIMEOUT_ENV",
    "DistributedError",
    "DataParallelState",
    "init",
    "shutdown",
    "set_timeout",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "barrier",
    "shard_batch",
    "rank_key",
    "all_reduce_mean",
    "average_metrics",
    "broadcast_tree",
    "broadcast_state",
    "broadcast_object",
    "data_parallel",
    "make_data_parallel_step",
    "gather_state",
    "shard_state",
    "opt_state_bytes",
    "local_bytes",
    "fully_shard",
    "is_fully_sharded",
    "gather_params",
    "default_mesh",
    "global_batch_masks",
    "eval_split",
    "make_data_parallel_eval_step",
    "save_checkpoint",
    "restore_checkpoint",
    "CheckpointCoordinator",
    "ShardedCheckpointManager",
]
