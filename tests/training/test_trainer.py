"""Trainer: deferred metric reads, eval equals a direct computation, epochs mode, data order, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from craftfn import TrainState, data, make_eval_step, make_train_step, optim, tree
from craftfn.models.gpt import GPT, GPTConfig, lm_eval_metrics, lm_loss
from craftfn.training import Callback, EarlyStopping, Evaluator, Trainer, count_tokens, learning_rate_of


def mse_loss(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def linear_data(step):
    g = torch.Generator().manual_seed(1000 + int(step))
    x = torch.randn(8, 3, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def linear_state(seed=0):
    torch.manual_seed(seed)
    return TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1), seed=seed)


class Recorder(Callback):
    """Records every hook call as a tuple."""

    def __init__(self, log, every=1):
        super().__init__(every)
        self.log = log

    def on_train_begin(self, trainer, state):
        self.log.append(("train_begin", int(state.step)))

    def on_train_end(self, trainer, state):
        self.log.append(("train_end", trainer.step))

    def on_epoch_begin(self, trainer, epoch):
        self.log.append(("epoch_begin", epoch))

    def on_epoch_end(self, trainer, epoch, state):
        self.log.append(("epoch_end", epoch))

    def on_step_begin(self, trainer, step):
        self.log.append(("step_begin", step))

    def on_step_end(self, trainer, event):
        self.log.append(("step_end", event.step))

    def on_eval_end(self, trainer, event):
        self.log.append(("eval", event.step))

    def on_save(self, trainer, step):
        self.log.append(("save", step))


class FakeManager:
    def __init__(self):
        self.saved = []

    def save(self, step, state, metrics=None, extra=None):
        self.saved.append((step, metrics, extra))

    def wait(self):
        pass


def test_fit_trains_and_counts_steps():
    state = linear_state()
    before = mse_loss(state, state.params, linear_data(99), None)
    state = Trainer(make_train_step(mse_loss), linear_data, max_steps=60).fit(state)
    assert int(state.step) == 60
    assert mse_loss(state, state.params, linear_data(99), None) < 0.05 * before


def test_metrics_are_read_after_the_next_step_is_dispatched():
    order = []
    step_fn = make_train_step(mse_loss)

    def recording_step(state, batch):
        out = step_fn(state, batch)
        order.append(("dispatch", int(state.step) + 1))
        return out

    Trainer(recording_step, linear_data, max_steps=5, callbacks=[Recorder(order)]).fit(linear_state())
    seq = [e for e in order if e[0] in ("dispatch", "step_end")]
    assert seq == [
        ("dispatch", 1), ("dispatch", 2), ("step_end", 1), ("dispatch", 3), ("step_end", 2),
        ("dispatch", 4), ("step_end", 3), ("dispatch", 5), ("step_end", 4), ("step_end", 5),
    ]


def test_log_every_reads_in_bursts_never_the_newest_step():
    order = []
    step_fn = make_train_step(mse_loss)

    def recording_step(state, batch):
        out = step_fn(state, batch)
        order.append(("dispatch", int(state.step) + 1))
        return out

    Trainer(recording_step, linear_data, max_steps=8, log_every=4, callbacks=[Recorder(order)]).fit(linear_state())
    seq = [e for e in order if e[0] in ("dispatch", "step_end")]
    assert seq == [("dispatch", s) for s in range(1, 5)] + [("step_end", s) for s in range(1, 4)] + [
        ("dispatch", s) for s in range(5, 9)
    ] + [("step_end", s) for s in range(4, 9)]


def test_train_events_carry_floats_and_throughput():
    events = []

    class Collect(Callback):
        def on_log(self, trainer, event):
            events.append(event)

    Trainer(make_train_step(mse_loss), linear_data, max_steps=6, callbacks=[Collect()]).fit(linear_state())
    train = [e for e in events if e.kind == "train"]
    assert [e.step for e in train] == list(range(1, 7))
    assert all(isinstance(v, float) for e in train for v in e.metrics.values())
    assert "tokens_per_sec" not in train[1].metrics  # warm-up steps are left out
    assert train[-1].metrics["samples_per_sec"] > 0 and "eta_sec" in train[-1].metrics


def tiny_gpt_setup(n_tokens=3000, block=8, seed=0):
    text = data.stdlib_corpus(max_bytes=n_tokens)
    tok = data.CharTokenizer.from_text(text)
    tokens = tok.encode_tensor(text)
    train_tokens, val_tokens = data.train_val_split(tokens, 0.2)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=block, n_layer=1, n_head=2, n_embd=16))
    state = TrainState.create(model=model, tx=optim.sgd(0.3), seed=seed)
    return state, train_tokens, val_tokens


def test_reported_eval_loss_equals_direct_computation():
    state, train_tokens, val_tokens = tiny_gpt_setup()
    block = 8
    val_set = data.WindowDataset(val_tokens, block)
    # Batches of 7 windows: the last one is shorter, so a plain mean of batch means would be wrong.
    batches = list(data.epoch_batches(val_set, 7, seed=0, epoch=0, shuffle=False))
    assert batches[-1]["input_ids"].shape[0] != 7
    trainer = Trainer(
        make_train_step(lm_loss),
        data.RandomWindows(train_tokens, 4, block, seed=0).__getitem__,
        eval_step=make_eval_step(lm_eval_metrics),
        eval_data=batches,
        max_steps=6,
        eval_every=3,
    )
    state = trainer.fit(state)
    everything = val_set.get_batch(torch.arange(len(val_set)))
    with torch.no_grad():
        logits = state.apply(state.params, everything["input_ids"], training=False)
        direct = F.cross_entropy(logits.flatten(0, 1).double(), everything["labels"].flatten()).item()
    assert trainer.last_eval["loss"] == pytest.approx(direct, rel=1e-6, abs=1e-6)
    assert trainer.last_eval["num_tokens"] == everything["labels"].numel()
    assert trainer.last_eval["perplexity"] == pytest.approx(torch.tensor(direct).exp().item(), rel=1e-6)


def test_batches_follow_random_window_batch_of_seed_and_step():
    state, train_tokens, _ = tiny_gpt_setup()
    seen = []
    step_fn = make_train_step(lm_loss)

    def recording_step(s, batch):
        seen.append(batch)
        return step_fn(s, batch)

    source = data.RandomWindows(train_tokens, 4, 8, seed=3)
    Trainer(recording_step, source.__getitem__, max_steps=5).fit(state)
    for step, batch in enumerate(seen):
        expected = data.random_window_batch(train_tokens, 4, 8, seed=3, step=step)
        assert torch.equal(batch["input_ids"], expected["input_ids"])
        assert torch.equal(batch["labels"], expected["labels"])
    assert not torch.equal(seen[0]["input_ids"], seen[1]["input_ids"])


class Batches:
    """A map-style dataset of batches that records which batch was read."""

    def __init__(self, n):
        self.n = n
        self.reads = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads.append(i)
        return linear_data(i)


def test_epochs_mode_visits_every_batch_once_per_epoch_with_hooks_in_order():
    log = []
    dataset = Batches(3)
    manager = FakeManager()
    trainer = Trainer(
        make_train_step(mse_loss),
        dataset,
        eval_step=make_eval_step(mse_loss),
        eval_data=[linear_data(50)],
        epochs=2,
        callbacks=[Recorder(log)],
        checkpoint_manager=manager,
        save_every=3,
    )
    state = trainer.fit(linear_state())
    assert int(state.step) == 6 and trainer.total_steps == 6
    assert sorted(dataset.reads[:3]) == [0, 1, 2] and sorted(dataset.reads[3:]) == [0, 1, 2]
    assert dataset.reads[:3] != dataset.reads[3:]  # reshuffled per epoch (for this seed)
    assert log == [
        ("train_begin", 0),
        ("epoch_begin", 0),
        ("step_begin", 1), ("step_begin", 2), ("step_end", 1), ("step_begin", 3), ("step_end", 2), ("step_end", 3),
        ("eval", 3), ("epoch_end", 0), ("save", 3),
        ("epoch_begin", 1),
        ("step_begin", 4), ("step_begin", 5), ("step_end", 4), ("step_begin", 6), ("step_end", 5), ("step_end", 6),
        ("eval", 6), ("epoch_end", 1), ("save", 6),
        ("train_end", 6),
    ]
    assert [s for s, _, _ in manager.saved] == [3, 6]


def test_epochs_mode_over_examples_uses_epoch_batches():
    ds = data.WindowDataset(torch.arange(200) % 11, block_size=4)
    seen = []

    def step(state, batch):
        seen.append(batch["input_ids"])
        return state, {"loss": torch.tensor(0.0)}

    trainer = Trainer(step, ds, epochs=2, batch_size=10, seed=5)
    trainer.fit(TrainState.create(apply_fn=lambda p, x: x, params={"w": torch.zeros(1)}, tx=optim.sgd(0.1)).replace(step=torch.tensor(0)))
    expected = [b["input_ids"] for e in range(2) for b in data.epoch_batches(ds, 10, seed=5, epoch=e)]
    assert len(seen) == len(expected) == 2 * data.num_batches(len(ds), 10)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected))


def test_epochs_and_max_steps_first_limit_wins():
    assert Trainer(make_train_step(mse_loss), Batches(4), epochs=3, max_steps=5).total_steps == 5
    assert Trainer(make_train_step(mse_loss), Batches(4), epochs=1, max_steps=50).total_steps == 4


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "max_steps= or epochs="),
        (dict(epochs=2), "map-style"),
        (dict(max_steps=0), "max_steps must be a positive int"),
        (dict(max_steps=3, eval_step=lambda s, b: {}), "go together"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Trainer(make_train_step(mse_loss), linear_data, **kwargs)


def test_resume_restores_state_data_position_and_callback_state(tmp_path):
    from craftfn.training.checkpointing import CheckpointManager

    def run(max_steps, resume, directory, stopper):
        mgr = CheckpointManager(directory, async_save=False)
        seen = []
        step_fn = make_train_step(mse_loss)

        def recording_step(state, batch):
            seen.append(batch["x"])
            return step_fn(state, batch)

        trainer = Trainer(
            recording_step, linear_data, eval_step=make_eval_step(mse_loss), eval_data=[linear_data(77)],
            max_steps=max_steps, eval_every=2, callbacks=[stopper], checkpoint_manager=mgr, save_every=2,
        )
        state = trainer.fit(linear_state(), resume=resume)
        mgr.close()
        return state, seen

    # The eval loss falls at every evaluation, so with mode="max" the best stays the first one
    # (step 2) and ``wait`` counts every later evaluation: only counters restored from the
    # checkpoint reach the straight run's state (fresh ones would say best_step=6, wait=1).
    def stopper():
        return EarlyStopping(mode="max", patience=100)

    straight_stopper = stopper()
    straight, seen_straight = run(8, False, tmp_path / "a", straight_stopper)
    run(4, False, tmp_path / "b", stopper())
    resumed_stopper = stopper()
    resumed, seen_resumed = run(8, True, tmp_path / "b", resumed_stopper)
    assert len(seen_resumed) == 4
    assert all(torch.equal(a, b) for a, b in zip(seen_resumed, seen_straight[4:]))
    assert tree.equal(resumed.params, straight.params)
    assert straight_stopper.best_step == 2 and straight_stopper.wait == 3  # the premise above
    assert resumed_stopper.state_dict() == straight_stopper.state_dict()


def test_count_tokens_and_learning_rate_of():
    assert count_tokens({"input_ids": torch.zeros(2, 5, dtype=torch.long)}) == (10, 2)
    assert count_tokens({"x": torch.zeros(3, 4)}) == (3, 3)
    tx = optim.sgd(0.1)
    assert learning_rate_of(tx.init({"w": torch.zeros(1)})) is None

    from typing import NamedTuple

    class HP(NamedTuple):
        count: torch.Tensor
        hyperparams: dict
        inner_state: tuple

    lr = learning_rate_of((HP(torch.tensor(0), {"learning_rate": torch.tensor(0.25)}, ()),))
    assert lr is not None and float(lr) == 0.25


def test_lr_is_logged_when_the_optimizer_state_has_one():
    events = []

    class Collect(Callback):
        def on_step_end(self, trainer, event):
            events.append(event)

    torch.manual_seed(0)
    tx = optim.inject_hyperparams(optim.sgd)(learning_rate=lambda n: 0.1 / (n + 1))
    state = TrainState.create(model=torch.nn.Linear(3, 1), tx=tx)
    Trainer(make_train_step(mse_loss), linear_data, max_steps=3, callbacks=[Collect()]).fit(state)
    assert [round(e.metrics["lr"], 6) for e in events] == [0.1, 0.05, round(0.1 / 3, 6)]


def test_evaluator_weights_by_samples_without_num_tokens_and_refuses_generators():
    state = linear_state()
    step = make_eval_step(mse_loss)
    batches = [linear_data(1), {k: v[:2] for k, v in linear_data(2).items()}]
    metrics = Evaluator(step, batches).evaluate(state)
    x = torch.cat([b["x"] for b in batches])
    y = torch.cat([b["y"] for b in batches])
    direct = torch.mean((state.apply(state.params, x) - y) ** 2).item()
    assert metrics["loss"] == pytest.approx(direct, rel=1e-6)
    assert metrics["num_samples"] == 10
    with pytest.raises(TypeError, match="one-shot iterator"):
        Evaluator(step, (b for b in batches))
    with pytest.raises(ValueError, match="empty"):
        Evaluator(step, []).evaluate(state)


def test_logged_lr_follows_the_schedule_with_a_donated_fused_step():
    from craftfn import schedules

    schedule = schedules.warmup_cosine_decay(0.0, 0.1, 3, 10, 0.01)
    events = []

    class Collect(Callback):
        def on_step_end(self, trainer, event):
            events.append(event)

    torch.manual_seed(0)
    tx = optim.create_optimizer("adamw", learning_rate=schedule, weight_decay=0.1)
    state = TrainState.create(model=torch.nn.Linear(3, 1), tx=tx)
    Trainer(make_train_step(mse_loss, donate=True), linear_data, max_steps=8, callbacks=[Collect()]).fit(state)
    # Step s's event is read after step s + 1 updated the state in place: the value is still step s's.
    assert [e.metrics["lr"] for e in events] == pytest.approx([schedule(t) for t in range(8)], rel=1e-6, abs=1e-9)


def test_compile_time_of_a_compiled_step_is_reported_once():
    events = []

    class Collect(Callback):
        def on_log(self, trainer, event):
            events.append(event)

    torch._dynamo.reset()
    step = make_train_step(mse_loss, compile={"backend": "eager", "fullgraph": True})
    trainer = Trainer(step, linear_data, max_steps=3, callbacks=[Collect()])
    trainer.fit(linear_state())
    assert trainer.compile_seconds is not None and trainer.compile_seconds > 0
    reported = [e.metrics["compile_seconds"] for e in events if "compile_seconds" in e.metrics]
    assert reported == [pytest.approx(trainer.compile_seconds)]
    plain = Trainer(make_train_step(mse_loss), linear_data, max_steps=2)
    plain.fit(linear_state())
    assert plain.compile_seconds is None
