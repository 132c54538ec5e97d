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


# ----------------------------------------------------------------------------- keyed module randomness


def test_keyed_dropout_stream_is_pinned_and_the_same_in_a_fresh_process():
    # Masks are a fixed function of the key: resumed runs and other machines draw the same ones.
    mask = (random.dropout(random.key(0), torch.ones(24), 0.5) != 0).int().tolist()
    assert mask == [0, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 1]
    code = (
        "import torch; from craftfn import random\n"
        "with random.module_rng(random.key(5)):\n"
        "    print(torch.nn.functional.dropout(torch.ones(64), 0.3).tolist(), torch.randn(8).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    with random.module_rng(random.key(5)):
        here = (torch.nn.functional.dropout(torch.ones(64), 0.3).tolist(), torch.randn(8).tolist())
    assert out.strip() == f"{here[0]} {here[1]}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keyed_dropout_keeps_1_minus_p_scales_the_rest_and_is_unbiased(p):
    x = torch.ones(200_000)
    y = random.dropout(random.key(3), x, p)
    kept = y != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.005
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    assert abs(y.mean().item() - 1.0) < 0.03


def test_keyed_dropout_edge_cases_and_errors():
    x = torch.randn(5)
    assert random.dropout(random.key(0), x, 0.0) is x
    assert random.dropout(random.key(0), x, 0.5, training=False) is x
    assert torch.equal(random.dropout(random.key(0), x, 1.0), torch.zeros(5))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\], got 1.5"):
        random.dropout(random.key(0), x, 1.5)
    with pytest.raises(TypeError, match="must be a Python float"):
        random.dropout(random.key(0), x, torch.tensor(0.5))
    with pytest.raises(TypeError, match="key must be a craftfn key"):
        random.dropout(torch.zeros(2), x, 0.5)
    with pytest.raises(TypeError, match="key must be a craftfn key"):
        random.module_rng(3)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a != 0) == (b != 0)).float().mean().item()


def test_masks_of_different_keys_and_successive_draws_are_independent():
    x = torch.ones(100_000)
    a, b = random.dropout(random.key(0), x, 0.5), random.dropout(random.key(1), x, 0.5)
    # Independent fair masks agree on half the elements, shifted or not (no key is a shifted
    # copy of another's stream).
    assert abs(_agreement(a, b) - 0.5) < 0.01
    assert abs(_agreement(a[1:], b[:-1]) - 0.5) < 0.01
    k1, k2 = random.split(random.key(0))
    assert abs(_agreement(random.dropout(k1, x, 0.5), random.dropout(k2, x, 0.5)) - 0.5) < 0.01
    with random.module_rng(random.key(0)):
        first, second = torch.nn.functional.dropout(x, 0.5), torch.nn.functional.dropout(x, 0.5)
    assert torch.equal(first, a) and abs(_agreement(first, second) - 0.5) < 0.01


def test_module_dropout_variants_draw_from_the_key():
    drop2d = torch.nn.Dropout2d(0.5)
    x = torch.ones(8, 16, 5, 5)
    with random.module_rng(random.key(2)):
        a = drop2d(x)
    with random.module_rng(random.key(2)):
        b = drop2d(x)
    assert torch.equal(a, b)
    # Channel-wise: each (sample, channel) plane is all kept or all dropped.
    per_channel = a.reshape(8, 16, 25)
    assert torch.equal(per_channel.amin(-1), per_channel.amax(-1))
    assert 0 < (per_channel[..., 0] == 0).float().mean().item() < 1
    # In eval mode (training=False) nothing is dropped and nothing is drawn.
    with random.module_rng(random.key(2)) as scope:
        assert torch.equal(drop2d.eval()(x), x)
    assert scope.offset == 0


def test_attention_dropout_is_keyed_and_equals_dropout_of_the_attention_weights():
    kq, kk, kv = random.split(random.key(4), 3)
    q, k, v = (random.normal(key, (2, 3, 6, 8)) for key in (kq, kk, kv))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    key = random.key(9)
    with random.module_rng(key):
        out = sdpa(q, k, v, dropout_p=0.3, is_causal=True)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    weights = torch.softmax((q @ k.transpose(-2, -1) / 8**0.5).masked_fill(~causal, float("-inf")), dim=-1)
    # The first draw of the scope: the same mask random.dropout draws from the key.
    assert torch.allclose(out, random.dropout(key, weights, 0.3) @ v, atol=1e-6)
    with random.module_rng(key):
        assert torch.equal(sdpa(q, k, v, dropout_p=0.0, is_causal=True), sdpa(q, k, v, is_causal=True))


def test_keyed_sampling_functions_inside_a_scope():
    with random.module_rng(random.key(6)):
        u, z = torch.rand(50_000), torch.randn(50_000, dtype=torch.float64)
        b = torch.bernoulli(torch.full((50_000,), 0.25))
        filled = torch.empty(50_000).uniform_(-2.0, 2.0)
        half = torch.rand(10_000, dtype=torch.bfloat16)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean().item() - 0.5) < 0.01
    assert z.dtype == torch.float64 and abs(z.mean().item()) < 0.03 and abs(z.std().item() - 1) < 0.03
    assert abs(b.mean().item() - 0.25) < 0.01
    assert filled.min() >= -2.0 and filled.max() < 2.0 and abs(filled.mean().item()) < 0.03
    assert half.max() < 1.0  # bf16 draws never round up to 1
    with random.module_rng(random.key(6)):
        assert torch.equal(torch.rand(50_000), u)


def test_other_random_functions_fall_back_to_a_keyed_seed_eagerly_and_restore_the_global_rng():
    before = torch.get_rng_state()
    with random.module_rng(random.key(8)):
        a = torch.randint(0, 1000, (16,))
    with random.module_rng(random.key(8)):
        b = torch.randint(0, 1000, (16,))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)


def test_keyed_draws_trace_without_reading_the_key():
    import craftfn

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def draw(key, x):
        with random.module_rng(key):
            return torch.nn.functional.dropout(x, 0.5, True)

    torch._dynamo.reset()
    compiled = craftfn.jit(draw, backend=backend)
    x = torch.ones(64)
    for seed in range(3):
        assert torch.equal(compiled(random.key(seed), x), draw(random.key(seed), x))
    assert len(graphs) == 1  # the key is a graph input: new keys neither break nor recompile
    with pytest.raises(Exception, match="randint is not keyed"):
        craftfn.jit(lambda key: _randint_in_scope(key), backend="eager")(random.key(0))


def _randint_in_scope(key):
    with random.module_rng(key):
        return torch.randint(0, 5, (3,))
