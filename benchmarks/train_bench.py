"""Training-step benchmark: craftfn's pure step against the plain PyTorch loop, same model, same batches.

The reference GPT (craftfn.models.gpt) at the default job's size (gin/char_gpt.gin: 4 layers,
4 heads, width 128, batch 32 x 64 characters) and at ~50M parameters, trained with AdamW on
the same pre-generated batches. Variants:

  a        plain PyTorch: module forward, loss.backward(), torch.optim.AdamW(fused=True),
           zero_grad(set_to_none=True)
  b        craftfn pure: make_train_step(lm_loss), optim.adamw
  c        craftfn donated: make_train_step(lm_loss, donate=True)
  d        (a) with torch.compile(model) (inductor)
  e        craftfn compiled: make_train_step(lm_loss, donate=True, compile={"fullgraph": True})
  a_bf16   (a) with torch.autocast(bfloat16) around forward and loss
  c_bf16   (c) with policy="bf16"
  a_remat  (a) with torch.utils.checkpoint around every block
  c_remat  (c) with remat="transformer.h.*"

Each variant runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its own; on CUDA
``torch.cuda.max_memory_allocated`` is reported instead. Reported: median ms per timed step,
tokens/s, peak memory, memory added by training (peak minus the RSS after building model and
optimizer), compile seconds (first step minus the median step), final loss, and ratios to (a).

Usage:
    python benchmarks/train_bench.py                                  # everything (slow on 2 CPUs)
    python benchmarks/train_bench.py --sizes default --variants a,b,c --steps 5
    python benchmarks/train_bench.py --device cuda --sizes large --variants a,c,e,c_bf16 --dtype-note
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SIZES: dict[str, dict[str, int]] = {
    # gin/char_gpt.gin + gin/models/gpt_small.gin (~0.8M parameters with a ~100-character vocabulary).
    "default": dict(n_layer=4, n_head=4, n_embd=128, batch=32, block=64),
    # ~50M parameters: GPT-2-small-like width, the same batch shape.
    "large": dict(n_layer=8, n_head=12, n_embd=720, batch=32, block=64),
}
VOCAB = 96  # about the character vocabulary of the default job's corpus
VARIANTS = {
    "a": "plain PyTorch loop, AdamW(fused=True)",
    "b": "craftfn pure step",
    "c": "craftfn donated step",
    "d": "(a) + torch.compile(model)",
    "e": "craftfn compiled donated step",
    "a_bf16": "(a) + autocast bf16",
    "c_bf16": "(c) + policy='bf16'",
    "a_remat": "(a) + checkpoint per block",
    "c_remat": "(c) + remat='transformer.h.*'",
}
LR, WEIGHT_DECAY = 3e-4, 0.1


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from craftfn import TrainState, make_train_step, optim
    from craftfn.models.gpt import GPT, GPTConfig, lm_loss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = SIZES[args.size]
    variant = args.variant
    cfg = GPTConfig(vocab_size=VOCAB, block_size=size["block"], n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"])
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    n_params = model.num_params(non_embedding=False)
    total = args.warmup + args.steps
    gen = torch.Generator().manual_seed(1234)
    batches = [
        {
            "input_ids": torch.randint(0, VOCAB, (size["batch"], size["block"]), generator=gen).to(device),
            "labels": torch.randint(0, VOCAB, (size["batch"], size["block"]), generator=gen).to(device),
        }
        for _ in range(total)
    ]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    if variant.startswith("a") or variant == "d":
        net = model
        if variant == "a_remat":
            from craftfn import remat

            net = remat.checkpoint_modules(model, "transformer.h.*")
        if variant == "d":
            net = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant == "a_bf16")

        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with autocast:
                logits = net(batch["input_ids"])
                loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()

    else:
        kwargs: dict[str, Any] = {"donate": variant != "b"}
        if variant == "e":
            kwargs["compile"] = {"fullgraph": True}
        if variant == "c_bf16":
            kwargs["policy"] = "bf16"
        if variant == "c_remat":
            kwargs["remat"] = "transformer.h.*"
        step = make_train_step(lm_loss, **kwargs)
        # copy=False: the state shares the module's storage, so memory compares like for like.
        holder = {"state": TrainState.create(model=model, tx=optim.adamw(LR, weight_decay=WEIGHT_DECAY), copy=False)}

        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            holder["state"], metrics = step(holder["state"], batch)
            return metrics["loss"]

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    setup_rss = _rss_mb()
    times, loss = [], None
    for batch in batches:
        sync()
        t0 = time.perf_counter()
        loss = run(batch)
        sync()
        times.append(time.perf_counter() - t0)
    timed = times[args.warmup :]
    median = statistics.median(timed)
    tokens = size["batch"] * size["block"]
    out = {
        "size": args.size,
        "variant": variant,
        "params_m": n_params / 1e6,
        "tokens_per_step": tokens,
        "steps": args.steps,
        "ms_per_step": median * 1e3,
        "ms_min": min(timed) * 1e3,
        "tokens_per_s": tokens / median,
        "first_step_s": times[0],
        "compile_s": max(0.0, times[0] - median) if variant in ("d", "e") else None,
        "peak_rss_mb": _rss_mb(),
        "setup_rss_mb": setup_rss,
        "final_loss": float(loss),
    }
    if device.type == "cuda":
        out["max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        flops_per_token = model.flops_per_token(size["block"])
        out["mfu"] = flops_per_token * out["tokens_per_s"] / args.peak_flops
    return out


def run_variant(args: argparse.Namespace, size: str, variant: str) -> dict[str, Any]:
    steps = args.large_steps if size == "large" else args.steps
    cmd = [
        sys.executable, os.path.abspath(__file__), "--worker", "--size", size, "--variant", variant,
        "--steps", str(steps), "--warmup", str(args.large_warmup if size == "large" else args.warmup), "--threads", str(args.threads),
        "--device", args.device, "--peak-flops", str(args.peak_flops),
    ]
    load_before = os.getloadavg()[0]
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc: allocations above this size get their own mapping, returned to the OS on free,
        # so RSS tracks live tensors instead of what the heap kept after fragmentation.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    with tempfile.TemporaryDirectory(prefix="train_bench_inductor_") as cache:
        if not args.warm_cache:
            # Compile seconds from a cold cache for every variant: inductor's on-disk caches (FX graph,
            # AOT autograd) otherwise let a variant compiled by an earlier run load in seconds, and
            # (d) and (e) hit them differently (measured: (d) 2.6 s warm, about 26 s cold).
            env["TORCHINDUCTOR_CACHE_DIR"] = cache
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return {"size": size, "variant": variant, "error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["load_1m"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| size | variant | ms/step | min ms | tokens/s | x (a) time | peak MB | +train MB | x (a) peak | compile s | final loss | load 1m |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = {r["size"]: r for r in results if r.get("variant") == "a" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['variant']} | error: {' '.join(r['error'])[:120]} |")
            continue
        a = base.get(r["size"])
        mem = r.get("max_allocated_mb", r["peak_rss_mb"])
        added = r["peak_rss_mb"] - r["setup_rss_mb"] if "max_allocated_mb" not in r else mem
        a_mem = (a.get("max_allocated_mb", a["peak_rss_mb"])) if a else None
        compile_s = "" if r["compile_s"] is None else f"{r['compile_s']:.1f}"
        lines.append(
            f"| {r['size']} ({r['params_m']:.1f}M) | {r['variant']}: {VARIANTS[r['variant']]} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} | "
            f"{r['tokens_per_s']:.0f} | {r['ms_per_step'] / a['ms_per_step']:.3f} | {mem:.0f} | {added:.0f} | "
            f"{mem / a_mem:.3f} | {compile_s} | {r['final_loss']:.4f} | "
            f"{r['load_1m'][0]}-{r['load_1m'][1]} |"
            if a
            else f"| {r['size']} | {r['variant']} | {r['ms_per_step']:.1f} | {r['ms_min']:.1f} | {r['tokens_per_s']:.0f} | - | {mem:.0f} | {added:.0f} | - | - | {r['final_loss']:.4f} | - |"
        )
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> list[str]:
    by = {(r["size"], r["variant"]): r for r in results if "error" not in r}
    out = []
    for size in dict.fromkeys(r["size"] for r in results):
        get = lambda v, size=size: by.get((size, v))  # noqa: E731
        a, c, d, e, cr = get("a"), get("c"), get("d"), get("e"), get("c_remat")
        if a and c:
            ratio = c["ms_per_step"] / a["ms_per_step"]
            out.append(f"{size}: (c)/(a) time = {ratio:.3f} (target <= 1.05: {'met' if ratio <= 1.05 else f'missed by {ratio - 1.05:.3f}'})")
        if d and e:
            ratio = e["ms_per_step"] / d["ms_per_step"]
            out.append(f"{size}: (e)/(d) time = {ratio:.3f} (target <= 1.0: {'met' if ratio <= 1.0 else f'missed by {ratio - 1.0:.3f}'})")
        if c and cr:
            mem = cr["peak_rss_mb"] / c["peak_rss_mb"]
            added = (cr["peak_rss_mb"] - cr["setup_rss_mb"]) / max(1e-9, c["peak_rss_mb"] - c["setup_rss_mb"])
            slow = cr["ms_per_step"] / c["ms_per_step"]
            out.append(
                f"{size}: remat peak = {mem:.3f}x of (c) (cut {1 - mem:.1%}; target >= 30%), memory added by training "
                f"{added:.3f}x, time {slow:.3f}x (target <= 1.35)"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="default,large", help=f"comma list of {sorted(SIZES)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant (default size)")
    parser.add_argument("--large-steps", type=int, default=3, help="timed steps per variant at the large size")
    parser.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, interleaved; keep each variant's fastest run (robust to a shared machine's load)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles happen here)")
    parser.add_argument("--large-warmup", type=int, default=1, help="untimed steps at the large size")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--peak-flops", type=float, default=990e12, help="for MFU on CUDA (H200 bf16 dense ~990e12)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per variant")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR) across runs; default: a fresh one per variant, so compile seconds are cold")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, help="set glibc MALLOC_MMAP_THRESHOLD_ (bytes) in the workers (0: leave it)")
    parser.add_argument("--from-json", default=None, help="only print the table and targets of saved results (comma list of files)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.from_json:
        results = []
        for path in args.from_json.split(","):
            with open(path) as f:
                results += json.load(f)
        print(table(results))
        print()
        for line in targets(results):
            print("- " + line)
        return
    sizes, variants = args.sizes.split(","), args.variants.split(",")
    for name, allowed, chosen in (("--sizes", SIZES, sizes), ("--variants", VARIANTS, variants)):
        bad = [x for x in chosen if x not in allowed]
        if bad:
            parser.error(f"{name}: unknown {bad}; allowed: {list(allowed)}")
    import torch

    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, threads={args.threads}, device={args.device}, steps={args.steps} (+{args.warmup} warm-up)", flush=True)
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for size in sizes:
        for rep in range(args.repeat):
            for variant in variants:
                r = run_variant(args, size, variant)
                r["repeat"] = rep
                print(json.dumps(r), flush=True)
                key = (size, variant)
                if key not in best or ("error" in best[key] and "error" not in r) or (
                    "error" not in r and r["ms_per_step"] < best[key]["ms_per_step"]
                ):
                    best[key] = r
    results = list(best.values())
    print()
    print(table(results))
    print()
    for line in targets(results):
        print("- " + line)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
