"""CheckpointManager: round trips, atomicity under SIGKILL, corruption, retention, errors, exact resume."""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import math
import multiprocessing
import os
import random as pyrandom
import signal
import time
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

import craftfn
from craftfn import TrainState, make_train_step, optim, tree
from craftfn.data import random_window_batch
from craftfn.models import GPT, GPTConfig, lm_loss
from craftfn.state import DonatedStateError, check_live
from craftfn.training import checkpointing
from craftfn.training.checkpointing import (
    CheckpointFallbackWarning,
    CheckpointManager,
    CheckpointMismatchError,
    CorruptCheckpointError,
    export_params,
    load_exported,
    select_steps_to_keep,
)

VOCAB, BLOCK = 13, 8


def tiny_gpt(dropout: float = 0.0) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, n_embd=8, dropout=dropout))


def make_tx() -> optim.GradientTransformation:
    return optim.adamw(1e-2, weight_decay=0.1)


def gpt_state(dropout: float = 0.0, seed: int = 0) -> TrainState:
    return TrainState.create(model=tiny_gpt(dropout), tx=make_tx(), seed=seed)


TOKENS = torch.arange(200) * 7 % VOCAB


def batch_at(step: int) -> dict[str, torch.Tensor]:
    """Data as a pure function of (seed, step)."""
    return random_window_batch(TOKENS, batch_size=4, block_size=BLOCK, seed=3, step=step)


def same_leaves(a, b) -> bool:
    """Bit-identical leaves (dtype included), ignoring static fields."""
    la, lb = tree.leaves(a), tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb))


def mixed_tree() -> dict:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {
        "bf16": torch.linspace(-2, 2, 7, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "count": torch.tensor(7, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
        "transposed": base.t(),  # non-contiguous
        "view_a": base[0],  # shares storage with view_b
        "view_b": base[1:],
        "half": torch.ones(2, 2, dtype=torch.float16),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "label": "run-7",
        "lr_scale": 0.5,
    }


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_bit_exact_and_plain_safetensors(tmp_path, async_save):
    state = gpt_state(dropout=0.1)
    step = make_train_step(lm_loss)
    for i in range(2):
        state, _ = step(state, batch_at(i))
    with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(2, state, metrics={"loss": torch.tensor(1.25)}, extra={"gin_config": "a = 1", "tokenizer": {"kind": "char"}})
        template = gpt_state(dropout=0.1, seed=9)
        restored = ckpt.restore(template)
        assert same_leaves(restored, state)
        assert restored.apply_fn is template.apply_fn and restored.tx is template.tx
        assert isinstance(restored, TrainState) and int(restored.step) == 2
        meta = ckpt.metadata(2)
    assert meta["step"] == 2 and meta["metrics"] == {"loss": 1.25}
    assert meta["extra"] == {"gin_config": "a = 1", "tokenizer": {"kind": "char"}}
    assert meta["torch_version"] == torch.__version__ and meta["craftfn_version"] == craftfn.__version__
    # Readable by the safetensors library itself, keyed by tree path.
    path = tmp_path / "step_00000002" / "state.safetensors"
    plain = load_file(path)
    names = dict(tree.flatten_with_path(state)[0])
    assert set(plain) == set(names)
    assert {"step", "rng", "params.transformer.wte.weight"} <= set(plain)
    assert any(k.startswith("opt_state.") for k in plain)
    for k, v in plain.items():
        assert torch.equal(v, names[k]) and v.dtype == names[k].dtype
    with safe_open(path, "pt") as f:
        assert f.metadata()["format"] == "pt"


@pytest.mark.parametrize("async_save", [True, False])
def test_mixed_dtypes_views_and_scalars(tmp_path, async_save):
    value = mixed_tree()
    with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(5, value)
        template = tree.map(lambda x: torch.zeros_like(x) if isinstance(x, torch.Tensor) else x, value)
        template["label"], template["lr_scale"] = "", 0.0
        restored = ckpt.restore(template)
    assert restored["label"] == "run-7" and restored["lr_scale"] == 0.5
    for name in value:
        if isinstance(value[name], torch.Tensor):
            assert restored[name].dtype == value[name].dtype and torch.equal(restored[name], value[name]), name
            assert restored[name].is_contiguous()
    # Each restored leaf owns its memory: writing one leaves the others alone.
    restored["view_a"].fill_(100.0)
    assert torch.equal(restored["view_b"], value["view_b"])
    assert restored["view_a"].untyped_storage().nbytes() == 16


def test_streaming_in_many_chunks_with_overlapped_hashing(tmp_path, monkeypatch):
    """Tiny chunks force the multi-chunk read/write loops and the hashing thread on a small state."""
    monkeypatch.setattr(checkpointing, "_CHUNK", 40)
    value = mixed_tree()
    with CheckpointManager(tmp_path, async_save=True) as ckpt:
        ckpt.save(1, value)
        template = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for k, v in value.items()}
        restored = ckpt.restore(template)
    assert all(torch.equal(restored[k], v) for k, v in value.items() if isinstance(v, torch.Tensor))
    assert restored["label"] == "run-7"
    meta = json.loads((tmp_path / "step_00000001" / "meta.json").read_text())
    data = (tmp_path / "step_00000001" / "state.safetensors").read_bytes()
    assert meta["files"]["state.safetensors"]["xxh3_128"] == xxhash.xxh3_128(data).hexdigest()
    assert meta["files"]["state.safetensors"]["bytes"] == len(data) > 4 * 40
    corrupted = bytearray(data)
    corrupted[-3] ^= 0x10
    (tmp_path / "step_00000001" / "state.safetensors").write_bytes(bytes(corrupted))
    with CheckpointManager(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match="xxh3_128 checksum"):
        ckpt.restore(template)


@pytest.mark.parametrize("chunk", [40, 16 << 20])
def test_format_1_sha256_checkpoints_are_still_read_and_verified(tmp_path, monkeypatch, chunk):
    """A step written by format 1 (sha256 of state.safetensors in meta.json) restores bit-exactly; damage is caught."""
    monkeypatch.setattr(checkpointing, "_CHUNK", chunk)
    state = gpt_state()
    with monkeypatch.context() as old_writer:  # what craftfn wrote before xxh3: the same file, sha256 in meta.json
        old_writer.setattr(checkpointing, "_FILE_HASH", "sha256")
        old_writer.setattr(checkpointing, "FORMAT_VERSION", 1)
        with CheckpointManager(tmp_path, async_save=False) as ckpt:
            ckpt.save(1, state)
    step_dir = tmp_path / "step_00000001"
    meta = json.loads((step_dir / "meta.json").read_text())
    data = (step_dir / "state.safetensors").read_bytes()
    assert meta["format_version"] == 1
    assert meta["files"]["state.safetensors"] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with CheckpointManager(tmp_path) as ckpt:
        assert same_leaves(ckpt.restore(gpt_state(seed=1)), state)
        assert same_leaves(ckpt.restore(gpt_state(seed=1), donate=True), state)
    corrupted = bytearray(data)
    corrupted[len(data) // 2] ^= 0x04
    (step_dir / "state.safetensors").write_bytes(bytes(corrupted))
    with CheckpointManager(tmp_path) as ckpt, pytest.raises(CorruptCheckpointError, match="sha256 checksum"):
        ckpt.restore(gpt_state())


def test_async_save_copies_before_returning(tmp_path):
    """The caller may donate or mutate the state right after save returns."""
    state = gpt_state()
    expected = tree.clone(state)
    step = make_train_step(lm_loss, donate=True)
    with CheckpointManager(tmp_path, async_save=True) as ckpt:
        ckpt.save(0, state)
        for i in range(2):  # donated steps overwrite state's buffers in place while the write may still run
            state, _ = step(state, batch_at(i))
        restored = ckpt.restore(gpt_state())
    assert same_leaves(restored, expected)
    assert not same_leaves(restored, state)


def test_restore_into_a_meta_device_template_allocates_on_cpu(tmp_path):
    state = gpt_state()
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(0, state)
        with torch.device("meta"):  # no memory for the template's tensors
            model = tiny_gpt()
        template = TrainState.create(model=model, tx=make_tx())
        assert all(x.device.type == "meta" for x in tree.leaves(template.params))
        restored = ckpt.restore(template)
    assert all(x.device.type == "cpu" for x in tree.leaves(restored))
    assert same_leaves(restored, state)


def test_mismatch_error_lists_differing_keys(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"a": torch.ones(2), "b": torch.ones(3), "c": torch.ones(1, dtype=torch.float64), "gone": torch.ones(1)})
        with pytest.raises(CheckpointMismatchError) as info:
            ckpt.restore({"a": torch.ones(2), "b": torch.ones(4), "c": torch.ones(1), "new": torch.ones(1)})
    msg = str(info.value)
    assert "missing from the checkpoint: new" in msg
    assert "not the template: gone" in msg
    assert "b: checkpoint shape (3,), template shape (4,)" in msg
    assert "c: checkpoint dtype torch.float64, template dtype torch.float32" in msg
    assert "a:" not in msg
    assert isinstance(info.value, ValueError)


def test_loss_scaled_state_round_trip(tmp_path):
    from craftfn import precision

    scale = precision.DynamicLossScale(scale=1024.0, growth_interval=3).adjust(torch.tensor(False)).adjust(torch.tensor(True))
    state = precision.LossScaledTrainState.create(model=torch.nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9), loss_scale=scale)
    with CheckpointManager(tmp_path) as ckpt:
        ckpt.save(1, state)
        template = precision.LossScaledTrainState.create(
            model=torch.nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9), loss_scale=precision.DynamicLossScale(growth_interval=3)
        )
        restored = ckpt.restore(template)
        assert same_leaves(restored, state)
        assert restored.loss_scale.scale.item() == 512.0 and int(restored.loss_scale.counter) == 1
        with pytest.raises(CheckpointMismatchError, match=r"loss_scale.counter.*field\(s\) \['loss_scale'\]"):
            ckpt.restore(TrainState.create(model=torch.nn.Linear(3, 2), tx=optim.sgd(0.1, momentum=0.9)))


def test_restore_step_selection_and_errors(tmp_path):
    with CheckpointManager(tmp_path, keep_last=None, best_metric="acc", mode="max", async_save=False) as ckpt:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            ckpt.restore({"w": torch.zeros(1)})
        assert ckpt.latest_step() is None and ckpt.best_step() is None
        for s, acc in [(10, 0.5), (20, 0.9), (30, 0.7)]:
            ckpt.save(s, {"w": torch.full((1,), float(s))}, metrics={"acc": acc})
        assert ckpt.all_steps() == [10, 20, 30] and ckpt.latest_step() == 30 and ckpt.best_step() == 20
        assert ckpt.restore({"w": torch.zeros(1)}, step="best")["w"].item() == 20.0
        assert ckpt.restore({"w": torch.zeros(1)}, step=10)["w"].item() == 10.0
        assert ckpt.restore({"w": torch.zeros(1)}, step=torch.tensor(30))["w"].item() == 30.0
        with pytest.raises(FileNotFoundError, match=r"saved steps: \[10, 20, 30\]"):
            ckpt.restore({"w": torch.zeros(1)}, step=15)
        with pytest.raises(ValueError, match="'latest', 'best' or an int"):
            ckpt.restore({"w": torch.zeros(1)}, step="newest")
        with pytest.raises(ValueError, match="fallback"):
            ckpt.restore({"w": torch.zeros(1)}, step=10, fallback=True)
    # A new manager on the same directory sees the same steps and the same best.
    again = CheckpointManager(tmp_path, keep_last=None, best_metric="acc", mode="max")
    assert again.all_steps() == [10, 20, 30] and again.best_step() == 20
    again.close()
    with pytest.raises(RuntimeError, match="closed"):
        again.save(40, {"w": torch.zeros(1)})


def test_replacing_a_step(tmp_path):
    with CheckpointManager(tmp_path, async_save=True) as ckpt:
        ckpt.save(3, {"w": torch.zeros(2)})
        ckpt.save(3, {"w": torch.ones(2)})
        assert ckpt.all_steps() == [3]
        assert torch.equal(ckpt.restore({"w": torch.zeros(2)})["w"], torch.ones(2))
    assert sorted(os.listdir(tmp_path)) == ["step_00000003"]


def test_non_finite_metrics_and_stray_names(tmp_path):
    with CheckpointManager(tmp_path, best_metric="loss", keep_best=1, keep_last=1, async_save=False) as ckpt:
        ckpt.save(1, {"w": torch.zeros(1)}, metrics={"loss": 0.5})
        ckpt.save(2, {"w": torch.zeros(1)}, metrics={"loss": float("nan"), "acc": float("inf")})
        meta = ckpt.metadata(2)  # verifies the meta.json checksum and layout with NaN/inf inside
        assert math.isnan(meta["metrics"]["loss"]) and meta["metrics"]["acc"] == math.inf
        assert ckpt.all_steps() == [1, 2] and ckpt.best_step() == 1  # NaN is never the best
    (tmp_path / "step_00000009").write_text("a file, not a step directory")
    (tmp_path / "corrupt-step_00000007-abcd").mkdir()
    (tmp_path / "step_x").mkdir()
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)
    with pytest.raises(ValueError, match="keep_best"):
        CheckpointManager(tmp_path, keep_best=-1)
    with pytest.raises(ValueError, match="best_metric"):
        CheckpointManager(tmp_path, keep_best=1)
    with pytest.raises(ValueError, match="mode"):
        CheckpointManager(tmp_path, mode="lowest")
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        with pytest.raises(ValueError, match="step must be"):
            ckpt.save(-1, {"w": torch.zeros(1)})
        with pytest.raises(TypeError, match="step must be"):
            ckpt.save(1.5, {"w": torch.zeros(1)})
        with pytest.raises(TypeError, match="extra must be JSON"):
            ckpt.save(1, {"w": torch.zeros(1)}, extra={"f": object()})
        with pytest.raises(TypeError, match="'w.x' is a object"):
            ckpt.save(1, {"w": {"x": object()}})
        with pytest.raises(TypeError, match="complex128"):
            ckpt.save(1, {"w": torch.zeros(1, dtype=torch.complex128)})
        assert ckpt.all_steps() == []


# --------------------------------------------------------------------------------------------
# Atomicity, leftovers, errors
# --------------------------------------------------------------------------------------------


def test_leftovers_are_never_steps_and_are_cleaned(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"w": torch.ones(1)})
    # What a crash leaves: a half-written new step, and a half-deleted old one.
    half = tmp_path / f".tmp-step_00000002-{uuid.uuid4().hex}"
    half.mkdir()
    (half / "state.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / f".tmp-del-step_00000000-{uuid.uuid4().hex}").mkdir()
    ckpt = CheckpointManager(tmp_path)
    assert ckpt.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    ckpt.close()


def _sharded_manager(directory, keep_last):
    from craftfn.distributed import ShardedCheckpointManager

    return ShardedCheckpointManager(directory, keep_last=keep_last)


@pytest.mark.parametrize(
    "make", [lambda d, keep_last: CheckpointManager(d, async_save=False, keep_last=keep_last), _sharded_manager], ids=["plain", "sharded"]
)
def test_files_outside_the_naming_scheme_are_never_touched(tmp_path, make):
    # A user's own files in the folder, named like (but not as) the manager's temporaries and
    # steps: neither cleanup at construction nor retention may delete or count them.
    own = [".tmp-notes.txt", ".tmp-step_00000002-mine", ".tmp-old-step_1-abc", "step_5", "step_000000007", "corrupt-notes"]
    for name in own:
        (tmp_path / name).mkdir() if name.startswith("step_") else (tmp_path / name).write_text("mine")
    with make(tmp_path, keep_last=1) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, {"w": torch.ones(1)})
        assert ckpt.all_steps() == [3]
    assert sorted(os.listdir(tmp_path)) == sorted(own + ["step_00000003"])


def test_interrupted_replacement_is_recovered(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(4, {"w": torch.full((1,), 4.0)})
    # Crash after moving the old step 4 aside, before renaming its replacement in.
    os.replace(tmp_path / "step_00000004", tmp_path / f".tmp-old-step_00000004-{uuid.uuid4().hex}")
    (tmp_path / f".tmp-step_00000004-{uuid.uuid4().hex}").mkdir()
    with CheckpointManager(tmp_path) as ckpt:
        assert ckpt.all_steps() == [4]
        assert ckpt.restore({"w": torch.zeros(1)})["w"].item() == 4.0
    assert sorted(os.listdir(tmp_path)) == ["step_00000004"]


def _fill(steps: list[int], directory: Path, async_save: bool, **kwargs) -> CheckpointManager:
    ckpt = CheckpointManager(directory, async_save=async_save, **kwargs)
    for s in steps:
        ckpt.save(s, {"w": torch.full((4,), float(s))})
    ckpt.wait()
    return ckpt


def _snapshot_files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("async_save", [True, False])
def test_disk_full_mid_write_leaves_earlier_checkpoints_untouched(tmp_path, monkeypatch, async_save):
    ckpt = _fill([1, 2], tmp_path, async_save, keep_last=2)
    before = _snapshot_files(tmp_path)
    real_write = checkpointing._write_safetensors

    def full_disk(path, tensors, metadata):
        with open(path, "wb") as f:
            f.write(b"\x00" * 100)  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpointing, "_write_safetensors", full_disk)
    if async_save:
        ckpt.save(3, {"w": torch.full((4,), 3.0)})  # returns; the error comes with the next call
        with pytest.raises(OSError) as info:
            ckpt.wait()
    else:
        with pytest.raises(OSError) as info:
            ckpt.save(3, {"w": torch.full((4,), 3.0)})
    err = info.value
    assert err.errno == errno.ENOSPC
    assert "could not save step 3" in str(err) and "step_00000003" in str(err) and "No space left" in str(err)
    assert "state.safetensors" in err.filename
    assert _snapshot_files(tmp_path) == before  # nothing deleted by retention, no temp left
    assert sorted(os.listdir(tmp_path)) == ["step_00000001", "step_00000002"]
    # The error is raised once; the manager keeps working afterwards.
    monkeypatch.setattr(checkpointing, "_write_safetensors", real_write)
    ckpt.wait()
    ckpt.save(3, {"w": torch.full((4,), 3.0)})
    assert ckpt.all_steps() == [2, 3]
    ckpt.close()


@pytest.mark.parametrize("async_save", [True, False])
def test_permission_denied_on_rename(tmp_path, monkeypatch, async_save):
    ckpt = _fill([1], tmp_path, async_save, keep_last=1)
    before = _snapshot_files(tmp_path)
    real_replace = os.replace

    def deny(src, dst, *a, **k):
        if str(dst).endswith("step_00000002"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", deny)
    ckpt.save(2, {"w": torch.full((4,), 2.0)}) if async_save else None
    with pytest.raises(OSError, match="Permission denied") as info:
        ckpt.wait() if async_save else ckpt.save(2, {"w": torch.full((4,), 2.0)})
    assert info.value.errno == errno.EACCES and "could not save step 2" in str(info.value)
    assert _snapshot_files(tmp_path) == before
    monkeypatch.setattr(os, "replace", real_replace)
    assert ckpt.restore({"w": torch.zeros(4)})["w"][0].item() == 1.0
    ckpt.close()


def test_failed_replacement_keeps_the_old_step(tmp_path, monkeypatch):
    ckpt = _fill([3], tmp_path, False)
    before = _snapshot_files(tmp_path)
    real_replace = os.replace

    def fail_new_rename(src, dst, *a, **k):
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError(errno.EROFS, "Read-only file system", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", fail_new_rename)
    with pytest.raises(OSError, match="could not save step 3"):
        ckpt.save(3, {"w": torch.full((4,), 33.0)})
    monkeypatch.setattr(os, "replace", real_replace)
    assert _snapshot_files(tmp_path) == before
    assert ckpt.restore({"w": torch.zeros(4)})["w"][0].item() == 3.0
    ckpt.close()


def test_non_os_error_in_write_cleans_up(tmp_path, monkeypatch):
    ckpt = _fill([1], tmp_path, True)

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(checkpointing, "_write_safetensors", boom)
    ckpt.save(2, {"w": torch.zeros(4)})
    with pytest.raises(RuntimeError, match="boom"):
        ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["step_00000001"]
    ckpt.close()


def _make_read_only(directory: Path, monkeypatch) -> None:
    """Fault injection: creating, renaming or writing anything directly in ``directory`` fails with
    EACCES, as in a directory without write permission (which root would ignore: chmod cannot
    simulate it when the suite runs as root)."""
    directory = Path(directory).resolve()

    def inside(path) -> bool:
        return Path(os.fsdecode(path)).resolve().parent == directory

    def deny(path):
        raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))

    def guard(real, *path_args):
        def wrapper(*args, **kwargs):
            for i in path_args:
                if i < len(args) and isinstance(args[i], (str, bytes, os.PathLike)) and inside(args[i]):
                    deny(args[i])
            return real(*args, **kwargs)

        return wrapper

    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR) and inside(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wxa+") and inside(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, 0))
    monkeypatch.setattr(os, "replace", guard(os.replace, 0, 1))
    monkeypatch.setattr(os, "rename", guard(os.rename, 0, 1))
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


@pytest.mark.parametrize("async_save", [True, False])
def test_read_only_directory_gives_a_clear_error(tmp_path, monkeypatch, async_save):
    ckpt = _fill([1], tmp_path, async_save)
    before = _snapshot_files(tmp_path)
    _make_read_only(tmp_path, monkeypatch)
    with pytest.raises(OSError, match="could not save step 2") as info:
        ckpt.save(2, {"w": torch.zeros(4)})
        ckpt.wait()
    assert info.value.errno == errno.EACCES and str(tmp_path) in str(info.value)
    assert "earlier checkpoints are untouched" in str(info.value)
    monkeypatch.undo()
    assert _snapshot_files(tmp_path) == before
    assert ckpt.restore({"w": torch.zeros(4)})["w"][0].item() == 1.0
    ckpt.close()


def test_background_error_surfaces_on_save_restore_and_close(tmp_path, monkeypatch):
    ckpt = _fill([1], tmp_path, True)

    def fail(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(checkpointing, "_write_safetensors", fail)
    ckpt.save(2, {"w": torch.zeros(4)})
    with pytest.raises(OSError, match="could not save step 2.*Input/output error"):
        ckpt.save(3, {"w": torch.zeros(4)})  # the next save raises the previous write's error
    ckpt.save(4, {"w": torch.zeros(4)})
    with pytest.raises(OSError, match="could not save step 4.*Input/output error"):
        ckpt.restore({"w": torch.zeros(4)})
    ckpt.save(3, {"w": torch.zeros(4)})
    with pytest.raises(OSError, match="could not save step 3"):
        ckpt.close()


# --------------------------------------------------------------------------------------------
# Crash safety: SIGKILL a process that saves in a loop
# --------------------------------------------------------------------------------------------


def numbered_state(n: int) -> dict:
    """A state whose every leaf tells which step it belongs to."""
    return {
        "params": {"w": torch.full((64, 64), float(n)), "b": torch.full((17,), float(n), dtype=torch.bfloat16)},
        "opt_state": {"mu": torch.full((64, 64), -float(n)), "count": torch.tensor(n, dtype=torch.int64)},
        "step": torch.tensor(n, dtype=torch.int64),
    }


def _state_number(state: dict) -> int:
    n = int(state["step"])
    assert tree.equal(state, numbered_state(n)), f"checkpoint of step {n} mixes values of different steps"
    return n


def _saving_child(directory: str, async_save: bool, write_fd: int) -> None:
    torch.set_num_threads(1)
    ckpt = CheckpointManager(directory, keep_last=2, keep_best=1, best_metric="loss", async_save=async_save)
    n = (ckpt.latest_step() or 0) + 1
    while True:
        ckpt.save(n, numbered_state(n), metrics={"loss": float(n * 7919 % 13)})
        os.write(write_fd, f"{n}\n".encode())
        n += 1


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [True, False])
def test_sigkill_at_random_moments_never_loses_the_last_checkpoint(tmp_path, async_save):
    ctx = multiprocessing.get_context("fork")
    rng = pyrandom.Random(1234 + async_save)
    trials = 15
    killed_mid_save = 0
    for trial in range(trials):
        read_fd, write_fd = os.pipe()
        child = ctx.Process(target=_saving_child, args=(str(tmp_path), async_save, write_fd), daemon=True)
        child.start()
        os.close(write_fd)
        # Wait for a first completed save, then kill at a random moment of the following ones.
        buf = b""
        deadline = time.monotonic() + 30
        while b"\n" not in buf and time.monotonic() < deadline:
            chunk = os.read(read_fd, 64)
            if not chunk:  # the child died on its own
                break
            buf += chunk
        assert b"\n" in buf, "the child never saved"
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        while chunk := os.read(read_fd, 4096):
            buf += chunk
        os.close(read_fd)
        returned = [int(x) for x in buf.decode().split()]
        killed_mid_save += any(n.startswith(".tmp-") for n in os.listdir(tmp_path))
        ckpt = CheckpointManager(tmp_path, keep_last=2, keep_best=1, best_metric="loss", async_save=False)
        latest = _state_number(ckpt.restore(numbered_state(0)))
        # save(n) returned => step n is on disk (sync), or step n - 1 is (async: save(n) waited for it).
        assert latest >= returned[-1] - (1 if async_save else 0), (trial, latest, returned[-1:])
        assert latest <= returned[-1] + 1
        for s in ckpt.all_steps():  # every step directory present is complete and consistent
            assert _state_number(ckpt.restore(numbered_state(0), step=s)) == s
        assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]
        ckpt.close()
    # The child saves back to back, so most kills land inside a save (temporary directory present).
    assert killed_mid_save >= 1, "no kill landed inside a save: the test did not exercise atomicity"


# --------------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------------


def _saved_once(directory: Path) -> Path:
    with CheckpointManager(directory, async_save=False) as ckpt:
        ckpt.save(1, numbered_state(1), metrics={"loss": 0.5}, extra={"note": "x"})
    return directory / "step_00000001"


@settings(max_examples=25, deadline=None)
@given(
    filename=st.sampled_from(["state.safetensors", "meta.json"]),
    where=st.floats(0.0, 1.0, exclude_max=True),
    flip=st.integers(1, 255),
    truncate=st.booleans(),
)
def test_any_flipped_byte_or_truncation_is_detected(tmp_path_factory, filename, where, flip, truncate):
    step_dir = _saved_once(tmp_path_factory.mktemp("corrupt"))
    path = step_dir / filename
    data = bytearray(path.read_bytes())
    pos = int(where * len(data))
    if truncate:
        data = data[:pos]
    else:
        data[pos] ^= flip
    path.write_bytes(bytes(data))
    with CheckpointManager(step_dir.parent) as ckpt, pytest.raises(CorruptCheckpointError, match=filename):
        ckpt.restore(numbered_state(0))


@pytest.mark.parametrize("donate", [False, True])
def test_corruption_at_chosen_places(tmp_path, donate):
    step_dir = _saved_once(tmp_path / "a")
    state_file = step_dir / "state.safetensors"
    n = len(state_file.read_bytes())
    header = int.from_bytes(state_file.read_bytes()[:8], "little")
    for pos in [0, 3, 8, 8 + header - 1, 8 + header, n // 2, n - 1]:  # size, header, padding, data, last byte
        original = state_file.read_bytes()
        corrupted = bytearray(original)
        corrupted[pos] ^= 0x01
        state_file.write_bytes(bytes(corrupted))
        with CheckpointManager(tmp_path / "a") as ckpt, pytest.raises(CorruptCheckpointError, match="state.safetensors"):
            ckpt.restore(numbered_state(0), donate=donate)
        state_file.write_bytes(original)
    for cut in [0, 4, 8, n - 1]:
        original = state_file.read_bytes()
        state_file.write_bytes(original[:cut])
        with CheckpointManager(tmp_path / "a") as ckpt, pytest.raises(CorruptCheckpointError, match="state.safetensors"):
            ckpt.restore(numbered_state(0), donate=donate)
        state_file.write_bytes(original)
    meta_file = step_dir / "meta.json"
    text = meta_file.read_text()
    for altered in [text.replace('"loss": 0.5', '"loss": 0.25'), text.replace("  ", "   ", 1), text[:-1], text + " "]:
        meta_file.write_text(altered)
        with CheckpointManager(tmp_path / "a") as ckpt, pytest.raises(CorruptCheckpointError, match="meta.json"):
            ckpt.metadata(1)
    meta_file.write_text(text)
    (step_dir / "state.safetensors").unlink()
    with CheckpointManager(tmp_path / "a") as ckpt, pytest.raises(CorruptCheckpointError, match="missing"):
        ckpt.restore(numbered_state(0), donate=donate)


def test_fallback_skips_corrupt_latest_loudly(tmp_path, caplog):
    ckpt = _fill([1, 2, 3], tmp_path, False, keep_last=3)
    (tmp_path / "step_00000003" / "state.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="step_00000003"):
        ckpt.restore({"w": torch.zeros(4)})
    with pytest.warns(CheckpointFallbackWarning) as record, caplog.at_level("ERROR"):
        restored = ckpt.restore({"w": torch.zeros(4)}, step="latest", fallback=True)
    assert restored["w"][0].item() == 2.0
    messages = [str(w.message) for w in record]
    assert any("step 3" in m and "corrupt" in m and "state.safetensors" in m for m in messages)
    assert any("fell back to step 2" in m for m in messages)
    assert "corrupt" in caplog.text
    # The corrupt step is moved aside, so it is never taken as the newest again.
    assert ckpt.all_steps() == [1, 2]
    assert any(n.startswith("corrupt-step_00000003") for n in os.listdir(tmp_path))
    ckpt.save(4, {"w": torch.full((4,), 4.0)})
    assert ckpt.all_steps() == [1, 2, 4]
    # A template mismatch is not corruption: no fallback, no quarantine.
    with pytest.raises(CheckpointMismatchError):
        ckpt.restore({"w": torch.zeros(5)}, fallback=True)
    assert ckpt.all_steps() == [1, 2, 4]
    for s in [1, 2, 4]:
        (tmp_path / f"step_{s:08d}" / "meta.json").write_text("{}")
    with warnings.catch_warnings(), pytest.raises(CorruptCheckpointError, match="every one is corrupt"):
        warnings.simplefilter("ignore")
        ckpt.restore({"w": torch.zeros(4)}, fallback=True)
    ckpt.close()


# --------------------------------------------------------------------------------------------
# Donated restore: restore(..., donate=True) reads into the template's own memory
# --------------------------------------------------------------------------------------------


def _identity(params, x):
    return x


def w_state(value: float, n: int = 4) -> TrainState:
    return TrainState.create(apply_fn=_identity, params={"w": torch.full((n,), float(value))}, tx=optim.sgd(0.1))


def test_donated_restore_reads_into_the_template_and_uses_it_up(tmp_path):
    step = make_train_step(lm_loss, donate=True)
    state, _ = step(gpt_state(), batch_at(0))
    expected = tree.clone(state)
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, state)
        template = gpt_state(seed=5)
        memory = [x.data_ptr() for x in tree.leaves(template)]
        restored = ckpt.restore(template, donate=True)
        plain = ckpt.restore(restored)
    assert same_leaves(restored, expected)
    assert [x.data_ptr() for x in tree.leaves(restored)] == memory  # read into the template: no new tensors
    with pytest.raises(DonatedStateError):
        check_live(template, "template")
    # Without donate, nothing is shared with the template or between leaves.
    ptrs = [x.untyped_storage().data_ptr() for x in tree.leaves(plain)]
    assert len(set(ptrs)) == len(ptrs) and not set(ptrs) & set(memory)
    # The restored state is a live state like any other: a donated step reuses its memory in turn.
    continued, _ = step(restored, batch_at(1))
    reference, _ = step(expected, batch_at(1))
    assert same_leaves(continued, reference)


def test_donated_restore_gives_tied_and_strided_leaves_their_own_tensors(tmp_path):
    with CheckpointManager(tmp_path, async_save=False) as ckpt:
        ckpt.save(1, {"a": torch.full((3,), 1.0), "b": torch.full((3,), 2.0), "c": torch.arange(6.0).reshape(2, 3)})
        shared, base = torch.zeros(3), torch.zeros(3, 2)
        restored = ckpt.restore({"a": shared, "b": shared, "c": base.t()}, donate=True)
    assert restored["a"].tolist() == [1.0] * 3 and restored["b"].tolist() == [2.0] * 3
    assert torch.equal(restored["c"], torch.arange(6.0).reshape(2, 3))
    assert not shared.any() and not base.any()  # tied or non-contiguous: never read into


def test_donated_restore_of_damaged_mismatched_or_missing_checkpoints(tmp_path):
    with CheckpointManager(tmp_path / "none") as ckpt, pytest.raises(FileNotFoundError):
        ckpt.restore(template := w_state(0), donate=True)
    check_live(template, "template")  # nothing read: still usable
    ckpt = CheckpointManager(tmp_path / "run", async_save=False, keep_last=None)
    for s in [1, 2]:
        ckpt.save(s, w_state(s))
    with pytest.raises(CheckpointMismatchError, match="params.w"):
        ckpt.restore(template := w_state(0, n=5), donate=True)
    check_live(template, "template")  # a mismatch is found before anything is written
    assert not template.params["w"].any()
    state_file = tmp_path / "run" / "step_00000002" / "state.safetensors"
    data = bytearray(state_file.read_bytes())
    data[-1] ^= 0x10  # the last byte of w's data: read into the template before the checksum fails
    state_file.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="step_00000002"):
        ckpt.restore(template := w_state(0), donate=True)
    with pytest.raises(DonatedStateError):  # its memory holds the damaged bytes now
        check_live(template, "template")
    template = w_state(0)
    memory = template.params["w"].data_ptr()
    with pytest.warns(CheckpointFallbackWarning) as record:
        restored = ckpt.restore(template, fallback=True, donate=True)
    assert any("fell back to step 1" in str(w.message) for w in record)
    assert restored.params["w"].tolist() == [1.0] * 4 and restored.params["w"].data_ptr() == memory
    with pytest.raises(TypeError, match="donate must be a bool"):
        ckpt.restore(restored, donate="yes")
    ckpt.close()


# --------------------------------------------------------------------------------------------
# Retention
# --------------------------------------------------------------------------------------------


def test_select_steps_to_keep_examples():
    metrics = {1: 0.3, 2: 0.1, 3: float("nan"), 4: None, 5: 0.1, 6: 0.9}
    assert select_steps_to_keep(metrics, metrics, keep_last=2, keep_best=0) == {5, 6}
    assert select_steps_to_keep(metrics, metrics, keep_last=1, keep_best=2) == {6, 5, 2}  # ties: newer first
    assert select_steps_to_keep(metrics, metrics, keep_last=1, keep_best=1, mode="max") == {6}
    assert select_steps_to_keep(metrics, metrics, keep_last=None, keep_best=1) == set(metrics)
    assert select_steps_to_keep([], {}, keep_last=3, keep_best=3) == set()


metric_values = st.one_of(st.none(), st.just(float("nan")), st.floats(-10, 10, allow_nan=False), st.integers(-5, 5))


@settings(max_examples=25, deadline=None)
@given(
    saves=st.lists(metric_values, min_size=1, max_size=9),
    keep_last=st.integers(1, 3),
    keep_best=st.integers(0, 2),
    mode=st.sampled_from(["min", "max"]),
    gaps=st.lists(st.integers(1, 3), min_size=9, max_size=9),
)
def test_retention_keeps_newest_and_best(tmp_path_factory, saves, keep_last, keep_best, mode, gaps):
    directory = tmp_path_factory.mktemp("retention")
    ckpt = CheckpointManager(directory, keep_last=keep_last, keep_best=keep_best, best_metric="m", mode=mode, async_save=False)
    history: dict[int, object] = {}
    step = 0
    for value, gap in zip(saves, gaps):
        step += gap
        ckpt.save(step, {"w": torch.full((2,), float(step))}, metrics={} if value is None else {"m": value})
        history[step] = value
        present = ckpt.all_steps()
        on_disk = sorted(int(n[5:]) for n in os.listdir(directory) if n.startswith("step_"))
        assert present == on_disk
        assert len(present) <= keep_last + keep_best
        assert step in present  # the newest
        # The best K among every step ever saved (a deleted step was never among them when deleted).
        valid = [s for s, v in history.items() if v is not None and not (isinstance(v, float) and math.isnan(v))]
        sign = 1 if mode == "min" else -1
        best = sorted(valid, key=lambda s: (sign * history[s], -s))[:keep_best]
        assert set(best) <= set(present)
        assert set(sorted(history)[-keep_last:]) <= set(present)
        if keep_best:
            assert ckpt.best_step() == (best[0] if best else None)
    ckpt.close()


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


class _WithBuffers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 4)
        self.norm = torch.nn.BatchNorm1d(4)
        self.head = torch.nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("scratch", torch.zeros(3), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(x)))


@pytest.mark.parametrize("make_model", [tiny_gpt, _WithBuffers])
def test_export_params_loads_strictly_into_the_model(tmp_path, make_model):
    model = make_model()
    state = TrainState.create(model=model, tx=optim.sgd(0.1))
    x = torch.randint(0, 5, (4, 6))

    def loss_fn(s, p, b, rng):
        out = s.apply(p, b["x"]) if not isinstance(model, _WithBuffers) else s.apply(p, b["x"][:, 0])
        return out.float().pow(2).mean()

    state, _ = make_train_step(loss_fn)(state, {"x": x})
    path = tmp_path / "model.safetensors"
    keys = export_params(state, path, metadata={"note": "final"})
    loaded = load_file(path)
    # Tied weights once, under the name safetensors.torch.save_model keeps.
    save_model(model, str(tmp_path / "reference.safetensors"))
    assert set(keys) == set(loaded) == set(load_file(tmp_path / "reference.safetensors"))
    assert len(keys) == len(model.state_dict()) - 1  # one tied pair in each model
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["note"] == "final" and metadata["format"] == "pt"
    fresh = make_model()
    missing, unexpected = load_model(fresh, str(path), strict=True)  # safetensors' own strict loader
    assert not missing and not unexpected
    for name, p in fresh.named_parameters():
        assert torch.equal(p, state.params[name]), name
    for name, b in fresh.named_buffers():
        if name in state.buffers and name in loaded:
            assert torch.equal(b, state.buffers[name]), name
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors", "reference.safetensors"]


@pytest.mark.parametrize("layout", ["export_params", "save_model", "tied_under_each_name"])
def test_load_exported_takes_every_tied_layout_strictly(tmp_path, layout):
    model = tiny_gpt()
    path = tmp_path / "w.safetensors"
    if layout == "export_params":
        export_params(TrainState.create(model=model, tx=None), path)
    elif layout == "save_model":
        save_model(model, str(path))
    else:
        save_file({k: v.clone() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    fresh = GPT(model.config)
    load_exported(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert fresh.lm_head.weight is fresh.transformer.wte.weight  # still tied


def test_load_exported_names_missing_and_unexpected_keys(tmp_path):
    model = tiny_gpt()
    weights = {k: v.clone() for k, v in model.state_dict().items() if k != "transformer.ln_f.bias"}
    weights["extra.weight"] = torch.zeros(1)
    save_file(weights, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \['transformer.ln_f.bias'\], unexpected keys \['extra.weight'\]"):
        load_exported(tiny_gpt(), tmp_path / "w.safetensors")


def test_export_params_with_function_apply_fn(tmp_path):
    state = TrainState.create(apply_fn=lambda p, x: x @ p["w"], params={"w": torch.ones(2, 2)}, buffers={"n": torch.zeros(1)}, tx=None)
    assert export_params(state, tmp_path / "f.safetensors") == ["w", "n"]
    assert torch.equal(load_file(tmp_path / "f.safetensors")["w"], torch.ones(2, 2))


# --------------------------------------------------------------------------------------------
# Exact resume with a plain loop (the Trainer and CLI versions live in test_checkpointing_resume.py)
# --------------------------------------------------------------------------------------------


def _run(state: TrainState, start: int, stop: int, losses: list) -> TrainState:
    step = make_train_step(lm_loss, donate=True)
    for i in range(start, stop):
        state, metrics = step(state, batch_at(i))
        losses.append(metrics["loss"])
    return state


@pytest.mark.parametrize("async_save", [True, False])
def test_exact_resume_with_a_plain_loop(tmp_path, async_save):
    n = 3
    straight_losses: list = []
    straight = _run(gpt_state(dropout=0.1), 0, 2 * n, straight_losses)

    first_losses: list = []
    first = _run(gpt_state(dropout=0.1), 0, n, first_losses)
    with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
        ckpt.save(int(first.step), first, extra={"losses": [x.item() for x in first_losses]})
    del first  # "stop": nothing survives but the checkpoint
    with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
        resumed = ckpt.restore(gpt_state(dropout=0.1, seed=123))  # a fresh state with another seed
        logged = ckpt.metadata("latest")["extra"]["losses"]
    second_losses: list = []
    resumed = _run(resumed, int(resumed.step), 2 * n, second_losses)

    assert same_leaves(resumed, straight)
    assert torch.equal(torch.stack(first_losses + second_losses), torch.stack(straight_losses))
    assert logged == [x.item() for x in straight_losses[:n]]
    json.dumps(logged)
