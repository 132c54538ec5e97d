"""Exact resume through the Trainer: 2N steps straight == N steps, stop, resume, N steps (bit for bit)."""

from __future__ import annotations

import pytest
import torch

from craftfn import TrainState, make_eval_step, make_train_step, optim, tree
from craftfn.data import random_window_batch
from craftfn.models import GPT, GPTConfig, lm_eval_metrics, lm_loss
from craftfn.training import Callback, EarlyStopping, Trainer
from craftfn.training.checkpointing import CheckpointManager

VOCAB, BLOCK = 13, 8
TOKENS = torch.arange(300) * 5 % VOCAB


def fresh_state(seed: int = 0) -> TrainState:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8, dropout=0.1))
    tx = optim.adamw(1e-2, weight_decay=0.1)
    return TrainState.create(model=model, tx=tx, seed=7)


def batch_fn(step: int) -> dict[str, torch.Tensor]:
    return random_window_batch(TOKENS, batch_size=4, block_size=BLOCK, seed=11, step=step)


EPOCH_BATCHES = [batch_fn(1000 + i) for i in range(4)]  # a finite, map-style dataset of 4 batches
EVAL_BATCHES = [batch_fn(5000 + i) for i in range(2)]


class Recorder(Callback):
    """Keeps every logged train/eval event (step, metrics) as the host saw it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, int, dict[str, float]]] = []

    def on_log(self, trainer, event) -> None:
        if event.kind in ("train", "eval"):
            keep = {k: v for k, v in event.metrics.items() if k in ("loss", "grad_norm", "lr")}
            self.events.append((event.kind, event.step, keep))


def make_trainer(manager: CheckpointManager, max_steps: int, data, save_every: int) -> tuple[Trainer, Recorder, EarlyStopping]:
    recorder = Recorder()
    # The eval loss falls at every evaluation here, so with mode="max" the best stays the first
    # evaluation's and ``wait`` counts every later one: state a resumed run can only match if its
    # counters were restored (with mode="min" fresh counters would match too).
    stopper = EarlyStopping(monitor="eval/loss", mode="max", patience=1000)
    trainer = Trainer(
        make_train_step(lm_loss, donate=True),
        data,
        eval_step=make_eval_step(lm_eval_metrics),
        eval_data=EVAL_BATCHES,
        max_steps=max_steps,
        eval_every=2,
        log_every=1,
        callbacks=[recorder, stopper],
        checkpoint_manager=manager,
        save_every=save_every,
        seed=3,
        warmup_steps=0,
    )
    return trainer, recorder, stopper


@pytest.mark.parametrize("data", ["function", "epochs"])
def test_trainer_resume_is_bit_exact(tmp_path, data):
    n = 5  # odd: resuming mid-epoch (4 batches per epoch) and between evaluations
    train_data = batch_fn if data == "function" else EPOCH_BATCHES

    with CheckpointManager(tmp_path / "straight", keep_last=2) as manager:
        trainer, straight_log, straight_stop = make_trainer(manager, 2 * n, train_data, save_every=n)
        straight = trainer.fit(fresh_state())

    with CheckpointManager(tmp_path / "split", keep_last=2) as manager:
        trainer, first_log, _ = make_trainer(manager, n, train_data, save_every=n)
        trainer.fit(fresh_state())
    # A new process would start here: nothing survives but the checkpoint directory.
    with CheckpointManager(tmp_path / "split", keep_last=2) as manager:
        assert manager.latest_step() == n
        trainer, second_log, second_stop = make_trainer(manager, 2 * n, train_data, save_every=n)
        template = fresh_state(seed=99)
        memory = [x.data_ptr() for x in tree.leaves(template.params)]
        resumed = trainer.fit(template, resume=True)
        assert manager.all_steps() == [n, 2 * n]
    # The step donates, so the checkpoint was read into the given state's memory (restore(donate=True)).
    assert [x.data_ptr() for x in tree.leaves(resumed.params)] == memory

    assert int(resumed.step) == 2 * n
    assert tree.equal(tree.leaves(resumed.params), tree.leaves(straight.params))
    assert tree.equal(tree.leaves(resumed.opt_state), tree.leaves(straight.opt_state))
    assert tree.equal(tree.leaves(resumed), tree.leaves(straight))

    def train_losses(log):
        return [(s, m["loss"]) for k, s, m in log.events if k == "train"]

    # The logged losses of the split run, both halves, are exactly those of the straight run.
    assert train_losses(first_log) + train_losses(second_log) == train_losses(straight_log)
    assert [s for s, _ in train_losses(straight_log)] == list(range(1, 2 * n + 1))
    # Callback state came back: EarlyStopping ends with the same best and counters, and the best
    # was found in the first half, so the second half could not have rebuilt it from scratch.
    assert straight_stop.best_step == 2 and straight_stop.wait == 4  # no better eval at steps 4, 6, 8, 10
    assert second_stop.state_dict() == straight_stop.state_dict()


# --------------------------------------------------------------------------------------------
# Through the CLI: `craftfn train` in subprocesses, with automatic resume of the run directory
# --------------------------------------------------------------------------------------------

TINY_GIN = """
lm_task.text = @stdlib_corpus()
stdlib_corpus.max_bytes = 20000
lm_task.tokenizer = 'char'
lm_task.model_config = @GPTConfig
lm_task.block_size = 16
lm_task.batch_size = 4
lm_task.eval_windows = 8
lm_task.seed = 0
GPTConfig.n_layer = 1
GPTConfig.n_head = 2
GPTConfig.n_embd = 16
GPTConfig.dropout = 0.1
train.optimizer = @sgd()
sgd.learning_rate = 0.05
sgd.momentum = 0.9
Trainer.max_steps = 6
Trainer.eval_every = 2
Trainer.save_every = 3
train.donate = True
train.console_every = 0
train.sample_tokens = 4
train.num_threads = 1
"""


def _craftfn_train(gin_file, run_dir, *bindings) -> None:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "craftfn", "train", "--gin_file", str(gin_file), "--run_dir", str(run_dir), *bindings]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _train_losses(run_dir) -> list[tuple[int, float]]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]


@pytest.mark.slow
def test_cli_resume_is_bit_exact(tmp_path):
    from safetensors.torch import load_file

    gin_file = tmp_path / "tiny.gin"
    gin_file.write_text(TINY_GIN)
    straight, split = tmp_path / "straight", tmp_path / "split"
    _craftfn_train(gin_file, straight)
    # Stop after 3 of the 6 steps (the schedule and everything else unchanged), then run the same
    # command again: the run directory has checkpoints, so it resumes by itself.
    _craftfn_train(gin_file, split, "--gin.Trainer.max_steps=3")
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step_00000003"]
    out = _craftfn_train(gin_file, split)
    assert "resuming" in out
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]

    a = load_file(straight / "checkpoints" / "step_00000006" / "state.safetensors")
    b = load_file(split / "checkpoints" / "step_00000006" / "state.safetensors")
    assert set(a) == set(b) and any(k.startswith("opt_state.") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ma, mb = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert all(torch.equal(ma[k], mb[k]) for k in ma) and set(ma) == set(mb)
    with CheckpointManager(split / "checkpoints") as manager:
        meta = manager.metadata(6)
    assert "Trainer.max_steps = 6" in meta["extra"]["gin_config"] and meta["extra"]["tokenizer"]
    # Logged losses: the two halves of the split run (one metrics.jsonl, appended) equal the straight run.
    assert _train_losses(split) == _train_losses(straight)
    assert [s for s, _ in _train_losses(straight)] == [1, 2, 3, 4, 5, 6]


# --------------------------------------------------------------------------------------------
# A training process killed at a random moment, then resumed, ends where an uninterrupted run ends
# --------------------------------------------------------------------------------------------


def _train_in_child(directory: str, max_steps: int) -> None:
    torch.set_num_threads(1)
    manager = CheckpointManager(directory, keep_last=2, async_save=True)
    trainer, _, _ = make_trainer(manager, max_steps, batch_fn, save_every=2)
    trainer.fit(fresh_state(), resume=True)
    manager.close()


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_final_state(tmp_path):
    import multiprocessing
    import os
    import random as pyrandom
    import signal
    import time

    max_steps = 60
    with CheckpointManager(tmp_path / "straight") as manager:
        trainer, _, _ = make_trainer(manager, max_steps, batch_fn, save_every=2)
        straight = trainer.fit(fresh_state())

    ctx = multiprocessing.get_context("fork")
    rng = pyrandom.Random(5)
    run_dir = tmp_path / "killed"
    kills, reached = 0, []
    for _ in range(3):
        child = ctx.Process(target=_train_in_child, args=(str(run_dir), max_steps), daemon=True)
        child.start()
        # Kill at a random moment after this process's first new checkpoint appeared.
        before = set(os.listdir(run_dir)) if run_dir.exists() else set()
        deadline = time.monotonic() + 60
        while child.is_alive() and time.monotonic() < deadline:
            if run_dir.exists() and any(n.startswith("step_") for n in set(os.listdir(run_dir)) - before):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if child.is_alive():
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.join()
        with CheckpointManager(run_dir) as manager:
            reached.append(manager.latest_step())
    # The last process runs to the end (resuming from whatever the kills left).
    with CheckpointManager(run_dir, keep_last=2) as manager:
        trainer, _, _ = make_trainer(manager, max_steps, batch_fn, save_every=2)
        resumed = trainer.fit(fresh_state(seed=1), resume=True)
    assert kills >= 1 and any(step is not None and step < max_steps for step in reached), reached
    assert int(resumed.step) == max_steps
    assert tree.equal(tree.leaves(resumed), tree.leaves(straight))


def test_trainer_resume_with_dynamic_loss_scale_is_bit_exact(tmp_path):
    """The loss scale lives in the state (LossScaledTrainState): it must come back on resume."""
    from craftfn import precision

    initial = precision.DynamicLossScale(scale=2.0**4, growth_interval=2)  # grows during the run

    def trainer_for(manager, max_steps):
        return Trainer(
            make_train_step(lm_loss, loss_scale=initial),
            batch_fn,
            max_steps=max_steps,
            checkpoint_manager=manager,
            save_every=3,
            warmup_steps=0,
        )

    with CheckpointManager(tmp_path / "straight") as manager:
        straight = trainer_for(manager, 6).fit(fresh_state())
    with CheckpointManager(tmp_path / "split") as manager:
        trainer_for(manager, 3).fit(fresh_state())
    with CheckpointManager(tmp_path / "split") as manager:
        resumed = trainer_for(manager, 6).fit(fresh_state(seed=5), resume=True)
    assert isinstance(resumed, precision.LossScaledTrainState)
    assert resumed.loss_scale.scale.item() == straight.loss_scale.scale.item() > 2.0**4
    assert resumed.loss_scale.growth_interval == 2
    assert tree.equal(tree.leaves(resumed), tree.leaves(straight))


def _managers(directory, kind: str):
    from craftfn import distributed

    if kind == "sharded":
        return distributed.ShardedCheckpointManager(directory, keep_last=2)
    return distributed.CheckpointCoordinator(CheckpointManager(directory, keep_last=2))


@pytest.mark.parametrize("kind", ["sharded", "coordinator"])
def test_every_manager_restores_donated_into_the_given_state(tmp_path, kind):
    from craftfn.state import DonatedStateError, check_live

    saved = fresh_state(seed=1)
    manager = _managers(tmp_path / kind, kind)
    manager.save(3, saved)
    manager.wait()
    template = fresh_state(seed=99)
    plain = manager.restore(fresh_state(seed=99))
    memory = [x.data_ptr() for x in tree.leaves(template.params)]
    restored = manager.restore(template, donate=True)
    assert tree.equal(tree.leaves(restored), tree.leaves(plain)) and tree.equal(tree.leaves(restored.params), tree.leaves(saved.params))
    assert [x.data_ptr() for x in tree.leaves(restored.params)] == memory
    with pytest.raises(DonatedStateError):
        check_live(template)  # used up, as a donated step's input
    # A missing checkpoint leaves the template intact.
    intact = fresh_state(seed=5)
    with pytest.raises(FileNotFoundError):
        _managers(tmp_path / "empty", kind).restore(intact, donate=True)
    assert tree.equal(tree.leaves(intact.params), tree.leaves(fresh_state(seed=5).params))
    with pytest.raises(TypeError, match="donate must be a bool"):
        manager.restore(fresh_state(), donate="yes")


def test_trainer_resume_donates_into_a_sharded_managers_restore(tmp_path):
    from craftfn import distributed

    with distributed.ShardedCheckpointManager(tmp_path) as manager:
        trainer, _, _ = make_trainer(manager, 2, batch_fn, save_every=2)
        done = trainer.fit(fresh_state())
    with distributed.ShardedCheckpointManager(tmp_path) as manager:
        trainer, _, _ = make_trainer(manager, 2, batch_fn, save_every=2)
        template = fresh_state(seed=99)
        memory = [x.data_ptr() for x in tree.leaves(template.params)]
        resumed = trainer.fit(template, resume=True)
    assert [x.data_ptr() for x in tree.leaves(resumed.params)] == memory
    assert tree.equal(tree.leaves(resumed.params), tree.leaves(done.params))


class _ManagerWithoutDonate:
    """A user's manager: restore(template, step, fallback) and nothing more (no donate=)."""

    def __init__(self, directory) -> None:
        self.inner = CheckpointManager(directory)

    def save(self, step, state, metrics=None, extra=None):
        return self.inner.save(step, state, metrics=metrics, extra=extra)

    def restore(self, template, step="latest", fallback=False):
        return self.inner.restore(template, step=step, fallback=fallback)

    def latest_step(self):
        return self.inner.latest_step()

    def metadata(self, step="latest"):
        return self.inner.metadata(step)

    def wait(self):
        self.inner.wait()

    def close(self):
        self.inner.close()


def test_trainer_resumes_through_a_coordinator_around_a_manager_without_donate(tmp_path):
    from craftfn import distributed

    with distributed.CheckpointCoordinator(_ManagerWithoutDonate(tmp_path)) as manager:
        trainer, _, _ = make_trainer(manager, 2, batch_fn, save_every=2)
        done = trainer.fit(fresh_state())
    with distributed.CheckpointCoordinator(_ManagerWithoutDonate(tmp_path)) as manager:
        trainer, _, _ = make_trainer(manager, 2, batch_fn, save_every=2)
        resumed = trainer.fit(fresh_state(seed=99), resume=True)  # the step donates; this manager cannot
    assert tree.equal(tree.leaves(resumed.params), tree.leaves(done.params))


def test_a_failed_donated_restore_marks_the_template_it_wrote_into(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from craftfn import distributed
    from craftfn.state import DonatedStateError, check_live

    manager = distributed.ShardedCheckpointManager(tmp_path)
    manager.save(1, fresh_state(seed=1))

    def failing_load(state_dict, **kwargs):
        next(iter(state_dict.values())).fill_(7.0)  # some bytes landed before a disk error
        raise OSError("read error")

    monkeypatch.setattr(dcp, "load", failing_load)
    template = fresh_state(seed=2)
    with pytest.raises(OSError, match="read error"):
        manager.restore(template, donate=True)
    with pytest.raises(DonatedStateError):
        check_live(template)
    # The same failure without donate wrote into new tensors: the template stays usable and unchanged.
    intact = fresh_state(seed=2)
    with pytest.raises(OSError, match="read error"):
        manager.restore(intact)
    check_live(intact)
    assert tree.equal(tree.leaves(intact.params), tree.leaves(fresh_state(seed=2).params))
