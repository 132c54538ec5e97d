"""Per-step communication overhead of data parallelism at 2 processes (gloo, loopback).

    python benchmarks/dist_bench.py                 # launches 2 ranks itself (as torchrun would)
    python benchmarks/dist_bench.py --config small --steps 10 --repeats 5 --json out.json

Every rank trains a GPT on its shard of the global batch with one thread. Per step, rank 0 times:

* ``local``: the plain step on the rank's rows, no communication (the compute a rank does anyway);
* ``local + barrier``: the same, then a barrier: the waiting for the slower rank that any
  synchronous step pays, without moving gradients;
* ``data parallel``: ``distributed.make_data_parallel_step(..., overlap=False)`` with
  ``data_parallel(adamw)``: gradient all-reduce in flat buckets after the backward + one small
  metrics all-reduce (the path before overlapping);
* ``DP overlap``: the same with the default ``overlap=True``: bucket all-reduces started from
  backward hooks while the backward runs;
* ``ZeRO-1``: ``shard_optimizer_state=True`` (all-reduce + slice on gloo, all-gather of updates);
* ``ZeRO-3``: ``distributed.fully_shard`` (DTensor: parameters all-gathered in the forward,
  gradients reduce-scattered in the backward, optimizer on the local shards);
* ``torch local``, ``DDP one bucket``, ``DDP`` (opt-in with ``--variants``): the peer, a plain PyTorch
  loop on the same model (``loss.backward()``, ``torch.optim.AdamW``), alone and under
  ``DistributedDataParallel(gradient_as_bucket_view=True)`` with one bucket (its all-reduce starts
  when the backward ends: no overlap) and with DDP's default buckets (``--ddp-bucket-mb``);
* ``--parts``: the pieces of an exchange timed alone (flatten, copies into bucket views, a scale
  pass, the all-reduce of a flat buffer, ``all_reduce_mean``), wall and CPU time.

Every variant also reports the CPU time of all of the rank's threads (gloo's included).

Overhead = (data parallel - local), split into waiting (local + barrier - local) and the
gradient exchange itself (the rest); share = overhead / data parallel. The overlap's overhead is
(DP overlap - local), compared with the non-overlapped one in the same run. Variants alternate
within each repeat and the median per-step time is reported, so drift in machine load hits all alike.
Both ranks share the same cores, so this is a weak proxy for separate machines: communication
here competes with the other rank's compute.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from craftfn import TrainState, distributed, make_train_step, optim
from craftfn.models.gpt import GPT, GPTConfig, lm_loss

CONFIGS = {
    # (n_layer, n_head, n_embd, block_size, rows per rank)
    "small": (2, 4, 128, 64, 8),
    "medium": (4, 4, 256, 64, 8),
}


VARIANTS = ("local", "local + barrier", "data parallel", "DP overlap", "ZeRO-1", "ZeRO-3", "torch local", "DDP one bucket", "DDP")
DEFAULT_VARIANTS = VARIANTS[:6]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cmd: list[str], capture: bool = False) -> tuple[int, str]:
    """Start ``world`` ranks of ``cmd`` with the torchrun environment (loopback, 1 thread each).

    Returns the worst exit code and, with ``capture``, rank 0's standard output.
    """
    port = str(_free_port())
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        out = subprocess.PIPE if capture and r == 0 else None
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, text=True))
    text = procs[0].communicate()[0] or ""
    return max(p.wait() for p in procs), text


def batch_for(step: int, vocab: int, rows: int, block: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randint(0, vocab, (rows, block + 1), generator=g)
    return {"input_ids": x[:, :-1], "labels": x[:, 1:]}


def _torch_runner(cfg: GPTConfig, batch_of, ddp: bool, ddp_bucket_mb: Optional[float]) -> Callable[[], None]:
    """A plain PyTorch loop (nn.Module, loss.backward(), torch.optim.AdamW) on the same model, optionally under DDP."""
    torch.manual_seed(0)
    model: torch.nn.Module = GPT(cfg)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, bucket_cap_mb=ddp_bucket_mb, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)

    def run() -> None:
        batch = batch_of()
        logits = model(batch["input_ids"])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        opt.zero_grad(set_to_none=not ddp)  # DDP's grads stay views of its buckets
        loss.backward()
        opt.step()
        # Like the craftfn steps: the loss averaged over the ranks and read on the host.
        if ddp:
            loss = distributed.average_metrics({"loss": loss.detach()})["loss"]
        float(loss.detach())

    return run


def _exchange_parts(grads: dict[str, torch.Tensor], bucket_bytes: int) -> dict[str, Callable[[], None]]:
    """The pieces of a gradient exchange, each alone: where the data-parallel overhead goes."""
    import torch.distributed as dist

    leaves = list(grads.values())
    flat = torch.cat([g.reshape(-1) for g in leaves])
    views, at = [], 0
    for g in leaves:
        views.append(flat[at : at + g.numel()].view(g.shape))
        at += g.numel()
    chunks = [c.contiguous() for c in torch.split(flat, max(1, bucket_bytes // 4))]

    def all_reduce_chunks() -> None:
        works = [dist.all_reduce(c, async_op=True) for c in chunks]
        for w in works:
            w.wait()

    return {
        "flatten (cat)": lambda: torch.cat([g.reshape(-1) for g in leaves]),
        "copy into bucket views": lambda: [v.copy_(g) for v, g in zip(views, leaves)],
        "scale pass": lambda: flat.mul_(0.5),
        "all-reduce flat": lambda: dist.all_reduce(flat),
        f"all-reduce in {len(chunks)} chunks": all_reduce_chunks,
        "all_reduce_mean (tree)": lambda: distributed.all_reduce_mean(grads),
    }


def bench_config(name: str, args: argparse.Namespace, world: int) -> dict:
    """Time the variants on one model size; returns rank-local medians (ms, wall and CPU) and optimizer-state bytes."""
    n_layer, n_head, n_embd, block, rows = CONFIGS[name]
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, block_size=block, n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=0.0)
    model = GPT(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    tx = optim.adamw(1e-3, weight_decay=0.1)
    local_step = make_train_step(lm_loss, donate=True)

    def local_synced(state, batch):
        # The local step, then a barrier: the ranks wait for each other as in data parallel,
        # but exchange no gradients. Separates waiting for the slower rank from moving data.
        out = local_step(state, batch)
        distributed.barrier()
        return out

    dp_tx = distributed.data_parallel(tx, bucket_mb=args.bucket_mb)
    states = {
        "local": TrainState.create(model=model, tx=tx),
        "local + barrier": TrainState.create(model=model, tx=tx),
        "data parallel": TrainState.create(model=model, tx=dp_tx),
        "DP overlap": TrainState.create(model=model, tx=distributed.data_parallel(tx, bucket_mb=args.overlap_bucket_mb)),
        "ZeRO-1": TrainState.create(model=model, tx=distributed.data_parallel(tx, shard_optimizer_state=True)),
        "ZeRO-3": distributed.fully_shard(TrainState.create(model=model, tx=tx)),
    }
    steps = {
        "local": local_step,
        "local + barrier": local_synced,
        "data parallel": distributed.make_data_parallel_step(lm_loss, donate=True, overlap=False),
        "DP overlap": distributed.make_data_parallel_step(lm_loss, donate=True, overlap=True),
        "ZeRO-1": distributed.make_data_parallel_step(lm_loss, donate=True),
        "ZeRO-3": distributed.make_data_parallel_step(lm_loss, donate=True),
    }
    steps = {k: v for k, v in steps.items() if k in args.variants}
    states = {k: v for k, v in states.items() if k in steps}
    counter = [0]

    def batch_of() -> dict[str, torch.Tensor]:
        counter[0] += 1
        return distributed.shard_batch(batch_for(counter[0], 256, rows * world, block))

    def craftfn_runner(variant: str) -> Callable[[], None]:
        def run() -> None:
            states[variant], metrics = steps[variant](states[variant], batch_of())
            float(metrics["loss"])  # the Trainer reads every step's metrics too

        return run

    runners = {k: craftfn_runner(k) for k in steps}
    torch_variants = {"torch local": (False, None), "DDP one bucket": (True, 1e6), "DDP": (True, args.ddp_bucket_mb or None)}
    for k, (ddp, mb) in torch_variants.items():
        if k in args.variants:
            runners[k] = _torch_runner(cfg, batch_of, ddp, mb)
    grads_like = {k: torch.randn_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}
    parts = _exchange_parts(grads_like, int(args.overlap_bucket_mb * 2**20)) if args.parts else {}
    runners.update(parts)
    wall: dict[str, list[float]] = {k: [] for k in runners}
    cpu: dict[str, list[float]] = {k: [] for k in runners}
    bytes_before = {k: {"params": distributed.local_bytes(s.params), "opt_state": distributed.local_bytes(s.opt_state)} for k, s in states.items()}

    def timed(fn, n: int) -> tuple[float, float]:
        distributed.barrier()
        t0, c0 = time.perf_counter(), time.process_time()  # CPU time of every thread of this rank
        for _ in range(n):
            fn()
        distributed.barrier()
        return (time.perf_counter() - t0) / n, (time.process_time() - c0) / n

    for rep in range(args.repeats + 1):  # the first round warms up
        for variant, fn in runners.items():
            t, c = timed(fn, args.steps)
            if rep:
                wall[variant].append(t)
                cpu[variant].append(c)
    return {
        "params": n_params, "grad_mb": n_params * 4 / 2**20, "rows_per_rank": rows, "block": block,
        "ms": {k: statistics.median(v) * 1e3 for k, v in wall.items() if k not in parts},
        "cpu_ms": {k: statistics.median(v) * 1e3 for k, v in cpu.items()},
        "parts_ms": {k: statistics.median(wall[k]) * 1e3 for k in parts},
        "opt_state_bytes_rank0": {k: distributed.opt_state_bytes(s.opt_state) for k, s in states.items()},
        "bytes_rank0": bytes_before,
    }


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    distributed.init(timeout=120)
    world = distributed.world_size()
    results = {name: bench_config(name, args, world) for name in args.config}
    if distributed.is_main():
        meta = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
            "nproc": os.cpu_count(), "world": world, "torch": torch.__version__, "platform": platform.platform(),
            "steps": args.steps, "repeats": args.repeats,
        }
        print(json.dumps({"meta": meta, "results": results}, indent=1))
        for name, r in results.items():
            ms, cpu = r["ms"], r["cpu_ms"]
            print(f"\n{name}: {r['params'] / 1e6:.2f}M parameters, {r['grad_mb']:.1f} MB of gradients, {r['rows_per_rank']} rows per rank\n")
            print("| variant | ms/step | overhead vs its local ms | CPU ms/step (all threads) |")
            print("|---|---|---|---|")
            for k, v in ms.items():
                base = "torch local" if k.startswith(("DDP", "torch")) else "local"
                over = f"{v - ms[base]:+.1f}" if base in ms and k != base else ""
                print(f"| {k} | {v:.1f} | {over} | {cpu[k]:.1f} |")
            for over, under in (("DP overlap", "data parallel"), ("DDP", "DDP one bucket")):
                base = "torch local" if over == "DDP" else "local"
                if all(k in ms for k in (over, under, base)):
                    print(f"\n{over} / {under} overhead: {(ms[over] - ms[base]) / (ms[under] - ms[base]):.2f}")
            if r["parts_ms"]:
                print("\n| exchange piece, alone | ms | CPU ms |\n|---|---|---|")
                for k, v in r["parts_ms"].items():
                    print(f"| {k} | {v:.2f} | {cpu[k]:.2f} |")
        if "local" in results[args.config[0]]["bytes_rank0"]:
            print()
            print("| model | variant | params bytes/rank | optimizer state bytes/rank | vs local |")
            print("|---|---|---|---|---|")
            for name, r in results.items():
                b = r["bytes_rank0"]
                whole = b["local"]["params"] + b["local"]["opt_state"]
                for k, v in b.items():
                    print(f"| {name} | {k} | {v['params']:,} | {v['opt_state']:,} | {(v['params'] + v['opt_state']) / whole:.2f} |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": results}, f, indent=1)
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=["small", "medium"], choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=distributed.DEFAULT_BUCKET_MB, help="data_parallel(bucket_mb=...)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=VARIANTS)
    parser.add_argument("--overlap-bucket-mb", type=float, default=distributed.DEFAULT_BUCKET_MB, help="bucket_mb of the DP overlap variant")
    parser.add_argument("--ddp-bucket-mb", type=float, default=0, help="bucket_cap_mb of the DDP variant (0: DDP's default, 25 MiB buckets after a 1 MiB first one)")
    parser.add_argument("--parts", action="store_true", help="also time the pieces of an exchange (flatten, copies, all-reduce) alone")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or "RANK" in os.environ:
        worker(args)
    else:
        sys.exit(launch(args.world, [sys.executable, __file__, "--worker", *sys.argv[1:]])[0])


if __name__ == "__main__":
    main()
