import dataclasses
from typing import NamedTuple

import pytest
import torch

from craftfn import struct, tree


class Moments(NamedTuple):
    count: torch.Tensor
    mu: dict


def test_flatten_with_path_names_follow_named_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    params = dict(model.named_parameters())
    pairs, _ = tree.flatten_with_path(params)
    assert [n for n, _ in pairs] == sorted(n for n, _ in model.named_parameters())
    nested = {"opt": (Moments(torch.tensor(0), {"blocks.0.attn.weight": torch.ones(1)}),), "l": [torch.ones(1)]}
    assert tree.paths(nested) == ["l.0", "opt.0.count", "opt.0.mu.blocks.0.attn.weight"]


def test_flatten_unflatten_round_trip_and_none_is_empty():
    t = {"a": torch.ones(2), "b": None, "c": [torch.zeros(1), (torch.ones(3),)]}
    leaves, treedef = tree.flatten(t)
    assert len(leaves) == 3  # None is an empty subtree, not a leaf
    back = tree.unflatten(treedef, leaves)
    assert tree.equal(back, t)
    assert tree.structure(t) == treedef


def test_arithmetic_matches_leafwise_torch():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[3.0]], dtype=torch.float64)}
    b = {"x": torch.tensor([0.5, -1.0]), "y": torch.tensor([[2.0]], dtype=torch.float64)}
    assert tree.equal(tree.add(a, b), {"x": torch.tensor([1.5, 1.0]), "y": torch.tensor([[5.0]], dtype=torch.float64)})
    assert tree.equal(tree.sub(a, b), {"x": torch.tensor([0.5, 3.0]), "y": torch.tensor([[1.0]], dtype=torch.float64)})
    assert tree.equal(tree.scale(2.0, a), {"x": torch.tensor([2.0, 4.0]), "y": torch.tensor([[6.0]], dtype=torch.float64)})
    assert torch.allclose(tree.vdot(a, b), torch.tensor(0.5 - 2.0 + 6.0))
    assert torch.allclose(tree.global_norm(a), torch.tensor((1 + 4 + 9) ** 0.5))
    z = tree.zeros_like(a)
    assert all(torch.count_nonzero(x) == 0 for x in tree.leaves(z))
    assert z["y"].dtype == torch.float64


def test_global_norm_is_exact_for_many_dtypes_and_empty_tree():
    t = {"a": torch.full((3,), 2.0, dtype=torch.bfloat16), "b": torch.full((4,), 1.0)}
    assert torch.allclose(tree.global_norm(t), torch.tensor(4.0))
    assert tree.global_norm({}).item() == 0.0


def test_all_finite_detects_nan_and_inf_but_not_large_values():
    assert bool(tree.all_finite({"a": torch.tensor([1e38, -1e38])}))
    assert not bool(tree.all_finite({"a": torch.tensor([1.0]), "b": torch.tensor([float("inf")])}))
    assert not bool(tree.all_finite([torch.tensor([float("nan")], dtype=torch.bfloat16)]))


def test_cast_keeps_integer_leaves_and_allclose_checks_structure():
    t = {"w": torch.ones(2), "n": torch.tensor(3)}
    c = tree.cast(t, torch.bfloat16)
    assert c["w"].dtype == torch.bfloat16 and c["n"].dtype == torch.int64
    assert tree.allclose({"w": torch.ones(1)}, {"w": torch.ones(1) + 1e-7})
    assert not tree.allclose({"w": torch.ones(1)}, {"v": torch.ones(1)})
    assert not tree.allclose({"w": torch.ones(1)}, {"w": torch.ones(2)})


def test_group_by_device_dtype_partitions_and_aligns_lists():
    xs = [torch.ones(1), torch.ones(1, dtype=torch.bfloat16), torch.zeros(2), torch.ones(1, dtype=torch.float64)]
    ys = [torch.full_like(x, 7) for x in xs]
    groups = tree.group_by_device_dtype(xs, ys)
    seen = sorted(i for gx, _ in groups for i in gx.indices)
    assert seen == [0, 1, 2, 3]
    for gx, gy in groups:
        assert gx.indices == gy.indices
        assert all(t.dtype == gx.dtype for t in gx.tensors + gy.tensors)
    with pytest.raises(ValueError, match="list 1 has 1"):
        tree.group_by_device_dtype(xs, ys[:1])


def test_struct_dataclass_static_fields_and_replace():
    @struct.dataclass
    class Box:
        value: torch.Tensor
        label: str = struct.field(static=True, default="x")

    b = Box(torch.ones(1), label="y")
    leaves, treedef = tree.flatten(b)
    assert leaves == [b.value]
    rebuilt = tree.unflatten(treedef, [torch.zeros(1)])
    assert isinstance(rebuilt, Box) and rebuilt.label == "y" and rebuilt.value.item() == 0.0
    assert tree.structure(Box(torch.ones(1), label="z")) != treedef  # statics are part of the structure
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.value = torch.zeros(1)
    assert b.replace(value=torch.zeros(1)).label == "y"
    assert tree.paths({"box": b}) == ["box.value"]


def test_map_with_path_gives_names():
    out = tree.map_with_path(lambda name, x: name.endswith("bias"), {"fc": {"bias": torch.ones(1), "weight": torch.ones(1)}})
    assert out == {"fc": {"bias": True, "weight": False}}
