"""One rank of the ZeRO-3 tests (run as a script with the torchrun environment set).

    RANK=0 WORLD_SIZE=4 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python zero3_worker.py SCENARIO OUTDIR [--ckpt DIR]

Scenarios:
    train     STEPS (6) steps of clipped AdamW with dropout, fully sharded (--donated: also donated steps; --rules:
              rules that need whole tensors); per-rank bytes; a sharded checkpoint of the final state in
              --ckpt; an evaluation split across the ranks; with --restore-from DIR, then restores the
              checkpoint in DIR on this world size. Writes rank<r>.pt
    restore   restores the checkpoint in --ckpt into a fully sharded state on this world size. Writes restore_rank<r>.pt
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_worker  # noqa: E402

from craftfn import TrainState, distributed, optim, random  # noqa: E402
from craftfn.step import value_and_grad  # noqa: E402
from craftfn.training import Evaluator  # noqa: E402

STEPS = 6
DROPOUT = 0.3


def clip_adamw() -> optim.GradientTransformation:
    return optim.chain(optim.clip_by_global_norm(0.3), optim.adamw(1e-2, weight_decay=0.1))


def whole_tensor_rules() -> dict[str, optim.GradientTransformation]:
    """Rules that look at whole tensors and are exact on shards, and ones that must be refused."""
    return {
        "lamb": optim.lamb(1e-2),
        "lars": optim.lars(1e-2),
        "adamw_mask_by_ndim": optim.adamw(1e-2, weight_decay=0.5, mask=lambda name, p: p.ndim >= 2),
        "apply_if_finite": optim.apply_if_finite(optim.adam(1e-2), 2),
    }


def refused_rules() -> dict[str, optim.GradientTransformation]:
    return {"adafactor": optim.adafactor(1e-2, min_dim_size_to_factor=2), "clip_by_block_rms": optim.chain(optim.clip_by_block_rms(1.0), optim.sgd(0.1))}


def wide_model() -> torch.nn.Module:
    """Rows divisible by 4: every rank holds exactly 1/N of every parameter."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))


def eval_batches() -> list[dict[str, torch.Tensor]]:
    """Five batches of different sizes: not divisible by the ranks, weights differ."""
    out = []
    for i, rows in enumerate([8, 4, 8, 2, 6]):
        x = random.normal(random.fold_in(random.key(11), i), (rows, 4))
        out.append({"x": x, "y": torch.sin(x.sum(-1, keepdim=True))})
    return out


def mse_metrics(state, params, batch, rng):
    err = state.apply(params, batch["x"]) - batch["y"]
    return {"loss": torch.mean(err**2), "mae": torch.mean(err.abs())}


def fields(state) -> dict | None:
    """The leaves of a TrainState as a picklable dict (the state's tx holds closures)."""
    if state is None:
        return None
    return {f: getattr(state, f) for f in ("step", "params", "buffers", "opt_state", "rng")}


def train(out: str, ckpt: str, donated: bool, rules: bool, restore_from: str = "") -> None:
    result: dict = {"rank": distributed.rank(), "world": distributed.world_size(), "runs": {}}
    final = None
    for donate in (False, True) if donated else (False,):
        state = distributed.fully_shard(TrainState.create(model=dist_worker.make_model(DROPOUT), tx=clip_adamw(), seed=1))
        step = distributed.make_data_parallel_step(dist_worker.loss_fn, dropout="global_batch", donate=donate)
        history = []
        for i in range(STEPS):
            state, metrics = step(state, distributed.shard_batch(dist_worker.global_batch(i)))
            history.append(dist_worker.host(metrics))
        full = distributed.gather_state(state, dst=0)
        result["runs"][f"donate={donate}"] = {"metrics": history, "params": full and full.params, "opt_state": full and full.opt_state}
        if not donate:
            final = state
    for name, tx in whole_tensor_rules().items() if rules else ():
        state = distributed.fully_shard(TrainState.create(model=dist_worker.make_model(), tx=tx, seed=1))
        step = distributed.make_data_parallel_step(dist_worker.loss_fn)
        for i in range(3):
            state, _ = step(state, distributed.shard_batch(dist_worker.global_batch(i)))
        full = distributed.gather_state(state, dst=0)
        result["runs"][name] = {"params": full and full.params}
    result["refused"] = {}
    for name, tx in refused_rules().items() if rules else ():
        try:
            state = distributed.fully_shard(TrainState.create(model=dist_worker.make_model(), tx=tx, seed=1))
            distributed.make_data_parallel_step(dist_worker.loss_fn)(state, distributed.shard_batch(dist_worker.global_batch(0)))
            result["refused"][name] = None
        except optim.ShardingError as e:
            result["refused"][name] = str(e)
    # Bytes this rank holds: parameters, gradients (as the step computes them) and optimizer state.
    wide = distributed.fully_shard(TrainState.create(model=wide_model(), tx=optim.adamw(1e-3), seed=0))
    batch = distributed.shard_batch({"x": torch.ones(8, 4), "y": torch.zeros(8, 4)})
    _, grads = value_and_grad(lambda p: dist_worker.loss_fn(wide, distributed.gather_params(p), batch, None))(wide.params)
    whole = TrainState.create(model=wide_model(), tx=optim.adamw(1e-3), seed=0)
    result["bytes"] = {
        "params": distributed.local_bytes(wide.params),
        "grads": distributed.local_bytes(grads),
        "opt_state": distributed.local_bytes(wide.opt_state.inner),
        "whole_params": distributed.local_bytes(whole.params),
        "whole_opt_state": distributed.local_bytes(whole.opt_state),
    }
    # Evaluation split across the ranks, on the fully sharded state (its eval step gathers per batch).
    calls = []
    eval_step = distributed.make_data_parallel_eval_step(mse_metrics)

    def counting(s, b):
        calls.append(int(b["x"].shape[0]))
        return eval_step(s, b)

    result["eval"] = Evaluator(counting, eval_batches(), split=distributed.eval_split()).evaluate(final)
    result["eval_calls"] = calls
    result["final"] = fields(distributed.gather_state(final, dst=0))
    with distributed.ShardedCheckpointManager(ckpt) as manager:
        manager.save(STEPS, final, metrics={"loss": history[-1]["loss"]}, extra={"note": "zero3"})
        result["ckpt_files"] = manager.metadata(STEPS)["files"]
    result["state_bytes"] = distributed.local_bytes(final.params) + distributed.local_bytes(final.opt_state)
    if restore_from:  # a checkpoint another world size wrote, restored in the same launch (one start-up less)
        result["restore"] = restored_here(restore_from)
    torch.save(result, os.path.join(out, f"rank{distributed.rank()}.pt"))


def restore(out: str, ckpt: str) -> None:
    torch.save(restored_here(ckpt), os.path.join(out, f"restore_rank{distributed.rank()}.pt"))


def restored_here(ckpt: str) -> dict:
    """Restore the checkpoint in ``ckpt`` into a fully sharded state on this world size, and step once."""
    template = distributed.fully_shard(TrainState.create(model=dist_worker.make_model(DROPOUT), tx=clip_adamw(), seed=5))
    with distributed.ShardedCheckpointManager(ckpt) as manager:
        state = manager.restore(template)
    # A step after restoring runs (the shards are laid out for this world size).
    step = distributed.make_data_parallel_step(dist_worker.loss_fn, dropout="global_batch")
    after, _ = step(state, distributed.shard_batch(dist_worker.global_batch(STEPS)))
    return {
        "restored": fields(distributed.gather_state(state, dst=0)),
        "after": fields(distributed.gather_state(after, dst=0)),
        "local_rows": {k: tuple(v.to_local().shape) if hasattr(v, "to_local") else tuple(v.shape) for k, v in state.params.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["train", "restore"])
    parser.add_argument("out")
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--donated", action="store_true", help="also train with donate=True")
    parser.add_argument("--rules", action="store_true", help="also run the whole-tensor rules")
    parser.add_argument("--restore-from", default="", help="after training, restore this checkpoint (train scenario)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    distributed.init(timeout=120.0)
    try:
        if args.scenario == "train":
            train(args.out, args.ckpt, args.donated, args.rules, args.restore_from)
        else:
            restore(args.out, args.ckpt)
    finally:
        if sys.exc_info()[0] is None:
            distributed.shutdown()


if __name__ == "__main__":
    main()
