"""Property-testing kit for update rules (public API): hypothesis strategies and laws.

Strategies (need ``hypothesis``: ``pip install 'craftfn[testing]'``):
    :func:`param_trees`, :func:`grads_like`.
Laws (plain functions that raise ``AssertionError`` with the leaf and the size of the difference):
    :func:`check_pure`, :func:`check_matches_torch`, :func:`check_state_stable`,
    :func:`check_injected_equivalent`, :func:`check_multisteps_equivalent`.

Example:
    >>> import torch
    >>> from hypothesis import given, settings
    >>> from craftfn import optim, testing
    >>> @settings(max_examples=5, deadline=None)
    ... @given(testing.param_trees().flatmap(lambda p: testing.grads_like(p).map(lambda g: (p, g))))
    ... def test_sgd_is_pure(pg):
    ...     params, grads = pg
    ...     testing.check_pure(optim.sgd(0.1, momentum=0.9), params, grads)
    >>> test_sgd_is_pure()
"""

from typing import Any

from craftfn.testing.laws import (
    check_injected_equivalent,
    check_matches_torch,
    check_multisteps_equivalent,
    check_pure,
    check_state_stable,
    default_params,
    random_grads,
)

__all__ = [
    "param_trees",
    "grads_like",
    "check_pure",
    "check_matches_torch",
    "check_state_stable",
    "check_injected_equivalent",
    "check_multisteps_equivalent",
    "default_params",
    "random_grads",
]


def __getattr__(name: str) -> Any:
    # The strategies import hypothesis; load them on first use so the laws work without it.
    if name in ("param_trees", "grads_like"):
        from craftfn.testing import strategies

        return getattr(strategies, name)
    raise AttributeError(f"module 'craftfn.testing' has no attribute {name!r}")
