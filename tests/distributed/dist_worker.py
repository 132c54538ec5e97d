"""One rank of the multi-process tests (run as a script with the torchrun environment set).

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python dist_worker.py SCENARIO OUTDIR [options]

Scenarios:
    equivalence  data parallel, ZeRO-1 and accumulation over a few steps; writes rank<r>.pt
    train        the Trainer with a CheckpointCoordinator (``--steps``, ``--save-every``, ``--resume``)
    kill         steps in a loop; rank ``--victim`` kills itself (SIGKILL) or hangs (``--hang``) at step 3
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import torch

from craftfn import TrainState, distributed, optim, random, tree

GLOBAL_BATCH = 8


def make_model(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 16), torch.nn.Tanh()]
    if dropout:
        layers.append(torch.nn.Dropout(dropout))
    return torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))


def global_batch(step: int) -> dict[str, torch.Tensor]:
    """The global batch of a step: a pure function of (seed, step), the same on every rank."""
    x = random.normal(random.fold_in(random.key(7), step), (GLOBAL_BATCH, 4))
    return {"x": x, "y": torch.sin(x.sum(-1, keepdim=True))}


def loss_fn(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def optimizers() -> dict[str, optim.GradientTransformation]:
    return {
        "sgd": optim.sgd(0.1, momentum=0.9),
        "adamw": optim.adamw(1e-2, weight_decay=0.1),
        # max_norm below the gradient norms here, so clipping acts (by the norm of the whole gradient).
        "clip_adamw": optim.chain(optim.clip_by_global_norm(0.3), optim.adamw(1e-2, weight_decay=0.1)),
    }


def whole_tensor_rules() -> dict[str, optim.GradientTransformation]:
    """Rules that look at whole tensors, exact on shards."""
    return {
        "lamb": optim.lamb(1e-2),
        "adamw_mask_by_ndim": optim.adamw(1e-2, weight_decay=0.5, mask=lambda name, p: p.ndim >= 2),
        "apply_if_finite": optim.apply_if_finite(optim.adam(1e-2), 2),
    }


def host(metrics):
    return {k: float(v) for k, v in metrics.items()}


def equivalence(out: str) -> None:
    steps = 3
    result = {"rank": distributed.rank(), "world": distributed.world_size(), "runs": {}}
    from craftfn.distributed import overlap

    started: list[tuple[int, int]] = []  # (buckets started from backward hooks, buckets) per overlapped step
    finish = overlap.GradientExchange.finish

    def recording_finish(self, like):
        started.append((self.started_in_backward, len(self.buckets)))
        return finish(self, like)

    overlap.GradientExchange.finish = recording_finish
    # Every all-reduce the steps issue (gradient buckets, metrics), counted per step: with accumulation
    # the buckets are reduced once per step, not once per microbatch.
    all_reduces = [0]
    plain_all_reduce = torch.distributed.all_reduce

    def counting_all_reduce(*args, **kwargs):
        all_reduces[0] += 1
        return plain_all_reduce(*args, **kwargs)

    torch.distributed.all_reduce = counting_all_reduce
    modes = [("dp", False, 1, False), ("zero", True, 1, False), ("dp_accum2", False, 2, False), ("zero_donate", True, 1, False),
             ("dp_overlap", False, 1, True), ("dp_overlap_accum2_donate", False, 2, True)]
    # compile= (the forward traced into one graph; the collectives in the eager update), plain and ZeRO-1,
    # with clip + AdamW only. The "eager" backend: one process checks AOT autograd (test_distributed.py).
    compiled_modes = [("dp_compiled", False, 1, False), ("zero_compiled_accum2_donate", True, 2, False)]
    for name, tx in optimizers().items():
        for mode, sharded, accum, overlapped in modes + (compiled_modes if name == "clip_adamw" else []):
            # Tiny buckets (~100 bytes) so that the model's gradients fill several.
            dp_tx = distributed.data_parallel(tx, shard_optimizer_state=sharded, bucket_mb=1e-4)
            state = TrainState.create(model=make_model(), tx=dp_tx, seed=1)
            compiled = {"backend": "eager"} if "compiled" in mode else False
            step = distributed.make_data_parallel_step(
                loss_fn, accum_steps=accum, donate=mode.endswith("donate"), overlap=overlapped, compile=compiled
            )
            history, calls = [], []
            for i in range(steps):
                all_reduces[0] = 0
                state, metrics = step(state, distributed.shard_batch(global_batch(i)))
                calls.append(all_reduces[0])
                history.append(host(metrics))
            full = distributed.gather_state(state, dst=None)
            result["runs"][f"{name}/{mode}"] = {
                "params": state.params,
                "metrics": history,
                "opt_state": full.opt_state,
                "opt_state_bytes": distributed.opt_state_bytes(state.opt_state.inner),
                "all_reduces": calls,
            }
    result["overlap_started"] = started
    # ZeRO-1 runs rules that look at whole tensors exactly (trust ratios, masks by shape, finiteness over all shards).
    for name, tx in whole_tensor_rules().items():
        state = TrainState.create(model=make_model(), tx=distributed.data_parallel(tx, shard_optimizer_state=True), seed=1)
        step = distributed.make_data_parallel_step(loss_fn)
        for i in range(3):
            state, _ = step(state, distributed.shard_batch(global_batch(i)))
        result["runs"][f"{name}/zero"] = {"params": state.params}
    # Dropout: each rank draws its own masks, yet the ranks stay in sync.
    state = TrainState.create(model=make_model(dropout=0.5), tx=distributed.data_parallel(optim.sgd(0.1)), seed=1)
    seen = []

    def loss_with_probe(s, p, b, rng):
        seen.append(s.apply(p, torch.ones(32, 4)).detach())  # this rank's dropout masks at work
        return loss_fn(s, p, b, rng)

    state, _ = distributed.make_data_parallel_step(loss_with_probe)(state, distributed.shard_batch(global_batch(0)))
    result["dropout"] = {"params": state.params, "rng": state.rng, "probe": seen[0]}
    torch.save(result, os.path.join(out, f"rank{distributed.rank()}.pt"))


def train(out: str, steps: int, save_every: int, resume: bool, ckpt_dir: str) -> None:
    from craftfn.training import Trainer
    from craftfn.training.checkpointing import CheckpointManager

    tx = optimizers()["adamw"]
    state = TrainState.create(model=make_model(dropout=0.1), tx=distributed.data_parallel(tx, shard_optimizer_state=True), seed=3)
    state = distributed.broadcast_state(state)
    manager = CheckpointManager(ckpt_dir, keep_last=None, async_save=True) if distributed.is_main() else None
    with distributed.CheckpointCoordinator(manager) as ckpt:
        restore_error = None
        if not resume:
            try:  # nothing saved yet: rank 0's FileNotFoundError must reach every rank
                ckpt.restore(state)
            except FileNotFoundError as e:
                restore_error = type(e).__name__
        trainer = Trainer(
            distributed.make_data_parallel_step(loss_fn),
            lambda i: distributed.shard_batch(global_batch(i)),
            max_steps=steps,
            checkpoint_manager=ckpt,
            save_every=save_every,
        )
        state = trainer.fit(state, resume=resume)
    full = distributed.gather_state(state, dst=None)
    result = {"state": tree.leaves(full), "paths": tree.paths(full), "step": int(state.step), "restore_error": restore_error}
    torch.save(result, os.path.join(out, f"rank{distributed.rank()}.pt"))


def kill(out: str, victim: int, hang: bool, timeout: float) -> None:
    state = TrainState.create(model=make_model(), tx=distributed.data_parallel(optim.sgd(0.1)), seed=1)
    step = distributed.make_data_parallel_step(loss_fn)
    state, _ = step(state, distributed.shard_batch(global_batch(0)))
    # Joined and warmed up under a generous timeout (a loaded machine starts ranks seconds apart);
    # the collectives from here on use the one under test.
    distributed.set_timeout(timeout)
    for i in range(10_000):
        if i == 3 and distributed.rank() == victim:
            with open(os.path.join(out, "fault_time"), "w") as f:
                f.write(repr(time.time()))
            if hang:
                time.sleep(600)
            os.kill(os.getpid(), signal.SIGKILL)
        state, _ = step(state, distributed.shard_batch(global_batch(i)))
        time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["equivalence", "train", "kill"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ckpt", default="")
    parser.add_argument("--victim", type=int, default=1)
    parser.add_argument("--hang", action="store_true")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init(timeout=max(args.timeout, 120.0))
    try:
        if args.scenario == "equivalence":
            equivalence(args.out)
        elif args.scenario == "train":
            train(args.out, args.steps, args.save_every, args.resume, args.ckpt)
        else:
            kill(args.out, args.victim, args.hang, args.timeout)
    finally:
        if sys.exc_info()[0] is None:
            distributed.shutdown()


if __name__ == "__main__":
    main()
