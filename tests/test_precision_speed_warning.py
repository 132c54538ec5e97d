"""precision.warn_if_slow: bf16 on an x86 CPU without bf16 units warns once per Trainer run, names the fix."""

import warnings

import pytest
import torch

from craftfn import TrainState, make_train_step, optim, precision
from craftfn.training import Trainer


@pytest.fixture
def cpu_flags(monkeypatch):
    def use(flags):
        monkeypatch.setattr(precision, "_cpu_flags", lambda: None if flags is None else frozenset(flags))

    return use


@pytest.mark.parametrize(
    ("policy", "device", "flags", "warns"),
    [
        ("bf16", "cpu", {"avx2", "fma"}, True),
        ("bf16_pure", "cpu", {"avx2"}, True),
        ("bf16", "cpu", {"avx512f", "avx512_bf16"}, False),
        ("bf16", "cpu", {"amx_bf16"}, False),
        ("bf16", "cpu", None, False),  # flags unknown (not x86 Linux): no guess
        ("fp32", "cpu", {"avx2"}, False),
        ("fp16", "cpu", {"avx2"}, False),
        ("bf16", "meta", {"avx2"}, False),
    ],
)
def test_warns_only_for_bf16_compute_on_a_cpu_without_bf16_units(cpu_flags, policy, device, flags, warns):
    cpu_flags(flags)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert precision.warn_if_slow(policy, device) is warns
    slow = [w for w in seen if issubclass(w.category, precision.SlowPrecisionWarning)]
    assert len(slow) == int(warns)
    if warns:
        assert "policy='fp32'" in str(slow[0].message) and "bfloat16" in str(slow[0].message)


def test_trainer_warns_before_training_with_a_bf16_step_on_such_a_cpu(cpu_flags):
    cpu_flags({"avx2"})
    state = TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1), seed=0)
    step = make_train_step(lambda s, p, b, rng: (s.apply(p, b) ** 2).mean(), policy="bf16")
    trainer = Trainer(step, lambda i: torch.ones(2, 3), max_steps=1, log_every=1)
    with pytest.warns(precision.SlowPrecisionWarning, match="no bf16 units"):
        trainer.fit(state)
    trainer = Trainer(make_train_step(lambda s, p, b, rng: (s.apply(p, b) ** 2).mean()), lambda i: torch.ones(2, 3), max_steps=1, log_every=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", precision.SlowPrecisionWarning)
        trainer.fit(TrainState.create(model=torch.nn.Linear(3, 1), tx=optim.sgd(0.1), seed=0))
