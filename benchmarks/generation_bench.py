"""Generation benchmark: one model, 256 new tokens, four ways, in one run.

* **no-cache eager**: every token recomputes the whole window (nanoGPT's ``generate``), via
  ``generate_text_sampling(use_cache=False)``;
* **KV-cache eager**: prefill once, then one-token decode steps on the static cache;
* **KV-cache compiled, 1 step per call**: the decode step under ``torch.compile`` (inductor,
  ``fullgraph=True``), one token per call (``steps_per_call=1``), compiled once (compile time
  reported separately, not in tokens/s);
* **KV-cache compiled, K steps per call**: ``steps_per_call=K`` (``--steps_per_call``, default 8,
  the default of ``generate_text_sampling``) decode steps unrolled in one graph per call;
* **HF generate**: ``transformers.GPT2LMHeadModel.generate`` (its own dynamic KV cache) on a GPT-2 of
  the same size and architecture, with the craftfn model's (random) weights copied in, so all four
  produce the same greedy tokens, which the script checks. Skipped when transformers is absent.

``--beams K`` (K > 1) benchmarks beam search instead (K beams, batch 1, no EOS, length penalty 1):

* **beam search, host loop**: craftfn's beam search before the tensor search (its Python
  bookkeeping and one host read per token, kept below as ``host_loop_beam_search``) on the KV cache;
* **beam search eager**: ``beam_search_generate`` (bookkeeping on tensors, no host read per token);
* **beam search compiled**: the same with ``compile=True`` (bookkeeping and decode in one graph, 8 search
  steps unrolled per call: ``steps_per_call``'s default);
* **HF generate**: ``generate(num_beams=K)`` on the GPT-2 copy.

Greedy decoding, batch ``--batch`` (default 1; tokens/s counts every row's tokens), a 32-token prompt. Each method runs once to warm up, then the methods take
turns ``--repeats`` times and each one's best time is reported (the machine is shared: taking turns
spreads load swings over all methods, and the minimum is the least noisy statistic).

Run:
    .venv/bin/python benchmarks/generation_bench.py               # the char job's GPT (4x128), ~2-3 min
    .venv/bin/python benchmarks/generation_bench.py --no-compile  # skip the inductor compile
    .venv/bin/python benchmarks/generation_bench.py --beams 4     # beam search, 4 beams, 256 tokens
    .venv/bin/python benchmarks/generation_bench.py --batch 8     # greedy, 8 prompts at once
"""

from __future__ import annotations

import argparse
import datetime
import functools
import math
import os
import platform
import subprocess
import time

import torch

from craftfn.generation import beam_search_generate, generate_text_sampling
from craftfn.generation import kv_cache as kvc
from craftfn.generation.beam_search import BeamSearchOutput
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


def host_loop_beam_search(model, prompt_ids, *, num_beams, max_new_tokens, length_penalty=1.0, early_stopping=False,
                          num_return_sequences=1, eos_token_id=None, pad_token_id=None):
    """craftfn's beam search before the tensor search (commit 14a6f2b): Python bookkeeping, one host read per token.

    Kept here, verbatim but for the argument checks, as the baseline "eager beam search of today".
    """
    decoder = kvc.as_decoder(model)
    prompt_ids, attention_mask = kvc.check_prompt(prompt_ids, None, decoder)
    eos, pad = kvc.eos_and_pad(eos_token_id, pad_token_id)
    use_cache = True
    batch, prompt_len = prompt_ids.shape
    k = num_beams
    device = prompt_ids.device

    with decoder.inference():
        # Every beam starts as the prompt; only beam 0 is live, so the first step does not pick
        # the same extension k times.
        beam_mask = attention_mask.repeat_interleave(k, dim=0)
        if use_cache:
            decoder.check_length(prompt_len + max_new_tokens, "max_new_tokens", max_new_tokens)
            full_mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, max_new_tokens)], dim=1)
            cache = decoder.init_cache(batch, prompt_len + max_new_tokens)
            logits, cache = kvc.prefill(decoder, prompt_ids, attention_mask, full_mask[::k], cache)
            cache = cache.index_select(torch.arange(batch, device=device).repeat_interleave(k))
            logits = logits.repeat_interleave(k, dim=0)
            next_pos = beam_mask.sum(dim=1)
        else:
            logits = decoder.forward_window(prompt_ids, attention_mask).repeat_interleave(k, dim=0)
        tokens = torch.empty(batch * k, 0, dtype=torch.int64, device=device)
        scores = torch.full((batch, k), -math.inf, dtype=torch.float64, device=device)
        scores[:, 0] = 0.0
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
        done = [False] * batch

        for t in range(max_new_tokens):
            logprobs = torch.log_softmax(logits.double(), dim=-1)  # (B*k, V)
            vocab = logprobs.shape[-1]
            cand = (scores.reshape(-1, 1) + logprobs).reshape(batch, k * vocab)
            top_scores, top_idx = torch.topk(cand, min(2 * k, k * vocab), dim=1)
            top_scores_h, top_idx_h = top_scores.tolist(), top_idx.tolist()  # the one host read per step
            gen_len = t + 1
            new_origin, new_token, new_score = [], [], []
            for b in range(batch):
                chosen: list[tuple[int, int, float]] = []
                if not done[b]:
                    for rank, (s, flat) in enumerate(zip(top_scores_h[b], top_idx_h[b])):
                        if s == -math.inf:
                            break
                        beam, tok = divmod(flat, vocab)
                        if tok == eos:
                            if rank < k:
                                seq = tokens[b * k + beam].tolist() + [tok]
                                finished[b].append((s / gen_len**length_penalty, seq))
                            continue
                        chosen.append((beam, tok, s))
                        if len(chosen) == k:
                            break
                # Fill with dead beams (score -inf) when fewer than k extensions are live.
                while len(chosen) < k:
                    chosen.append((0, pad, -math.inf))
                for beam, tok, s in chosen:
                    new_origin.append(b * k + beam)
                    new_token.append(tok)
                    new_score.append(s)
            origin = torch.tensor(new_origin, device=device)
            new_tokens = torch.tensor(new_token, device=device)
            tokens = torch.cat([tokens.index_select(0, origin), new_tokens[:, None]], dim=1)
            scores = torch.tensor(new_score, dtype=torch.float64, device=device).reshape(batch, k)
            for b in range(batch):
                if not done[b]:
                    done[b] = _is_done(finished[b], scores[b], k, gen_len, length_penalty, early_stopping)
            if all(done) or t == max_new_tokens - 1:
                break
            if use_cache:
                cache = cache.index_select(origin)
                slot = torch.tensor([prompt_len + t], device=device)
                step_logits, cache = decoder(
                    new_tokens[:, None], kv_cache=cache, input_pos=slot, attention_mask=full_mask,
                    position_ids=(next_pos + t)[:, None],
                )
                logits = step_logits[:, -1]
            else:
                ids = torch.cat([prompt_ids.repeat_interleave(k, dim=0), tokens], dim=1)
                mask = torch.cat([beam_mask, beam_mask.new_ones(batch * k, tokens.shape[1])], dim=1)
                logits = decoder.forward_window(ids, mask)

    # Prompts still running at the end: their live beams are hypotheses too.
    final_scores = scores.tolist()
    for b in range(batch):
        if done[b]:
            continue
        for j in range(k):
            if final_scores[b][j] > -math.inf:
                seq = tokens[b * k + j].tolist()
                finished[b].append((final_scores[b][j] / len(seq) ** length_penalty, seq))
    out_seqs, out_scores = [], []
    for b in range(batch):
        best = sorted(finished[b], key=lambda h: -h[0])[:num_return_sequences]
        while len(best) < num_return_sequences:  # fewer distinct continuations than requested
            best.append((-math.inf, []))
        for score, seq in best:
            seq = seq + [pad] * (max_new_tokens - len(seq))
            out_seqs.append(prompt_ids[b].tolist() + seq)
            out_scores.append(score)
    return BeamSearchOutput(
        torch.tensor(out_seqs, dtype=torch.int64, device=device),
        torch.tensor(out_scores, dtype=torch.float64, device=device),
    )


def _is_done(finished, running_scores, num_beams, gen_len, length_penalty, early_stopping) -> bool:
    if len(finished) < num_beams:
        return False
    if early_stopping:
        return True
    worst_kept = sorted(h[0] for h in finished)[-num_beams]
    best_running = float(running_scores.max()) / gen_len**length_penalty
    return best_running <= worst_kept


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
    parser.add_argument("--beams", type=int, default=1, help="> 1: benchmark beam search with this many beams")
    parser.add_argument("--batch", type=int, default=1, help="prompts generated at once (greedy)")
    parser.add_argument("--steps_per_call", type=int, default=8, help="decode steps per compiled call (greedy)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    block = args.prompt_len + args.new_tokens
    config = GPTConfig(vocab_size=args.vocab_size, block_size=block, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(config).eval()
    prompt = torch.randint(0, args.vocab_size, (args.batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
    common = dict(max_new_tokens=args.new_tokens, temperature=0.0)

    results: dict[str, float] = {}
    notes: list[str] = []
    if args.beams > 1:
        beams(args, model, prompt, config)
        return
    runs = {
        "no-cache eager (nanoGPT recompute)": lambda: generate_text_sampling(model, prompt, use_cache=False, **common),
        "KV-cache eager": lambda: generate_text_sampling(model, prompt, **common),
    }
    def compiled_label(steps: int) -> str:
        return f"KV-cache compiled (inductor), {steps} step{'s' if steps > 1 else ''} per call"

    compiled_name = compiled_label(args.steps_per_call)
    if not args.no_compile:
        for steps in sorted({1, args.steps_per_call}):  # one compile each, also when --steps_per_call 1
            name = compiled_label(steps)
            start = time.perf_counter()
            generate_text_sampling(model, prompt, compile=True, steps_per_call=steps, **common)
            notes.append(f"inductor compile of {steps} decode step(s) per call (first generation): {time.perf_counter() - start:.1f} s")
            runs[name] = functools.partial(generate_text_sampling, model, prompt, compile=True, steps_per_call=steps, **common)
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
        results[name] = args.batch * args.new_tokens / seconds
        print(f"{name:55s} {results[name]:9.1f} tokens/s", flush=True)

    reference = tokens["KV-cache eager"]
    same = {name: torch.equal(out, reference) for name, out in tokens.items()}

    base = results["no-cache eager (nanoGPT recompute)"]
    _describe(args, model, config, "greedy")
    print("| method | tokens/s | vs no-cache eager | same tokens |")
    print("|---|---:|---:|:---:|")
    for name, tps in results.items():
        print(f"| {name} | {tps:.1f} | {tps / base:.2f}x | {'yes' if same[name] else 'NO'} |")
    for note in notes:
        print(f"\n{note}")
    compiled = results.get(compiled_name)
    hf_name = next((n for n in results if n.startswith("HF generate")), None)
    if compiled is not None:
        print(f"\nTarget compiled >= 3x no-cache eager: {compiled / base:.2f}x -> {'met' if compiled >= 3 * base else 'NOT met'}")
        if hf_name:
            ratio = compiled / results[hf_name]
            print(f"Target compiled faster than HF generate: {ratio:.2f}x -> {'met' if ratio > 1 else 'NOT met'}")
        one_step = results.get(compiled_label(1))
        if one_step is not None and args.steps_per_call != 1:
            print(f"{args.steps_per_call} steps per call vs 1: {compiled / one_step:.2f}x")


def _describe(args: argparse.Namespace, model: GPT, config: GPTConfig, what: str) -> None:
    load = os.getloadavg()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), platform.processor())
    print()
    print(f"Command: `.venv/bin/python benchmarks/generation_bench.py {' '.join(os.sys.argv[1:])}`".replace("  ", " "))
    print(f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}; machine: {os.cpu_count()} CPUs ({model_name}); "
          f"torch {torch.__version__}, {args.threads} thread(s); load average at the end {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    print(f"Model: GPT {config.n_layer} layers x {config.n_embd} wide, {config.n_head} heads, vocab {config.vocab_size}, "
          f"{model.num_params(non_embedding=False) / 1e6:.2f} M parameters; prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {what}, batch {args.batch}, best of {args.repeats}")
    print()


def beams(args: argparse.Namespace, model: GPT, prompt: torch.Tensor, config: GPTConfig) -> None:
    """Beam search: the host loop of before, the tensor search eager and compiled, HF's."""
    k, n = args.beams, args.new_tokens
    common = dict(num_beams=k, max_new_tokens=n)
    runs = {
        "beam search, host loop (craftfn before: one host read per token)": lambda: host_loop_beam_search(model, prompt, **common),
        "beam search eager (tensor search, no host read per token)": lambda: beam_search_generate(model, prompt, **common),
    }
    notes = []
    if not args.no_compile:
        start = time.perf_counter()
        beam_search_generate(model, prompt, compile=True, **common)
        notes.append(f"inductor compile of the search step (first search): {time.perf_counter() - start:.1f} s")
        runs["beam search compiled (inductor, one graph per shape)"] = lambda: beam_search_generate(model, prompt, compile=True, **common)
    try:
        hf, hf_version = _hf_copy(model)

        def hf_beams() -> BeamSearchOutput:
            with torch.no_grad():
                out = hf.generate(
                    input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, num_beams=k,
                    max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0, early_stopping=False,
                    length_penalty=1.0, output_scores=True, return_dict_in_generate=True,
                )
            return BeamSearchOutput(out.sequences, out.sequences_scores.double())

        runs[f"HF generate (transformers {hf_version}, num_beams={k})"] = hf_beams
    except ImportError:
        notes.append("transformers not installed: HF generate skipped")
    best, outs = _time_round_robin(runs, args.repeats)
    reference = next(iter(outs.values()))
    base = best[next(iter(best))]
    _describe(args, model, config, f"beam search with {k} beams (no EOS, length penalty 1)")
    print("| method | tokens/s | vs host loop | same tokens as the host loop | score |")
    print("|---|---:|---:|:---:|---:|")
    for name, seconds in best.items():
        same = torch.equal(outs[name].sequences, reference.sequences)
        score = float(outs[name].scores[0])
        print(f"| {name} | {n / seconds:.1f} | {base / seconds:.2f}x | {'yes' if same else 'NO'} | {score:.6f} |")
    for note in notes:
        print(f"\n{note}")
    compiled = best.get("beam search compiled (inductor, one graph per shape)")
    if compiled is not None:
        print(f"\nTarget compiled >= 3x the host loop: {base / compiled:.2f}x -> {'met' if base / compiled >= 3 else 'NOT met'}")



if __name__ == "__main__":
    main()
