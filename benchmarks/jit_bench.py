"""craftfn.jit and keyed dropout against their peers, on the default job's model.

The model is gin/char_gpt.gin's GPT (4 layers, 4 heads, width 128, context 64, batch 32, a
96-symbol vocabulary) with dropout on (``--dropout``, default 0.1; the job itself trains with 0.0).
Everything runs in one process; variants take turns step by step after their warm-up, and each
reports its median step time, so a shared machine's load hits all of them alike.

Part 1, eager dropout cost (``--part eager``). A plain PyTorch loop (module forward,
``loss.backward()``, ``torch.optim.AdamW(fused=True)``) in four variants: torch's own dropout
(``native``), the same loop with the forward inside ``craftfn.random.module_rng(key)`` so dropout
and attention dropout draw from the key (``keyed``), and both with dropout 0 (``native_p0``,
``keyed_p0``: the scope's overhead without draws). The dropout cost of a variant is its step time
minus its p=0 twin's; also craftfn's eager donated step (keyed, as every craftfn step is). Then
the dropout ops alone at the model's shapes (forward and backward).

Part 2, compiled (``--part compiled``): ``craftfn.jit`` of the README's hand-written step
(``value_and_grad`` + ``apply_gradients(donate=True)``, dropout from the step key) against
``make_train_step(lm_loss, donate=True, compile=True)`` (since issue 16j: the forward compiled, AOT
autograd's backward, the update outside the graph; the jitted step is one graph), both inductor, same
model, same batches,
and the plain PyTorch loop with ``torch.compile(model)`` (forward and backward compiled, torch's
own dropout, ``torch.optim.AdamW(fused=True)`` outside the graph) as the peer.

Usage:
    python benchmarks/jit_bench.py                       # both parts
    python benchmarks/jit_bench.py --part eager --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from craftfn import TrainState, jit, make_train_step, optim, random, value_and_grad
from craftfn.models.gpt import GPT, GPTConfig, lm_loss

VOCAB, BLOCK, BATCH = 96, 64, 32
LR, WEIGHT_DECAY = 3e-4, 0.1


def gpt(dropout: float) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=4, n_head=4, n_embd=128, dropout=dropout))


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [
        {"input_ids": torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g), "labels": torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)}
        for _ in range(n)
    ]


def plain_loop(dropout: float, keyed: bool, compiled: bool = False) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    model = gpt(dropout).train()
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
    root, count = random.key(0), [0]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        count[0] += 1
        scope = random.module_rng(random.fold_in(root, count[0])) if keyed else contextlib.nullcontext()
        with scope:
            logits = forward(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return run


def craftfn_loop(dropout: float, compiled: bool = False) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    step = make_train_step(lm_loss, donate=True, compile=compiled)
    holder = {"state": TrainState.create(model=gpt(dropout), tx=optim.adamw(LR, weight_decay=WEIGHT_DECAY))}

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return run


def hand_written_step(state: TrainState, batch: dict[str, torch.Tensor]) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The README's step: the loss draws dropout from the step key; the update donates the state."""
    rng = random.fold_in(state.rng, state.step)

    def loss(params: Any) -> torch.Tensor:
        logits = state.apply(params, batch["input_ids"], rng=rng, training=True)
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    value, grads = value_and_grad(loss)(state.params)
    return state.apply_gradients(grads, donate=True), {"loss": value}


def jit_loop(dropout: float) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    step = jit(hand_written_step, donate_argnums=0)
    holder = {"state": TrainState.create(model=gpt(dropout), tx=optim.adamw(LR, weight_decay=WEIGHT_DECAY))}

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        holder["state"], metrics = step(holder["state"], batch)
        return metrics["loss"]

    return run


def interleaved(variants: dict[str, Callable[[Any], Any]], data: list[Any], warmup: int) -> dict[str, dict[str, float]]:
    """Warm every variant up (compiles happen here), then run them in rotating turns; per-variant timings."""
    first: dict[str, float] = {}
    for name, run in variants.items():
        t0 = time.perf_counter()
        for batch in data[:warmup]:
            run(batch)
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for i, batch in enumerate(data[warmup:]):
        # Rotate who goes first, so no variant always runs right after the same neighbour.
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            variants[name](batch)
            times[name].append(time.perf_counter() - t0)
    return {
        name: {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3, "warmup_s": first[name]}
        for name, ts in times.items()
    }


def op_costs(p: float, reps: int) -> list[tuple[str, float, float]]:
    """Forward + backward of the model's dropout sites, native vs keyed (median ms per call)."""
    x = torch.randn(BATCH, BLOCK, 128, requires_grad=True)
    q, k, v = (torch.randn(BATCH, 4, BLOCK, 32, requires_grad=True) for _ in range(3))
    sdpa = F.scaled_dot_product_attention
    cases = {
        "dropout (32, 64, 128): embeddings, residual, MLP": lambda: F.dropout(x, p, True).sum().backward(),
        "attention (32, 4, 64, 64) weights, SDPA causal": lambda: sdpa(q, k, v, dropout_p=p, is_causal=True).sum().backward(),
    }
    rows = []
    keys = [random.fold_in(random.key(0), i) for i in range(reps + 3)]  # derived outside the timing
    for name, fn in cases.items():
        timings: dict[str, list[float]] = {"native": [], "keyed": []}
        for i in range(reps + 3):
            for mode in ("native", "keyed"):
                scope = random.module_rng(keys[i]) if mode == "keyed" else contextlib.nullcontext()
                t0 = time.perf_counter()
                with scope:
                    fn()
                if i >= 3:
                    timings[mode].append(time.perf_counter() - t0)
        rows.append((name, statistics.median(timings["native"]) * 1e3, statistics.median(timings["keyed"]) * 1e3))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="eager,compiled", help="comma list of: eager, compiled")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compiles happen here)")
    parser.add_argument("--op-reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, as the default job)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = args.part.split(",")
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, threads={torch.get_num_threads()}, dropout={args.dropout}, steps={args.steps} (+{args.warmup} warm-up), "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    data = batches(args.warmup + args.steps)
    p = args.dropout
    if "eager" in parts:
        res = interleaved(
            {
                "native_p0": plain_loop(0.0, keyed=False),
                "native": plain_loop(p, keyed=False),
                "keyed_p0": plain_loop(0.0, keyed=True),
                "keyed": plain_loop(p, keyed=True),
                "craftfn_p0": craftfn_loop(0.0),
                "craftfn": craftfn_loop(p),
            },
            data,
            args.warmup,
        )
        print("\n| eager step (plain PyTorch loop unless craftfn) | median ms | min ms | x native |")
        print("|---|---:|---:|---:|")
        for name, r in res.items():
            print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ms'] / res['native']['median_ms']:.3f} |")
        native_cost = res["native"]["median_ms"] - res["native_p0"]["median_ms"]
        keyed_cost = res["keyed"]["median_ms"] - res["keyed_p0"]["median_ms"]
        print(f"\ndropout cost per step: native {native_cost:.1f} ms, keyed {keyed_cost:.1f} ms ({keyed_cost / native_cost:.3f}x); "
              f"scope overhead at p=0: {res['keyed_p0']['median_ms'] / res['native_p0']['median_ms']:.3f}x; "
              f"whole step keyed/native {res['keyed']['median_ms'] / res['native']['median_ms']:.3f}x")
        print("\n| dropout op, forward + backward | native ms | keyed ms | keyed / native |")
        print("|---|---:|---:|---:|")
        for name, native_ms, keyed_ms in op_costs(p, args.op_reps):
            print(f"| {name} | {native_ms:.2f} | {keyed_ms:.2f} | {keyed_ms / native_ms:.3f} |")
    if "compiled" in parts:
        res = interleaved(
            {
                "make_train_step(compile=True)": craftfn_loop(p, compiled=True),
                "craftfn.jit(hand-written step)": jit_loop(p),
                "plain loop, torch.compile(model)": plain_loop(p, keyed=False, compiled=True),
            },
            data,
            args.warmup,
        )
        base = res["make_train_step(compile=True)"]["median_ms"]
        print("\n| compiled step (inductor, donated) | median ms | min ms | x make_train_step | warm-up s (compile) |")
        print("|---|---:|---:|---:|---:|")
        for name, r in res.items():
            print(f"| {name} | {r['median_ms']:.1f} | {r['min_ms']:.1f} | {r['median_ms'] / base:.3f} | {r['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
