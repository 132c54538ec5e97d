"""craftfn.distributed in one process: the no-op group, sharding arithmetic, the ZeRO-1 layout, errors.

The multi-process behaviour (2 ranks over gloo) is in test_multiprocess.py.
"""

from __future__ import annotations

import datetime
import doctest
import importlib
import pkgutil

import pytest
import torch
from compile_backends import CountingBackend
from hypothesis import given, settings
from hypothesis import strategies as st

import craftfn.distributed
from craftfn import DonatedStateError, TrainState, distributed, make_train_step, optim, random, tree
from craftfn.distributed import zero1
from craftfn.distributed.collectives import _buckets
from craftfn.distributed.zero1 import _layout


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _loss(state, params, batch, rng):
    return torch.mean((state.apply(params, batch["x"]) - batch["y"]) ** 2)


def _batch(i: int) -> dict[str, torch.Tensor]:
    x = random.normal(random.fold_in(random.key(3), i), (8, 4))
    return {"x": x, "y": x.sum(-1, keepdim=True)}


@pytest.fixture
def single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", distributed.TIMEOUT_ENV):
        monkeypatch.delenv(var, raising=False)


def test_init_without_torchrun_is_a_noop(single_process):
    assert distributed.init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (0, 1, 0)
    assert distributed.is_main() and not distributed.is_initialized()
    distributed.barrier()
    distributed.set_timeout(5)
    with pytest.raises(ValueError, match="timeout"):
        distributed.set_timeout(-1)
    distributed.shutdown()


def test_init_rejects_incomplete_environment_and_bad_arguments(single_process, monkeypatch):
    with pytest.raises(ValueError, match="timeout"):
        distributed.init(timeout=0)
    with pytest.raises(ValueError, match="timeout"):
        distributed.init(timeout=float("inf"))
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.TIMEOUT_ENV):
        distributed.init()
    monkeypatch.delenv(distributed.TIMEOUT_ENV)
    assert distributed.init(timeout=datetime.timedelta(seconds=5)) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        distributed.init()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE=2\), got 2"):
        distributed.init()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="backend must be"):
        distributed.init(backend="carrier-pigeon")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        distributed.init()


def test_shard_batch_takes_contiguous_rows():
    batch = {"x": torch.arange(12).reshape(6, 2), "meta": "kept"}
    shards = [distributed.shard_batch(batch, rank=r, world=3) for r in range(3)]
    assert [s["x"][:, 0].tolist() for s in shards] == [[0, 2], [4, 6], [8, 10]]
    assert shards[1]["meta"] == "kept"
    assert torch.equal(torch.cat([s["x"] for s in shards]), batch["x"])
    assert distributed.shard_batch(batch) is not batch and torch.equal(distributed.shard_batch(batch)["x"], batch["x"])


def test_shard_batch_errors_name_the_leaf():
    with pytest.raises(ValueError, match="'x' has 5 rows, not divisible by world=2"):
        distributed.shard_batch({"x": torch.zeros(5)}, rank=0, world=2)
    with pytest.raises(ValueError, match="'n' is 0-d"):
        distributed.shard_batch({"n": torch.tensor(1)}, rank=0, world=1)
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\), got 2"):
        distributed.shard_batch({"x": torch.zeros(4)}, rank=2, world=2)
    with pytest.raises(ValueError, match="world must be a positive int"):
        distributed.shard_batch({"x": torch.zeros(4)}, rank=0, world=0)


def test_rank_key_differs_per_rank_and_is_deterministic():
    k = random.key(5)
    keys = [distributed.rank_key(k, r) for r in range(4)]
    assert len({tuple(x.tolist()) for x in keys}) == 4
    assert torch.equal(distributed.rank_key(k, 2), keys[2])
    # The per-rank stream is not a per-step key of the same root.
    assert not torch.equal(keys[0], random.fold_in(k, 0))
    assert torch.equal(distributed.rank_key(k), keys[0])
    with pytest.raises(ValueError, match="rank must be a non-negative int"):
        distributed.rank_key(k, -1)


def test_buckets_respect_the_size_limit():
    ts = [torch.zeros(n) for n in (10, 10, 30, 5, 5)]  # fp32: 40, 40, 120, 20, 20 bytes
    assert _buckets(ts, 80) == [[0, 1], [2], [3, 4]]
    assert _buckets(ts, 10_000) == [[0, 1, 2, 3, 4]]
    assert _buckets(ts, 1) == [[0], [1], [2], [3], [4]]


@settings(max_examples=25, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    halves=st.lists(st.booleans(), min_size=6, max_size=6),
    world=st.integers(1, 5),
)
def test_zero_layout_partitions_every_parameter_exactly_once(sizes, halves, world):
    params = {f"p{i}": torch.zeros(n, dtype=torch.float16 if halves[i] else torch.float32) for i, n in enumerate(sizes)}
    owned = {name: torch.zeros(x.numel(), dtype=torch.int64) for name, x in params.items()}
    shard_sizes = set()
    for r in range(world):
        _, groups = _layout(params, r, world)
        for g in groups:
            shard_sizes.add((g.dtype, g.shard))
            pieces = [(name, lo, hi) for name, (lo, hi) in zip(g.names, g.pieces) if hi > lo]
            assert sum(hi - lo for _, lo, hi in pieces) <= g.shard
            # A rank's pieces are consecutive in the flat buffer: its slice [r*shard, (r+1)*shard).
            flat = [g.offsets[g.names.index(n)] + i for n, lo, hi in pieces for i in range(lo, hi)]
            assert flat == list(range(flat[0], flat[0] + len(flat))) if flat else True
            assert all(r * g.shard <= i < (r + 1) * g.shard for i in flat)
            for name, lo, hi in pieces:
                owned[name][lo:hi] += 1
    assert all(bool((c == 1).all()) for c in owned.values())
    for dtype in {x.dtype for x in params.values()}:
        total = sum(x.numel() for x in params.values() if x.dtype == dtype)
        assert (dtype, -(-total // world)) in shard_sizes


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("donate", [False, True])
def test_one_process_data_parallel_equals_the_plain_step(single_process, sharded, donate):
    tx = optim.sgd(0.05, momentum=0.9, nesterov=True)
    plain = TrainState.create(model=_model(), tx=tx, seed=2)
    dp = TrainState.create(model=_model(), tx=distributed.data_parallel(tx, shard_optimizer_state=sharded), seed=2)
    step, dp_step = make_train_step(_loss, accum_steps=2), distributed.make_data_parallel_step(_loss, accum_steps=2, donate=donate)
    for i in range(3):
        plain, m = step(plain, _batch(i))
        dp, m_dp = dp_step(dp, distributed.shard_batch(_batch(i)))
        assert tree.allclose(m, m_dp, rtol=1e-6, atol=0)
    assert tree.equal(plain.params, dp.params) and torch.equal(plain.rng, dp.rng)
    assert tree.equal(distributed.gather_state(dp).opt_state, plain.opt_state)
    assert distributed.gather_state(dp).tx is tx


def test_donated_data_parallel_state_cannot_be_reused(single_process):
    state = TrainState.create(model=_model(), tx=distributed.data_parallel(optim.sgd(0.1)))
    step = distributed.make_data_parallel_step(_loss, donate=True)
    new_state, _ = step(state, _batch(0))
    with pytest.raises(DonatedStateError, match="donated"):
        step(state, _batch(0))
    step(new_state, _batch(1))


def test_gather_and_shard_state_round_trip(single_process):
    tx = optim.sgd(0.1, momentum=0.5)
    dp_tx = distributed.data_parallel(tx, shard_optimizer_state=True)
    state = TrainState.create(model=_model(), tx=dp_tx)
    state, _ = distributed.make_data_parallel_step(_loss)(state, _batch(0))
    plain = distributed.gather_state(state)
    assert plain.tx is tx and tree.structure(plain.opt_state) == tree.structure(tx.init(plain.params))
    # Parameter-shaped entries come back in the parameters' shapes.
    assert plain.opt_state[0].trace["0.weight"].shape == (8, 4)
    back = distributed.shard_state(plain, dp_tx)
    assert tree.equal(back.opt_state.inner, state.opt_state.inner)
    with pytest.raises(ValueError, match="already data-parallel"):
        distributed.shard_state(state, dp_tx)


def test_nested_params_gather_to_their_own_structure(single_process):
    params = {"enc": {"w": torch.ones(3, 2)}, "b": torch.zeros(2)}
    tx = optim.sgd(0.1, momentum=0.9)
    state = TrainState.create(apply_fn=lambda p, x: x @ p["enc"]["w"] + p["b"], params=params, tx=distributed.data_parallel(tx, shard_optimizer_state=True))
    plain = distributed.gather_state(state)
    assert tree.structure(plain.opt_state) == tree.structure(tx.init(params))
    assert tree.equal(distributed.shard_state(plain, state.tx).opt_state.inner, state.opt_state.inner)


def test_sharded_state_from_another_world_size_is_rejected(single_process, monkeypatch):
    tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9), shard_optimizer_state=True)
    monkeypatch.setattr(zero1, "world_size", lambda: 2)
    state = TrainState.create(model=_model(), tx=tx)  # rank 0's half, as if made under 2 ranks
    monkeypatch.undo()
    with pytest.raises(ValueError, match="sharded for another world size"):
        distributed.make_data_parallel_step(_loss)(state, _batch(0))


def test_zero_memory_is_a_slice_per_rank(single_process, monkeypatch):
    model = _model()
    full = distributed.opt_state_bytes(optim.sgd(0.1, momentum=0.9).init(dict(model.named_parameters())))
    tx = distributed.data_parallel(optim.sgd(0.1, momentum=0.9), shard_optimizer_state=True)
    per_rank = []
    for r in range(4):
        monkeypatch.setattr(zero1, "world_size", lambda: 4)
        monkeypatch.setattr(zero1, "rank", lambda r=r: r)
        per_rank.append(distributed.opt_state_bytes(TrainState.create(model=model, tx=tx).opt_state.inner))
    assert sum(per_rank) == full and max(per_rank) <= full // 4 + 4


def test_errors_name_what_to_do(single_process):
    with pytest.raises(TypeError, match="GradientTransformation"):
        distributed.data_parallel("sgd")
    with pytest.raises(ValueError, match="already data-parallel"):
        distributed.data_parallel(distributed.data_parallel(optim.sgd(0.1)))
    with pytest.raises(ValueError, match="bucket_mb must be a positive number"):
        distributed.data_parallel(optim.sgd(0.1), bucket_mb=0)
    with pytest.raises(TypeError, match="shard_optimizer_state must be a bool"):
        distributed.data_parallel(optim.sgd(0.1), shard_optimizer_state="yes")
    with pytest.raises(ValueError, match="overlap=True cannot be combined with compile="):
        distributed.make_data_parallel_step(_loss, compile=True, overlap=True)
    with pytest.raises(ValueError, match="dropout='global_batch' cannot be combined with compile="):
        distributed.make_data_parallel_step(_loss, compile=True, dropout="global_batch")
    with pytest.raises(ValueError, match="loss_scale= is not supported yet"):
        distributed.make_data_parallel_step(_loss, loss_scale=True)
    with pytest.raises(TypeError, match="shard_global_batch must be a bool"):
        distributed.make_data_parallel_step(_loss, shard_global_batch=1)
    plain = TrainState.create(model=_model(), tx=optim.sgd(0.1))
    with pytest.raises(TypeError, match=r"tx=distributed.data_parallel\(optim.adamw"):
        distributed.make_data_parallel_step(_loss)(plain, _batch(0))
    with pytest.raises(TypeError, match="data-parallel optimizer"):
        distributed.gather_state(plain)
    with pytest.raises(ValueError, match="update needs params"):
        tx = distributed.data_parallel(optim.sgd(0.1), shard_optimizer_state=True)
        tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))


def test_collective_helpers_are_identities_in_one_process(single_process):
    x = {"a": torch.arange(3.0), "flag": torch.tensor([True, False])}
    assert distributed.all_reduce_mean(x) is not None and tree.equal(distributed.all_reduce_mean({"a": x["a"]}), {"a": x["a"]})
    assert tree.equal(distributed.broadcast_tree(x), x)
    assert distributed.average_metrics({"loss": torch.tensor(1.5), "n": 3}) == {"loss": torch.tensor(1.5), "n": 3}
    state = TrainState.create(model=_model(), tx=distributed.data_parallel(optim.sgd(0.1)))
    assert tree.equal(distributed.broadcast_state(state), state)


def test_checkpoint_coordinator_writes_a_plain_checkpoint(single_process, tmp_path):
    from craftfn.training.checkpointing import CheckpointManager

    tx = optim.sgd(0.1, momentum=0.9)
    state = TrainState.create(model=_model(), tx=distributed.data_parallel(tx, shard_optimizer_state=True), seed=4)
    state, _ = distributed.make_data_parallel_step(_loss)(state, _batch(0))
    with distributed.CheckpointCoordinator(CheckpointManager(tmp_path, async_save=False)) as ckpt:
        with pytest.raises(FileNotFoundError):
            ckpt.restore(state)
        ckpt.save(1, state, metrics={"loss": 0.5})
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        assert ckpt.metadata(1)["metrics"] == {"loss": 0.5}
        template = TrainState.create(model=_model(), tx=state.tx, seed=0)
        restored = ckpt.restore(template)
    assert tree.equal(restored.params, state.params) and tree.equal(restored.opt_state.inner, state.opt_state.inner)
    # The files are those of a plain single-process run: a plain template restores them.
    plain = CheckpointManager(tmp_path).restore(TrainState.create(model=_model(), tx=tx))
    assert tree.equal(plain.opt_state, distributed.gather_state(state).opt_state)
    with pytest.raises(ValueError, match="the main rank needs a manager"):
        distributed.CheckpointCoordinator(None)


def test_data_parallel_step_takes_the_step_options_and_the_global_batch(single_process):
    tx = optim.sgd(0.05, momentum=0.9)
    plain = TrainState.create(model=_model(), tx=tx, seed=2)
    dp = TrainState.create(model=_model(), tx=distributed.data_parallel(tx), seed=2)
    step = make_train_step(_loss, policy="bf16")
    dp_step = distributed.make_data_parallel_step(_loss, policy="bf16", shard_global_batch=True)
    for i in range(2):
        plain, m = step(plain, _batch(i))
        dp, m_dp = dp_step(dp, _batch(i))
    assert tree.equal(plain.params, dp.params)
    assert m["loss"].dtype == m_dp["loss"].dtype and torch.equal(m["loss"], m_dp["loss"])


def test_docstring_examples(single_process):
    failed = attempted = 0
    for name in sorted(m.name for m in pkgutil.iter_modules(craftfn.distributed.__path__)):
        module = importlib.import_module(f"craftfn.distributed.{name}")
        globs = dict(vars(module), distributed=distributed, optim=optim, torch=torch, tree=tree, random=random, TrainState=TrainState)
        result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        failed, attempted = failed + result.failed, attempted + result.attempted
    result = doctest.testmod(craftfn.distributed, extraglobs=dict(distributed=distributed, optim=optim, torch=torch, TrainState=TrainState))
    assert failed == 0 and result.failed == 0 and attempted > 30, (failed, attempted, result)


@pytest.mark.parametrize("sharded", [False, True], ids=["dp", "zero1"])
def test_compiled_data_parallel_step_is_one_graph_and_equals_the_eager_one(single_process, sharded):
    torch._dynamo.reset()
    backend = CountingBackend("aot_eager")
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.25), torch.nn.Linear(8, 1))
    state = TrainState.create(model=model, tx=distributed.data_parallel(tx, shard_optimizer_state=sharded), seed=2)
    compiled = distributed.make_data_parallel_step(_loss, compile={"backend": backend}, accum_steps=2, donate=True)
    eager = distributed.make_data_parallel_step(_loss, accum_steps=2)
    a, b = tree.clone(state), state
    for i in range(3):
        (a, ma), (b, mb) = compiled(a, _batch(i)), eager(b, _batch(i))
        assert ma.keys() == mb.keys() and all(torch.allclose(ma[k], mb[k], rtol=1e-5, atol=1e-7) for k in mb), (ma, mb)
    assert tree.allclose(a.params, b.params, rtol=1e-5, atol=1e-7)
    assert tree.allclose(a.opt_state, b.opt_state, rtol=1e-5, atol=1e-7)
    # The forward with its backward, one graph for every step and microbatch (dropout keys are tensors).
    assert backend.graphs == 1
    assert "<built-in function linear>" in backend.targets(), backend.targets()


def test_compiled_data_parallel_step_refuses_a_fully_sharded_state(single_process):
    state = distributed.fully_shard(TrainState.create(model=_model(), tx=optim.adamw(1e-2)))
    step = distributed.make_data_parallel_step(_loss, compile={"backend": "eager"})
    with pytest.raises(ValueError, match=r"compile= does not support a fully sharded \(ZeRO-3\) state"):
        step(state, _batch(0))
