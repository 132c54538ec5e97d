"""craftfn.jit: hand-written steps compile as one graph, donate in place, draw dropout from keys,
and match eager; static arguments specialise; donation misuse gets clear errors."""

from __future__ import annotations

import doctest

import pytest
import torch
from compile_backends import CountingBackend

import craftfn
from craftfn import DonatedStateError, TrainState, make_train_step, optim, random, tree, value_and_grad

# ----------------------------------------------------------------------------- the README's step


def dropout_mlp(seed: int = 0, p: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Dropout(p), torch.nn.Linear(32, 32), torch.nn.GELU(),
        torch.nn.Dropout(p), torch.nn.Linear(32, 1),
    )


def regression_batch(seed: int = 0, n: int = 32) -> dict[str, torch.Tensor]:
    kx, kn = random.split(random.key(seed))
    x = random.normal(kx, (n, 8))
    return {"x": x, "y": x.sum(1, keepdim=True) + 0.1 * random.normal(kn, (n, 1))}


def loss_fn(state, params, batch, rng):
    pred = state.apply(params, batch["x"], rng=rng, training=True)  # dropout drawn from rng
    return torch.mean((pred - batch["y"]) ** 2), {"pred_std": pred.std()}


def manual_step(state, batch):
    """The README's hand-written step, donating its input state."""
    rng = random.fold_in(state.rng, state.step)
    grad_fn = value_and_grad(lambda params: loss_fn(state, params, batch, rng), has_aux=True)
    (loss, aux), grads = grad_fn(state.params)
    return state.apply_gradients(grads, donate=True), {"loss": loss, **aux}


def adamw_state(model):
    return TrainState.create(model=model, tx=optim.adamw(1e-2, weight_decay=0.1), seed=3)


def run_against_eager(jitted, steps: int = 5):
    """``steps`` steps of ``jitted`` and of the eager ``manual_step`` from the same state."""
    compiled_state = adamw_state(dropout_mlp())
    eager_state = tree.clone(compiled_state)
    ptrs = {k: v.data_ptr() for k, v in compiled_state.params.items()}
    first_input = compiled_state
    for i in range(steps):
        compiled_state, compiled_metrics = jitted(compiled_state, regression_batch(i))
        eager_state, eager_metrics = manual_step(eager_state, regression_batch(i))
    return first_input, ptrs, (compiled_state, compiled_metrics), (eager_state, eager_metrics)


def test_readme_step_with_dropout_compiles_as_one_graph_and_donates_in_place():
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    fast_step = craftfn.jit(manual_step, donate_argnums=0, backend=backend)
    explanation = fast_step.explain(adamw_state(dropout_mlp()), regression_batch(0))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons
    first_input, ptrs, (state, metrics), (eager_state, eager_metrics) = run_against_eager(fast_step)
    assert backend.graphs == 1  # five steps, one graph: no recompiles
    assert tree.allclose(state.params, eager_state.params, rtol=1e-5, atol=1e-5)
    assert tree.allclose(state.opt_state, eager_state.opt_state, rtol=1e-5, atol=1e-5)
    assert torch.allclose(metrics["loss"], eager_metrics["loss"], rtol=1e-5)
    assert {k: v.data_ptr() for k, v in state.params.items()} == ptrs  # updated in place
    with pytest.raises(DonatedStateError, match="donated"):
        fast_step(first_input, regression_batch(0))
    with pytest.raises(DonatedStateError):
        first_input.params["0.weight"]


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_readme_step_and_masks_match_eager():
    # The one real inductor test for craftfn.jit (20-60 s on 2 cores): the hand-written donated
    # dropout step, and the keyed masks themselves, compiled by inductor equal eager.
    torch._dynamo.reset()
    backend = CountingBackend("inductor")
    fast_step = craftfn.jit(manual_step, donate_argnums=0, backend=backend)
    first_input, ptrs, (state, metrics), (eager_state, eager_metrics) = run_against_eager(fast_step)
    assert backend.graphs == 1
    assert tree.allclose(state.params, eager_state.params, rtol=1e-5, atol=1e-5)
    assert torch.allclose(metrics["loss"], eager_metrics["loss"], rtol=1e-5)
    assert {k: v.data_ptr() for k, v in state.params.items()} == ptrs
    with pytest.raises(DonatedStateError):
        fast_step(first_input, regression_batch(0))

    masks = craftfn.jit(keyed_draws, backend="inductor")
    for seed in (0, 1):
        compiled, eager = masks(random.key(seed), torch.ones(4, 2, 16, 16)), keyed_draws(random.key(seed), torch.ones(4, 2, 16, 16))
        for name in eager:
            assert torch.equal(compiled[name], eager[name]), name


def keyed_draws(key, x):
    """Every kind of keyed draw a model makes, as a function of the key."""
    q = x.reshape(4, 2, 16, 16)
    with random.module_rng(key):
        module = torch.nn.functional.dropout(x, 0.3, True)
        channels = torch.nn.functional.dropout2d(x, 0.5, True)
        attention = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.25, is_causal=True)
        uniform = torch.rand(x.shape)
    return {"direct": random.dropout(key, x, 0.3), "module": module, "channels": channels, "attention": attention, "uniform": uniform}


def test_same_key_same_masks_eager_and_compiled_and_different_keys_differ():
    torch._dynamo.reset()
    compiled = craftfn.jit(keyed_draws, backend="aot_eager")
    x = torch.ones(4, 2, 16, 16)
    a, b = keyed_draws(random.key(7), x), compiled(random.key(7), x)
    c = compiled(random.key(8), x)
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert not torch.equal(a[name], c[name]), name
    # random.dropout(key, ...) is the first draw of key's stream, as is a scope's first dropout;
    # later draws in the scope take fresh counters.
    assert torch.equal(a["module"], a["direct"])
    with random.module_rng(random.key(7)):
        first, second = (torch.nn.functional.dropout(x, 0.3, True) for _ in range(2))
    assert torch.equal(first, a["module"]) and not torch.equal(first, second)


def test_make_train_step_compile_with_dropout_matches_eager_and_follows_the_key():
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")

    def mse(state, params, batch, rng):  # no rng= in apply: the step's key is in effect
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    compiled = make_train_step(mse, donate=True, compile={"backend": backend})
    eager = make_train_step(mse)
    a = adamw_state(dropout_mlp(p=0.5))
    b = tree.clone(a)
    for i in range(5):
        (a, ma), (b, mb) = compiled(a, regression_batch(i)), eager(b, regression_batch(i))
        assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-5)
    assert backend.graphs == 1
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-5)
    # Another seed draws other masks: the loss of the same first step differs.
    other = eager(TrainState.create(model=dropout_mlp(p=0.5), tx=optim.adamw(1e-2), seed=4), regression_batch(0))[1]
    first = eager(adamw_state(dropout_mlp(p=0.5)), regression_batch(0))[1]
    assert other["loss"] != first["loss"]


# ----------------------------------------------------------------------------- custom steps


class EMAState(TrainState):
    ema_params: dict = None


def ema_step(state: EMAState, batch, decay=0.9):
    rng = random.fold_in(state.rng, state.step)
    (loss, _), grads = value_and_grad(lambda p: loss_fn(state, p, batch, rng), has_aux=True)(state.params)
    new = state.apply_gradients(grads, donate=True)
    ema = tree.map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new.params)
    return new.replace(ema_params=ema), loss


def sam_step(state, batch, rho=0.05):
    """Sharpness-aware minimisation: two gradient evaluations, each forward with its own key."""
    k1, k2 = random.split(random.fold_in(state.rng, state.step))
    grad_fn = value_and_grad(lambda p, rng: loss_fn(state, p, batch, rng), has_aux=True)
    (loss, _), g = grad_fn(state.params, k1)
    scale = rho / (tree.global_norm(g) + 1e-12)
    perturbed = tree.map(lambda p, gi: p + scale * gi, state.params, g)
    _, g_sam = grad_fn(perturbed, k2)
    return state.apply_gradients(g_sam, donate=True), loss


def gan_states():
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 8))
    disc = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LeakyReLU(0.2), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    return (
        TrainState.create(model=gen, tx=optim.adam(1e-3, b1=0.5), seed=1),
        TrainState.create(model=disc, tx=optim.adam(1e-3, b1=0.5), seed=2),
    )


def gan_step(gen: TrainState, disc: TrainState, real: torch.Tensor):
    """One GAN step over two states: the discriminator, then the generator, both donated."""
    kz, kg, kd = random.split(random.fold_in(gen.rng, gen.step), 3)
    z = random.normal(kz, (real.shape[0], 4))
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def disc_loss(dp):
        fake = gen.apply(gen.params, z, rng=kg, training=True).detach()
        real_logits = disc.apply(dp, real, rng=kd, training=True)
        fake_logits = disc.apply(dp, fake, rng=random.fold_in(kd, 1), training=True)
        return bce(real_logits, torch.ones_like(real_logits)) + bce(fake_logits, torch.zeros_like(fake_logits))

    d_loss, d_grads = value_and_grad(disc_loss)(disc.params)
    disc = disc.apply_gradients(d_grads, donate=True)

    def gen_loss(gp):
        logits = disc.apply(disc.params, gen.apply(gp, z, rng=kg, training=True), rng=random.fold_in(kd, 2), training=True)
        return bce(logits, torch.ones_like(logits))

    g_loss, g_grads = value_and_grad(gen_loss)(gen.params)
    return gen.apply_gradients(g_grads, donate=True), disc, {"d_loss": d_loss, "g_loss": g_loss}


# craftfn.jit compiles with fullgraph=True: a graph break raises in the first call, so these tests
# need no separate `explain` trace (a second Dynamo trace of the same step).


def test_sam_step_compiles_with_zero_breaks_and_matches_eager():
    # SAM: two gradient evaluations with two keys.
    torch._dynamo.reset()
    backend = CountingBackend()
    sam = craftfn.jit(sam_step, donate_argnums=0, backend=backend)
    assert sam.compile_options["fullgraph"] is True
    a = adamw_state(dropout_mlp())
    b = tree.clone(a)
    for i in range(3):
        (a, la), (b, lb) = sam(a, regression_batch(i)), sam_step(b, regression_batch(i))
    assert backend.graphs == 1 and torch.allclose(la, lb, rtol=1e-5)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-6)


def test_ema_state_subclass_step_compiles_with_zero_breaks_and_matches_eager():
    # A TrainState subclass carrying EMA parameters; decay is a static (Python float) argument.
    torch._dynamo.reset()
    backend = CountingBackend()
    ema = craftfn.jit(ema_step, donate_argnums=0, static_argnums=2, backend=backend)
    model = dropout_mlp()
    start = EMAState.create(model=model, tx=optim.adamw(1e-2), seed=3, ema_params=tree.clone(TrainState.create(model=model, tx=None).params))
    a, b = tree.clone(start), tree.clone(start)
    for i in range(3):
        (a, la), (b, lb) = ema(a, regression_batch(i), 0.9), ema_step(b, regression_batch(i), 0.9)
    assert backend.graphs == 1 and isinstance(a, EMAState) and torch.allclose(la, lb, rtol=1e-5)
    assert tree.allclose(a.ema_params, b.ema_params, rtol=1e-5, atol=1e-6)
    assert not tree.allclose(a.ema_params, a.params)


def test_gan_step_donating_two_states_compiles_with_zero_breaks_and_matches_eager():
    torch._dynamo.reset()
    backend = CountingBackend()
    gan = craftfn.jit(gan_step, donate_argnums=(0, 1), backend=backend)
    real = random.normal(random.key(9), (16, 8))
    (g, d), (ge, de) = gan_states(), gan_states()
    g_in, d_in = g, d
    for _ in range(3):
        (g, d, m), (ge, de, me) = gan(g, d, real), gan_step(ge, de, real)
    assert backend.graphs == 1
    assert tree.allclose((g.params, d.params), (ge.params, de.params), rtol=1e-5, atol=1e-6)
    assert torch.allclose(m["d_loss"], me["d_loss"], rtol=1e-5)
    for donated in (g_in, d_in):
        with pytest.raises(DonatedStateError):
            gan(donated, d, real)


# ----------------------------------------------------------------------------- masks as trees


@pytest.mark.parametrize(
    "mask",
    [
        {"0.weight": True, "0.bias": False, "3.weight": True, "3.bias": False, "6.weight": True, "6.bias": False},
        lambda params: {name: p.ndim > 1 for name, p in params.items()},
        lambda name, p: p.ndim > 1,
    ],
    ids=["dict", "tree-function", "name-function"],
)
@pytest.mark.parametrize("donate", [False, True])
def test_adamw_masks_compile_fullgraph_and_equal_eager(mask, donate):
    torch._dynamo.reset()
    tx = optim.adamw(1e-2, weight_decay=0.5, mask=mask)

    def mse(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    backend = CountingBackend()
    compiled = make_train_step(mse, donate=donate, compile={"backend": backend})
    eager = make_train_step(mse)
    a = TrainState.create(model=dropout_mlp(p=0.0), tx=tx)
    b = tree.clone(a)
    for i in range(3):
        (a, _), (b, _) = compiled(a, regression_batch(i)), eager(b, regression_batch(i))
    assert backend.graphs == 1
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-6)
    # The mask took effect: after one step, weights as with decay everywhere, biases not.
    start = TrainState.create(model=dropout_mlp(p=0.0), tx=tx)
    masked_one, _ = compiled(tree.clone(start), regression_batch(0))
    full_one, _ = eager(start.replace(tx=optim.adamw(1e-2, weight_decay=0.5)), regression_batch(0))
    assert torch.allclose(full_one.params["0.weight"], masked_one.params["0.weight"], rtol=1e-6)
    assert not torch.allclose(full_one.params["0.bias"], masked_one.params["0.bias"], rtol=1e-6)


def test_partition_with_a_label_tree_compiles_fullgraph():
    torch._dynamo.reset()
    labels = {"0.weight": "fast", "0.bias": "slow", "3.weight": "fast", "3.bias": "slow", "6.weight": "fast", "6.bias": "slow"}
    tx = optim.partition({"fast": optim.adam(1e-2), "slow": optim.sgd(1e-3)}, labels)

    def mse(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    compiled = make_train_step(mse, compile={"backend": "aot_eager"})
    a = TrainState.create(model=dropout_mlp(p=0.0), tx=tx)
    (ca, _), (ea, _) = compiled(a, regression_batch(0)), make_train_step(mse)(a, regression_batch(0))
    assert tree.allclose(ca, ea, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- transforms


def per_example_loss(params, x, y):
    return torch.mean((x @ params["w"] + params["b"] - y) ** 2)


def test_vmap_of_value_and_grad_gives_per_example_gradients_whose_mean_is_the_batch_gradient():
    kw, kx, ky = random.split(random.key(0), 3)
    params = {"w": random.normal(kw, (3, 2)), "b": torch.zeros(2)}
    x, y = random.normal(kx, (6, 3)), random.normal(ky, (6, 2))
    values, grads = torch.func.vmap(value_and_grad(per_example_loss), in_dims=(None, 0, 0))(params, x, y)
    assert values.shape == (6,) and grads["w"].shape == (6, 3, 2)
    batch_value, batch_grads = value_and_grad(per_example_loss)(params, x, y)
    assert tree.allclose(tree.map(lambda g: g.mean(0), grads), batch_grads, rtol=1e-5, atol=1e-6)
    assert torch.allclose(values.mean(), batch_value)
    # Each row's gradient is that row's own: the gradient of the first row alone.
    first = value_and_grad(per_example_loss)(params, x[:1], y[:1])[1]
    assert tree.allclose(tree.map(lambda g: g[0], grads), first, rtol=1e-5, atol=1e-6)


def test_jvp_of_value_and_grad_is_a_hessian_vector_product():
    kw, kx, ky, kt = random.split(random.key(1), 4)
    params = {"w": random.normal(kw, (3, 2)), "b": torch.zeros(2)}
    x, y = random.normal(kx, (5, 3)), random.normal(ky, (5, 2))
    tangent = {"w": random.normal(kt, (3, 2)), "b": torch.ones(2)}
    _, hvp = torch.func.jvp(lambda p: value_and_grad(per_example_loss)(p, x, y)[1], (params,), (tangent,))
    flat = lambda p: torch.cat([p["w"].reshape(-1), p["b"]])  # noqa: E731
    hessian = torch.func.hessian(lambda v: per_example_loss({"w": v[:6].reshape(3, 2), "b": v[6:]}, x, y))(flat(params))
    assert torch.allclose(flat(hvp), hessian @ flat(tangent), atol=1e-5)


# ----------------------------------------------------------------------------- the jit itself


def test_static_arguments_specialise_and_must_be_hashable():
    torch._dynamo.reset()
    seen_inputs = []

    def backend(gm, example_inputs):
        seen_inputs.append([type(x).__name__ for x in example_inputs])
        return gm.forward

    @craftfn.jit(static_argnums=1, backend=backend)
    def scale(x, n):
        return x * n

    assert [scale(torch.ones(2), n)[0].item() for n in (1, 2, 3, 2)] == [1.0, 2.0, 3.0, 2.0]
    assert len(seen_inputs) == 3  # one graph per distinct value, reused for the repeat
    assert all(kinds == ["Tensor"] for kinds in seen_inputs)  # n is a constant, never a SymInt
    explanation = scale.explain(torch.ones(2), 5)  # explain puts the static argument back in place
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    with pytest.raises(TypeError, match="static argument 1 .* must be hashable"):
        scale(torch.ones(2), [2])
    with pytest.raises(TypeError, match="name position 1"):
        scale(torch.ones(2))
    with pytest.raises(ValueError, match="both donated and static"):
        craftfn.jit(scale, donate_argnums=0, static_argnums=0)
    with pytest.raises(ValueError, match="non-negative ints"):
        craftfn.jit(scale, donate_argnums=-1)
    with pytest.raises(TypeError, match="fn must be callable"):
        craftfn.jit(3)


def test_engine_configuration_is_scoped_to_the_call():
    import importlib

    before = torch._dynamo.config.trace_autograd_ops
    importlib.reload(importlib.import_module("craftfn.jit"))  # importing changes nothing
    assert torch._dynamo.config.trace_autograd_ops == before
    f = craftfn.jit(lambda p: value_and_grad(lambda q: (q ** 2).sum())(p)[1], backend="eager")
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert torch._dynamo.config.trace_autograd_ops == before
    assert f.compile_seconds is not None and f.compile_seconds > 0


def test_donation_needs_donate_argnums_and_plain_torch_compile_is_pointed_to_jit():
    state = adamw_state(dropout_mlp(p=0.0))
    batch = regression_batch(0)
    with pytest.raises(ValueError, match="without donate_argnums"):
        craftfn.jit(manual_step, backend="eager")(state, batch)
    craftfn.state.check_live(state)  # nothing was donated
    torch._dynamo.reset()
    with pytest.raises(Exception, match="craftfn.jit"), torch._dynamo.config.patch(trace_autograd_ops=True):
        torch.compile(manual_step, backend="eager", fullgraph=True)(state, batch)


def test_eager_reuse_of_a_donated_state_raises_donated_state_error():
    state = adamw_state(dropout_mlp(p=0.0))
    new_state, _ = manual_step(state, regression_batch(0))
    with pytest.raises(DonatedStateError):
        manual_step(state, regression_batch(0))  # first touches state.rng in random.fold_in
    with pytest.raises(DonatedStateError):
        value_and_grad(lambda p: sum(x.sum() for x in tree.leaves(p)))(state.params)
    with pytest.raises(DonatedStateError):
        tree.map(lambda x: x, state)
    assert int(new_state.step) == 1


def test_returned_inputs_stay_live_and_nested_states_are_marked():
    torch._dynamo.reset()
    identity = craftfn.jit(lambda pair: pair, donate_argnums=0, backend="eager")
    a, b = gan_states()
    out = identity((a, b))
    assert out[0] is a and int(a.step) == 0  # returned as it came in: still usable

    def step_both(pair, real):
        gen, disc = pair
        new_gen, new_disc, _ = gan_step(gen, disc, real)
        return new_gen, new_disc

    both = craftfn.jit(step_both, donate_argnums=0, backend="eager")  # marking is the jit's, whatever the backend
    g, d = gan_states()
    g2, d2 = both((g, d), random.normal(random.key(0), (4, 8)))
    for donated in (g, d):
        with pytest.raises(DonatedStateError):
            donated.params["0.weight"]
    assert int(g2.step) == 1 and int(d2.step) == 1


def test_docstring_examples_run(monkeypatch):
    import importlib
    import types

    jit_module = importlib.import_module("craftfn.jit")  # the module; craftfn.jit is the function
    for module in (jit_module, random):
        # Compiled examples look their globals up through sys.modules[__name__]: give the examples
        # a module of their own, as a user's script has.
        namespace = types.ModuleType(f"doctest_of_{module.__name__.replace('.', '_')}")
        namespace.__dict__.update(craftfn=craftfn, torch=torch, random=random)
        monkeypatch.setitem(__import__("sys").modules, namespace.__name__, namespace)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        for test in doctest.DocTestFinder().find(module):
            test.globs = namespace.__dict__
            runner.run(test, clear_globs=False)
        result = runner.summarize(verbose=False)
        assert result.failed == 0 and result.attempted > 0, module.__name__


def test_whole_state_tree_ops_compile_for_a_model_without_buffers():
    # A TrainState of a model without buffers holds an empty dict; Dynamo (torch 2.13, optree 0.20)
    # cannot flatten a dict without tensors, so the state keeps it in its structure instead.
    state = TrainState.create(model=torch.nn.Linear(3, 2), tx=optim.adamw(1e-2), seed=1)
    assert state.buffers == {}

    def walk(s):
        doubled = tree.map(lambda x: x * 2 if x.is_floating_point() else x, s)
        return tree.clone(s), doubled, len(tree.leaves(s))

    torch._dynamo.reset()
    backend = CountingBackend("eager")
    (clone, doubled, n), (clone_e, doubled_e, n_e) = craftfn.jit(walk, backend=backend)(state), walk(state)
    assert backend.graphs == 1 and n == n_e == len(tree.leaves(state))
    assert tree.equal(clone, clone_e) and tree.equal(doubled, doubled_e)
    assert clone.buffers == {} and clone.buffers is not state.buffers
    leaves_, treedef = tree.flatten(state)
    assert tree.equal(tree.unflatten(treedef, leaves_), state) and treedef == tree.structure(clone)
