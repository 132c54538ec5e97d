"""Data at scale: tokenize a generated corpus once into token shards, then start training from them.

For each corpus size (default 0.2 and 2 GB of text, generated from the running Python's standard
library sources into ``--workdir``, ~100 MB per file, so the corpus is a directory of documents):

1. build: ``prepare_corpus`` in a fresh process (the first run's tokenization): seconds, MB/s of
   source text, peak RSS of the process tree (sampled every 20 ms: the main process + its workers);
2. train: ``craftfn train --gin_file gin/text_file_gpt.gin`` on the same directory (the second run:
   the shards exist): seconds from the process start to the first training step, and peak RSS during
   ``--steps`` steps of the default GPT;
3. check: ``prepare_corpus`` again, alone (files unchanged by stat are trusted), and with
   ``verify=True`` (every source and shard hashed).

Peers, in the same run, on the first ``--peer_mb`` MB of the smallest corpus (one file):
- craftfn's old in-memory path (``--old_ref``, the commit before token shards: ``lm_task.text =
  @text_file()`` read the file, built the vocabulary and encoded it to an int64 tensor at every start):
  seconds to the first training step and peak RSS, against craftfn's first run (build included)
  and second run (shards reused) on the same file;
- nanoGPT's ``prepare.py`` for characters (what craftfn's ``lm_task.text = @text_file()`` did: read the
  whole text, ``sorted(set(text))``, a Python list of ids, then an array), against craftfn's build;
- BPE (``--bpe``, on the first ``--bpe_mb`` MB of that file): craftfn's byte-level BPE build (train
  1,024 tokens, encode) against Hugging Face ``tokenizers``'s ``encode_batch`` over the file's lines
  in one process (the direct way; given the trained tokenizer, so encoding only).

Usage:
    python benchmarks/data_bench.py --sizes 0.2,2 --workdir /tmp/craftfn_data_bench --steps 20 --bpe
    (the working directory is deleted at the end unless --keep)
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
FILE_BYTES = 100 << 20


def _base_text() -> bytes:
    """All standard-library sources that are UTF-8 (sorted): ~160 MB of text with structure.

    Characters beyond Latin (U+0300 and up: the stdlib's Unicode test tables) become "?", so the
    character vocabulary (~300) is that of a European-language corpus, not 6,000 symbols.
    """
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        try:
            text = Path(path).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        parts.append(re.sub("[^\x00-\u02ff]", "?", text))
    return "\n".join(parts).encode("utf-8")


def generate(folder: Path, total_bytes: int) -> None:
    """Files of ~100 MB cut from the base text at different offsets, each ending at a line end."""
    if folder.is_dir() and sum(p.stat().st_size for p in folder.iterdir()) >= total_bytes * 0.99:
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    base = _base_text()
    written, index = 0, 0
    while written < total_bytes:
        size = min(FILE_BYTES, total_bytes - written)
        start = (index * 7_919_993) % len(base)
        with open(folder / f"part{index:03d}.txt", "wb") as f:
            remaining, pos = size, start
            while remaining > 0:
                piece = base[pos : pos + remaining]
                f.write(piece)
                remaining -= len(piece)
                pos = 0
            f.write(b"\n")
        written += size + 1
        index += 1


class TreeRss:
    """Peak RSS of a process and its descendants, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self.peak_single = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                rss = []
                for p in procs:
                    with contextlib.suppress(psutil.Error):  # a worker that just exited
                        rss.append(p.memory_info().rss)
                self.peak = max(self.peak, sum(rss))
                self.peak_single = max([self.peak_single, *rss])
            except psutil.Error:
                pass
            time.sleep(0.02)

    def stop(self) -> tuple[float, float]:
        self._stop = True
        self._thread.join()
        return self.peak / 2**30, self.peak_single / 2**30


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "true"}


def run_measured(cmd: list[str], first_line: str | None = None, repo: Path = REPO) -> dict[str, float]:
    """Run ``cmd`` with craftfn from ``repo``; wall seconds, seconds until a stdout line contains
    ``first_line``, peak RSS (tree, single)."""
    t0 = time.perf_counter()
    env = {**_env(), "PYTHONPATH": str(repo)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=repo)
    rss = TreeRss(proc.pid)
    seen = None
    lines = []
    assert proc.stdout is not None
    stamps = []  # (seconds since start, line)
    for line in proc.stdout:
        lines.append(line)
        stamps.append((time.perf_counter() - t0, line))
        if first_line and seen is None and first_line in line:
            seen = stamps[-1][0]
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    wall = time.perf_counter() - t0
    tree, single = rss.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{''.join(lines)[-2000:]}\n{err[-3000:]}")
    return {"seconds": wall, "first_line_s": seen if seen is not None else float("nan"), "rss_tree_gb": tree, "rss_single_gb": single, "stdout": "".join(lines),
            "data_ready_s": next((t for t, ln in stamps if "craftfn: training a" in ln), float("nan"))}


BUILD = """
import sys, time
from craftfn import data
t = time.perf_counter()
c = data.prepare_corpus(sys.argv[1], sys.argv[2], vocab_size=int(sys.argv[4]) if sys.argv[4] != "0" else None,
                        cache_dir=sys.argv[3], progress=False, verify=sys.argv[5] == "1")
print("BUILD", time.perf_counter() - t, c.num_tokens, c.tokens.arrays[0].dtype)
"""

NANOGPT_CHAR = """
import sys, time
import numpy as np
t = time.perf_counter()
with open(sys.argv[1], 'r', encoding='utf-8') as f:
    text = f.read()
chars = sorted(list(set(text)))
stoi = {ch: i for i, ch in enumerate(chars)}
ids = np.array([stoi[c] for c in text], dtype=np.uint16)
ids.tofile(sys.argv[2])
print("PEER", time.perf_counter() - t, ids.size)
"""

HF_BPE = """
import sys, time
import numpy as np
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[2])
t = time.perf_counter()
with open(sys.argv[1], 'r', encoding='utf-8') as f:
    lines = f.readlines()
out = tok.encode_batch(lines, add_special_tokens=False)
ids = np.concatenate([np.asarray(e.ids, np.uint16) for e in out])
print("PEER", time.perf_counter() - t, ids.size)
"""


def _build(src: Path, cache: Path, kind: str, vocab: int = 0, verify: bool = False) -> dict[str, float]:
    r = run_measured([sys.executable, "-c", BUILD, str(src), kind, str(cache), str(vocab), "1" if verify else "0"])
    line = next(ln for ln in r["stdout"].splitlines() if ln.startswith("BUILD"))
    _, seconds, tokens, dtype = line.split()
    r.update(build_s=float(seconds), tokens=int(tokens), dtype=dtype)
    return r


def _train(data: Path, run_dir: Path, steps: int, repo: Path = REPO, cache: Path | None = None) -> dict[str, float]:
    """``craftfn train`` of gin/text_file_gpt.gin on ``data``: seconds to the first step, peak RSS."""
    cmd = [sys.executable, "-m", "craftfn", "train", "--gin_file", "gin/text_file_gpt.gin", f"--gin.DATA_PATH={data}",
           f"--gin.MAX_STEPS={steps}", "--gin.warmup_cosine_decay.warmup_steps=1", "--gin.train.console_every=1",
           "--gin.train.save_checkpoints=False", "--gin.Trainer.eval_every=1000000", "--gin.train.sample_tokens=50",
           "--run_dir", str(run_dir)]
    if cache is not None:
        cmd.append(f"--gin.lm_task.cache_dir={cache}")
    return run_measured(cmd, first_line="step 1/", repo=repo)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.2,2", help="corpus sizes in GB (comma separated)")
    ap.add_argument("--workdir", default="/tmp/craftfn_data_bench")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the second run")
    ap.add_argument("--peer_mb", type=int, default=56, help="size of the peer comparison file")
    ap.add_argument("--bpe", action="store_true", help="also a 1,024-token BPE build of --bpe_mb MB against HF tokenizers")
    ap.add_argument("--bpe_mb", type=int, default=10, help="size of the BPE comparison file")
    ap.add_argument("--old_ref", default="14a6f2b", help="git commit of the old in-memory path (before token shards)")
    ap.add_argument("--keep", action="store_true", help="keep the generated corpora and shards")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sizes = [float(s) for s in args.sizes.split(",")]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    rows = []
    try:
        for gb in sizes:
            src = work / f"corpus_{gb:g}GB"
            generate(src, int(gb * 1e9))
            nbytes = _size(src)
            cache = work / f"cache_{gb:g}GB"
            shutil.rmtree(cache, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            build = _build(src, cache, "char")
            shard_bytes = _size(cache)
            train = _train(src, work / f"run_{gb:g}GB", args.steps, cache=cache)  # the run after the build
            rebuild = _build(src, cache, "char")  # the second run's check, alone (files unchanged by stat are trusted)
            full = _build(src, cache, "char", verify=True)  # every source and shard hashed (verify=True)
            row = {
                "corpus_gb": nbytes / 1e9, "files": len(list(src.iterdir())), "tokens": build["tokens"], "dtype": build["dtype"],
                "shards_gb": shard_bytes / 1e9, "build_s": build["build_s"], "build_mb_s": nbytes / 1e6 / build["build_s"],
                "build_rss_tree_gb": build["rss_tree_gb"], "build_rss_single_gb": build["rss_single_gb"],
                "verify_s": rebuild["build_s"], "verify_full_s": full["build_s"], "data_ready_s": train["data_ready_s"], "first_step_s": train["first_line_s"], "train_s": train["seconds"],
                "train_rss_gb": train["rss_tree_gb"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.keep:
                shutil.rmtree(work / f"run_{gb:g}GB", ignore_errors=True)

        # Peers on one file of the smallest corpus.
        smallest = work / f"corpus_{min(sizes):g}GB"
        peer_file = work / "peer.txt"
        with open(sorted(smallest.iterdir())[0], "rb") as f, open(peer_file, "wb") as g:
            g.write(f.read(args.peer_mb << 20).rsplit(b"\n", 1)[0] + b"\n")
        peer_bytes = peer_file.stat().st_size
        peer = run_measured([sys.executable, "-c", NANOGPT_CHAR, str(peer_file), str(work / "peer.bin")])
        peer_s = float(next(ln for ln in peer["stdout"].splitlines() if ln.startswith("PEER")).split()[1])
        ours = _build(peer_file, work / "cache_peer", "char")
        print(json.dumps({
            "peer": "nanoGPT prepare.py (char)", "mb": peer_bytes / 1e6, "peer_s": peer_s, "peer_mb_s": peer_bytes / 1e6 / peer_s,
            "peer_rss_gb": peer["rss_tree_gb"], "craftfn_s": ours["build_s"], "craftfn_mb_s": peer_bytes / 1e6 / ours["build_s"],
            "craftfn_rss_tree_gb": ours["rss_tree_gb"], "speedup": peer_s / ours["build_s"],
        }), flush=True)
        # The old in-memory path against the shards, training on the same file.
        old_repo = work / "old_craftfn"
        old_repo.mkdir(exist_ok=True)
        subprocess.run(f"git -C {REPO} archive {args.old_ref} craftfn gin | tar -x -C {old_repo}", shell=True, check=True)
        old = _train(peer_file, work / "run_old", args.steps, repo=old_repo)
        first = _train(peer_file, work / "run_new1", args.steps, cache=work / "cache_train")
        second = _train(peer_file, work / "run_new2", args.steps, cache=work / "cache_train")
        print(json.dumps({
            "train_on_one_file_mb": peer_bytes / 1e6, "old_ref": args.old_ref,
            "old_data_ready_s": old["data_ready_s"], "old_first_step_s": old["first_line_s"], "old_rss_gb": old["rss_tree_gb"],
            "new_first_run_first_step_s": first["first_line_s"], "new_first_run_rss_gb": first["rss_tree_gb"],
            "new_second_run_data_ready_s": second["data_ready_s"], "new_second_run_first_step_s": second["first_line_s"], "new_second_run_rss_gb": second["rss_tree_gb"],
        }), flush=True)
        if args.bpe:
            # BPE on the first --bpe_mb MB of the peer file: craftfn's build (train + encode), then
            # HF tokenizers encoding the same file with the tokenizer craftfn trained.
            bpe_file = work / "bpe.txt"
            with open(peer_file, "rb") as f, open(bpe_file, "wb") as g:
                g.write(f.read(args.bpe_mb << 20).rsplit(b"\n", 1)[0] + b"\n")
            nb = bpe_file.stat().st_size
            bpe = _build(bpe_file, work / "cache_bpe", "bpe", 1024)
            tok_file = work / "bpe_tokenizer.json"
            manifest = json.loads(next((work / "cache_bpe").glob("*/manifest.json")).read_text())
            tok_file.write_text(json.dumps(manifest["tokenizer"]))
            hf = run_measured([sys.executable, "-c", HF_BPE, str(bpe_file), str(tok_file)])
            hf_s = float(next(ln for ln in hf["stdout"].splitlines() if ln.startswith("PEER")).split()[1])
            print(json.dumps({
                "bpe_mb": nb / 1e6, "bpe_build_s": bpe["build_s"], "bpe_mb_s": nb / 1e6 / bpe["build_s"],
                "bpe_rss_tree_gb": bpe["rss_tree_gb"], "bpe_tokens": bpe["tokens"],
                "peer": "HF tokenizers encode_batch over lines (trained tokenizer given)",
                "peer_s": hf_s, "peer_mb_s": nb / 1e6 / hf_s, "peer_rss_gb": hf["rss_tree_gb"],
            }), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
