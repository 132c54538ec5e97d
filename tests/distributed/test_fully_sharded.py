"""ZeRO-3 on DTensor over 2 and 4 CPU ranks (gloo): trajectories, memory, whole-tensor rules, sharded
checkpoints that reshard, and evaluation split across ranks. The ranks run zero3_worker.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402
import launcher  # noqa: E402
import zero3_worker  # noqa: E402

from craftfn import TrainState, distributed, make_eval_step, make_train_step, optim, tree  # noqa: E402
from craftfn.training import Evaluator  # noqa: E402

pytestmark = pytest.mark.slow

WORKER = str(Path(__file__).with_name("zero3_worker.py"))


def _train(tmp_path_factory, world: int, *flags: str) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp(f"zero3_{world}")
    ckpt = out / "ckpt"
    launcher.run(WORKER, ["train", str(out), "--ckpt", str(ckpt), *flags], world=world, timeout=150)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)], ckpt


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return _train(tmp_path_factory, 4, "--rules")


@pytest.fixture(scope="module")
def two(tmp_path_factory, four):
    """2 ranks train, then restore the checkpoint the 4 ranks wrote (one launch: start-ups cost ~6 s a rank)."""
    return _train(tmp_path_factory, 2, "--donated", "--restore-from", str(four[1]))


@pytest.fixture(scope="module")
def reference():
    """One process over the whole global batch: zero3_worker.STEPS (6) steps of clipped AdamW, dropout 0.3."""
    state = TrainState.create(model=dist_worker.make_model(zero3_worker.DROPOUT), tx=zero3_worker.clip_adamw(), seed=1)
    step = make_train_step(dist_worker.loss_fn)
    history = []
    for i in range(zero3_worker.STEPS):
        state, metrics = step(state, dist_worker.global_batch(i))
        history.append(dist_worker.host(metrics))
    return state, history


@pytest.mark.parametrize(("world", "donate"), [(2, False), (2, True), (4, False)])
def test_zero3_trajectory_equals_one_process_over_6_steps_with_dropout(request, reference, world, donate):
    results, _ = request.getfixturevalue({2: "two", 4: "four"}[world])
    ref_state, ref_history = reference
    run = results[0]["runs"][f"donate={donate}"]
    assert results[0]["world"] == world
    assert tree.allclose(run["params"], ref_state.params, rtol=1e-5, atol=1e-7)
    assert tree.allclose(run["opt_state"], ref_state.opt_state, rtol=1e-5, atol=1e-7)
    for got, want in zip(run["metrics"], ref_history, strict=True):
        assert got.keys() == want.keys()
        for k in want:  # loss over the global batch, grad_norm of the whole (averaged) gradient
            assert got[k] == pytest.approx(want[k], rel=1e-5), k
    # Every rank reports the same metrics.
    assert all(r["runs"][f"donate={donate}"]["metrics"] == run["metrics"] for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_zero3_each_rank_holds_1_over_n_of_params_grads_and_optimizer_state(request, world):
    results, _ = request.getfixturevalue({2: "two", 4: "four"}[world])
    for r in results:
        b = r["bytes"]
        assert b["params"] == b["whole_params"] // world
        assert b["grads"] == b["whole_params"] // world  # gradients come back reduce-scattered
        # AdamW's moments split in N; its step count (8 bytes) is kept by every rank.
        assert b["opt_state"] - 8 == (b["whole_opt_state"] - 8) // world


def _one_process(tx: optim.GradientTransformation, steps: int = 3) -> TrainState:
    state = TrainState.create(model=dist_worker.make_model(), tx=tx, seed=1)
    step = make_train_step(dist_worker.loss_fn)
    for i in range(steps):
        state, _ = step(state, dist_worker.global_batch(i))
    return state


@pytest.mark.parametrize("name", sorted(zero3_worker.whole_tensor_rules()))
def test_zero3_whole_tensor_rules_are_exact_on_shards(four, name):
    results, _ = four
    want = _one_process(zero3_worker.whole_tensor_rules()[name])
    assert tree.allclose(results[0]["runs"][name]["params"], want.params, rtol=1e-5, atol=1e-7)


def test_zero3_refuses_rules_that_need_whole_tensors_naming_them(four):
    refused = four[0][0]["refused"]
    assert refused["adafactor"] is not None and refused["adafactor"].startswith("scale_by_factored_rms (Adafactor) cannot run under ZeRO-3")
    assert refused["clip_by_block_rms"] is not None and refused["clip_by_block_rms"].startswith("clip_by_block_rms cannot run under ZeRO-3")


def test_checkpoint_written_by_four_ranks_restores_on_two_and_one_bit_exactly(four, two):
    results, ckpt = four
    final = results[0]["final"]
    on_two = [r["restore"] for r in two[0]]
    restored = on_two[0]["restored"]
    assert tree.paths(restored) == tree.paths(final)
    assert tree.equal(restored, final)  # step, params, buffers, optimizer state, key: bit for bit
    assert on_two[0]["local_rows"]["0.weight"] == (8, 4) and on_two[1]["local_rows"]["0.weight"] == (8, 4)
    assert on_two[0]["after"] is not None and int(on_two[0]["after"]["step"]) == zero3_worker.STEPS + 1
    # One process, no process group, a plain state.
    template = TrainState.create(model=dist_worker.make_model(zero3_worker.DROPOUT), tx=zero3_worker.clip_adamw(), seed=9)
    one = distributed.ShardedCheckpointManager(ckpt).restore(template)
    assert tree.equal(one.params, final["params"]) and tree.equal(one.opt_state, final["opt_state"])
    assert torch.equal(one.step, final["step"]) and torch.equal(one.rng, final["rng"])
    assert one.tx is template.tx


def test_sharded_checkpoint_ranks_write_only_their_own_shards(four):
    results, _ = four
    files = results[0]["ckpt_files"]
    by_rank = {info["rank"]: info["bytes"] for info in files.values()}
    assert sorted(by_rank) == [0, 1, 2, 3]
    whole = distributed.local_bytes(results[0]["final"]["params"]) + distributed.local_bytes(results[0]["final"]["opt_state"])
    for r in results:
        # What a rank wrote is what it holds (plus the safetensors header), never the whole state.
        assert by_rank[r["rank"]] <= r["state_bytes"] + 4096
        assert r["state_bytes"] < whole
    assert sum(by_rank.values()) >= whole


def test_evaluation_over_two_ranks_equals_one_process_and_splits_the_batches(two):
    results, _ = two
    fields = results[0]["final"]
    final = TrainState.create(model=dist_worker.make_model(zero3_worker.DROPOUT), tx=None).replace(**{**fields, "opt_state": None})
    want = Evaluator(make_eval_step(zero3_worker.mse_metrics), zero3_worker.eval_batches()).evaluate(final)
    for r in results:
        assert r["eval"].keys() == want.keys()
        for k in want:
            assert r["eval"][k] == pytest.approx(want[k], rel=1e-9), k
    # Rank 0 evaluates batches 0, 2, 4; rank 1 batches 1, 3 and repeats batch 0 with weight 0, so the
    # per-batch parameter gathers stay matched across ranks.
    assert results[0]["eval_calls"] == [8, 8, 6]
    assert results[1]["eval_calls"] == [4, 2, 8]
