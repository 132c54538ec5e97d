"""The examples in the docstrings of every craftfn module run and print what they say.

``craftfn.optim``'s rule modules are covered by ``tests/optim/test_optim_doctests.py``; ``craftfn.__main__``
is not imported (importing it runs the CLI). ``craftfn.distributed``'s examples run in this single process,
with no process group, as a user's one-process run does (collectives then leave values as they are).
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import sys
import types

import pytest
import torch

import craftfn
from craftfn import distributed, optim, random, struct, tree

OPTIM_COVERED = {
    f"craftfn.optim.{n}"
    for n in ("transforms", "adaptive", "clipping", "aliases", "fused", "orthogonal", "schedulefree")
}
MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(craftfn.__path__, "craftfn.")
    if m.name != "craftfn.__main__" and m.name not in OPTIM_COVERED
)
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def run_examples(module: types.ModuleType) -> doctest.TestResults:
    """Run ``module``'s examples, each in the namespace of a registered module, as in a user's script.

    ``doctest.testmod`` runs an example in a copy of ``module.__dict__`` whose ``__name__`` is still
    ``module``'s: ``torch.compile`` then looks the example's globals up in the real module and misses
    them. Here each example's namespace is the ``__dict__`` of a module of its own in ``sys.modules``.
    """
    extra = dict(
        craftfn=craftfn, optim=optim, torch=torch, tree=tree, random=random, struct=struct, distributed=distributed
    )
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in doctest.DocTestFinder().find(module, module.__name__, extraglobs=extra):
        name = f"_doctest_{test.name}"
        namespace = types.ModuleType(name)
        namespace.__dict__.update({k: v for k, v in test.globs.items() if k != "__name__"})
        test.globs = namespace.__dict__
        sys.modules[name] = namespace
        try:
            runner.run(test)
        finally:
            del sys.modules[name]
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = run_examples(importlib.import_module(name))
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed (see the output above)"


def test_the_walk_finds_the_subpackages() -> None:
    for name in (
        "craftfn.step",
        "craftfn.jit",
        "craftfn.training.trainer",
        "craftfn.distributed.collectives",
        "craftfn.optim.rules",
    ):
        assert name in MODULES
    assert not OPTIM_COVERED & set(MODULES)
