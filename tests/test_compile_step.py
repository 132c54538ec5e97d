"""make_train_step(compile=...): one compiled graph for the differentiated forward (AOT autograd
builds its backward); compiled == eager; no recompilation over training; donation updates in place;
compile time exposed; the whole step as one graph with craftfn.jit(step.core)."""

from __future__ import annotations

import pytest
import torch
from compile_backends import CountingBackend

import craftfn
from craftfn import TrainState, make_train_step, optim, schedules, tree
from craftfn.models.gpt import GPT, GPTConfig, lm_loss

CFG = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)  # one block: tracing cost


def schedule():
    return schedules.warmup_cosine_decay(init_value=0.0, peak_value=3e-2, warmup_steps=5, decay_steps=20, end_value=3e-3)


def compilable_tx():
    """Clipping + momentum SGD on a warm-up/cosine schedule (a function of the tensor update count)."""
    return optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(schedule(), momentum=0.9))


def gpt_state(tx=None, cfg=CFG, seed=0):
    torch.manual_seed(seed)
    return TrainState.create(model=GPT(cfg), tx=tx if tx is not None else compilable_tx())


def lm_batch(seed=1, b=4, t=16, v=64):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, v, (b, t), generator=g), "labels": torch.randint(0, v, (b, t), generator=g)}


@pytest.mark.slow
def test_compiled_donated_training_compiles_once_over_20_steps_in_place_and_equals_eager():
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    # fullgraph=True: any graph break raises. The learning rate comes from a schedule of the
    # (tensor) update count, and the step is a tensor: one graph serves every step.
    compiled = make_train_step(lm_loss, donate=True, compile={"backend": backend, "fullgraph": True})
    eager = make_train_step(lm_loss)
    state = gpt_state()
    a, b = tree.clone(state), state
    ptrs = {k: v.data_ptr() for k, v in a.params.items()}
    for i in range(20):
        (a, ma), (b, mb) = compiled(a, lm_batch(i)), eager(b, lm_batch(i))
    assert backend.graphs == 1
    assert {k: v.data_ptr() for k, v in a.params.items()} == ptrs  # donated: parameters updated in place
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-4)
    assert tree.allclose(a.params, b.params, rtol=1e-4, atol=1e-5)
    assert int(a.step) == 20
    assert isinstance(compiled.compile_seconds, float) and compiled.compile_seconds > 0
    assert eager.compile_seconds is None


@pytest.mark.slow
def test_all_options_together_compile_as_one_graph_once():
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    opts = dict(policy="bf16", remat="transformer.h.*", loss_scale=True)
    compiled = make_train_step(lm_loss, donate=True, compile={"backend": backend, "fullgraph": True}, **opts)
    eager = make_train_step(lm_loss, **opts)
    state = gpt_state()
    a, b = tree.clone(state), state
    for i in range(4):
        (a, ma), (b, mb) = compiled(a, lm_batch(i)), eager(b, lm_batch(i))
    assert backend.graphs == 1
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-3)
    assert tree.allclose(a.params, b.params, rtol=1e-3, atol=1e-4)
    assert float(ma["loss_scale"]) == float(mb["loss_scale"])
    assert a.apply_fn is state.apply_fn


def test_fused_adam_kernel_compiles():
    # The default job's AdamW runs this kernel in both its pure and donated updates. torch 2.13
    # cannot functionalize torch._fused_adamw_ itself; fused.py calls it through a custom op
    # with a fake kernel under compile.
    from craftfn.optim.fused import fused_adam_step_

    def update(p, g, m, v, count, lr):
        fused_adam_step_(p, g, m, v, None, count, lr=lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
        return p

    args = lambda: ([torch.ones(3)], [torch.full((3,), 0.5)], [torch.zeros(3)], [torch.zeros(3)], torch.tensor(1), torch.tensor(0.1))  # noqa: E731
    torch._dynamo.reset()
    out = craftfn.jit(update, backend="aot_eager")(*args())
    assert torch.allclose(out[0], update(*args())[0])


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_compiled_donated_gpt_step_with_dropout_matches_eager():
    # The one real inductor compile of make_train_step (20-60 s on 2 cores): a donated GPT step with
    # dropout. Under inductor the masks come from the step's key as they do eagerly, so the
    # trajectories agree (before keyed dropout they drifted apart by 0.08 in 5 steps).
    torch._dynamo.reset()
    compiled = make_train_step(lm_loss, donate=True, compile={"fullgraph": True})
    eager = make_train_step(lm_loss)
    state = gpt_state(cfg=GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.3))
    a, b = tree.clone(state), state
    ptrs = {k: v.data_ptr() for k, v in a.params.items()}
    for i in range(3):
        (a, ma), (b, mb) = compiled(a, lm_batch(i)), eager(b, lm_batch(i))
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-4)
    assert tree.allclose(a.params, b.params, rtol=1e-3, atol=1e-5)
    assert {k: v.data_ptr() for k, v in a.params.items()} == ptrs
    assert compiled.compile_seconds > 0


@pytest.mark.slow
@pytest.mark.parametrize("donate", [False, True])
def test_adamw_train_step_compiles_in_one_graph_and_matches_eager(donate):
    # The default job's optimizer (fused AdamW behind clipping, lr schedule in the state) in a
    # compiled step: one forward graph, no breaks, same numbers as eager.
    from craftfn import TrainState, make_train_step, optim, tree
    from craftfn.schedules import warmup_cosine_decay

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    tx = optim.create_optimizer(
        "adamw", learning_rate=warmup_cosine_decay(0.0, 1e-2, 3, 20), weight_decay=0.1, clip_norm=1.0, no_decay=("bias",)
    )

    def loss_fn(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 1)}
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = make_train_step(loss_fn, donate=donate, compile={"backend": counting_backend, "fullgraph": True})
    eager = make_train_step(loss_fn)
    s_c = TrainState.create(model=model, tx=tx)
    s_e = TrainState.create(model=model, tx=tx)
    for _ in range(5):
        s_c, m_c = compiled(s_c, batch)
        s_e, m_e = eager(s_e, batch)
    assert len(graphs) == 1
    assert tree.allclose(s_c.params, s_e.params, rtol=1e-5, atol=1e-6)
    assert tree.allclose(s_c.opt_state, s_e.opt_state, rtol=1e-5, atol=1e-6)
    assert torch.allclose(m_c["loss"], m_e["loss"], rtol=1e-5)


@pytest.mark.slow
def test_compile_whole_puts_forward_backward_and_the_fused_update_in_one_graph():
    # compile= compiles the differentiated forward; step.compile_whole() compiles the step's pure
    # core (forward, backward, fused update, metrics) as one graph, donating the state.
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    tx = optim.adamw(1e-2, weight_decay=0.1)
    whole = make_train_step(lm_loss, donate=True).compile_whole(backend=backend)
    eager = make_train_step(lm_loss)
    a, b = gpt_state(tx), gpt_state(tx)
    ptrs = {k: v.data_ptr() for k, v in a.params.items()}
    first = a
    for i in range(3):
        (a, ma), (b, mb) = whole(a, lm_batch(i)), eager(b, lm_batch(i))
    assert backend.graphs == 1
    targets = backend.targets()
    assert any("fused_adamw" in t for t in targets), sorted(targets)  # the update is inside the graph
    assert {k: v.data_ptr() for k, v in a.params.items()} == ptrs
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-5)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-6)
    assert whole.compile_seconds > 0 and whole.compiled is not None
    with pytest.raises(craftfn.DonatedStateError):
        whole(first, lm_batch(0))


@pytest.mark.slow
def test_compile_puts_the_forward_in_the_graph_and_leaves_the_fused_update_out():
    # What compile= compiles: the forward (and, through AOT autograd, its backward); the fused
    # AdamW kernel runs outside the graph, as torch.optim's does next to torch.compile(model).
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    step = make_train_step(lm_loss, donate=True, compile={"backend": backend, "fullgraph": True})
    state = gpt_state(optim.adamw(1e-2, weight_decay=0.1))
    for i in range(3):
        state, metrics = step(state, lm_batch(i))
    assert backend.graphs == 1
    targets = backend.targets()
    assert not any("fused_adam" in t for t in targets), sorted(targets)
    assert any("cross_entropy" in t for t in targets), sorted(targets)  # the loss is traced with the model
    assert step.compiled is not None and step.compiled.compile_seconds > 0
    assert step.compile_seconds >= step.compiled.compile_seconds  # the whole first step


@pytest.mark.slow
def test_remat_with_accumulation_and_dropout_compiles_once_and_equals_eager():
    # Each microbatch calls the same compiled forward (its own backward region), so activation
    # checkpointing composes with accumulation under compile=; dropout masks come from the keys.
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    opts = dict(remat="transformer.h.*", accum_steps=2)
    compiled = make_train_step(lm_loss, compile={"backend": backend, "fullgraph": True}, **opts)
    eager = make_train_step(lm_loss, **opts)
    a = b = gpt_state(optim.adamw(1e-2), cfg=cfg)
    for i in range(3):
        (a, ma), (b, mb) = compiled(a, lm_batch(i)), eager(b, lm_batch(i))
    assert backend.graphs == 1
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-5)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("donate", [False, True])
def test_compiled_step_updates_batchnorm_statistics_as_eager_and_leaves_the_input_alone(donate):
    # The compiled forward writes the running statistics into the step's private copy of the
    # buffers (an input mutation AOT autograd carries out of the graph); the caller's state keeps
    # its own unless donated.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))

    def loss_fn(state, params, batch, rng):
        return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)

    compiled = make_train_step(loss_fn, donate=donate, compile={"backend": "aot_eager", "fullgraph": True})
    eager = make_train_step(loss_fn)
    a = TrainState.create(model=model, tx=optim.sgd(0.1, momentum=0.9))
    b = tree.clone(a)
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        batch = {"x": torch.randn(8, 3, generator=g), "y": torch.randn(8, 1, generator=g)}
        before = tree.clone(a.buffers)
        a_in = a
        (a, ma), (b, mb) = compiled(a, batch), eager(b, batch)
        if not donate:
            assert tree.allclose(a_in.buffers, before, rtol=0, atol=0)  # the input state is untouched
    assert int(a.buffers["1.num_batches_tracked"]) == 3
    assert tree.allclose(a.buffers, b.buffers, rtol=1e-5, atol=1e-6)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ma["loss"], mb["loss"], rtol=1e-5)
