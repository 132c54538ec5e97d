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
    tx = optim.adamw(1e-2, weight_decay=0.1) if hasattr(optim, "adamw") else optim.sgd(lambda n: 0.1 / (1.0 + n), momentum=0.9)
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
    stopper = EarlyStopping(monitor="eval/loss", mode="min", patience=1000)
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
        resumed = trainer.fit(fresh_state(seed=99), resume=True)
        assert manager.all_steps() == [n, 2 * n]

    assert int(resumed.step) == 2 * n
    assert tree.equal(tree.leaves(resumed.params), tree.leaves(straight.params))
    assert tree.equal(tree.leaves(resumed.opt_state), tree.leaves(straight.opt_state))
    assert tree.equal(tree.leaves(resumed), tree.leaves(straight))

    def train_losses(log):
        return [(s, m["loss"]) for k, s, m in log.events if k == "train"]

    # The logged losses of the split run, both halves, are exactly those of the straight run.
    assert train_losses(first_log) + train_losses(second_log) == train_losses(straight_log)
    assert [s for s, _ in train_losses(straight_log)] == list(range(1, 2 * n + 1))
    # Callback state came back: EarlyStopping ends with the same best and counters.
    assert second_stop.state_dict() == straight_stop.state_dict()
