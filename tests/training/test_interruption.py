"""No lost run: interruption (SIGINT/SIGTERM), a second trainer on the same run directory, a stale lock,
a diverged run, a text without newline, and optional end work that fails.

Signals and exit codes need real processes: the interrupted CLI runs and the lock holder are
subprocesses; everything else runs in-process (craftfn.cli.main) to stay fast.
"""

from __future__ import annotations

import ast
import json
import os
import random as pyrandom
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from craftfn import TrainState, make_train_step, optim, tree
from craftfn.cli import main
from craftfn.training import (
    Callback,
    CheckpointManager,
    Evaluator,
    RunDirLock,
    SampleText,
    SaveWeights,
    Trainer,
    TrainingInterrupted,
)
from craftfn.training.runlock import LOCK_FILE

REPO = Path(__file__).resolve().parent.parent.parent
DEFAULT_GIN = str(REPO / "gin" / "char_gpt.gin")
TEXT_GIN = str(REPO / "gin" / "text_file_gpt.gin")

TINY = [
    "--gin.warmup_cosine_decay.warmup_steps=2", "--gin.Trainer.eval_every=1000", "--gin.GPTConfig.n_layer=1",
    "--gin.GPTConfig.n_head=2", "--gin.GPTConfig.n_embd=8", "--gin.BLOCK_SIZE=8", "--gin.lm_task.batch_size=4",
    "--gin.lm_task.eval_windows=8", "--gin.stdlib_corpus.max_bytes=5000", "--gin.train.sample_tokens=4",
    "--gin.train.num_threads=1", "--gin_bindings", "train.console_every = 1",
]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def _steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


def _cli(*args: str, stdout: int = subprocess.PIPE, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "craftfn", *args], stdout=stdout, stderr=subprocess.PIPE, text=True, env=env, **kwargs)


# ----------------------------------------------------------------------------- signals, CLI


STEPS = 60


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    args = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), f"--gin.MAX_STEPS={STEPS}", "--gin.Trainer.save_every=7", *TINY]
    assert main(args) == 0
    return run


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_signal_at_a_random_step_saves_and_resume_equals_the_straight_run(sig, code, straight_run, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), f"--gin.MAX_STEPS={STEPS}", "--gin.Trainer.save_every=7", *TINY]
    at = pyrandom.Random(int(sig)).randint(3, 25)  # the step after which the signal is sent
    proc = _cli(*args, cwd=tmp_path)
    seen = []
    for line in proc.stdout:  # console lines "step N/60 | ..." come once step N+1 is dispatched
        if line.startswith("step "):
            seen.append(int(line.split()[1].split("/")[0]))
            if seen[-1] >= at:
                proc.send_signal(sig)
                break
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert f"interrupted by {sig.name}" in err and "run the same command again to resume" in err
    saved = _steps(run)
    assert saved and at <= saved[-1] < STEPS, (saved, at)  # the step in flight finished, then it saved
    assert (run / "model.safetensors").is_file()
    with CheckpointManager(run / "checkpoints") as ckpt:
        assert ckpt.metadata()["step"] == saved[-1]
    interrupted_weights = _weights(run / "model.safetensors")

    # The same command resumes and ends bit for bit where the uninterrupted run ended.
    assert main(args) == 0
    assert _steps(run)[-1] == STEPS
    straight, resumed = _weights(straight_run / "model.safetensors"), _weights(run / "model.safetensors")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not all(torch.equal(interrupted_weights[k], resumed[k]) for k in resumed)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == STEPS


# ----------------------------------------------------------------------------- one trainer per run dir


@pytest.mark.slow
def test_a_second_trainer_exits_2_and_a_killed_trainers_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    first = _cli(
        "train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), "--gin.MAX_STEPS=100000", "--gin.Trainer.save_every=100000",
        *TINY, stdout=subprocess.DEVNULL, cwd=tmp_path,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # the first trainer has the lock once its pid is in the file
            text = (run / LOCK_FILE).read_text() if (run / LOCK_FILE).exists() else ""
            if text.strip() and json.loads(text)["pid"] == first.pid:
                break
            assert first.poll() is None, first.communicate()[1][-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the first trainer never took the lock")
        args = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), "--gin.MAX_STEPS=4", *TINY]
        assert main(args) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert f"in use by another craftfn trainer (pid {first.pid}" in err and "--run_dir" in err
        assert not _steps(run)  # the second trainer wrote no checkpoint
        first.send_signal(signal.SIGKILL)  # no chance to clean up: the lock file keeps its pid
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
        first.communicate()
    assert json.loads((run / LOCK_FILE).read_text())["pid"] == first.pid
    assert main(args) == 0
    out = capsys.readouterr().out
    assert f"took over the lock of {run} left by pid {first.pid}" in out
    assert (run / LOCK_FILE).read_text() == ""  # released at the end


def test_run_dir_lock_pid_fallback_without_flock(tmp_path, monkeypatch):
    # Where the file system has no flock, the pid decides: a live holder blocks, a dead one is taken over.
    from craftfn.training import runlock

    monkeypatch.setattr(runlock, "fcntl", None)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": runlock.socket.gethostname()}))
    with pytest.raises(runlock.RunDirLockedError, match=f"pid {os.getppid()}"):
        RunDirLock(tmp_path).acquire()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead), "host": runlock.socket.gethostname()}))
    with RunDirLock(tmp_path) as lock:
        assert lock.took_over["pid"] == int(dead)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


# ----------------------------------------------------------------------------- runs that end badly


def test_text_without_newline_trains_and_leaves_weights_and_a_checkpoint(tmp_path, capsys):
    data = tmp_path / "one_line.txt"
    data.write_text("the quick brown fox jumps over the lazy dog " * 60)  # no "\n" anywhere
    run = tmp_path / "run"
    assert main(["train", "--gin_file", TEXT_GIN, f"--gin.DATA_PATH={data}", "--run_dir", str(run), "--gin.MAX_STEPS=4", *TINY]) == 0
    assert (run / "model.safetensors").is_file() and _steps(run) == [4]
    out = capsys.readouterr().out
    assert "sample after 4 steps" in out


def test_diverged_run_leaves_weights_and_its_last_finite_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    diverge = ["--gin.create_optimizer.name=sgd", "--gin_bindings", "create_optimizer.learning_rate = 1e9", "--gin.Trainer.save_every=1"]
    args = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), "--gin.MAX_STEPS=30", *TINY, *diverge]
    with pytest.warns(RuntimeWarning):
        status = main(args)
    captured = capsys.readouterr()
    assert status == 1  # NanGuard stopped the run: not a success, but nothing lost
    assert "NanGuard" in captured.out and "Traceback" not in captured.err
    weights = _weights(run / "model.safetensors")
    assert not all(torch.isfinite(w).all() for w in weights.values())
    assert "are not finite (the run diverged)" in captured.out
    saved = _steps(run)
    assert saved and saved[-1] < 30
    state = safetensors.torch.load_file(str(run / "checkpoints" / f"step_{saved[-1]:08d}" / "state.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("params."))
    # The checkpoint is resumable: a rerun (here one that ends at that step) restores it and exports it.
    rerun = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run), f"--gin.MAX_STEPS={saved[-1]}", *TINY, *diverge[:3]]
    with pytest.warns(RuntimeWarning, match="SampleText: no sample"):  # finite but huge weights: logits overflow
        assert main(rerun) == 0
    assert "resuming from the checkpoints" in capsys.readouterr().out
    exported = _weights(run / "model.safetensors")
    assert all(torch.equal(exported[k], state[f"params.{k}"]) for k in exported if f"params.{k}" in state)
    assert all(torch.isfinite(w).all() for w in exported.values())


# ----------------------------------------------------------------------------- the Trainer API


def _mse(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def _data(step):
    g = torch.Generator().manual_seed(int(step))
    x = torch.randn(4, 3, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def _state():
    torch.manual_seed(0)
    return TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.adamw(0.05))


class SignalAt(Callback):
    def __init__(self, step, sig):
        super().__init__()
        self.at, self.sig = step, sig

    def on_step_begin(self, trainer, step):
        if step == self.at:
            os.kill(os.getpid(), self.sig)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_fit_saves_and_raises_training_interrupted_then_restores_the_handlers(sig, tmp_path):
    before = signal.getsignal(sig)
    ckpt = CheckpointManager(tmp_path / "ckpt", async_save=False)
    saver = SaveWeights(tmp_path / "model.safetensors")
    trainer = Trainer(make_train_step(_mse, donate=True), _data, max_steps=50, save_every=100, checkpoint_manager=ckpt, callbacks=[saver, SignalAt(5, sig)])
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit(_state())
    e = info.value
    assert (e.signum, e.step, e.exit_code) == (sig, 5, 128 + sig)  # the step in flight finished
    assert trainer.stop_reason == f"interrupted by {sig.name}"
    assert ckpt.all_steps() == [5] and saver.written is not None
    assert int(e.state.step) == 5
    assert signal.getsignal(sig) is before
    # Resuming continues from step 5 and matches a run that was never interrupted.
    resumed = Trainer(make_train_step(_mse, donate=True), _data, max_steps=12, checkpoint_manager=ckpt).fit(_state(), resume=True)
    straight = Trainer(make_train_step(_mse, donate=True), _data, max_steps=12).fit(_state())
    assert tree.equal(resumed.params, straight.params) and tree.equal(resumed.opt_state, straight.opt_state)
    ckpt.close()


def test_a_failing_final_evaluation_still_saves_and_writes_the_weights(tmp_path):
    def broken_eval(state, batch):
        raise RuntimeError("evaluation broke")

    ckpt = CheckpointManager(tmp_path / "ckpt", async_save=False)
    saver = SaveWeights(tmp_path / "model.safetensors")
    trainer = Trainer(make_train_step(_mse), _data, evaluator=Evaluator(broken_eval, [_data(0)]), max_steps=3, checkpoint_manager=ckpt, callbacks=[saver])
    with pytest.raises(RuntimeError, match="evaluation broke"):
        trainer.fit(_state())
    assert ckpt.all_steps() == [3] and (tmp_path / "model.safetensors").is_file()
    ckpt.close()


def test_sampling_that_fails_is_reported_and_the_run_ends_normally(tmp_path):
    def nan_loss(state, params, batch, rng):  # diverges at step 3: the weights become NaN
        loss = _mse(state, params, batch, rng)
        return loss * torch.where(state.step >= 2, torch.tensor(float("nan")), torch.tensor(1.0))

    echoed = []
    sampler = SampleText(lambda s: [0] * len(s), lambda ids: "x" * len(ids), prompt="ab", max_new_tokens=2, echo=echoed.append)
    saver = SaveWeights(tmp_path / "model.safetensors")
    ckpt = CheckpointManager(tmp_path / "ckpt", async_save=False)
    model = TrainState.create(model=torch.nn.Sequential(torch.nn.Embedding(3, 3)), tx=optim.sgd(0.1))

    def lm_loss(state, params, batch, rng):
        return nan_loss(state, params, {"x": batch["t"], "y": torch.zeros(4, 1, 3)}, rng)

    trainer = Trainer(make_train_step(lm_loss), lambda i: {"t": torch.zeros(4, 1, dtype=torch.long)}, max_steps=5, save_every=1, checkpoint_manager=ckpt, callbacks=[saver, sampler])
    with pytest.warns(RuntimeWarning) as warned:
        trainer.fit(model)
    messages = " ".join(str(w.message) for w in warned)
    assert "not saving step" in messages and "not finite" in messages  # the diverged state is not checkpointed
    assert "SampleText: no sample" in messages and "not finite" in messages
    assert echoed and "no sample" in echoed[-1]
    assert saver.written is not None and saver.finite is False
    assert ckpt.all_steps() == [1, 2]  # the last finite state is the newest
    ckpt.close()


def test_callbacks_module_does_not_import_the_trainer():
    # The trainer imports the callbacks; the callbacks get Event and TrainerView from events.py.
    source = (REPO / "craftfn" / "training" / "callbacks.py").read_text()
    imported = {
        node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert "craftfn.training.trainer" not in imported and "craftfn.training.events" in imported


def test_docstring_examples_of_runlock_and_events_run():
    import doctest

    from craftfn.training import events, runlock

    for module in (runlock, events):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
