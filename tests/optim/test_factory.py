"""optim.create_optimizer: names, masked weight decay, clip/rule/accumulation order, the lr in the state."""

from __future__ import annotations

import warnings

import pytest
import torch
from compile_backends import CountingBackend

import craftfn
from craftfn import TrainState, make_train_step, optim, random, schedules
from craftfn.optim import factory as factory_module
from craftfn.optim.factory import create_optimizer, no_decay_mask, optimizer_names
from craftfn.schedules import create_scheduler


def regression_batch():
    """The README's synthetic regression (the foundation's MLP example)."""
    kx, kn = random.split(random.key(0))
    x = random.normal(kx, (256, 8))
    w_true = torch.linspace(-1.0, 1.0, 8).unsqueeze(1)
    return {"x": x, "y": x @ w_true + 0.01 * random.normal(kn, (256, 1))}


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 1))


def mse(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def test_adamw_with_warmup_cosine_trains_the_mlp_and_logs_the_schedule():
    lr = create_scheduler("warmup_cosine_decay", init_value=0.0, peak_value=2e-2, warmup_steps=10, decay_steps=150, end_value=1e-4)
    tx = create_optimizer("adamw", learning_rate=lr, weight_decay=0.1, clip_norm=1.0, no_decay=("bias", "norm"))
    state = TrainState.create(model=mlp(), tx=tx, seed=0)
    step = make_train_step(mse)
    batch = regression_batch()
    assert optim.tree_get(state.opt_state, "learning_rate").item() == lr(0)
    losses = []
    for i in range(150):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        # after update i the state holds the rate update i used: the schedule at i
        logged = optim.tree_get(state.opt_state, "learning_rate")
        assert logged.shape == () and logged.item() == pytest.approx(lr(i), rel=1e-6, abs=1e-12), f"step {i}"
    first, last = losses[0].item(), torch.stack(losses[-10:]).mean().item()
    assert last < 0.02 and last < first / 50, (first, last)
    # the trainer reads it the same way
    from craftfn.training import learning_rate_of

    assert learning_rate_of(state.opt_state).item() == pytest.approx(lr(149), rel=1e-6)


def named_params():
    torch.manual_seed(1)
    return {
        "fc.weight": torch.randn(4, 3),
        "fc.bias": torch.randn(4),
        "norm.weight": torch.randn(4),
        "blocks.0.ln_1.weight": torch.randn(4),
    }


@pytest.mark.parametrize("name", ["adamw", "lion", "nadamw", "sgd", "adam"])
def test_biases_and_norms_get_no_decay(name):
    params = named_params()
    tx = create_optimizer(name, learning_rate=0.1, weight_decay=0.5, no_decay=("bias", "norm", "*.ln_?.weight"))
    state = tx.init(params)
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    p = params
    for _ in range(3):
        updates, state = tx.update(zeros, state, p)
        p = optim.apply_updates(p, updates)
    for k in ("fc.bias", "norm.weight", "blocks.0.ln_1.weight"):
        assert torch.equal(p[k], params[k]), k
    # with zero gradients only the decay moves the weight: it shrinks
    assert p["fc.weight"].norm() < params["fc.weight"].norm() * 0.99
    if name in ("adamw", "nadamw"):
        # decoupled: p <- p (1 - lr wd) each step
        torch.testing.assert_close(p["fc.weight"], params["fc.weight"] * (1 - 0.1 * 0.5) ** 3)


def test_weight_decay_zero_overrides_the_alias_default():
    params = named_params()
    tx = create_optimizer("adamw", learning_rate=0.1)  # optim.adamw's own default is 1e-4
    updates, _ = tx.update({k: torch.zeros_like(v) for k, v in params.items()}, tx.init(params), params)
    assert all(torch.count_nonzero(u) == 0 for u in updates.values())


def test_no_decay_mask_patterns_and_callables():
    mask = no_decay_mask(("bias", "*.ln_?.weight"))
    assert [mask(n, None) for n in ("h.0.attn.weight", "h.0.attn.bias", "h.0.ln_1.weight", "ln_f.weight")] == [True, False, False, True]
    by_rank = no_decay_mask(lambda name, p: p.ndim < 2)
    assert by_rank("w", torch.ones(2, 2)) and not by_rank("b", torch.ones(2))
    with pytest.raises(TypeError, match="no_decay must hold non-empty name patterns"):
        no_decay_mask(("bias", 3))


def test_rules_without_a_mask_argument_decay_through_a_partition(monkeypatch):
    def toy(learning_rate, weight_decay=0.0):
        """A decoupled-decay rule with no mask argument."""
        return optim.chain(optim.add_decayed_weights(weight_decay), optim.scale_by_learning_rate(learning_rate))

    monkeypatch.setattr(factory_module, "_aliases", lambda: {"toy": toy})
    params = named_params()
    tx = create_optimizer("toy", learning_rate=0.1, weight_decay=0.5, no_decay=("bias", "norm"))
    updates, _ = tx.update({k: torch.zeros_like(v) for k, v in params.items()}, tx.init(params), params)
    torch.testing.assert_close(updates["fc.weight"], -0.05 * params["fc.weight"])
    assert torch.count_nonzero(updates["fc.bias"]) == 0 and torch.count_nonzero(updates["norm.weight"]) == 0


def test_clip_comes_first_and_accumulation_is_outermost():
    params = {"w": torch.zeros(3)}
    g1, g2 = {"w": torch.tensor([30.0, 0.0, 40.0])}, {"w": torch.tensor([10.0, 0.0, 0.0])}
    tx = create_optimizer("sgd", learning_rate=1.0, clip_norm=1.0, accum_steps=2)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    assert torch.count_nonzero(u1["w"]) == 0  # first micro-step: nothing applied
    u2, state = tx.update(g2, state, params)
    mean = (g1["w"] + g2["w"]) / 2  # [20, 0, 20]: the clip sees the accumulated mean
    torch.testing.assert_close(u2["w"], -mean / mean.norm())
    assert optim.tree_get(state, "learning_rate").item() == 1.0


def test_matches_torch_adamw_with_cosine_annealing():
    torch.manual_seed(0)
    w0 = torch.randn(5, 3)
    grads = [torch.randn(5, 3) for _ in range(40)]
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=15, eta_min=0.001)
    tx = create_optimizer("AdamW", learning_rate=create_scheduler("cosine_annealing", learning_rate=0.05, T_max=15, eta_min=0.001), weight_decay=0.1)
    params = {"w": w0.clone()}
    state = tx.init(params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in grads:
            ref.grad = g.clone()
            opt.step()
            sched.step()
            updates, state = tx.update({"w": g}, state, params)
            params = optim.apply_updates(params, updates)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-5, atol=1e-6)


def test_matches_torch_sgd_with_l2_weight_decay_and_step_lr():
    torch.manual_seed(0)
    w0 = torch.randn(4)
    ref = torch.nn.Parameter(w0.clone())
    opt = torch.optim.SGD([ref], lr=0.1, momentum=0.9, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    tx = create_optimizer("sgd", learning_rate=create_scheduler("step", learning_rate=0.1, step_size=5, gamma=0.5), weight_decay=0.01, momentum=0.9)
    params = {"w": w0.clone()}
    state = tx.init(params)
    for _ in range(20):
        g = torch.randn(4)
        ref.grad = g.clone()
        opt.step()
        sched.step()
        updates, state = tx.update({"w": g}, state, params)
        params = optim.apply_updates(params, updates)
    torch.testing.assert_close(params["w"], ref.detach(), rtol=1e-5, atol=1e-6)


def test_compiled_step_with_a_scheduled_factory_optimizer_compiles_once():
    torch._dynamo.reset()  # count this step's graphs only, not caches left by earlier tests
    lr = schedules.warmup_cosine_decay(0.0, 1e-2, warmup_steps=5, decay_steps=30)
    tx = create_optimizer("adamw", learning_rate=lr, weight_decay=0.1, clip_norm=1.0, no_decay=("bias",))
    state = TrainState.create(model=mlp(), tx=tx, seed=0)
    backend = CountingBackend("eager")
    step = make_train_step(mse, compile={"backend": backend})
    eager = make_train_step(mse)
    batch = regression_batch()
    eager_state = state
    for _ in range(20):
        state, _ = step(state, batch)
        eager_state, _ = eager(eager_state, batch)
    assert backend.graphs == 1
    assert craftfn.tree.allclose(state.params, eager_state.params, rtol=1e-4, atol=1e-6)
    assert optim.tree_get(state.opt_state, "learning_rate").item() == pytest.approx(lr(19), rel=1e-6)


# rprop's learning_rate is its initial step size, read once by init (0 at step 0 of this schedule):
# it starts the same ramp at 0.1 instead.
INITIAL_STEP_ONLY = {"rprop"}


@pytest.mark.parametrize("name", optimizer_names())
def test_every_alias_builds_with_a_schedule_clipping_and_masked_decay(name):
    params = named_params()
    lr = schedules.linear(0.0 if name not in INITIAL_STEP_ONLY else 0.1, 0.1, transition_steps=4)
    tx = optim.create_optimizer(name, learning_rate=lr, weight_decay=0.1, clip_norm=1.0, no_decay=("bias", "norm", "ln_"))
    state = tx.init(params)
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    p = params
    for i in range(3):
        updates, state = tx.update(grads, state, p)
        p = optim.apply_updates(p, updates)
        assert optim.tree_get(state, "learning_rate").item() == pytest.approx(lr(i))
    assert all(torch.isfinite(v).all() for v in p.values())
    assert not torch.equal(p["fc.weight"], params["fc.weight"])


def test_unknown_name_lists_the_names_and_suggests_the_closest():
    with pytest.raises(ValueError, match=r"unknown optimizer name 'adamwx'; did you mean 'adamw'\?.*Known names: .*sgd"):
        create_optimizer("adamwx", learning_rate=0.1)
    assert {"adamw", "sgd", "lion", "muon", "schedule_free_adamw"} <= set(optimizer_names())
    assert "schedule_free" not in optimizer_names()  # a wrapper of another rule, not an alias


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(name="sgd", learning_rate=0.1, momentom=0.9), TypeError, "unexpected argument 'momentom' \\(did you mean 'momentum'\\?\\)"),
        (dict(name="adamw", learning_rate=0.1, mask=lambda n, p: True), TypeError, "no_decay="),
        (dict(name="adamw", learning_rate=-0.1), ValueError, "learning_rate must be >= 0"),
        (dict(name="adamw", learning_rate=0.1, weight_decay=-1.0), ValueError, "weight_decay must be >= 0"),
        (dict(name="adamw", learning_rate=0.1, clip_norm=0.0), ValueError, "clip_norm must be > 0"),
        (dict(name="adamw", learning_rate=0.1, accum_steps=0), ValueError, "accum_steps must be an int >= 1"),
        (dict(name="adamw", learning_rate="0.1"), TypeError, "learning_rate must be a number or a schedule"),
        (dict(name="adamw", learning_rate=0.1, b1=1.5), ValueError, "b1"),
    ],
)
def test_bad_input_names_the_argument(kwargs, error, match):
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        create_optimizer(name, **kwargs)
