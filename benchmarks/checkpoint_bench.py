"""Checkpoint benchmark: CheckpointManager against torch.save/torch.load, and async saving in a training loop.

Part 1 saves and restores a state of ``--millions`` million float32 elements (parameters plus two
Adam moments, so a third of them are parameters) with:

* ``CheckpointManager(async_save=False).save``: safetensors, xxh3_128 checksum, fsync of files and directory;
* ``CheckpointManager(async_save=True).save``: the time until ``save`` returns (host copy), and until the
  background write is done;
* ``torch.save`` of the same tensors, without and with an fsync (``torch.save`` never fsyncs);
* restore: ``CheckpointManager.restore`` (reads and verifies the xxh3_128 checksum) against ``torch.load``,
  and the restore of the same state written in the old format (format 1: sha256);
* the checksums alone over the file's bytes: xxh3_128 (what craftfn writes) and sha256 (format 1);
* the host copy alone (the state into warm buffers), what an async ``save`` cannot avoid blocking for;
* restore again, each measurement in a new process (as a resumed run), the methods rotated per round:
  ``torch.load``, ``torch.load`` plus the copy into an existing state (``load_state_dict``'s work),
  ``restore``, ``restore(..., donate=True)`` and the format-1 restore. The in-process restore rows
  depend on which method gets memory another just freed (no page faults); these do not.

Part 2 trains a small GPT and compares the mean step time without saving, with asynchronous saving
every ``--save-every`` steps, and with synchronous saving.

Run:
    .venv/bin/python benchmarks/checkpoint_bench.py            # ~100M elements (~400 MB), a few minutes on 2 cores
    .venv/bin/python benchmarks/checkpoint_bench.py --small    # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import xxhash

from craftfn import TrainState, make_train_step, optim
from craftfn.data import random_window_batch
from craftfn.models import GPT, GPTConfig, lm_loss
from craftfn.training import checkpointing
from craftfn.training.checkpointing import CheckpointManager


def big_state(millions: float, random: bool = True) -> TrainState:
    """Parameters of 1024x1024 matrices plus two moment trees of the same shapes (zeros unless ``random``)."""
    n_mat = max(1, round(millions * 1e6 / 3 / (1024 * 1024)))
    fill, fill_like = (torch.randn, torch.randn_like) if random else (torch.zeros, torch.zeros_like)
    params = {f"layers.{i}.weight": fill(1024, 1024) for i in range(n_mat)}
    mu = {k: fill_like(v) for k, v in params.items()}
    nu = {k: torch.rand_like(v) if random else torch.zeros_like(v) for k, v in params.items()}
    state = TrainState.create(apply_fn=lambda p, x: x, params=params, tx=None)
    return state.replace(opt_state=({"mu": mu, "nu": nu},))


def num_elements(state: TrainState) -> int:
    from craftfn import tree

    return sum(x.numel() for x in tree.leaves(state))


def state_dict_of(state: TrainState) -> dict[str, torch.Tensor]:
    from craftfn import tree

    return dict(tree.flatten_with_path(state)[0])


def fsync_path(path: Path) -> None:
    """Flush a file or folder (torch.save's files get what craftfn's writer does)."""
    from craftfn._files import fsync_path

    fsync_path(path)


class WritingFormat1:
    """Within the block, CheckpointManager writes format 1 (sha256), as craftfn did before xxh3_128."""

    def __enter__(self) -> None:
        self.saved = checkpointing._FILE_HASH, checkpointing.FORMAT_VERSION
        checkpointing._FILE_HASH, checkpointing.FORMAT_VERSION = "sha256", 1

    def __exit__(self, *exc: object) -> None:
        checkpointing._FILE_HASH, checkpointing.FORMAT_VERSION = self.saved


def bench_save_restore(millions: float, repeats: int, root: Path) -> dict:
    """Save and restore times, the methods interleaved within each round (machine load hits all alike)."""
    state = big_state(millions)
    n = num_elements(state)
    flat = state_dict_of(state)
    results: dict[str, list[float]] = {}
    counter = iter(range(10**6))

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    def clean() -> None:
        for p in root.iterdir():
            shutil.rmtree(p, ignore_errors=True)

    # The async manager is reused so its staging buffers are warm, as in a run that saves repeatedly.
    async_manager = CheckpointManager(root / "async", async_save=True, keep_last=1)
    async_manager.save(0, state)
    async_manager.wait()
    sizes: dict[str, int] = {}
    for r in range(repeats):
        # craftfn, synchronous: returns when the step directory is renamed in and fsynced.
        d = root / f"sync-{next(counter)}"
        t0 = time.perf_counter()
        with CheckpointManager(d, async_save=False) as m:
            m.save(1, state)
        record("craftfn save (sync: xxh3_128 + fsync)", time.perf_counter() - t0)
        # craftfn, asynchronous: the blocking part (host copy) and the completion.
        t0 = time.perf_counter()
        async_manager.save(r + 1, state)
        t1 = time.perf_counter()
        async_manager.wait()
        record("craftfn save (async: until save returns)", t1 - t0)
        record("craftfn save (async: until written)", time.perf_counter() - t0)
        # The copy alone, into the same warm buffers: what an async save cannot avoid blocking for.
        staged = list(async_manager._staging.values())
        t0 = time.perf_counter()
        for buf, t in zip(staged, flat.values()):
            buf.copy_(t)
        record("host copy alone (copy_ into warm buffers)", time.perf_counter() - t0)
        del staged
        # torch.save, without and with fsync (it never fsyncs by itself).
        for sync in (False, True):
            path = root / f"torch-{next(counter)}"
            path.mkdir()
            t0 = time.perf_counter()
            torch.save(flat, path / "state.pt")
            if sync:
                fsync_path(path / "state.pt")
                fsync_path(path)
            record("torch.save + fsync" if sync else "torch.save (no fsync)", time.perf_counter() - t0)
        torch_file = path / "state.pt"
        # Restore (both files are in the page cache).
        with CheckpointManager(d) as m:
            t0 = time.perf_counter()
            restored = m.restore(state)
            record("craftfn restore (xxh3_128 verified)", time.perf_counter() - t0)
        del restored
        # The same state saved as craftfn wrote it before (format 1: sha256), then restored.
        old = root / f"format1-{next(counter)}"
        with WritingFormat1(), CheckpointManager(old, async_save=False) as m:
            m.save(1, state)
        with CheckpointManager(old) as m:
            t0 = time.perf_counter()
            restored = m.restore(state)
            record("craftfn restore of a format-1 checkpoint (sha256 verified)", time.perf_counter() - t0)
        del restored
        t0 = time.perf_counter()
        loaded = torch.load(torch_file, weights_only=True)
        record("torch.load (weights_only)", time.perf_counter() - t0)
        del loaded
        # What verification costs by itself: the checksums over the same bytes (one core each).
        blob = (d / "step_00000001" / "state.safetensors").read_bytes()
        t0 = time.perf_counter()
        xxhash.xxh3_128(blob).hexdigest()
        record("xxh3_128 alone (xxhash, one core)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        hashlib.sha256(blob).hexdigest()
        record("sha256 alone (hashlib, one core)", time.perf_counter() - t0)
        sizes = {"craftfn state.safetensors bytes": len(blob), "torch .pt bytes": torch_file.stat().st_size}
        del blob
        for p in root.iterdir():
            if p.name != "async":
                shutil.rmtree(p, ignore_errors=True)
    async_manager.close()
    clean()
    return {"elements": n, "bytes": n * 4, "seconds": results, "sizes": sizes}


RESTORE_METHODS = (
    "torch.load (weights_only)",
    "torch.load + copy into the state (load_state_dict's work)",
    "craftfn restore (xxh3_128 verified)",
    "craftfn restore, donate=True (read into the template)",
    "craftfn restore of a format-1 checkpoint (sha256 verified)",
)


def bench_restore_fresh(millions: float, repeats: int, root: Path) -> dict:
    """Restore times, each in a new process (as a resumed run restores), the methods rotated per round.

    In one long process the allocator's state decides the result: a restore that gets freed,
    still-mapped memory skips the page faults of new memory (a third of the time at 0.4 GB), so
    the method measured first after a large free wins. A new process per measurement gives every
    method the same start: the template state (zeros, mapped) exists, the files are in the page cache.
    """
    state = big_state(millions)
    with CheckpointManager(root / "fresh" / "v2", async_save=False) as m:
        m.save(1, state)
    with WritingFormat1(), CheckpointManager(root / "fresh" / "v1", async_save=False) as m:
        m.save(1, state)
    torch.save(state_dict_of(state), root / "fresh" / "state.pt")
    del state
    results: dict[str, list[float]] = {}
    for r in range(repeats):
        for i in range(len(RESTORE_METHODS)):
            method = RESTORE_METHODS[(i + r) % len(RESTORE_METHODS)]
            out = subprocess.run(
                [sys.executable, __file__, "--restore-child", method, "--millions", str(millions), "--dir", str(root / "fresh")],
                capture_output=True, text=True, check=True,
            )
            results.setdefault(method, []).append(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])
    shutil.rmtree(root / "fresh", ignore_errors=True)
    return {"seconds": results}


def restore_child(method: str, millions: float, directory: Path) -> None:
    """One restore in this new process; prints ``{"seconds": ...}``."""
    template = big_state(millions, random=False)
    t0 = time.perf_counter()
    if method.startswith("torch.load"):
        loaded = torch.load(directory / "state.pt", weights_only=True)
        if "copy" in method:
            with torch.no_grad():
                for name, t in state_dict_of(template).items():
                    t.copy_(loaded[name])
    else:
        folder = directory / ("v1" if "format-1" in method else "v2")
        with CheckpointManager(folder) as m:
            m.restore(template, donate="donate" in method)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def bench_training(steps: int, save_every: int, root: Path, n_layer: int, n_embd: int, rounds: int) -> dict:
    """Mean step time of three identical runs (no saving, async, sync), interleaved block by block.

    Each round runs ``steps`` steps of every mode in turn (a save every ``save_every`` steps, the
    pending write waited for inside the block's time at its end), so a change in machine load hits
    all modes alike; the median over rounds is reported.
    """
    cfg = GPTConfig(vocab_size=256, block_size=64, n_layer=n_layer, n_head=4, n_embd=n_embd)
    tokens = torch.randint(0, 256, (20000,), generator=torch.Generator().manual_seed(0))
    tx = optim.adamw(3e-4) if hasattr(optim, "adamw") else optim.sgd(3e-2, momentum=0.9)
    modes = ["no saving", "async save", "sync save"]
    step = make_train_step(lm_loss, donate=True)
    runs = {}
    for mode in modes:
        torch.manual_seed(0)
        state = TrainState.create(model=GPT(cfg), tx=tx)
        manager = None
        if mode != "no saving":
            manager = CheckpointManager(root / mode.replace(" ", "_"), keep_last=2, async_save=(mode == "async save"))
        runs[mode] = [state, manager, 0]
    batches = [random_window_batch(tokens, 8, 64, seed=0, step=i) for i in range(steps)]
    for mode in modes:  # warm-up, including one save
        state, manager, count = runs[mode]
        for b in batches[:3]:
            state, metrics = step(state, b)
        if manager is not None:
            manager.save(0, state)
            manager.wait()
        runs[mode][0] = state
    per_block: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for mode in modes:
            state, manager, count = runs[mode]
            t0 = time.perf_counter()
            for b in batches:
                state, metrics = step(state, b)
                count += 1
                # Saves fall mid-block, so the last write of a block overlaps training like every other
                # (a save on the block's last step would time its whole write as a flush).
                if manager is not None and (count + save_every // 2) % save_every == 0:
                    manager.save(count, state)
            float(metrics["loss"])
            if manager is not None:
                manager.wait()
            per_block[mode].append((time.perf_counter() - t0) / steps)
            runs[mode] = [state, manager, count]
    for mode in modes:
        if runs[mode][1] is not None:
            runs[mode][1].close()
    state = runs["no saving"][0]
    params = sum(x.numel() for x in state.params.values())
    from craftfn import tree

    state_bytes = sum(x.numel() * x.element_size() for x in tree.leaves(state))
    for p in root.iterdir():
        shutil.rmtree(p, ignore_errors=True)
    return {
        "params": params,
        "state_bytes": state_bytes,
        "steps": steps,
        "rounds": rounds,
        "save_every": save_every,
        "seconds_per_step": {m: statistics.median(v) for m, v in per_block.items()},
        "all_blocks": per_block,
        "optimizer": "adamw" if hasattr(optim, "adamw") else "sgd+momentum",
    }


def machine() -> dict:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - informational only
            return "?"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "cpu": sh("lscpu | grep 'Model name' | sed 's/.*: *//'"),
        "uptime": sh("uptime"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--millions", type=float, default=100.0, help="state size in million float32 elements")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=40, help="steps per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-save-restore", action="store_true", help="only the training-loop part")
    parser.add_argument("--skip-training", action="store_true", help="only the save/restore part")
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning threads on a shared 2-core machine)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="a quick check: 3M elements, 20 steps")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--restore-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore_child:
        torch.set_num_threads(args.threads)
        restore_child(args.restore_child, args.millions, Path(args.dir))
        return
    if args.small:
        args.millions, args.train_steps, args.repeats, args.n_layer, args.n_embd, args.rounds = 3.0, 20, 2, 2, 64, 1
    torch.set_num_threads(args.threads)
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    info = machine()
    print(json.dumps(info, indent=2))
    part1 = None
    if not args.skip_save_restore:
        part1 = bench_save_restore(args.millions, args.repeats, root)
        gb = part1["bytes"] / 1e9
        print(f"\n## save / restore: {part1['elements'] / 1e6:.1f}M float32 elements ({gb:.2f} GB), median of {args.repeats}")
        print("| operation | median s | GB/s | vs torch |")
        print("|---|---|---|---|")
        med = {k: statistics.median(v) for k, v in part1["seconds"].items()}
        for k, v in med.items():
            ref = med["torch.load (weights_only)"] if ("restore" in k or "load" in k or "alone" in k) else med["torch.save (no fsync)"]
            print(f"| {k} | {v:.3f} | {gb / v:.2f} | {v / ref:.2f}x |")
        print(json.dumps(part1["sizes"]))
        fresh = bench_restore_fresh(args.millions, args.repeats, root)
        part1["fresh_process_restore"] = fresh
        print(f"\n## restore in a new process each (as a resumed run), methods rotated, median of {args.repeats}")
        print("| operation | median s | GB/s | vs torch.load |")
        print("|---|---|---|---|")
        med = {k: statistics.median(v) for k, v in fresh["seconds"].items()}
        for k in RESTORE_METHODS:
            v = med[k]
            print(f"| {k} {[round(x, 3) for x in fresh['seconds'][k]]} | {v:.3f} | {gb / v:.2f} | {v / med[RESTORE_METHODS[0]]:.2f}x |")
    part2 = None
    if not args.skip_training:
        part2 = bench_training(args.train_steps, args.save_every, root, args.n_layer, args.n_embd, args.rounds)
        print(
            f"\n## step time: GPT {part2['params'] / 1e6:.2f}M params ({part2['optimizer']}, state {part2['state_bytes'] / 1e6:.0f} MB), "
            f"{part2['rounds']} interleaved rounds of {part2['steps']} steps per mode, save every {part2['save_every']}"
        )
        print("| mode | s/step | vs no saving |")
        print("|---|---|---|")
        base = part2["seconds_per_step"]["no saving"]
        for k, v in part2["seconds_per_step"].items():
            print(f"| {k} | {v * 1000:.1f} ms | {v / base:.3f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "save_restore": part1, "training": part2}, indent=2))
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
