"""Generation benchmark: one model, 256 new tokens, four ways, in one run.

* **no-cache eager**: every token recomputes the whole window (nanoGPT's ``generate``), via
  ``generate_text_sampling(use_cache=False)``;
* **KV-cache eager**: prefill once, then one-token decode steps on the static cache;
* **KV-cache compiled**: the same decode step under ``torch.compile`` (inductor, ``fullgraph=True``),
  compiled once (compile time reported separately, not in tokens/s);
* **HF generate**: ``transformers.GPT2LMHeadModel.generate`` (its own dynamic KV cache) on a GPT-2 of
  the same size and architecture, with the craftfn model's (random) weights copied in, so all four
  produce the same greedy tokens, which the script checks. Skipped when transformers is absent.

Greedy decoding, batch 1, a 32-token prompt. Each method runs once to warm up, then the methods take
turns ``--repeats`` times and each one's best time is reported (the machine is shared: taking turns
spreads load swings over all methods, and the minimum is the least noisy statistic).

Run:
    .venv/bin/python benchmarks/generation_bench.py               # the char job's GPT (4x128), ~2-3 min
    .venv/bin/python benchmarks/generation_bench.py --no-compile  # skip the inductor compile
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time

import torch

from craftfn.generation import generate_text_sampling
from craftfn.models import GPT, GPTConfig


def _time_round_robin(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Best time per method; the methods take turns, so load swings on a shared machine hit all alike."""
    outs = {name: fn() for name, fn in runs.items()}  # warm-up (and the compile, for the compiled method)
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best, outs


def _hf_copy(model: GPT):
    import transformers

    cfg = model.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=None, eos_token_id=None, pad_token_id=0,
        )
    ).eval()
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # GPT-2's Conv1D stores weights transposed
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    hf.load_state_dict(state, strict=False)
    hf.tie_weights()
    return hf, transformers.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_layer", type=int, default=4)
    parser.add_argument("--n_head", type=int, default=4)
    parser.add_argument("--n_embd", type=int, default=128)
    parser.add_argument("--vocab_size", type=int, default=99, help="the char job's stdlib vocabulary")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny per-token ops gain nothing from more)")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = args.prompt_len + args.new_tokens
    config = GPTConfig(vocab_size=args.vocab_size, block_size=block, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    prompt = torch.randint(0, args.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(1))
    common = dict(max_new_tokens=args.new_tokens, temperature=0.0)

    results: dict[str, float] = {}
    notes: list[str] = []
    runs = {
        "no-cache eager (nanoGPT recompute)": lambda: generate_text_sampling(model, prompt, use_cache=False, **common),
        "KV-cache eager": lambda: generate_text_sampling(model, prompt, **common),
    }
    if not args.no_compile:
        start = time.perf_counter()
        generate_text_sampling(model, prompt, compile=True, **common)
        notes.append(f"inductor compile of the decode step (first generation): {time.perf_counter() - start:.1f} s")
        runs["KV-cache compiled (inductor)"] = lambda: generate_text_sampling(model, prompt, compile=True, **common)
    try:
        hf, hf_version = _hf_copy(model)

        def hf_generate() -> torch.Tensor:
            with torch.no_grad():
                return hf.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True, pad_token_id=0,
                )

        runs[f"HF generate (transformers {hf_version}, GPT2LMHeadModel)"] = hf_generate
    except ImportError:
        notes.append("transformers not installed: HF generate skipped")

    best, tokens = _time_round_robin(runs, args.repeats)
    for name, seconds in best.items():
        results[name] = args.new_tokens / seconds
        print(f"{name:55s} {results[name]:9.1f} tokens/s", flush=True)

    reference = tokens["KV-cache eager"]
    same = {name: torch.equal(out, reference) for name, out in tokens.items()}

    base = results["no-cache eager (nanoGPT recompute)"]
    load = os.getloadavg()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    print()
    print(f"Command: `.venv/bin/python benchmarks/generation_bench.py {' '.join(os.sys.argv[1:])}`".replace("  ", " "))
    print(f"Date: {datetime.date.today()}; machine: {os.cpu_count()} CPUs ({model_name}); torch {torch.__version__}, "
          f"{args.threads} thread(s); load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(f"Model: GPT {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads, vocab {config.vocab_size}, "
          f"{model.num_params(non_embedding=False) / 1e6:.2f} M parameters; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, batch 1, best of {args.repeats}")
    print()
    print("| method | tokens/s | vs no-cache eager | same tokens |")
    print("|---|---:|---:|:---:|")
    for name, tps in results.items():
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {'yes' if same[name] else 'NO'} |")
    for note in notes:
        print(f"\n{note}")
    compiled = results.get("KV-cache compiled (inductor)")
    hf_name = next((n for n in results if n.startswith("HF generate")), None)
    if compiled is not None:
        print(f"\nTarget compiled >= 3x no-cache eager: {compiled / base:.2f}x -> {'met' if compiled >= 3 * base else 'NOT met'}")
        if hf_name:
            ratio = compiled / results[hf_name]
            print(f"Target compiled faster than HF generate: {ratio:.2f}x -> {'met' if ratio > 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
