import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from craftfn import random


def test_keys_are_pinned_values():
    # The derivation is integer arithmetic on 32-bit words: the same on every platform and run.
    assert random.key(0).tolist() == [109451654, 3038669249]
    assert random.fold_in(random.key(0), 1).tolist() == random.fold_in(random.key(0), torch.tensor(1)).tolist()


def test_same_values_in_a_fresh_process():
    code = "from craftfn import random; print(random.uniform(random.fold_in(random.key(42), 7), (4,)).tolist())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    here = random.uniform(random.fold_in(random.key(42), 7), (4,)).tolist()
    assert out.strip() == str(here)


@given(st.integers(min_value=-(2**80), max_value=2**80), st.integers(min_value=2, max_value=16))
def test_split_keys_differ_from_each_other_and_parent(seed, num):
    k = random.key(seed)
    ks = random.split(k, num)
    rows = {tuple(r) for r in ks.tolist()}
    assert len(rows) == num
    assert tuple(k.tolist()) not in rows


def test_distinct_seeds_and_fold_in_data_give_distinct_keys():
    seeds = [0, 1, -1, 2, 2**32, 2**64, -(2**64), 2**70]
    keys = {tuple(random.key(s).tolist()) for s in seeds}
    assert len(keys) == len(seeds)
    k = random.key(0)
    folded = {tuple(random.fold_in(k, i).tolist()) for i in range(1000)}
    assert len(folded) == 1000
    assert tuple(random.split(k, 1)[0].tolist()) != tuple(random.fold_in(k, 0).tolist())


def test_sampling_is_deterministic_and_well_distributed():
    k = random.key(3)
    u = random.uniform(k, (50_000,))
    assert torch.equal(u, random.uniform(k, (50_000,)))
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    z = random.normal(k, (50_000,))
    assert abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1.0) < 0.03
    b = random.bernoulli(k, 0.25, (50_000,))
    assert b.dtype == torch.bool and abs(b.float().mean().item() - 0.25) < 0.01
    r = random.randint(k, (50_000,), -3, 4)
    counts = torch.bincount(r + 3, minlength=7).float()
    assert r.min() == -3 and r.max() == 3 and (counts / counts.sum() - 1 / 7).abs().max() < 0.01
    assert sorted(random.permutation(k, 20).tolist()) == list(range(20))


def test_generator_and_fork_torch_rng_are_keyed():
    k = random.key(5)
    a = torch.rand(3, generator=random.generator(k))
    b = torch.rand(3, generator=random.generator(k))
    assert torch.equal(a, b)
    before = torch.get_rng_state()
    with random.fork_torch_rng(k):
        x = torch.rand(3)
    with random.fork_torch_rng(k):
        y = torch.rand(3)
    assert torch.equal(x, y)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left as it was


def test_bad_keys_and_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="key must be a craftfn key"):
        random.uniform(torch.zeros(2), (1,))
    with pytest.raises(TypeError, match="seed must be a Python int"):
        random.key(1.5)
    with pytest.raises(ValueError, match="num must be a positive int"):
        random.split(random.key(0), 0)
    with pytest.raises(ValueError, match="high > low"):
        random.randint(random.key(0), (1,), 3, 3)
    with pytest.raises(TypeError, match="data must be"):
        random.fold_in(random.key(0), 1.5)
