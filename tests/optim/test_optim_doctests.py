"""The examples in the docstrings of craftfn.optim's rule modules run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from craftfn import optim, tree

MODULES = ["transforms", "adaptive", "clipping", "aliases", "fused", "orthogonal", "schedulefree"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(f"craftfn.optim.{name}")
    globs = dict(vars(module), optim=optim, torch=torch, tree=tree)
    result = doctest.testmod(module, extraglobs=globs, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
    assert result.failed == 0, f"{result.failed} docstring example(s) of craftfn.optim.{name} failed (see the output above)"
    assert result.attempted > 0
