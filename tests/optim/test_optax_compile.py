"""The optimizers added for optax parity trace under ``torch.compile(fullgraph=True)`` (no graph break,
no host sync) and the compiled update equals the eager one.

``backend="eager"`` runs Dynamo's tracing (where graph breaks are found) without inductor's code
generation, which is what costs tens of seconds per graph on CI's CPUs.
"""

from __future__ import annotations

import pytest
import torch
from test_aliases import ALIASES, _params

from craftfn import tree

# The rules this issue added (the earlier ones have their own compile tests).
NEW = [
    "adabelief", "adamaxw", "adan", "fromage", "lbfgs", "noisy_sgd", "novograd", "optimistic_gradient_descent",
    "optimistic_adam_v2", "polyak_sgd", "rprop", "signum", "sm3", "yogi", "amsgrad",
    "contrib.acprop", "contrib.ademamix", "contrib.simplified_ademamix", "contrib.adopt", "contrib.cocob",
    "contrib.dadapt_adamw", "contrib.dog", "contrib.dowg", "contrib.prodigy", "contrib.mechanize", "contrib.momo",
    "contrib.momo_adam", "contrib.madgrad", "contrib.sam", "contrib.schedule_free_sgd", "contrib.schedule_free_adamw",
    "contrib.dpsgd", "contrib.reduce_on_plateau", "contrib.muon",
]


@pytest.mark.parametrize("name", NEW)
def test_update_traces_with_fullgraph(name: str) -> None:
    tx = ALIASES[name][0]()
    params = _params()
    grads = tree.map(lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel())), params)
    value = torch.tensor(2.0)
    state = tx.init(params)
    # Two steps: the second sees a state that came out of an update (counts > 0).
    _, state = tx.update(grads, state, params, value=value)
    torch._dynamo.reset()
    compiled = torch.compile(lambda g, s, p, v: tx.update(g, s, p, value=v), backend="eager", fullgraph=True)
    expected = tx.update(grads, state, params, value=value)
    got = compiled(grads, state, params, value)
    assert tree.allclose(got, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
