"""Optimizer-step benchmark: craftfn's AdamW (pure, donated, clipped) against torch.optim.AdamW and TorchOpt.

Parameters have GPT-like shapes (token and position embeddings; per layer qkv and output
projections, MLP matrices, biases, LayerNorm weights and biases). Every variant gets the
same fixed gradients and hyperparameters (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight
decay 0.01) and only the optimizer step is timed:

* craftfn adamw pure:      ``updates, s = tx.update(g, s, p); p = apply_updates(p, updates)``
* craftfn adamw pure, craftfn.jit: the same two calls compiled together by ``craftfn.jit`` (inductor):
  the pointwise rule fuses into kernels that read g, mu, nu, p once and write mu', nu', p' (the
  updates are never materialised). Its compile seconds (first call) are reported apart from the
  step times, and its first step is checked against the eager pure update on the same inputs
* craftfn adamw pure step: the update of a non-donated ``make_train_step``: copies of the params and
  optimizer state updated in place by the fused kernel (the input state stays intact)
* craftfn adamw donated:   ``state = state.apply_gradients(g, donate=True)`` (fused kernel)
* craftfn clip+adamw don.: ``chain(clip_by_global_norm(1.0), adamw)``, donated
* craftfn inject(adamw) don.: ``inject_hyperparams(adamw, static_args=(...))(learning_rate=...)``, donated
  (only the learning rate is a tensor: torch's fused kernel takes it), and with every hyperparameter
  a tensor (the donated step then runs as in-place ``_foreach`` ops)
* torch AdamW for-loop / foreach / fused: ``torch.optim.AdamW(foreach=False | foreach=True | fused=True)``
* torch clip_grad_norm_ + AdamW fused: the usual torch loop with clipping (the peer of craftfn clip+adamw)
* TorchOpt adamw (if installed): functional ``update(..., inplace=False)`` + ``apply_updates(inplace=False)``,
  and its default in-place mode.

Each variant runs beside its own reference, their steps alternating, so load from other
processes hits both alike and the working set stays small: ``torch.optim.AdamW(fused=True)``,
except the pure step (paired with craftfn's donated step: the price of purity) and craftfn's
clip+adamw (paired with torch's ``clip_grad_norm_`` + fused AdamW: the same computation). The
table shows the median and minimum ms/step over the timed steps (the minimum is the better
estimate of an unloaded machine) and the throughput ratio to the paired reference.
``--keep-freed-memory`` first calls :func:`craftfn.host_memory.keep_freed_memory` (what the
Trainer does), so the pure variants' new tensors reuse freed pages.
At the end every variant's parameters are compared with torch fused's (same steps, same
gradients): the numbers measure the same computation.

Run:
    .venv/bin/python benchmarks/optim_bench.py           # ~51M parameters, about 2-4 minutes on 2 cores
    .venv/bin/python benchmarks/optim_bench.py --small   # ~5M parameters, well under a minute
    .venv/bin/python benchmarks/optim_bench.py --keep-freed-memory   # as inside craftfn's Trainer
    .venv/bin/python benchmarks/optim_bench.py --keep-freed-memory --no-torchopt --only "craftfn adamw pure"  # issue 16f's rows
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable

import torch

import craftfn
from craftfn import TrainState, host_memory, optim, tree

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01


def gpt_shapes(vocab: int, d: int, layers: int, ctx: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a GPT-2-style decoder (tied head), named like ``named_parameters()``."""
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (ctx, d)}
    for i in range(layers):
        b = f"h.{i}."
        shapes.update({
            b + "ln_1.weight": (d,), b + "ln_1.bias": (d,),
            b + "attn.c_attn.weight": (3 * d, d), b + "attn.c_attn.bias": (3 * d,),
            b + "attn.c_proj.weight": (d, d), b + "attn.c_proj.bias": (d,),
            b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
            b + "mlp.c_fc.weight": (4 * d, d), b + "mlp.c_fc.bias": (4 * d,),
            b + "mlp.c_proj.weight": (d, 4 * d), b + "mlp.c_proj.bias": (d,),
        })
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def make_tree(shapes: dict[str, tuple[int, ...]], seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in shapes.items()}


class Variant:
    """One contender: ``step()`` runs one optimizer step; ``params()`` returns its parameters as a dict.

    ``prepare()`` runs untimed before each step. For a rule allowed to overwrite the gradients it
    is given (craftfn's donated steps: ``chain(clip_by_global_norm, adamw)`` clips them in place;
    TorchOpt's in-place mode turns them into the updates) it restores the variant's private copy,
    as a training loop would hand it fresh gradients; the others share one read-only gradient tree
    (checked at the end).
    """

    def __init__(self, name: str, step: Callable[[], None], params: Callable[[], dict[str, torch.Tensor]],
                 private_grads: dict | None = None, master: dict | None = None):
        self.name, self.step, self.params = name, step, params
        self.private_grads, self.master = private_grads, master
        self.times: list[float] = []
        self.notes: list[str] = []  # printed under the table (compile time, checks)

    def prepare(self) -> None:
        if self.private_grads is not None and self.master is not None:
            names = list(self.master)
            torch._foreach_copy_([self.private_grads[n] for n in names], [self.master[n] for n in names])


def craftfn_pure(params0: dict, grads: dict) -> Variant:
    tx = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    box = {"p": tree.clone(params0)}
    box["s"] = tx.init(box["p"])

    def step() -> None:
        updates, box["s"] = tx.update(grads, box["s"], box["p"])
        box["p"] = optim.apply_updates(box["p"], updates)

    return Variant("craftfn adamw pure", step, lambda: box["p"])


def craftfn_pure_jit(params0: dict, grads: dict) -> Variant:
    """The pure update and ``apply_updates`` as one ``craftfn.jit`` function (inductor).

    Compiled here, untimed: the first call's wall time is the compile time. That first step is
    compared with the eager pure update on the same inputs (params and both moments); the timed
    steps then start again from ``params0``.
    """
    import torch._inductor.metrics as inductor_metrics

    tx = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

    def pure_update(grads: dict, opt_state: Any, params: dict) -> tuple[dict, Any]:
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    update = craftfn.jit(pure_update)
    box = {"p": tree.clone(params0)}
    box["s"] = tx.init(box["p"])
    kernels0 = inductor_metrics.generated_kernel_count
    jit_out = update(grads, box["s"], box["p"])
    kernels = inductor_metrics.generated_kernel_count - kernels0
    eager_out = pure_update(grads, box["s"], box["p"])
    checks = []
    for part, pick in (("params", lambda out: out[0]), ("mu", lambda out: out[1][0].mu), ("nu", lambda out: out[1][0].nu)):
        pairs = list(zip(tree.leaves(pick(jit_out)), tree.leaves(pick(eager_out))))
        # Relative to each tensor's largest magnitude (a near-zero element alone says little).
        rel = max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)) for a, b in pairs)
        same = sum(torch.equal(a, b) for a, b in pairs)
        checks.append(f"{part}: max |diff| / max |value| {rel:.1e}, {same}/{len(pairs)} tensors bitwise identical")
    del jit_out, eager_out, pairs

    def step() -> None:
        box["p"], box["s"] = update(grads, box["s"], box["p"])

    v = Variant("craftfn adamw pure, craftfn.jit", step, lambda: box["p"])
    v.notes.append(f"compile (first call, inductor): {update.compile_seconds:.1f} s; {kernels} generated kernels")
    v.notes.append("first step vs the eager pure update (torch's kernel) on the same inputs: " + "; ".join(checks))
    return v


def craftfn_pure_step(params0: dict, master: dict) -> Variant:
    """The update a non-donated ``make_train_step`` runs: copies of params and state, fused in place.

    The input state stays intact (a pure step); the gradients are the step's own, handed in fresh.
    """
    from craftfn.step import _apply_own_gradients

    tx = optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)
    grads = tree.clone(master)
    box = {"state": TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params0), tx=tx)}

    def step() -> None:
        box["state"] = _apply_own_gradients(box["state"], grads, donate=False)

    return Variant("craftfn adamw pure step", step, lambda: box["state"].params, grads, master)


def craftfn_donated(name: str, tx: optim.GradientTransformation, params0: dict, master: dict) -> Variant:
    grads = tree.clone(master)  # donated too: the step may overwrite them
    box = {"state": TrainState.create(apply_fn=lambda p, x: x, params=tree.clone(params0), tx=tx)}
    if tx.donated_update is None:
        raise RuntimeError(f"{name}: the transformation has no donated_update (fused path)")

    def step() -> None:
        box["state"] = box["state"].apply_gradients(grads, donate=True)

    return Variant(name, step, lambda: box["state"].params, grads, master)


def torch_variant(name: str, params0: dict, master: dict, clip_norm: float | None = None, **kwargs: Any) -> Variant:
    names = list(params0)
    ps = [params0[n].detach().clone().requires_grad_(True) for n in names]
    for p, n in zip(ps, names):
        p.grad = master[n].clone()
    opt = torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs)
    if clip_norm is None:
        return Variant(name, opt.step, lambda: {n: p.detach() for n, p in zip(names, ps)})

    # The usual torch loop with clipping: clip_grad_norm_ scales .grad in place, so each step
    # gets a fresh copy of the gradients (restored by Variant.prepare), like a new backward.
    def step() -> None:
        torch.nn.utils.clip_grad_norm_(ps, clip_norm, foreach=True)
        opt.step()

    private = {n: p.grad for n, p in zip(names, ps)}
    return Variant(name, step, lambda: {n: p.detach() for n, p in zip(names, ps)}, private, master)


def torchopt_variant(params0: dict, master: dict, inplace: bool) -> Variant:
    import torchopt

    opt = torchopt.adamw(LR, betas=BETAS, eps=EPS, weight_decay=WD)
    grads = tree.clone(master) if inplace else master
    box = {"p": tree.clone(params0)}
    box["s"] = opt.init(box["p"])

    def step() -> None:
        updates, box["s"] = opt.update(grads, box["s"], params=box["p"], inplace=inplace)
        box["p"] = torchopt.apply_updates(box["p"], updates, inplace=inplace)

    label = "TorchOpt adamw (in place)" if inplace else "TorchOpt adamw (functional)"
    return Variant(label, step, lambda: box["p"], grads if inplace else None, master)


def machine() -> dict[str, str]:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # pragma: no cover - informational only
            return "?"

    model = sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip()
    return {"nproc": sh("nproc"), "cpu": model, "uptime": sh("uptime"), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="~5M parameters (quick check)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 20, small 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--no-torchopt", action="store_true", help="skip TorchOpt even if installed")
    parser.add_argument("--only", action="append", default=[], help="run only the variants whose name contains this (repeatable)")
    parser.add_argument("--keep-freed-memory", action="store_true", help="craftfn.host_memory.keep_freed_memory() first (as the Trainer)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep inductor's on-disk cache (TORCHINDUCTOR_CACHE_DIR); default: a fresh one, so the jit row's compile seconds are cold")
    args = parser.parse_args()
    if not args.warm_cache:
        cache = tempfile.TemporaryDirectory(prefix="optim_bench_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache.name  # read by inductor at its first compile
    kept = host_memory.keep_freed_memory() if args.keep_freed_memory else False

    torch.manual_seed(0)
    shapes = gpt_shapes(8192, 256, 4, 256) if args.small else gpt_shapes(50304, 512, 8, 1024)
    steps = args.steps or (10 if args.small else 20)
    params0 = make_tree(shapes, 0, 0.02)
    grads = make_tree(shapes, 1, 1e-3)
    n_params = sum(p.numel() for p in params0.values())

    adamw = lambda: optim.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)  # noqa: E731
    injected = lambda: optim.inject_hyperparams(optim.adamw, static_args=("b1", "b2", "eps", "weight_decay"))(  # noqa: E731
        learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD
    )
    injected_all = lambda: optim.inject_hyperparams(optim.adamw)(  # noqa: E731
        learning_rate=LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD
    )
    torch_fused = ("torch fused", lambda: torch_variant("torch AdamW fused (paired)", params0, grads, fused=True))
    donated_ref = ("craftfn adamw donated", lambda: craftfn_donated("craftfn adamw donated (paired)", adamw(), params0, grads))
    torch_clip_ref = ("torch clip_grad_norm_ + fused", lambda: torch_variant(
        "torch clip_grad_norm_ + AdamW fused (paired)", params0, grads, clip_norm=1.0, fused=True))
    references = {
        "craftfn adamw pure step": donated_ref,
        "craftfn clip+adamw donated": torch_clip_ref,
    }
    factories: list[tuple[str, Callable[[], Variant]]] = [
        ("craftfn adamw pure", lambda: craftfn_pure(params0, grads)),
        ("craftfn adamw pure, craftfn.jit", lambda: craftfn_pure_jit(params0, grads)),
        ("craftfn adamw pure step", lambda: craftfn_pure_step(params0, grads)),
        ("craftfn adamw donated", lambda: craftfn_donated("craftfn adamw donated", adamw(), params0, grads)),
        ("craftfn clip+adamw donated", lambda: craftfn_donated(
            "craftfn clip+adamw donated", optim.chain(optim.clip_by_global_norm(1.0), adamw()), params0, grads)),
        ("craftfn inject(adamw) donated", lambda: craftfn_donated("craftfn inject(adamw) donated", injected(), params0, grads)),
        ("craftfn inject(adamw) donated, all hparams tensors", lambda: craftfn_donated(
            "craftfn inject(adamw) donated, all hparams tensors", injected_all(), params0, grads)),
        ("torch AdamW for-loop", lambda: torch_variant("torch AdamW for-loop", params0, grads, foreach=False)),
        ("torch AdamW foreach", lambda: torch_variant("torch AdamW foreach", params0, grads, foreach=True)),
        ("torch AdamW fused", lambda: torch_variant("torch AdamW fused", params0, grads, fused=True)),
        ("torch clip_grad_norm_ + AdamW fused", lambda: torch_variant(
            "torch clip_grad_norm_ + AdamW fused", params0, grads, clip_norm=1.0, fused=True)),
    ]
    try:
        import torchopt  # noqa: F401

        has_torchopt = not args.no_torchopt
    except ImportError:
        has_torchopt = False
    if has_torchopt:
        factories += [(f"TorchOpt adamw ({m})", lambda inplace=inplace: torchopt_variant(params0, grads, inplace))
                      for m, inplace in (("functional", False), ("in place", True))]
    if args.only:
        factories = [(n, f) for n, f in factories if any(o in n for o in args.only)]
    grads_check = [float(g.double().sum()) for g in grads.values()]

    info = machine()
    print(f"optim_bench: {n_params / 1e6:.1f}M parameters in {len(shapes)} tensors; each variant runs {args.warmup} warm-up "
          f"+ {steps} timed steps alternating with its reference built beside it")
    print(f"machine: {info['nproc']} cores, {info['cpu']}; torch {info['torch']} ({torch.get_num_threads()} threads); load: {info['uptime']}")
    print(f"host memory: {'freed memory kept (craftfn.host_memory.keep_freed_memory)' if kept else 'glibc default'}; "
          f"inductor cache: {'warm (--warm-cache)' if args.warm_cache else 'fresh (compile seconds are cold)'}")
    if not has_torchopt:
        print("TorchOpt: not installed (pip install 'craftfn[bench]') or --no-torchopt; its rows are omitted")
    rows, notes = [], []
    for name, factory in factories:
        # One variant and its own fused reference at a time: they see the same load (steps
        # alternate) and the working set stays ~2 models' worth of memory.
        variant = factory()
        ref_name, ref_factory = references.get(name, torch_fused)
        ref = ref_factory()
        for r in range(args.warmup + steps):
            for v in ((variant, ref) if r % 2 == 0 else (ref, variant)):  # alternate who goes first
                v.prepare()
                t0 = time.perf_counter()
                v.step()
                dt = time.perf_counter() - t0
                if r >= args.warmup:
                    v.times.append(dt)
        ps, rs = variant.params(), ref.params()
        diff = max(float((ps[n].double() - rs[n].double()).abs().max()) for n in rs)
        rows.append((name, ref_name, variant.times, ref.times, diff))
        notes += [f"{name}: {note}" for note in variant.notes]
        del variant, ref, ps, rs
        gc.collect()

    if [float(g.double().sum()) for g in grads.values()] != grads_check:
        print("WARNING: a variant overwrote the shared gradients; the comparison below is not valid")
    print()
    print("| variant | ms/step (median) | ms/step (min) | paired reference | reference ms (median) | time vs reference (median) "
          "| throughput vs reference (median) | throughput vs reference (min) | max abs diff vs reference |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for name, ref_name, times, ref_times, diff in rows:
        t, m = statistics.median(times), min(times)
        rt, rm = statistics.median(ref_times), min(ref_times)
        print(f"| {name} | {1e3 * t:.1f} | {1e3 * m:.1f} | {ref_name} | {1e3 * rt:.1f} | {t / rt:.2f}x | {rt / t:.2f}x | {rm / m:.2f}x | {diff:.1e} |")
    for note in notes:
        print(f"- {note}")
    print()
    print("throughput vs reference = (paired reference time) / (variant time); > 1 means faster than the reference.")
    print("Every row computes the same AdamW steps as its reference (clip+adamw: both clip the gradient to norm 1).")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
