"""Compiled craftfn step vs the compiled plain loop, in one process, steps interleaved.

``train_bench.py`` runs each variant in its own process, one after the other; on a shared machine
the load drifts between them by more than the gap being measured (its (e)/(d) ratio moved
0.81-1.52 between runs of the same code). Here both loops live in one process, start from the
same weights, see the same batches, and are timed in alternating rounds (d then e, then e then d,
...), so drift hits both alike. Compile seconds are not measured here (the second compile in a
process reuses the first one's warm state and kernels): ``train_bench.py`` measures them, each
variant in a fresh process with a fresh inductor cache.

Variants (as in ``train_bench.py``):

* ``d``: ``torch.compile(model)``, ``loss.backward()``, ``torch.optim.AdamW(fused=True)``,
  ``zero_grad(set_to_none=True)``.
* ``e``: ``make_train_step(lm_loss, donate=True, compile={"fullgraph": True})``: the loss's forward
  compiled (AOT autograd builds and partitions its backward, as for ``d``), the fused AdamW update
  and the ``grad_norm`` metric outside the graph.
* ``w`` (with ``--whole-step``): ``make_train_step(lm_loss, donate=True).compile_whole(fullgraph=True)``: the whole step (forward,
  backward, fused update, metrics) as one graph: what ``compile=`` compiled before issue 16j.

Reported per size: the median and minimum ms per step of each over all timed steps, the median of
the per-round ratios e/d (and w/d), and the losses after the same number of steps (equal up to compiled
rounding).

Run:
    python benchmarks/compiled_step_bench.py --size default --rounds 10 --steps 10
    python benchmarks/compiled_step_bench.py --size large --rounds 4 --steps 3
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from craftfn import TrainState, host_memory, make_train_step, optim
from craftfn.models.gpt import GPT, GPTConfig, lm_loss

SIZES: dict[str, dict[str, int]] = {  # train_bench.py's sizes
    "default": dict(n_layer=4, n_head=4, n_embd=128, batch=32, block=64),
    "large": dict(n_layer=8, n_head=12, n_embd=720, batch=32, block=64),
}
VOCAB, LR, WEIGHT_DECAY = 96, 3e-4, 0.1


def build(size: dict[str, int], whole_step: bool) -> tuple[dict[str, Callable[[dict[str, torch.Tensor]], torch.Tensor]], float]:
    """The loops, from the same initial weights; returns ``({name: step(batch) -> loss}, params in M)``."""
    cfg = GPTConfig(vocab_size=VOCAB, block_size=size["block"], n_layer=size["n_layer"], n_head=size["n_head"], n_embd=size["n_embd"])
    torch.manual_seed(0)
    plain = GPT(cfg)
    compiled = torch.compile(plain)
    opt = torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def d(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = F.cross_entropy(compiled(batch["input_ids"]).flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def craftfn_loop(step: Callable[..., Any]) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        """``step`` driving its own copy of the plain loop's initial weights."""
        model = GPT(cfg)
        model.load_state_dict(plain.state_dict())
        held = {"state": TrainState.create(model=model, tx=optim.adamw(LR, weight_decay=WEIGHT_DECAY), copy=False)}

        def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            held["state"], metrics = step(held["state"], batch)
            return metrics["loss"]

        return run

    loops = {"d": d, "e": craftfn_loop(make_train_step(lm_loss, donate=True, compile={"fullgraph": True}))}
    if whole_step:
        loops["w"] = craftfn_loop(make_train_step(lm_loss, donate=True).compile_whole(fullgraph=True))
    return loops, plain.num_params(non_embedding=False) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (order flips every round)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant per round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--whole-step", action="store_true", help="also time (w): the whole step as one graph, step.compile_whole()")
    parser.add_argument(
        "--keep-freed-memory", action="store_true",
        help="craftfn.host_memory.keep_freed_memory() for the whole process (both loops): what the Trainer applies",
    )
    args = parser.parse_args()
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        host_memory.keep_freed_memory()
    size = SIZES[args.size]
    gen = torch.Generator().manual_seed(1234)
    batches = [
        {k: torch.randint(0, VOCAB, (size["batch"], size["block"]), generator=gen) for k in ("input_ids", "labels")}
        for _ in range(args.warmup + args.steps)
    ]
    loops, millions = build(size, args.whole_step)
    first = {}
    for name, run in loops.items():  # first calls: compile (not comparable here, see the docstring)
        t0 = time.perf_counter()
        run(batches[0])
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in loops}
    ratios: dict[str, list[float]] = {name: [] for name in loops if name != "d"}
    loads = [os.getloadavg()[0]]
    for r in range(args.rounds):
        order = list(loops) if r % 2 == 0 else list(loops)[::-1]
        per_round = {}
        for name in order:
            run = loops[name]
            for b in batches[: args.warmup]:
                run(b)
            mine = []
            for b in batches[args.warmup :]:
                t0 = time.perf_counter()
                float(run(b))  # the loss on the host, as a training loop logging it
                mine.append((time.perf_counter() - t0) * 1e3)
            times[name] += mine
            per_round[name] = statistics.median(mine)
        for name in ratios:
            ratios[name].append(per_round[name] / per_round["d"])
    loads.append(os.getloadavg()[0])
    losses = {name: float(run(batches[0])) for name, run in loops.items()}  # same number of steps each
    result: dict[str, Any] = {
        "size": args.size,
        "params_m": round(millions, 2),
        "threads": args.threads,
        "keep_freed_memory": host_memory.keeping_freed_memory(),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "first_call_s": {k: round(v, 1) for k, v in first.items()},
        "median_ms": {k: round(statistics.median(v), 2) for k, v in times.items()},
        "min_ms": {k: round(min(v), 2) for k, v in times.items()},
        **{f"ratio_{n}_over_d_medians": round(statistics.median(times[n]) / statistics.median(times["d"]), 4) for n in ratios},
        **{f"ratio_{n}_over_d_minima": round(min(times[n]) / min(times["d"]), 4) for n in ratios},
        **{f"ratio_{n}_over_d_per_round": [round(x, 3) for x in v] for n, v in ratios.items()},
        **{f"ratio_{n}_over_d_median_of_rounds": round(statistics.median(v), 4) for n, v in ratios.items()},
        "loss_after": losses,
        "load_1m": loads,
        "machine": f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
