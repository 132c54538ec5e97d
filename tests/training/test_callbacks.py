"""Callbacks: every=N, EarlyStopping, NanGuard, loggers, progress bar, samples."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from craftfn import TrainState, make_eval_step, make_train_step, optim, random, tree
from craftfn.models.gpt import GPT, GPTConfig
from craftfn.training import (
    Callback,
    CallbackList,
    ConsoleLogger,
    EarlyStopping,
    JSONLLogger,
    NanGuard,
    ProgressBar,
    SampleText,
    TensorBoardLogger,
    Trainer,
    generate_tokens,
)
from craftfn.training.trainer import Event


def mse_loss(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def linear_data(step):
    g = torch.Generator().manual_seed(1000 + int(step))
    x = torch.randn(8, 3, generator=g)
    return {"x": x, "y": x.sum(dim=1, keepdim=True)}


def linear_state():
    torch.manual_seed(0)
    return TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1))


class ScriptedEvaluator:
    """Returns a scripted sequence of eval losses."""

    def __init__(self, losses):
        self.losses = list(losses)
        self.calls = 0

    def evaluate(self, state):
        value = self.losses[min(self.calls, len(self.losses) - 1)]
        self.calls += 1
        return {"loss": value}


class Steps(Callback):
    def __init__(self, every=1):
        super().__init__(every)
        self.begin, self.end, self.logged, self.evals = [], [], [], []

    def on_step_begin(self, trainer, step):
        self.begin.append(step)

    def on_step_end(self, trainer, event):
        self.end.append(event.step)

    def on_log(self, trainer, event):
        self.logged.append((event.kind, event.step))

    def on_eval_end(self, trainer, event):
        self.evals.append(event.step)


def test_every_n_gates_per_step_hooks_only():
    every3, every0, every1 = Steps(3), Steps(0), Steps()
    Trainer(
        make_train_step(mse_loss), linear_data, evaluator=ScriptedEvaluator([1.0]), max_steps=10, eval_every=5,
        callbacks=[every3, every0, every1],
    ).fit(linear_state())
    assert every3.begin == every3.end == [3, 6, 9]
    assert every3.evals == every0.evals == every1.evals == [5, 10]
    assert [s for k, s in every3.logged if k == "train"] == [3, 6, 9]
    assert [s for k, s in every3.logged if k == "eval"] == [5, 10]
    assert every0.begin == every0.end == []
    assert every1.end == list(range(1, 11))
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        Steps(-1)


def test_callbacks_run_in_list_order():
    calls = []

    class Named(Callback):
        def __init__(self, name):
            super().__init__()
            self._name = name

        def on_step_end(self, trainer, event):
            calls.append((event.step, self._name))

    Trainer(make_train_step(mse_loss), linear_data, max_steps=2, callbacks=[Named("a"), Named("b"), Named("c")]).fit(linear_state())
    assert calls == [(1, "a"), (1, "b"), (1, "c"), (2, "a"), (2, "b"), (2, "c")]


def test_early_stopping_stops_after_patience_and_names_the_metric():
    # Eval losses: improve, improve, then three non-improvements (patience 2 -> stop at the 3rd).
    evaluator = ScriptedEvaluator([1.0, 0.5, 0.6, 0.5, 0.55, 0.1])
    stopper = EarlyStopping(monitor="eval/loss", mode="min", patience=2)
    trainer = Trainer(make_train_step(mse_loss), linear_data, evaluator=evaluator, max_steps=100, eval_every=2, callbacks=[stopper])
    state = trainer.fit(linear_state())
    assert evaluator.calls == 5
    assert int(state.step) == 10
    assert stopper.best == 0.5 and stopper.best_step == 4 and stopper.wait == 3
    assert "EarlyStopping" in trainer.stop_reason and "eval/loss" in trainer.stop_reason


def test_early_stopping_min_delta_mode_max_and_state_dict():
    stopper = EarlyStopping(monitor="eval/acc", mode="max", patience=0, min_delta=0.1)
    trainer = Trainer(make_train_step(mse_loss), linear_data, max_steps=1)
    stopper.on_eval_end(trainer, Event("eval", 1, metrics={"acc": 0.5}))
    stopper.on_eval_end(trainer, Event("eval", 2, metrics={"acc": 0.55}))  # within min_delta: no improvement
    assert trainer.stop_reason is not None and stopper.best == 0.5
    restored = EarlyStopping(monitor="eval/acc", mode="max", patience=0, min_delta=0.1)
    restored.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    assert restored.state_dict() == stopper.state_dict() == {"best": 0.5, "best_step": 1, "wait": 1}
    with pytest.raises(KeyError, match="not among the eval metrics"):
        EarlyStopping(monitor="eval/missing").on_eval_end(trainer, Event("eval", 1, metrics={"loss": 1.0}))
    with pytest.raises(ValueError, match="monitor must look like"):
        EarlyStopping(monitor="loss")
    with pytest.raises(ValueError, match="mode must be"):
        EarlyStopping(mode="lowest")


def nan_at(bad_index):
    def data(step):
        batch = linear_data(step)
        if step == bad_index:
            batch["x"] = batch["x"].clone()
            batch["x"][0, 0] = float("nan")
        return batch

    return data


def test_nan_guard_stops_with_a_clear_message():
    trainer = Trainer(make_train_step(mse_loss), nan_at(4), max_steps=50, callbacks=[NanGuard()])
    state = trainer.fit(linear_state())
    # Step 5 trains on index 4; its metrics are read after step 6 was dispatched.
    assert int(state.step) == 6
    assert "step 5" in trainer.stop_reason and "nan" in trainer.stop_reason
    assert "last finite loss" in trainer.stop_reason and "step 4" in trainer.stop_reason


def test_nan_guard_skip_keeps_the_previous_parameters_and_continues():
    guard = NanGuard(action="skip")
    seen = {}

    class Snap(Callback):
        def on_step_begin(self, trainer, step):
            seen[step] = tree.clone(trainer.state.params)

    with pytest.warns(UserWarning, match="skipped step 5"):
        trainer = Trainer(make_train_step(mse_loss), nan_at(4), max_steps=8, callbacks=[guard, Snap()])
        state = trainer.fit(linear_state())
    assert int(state.step) == 8 and trainer.stop_reason is None
    assert guard.skipped == 1
    assert tree.equal(seen[6], seen[5])  # step 5 was skipped: params unchanged
    assert not tree.equal(seen[7], seen[6])
    assert all(torch.isfinite(p).all() for p in tree.leaves(state.params))


def test_nan_guard_skip_stops_after_too_many_and_refuses_donation():
    trainer = Trainer(make_train_step(mse_loss), lambda s: nan_at(s)(s), max_steps=50, callbacks=[NanGuard("skip", max_consecutive_skips=3)])
    with pytest.warns(UserWarning):
        trainer.fit(linear_state())
    assert "3 steps in a row" in trainer.stop_reason
    with pytest.raises(ValueError, match="donated step"):
        Trainer(make_train_step(mse_loss, donate=True), linear_data, max_steps=2, callbacks=[NanGuard("skip")])


def test_callback_list_state_dicts_use_unique_keys():
    a, b = EarlyStopping(), EarlyStopping()
    a.wait, b.wait = 1, 2
    cbs = CallbackList([a, ConsoleLogger(), b])
    states = cbs.state_dicts()
    assert set(states) == {"EarlyStopping", "EarlyStopping#2"}
    a.wait = b.wait = 0
    cbs.load_state_dicts(states)
    assert (a.wait, b.wait) == (1, 2)
    with pytest.raises(TypeError, match="callbacks\\[0\\]"):
        CallbackList([object()])


def test_console_jsonl_and_tensorboard_loggers(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = io.StringIO()
    trainer = Trainer(
        make_train_step(mse_loss), linear_data, eval_step=make_eval_step(mse_loss), eval_data=[linear_data(9)],
        max_steps=6, eval_every=3, flops_per_token=100.0, peak_flops=1e6,
        callbacks=[ConsoleLogger(every=3, stream=out), JSONLLogger(tmp_path / "m.jsonl"), TensorBoardLogger(tmp_path, config_text="a = 1")],
    )
    trainer.fit(linear_state())
    lines = out.getvalue().splitlines()
    assert [ln.split(" |")[0] for ln in lines] == ["step 3/6", "step 3/6", "step 6/6", "step 6/6"]
    assert "eval" in lines[1] and "perplexity" in lines[1]
    records = [json.loads(ln) for ln in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [3, 6]
    assert records[-1]["loss"] == pytest.approx(trainer.last_eval["loss"])
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "grad_norm", "throughput/tokens_per_sec", "mfu"} <= tags
    assert [e.step for e in acc.Scalars("eval/loss")] == [3, 6]
    assert "config/text_summary" in acc.Tags()["tensors"]


def test_progress_bar_plain_lines_without_a_terminal_and_tqdm_with_one():
    plain = io.StringIO()
    Trainer(make_train_step(mse_loss), linear_data, max_steps=5, callbacks=[ProgressBar(interval_s=0, stream=plain)]).fit(linear_state())
    lines = plain.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1].startswith("[100.0%] step 5/5") and "eta" in lines[-1]
    bar = io.StringIO()
    Trainer(make_train_step(mse_loss), linear_data, max_steps=5, callbacks=[ProgressBar(stream=bar, use_tqdm=True)]).fit(linear_state())
    assert "5/5" in bar.getvalue() and "\r" in bar.getvalue()


def test_progress_bar_shows_the_warmup_free_eta_not_tqdms_own():
    bar = io.StringIO()
    trainer = Trainer(make_train_step(mse_loss), linear_data, max_steps=6, callbacks=[ProgressBar(stream=bar, use_tqdm=True)])
    trainer.fit(linear_state())
    last = bar.getvalue().rstrip().split("\r")[-1]
    # tqdm's own "<remaining" counts the warm-up steps; the tracker's ETA (0 left at the end) replaces it.
    assert "eta=0:00" in last and "<" not in last, last


def tiny_lm():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=5, block_size=4, n_layer=1, n_head=1, n_embd=8))
    return TrainState.create(model=model, tx=optim.sgd(0.1))


def test_generate_tokens_greedy_and_seeded_sampling():
    state = tiny_lm()
    prompt = torch.tensor([[1, 2]])
    greedy = generate_tokens(state, prompt, 6, temperature=0, block_size=4)
    assert greedy.shape == (1, 8) and torch.equal(greedy[:, :2], prompt)
    # Greedy: each token is the argmax of the model on the (cropped) context.
    ctx = greedy[:, :5][:, -4:]
    assert int(greedy[0, 5]) == int(state.apply(state.params, ctx, training=False)[0, -1].argmax())
    a = generate_tokens(state, prompt, 6, temperature=1.0, block_size=4, key=random.key(1))
    b = generate_tokens(state, prompt, 6, temperature=1.0, block_size=4, key=random.key(1))
    assert torch.equal(a, b)
    # Sampling draws from softmax(logits / temperature): over many rows, each token's frequency
    # matches its probability (all five are ~0.2 here; a greedy sampler puts every row on one).
    rows = 2000
    sampled = generate_tokens(state, prompt.repeat(rows, 1), 1, temperature=1.0, block_size=4, key=random.key(2))[:, -1]
    probs = torch.softmax(state.apply(state.params, prompt, training=False)[0, -1].float(), dim=-1)
    freq = torch.bincount(sampled, minlength=probs.numel()).float() / rows
    assert torch.allclose(freq, probs, atol=0.05), (freq, probs)  # 0.05: ~5 standard deviations


def test_sample_text_emits_text_events_every_n_steps_and_at_the_end():
    state = tiny_lm()
    texts, echoed = [], []

    class Collect(Callback):
        def on_log(self, trainer, event):
            if event.kind == "text":
                texts.append((event.step, event.text["samples"]))

    def lm_loss(s, params, batch, rng):
        logits = s.apply(params, batch["x"])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["x"].flatten())

    sampler = SampleText(lambda s: [int(c) for c in s], lambda ids: "".join(map(str, ids)), prompt="12", max_new_tokens=3, block_size=4, every=2, echo=echoed.append)
    Trainer(make_train_step(lm_loss), lambda s: {"x": torch.tensor([[1, 2, 3, 4]])}, max_steps=5, callbacks=[sampler, Collect()]).fit(state)
    # Step t's event is read once step t + 1 ran: samples come from that newer state, and the
    # end-of-training sample is not repeated when the last one already used the final state.
    assert [s for s, _ in texts] == [3, 5]
    assert all(t.startswith("12") and len(t) == 5 for _, t in texts)
    assert len(echoed) == 2
    assert sampler.samples[-1][1] == texts[-1][1]


def test_jsonl_writes_non_finite_values_as_strings(tmp_path):
    logger = JSONLLogger(tmp_path / "m.jsonl")
    trainer = Trainer(make_train_step(mse_loss), linear_data, max_steps=1)
    logger.on_train_begin(trainer, None)
    logger.on_log(trainer, Event("train", 1, metrics={"loss": math.nan}))
    logger.on_train_end(trainer, None)
    assert json.loads((tmp_path / "m.jsonl").read_text())["loss"] == "nan"
