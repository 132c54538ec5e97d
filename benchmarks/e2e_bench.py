"""End to end: nanoGPT's CPU character run, as a plain PyTorch loop and as craftfn, in one run.

The configuration is nanoGPT's ``shakespeare_char`` run with its CPU flags (``--device=cpu
--compile=False --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4
--n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``): 4 layers,
4 heads, width 128, no biases, block 64, batch 12, 2000 iterations, AdamW lr 1e-3 with 100
warm-up iterations then cosine to 1e-4, betas (0.9, 0.99), gradient clipping at 1.0, weight
decay 0.1 on matrices only. The text is craftfn's embedded corpus (1 MB of the Python standard
library's source, character tokens, the last 10% held out).

Variants, each in a fresh process, one after the other:

* ``plain``: the loop nanoGPT's train.py runs on a CPU, written out by hand: the model as a
  module, ``torch.optim.AdamW`` with its parameter groups (nanoGPT asks for ``fused=True`` only
  on CUDA, so on a CPU it runs the default foreach implementation), the learning rate set per
  iteration, ``clip_grad_norm_``, ``loss.item()`` every iteration (log_interval=1).
* ``craftfn``: ``make_train_step(lm_loss, donate=True)`` driven by the ``Trainer``, optimizer
  ``chain(clip_by_global_norm(1.0), adamw(schedule, mask=matrices))`` (fused AdamW kernel, the
  clip folded into it), fp32.
* ``craftfn_compiled``: the same with ``compile=True`` (the forward with its backward, and the eval step, compiled;
  compile time counts in the wall time).

Both sides see the same batches (``random_window_batch``, a function of the step), the same
learning rates (nanoGPT's ``get_lr``) and the same initial weights, and evaluate the
validation loss on the same 20 batches every 250 iterations (nanoGPT's estimate_loss also
evaluates the train split; neither side does here). After training, and outside the timed
part, each model's validation loss is measured on 200 fixed validation batches.

Reported: wall time of the 2000 iterations (evaluations included), the ratio to ``plain``,
the final validation loss of each, and the wall time at which each variant's periodic
validation loss first comes within 0.02 of the plain loop's final one.

Run:
    python benchmarks/e2e_bench.py                        # all variants, ~6-8 minutes on 2 cores
    python benchmarks/e2e_bench.py --iters 200 --variants plain,craftfn   # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from craftfn import TrainState, data, make_eval_step, make_train_step, optim
from craftfn.models import GPT, GPTConfig, lm_eval_metrics, lm_loss
from craftfn.training import Trainer
from craftfn.training.callbacks import Callback

# nanoGPT shakespeare_char with its CPU flags.
N_LAYER, N_HEAD, N_EMBD, BLOCK, BATCH = 4, 4, 128, 64, 12
LR, MIN_LR, WARMUP, DECAY_ITERS = 1e-3, 1e-4, 100, 2000
BETAS, WEIGHT_DECAY, CLIP = (0.9, 0.99), 0.1, 1.0
EVAL_INTERVAL, EVAL_ITERS, FINAL_EVAL_BATCHES = 250, 20, 200
DATA_SEED, EVAL_SEED, FINAL_SEED, INIT_SEED = 0, 1, 2, 1337
TOLERANCE = 0.02


def nanogpt_lr(it: int) -> float:
    """nanoGPT's get_lr: linear warm-up, cosine decay to MIN_LR, then MIN_LR."""
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY_ITERS:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY_ITERS - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def nanogpt_lr_schedule(count: Any) -> torch.Tensor:
    """The same function of a 0-d step tensor, without host reads (a craftfn schedule)."""
    it = torch.as_tensor(count).to(torch.float64)
    warm = LR * (it + 1) / (WARMUP + 1)
    ratio = torch.clamp((it - WARMUP) / (DECAY_ITERS - WARMUP), 0.0, 1.0)
    cosine = MIN_LR + 0.5 * (1.0 + torch.cos(math.pi * ratio)) * (LR - MIN_LR)
    return torch.where(it < WARMUP, warm, torch.where(it > DECAY_ITERS, torch.full_like(it, MIN_LR), cosine))


def corpus() -> tuple[torch.Tensor, torch.Tensor, int]:
    text = data.stdlib_corpus(1_000_000)
    tok = data.CharTokenizer.from_text(text)
    train, val = data.train_val_split(tok.encode_tensor(text), 0.1)
    return train, val, tok.vocab_size


def model_config(vocab: int) -> GPTConfig:
    return GPTConfig(vocab_size=vocab, block_size=BLOCK, n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, dropout=0.0, bias=False)


def new_model(vocab: int) -> GPT:
    torch.manual_seed(INIT_SEED)
    return GPT(model_config(vocab))


def fixed_batches(tokens: torch.Tensor, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [data.random_window_batch(tokens, BATCH, BLOCK, seed=seed, step=i) for i in range(n)]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    was = model.training
    model.eval()
    total = sum(F.cross_entropy(model(b["input_ids"]).flatten(0, 1), b["labels"].flatten()).item() for b in batches)
    model.train(was)
    return total / len(batches)


def run_plain(iters: int, train: torch.Tensor, val: torch.Tensor, vocab: int) -> dict[str, Any]:
    """nanoGPT's train.py loop on a CPU."""
    model = new_model(vocab)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)  # nanoGPT: fused only when device_type == 'cuda'
    evals = fixed_batches(val, EVAL_ITERS, EVAL_SEED)
    curve = []
    t0 = time.perf_counter()
    for it in range(iters):
        lr = nanogpt_lr(it)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = data.random_window_batch(train, BATCH, BLOCK, seed=DATA_SEED, step=it)
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # log_interval=1
        if (it + 1) % EVAL_INTERVAL == 0 or it + 1 == iters:
            curve.append((it + 1, time.perf_counter() - t0, mean_loss(model, evals)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "curve": curve, "final_val_loss": mean_loss(model, fixed_batches(val, FINAL_EVAL_BATCHES, FINAL_SEED))}


class _Curve(Callback):
    def __init__(self, t0: list[float]) -> None:
        super().__init__()
        self.t0, self.points = t0, []

    def on_eval_end(self, trainer: Trainer, event: Any) -> None:
        self.points.append((event.step, time.perf_counter() - self.t0[0], float(event.metrics["loss"])))


def run_craftfn(iters: int, train: torch.Tensor, val: torch.Tensor, vocab: int, compile: bool) -> dict[str, Any]:
    model = new_model(vocab)
    tx = optim.chain(
        optim.clip_by_global_norm(CLIP),
        optim.adamw(nanogpt_lr_schedule, b1=BETAS[0], b2=BETAS[1], weight_decay=WEIGHT_DECAY, mask=lambda name, p: p.ndim >= 2),
    )
    state = TrainState.create(model=model, tx=tx)
    step = make_train_step(lm_loss, donate=True, compile=compile)
    eval_step = make_eval_step(lm_eval_metrics, compile=compile)
    t0 = [0.0]
    curve = _Curve(t0)
    trainer = Trainer(
        step, lambda s: data.random_window_batch(train, BATCH, BLOCK, seed=DATA_SEED, step=s),
        eval_step=eval_step, eval_data=fixed_batches(val, EVAL_ITERS, EVAL_SEED),
        max_steps=iters, eval_every=EVAL_INTERVAL, callbacks=[curve],
    )
    t0[0] = time.perf_counter()
    state = trainer.fit(state)
    wall = time.perf_counter() - t0[0]
    model.load_state_dict({**state.params, **state.buffers}, strict=False)
    return {
        "wall_s": wall,
        "curve": curve.points,
        "compile_s": trainer.compile_seconds,
        "final_val_loss": mean_loss(model, fixed_batches(val, FINAL_EVAL_BATCHES, FINAL_SEED)),
    }


def child(variant: str, iters: int) -> None:
    train, val, vocab = corpus()
    if variant == "plain":
        out = run_plain(iters, train, val, vocab)
    else:
        out = run_craftfn(iters, train, val, vocab, compile=variant == "craftfn_compiled")
    out.update(variant=variant, threads=torch.get_num_threads(), load_after=os.getloadavg()[0])
    print("RESULT " + json.dumps(out))


def machine() -> dict[str, str]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001 - informational only
            return "?"

    return {"cpu": sh("lscpu | grep 'Model name' | sed 's/.*: *//'"), "nproc": sh("nproc"), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--variants", default="plain,craftfn,craftfn_compiled")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.iters)
        return
    info = machine()
    print(f"e2e_bench: nanoGPT CPU char config, {args.iters} iterations; {info['nproc']} cores, {info['cpu']}, torch {info['torch']}")
    print(f"start {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, load {os.getloadavg()}")
    results = {}
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--iters", str(args.iters)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            raise SystemExit(f"variant {variant} failed")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        r = results[variant]
        print(f"  {variant}: {r['wall_s']:.1f} s, final val loss {r['final_val_loss']:.4f}, load after {r['load_after']:.2f}")
    base = results.get("plain")
    print()
    print(f"| variant | wall s ({args.iters} it, evals incl.) | x plain | compile s | final val loss (200 batches) | - plain | "
          "first eval within 0.02 of plain's final: step, s, x plain wall |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for variant, r in results.items():
        ratio = f"{r['wall_s'] / base['wall_s']:.3f}" if base else ""
        diff = f"{r['final_val_loss'] - base['final_val_loss']:+.4f}" if base else ""
        reach = ""
        if base:
            target = base["curve"][-1][2] + TOLERANCE
            hit = next(((s, t) for s, t, v in r["curve"] if v <= target), None)
            reach = f"step {hit[0]}, {hit[1]:.1f} s, {hit[1] / base['wall_s']:.3f}x" if hit else "never"
        compile_s = f"{r['compile_s']:.1f}" if r.get("compile_s") else ""
        print(f"| {variant} | {r['wall_s']:.1f} | {ratio} | {compile_s} | {r['final_val_loss']:.4f} | {diff} | {reach} |")
    print(f"end {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, load {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
