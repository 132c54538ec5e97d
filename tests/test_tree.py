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


# ----------------------------------------------------------------------------- check_match


def test_check_match_names_the_leaf_and_both_shapes():
    params = {"fc": {"weight": torch.ones(1, 4), "bias": torch.ones(4)}}
    tree.check_match({"fc": {"weight": torch.zeros(1, 4), "bias": torch.zeros(4)}}, params)
    with pytest.raises(ValueError, match=r"leaf 'fc.weight': updates shape \(4, 1\), params shape \(1, 4\)"):
        tree.check_match({"fc": {"weight": torch.zeros(4, 1), "bias": torch.zeros(4)}}, params)
    with pytest.raises(ValueError, match=r"grads must have the same tree structure as params: missing \['fc.bias'\]"):
        tree.check_match({"fc": {"weight": torch.zeros(1, 4)}}, params, name="grads")


def test_check_match_dtype_rules_and_non_tensor_leaves():
    params = {"w": torch.ones(2)}
    tree.check_match({"w": torch.ones(2, dtype=torch.bfloat16)}, params)  # floating kind: cast later
    with pytest.raises(ValueError, match=r"updates dtype torch.int64, params dtype torch.float32 \(a floating dtype is needed\)"):
        tree.check_match({"w": torch.ones(2, dtype=torch.int64)}, params)
    with pytest.raises(ValueError, match=r"dtype torch.bfloat16, params dtype torch.float32"):
        tree.check_match({"w": torch.ones(2, dtype=torch.bfloat16)}, params, dtype="equal")
    tree.check_match({"w": torch.ones(2, dtype=torch.int64)}, params, dtype="any")
    with pytest.raises(ValueError, match=r"updates type float, params type tensor \(2,\)"):
        tree.check_match({"w": 1.0}, params)
    with pytest.raises(ValueError, match="dtype must be one of"):
        tree.check_match({"w": torch.ones(3)}, params, dtype="kind")


def test_check_match_reports_devices_and_a_custom_error_type():
    class MismatchError(ValueError):
        pass

    params = {"w": torch.ones(2)}
    with pytest.raises(MismatchError, match=r"updates device meta, params device cpu"):
        tree.check_match({"w": torch.ones(2, device="meta")}, params, error=MismatchError)
    tree.check_match({"w": torch.ones(2, device="meta")}, params, device=False)


def test_check_match_caches_passing_signatures_and_never_a_failure():
    tree._MATCH_CACHE.clear()
    params = {"w": torch.ones(2)}
    tree.check_match({"w": torch.ones(2, dtype=torch.bfloat16)}, params)
    assert len(tree._MATCH_CACHE) == 1  # dtypes differ, so the pair's signature is remembered
    tree.check_match({"w": torch.zeros(2, dtype=torch.bfloat16)}, params)  # other values, same signature
    assert len(tree._MATCH_CACHE) == 1
    tree.check_match({"w": torch.zeros(2)}, params)  # identical metadata: no entry needed
    assert len(tree._MATCH_CACHE) == 1
    for _ in range(2):  # a failing pair is never cached: it fails every time
        with pytest.raises(ValueError, match="shape"):
            tree.check_match({"w": torch.zeros(3, dtype=torch.bfloat16)}, params)
    assert len(tree._MATCH_CACHE) == 1


def test_check_match_structure_mismatch_deeper_reference():
    # The reference has a subtree where the checked tree has a leaf: a structure error, not a crash.
    with pytest.raises(ValueError, match="same tree structure"):
        tree.check_match({"a": torch.ones(1)}, {"a": {"b": torch.ones(1)}})
    with pytest.raises(ValueError, match="same tree structure"):
        tree.check_match([torch.ones(1), torch.ones(1)], [torch.ones(1)])


def test_leaf_mismatch_describes_or_returns_none():
    assert tree.leaf_mismatch(torch.zeros(2, 1), torch.zeros(1, 2)) == "shape (2, 1) vs (1, 2)"
    assert tree.leaf_mismatch(torch.zeros(2), torch.zeros(2)) is None
    assert tree.leaf_mismatch(torch.zeros(2, dtype=torch.float16), torch.zeros(2), dtype="equal") == "dtype torch.float16 vs torch.float32"


def test_check_match_traces_without_graph_breaks():
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(u, p):
        tree.check_match(u, p)
        return tree.map(lambda a, b: a + b, u, p)

    p = {"fc": {"weight": torch.ones(2, 3), "bias": torch.ones(3)}}
    torch._dynamo.reset()
    assert torch._dynamo.explain(f)(p, p).graph_break_count == 0
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    assert tree.equal(compiled(p, p), f(p, p))
    compiled(p, p)
    assert counter.frame_count == 1
    bad = {"fc": {"weight": torch.ones(3, 2), "bias": torch.ones(3)}}
    with pytest.raises(ValueError, match=r"leaf 'fc.weight'"):
        torch.compile(f, backend="eager")(bad, p)  # dynamo falls back to eager: the same message


def test_trusted_pair_is_checked_once_while_tracing(monkeypatch):
    # Each traced tree walk costs seconds of compile time: a pair an enclosing call checked (and
    # marked) is not flattened again inside the trace, fresh trees do not recompile, and an
    # unmarked pair is still checked (its mismatch raises).
    walks = []
    real_flatten = tree.flatten
    monkeypatch.setattr(tree, "flatten", lambda t: (walks.append(1), real_flatten(t))[1])

    def f(p, other):
        g = tree.map(lambda x: x * 2, p)
        tree.check_match(g, p)
        marked = tree._trust(g, p)
        try:
            tree.check_match(g, p)  # marked: free
            tree.check_match(other, p)  # not marked: checked
        finally:
            tree._untrust(marked)
        return g

    p = {"fc": {"weight": torch.ones(2, 3), "bias": torch.ones(3)}}
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    out = compiled(p, tree.clone(p))
    assert len(walks) == 2  # one flatten per checked pair (the reference goes through flatten_up_to)
    assert tree.equal(out, f(p, p)) and counter.frame_count == 1
    monkeypatch.setattr(tree, "flatten", real_flatten)  # dynamo guards on the counter's list
    torch._dynamo.reset()
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    compiled(p, tree.clone(p))
    compiled(tree.clone(p), tree.clone(p))
    assert counter.frame_count == 2 and tree._TRACE_TRUSTED == []
    bad = {"fc": {"weight": torch.ones(3, 2), "bias": torch.ones(3)}}
    torch._dynamo.reset()  # static shapes: the message is built while tracing
    with pytest.raises(ValueError, match=r"leaf 'fc.weight'"):
        torch.compile(_check_inside_trusted_scope, backend="eager")(p, bad)
    assert tree._TRACE_TRUSTED == []


def _check_inside_trusted_scope(p, other):
    g = tree.map(lambda x: x * 2, p)
    marked = tree._trust(g, p)
    try:
        tree.check_match(other, p)  # raises: the scope's finally may then run eagerly
    finally:
        tree._untrust(marked)
    return g


def _flatten_again_in_memo_scope(p):
    memo = tree._begin_treedef_memo()
    try:
        leaves, treedef = tree.flatten(p)  # a full flatten
        g = tree.unflatten(treedef, [x * 2 for x in leaves])  # its treedef is remembered
        first = tree.flatten(g)[0]  # read with the remembered treedef
        g["fc"]["bias"] = g["fc"]["bias"] + 1  # a leaf replaced: still read right
        second = tree.flatten(g)[0]
        g["fc"]["extra"] = torch.ones(1)  # the structure changed: flattened anew
        third, third_def = tree.flatten(g)
        fourth = tree.flatten({"w": leaves[0]})[0]  # another object: flattened anew
    finally:
        tree._end_treedef_memo(memo)
    return first, second, third, third_def.num_leaves, fourth


def test_traced_flatten_reuses_the_treedef_of_a_tree_seen_before(monkeypatch):
    # Each traced flatten that builds a treedef costs about a second of compile time at a 52-leaf
    # model: inside the memo scope a tree flattened or built earlier in the trace is read with
    # its treedef instead; changed trees still flatten to what an eager flatten gives.
    import optree
    from torch._dynamo.testing import CompileCounter

    full = []
    real = optree.tree_flatten
    monkeypatch.setattr(optree, "tree_flatten", lambda t, *a, **k: (full.append(1), real(t, *a, **k))[1])
    p = {"fc": {"weight": torch.ones(2, 3), "bias": torch.ones(3)}}
    torch._dynamo.reset()
    counter = CompileCounter()
    traced = torch.compile(_flatten_again_in_memo_scope, backend=counter, fullgraph=True)(p)
    assert len(full) == 3 and counter.frame_count == 1  # p, the changed g, the new dict
    eager = _flatten_again_in_memo_scope(p)
    assert traced[3] == eager[3] == 3
    for a, b in zip(traced[:3] + (traced[4],), eager[:3] + (eager[4],)):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    assert tree._TRACE_TREEDEFS == [] and tree._TRACE_TREEDEFS_ON == []


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(tree, extraglobs={"tree": tree, "torch": torch}, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 20
