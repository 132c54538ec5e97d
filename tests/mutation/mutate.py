"""Mutation check: plant known one-line bugs in a scratch copy of the repo and see whether the tests notice.

Each :class:`Mutant` replaces one exact line fragment of one file (it must occur exactly once, so a
mutant whose target was edited away fails loudly instead of silently testing nothing) and names the
test files that should catch it. For every mutant the script copies the pristine file back, plants
the bug, runs only those tests (``pytest -x``) and records *killed* (the tests failed) or *survived*.
Before the mutants it runs the union of their tests on the unmutated copy: a red baseline would make
every mutant look killed, so the script stops there.

Run by hand (slow: a few minutes; not part of CI), from the repository root::

    /work/tools/cpu test python tests/mutation/mutate.py            # all mutants
    python tests/mutation/mutate.py --list                            # the table, nothing run
    python tests/mutation/mutate.py --check                           # every mutant still applies
    python tests/mutation/mutate.py beam_length_penalty_sign -- tests/generation/test_beam_search.py::test_length_penalty_changes_which_length_wins
    python tests/mutation/mutate.py --root ../other-checkout NAME                # another checkout's code and tests

Positional names select mutants; pytest targets after ``--`` replace the mutants' own tests (to show
which test kills which bug). The exit status is 0 when every selected mutant was killed, 1 when one
survived, 2 on a usage error, a baseline failure or a mutant that no longer applies.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]


class Mutant(NamedTuple):
    name: str
    layer: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest targets that should fail on this bug
    bug: str  # what the planted bug does, in words


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "adam_bias_correction", "optimizer math", "craftfn/optim/adaptive.py",
        "nu, g_nu)\n        bc2 = _bias_correction(b2, count)\n        out = foreach_groups(\n",
        "nu, g_nu)\n        bc2 = _bias_correction(b1, count)\n        out = foreach_groups(\n",
        ("tests/optim/test_parity_torch.py", "tests/optim/test_fused.py"),
        "Adam's second-moment bias correction uses b1 instead of b2",
    ),
    Mutant(
        "fused_weight_decay_dropped", "optimizer math", "craftfn/optim/fused.py",
        "lr=group_lr, beta1=float(b1), beta2=float(b2), weight_decay=float(weight_decay), eps=float(eps),",
        "lr=group_lr, beta1=float(b1), beta2=float(b2), weight_decay=0.0, eps=float(eps),",
        ("tests/optim/test_fused.py",),
        "the fused AdamW kernel ignores weight decay",
    ),
    Mutant(
        "fused_bf16_partial_update", "optimizer math", "craftfn/optim/fused.py",
        "            group_lr = float(lr)\n",
        "            group_lr = float(lr) * (0.6 if gp.dtype == torch.bfloat16 else 1.0)\n",
        ("tests/optim/test_fused.py",),
        "the fused kernel applies 60% of the update to bf16 parameters",
    ),
    Mutant(
        "clip_factor_inverted", "optimizer math", "craftfn/optim/clipping.py",
        "return torch.clamp(g_norm / max_norm, min=1.0), state",
        "return torch.clamp(max_norm / g_norm, max=1.0), state",
        ("tests/optim/test_transforms.py",),
        "clip_by_global_norm scales by ||g|| / max_norm instead of max_norm / ||g||",
    ),
    Mutant(
        "cosine_decay_not_clamped", "schedules", "craftfn/schedules.py",
        "cosine = 0.5 * (1.0 + torch.cos(math.pi * t.clamp(max=decay_steps) / decay_steps))",
        "cosine = 0.5 * (1.0 + torch.cos(math.pi * t / decay_steps))",
        ("tests/test_schedules.py",),
        "cosine decay climbs back up after decay_steps instead of staying at the end value",
    ),
    Mutant(
        "accumulation_sum_not_mean", "step accumulation", "craftfn/step.py",
        "inv = 1.0 / accum_steps",
        "inv = 1.0",
        ("tests/test_step.py",),
        "gradient accumulation sums the microbatch gradients instead of averaging them",
    ),
    Mutant(
        "microbatches_share_one_key", "step keys", "craftfn/step.py",
        "_microbatch(batch, accum_steps, i), random.fold_in(rng, i), scale)",
        "_microbatch(batch, accum_steps, i), rng, scale)",
        ("tests/test_step.py",),
        "every microbatch gets the same key (identical dropout masks)",
    ),
    Mutant(
        "step_key_not_folded", "step keys", "craftfn/step.py",
        "            rng = random.fold_in(state.rng, state.step)\n            state_in = prepare(state)",
        "            rng = state.rng\n            state_in = prepare(state)",
        ("tests/test_step.py",),
        "every train step uses the state's key itself (the same dropout mask at every step)",
    ),
    Mutant(
        "donated_state_not_marked", "donation", "craftfn/step.py",
        "            _mark_donated(state)\n",
        "            pass\n",
        ("tests/test_step.py",),
        "a donated state is not marked, so reusing its overwritten buffers goes unnoticed",
    ),
    Mutant(
        "donated_error_type", "donation", "craftfn/state.py",
        'raise DonatedStateError(f"{argname}: {_DONATED_MESSAGE}")',
        'raise RuntimeError(f"{argname}: {_DONATED_MESSAGE}")',
        ("tests/distributed/test_distributed.py::test_donated_data_parallel_state_cannot_be_reused",),
        "using a donated state raises a plain RuntimeError instead of the promised DonatedStateError",
    ),
    Mutant(
        "checkpoint_sha256_unchecked", "checkpoint verification", "craftfn/training/checkpointing.py",
        "if expected_digest is not None and digest != expected_digest:",
        "if False:",
        ("tests/training/test_checkpointing.py",),
        "restore never compares the file's checksum with meta.json (an altered file loads silently)",
    ),
    Mutant(
        "donated_restore_fills_tied_leaves", "checkpoint verification", "craftfn/training/checkpointing.py",
        "t.numel() > 0 and owners[memory(t)] == 1}",
        "t.numel() > 0 and owners[memory(t)] >= 1}",
        ("tests/training/test_checkpointing.py",),
        "restore(donate=True) reads two saved tensors into one shared template tensor (the first one's values are lost)",
    ),
    Mutant(
        "save_error_not_explained", "checkpoint verification", "craftfn/training/checkpointing.py",
        "            if not isinstance(e, OSError):\n                raise\n",
        "            if True:\n                raise\n",
        ("tests/training/test_checkpointing.py",),
        "a failed save (e.g. a read-only directory) surfaces as the raw OS error, without naming the step",
    ),
    Mutant(
        "resume_drops_callback_state", "resume", "craftfn/training/trainer.py",
        'self.callbacks.load_state_dicts(extra.get("callbacks") or {})',
        "self.callbacks.load_state_dicts({})",
        ("tests/training/test_trainer.py", "tests/training/test_checkpointing_resume.py"),
        "resume never reloads the callbacks' saved state (EarlyStopping restarts its counters)",
    ),
    Mutant(
        "early_stopping_off_by_one", "callbacks", "craftfn/training/callbacks.py",
        "if self.wait > self.patience:",
        "if self.wait >= self.patience:",
        ("tests/training/test_callbacks.py",),
        "EarlyStopping stops one check too early",
    ),
    Mutant(
        "generate_tokens_always_greedy", "sampling filters", "craftfn/training/callbacks.py",
        "        if temperature == 0:\n            nxt = logits.argmax",
        "        if temperature >= 0:\n            nxt = logits.argmax",
        ("tests/training/test_callbacks.py",),
        "generate_tokens is greedy at every temperature",
    ),
    Mutant(
        "top_p_boundary", "sampling filters", "craftfn/generation/sampling.py",
        "num_kept = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp(min=1)",
        "num_kept = (mass_before <= top_p).sum(dim=-1, keepdim=True).clamp(min=1)",
        ("tests/generation/test_sampling.py",),
        "top-p keeps one token too many when the mass before it equals top_p exactly",
    ),
    Mutant(
        "top_k_drops_ties", "sampling filters", "craftfn/generation/sampling.py",
        "return logits.masked_fill(logits < kth, _NEG_INF)",
        "return logits.masked_fill(logits <= kth, _NEG_INF)",
        ("tests/generation/test_sampling.py",),
        "top-k also removes the k-th token (keeps k - 1)",
    ),
    Mutant(
        "beam_length_penalty_sign", "beam scoring", "craftfn/generation/beam_search.py",
        "norms = torch.tensor([float((t + 1) ** length_penalty) for t in range(n_new)], dtype=torch.float64, device=device)",
        "norms = torch.tensor([float((t + 1) ** -length_penalty) for t in range(n_new)], dtype=torch.float64, device=device)",
        ("tests/generation/test_beam_search.py",),
        "finished beams are normalised by length ** -length_penalty (the penalty's direction flips)",
    ),
    Mutant(
        "loss_scale_grows_late", "loss scale", "craftfn/precision.py",
        "grow = counter >= self.growth_interval",
        "grow = counter > self.growth_interval",
        ("tests/test_precision.py",),
        "the loss scale grows after growth_interval + 1 finite steps instead of growth_interval",
    ),
    Mutant(
        "window_batch_ignores_step", "data batching", "craftfn/data/batching.py",
        "key = random.fold_in(random.fold_in(random.key(seed), _WINDOW_TAG), step)",
        "key = random.fold_in(random.fold_in(random.key(seed), _WINDOW_TAG), 0)",
        ("tests/data/test_data.py",),
        "random windows are the same batch at every step",
    ),
    Mutant(
        "epoch_order_ignores_epoch", "data batching", "craftfn/data/batching.py",
        "order = random.permutation(random.fold_in(random.fold_in(random.key(seed), _EPOCH_TAG), epoch), n)",
        "order = random.permutation(random.fold_in(random.fold_in(random.key(seed), _EPOCH_TAG), 0), n)",
        ("tests/data/test_data.py",),
        "every epoch walks the data in the same order",
    ),
    Mutant(
        "data_parallel_sum_not_mean", "distributed averaging", "craftfn/distributed/collectives.py",
        "flat.div_(n)  # gloo has no AVG",
        "flat.div_(1)  # gloo has no AVG",
        ("tests/distributed/test_multiprocess.py",),
        "data-parallel gradients are summed over ranks instead of averaged",
    ),
    Mutant(
        "overlap_sum_not_mean", "distributed averaging", "craftfn/distributed/overlap.py",
        "scale = 1.0 / (world_size() * self.accum_steps)",
        "scale = 1.0 / self.accum_steps",
        ("tests/distributed/test_multiprocess.py",),
        "overlapped data parallel sums the gradients over ranks instead of averaging them",
    ),
    Mutant(
        "gin_config_unimportable", "configuration", "craftfn/gin_config.py",
        "from craftfn import optim, schedules\n",
        "from craftfn import optim, schedules\nimport craftfn.moved_away  # noqa: F401\n",
        ("tests/test_gin_config.py",),
        "craftfn.gin_config cannot be imported (a module it needs moved): its tests must fail, not skip",
    ),
    Mutant(
        "gin_wrapper_not_returned", "configuration", "craftfn/gin_config.py",
        "return gin.external_configurable(fn, name=name, module=module)",
        "return gin.external_configurable(fn, name=name, module=module) and fn",
        ("tests/test_gin_config.py",),
        "register() hands back the plain function, so gin bindings (optim.lion.b1 = ...) do not take effect",
    ),
)


def find(names: Sequence[str]) -> list[Mutant]:
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown mutant(s) {unknown}; known: {sorted(by_name)}")
    return [by_name[n] for n in names] if names else list(MUTANTS)


def apply(mutant: Mutant, text: str) -> str:
    """``text`` with the mutant planted; ``ValueError`` unless its target occurs exactly once."""
    count = text.count(mutant.old)
    if count != 1:
        raise ValueError(
            f"mutant {mutant.name!r}: its target occurs {count} times in {mutant.path} (expected once); "
            f"update the mutant to the current code:\n    {mutant.old!r}"
        )
    if mutant.new == mutant.old:
        raise ValueError(f"mutant {mutant.name!r} changes nothing")
    return text.replace(mutant.old, mutant.new)


def check(mutants: Sequence[Mutant], root: Path = ROOT) -> list[str]:
    """The problems (one line each) of mutants that no longer apply to the code under ``root``."""
    problems = []
    for m in mutants:
        path = root / m.path
        if not path.is_file():
            problems.append(f"mutant {m.name!r}: {m.path} does not exist")
            continue
        try:
            apply(m, path.read_text(encoding="utf-8"))
        except ValueError as e:
            problems.append(str(e))
        for target in m.tests:
            if not (root / target.split("::")[0]).is_file():
                problems.append(f"mutant {m.name!r}: test file {target} does not exist")
    return problems


def _copy_tree(src: Path, dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.pyc", ".hypothesis", ".ruff_cache", "*.egg-info")
    shutil.copytree(src, dst, ignore=ignore, symlinks=True)


def _pytest(scratch: Path, targets: Sequence[str], timeout: float) -> tuple[str, float, str]:
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", *targets]
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - t0, ""
    seconds = time.monotonic() - t0
    text = out.stdout + out.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, flags=re.MULTILINE)
    if out.returncode in (0, 5):  # 5: nothing ran (e.g. every test skipped), which notices nothing either
        return "passed", seconds, "" if out.returncode == 0 else "no test ran"
    if out.returncode == 1:
        why = re.search(r"^E +(.+)$", text, flags=re.MULTILINE)  # the first line of the first failure
        return "failed", seconds, (failed[0] if failed else "(see pytest output)") + (f"\n{'':16s}{why.group(1)[:160]}" if why else "")
    return f"pytest exit {out.returncode}", seconds, (failed[0] if failed else text.strip().splitlines()[-1:] or [""])[0]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    override: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, override = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--check", action="store_true", help="only check that every mutant applies to the code")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run (a timeout counts as killed)")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to copy and mutate (default: this one)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    mutants = find(args.names)
    if args.list:
        for m in mutants:
            print(f"{m.name:32s} {m.layer:24s} {m.path}: {m.bug}")
        return 0
    problems = check(mutants, root)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 2
    if args.check:
        print(f"all {len(mutants)} mutants apply")
        return 0

    with tempfile.TemporaryDirectory(prefix="craftfn-mutate-") as tmp:
        scratch = Path(tmp) / "repo"
        _copy_tree(root, scratch)
        baseline = override or sorted({t for m in mutants for t in m.tests})
        status, seconds, first = _pytest(scratch, baseline, args.timeout)
        print(f"baseline (no mutant): {status} in {seconds:.0f} s: {' '.join(baseline)}", flush=True)
        if status != "passed" or first:
            print(f"the tests fail (or none runs) without any mutant: {first or status}; fix that first", file=sys.stderr)
            return 2
        rows = []
        for m in mutants:
            path = scratch / m.path
            original = path.read_text(encoding="utf-8")
            path.write_text(apply(m, original), encoding="utf-8")
            try:
                status, seconds, first = _pytest(scratch, override or m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            result = "survived" if status == "passed" else "killed"
            detail = first if status in ("failed", "passed") and first else status
            rows.append((m, result))
            print(f"{result:8s} {seconds:5.0f} s  {m.name:32s} {m.layer:24s} {detail}", flush=True)
    killed = sum(r == "killed" for _, r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed")
    for m, r in rows:
        if r == "survived":
            print(f"SURVIVED {m.name}: {m.bug} ({m.path}; tests: {' '.join(override or m.tests)})")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
