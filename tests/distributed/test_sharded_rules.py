"""Update rules on shards, in one process: exact where they can be, refused by name where they cannot.

One process with ZeRO-1 or ZeRO-3 has a single shard (the whole parameter), but the rules still run
inside ``optim.sharded`` as they do on N ranks (ZeRO-1 even sees 1-D pieces), so what a rule decides
from shapes, and what it refuses, shows here. The multi-rank behaviour is in test_multiprocess.py and
test_fully_sharded.py.
"""

from __future__ import annotations

import doctest
import sys
import threading
from pathlib import Path

import pytest
import torch

import craftfn.optim.sharding
from craftfn import TrainState, distributed, make_eval_step, make_train_step, optim, random, tree
from craftfn.training import EvalSplit, Evaluator

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import _batch, _loss, _model  # noqa: E402  (the same tiny model and data)


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)



def _sharded(kind: str, tx: optim.GradientTransformation) -> TrainState:
    if kind == "zero1":
        return TrainState.create(model=_model(), tx=distributed.data_parallel(tx, shard_optimizer_state=True), seed=1)
    return distributed.fully_shard(TrainState.create(model=_model(), tx=tx, seed=1))


def _train(state: TrainState, step, steps: int = 3) -> TrainState:
    for i in range(steps):
        state, _ = step(state, _batch(i))
    return state


EXACT = {
    # ZeRO-1 hands the rule 1-D pieces: a mask by ndim must still see the whole parameter's shape.
    "mask_by_ndim": lambda: optim.adamw(1e-2, weight_decay=0.5, mask=lambda name, p: p.ndim >= 2),
    "partition_by_shape": lambda: optim.partition({"big": optim.adam(1e-2), "small": optim.sgd(0.1)}, lambda name, p: "big" if p.numel() > 8 else "small"),
    "lamb": lambda: optim.lamb(1e-2),
    "lars": lambda: optim.lars(1e-2),
    "apply_if_finite": lambda: optim.apply_if_finite(optim.adam(1e-2), 2),
    "clip_adamw": lambda: optim.chain(optim.clip_by_global_norm(0.3), optim.adamw(1e-2)),
}


@pytest.mark.parametrize("kind", ["zero1", "zero3"])
@pytest.mark.parametrize("name", sorted(EXACT))
def test_rules_that_read_whole_tensors_are_exact_on_shards(kind, name):
    plain = _train(TrainState.create(model=_model(), tx=EXACT[name](), seed=1), make_train_step(_loss))
    sharded = _train(_sharded(kind, EXACT[name]()), distributed.make_data_parallel_step(_loss))
    assert tree.allclose(sharded.params, plain.params, rtol=1e-6, atol=1e-7)


REFUSED = {
    "scale_by_factored_rms (Adafactor)": lambda: optim.adafactor(1e-2, min_dim_size_to_factor=2),
    "scale_by_muon (Muon)": lambda: optim.muon(1e-2),
    "clip_by_block_rms": lambda: optim.chain(optim.clip_by_block_rms(1.0), optim.sgd(0.1)),
    "adaptive_grad_clip": lambda: optim.chain(optim.adaptive_grad_clip(0.1), optim.sgd(0.1)),
    "centralize": lambda: optim.chain(optim.centralize(), optim.sgd(0.1)),
    "scale_by_param_block_rms": lambda: optim.chain(optim.scale_by_param_block_rms(), optim.sgd(0.1)),
    "add_noise": lambda: optim.chain(optim.add_noise(0.01, 0.55, 0), optim.sgd(0.1)),
    # optax parity's rules that read whole parameters or sum over all of them.
    "scale_by_novograd (NovoGrad)": lambda: optim.novograd(1e-2),
    "scale_by_sm3 (SM3)": lambda: optim.sm3(1e-2),
    "scale_by_lbfgs (L-BFGS)": lambda: optim.lbfgs(1e-2),
    "scale_by_polyak (Polyak SGD)": lambda: optim.polyak_sgd(),
    "scale_by_distance_over_gradients (layer-wise DoG)": lambda: optim.chain(optim.scale_by_distance_over_gradients(), optim.sgd(0.1)),
    "scale_by_param_block_norm": lambda: optim.chain(optim.scale_by_param_block_norm(), optim.sgd(0.1)),
    "normalize_by_update_norm": lambda: optim.chain(optim.normalize_by_update_norm(), optim.sgd(0.1)),
    "scale_by_shape (Muon)": lambda: optim.partition(
        {"matrix": optim.chain(optim.contrib.scale_by_shape(), optim.sgd(0.1)), "other": optim.sgd(0.1)},
        lambda name, p: "matrix" if p.ndim == 2 else "other",
    ),
    "scale_by_dog (DoG)": lambda: optim.contrib.dog(),
    "scale_by_dowg (DoWG)": lambda: optim.contrib.dowg(),
    "prodigy": lambda: optim.contrib.prodigy(),
    "dadapt_adamw (D-Adaptation)": lambda: optim.contrib.dadapt_adamw(),
    "mechanize (Mechanic)": lambda: optim.contrib.mechanize(optim.sgd(0.1)),
    "momo": lambda: optim.contrib.momo(),
    "momo_adam": lambda: optim.contrib.momo_adam(),
    "normalize (SAM)": lambda: optim.chain(optim.contrib.normalize(), optim.sgd(0.1)),
}


@pytest.mark.parametrize("kind", ["zero1", "zero3"])
@pytest.mark.parametrize("rule", sorted(REFUSED))
def test_rules_that_need_whole_tensors_are_refused_naming_the_rule(kind, rule):
    mode = {"zero1": "ZeRO-1", "zero3": "ZeRO-3"}[kind]
    with pytest.raises(optim.ShardingError, match=f"^{rule.replace('(', r'[(]').replace(')', r'[)]')} cannot run under {mode}"):
        _train(_sharded(kind, REFUSED[rule]()), distributed.make_data_parallel_step(_loss), steps=1)
    # Without sharding the same rule runs (Polyak and Momo read the loss: given as value=).
    tx, params = REFUSED[rule](), dict(_model().named_parameters())
    updates, _ = tx.update(tree.map(torch.ones_like, params), tx.init(params), params, value=torch.tensor(1.0))
    assert tree.all_finite(updates)


# Every optimizer create_optimizer builds, by name: exact on shards, or refused by the rule that cannot be.
REFUSED_BY_NAME = {
    "adafactor": "scale_by_factored_rms (Adafactor)", "lbfgs": "scale_by_lbfgs (L-BFGS)", "muon": "scale_by_muon (Muon)",
    "noisy_sgd": "add_noise", "novograd": "scale_by_novograd (NovoGrad)", "sm3": "scale_by_sm3 (SM3)",
}


@pytest.mark.parametrize("name", optim.optimizer_names())
def test_every_named_optimizer_is_exact_on_shards_or_refused(name):
    def tx():
        return optim.create_optimizer(name, learning_rate=1e-2, weight_decay=0.1)

    plain = _train(TrainState.create(model=_model(), tx=tx(), seed=1), make_train_step(_loss), steps=2)
    for kind in ("zero1", "zero3"):
        if name in REFUSED_BY_NAME:
            with pytest.raises(optim.ShardingError, match=f"^{REFUSED_BY_NAME[name].replace('(', r'[(]').replace(')', r'[)]')} cannot run"):
                _train(_sharded(kind, tx()), distributed.make_data_parallel_step(_loss), steps=2)
        else:
            sharded = _train(_sharded(kind, tx()), distributed.make_data_parallel_step(_loss), steps=2)
            assert tree.allclose(sharded.params, plain.params, rtol=1e-6, atol=1e-7), kind


def test_fully_sharded_step_in_one_process_equals_the_plain_step():
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
    plain = _train(TrainState.create(model=_model(), tx=tx, seed=1), make_train_step(_loss, accum_steps=2))
    for donate in (False, True):
        sharded = _train(distributed.fully_shard(TrainState.create(model=_model(), tx=tx, seed=1)),
                         distributed.make_data_parallel_step(_loss, accum_steps=2, donate=donate))
        assert tree.equal(sharded.params, plain.params)
        assert tree.equal(distributed.gather_state(sharded).opt_state, plain.opt_state)
    assert distributed.is_fully_sharded(sharded) and not distributed.is_fully_sharded(plain)


def test_fully_shard_errors_say_what_to_do():
    with pytest.raises(ValueError, match="already data-parallel"):
        distributed.fully_shard(TrainState.create(model=_model(), tx=distributed.data_parallel(optim.sgd(0.1))))
    with pytest.raises(TypeError, match="state.tx must be an optimizer"):
        distributed.fully_shard(TrainState.create(model=_model(), tx=None))
    scalar = TrainState.create(apply_fn=lambda p, x: x * p["t"], params={"t": torch.tensor(2.0)}, tx=optim.sgd(0.1))
    with pytest.raises(ValueError, match=r"parameter 't' is 0-d; .* Give it shape \(1,\)"):
        distributed.fully_shard(scalar)
    with pytest.raises(TypeError, match="mesh must be a"):
        distributed.fully_shard(TrainState.create(model=_model(), tx=optim.sgd(0.1)), mesh="cpu")
    sharded = distributed.fully_shard(TrainState.create(model=_model(), tx=optim.sgd(0.1)))
    with pytest.raises(ValueError, match="ShardedCheckpointManager"):
        distributed.save_checkpoint(None, 0, sharded)


def test_fully_sharded_state_saves_and_restores_in_one_process(tmp_path):
    tx = optim.apply_if_finite(optim.adamw(1e-2), 2)  # its state holds a bool tensor
    state = _train(distributed.fully_shard(TrainState.create(model=_model(), tx=tx, seed=1)), distributed.make_data_parallel_step(_loss))
    with distributed.ShardedCheckpointManager(tmp_path, keep_last=1) as ckpt:
        ckpt.save(3, state, metrics={"loss": 0.5})
        ckpt.save(4, state)
        assert ckpt.all_steps() == [4] and ckpt.latest_step() == 4
        back = ckpt.restore(distributed.fully_shard(TrainState.create(model=_model(), tx=tx, seed=7)))
        with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
            ckpt.restore(state, step=3)
    assert tree.equal(back.params, state.params) and tree.equal(back.opt_state.inner, state.opt_state.inner)
    assert back.opt_state.inner.last_finite.dtype == torch.bool and torch.equal(back.rng, state.rng)


def test_sharded_checkpoint_files_are_the_safetensors_torch_writes_streamed(tmp_path):
    """The streaming writer's file holds what torch's HuggingFaceStorageWriter would write (tensors and header metadata)."""
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from safetensors.torch import load_file

    from craftfn.distributed.sharded_checkpoint import _single_process_form, _to_state_dict

    tx = optim.apply_if_finite(optim.adamw(1e-2), 2)  # a bool tensor (as uint8), int counts, float moments
    state = _train(distributed.fully_shard(TrainState.create(model=_model(), tx=tx, seed=1)), distributed.make_data_parallel_step(_loss))
    with distributed.ShardedCheckpointManager(tmp_path / "ours") as ckpt:
        ckpt.save(1, state)
    (ours,) = (tmp_path / "ours" / "step_00000001").glob("*.safetensors")
    tensors, _, _ = _to_state_dict(_single_process_form(state))
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp_path / "torch"), save_distributed=True), no_dist=True)
    (theirs,) = (tmp_path / "torch").glob("*.safetensors")
    assert ours.name == theirs.name
    a, b = load_file(ours), load_file(theirs)
    assert sorted(a) == sorted(b) == sorted(tensors)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    with safe_open(ours, "pt") as f, safe_open(theirs, "pt") as g:
        assert f.metadata() == g.metadata()


def test_sharded_checkpoint_detects_an_altered_file_and_falls_back(tmp_path):
    state = distributed.fully_shard(TrainState.create(model=_model(), tx=optim.sgd(0.1, momentum=0.9), seed=1))
    ckpt = distributed.ShardedCheckpointManager(tmp_path, keep_last=None)
    ckpt.save(1, state)
    ckpt.save(2, state)
    shard = next((tmp_path / "step_00000002").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(craftfn.training.checkpointing.CorruptCheckpointError, match="sha256"):
        ckpt.restore(state)
    with pytest.warns(craftfn.training.checkpointing.CheckpointFallbackWarning, match="fell back to step 1"):
        restored = ckpt.restore(state, fallback=True)
    assert tree.equal(restored.params, state.params) and ckpt.all_steps() == [1]


def test_sharded_checkpoint_rejects_a_template_of_another_model(tmp_path):
    state = distributed.fully_shard(TrainState.create(model=_model(), tx=optim.sgd(0.1), seed=1))
    other = distributed.fully_shard(TrainState.create(model=torch.nn.Linear(4, 2), tx=optim.sgd(0.1), seed=1))
    ckpt = distributed.ShardedCheckpointManager(tmp_path)
    ckpt.save(1, state)
    with pytest.raises(craftfn.training.checkpointing.CheckpointMismatchError, match="missing from the checkpoint: params.bias"):
        ckpt.restore(other)


def test_global_batch_masks_equal_the_rows_of_one_process_draw():
    x = torch.ones(8, 3, 5)
    q = torch.randn(8, 2, 5, 4)
    with random.fork_torch_rng(random.key(1)):
        whole = (torch.nn.functional.dropout(x, 0.5), torch.nn.Dropout(0.3)(x), torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5))
    for rank in range(4):
        with random.fork_torch_rng(random.key(1)), distributed.global_batch_masks(rank, 4):
            rows = slice(2 * rank, 2 * rank + 2)
            mine = (torch.nn.functional.dropout(x[rows], 0.5), torch.nn.Dropout(0.3)(x[rows]),
                    torch.nn.functional.scaled_dot_product_attention(q[rows], q[rows], q[rows], dropout_p=0.5))
        for a, b in zip(mine, whole):
            assert torch.equal(a, b[rows])
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 2\)"), distributed.global_batch_masks(2, 2):
        pass
    # Keyed module randomness (what the steps use): each rank's block of the global batch's draw.
    with random.module_rng(random.key(2)):
        whole = (torch.nn.functional.dropout(x, 0.5), torch.nn.functional.dropout(x, 0.3))
    for rank in range(4):
        rows = slice(2 * rank, 2 * rank + 2)
        with random.module_rng(random.key(2)), distributed.global_batch_masks(rank, 4):
            mine = (torch.nn.functional.dropout(x[rows], 0.5), torch.nn.functional.dropout(x[rows], 0.3))
        for a, b in zip(mine, whole):
            assert torch.equal(a, b[rows])


def test_evaluator_split_over_threads_equals_one_process():
    """Two 'ranks' as threads: the all-reduce of the sums is a rendezvous; batches 0..4 are shared 3/2."""
    state = TrainState.create(model=_model(), tx=None, seed=0)
    eval_step = make_eval_step(lambda s, p, b, rng: {"loss": _loss(s, p, b, rng), "n_big": (b["x"] > 1).float().mean()})
    data = [{k: v[: 2 + i] for k, v in _batch(i).items()} for i in range(5)]
    want = Evaluator(eval_step, data).evaluate(state)
    barrier, vectors, results, calls = threading.Barrier(2), [None, None], [None, None], [[], []]

    def run(rank: int) -> None:
        def sum_over_ranks(v: torch.Tensor) -> torch.Tensor:
            vectors[rank] = v
            barrier.wait()
            return vectors[0] + vectors[1]

        def counting(s, b):
            calls[rank].append(int(b["x"].shape[0]))
            return eval_step(s, b)

        results[rank] = Evaluator(counting, data, split=EvalSplit(rank, 2, sum_over_ranks)).evaluate(state)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for got in results:
        assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want)
    assert calls == [[2, 4, 6], [3, 5, 2]]  # rank 1 repeats batch 0 with weight 0
    with pytest.raises(ValueError, match="rank must be in"):
        Evaluator(eval_step, data, split=EvalSplit(2, 2, lambda v: v))


def test_sharding_docstring_examples():
    globs = dict(vars(craftfn.optim.sharding), optim=optim, torch=torch)
    result = doctest.testmod(craftfn.optim.sharding, extraglobs=globs, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted >= 5, result
