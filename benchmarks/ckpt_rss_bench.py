"""Peak memory (RSS) of each rank while a 4-rank ZeRO-3 state is saved, against one process saving it whole.

    python benchmarks/ckpt_rss_bench.py                    # 4 ranks (gloo, CPU), then one process
    python benchmarks/ckpt_rss_bench.py --n-layer 4 --n-embd 256 --world 2   # a quick small run

Every rank builds the same GPT (AdamW), shards it with ``distributed.fully_shard``, takes one
data-parallel step (so the optimizer moments are real, touched memory), drops everything else,
moves the module (now only a template) to the meta device, and then measures its resident memory around ``ShardedCheckpointManager.save``: ``VmRSS``
before the save (the baseline: the rank's shards plus torch itself), and ``VmHWM`` (the kernel's
peak resident set) after the save, reset just before it through ``/proc/self/clear_refs``. The
rise (peak - baseline) is what the save itself held at its worst; it is compared with the
rank's own state bytes and with the whole state's bytes. For contrast, the same ranks then
gather the state to rank 0 (``distributed.gather_state``) and save it there with a one-process
``CheckpointManager``: the path a sharded checkpoint replaces. Finally one process builds the
same model, takes one step and saves with ``CheckpointManager`` (synchronous and asynchronous).

glibc is told to return every large freed block to the system (``MALLOC_MMAP_THRESHOLD_``),
so memory freed before the measurement does not linger in the baseline. Linux only.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import torch

from craftfn import TrainState, distributed, make_train_step, optim, tree
from craftfn.models.gpt import GPT, GPTConfig, lm_loss
from craftfn.training import CheckpointManager

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dist_bench import batch_for, launch  # noqa: E402  (the same launcher, a sibling script)

MB = 2**20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _settle() -> int:
    """Free what can be freed, then the resident set (bytes)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status_kb("VmRSS") * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS


def measure(fn) -> dict[str, int]:
    """Run ``fn`` and return the resident set before it and the peak while it ran (bytes)."""
    base = _settle()
    _reset_peak()
    fn()
    peak = _status_kb("VmHWM") * 1024
    return {"rss_before": base, "peak": peak, "rise": peak - base}


def _model(args: argparse.Namespace) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=args.block, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, dropout=0.0))


def _state_bytes(state: TrainState) -> int:
    return distributed.local_bytes(state.params) + distributed.local_bytes(state.opt_state) + distributed.local_bytes(state.buffers)


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    distributed.init(timeout=600)
    world, r = distributed.world_size(), distributed.rank()
    tx = optim.adamw(1e-4, weight_decay=0.1)
    rss_import = _settle()
    model = _model(args)
    state = distributed.fully_shard(TrainState.create(model=model, tx=tx))
    model.to("meta")  # the module is only a template now: drop its own (whole) parameters
    step = distributed.make_data_parallel_step(lm_loss, donate=True)
    state, _ = step(state, distributed.shard_batch(batch_for(0, 256, args.rows * world, args.block)))
    n_params = sum(x.numel() for x in tree.leaves(state.params))
    mine = _state_bytes(state)
    whole = n_params * 4 * 3  # fp32 parameters + AdamW's two moments (the counters are bytes)
    directory = distributed.broadcast_object(tempfile.mkdtemp(prefix="ckpt-rss-", dir=args.dir) if distributed.is_main() else None)
    out: dict = {"rank": r, "state_bytes": mine, "rss_import": rss_import}
    with distributed.ShardedCheckpointManager(os.path.join(directory, "sharded"), keep_last=1) as ckpt:
        # The first save also imports torch's distributed checkpoint and plans; the second is the steady state.
        out["sharded first"] = measure(lambda: ckpt.save(1, state))
        out["sharded"] = measure(lambda: ckpt.save(2, state))
    step_dir = os.path.join(directory, "sharded", "step_00000002")
    out["file_bytes"] = sum(os.path.getsize(os.path.join(step_dir, f)) for f in os.listdir(step_dir) if f.startswith(f"shard-{r + 1:05d}-"))

    def gather_then_save() -> None:
        whole_state = distributed.gather_state(state, dst=0)
        if whole_state is not None:
            with CheckpointManager(os.path.join(directory, "gathered"), keep_last=1, async_save=False) as m:
                m.save(1, whole_state)
        distributed.barrier()

    out["gathered"] = measure(gather_then_save)
    everyone = _all_gather(out)
    if distributed.is_main():
        shutil.rmtree(directory, ignore_errors=True)
        print(json.dumps({"params": n_params, "whole_state_bytes": whole, "world": world, "ranks": everyone}))
    distributed.shutdown()


def _all_gather(value):
    import torch.distributed as dist

    box = [None] * distributed.world_size()
    dist.all_gather_object(box, value)
    return box


def one_process(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    rss_import = _settle()
    model = _model(args)
    state = TrainState.create(model=model, tx=optim.adamw(1e-4, weight_decay=0.1))
    model.to("meta")
    state, _ = make_train_step(lm_loss, donate=True)(state, batch_for(0, 256, args.rows * args.world, args.block))
    out = {"state_bytes": _state_bytes(state), "rss_import": rss_import}
    with tempfile.TemporaryDirectory(prefix="ckpt-rss-", dir=args.dir) as d:
        for name, async_save in (("sync", False), ("async", True)):
            with CheckpointManager(os.path.join(d, name), keep_last=1, async_save=async_save) as m:
                out[name] = measure(lambda m=m: (m.save(1, state), m.wait()))
    print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--rows", type=int, default=1, help="rows per rank in the one step")
    parser.add_argument("--dir", default=None, help="where the checkpoints are written (a temporary directory in it)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one-process", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker or "RANK" in os.environ:
        return worker(args)
    if args.one_process:
        return one_process(args)
    # Large freed blocks go back to the system at once, so they do not linger in a baseline.
    os.environ.update(MALLOC_MMAP_THRESHOLD_="1048576", OMP_NUM_THREADS="1")
    env = dict(os.environ)
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
    rc, text = launch(args.world, [*cmd, "--worker"], capture=True)
    if rc != 0:
        sys.exit(rc)
    ranks = json.loads(text.strip().splitlines()[-1])
    single = json.loads(subprocess.run([*cmd, "--one-process"], env=env, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    report(args, ranks, single)


def report(args: argparse.Namespace, dist_run: dict, single: dict) -> None:
    whole = dist_run["whole_state_bytes"]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "nproc": os.cpu_count(), "torch": torch.__version__, "platform": platform.platform(),
        "model": f"GPT {args.n_layer} x {args.n_embd}, vocab 256, block {args.block}", "params": dist_run["params"],
    }
    print(json.dumps({"meta": meta, "distributed": dist_run, "one_process": single}, indent=1))
    print()
    print(f"whole state (fp32 params + AdamW moments): {whole / MB:.1f} MB; {dist_run['params'] / 1e6:.1f}M parameters")
    print()
    print("| who | save | RSS after imports MB | own state MB | RSS before MB | peak RSS MB | rise MB | rise / own state | rise / whole state |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in dist_run["ranks"]:
        for kind, label in (("sharded first", "ShardedCheckpointManager, first save"), ("sharded", "ShardedCheckpointManager, second save"),
                            ("gathered", "gather_state to rank 0 + CheckpointManager")):
            m = r[kind]
            print(f"| rank {r['rank']} of {dist_run['world']} | {label} | {r['rss_import'] / MB:.1f} | {r['state_bytes'] / MB:.1f} | {m['rss_before'] / MB:.1f} | "
                  f"{m['peak'] / MB:.1f} | {m['rise'] / MB:.1f} | {m['rise'] / r['state_bytes']:.2f} | {m['rise'] / whole:.2f} |")
    for kind in ("sync", "async"):
        m = single[kind]
        print(f"| one process | CheckpointManager ({kind}) | {single['rss_import'] / MB:.1f} | {single['state_bytes'] / MB:.1f} | {m['rss_before'] / MB:.1f} | "
              f"{m['peak'] / MB:.1f} | {m['rise'] / MB:.1f} | {m['rise'] / single['state_bytes']:.2f} | {m['rise'] / whole:.2f} |")


if __name__ == "__main__":
    main()
