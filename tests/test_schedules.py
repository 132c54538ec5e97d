"""craftfn.schedules: closed forms, continuity, laws (hypothesis), torch parity, compile-once."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from compile_backends import CountingBackend
from hypothesis import given, settings
from hypothesis import strategies as st

import craftfn
from craftfn import optim, schedules
from craftfn.schedules import create_scheduler

LR_SCHED = torch.optim.lr_scheduler


def values(schedule, steps):
    return [schedule(t) for t in steps]


# --------------------------------------------------------------------------- closed forms


def cos_factor(t, n):
    return 0.5 * (1 + math.cos(math.pi * min(t, n) / n))


CLOSED_FORMS = [
    (schedules.constant(0.3), lambda t: 0.3),
    (schedules.linear(1.0, 0.1, transition_steps=20, transition_begin=5), lambda t: 1.0 + (0.1 - 1.0) * min(max(t - 5, 0), 20) / 20),
    (schedules.polynomial(2.0, 0.5, power=3.0, transition_steps=40), lambda t: (2.0 - 0.5) * (1 - min(t, 40) / 40) ** 3 + 0.5),
    (schedules.exponential_decay(1.0, 10, 0.5), lambda t: 0.5 ** (t / 10)),
    (schedules.exponential_decay(1.0, 10, 0.5, transition_begin=5, staircase=True, end_value=0.1), lambda t: max(0.5 ** ((max(t - 5, 0)) // 10), 0.1)),
    (schedules.exponential_decay(1.0, 10, 2.0, end_value=3.0), lambda t: min(2.0 ** (t / 10), 3.0)),
    (schedules.cosine_decay(2.0, 50, alpha=0.1), lambda t: 2.0 * ((1 - 0.1) * cos_factor(t, 50) + 0.1)),
    (schedules.cosine_decay(2.0, 50, exponent=2.0, end_value=0.5), lambda t: 0.5 + 1.5 * cos_factor(t, 50) ** 2),
    (
        schedules.warmup_cosine_decay(0.1, 1.0, warmup_steps=10, decay_steps=60, end_value=0.05),
        lambda t: 0.1 + 0.9 * t / 10 if t < 10 else 0.05 + 0.95 * cos_factor(t - 10, 50),
    ),
    (
        schedules.warmup_exponential_decay(0.0, 1.0, 8, transition_steps=4, decay_rate=0.5),
        lambda t: t / 8 if t < 8 else 0.5 ** ((t - 8) / 4),
    ),
    (schedules.warmup_constant(0.0, 2.0, 10), lambda t: 2.0 * min(t, 10) / 10),
    (schedules.piecewise_constant(1.0, {30: 0.1, 10: 0.5}), lambda t: 1.0 * (0.5 if t >= 10 else 1) * (0.1 if t >= 30 else 1)),
    (
        schedules.piecewise_interpolate("linear", 1.0, {10: 0.5, 30: 0.1}),
        lambda t: 1.0 - 0.5 * t / 10 if t < 10 else (0.5 - 0.45 * (t - 10) / 20 if t < 30 else 0.05),
    ),
    (
        schedules.piecewise_interpolate("cosine", 1.0, {20: 0.1}),
        lambda t: 0.1 + 0.45 * (1 + math.cos(math.pi * t / 20)) if t < 20 else 0.1,
    ),
    (
        schedules.warmup_stable_decay(1.0, total_steps=100, warmup_steps=10, decay_steps=40, init_value=0.2, end_value=0.1, decay_shape="1-sqrt"),
        lambda t: 0.2 + 0.8 * t / 10 if t < 10 else (1.0 if t < 60 else 0.1 + 0.9 * (1 - math.sqrt(min((t - 60) / 40, 1)))),
    ),
    (
        schedules.warmup_stable_decay(1.0, total_steps=100, warmup_steps=10, decay_steps=40, decay_shape="cosine"),
        lambda t: t / 10 if t < 10 else (1.0 if t < 60 else cos_factor(t - 60, 40)),
    ),
    (schedules.inverse_sqrt(1.0, warmup_steps=16), lambda t: t / 16 if t < 16 else math.sqrt(16 / t)),
    (schedules.inverse_sqrt(1.0, warmup_steps=0, timescale=4), lambda t: math.sqrt(4 / (t + 4))),
    (
        schedules.linear_onecycle(100, 1.0),
        lambda t: 0.04 + 0.96 * t / 30 if t < 30 else (1.0 - 0.96 * (t - 30) / 55 if t < 85 else (0.04 - (0.04 - 4e-6) * (t - 85) / 15 if t < 100 else 4e-6)),
    ),
    (
        schedules.cosine_onecycle(100, 1.0, pct_start=0.25),
        lambda t: 1.0 + (0.04 - 1.0) / 2 * (1 + math.cos(math.pi * t / 25)) if t < 25 else (4e-6 + (1.0 - 4e-6) / 2 * (1 + math.cos(math.pi * (t - 25) / 75)) if t < 100 else 4e-6),
    ),
]


@pytest.mark.parametrize("index", range(len(CLOSED_FORMS)))
def test_values_equal_closed_forms(index):
    schedule, formula = CLOSED_FORMS[index]
    steps = [0, 1, 5, 9, 10, 11, 24, 25, 29, 30, 31, 45, 59, 60, 61, 84, 85, 99, 100, 101, 250]
    for t in steps:
        got = schedule(t)
        assert isinstance(got, float)
        assert got == pytest.approx(formula(t), rel=1e-12, abs=1e-15), f"step {t}"
    # the tensor path: a 0-d count gives a 0-d tensor, a vector of steps gives a vector
    t0 = schedule(torch.tensor(17))
    assert isinstance(t0, torch.Tensor) and t0.shape == () and t0.dtype == torch.get_default_dtype()
    assert t0.item() == pytest.approx(formula(17), rel=1e-6, abs=1e-7)
    vec = schedule(torch.tensor(steps))
    torch.testing.assert_close(vec.double(), torch.tensor([formula(t) for t in steps], dtype=torch.float64), rtol=1e-6, atol=1e-7)


def test_known_values_from_optax_docs():
    s = schedules.piecewise_interpolate("linear", 1.0, {4: 0.1, 8: 0.01})
    assert values(s, [0, 2, 4, 6, 8, 10]) == pytest.approx([1.0, 0.55, 0.1, 0.0505, 0.001, 0.001])
    p = schedules.polynomial(1.0, 0.01, power=2, transition_steps=100, transition_begin=5)
    assert values(p, [0, 5, 6, 104, 105, 110]) == pytest.approx([1.0, 1.0, 0.9803, 0.0101, 0.01, 0.01], abs=1e-4)


def test_join_restarts_each_piece_at_zero():
    s = schedules.join([schedules.constant(5.0), schedules.linear(1.0, 0.0, 10), schedules.constant(7.0)], [3, 13])
    assert values(s, [0, 2, 3, 8, 12, 13, 99]) == pytest.approx([5.0, 5.0, 1.0, 0.5, 0.1, 7.0, 7.0])
    torch.testing.assert_close(s(torch.arange(15)), torch.tensor([s(t) for t in range(15)]))


def test_sgdr_cycles_restart():
    cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=20, end_value=0.1)
    s = schedules.sgdr([cycle, dict(cycle, peak_value=0.5)])
    one = schedules.warmup_cosine_decay(**cycle)
    assert values(s, range(20)) == pytest.approx(values(one, range(20)))
    assert s(25) == pytest.approx(0.5) and s(20) == pytest.approx(0.0) and s(40) == pytest.approx(0.1)


# --------------------------------------------------------------------------- continuity


def max_jump(schedule, n):
    v = values(schedule, range(n))
    return max(abs(b - a) for a, b in zip(v, v[1:]))


@pytest.mark.parametrize(
    "schedule, n, bound",
    [
        # bound = the largest slope of any piece: a join with a jump would exceed it
        (schedules.warmup_cosine_decay(0.0, 1.0, 20, 220), 300, max(1 / 20, math.pi / 2 / 200)),
        (schedules.warmup_exponential_decay(0.0, 1.0, 20, 10, 0.8), 300, max(1 / 20, 1 - 0.8 ** 0.1)),
        (schedules.warmup_constant(0.5, 1.0, 10), 50, 0.05),
        (schedules.warmup_stable_decay(1.0, 200, 20, 50, decay_shape="linear"), 250, max(1 / 20, 1 / 50)),
        (schedules.warmup_stable_decay(1.0, 200, 20, 50, decay_shape="cosine"), 250, max(1 / 20, math.pi / 2 / 50)),
        (schedules.inverse_sqrt(1.0, 25), 300, 1 / 25),
        (schedules.piecewise_interpolate("cosine", 1.0, {20: 0.1, 50: 0.5}), 100, 0.9 * math.pi / 2 / 20),
        (schedules.cosine_onecycle(200, 1.0), 250, 0.96 * math.pi / 2 / 60),
    ],
)
def test_warmups_and_joins_are_continuous(schedule, n, bound):
    assert max_jump(schedule, n) <= bound * (1 + 1e-9)


def test_warmup_reaches_peak_exactly_at_its_end():
    for s in (schedules.warmup_cosine_decay(0.0, 1.0, 10, 50), schedules.warmup_constant(0.0, 1.0, 10),
              schedules.warmup_stable_decay(1.0, 50, 10, 10), schedules.inverse_sqrt(1.0, 10),
              schedules.warmup_exponential_decay(0.0, 1.0, 10, 5, 0.5)):
        assert s(10) == 1.0 and s(9) == pytest.approx(0.9)


def test_decays_end_exactly_at_their_floor():
    assert schedules.warmup_cosine_decay(0.0, 1.0, 10, 50, end_value=0.01)(50) == pytest.approx(0.01, rel=1e-12)
    for shape in schedules.DECAY_SHAPES:
        s = schedules.warmup_stable_decay(1.0, 50, 10, 10, end_value=0.01, decay_shape=shape)
        assert s(50) == pytest.approx(0.01, rel=1e-12) and s(1000) == pytest.approx(0.01, rel=1e-12)


# --------------------------------------------------------------------------- laws (hypothesis)

values_st = st.floats(0.0, 10.0, allow_nan=False)


@st.composite
def warmup_decay_schedules(draw):
    """A warm-up-then-decay schedule with its (init, peak, floor, warmup end, decay end)."""
    init, peak = draw(values_st), draw(values_st)
    init, peak = min(init, peak), max(init, peak)
    end = draw(st.floats(0.0, 1.0)) * init if init > 0 else 0.0
    warmup = draw(st.integers(0, 50))
    kind = draw(st.sampled_from(["cosine", "wsd", "inverse_sqrt", "exponential"]))
    if kind == "cosine":
        total = warmup + draw(st.integers(1, 200))
        s = schedules.warmup_cosine_decay(init, peak, warmup, total, end_value=end, exponent=draw(st.floats(0.5, 3.0)))
    elif kind == "wsd":
        decay = draw(st.integers(0, 100))
        total = warmup + decay + draw(st.integers(0, 100))
        s = schedules.warmup_stable_decay(peak, total, warmup, decay, init_value=init, end_value=end, decay_shape=draw(st.sampled_from(schedules.DECAY_SHAPES)))
    elif kind == "inverse_sqrt":
        s, end, total = schedules.inverse_sqrt(peak, warmup, init_value=init), 0.0, None
    else:
        s = schedules.warmup_exponential_decay(init, peak, warmup, draw(st.integers(1, 50)), draw(st.floats(0.01, 0.99)), end_value=end)
        total = None
    return s, init, peak, end, warmup, total


@settings(max_examples=25, deadline=None)
@given(warmup_decay_schedules())
def test_warmup_rises_then_decays_and_stays_within_bounds(case):
    s, init, peak, end, warmup, total = case
    horizon = (total or 300) + 20
    v = values(s, range(horizon))
    tol = 1e-12 * max(peak, 1.0)
    assert all(end - tol <= x <= peak + tol for x in v[warmup:]), "decay leaves [floor, peak]"
    assert all(init - tol <= x <= peak + tol for x in v[:warmup]), "warm-up leaves [init, peak]"
    assert all(b >= a - tol for a, b in zip(v[:warmup], v[1 : warmup + 1])), "warm-up not monotone"
    assert all(b <= a + tol for a, b in zip(v[warmup:], v[warmup + 1 :])), "decay not monotone"


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(0, 500), st.floats(0.0, 0.5), st.floats(0.6, 2.0))
def test_warm_restarts_are_periodic(t0, t, eta_min, lr):
    s = create_scheduler("cosine_warm_restarts", learning_rate=lr, T_0=t0, eta_min=eta_min)
    assert s(t) == pytest.approx(s(t + t0), rel=1e-12)
    assert s(t0 * (t // t0)) == pytest.approx(lr)  # every cycle restarts at the peak
    assert eta_min - 1e-12 <= s(t) <= lr + 1e-12
    cycle = dict(init_value=0.1 * lr, peak_value=lr, warmup_steps=t0 // 2, decay_steps=t0, end_value=eta_min)
    sg = schedules.sgdr([cycle] * (t // t0 + 2))
    assert sg(t) == pytest.approx(sg(t + t0), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 30), st.sampled_from([2, 3]), st.integers(0, 2000))
def test_warm_restarts_with_growing_cycles_restart_at_the_right_steps(t0, mult, t):
    s = create_scheduler("cosine_warm_restarts", learning_rate=1.0, T_0=t0, T_mult=mult)
    starts = [t0 * (mult**n - 1) // (mult - 1) for n in range(12)]
    assert all(s(b) == 1.0 for b in starts if b < 10**6)
    n = max(i for i, b in enumerate(starts) if b <= t)
    assert s(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - starts[n]) / (t0 * mult**n))), rel=1e-12, abs=1e-15)


ALL = {
    "constant": schedules.constant(0.5),
    "linear": schedules.linear(0.0, 1.0, 37, 5),
    "polynomial": schedules.polynomial(1.0, 0.0, 0.5, 100),
    "exponential_decay": schedules.exponential_decay(1.0, 7, 0.9, staircase=True),
    "cosine_decay": schedules.cosine_decay(1.0, 90, alpha=0.1),
    "warmup_cosine_decay": schedules.warmup_cosine_decay(0.0, 1.0, 13, 140),
    "warmup_exponential_decay": schedules.warmup_exponential_decay(0.0, 1.0, 13, 20, 0.5, end_value=0.1),
    "warmup_constant": schedules.warmup_constant(0.0, 1.0, 13),
    "piecewise_constant": schedules.piecewise_constant(1.0, {20: 0.5, 60: 0.1}),
    "piecewise_interpolate": schedules.piecewise_interpolate("cosine", 1.0, {20: 0.5, 60: 0.1}),
    "sgdr": schedules.sgdr([dict(init_value=0.0, peak_value=1.0, warmup_steps=3, decay_steps=30)] * 5),
    "linear_onecycle": schedules.linear_onecycle(120, 1.0),
    "cosine_onecycle": schedules.cosine_onecycle(120, 1.0),
    "wsd": schedules.warmup_stable_decay(1.0, 150, 10, 40, decay_shape="1-sqrt"),
    "inverse_sqrt": schedules.inverse_sqrt(1.0, 10),
    "cosine_annealing": create_scheduler("cosine_annealing", learning_rate=1.0, T_max=40, eta_min=0.01),
    "step": create_scheduler("step", learning_rate=1.0, step_size=11),
    "multistep": create_scheduler("multistep", learning_rate=1.0, milestones=[10, 30]),
    "exponential": create_scheduler("exponential", learning_rate=1.0, gamma=0.97),
    "linear_lr": create_scheduler("linear", learning_rate=1.0, start_factor=0.1, total_iters=20),
    "onecycle": create_scheduler("onecycle", learning_rate=1.0, total_steps=100),
    "cosine_warm_restarts": create_scheduler("cosine_warm_restarts", learning_rate=1.0, T_0=5, T_mult=2),
}


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(sorted(ALL)), st.integers(0, 300))
def test_int_and_tensor_steps_give_the_same_value(name, t):
    s = ALL[name]
    as_float = s(t)
    assert isinstance(as_float, float)
    for count in (torch.tensor(t), torch.tensor(t, dtype=torch.int32), torch.tensor(float(t))):
        out = s(count)
        assert isinstance(out, torch.Tensor) and out.shape == ()
        assert out.item() == pytest.approx(as_float, rel=1e-6, abs=1e-12)


# --------------------------------------------------------------------------- torch parity


def torch_lrs(make_scheduler, steps=1000, lr=0.1):
    """The lr torch's optimizer uses at each of its ``steps`` steps, the scheduler stepped after each."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=lr, momentum=0.9)
    sched = make_scheduler(opt)
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
    return torch.tensor(out, dtype=torch.float64)


TORCH_CASES = [
    ("cosine_annealing", dict(T_max=100, eta_min=1e-3), lambda o: LR_SCHED.CosineAnnealingLR(o, T_max=100, eta_min=1e-3)),
    ("cosine_annealing", dict(T_max=7), lambda o: LR_SCHED.CosineAnnealingLR(o, T_max=7)),  # 70 periods past T_max
    ("cosine_annealing", dict(T_max=1000), lambda o: LR_SCHED.CosineAnnealingLR(o, T_max=1000)),
    ("step", dict(step_size=30, gamma=0.9), lambda o: LR_SCHED.StepLR(o, 30, 0.9)),
    ("multistep", dict(milestones=[100, 300, 300, 700], gamma=0.5), lambda o: LR_SCHED.MultiStepLR(o, [100, 300, 300, 700], 0.5)),
    ("exponential", dict(gamma=0.995), lambda o: LR_SCHED.ExponentialLR(o, 0.995)),
    ("linear", dict(start_factor=0.1, end_factor=0.5, total_iters=300), lambda o: LR_SCHED.LinearLR(o, 0.1, 0.5, 300)),
    ("LinearLR", dict(), lambda o: LR_SCHED.LinearLR(o)),
    ("constant", dict(factor=0.5, total_iters=10), lambda o: LR_SCHED.ConstantLR(o, 0.5, 10)),
    ("polynomial", dict(total_iters=500, power=2.0), lambda o: LR_SCHED.PolynomialLR(o, 500, 2.0)),
    ("onecycle", dict(max_lr=1.0, total_steps=1000), lambda o: LR_SCHED.OneCycleLR(o, 1.0, total_steps=1000)),
    (
        "OneCycleLR",
        dict(max_lr=0.5, total_steps=1000, pct_start=0.25, anneal_strategy="linear", three_phase=True, div_factor=10.0, final_div_factor=100.0),
        lambda o: LR_SCHED.OneCycleLR(o, 0.5, total_steps=1000, pct_start=0.25, anneal_strategy="linear", three_phase=True, div_factor=10.0, final_div_factor=100.0),
    ),
    ("cosine_warm_restarts", dict(T_0=10, T_mult=2, eta_min=1e-4), lambda o: LR_SCHED.CosineAnnealingWarmRestarts(o, 10, 2, 1e-4)),
    ("cosine_warm_restarts", dict(T_0=7), lambda o: LR_SCHED.CosineAnnealingWarmRestarts(o, 7)),
    ("cosine_warm_restarts", dict(T_0=3, T_mult=3), lambda o: LR_SCHED.CosineAnnealingWarmRestarts(o, 3, 3)),
]


@pytest.mark.parametrize("name, hparams, make", TORCH_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(TORCH_CASES)])
def test_torch_named_schedules_equal_torch_over_1000_steps(name, hparams, make):
    reference = torch_lrs(make)
    s = create_scheduler(name, learning_rate=0.1, **hparams)
    ours = torch.tensor([s(t) for t in range(1000)], dtype=torch.float64)
    torch.testing.assert_close(ours, reference, rtol=1e-6, atol=0.0)
    # the tensor path, all 1000 steps at once (float32 out)
    torch.testing.assert_close(s(torch.arange(1000)).double(), reference, rtol=1e-6, atol=0.0)


def test_onecycle_holds_its_last_value_after_total_steps():
    s = create_scheduler("onecycle", learning_rate=1.0, total_steps=100)
    assert s(99) == pytest.approx(1.0 / 25 / 1e4) and s(500) == s(99)


# --------------------------------------------------------------------------- compile once


def test_compiled_train_step_driven_by_a_schedule_compiles_once_over_50_steps():
    torch._dynamo.reset()  # count this step's graphs only, not caches left by earlier tests
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    lr = schedules.warmup_cosine_decay(0.0, 0.1, warmup_steps=10, decay_steps=40)
    state = craftfn.TrainState.create(model=model, tx=optim.sgd(lr))

    def loss_fn(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    backend = CountingBackend("eager")
    step = craftfn.make_train_step(loss_fn, compile={"backend": backend, "fullgraph": True})
    batch = {"x": torch.randn(16, 4), "y": torch.randn(16, 1)}
    eager_state = state
    eager_step = craftfn.make_train_step(loss_fn)
    for i in range(50):
        before = state.params["2.bias"].clone()
        state, _ = step(state, batch)
        eager_state, _ = eager_step(eager_state, batch)
        if i == 0:  # the warm-up starts at lr 0: the first step must not move anything
            assert torch.equal(state.params["2.bias"], before)
    assert backend.graphs == 1, f"recompiled: {backend.graphs} graphs over 50 steps"
    assert craftfn.tree.allclose(state.params, eager_state.params, rtol=1e-5, atol=1e-6)


def test_every_schedule_traces_into_one_graph_without_recompiling():
    torch._dynamo.reset()  # count this step's graphs only, not caches left by earlier tests
    backend = CountingBackend("eager")
    names = sorted(ALL)

    def all_values(count):
        return torch.stack([ALL[n](count) for n in names])

    compiled = torch.compile(all_values, backend=backend, fullgraph=True)
    for t in range(50):
        count = torch.tensor(t)
        torch.testing.assert_close(compiled(count), all_values(count))
    assert backend.graphs == 1


# --------------------------------------------------------------------------- create_scheduler and bad input


def test_create_scheduler_names_and_spellings():
    a = create_scheduler("warmup_cosine_decay", init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=50)
    b = create_scheduler("warmup_cosine_decay_schedule", init_value=0.0, peak_value=1.0, warmup_steps=5, decay_steps=50)
    assert values(a, range(60)) == values(b, range(60))
    wsd = create_scheduler("wsd", peak_value=1.0, total_steps=10, warmup_steps=2, decay_steps=2)
    assert wsd(5) == 1.0
    # names shared by both families: learning_rate selects torch's meaning
    assert create_scheduler("linear", init_value=1.0, end_value=0.0, transition_steps=10)(5) == 0.5
    assert create_scheduler("linear", learning_rate=1.0, start_factor=0.5, total_iters=10)(5) == 0.75
    assert create_scheduler("constant", value=0.2)(100) == 0.2
    assert create_scheduler("CosineAnnealingLR", learning_rate=1.0, T_max=10)(10) == 0.0
    assert "cosine_annealing" in schedules.scheduler_names() and "warmup_stable_decay" in schedules.scheduler_names()


def test_unknown_name_lists_names_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown schedule name 'warmup_cosine'.*did you mean 'warmup_cosine_decay'.*Known names: .*cosine_annealing"):
        create_scheduler("warmup_cosine")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: schedules.warmup_cosine_decay(0.0, 1.0, warmup_steps=100, decay_steps=50), ValueError, "warmup_steps=100 must be smaller than decay_steps=50"),
        (lambda: schedules.warmup_stable_decay(1.0, total_steps=100, warmup_steps=60, decay_steps=50), ValueError, "warmup_steps \\+ decay_steps"),
        (lambda: schedules.warmup_stable_decay(1.0, 100, 10, 10, decay_shape="sqrt"), ValueError, "decay_shape must be one of .*did you mean '1-sqrt'"),
        (lambda: schedules.piecewise_interpolate("cubic", 1.0, {}), ValueError, "interpolate_type"),
        (lambda: schedules.linear(0.0, 1.0, transition_steps=-5), ValueError, "transition_steps must be >= 0"),
        (lambda: schedules.inverse_sqrt(1.0, warmup_steps=-1), ValueError, "warmup_steps must be >= 0"),
        (lambda: schedules.cosine_decay(1.0, decay_steps=0), ValueError, "decay_steps must be > 0"),
        (lambda: schedules.join([schedules.constant(1.0)] * 3, [20, 10]), ValueError, "boundaries must be in increasing order"),
        (lambda: schedules.join([schedules.constant(1.0)] * 3, [10]), ValueError, "len\\(boundaries\\)"),
        (lambda: schedules.piecewise_constant(1.0, {10: -0.5}), ValueError, "boundaries_and_scales\\[10\\] must be >= 0"),
        (lambda: create_scheduler("multistep", learning_rate=0.1, milestones=[30, 10]), ValueError, "milestones must be in increasing order"),
        (lambda: create_scheduler("cosine_annealing", learning_rate=0.1, T_max=0), ValueError, "T_max must be > 0"),
        (lambda: create_scheduler("onecycle", learning_rate=0.1, total_steps=100, anneal_strategy="cosine"), ValueError, "anneal_strategy"),
        (lambda: create_scheduler("onecycle", learning_rate=0.1, total_steps=2), ValueError, "phase 1 would be empty"),
        (lambda: create_scheduler("cosine_decay", init_value=1.0, decay_stpes=10), TypeError, "did you mean 'decay_steps'"),
        (lambda: create_scheduler("cosine_decay", learning_rate=1.0, decay_steps=10), TypeError, "init_value / peak_value"),
        (lambda: create_scheduler("step", learning_rate=0.1), TypeError, "missing required argument \\['step_size'\\]"),
        (lambda: schedules.exponential_decay(1.0, 10, decay_rate=0.0), ValueError, "decay_rate must be > 0"),
        (lambda: schedules.constant("0.1"), TypeError, "value must be a number"),
    ],
)
def test_bad_input_names_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_negative_int_step_is_an_error_and_negative_tensor_counts_as_zero():
    s = schedules.linear(0.0, 1.0, 10)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        s(-1)
    assert s(torch.tensor(-3)).item() == 0.0
    with pytest.raises(TypeError, match="step must be an int or a tensor"):
        s("3")
