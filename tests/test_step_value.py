"""make_train_step passes the loss to the update as value=: Polyak- and Momo-type rules train through it."""

import pytest
import torch

from craftfn import TrainState, make_train_step, optim, tree, value_and_grad
from craftfn.optim import contrib


def loss_fn(state, params, batch, rng):
    return ((state.apply(params, batch["x"]) - batch["y"]) ** 2).mean()


def plain_loss(params, module, batch):
    return ((torch.func.functional_call(module, params, (batch["x"],)) - batch["y"]) ** 2).mean()


def make_state(tx):
    torch.manual_seed(0)
    return TrainState.create(model=torch.nn.Linear(4, 1), tx=tx, seed=0)


BATCHES = [{"x": torch.randn(8, 4, generator=torch.Generator().manual_seed(i)), "y": torch.ones(8, 1)} for i in range(3)]


@pytest.mark.parametrize("make_tx", [lambda: optim.polyak_sgd(max_learning_rate=0.5), lambda: contrib.momo(0.1)], ids=["polyak_sgd", "momo"])
@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("accum_steps", [1, 2])
def test_step_passes_the_loss_as_value_and_equals_the_optax_loop(make_tx, donate, accum_steps):
    tx = make_tx()
    state = make_state(tx)
    params, opt_state = tree.clone(state.params), tree.clone(state.opt_state)
    step = make_train_step(loss_fn, donate=donate, accum_steps=accum_steps)
    for batch in BATCHES:
        state, metrics = step(state, batch)
        # The optax loop: loss and grads of the whole batch, then update(..., value=loss).
        loss, grads = value_and_grad(plain_loss)(params, state.apply_fn, batch)
        updates, opt_state = tx.update(grads, opt_state, params, value=loss)
        params = optim.apply_updates(params, updates)
        torch.testing.assert_close(metrics["loss"], loss)
    for name in params:
        torch.testing.assert_close(state.params[name], params[name], rtol=1e-5, atol=1e-6)


def test_a_rule_that_needs_value_fails_without_it_so_the_test_above_bites():
    tx = optim.polyak_sgd()
    p = {"w": torch.ones(2)}
    with pytest.raises(Exception, match="value"):
        tx.update({"w": torch.ones(2)}, tx.init(p), p)
