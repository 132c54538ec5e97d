"""Two CPU ranks over gloo on the loopback interface, launched as torchrun would (its environment variables).

Each test starts fresh processes running dist_worker.py; together they take ~15 s on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
import launcher  # noqa: E402

from craftfn import TrainState, distributed, make_train_step, tree  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("dist_worker.py"))
LAUNCH_TIMEOUT_S = launcher.LAUNCH_TIMEOUT_S


def _start(args: list[str], world: int = 2) -> list[subprocess.Popen]:
    return launcher.start(WORKER, args, world)


def _finish(procs: list[subprocess.Popen], timeout: float = LAUNCH_TIMEOUT_S) -> list[tuple[int, str]]:
    return launcher.finish(procs, timeout)


def _run(args: list[str], world: int = 2) -> None:
    launcher.run(WORKER, args, world)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    _run(["equivalence", str(out)])
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _single_process(name: str, steps: int = 3, tx=None):
    state = TrainState.create(model=dist_worker.make_model(), tx=tx or dist_worker.optimizers()[name], seed=1)
    step = make_train_step(dist_worker.loss_fn)
    history = []
    for i in range(steps):
        state, metrics = step(state, dist_worker.global_batch(i))
        history.append({k: float(v) for k, v in metrics.items()})
    return state, history


_RUNS = [(name, mode) for name in sorted(dist_worker.optimizers())
         for mode in ["dp", "dp_accum2", "zero", "zero_donate", "dp_overlap", "dp_overlap_accum2_donate"]]
# compile= (forward and backward compiled, collectives in the eager update), with clip + AdamW.
_RUNS += [("clip_adamw", "dp_compiled"), ("clip_adamw", "zero_compiled_accum2_donate")]


@pytest.mark.parametrize("name,mode", _RUNS)
def test_two_ranks_over_2b_rows_equal_one_process_over_2b_rows(equivalence, name, mode):
    reference, history = _single_process(name)
    for rank_result in equivalence:
        run = rank_result["runs"][f"{name}/{mode}"]
        assert rank_result["world"] == 2
        assert tree.allclose(run["params"], reference.params, rtol=1e-5, atol=1e-6)
        assert tree.allclose(run["opt_state"], reference.opt_state, rtol=1e-5, atol=1e-6)
        for got, want in zip(run["metrics"], history):
            assert got.keys() == want.keys()
            for k in want:  # loss is the mean over the global batch; grad_norm that of the averaged gradient
                assert got[k] == pytest.approx(want[k], rel=1e-5), k
    # The ranks hold the same parameters, bit for bit.
    assert tree.equal(equivalence[0]["runs"][f"{name}/{mode}"]["params"], equivalence[1]["runs"][f"{name}/{mode}"]["params"])


@pytest.mark.parametrize("name", sorted(dist_worker.optimizers()))
def test_zero1_equals_plain_data_parallel_with_half_the_optimizer_state(equivalence, name):
    for rank_result in equivalence:
        dp, zero = rank_result["runs"][f"{name}/dp"], rank_result["runs"][f"{name}/zero"]
        assert tree.allclose(zero["params"], dp["params"], rtol=1e-6, atol=1e-7)
        assert tree.allclose(zero["opt_state"], dp["opt_state"], rtol=1e-6, atol=1e-7)
        for got, want in zip(zero["metrics"], dp["metrics"]):
            assert got == pytest.approx(want, rel=1e-6)
    full = equivalence[0]["runs"][f"{name}/dp"]["opt_state_bytes"]
    shards = [r["runs"][f"{name}/zero"]["opt_state_bytes"] for r in equivalence]
    # Parameter-shaped state splits in two; scalars (step counts) are kept on every rank.
    assert all(s <= full / 2 + 64 for s in shards), (shards, full)
    assert sum(shards) >= full


def test_overlapped_buckets_start_their_all_reduce_during_the_backward(equivalence):
    for rank_result in equivalence:
        started = rank_result["overlap_started"]
        # 3 optimizers x 2 overlapped modes x 3 steps, each with several buckets, most started by hooks:
        # all but the one holding the first layer (its gradients come last, the backward ends with them).
        assert len(started) == 3 * 2 * 3
        assert all(buckets >= 3 and hooks >= buckets - 1 for hooks, buckets in started), started


@pytest.mark.parametrize("name", sorted(dist_worker.optimizers()))
def test_accumulation_reduces_the_gradients_once_per_step(equivalence, name):
    for rank_result in equivalence:
        runs = {mode: rank_result["runs"][f"{name}/{mode}"]["all_reduces"] for mode in ("dp", "dp_accum2", "dp_overlap", "dp_overlap_accum2_donate")}
        # Several ~100-byte buckets plus one metrics all-reduce per step; two microbatches issue no more.
        assert all(n >= 4 for n in runs["dp"]), runs
        assert runs["dp_accum2"] == runs["dp"], runs
        assert runs["dp_overlap_accum2_donate"] == runs["dp_overlap"], runs
        if name == "clip_adamw":  # compiled: the same all-reduces, all after the backward
            assert rank_result["runs"][f"{name}/dp_compiled"]["all_reduces"] == runs["dp"], rank_result["runs"][f"{name}/dp_compiled"]


@pytest.mark.parametrize("name", sorted(dist_worker.whole_tensor_rules()))
def test_zero1_runs_whole_tensor_rules_exactly(equivalence, name):
    reference, _ = _single_process(name, tx=dist_worker.whole_tensor_rules()[name])
    for rank_result in equivalence:
        assert tree.allclose(rank_result["runs"][f"{name}/zero"]["params"], reference.params, rtol=1e-5, atol=1e-6)


def test_dropout_differs_across_ranks_while_states_agree(equivalence):
    a, b = equivalence[0]["dropout"], equivalence[1]["dropout"]
    assert not torch.equal(a["probe"], b["probe"])  # each rank its own masks
    assert tree.equal(a["params"], b["params"]) and torch.equal(a["rng"], b["rng"])


def test_resumed_two_rank_run_equals_a_straight_one_and_restores_on_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for d in (straight, resumed):
        d.mkdir()
    # Straight: 4 steps, checkpoints at 2 and 4 (ZeRO-1 sharded adamw, dropout, async saves).
    _run(["train", str(straight), "--steps", "4", "--save-every", "2", "--ckpt", str(straight / "ckpt")])
    # Resumed: a new launch that finds only the step-2 checkpoint and continues to 4.
    (resumed / "ckpt").mkdir()
    shutil.copytree(straight / "ckpt" / "step_00000002", resumed / "ckpt" / "step_00000002")
    _run(["train", str(resumed), "--steps", "4", "--save-every", "2", "--ckpt", str(resumed / "ckpt"), "--resume"])
    a = torch.load(straight / "rank0.pt", weights_only=False)
    # Before the first save, restoring failed on rank 0 and the same error reached rank 1.
    assert [torch.load(straight / f"rank{r}.pt", weights_only=False)["restore_error"] for r in range(2)] == ["FileNotFoundError"] * 2
    for r in range(2):
        b = torch.load(resumed / f"rank{r}.pt", weights_only=False)
        assert a["step"] == b["step"] == 4 and a["paths"] == b["paths"]
        assert all(torch.equal(x, y) for x, y in zip(a["state"], b["state"])), "resumed run differs from the straight one"
    # The checkpoint written by 2 ranks restores into a plain one-process state.
    from craftfn.training.checkpointing import CheckpointManager

    template = TrainState.create(model=dist_worker.make_model(dropout=0.1), tx=dist_worker.optimizers()["adamw"], seed=0)
    one = CheckpointManager(straight / "ckpt").restore(template, step=4)
    assert tree.paths(one) == a["paths"]
    assert all(torch.equal(x, y) for x, y in zip(tree.leaves(one), a["state"]))
    assert distributed.opt_state_bytes(one.opt_state) > 0


def _fault(tmp_path: Path, victim: int, hang: bool, timeout_s: float):
    procs = _start(["kill", str(tmp_path), "--victim", str(victim), "--timeout", str(timeout_s)] + (["--hang"] if hang else []))
    survivor = procs[1 - victim]
    fault_file = tmp_path / "fault_time"
    try:
        deadline = time.monotonic() + 60
        while not fault_file.exists() and time.monotonic() < deadline and survivor.poll() is None:
            time.sleep(0.05)
        assert fault_file.exists(), "the victim never reached its fault"
        # A bound, not a benchmark: the survivor must end instead of hanging.
        bound = timeout_s + 30.0
        try:
            _, err = survivor.communicate(timeout=bound)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving rank still runs {bound:.0f} s after rank {victim} {'hung' if hang else 'died'}")
        return survivor.returncode, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_rank_ends_the_other_with_a_clear_error(tmp_path, victim):
    rc, err = _fault(tmp_path, victim, hang=False, timeout_s=120.0)
    assert rc != 0
    assert "DistributedError" in err and f"rank {1 - victim} of 2" in err
    assert "Another rank most likely died" in err and "all_reduce of gradients failed" in err


def test_a_hung_rank_ends_the_other_after_the_timeout(tmp_path):
    rc, err = _fault(tmp_path, victim=1, hang=True, timeout_s=3.0)
    assert rc != 0
    assert "DistributedError" in err and "stopped responding for longer than the timeout (3 s" in err


GIN = """
include '{models}'
BLOCK_SIZE = 16
lm_task.text = @stdlib_corpus()
stdlib_corpus.max_bytes = 20000
lm_task.tokenizer = 'char'
lm_task.model_config = @GPTConfig
lm_task.block_size = %BLOCK_SIZE
lm_task.batch_size = 8
lm_task.eval_windows = 16
GPTConfig.n_layer = 1
GPTConfig.n_embd = 32
train.optimizer = @sgd()
sgd.learning_rate = 0.1
sgd.momentum = 0.9
Trainer.max_steps = 4
Trainer.eval_every = 2
Trainer.save_every = 2
train.console_every = 1
train.sample_tokens = 8
"""


def test_torchrun_cli_on_two_nodes_of_two_ranks_trains_data_parallel_and_matches_one_process(tmp_path):
    """4 ranks as README's multi-node command starts them: one torchrun per node (here both on this machine)."""
    from safetensors.torch import load_file

    gin_file = tmp_path / "tiny.gin"
    gin_file.write_text(GIN.format(models=Path(__file__).resolve().parents[2] / "gin" / "models" / "gpt_small.gin"))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = str(launcher.free_port())
    nodes = [
        subprocess.Popen(
            [torchrun, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
             "-m", "craftfn", "train", "--gin_file", str(gin_file), "--run_dir", str(tmp_path / "four")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for node in (0, 1)
    ]
    one = subprocess.run(
        [sys.executable, "-m", "craftfn", "train", "--gin_file", str(gin_file), "--run_dir", str(tmp_path / "one")],
        env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S,
    )
    outs = []
    try:
        for p in nodes:
            out, err = p.communicate(timeout=LAUNCH_TIMEOUT_S)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert one.returncode == 0, one.stderr[-3000:]
    # Only the main rank (node 0, local rank 0) reports: one banner, one line per step, one metrics file.
    assert outs[0].count("craftfn: training a") == 1 and "craftfn: training a" not in outs[1]
    assert outs[0].count("step 4/4 | loss") == 1
    assert sorted(p.name for p in (tmp_path / "four" / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    a, b = load_file(tmp_path / "four" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in a)
