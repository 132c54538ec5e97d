"""craftfn.gin_config: the gin/optim and gin/schedules snippets parse and build working optimizers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gin
import pytest
import torch

from craftfn import gin_config, optim, schedules, testing, tree

GIN = Path(__file__).resolve().parent.parent / "gin"
OPTIMIZERS = sorted(p.name for p in (GIN / "optim").glob("*.gin"))
SCHEDULES = sorted(p.name for p in (GIN / "schedules").glob("*.gin"))
MAX_STEPS = 1000

# What each schedule snippet should build (kept in step with the files by this test): the
# warm-up is 5% of the run (50 of 1000 steps), wsd's cool-down 20% (200).
EXPECTED_SCHEDULES = {
    "warmup_cosine.gin": schedules.warmup_cosine_decay(0.0, 3e-4, warmup_steps=50, decay_steps=MAX_STEPS, end_value=3e-5),
    "wsd.gin": schedules.warmup_stable_decay(3e-4, total_steps=MAX_STEPS, warmup_steps=50, decay_steps=200, decay_shape="1-sqrt"),
    "constant.gin": schedules.constant(3e-4),
}


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


def named_params():
    torch.manual_seed(0)
    return {
        "h.0.attn.weight": torch.randn(8, 8),
        "h.0.attn.bias": torch.randn(8),
        "h.0.ln_1.weight": torch.ones(8),
        "h.0.mlp.weight": torch.randn(16, 8),
    }


def test_snippets_exist():
    assert {"adamw.gin", "sgd.gin", "lion.gin", "muon.gin"} <= set(OPTIMIZERS)
    assert {"warmup_cosine.gin", "wsd.gin", "constant.gin"} <= set(SCHEDULES)
    assert set(EXPECTED_SCHEDULES) == set(SCHEDULES)


@pytest.mark.parametrize("schedule_file", SCHEDULES)
@pytest.mark.parametrize("optimizer_file", OPTIMIZERS)
def test_every_optimizer_snippet_with_every_schedule_snippet_builds_and_steps(optimizer_file, schedule_file):
    gin.parse_config_files_and_bindings(
        [str(GIN / "optim" / optimizer_file), str(GIN / "schedules" / schedule_file)], [f"MAX_STEPS = {MAX_STEPS}"]
    )
    tx = gin.query_parameter("%OPTIMIZER").scoped_configurable_fn()
    assert isinstance(tx, optim.GradientTransformation)
    expected = EXPECTED_SCHEDULES[schedule_file]
    params = named_params()
    state = tx.init(params)
    grads = {k: torch.full_like(v, 0.1) for k, v in params.items()}
    p = params
    for t in (0, 1, 2):
        updates, state = tx.update(grads, state, p)
        p = optim.apply_updates(p, updates)
        assert optim.tree_get(state, "learning_rate").item() == pytest.approx(expected(t), rel=1e-6, abs=1e-12)
    assert all(torch.isfinite(v).all() for v in p.values())
    assert gin.query_parameter("create_optimizer.name") == optimizer_file.removesuffix(".gin")


def test_snippet_values_reach_the_optimizer():
    gin.parse_config_files_and_bindings([str(GIN / "optim" / "adamw.gin"), str(GIN / "schedules" / "constant.gin")], [])
    tx = gin_config.create_optimizer()
    params = named_params()
    zeros = {k: torch.zeros_like(v) for k, v in params.items()}
    updates, _ = tx.update(zeros, tx.init(params), params)
    # zero gradients: only weight decay (0.1 at lr 3e-4) moves the weights, not biases or norms
    torch.testing.assert_close(updates["h.0.attn.weight"], -3e-4 * 0.1 * params["h.0.attn.weight"])
    assert torch.count_nonzero(updates["h.0.attn.bias"]) == 0 and torch.count_nonzero(updates["h.0.ln_1.weight"]) == 0


def test_schedules_and_torch_style_names_from_gin():
    gin.parse_config(
        """
        LR = @schedules.create_scheduler()
        schedules.create_scheduler.name = 'cosine_annealing'
        schedules.create_scheduler.learning_rate = 0.1
        schedules.create_scheduler.T_max = 10
        optim.create_optimizer.name = 'AdamW'
        optim.create_optimizer.learning_rate = %LR
        schedules.sgdr.cosine_kwargs = [{'init_value': 0.0, 'peak_value': 1.0, 'warmup_steps': 2, 'decay_steps': 10}]
        """
    )
    tx = gin_config.create_optimizer()
    state = tx.init({"w": torch.ones(2)})
    assert optim.tree_get(state, "learning_rate").item() == pytest.approx(0.1)
    wrapped = gin_config.register()
    assert wrapped["sgdr"]()(2) == 1.0
    assert set(gin_config.SCHEDULE_NAMES) >= {"warmup_cosine_decay", "warmup_stable_decay", "inverse_sqrt", "sgdr"}
    assert set(optim.optimizer_names()) <= set(wrapped)


def test_registration_is_idempotent_and_aliases_are_configurable():
    first, second = gin_config.register(), gin_config.register()
    assert first["adamw"] is second["adamw"]
    gin.parse_config("optim.lion.b1 = 0.8")
    tx = first["lion"](learning_rate=0.1)
    assert isinstance(tx, optim.GradientTransformation)

    # The binding takes effect: the configured lion follows lion(b1=0.8), not the default b1=0.9.
    def trajectory(tx):
        params = named_params()
        state = tx.init(params)
        for seed in range(4):
            grads = testing.random_grads(params, seed=seed)
            updates, state = tx.update(grads, state, params)
            params = optim.apply_updates(params, updates)
        return params

    configured = trajectory(tx)
    assert not tree.allclose(trajectory(optim.lion(0.1, b1=0.8)), trajectory(optim.lion(0.1)))  # b1 matters here
    assert tree.equal(configured, trajectory(optim.lion(0.1, b1=0.8))), "the optim.lion.b1 binding had no effect"


def test_a_bad_name_in_a_gin_file_names_the_problem():
    gin.parse_config("create_optimizer.name = 'adamww'\ncreate_optimizer.learning_rate = 0.1")
    with pytest.raises(ValueError, match="unknown optimizer name 'adamww'; did you mean 'adamw'"):
        gin_config.create_optimizer()
    gin.clear_config()
    gin.parse_config("create_scheduler.name = 'cosine_anealing'")
    with pytest.raises(ValueError, match="did you mean 'cosine_annealing'"):
        gin_config.create_scheduler()


def test_the_math_modules_do_not_import_gin():
    code = "import sys, craftfn, craftfn.optim, craftfn.schedules; print('gin' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
