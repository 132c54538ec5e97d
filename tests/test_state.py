import pytest
import torch

from craftfn import DonatedStateError, TrainState, optim, tree


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def test_create_from_module_names_params_like_named_parameters():
    model = _mlp()
    state = TrainState.create(model=model, tx=optim.sgd(0.1), seed=1)
    assert list(state.params) == [n for n, _ in model.named_parameters()]
    assert state.step.dtype == torch.int64 and state.step.dim() == 0 and int(state.step) == 0
    assert state.rng.shape == (2,)
    # copies by default: the module's storage is not the state's
    assert state.params["0.weight"].data_ptr() != model[0].weight.data_ptr()
    assert torch.equal(state.params["0.weight"], model[0].weight.detach())
    shared = TrainState.create(model=model, tx=None, copy=False)
    assert shared.params["0.weight"].data_ptr() == model[0].weight.data_ptr()


def test_round_trips_through_flatten_with_static_fields_outside_leaves():
    state = TrainState.create(model=_mlp(), tx=optim.sgd(0.1, momentum=0.9))
    leaves, treedef = tree.flatten(state)
    assert all(isinstance(x, torch.Tensor) for x in leaves)
    names = tree.paths(state)
    assert "step" in names and "rng" in names and "params.0.weight" in names
    assert not any(n.startswith(("apply_fn", "tx")) for n in names)
    back = tree.unflatten(treedef, leaves)
    assert isinstance(back, TrainState)
    assert back.apply_fn is state.apply_fn and back.tx is state.tx
    assert tree.equal(back, state)
    doubled = tree.map(lambda x: x * 2, state)
    assert isinstance(doubled, TrainState) and doubled.tx is state.tx


def test_apply_runs_functionally_and_matches_module():
    model = _mlp()
    state = TrainState.create(model=model, tx=None)
    x = torch.randn(5, 3)
    assert torch.allclose(state.apply(state.params, x), model(x))
    zero = tree.zeros_like(state.params)
    assert torch.count_nonzero(state.apply(zero, x)) == 0


def test_apply_with_function_and_params_tree():
    state = TrainState.create(apply_fn=lambda p, x: x @ p["w"] + p["b"], params={"w": torch.eye(2), "b": torch.ones(2)}, tx=optim.sgd(0.5))
    assert torch.equal(state.apply(state.params, torch.tensor([[1.0, 2.0]])), torch.tensor([[2.0, 3.0]]))
    new = state.apply_gradients({"w": torch.zeros(2, 2), "b": torch.ones(2)})
    assert torch.equal(new.params["b"], torch.full((2,), 0.5))
    assert torch.equal(state.params["b"], torch.ones(2))  # the old state is untouched
    assert int(new.step) == 1


def test_batchnorm_apply_mutable_returns_new_buffers_and_keeps_state():
    state = TrainState.create(model=torch.nn.BatchNorm1d(3), tx=None)
    before = tree.clone(state.buffers)
    out, new_buffers = state.apply(state.params, torch.randn(8, 3) + 5, mutable=True, training=True)
    assert tree.equal(state.buffers, before)
    assert int(new_buffers["num_batches_tracked"]) == 1
    assert new_buffers["running_mean"].mean() > 0.3


def test_apply_gradients_without_tx_and_with_mismatched_grads():
    state = TrainState.create(model=_mlp(), tx=None)
    with pytest.raises(ValueError, match="no tx"):
        state.apply_gradients(tree.zeros_like(state.params))
    state = state.replace(tx=optim.sgd(0.1), opt_state=optim.sgd(0.1).init(state.params))
    with pytest.raises(ValueError, match="grads must have the same tree structure"):
        state.apply_gradients({"0.weight": torch.zeros(4, 3)})


def test_donated_apply_gradients_matches_pure_and_consumes_the_state():
    tx = optim.sgd(0.1, momentum=0.9)
    a = TrainState.create(model=_mlp(), tx=tx)
    b = tree.clone(a)
    grads = tree.map(torch.ones_like, a.params)
    pure = a.apply_gradients(grads)
    donated = b.apply_gradients(grads, donate=True)
    assert tree.allclose(pure.params, donated.params) and tree.allclose(pure.opt_state, donated.opt_state)
    with pytest.raises(DonatedStateError, match="donated"):
        b.apply_gradients(grads)
    with pytest.raises(DonatedStateError):
        b.params["0.weight"]


def test_subclass_adds_fields_and_stays_a_pytree():
    class EmaState(TrainState):
        ema: dict = None

    model = _mlp()
    s = EmaState.create(model=model, tx=optim.sgd(0.1), ema={"w": torch.zeros(1)})
    assert "ema.w" in tree.paths(s)
    s2 = s.apply_gradients(tree.zeros_like(s.params))
    assert isinstance(s2, EmaState) and torch.equal(s2.ema["w"], torch.zeros(1))


def test_create_rejects_bad_arguments():
    with pytest.raises(TypeError, match="tx must be"):
        TrainState.create(model=_mlp(), tx="adam")
    with pytest.raises(ValueError, match="either model="):
        TrainState.create(model=_mlp(), params={}, apply_fn=lambda p: p, tx=None)
    with pytest.raises(ValueError, match="needs model="):
        TrainState.create(tx=None)
