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


# A quarter of the rules per trace: Dynamo's fixed cost per compile is small next to its cost per
# rule (~1 s each here), and four cases of ~10 s spread over pytest-xdist's workers where one of
# ~45 s held one worker alone.
GROUPS = 4


@pytest.mark.parametrize("group", range(GROUPS), ids=[f"group{g}" for g in range(GROUPS)])
def test_new_rules_trace_with_fullgraph_and_equal_eager(group: int) -> None:
    """One Dynamo trace over the updates of a group of the new rules: a graph break or host read in
    any of them fails it (Dynamo's error names the line); then each compiled update must equal its
    eager one. One trace per group instead of one per rule: Dynamo's fixed cost per compile was most
    of this test's time."""
    names = NEW[group::GROUPS]
    params = _params()
    grads = tree.map(lambda x: torch.randn(x.shape, generator=torch.Generator().manual_seed(x.numel())), params)
    value = torch.tensor(2.0)
    txs = {name: ALIASES[name][0]() for name in names}
    # The compiled step is the second: its state came out of an update (counts > 0).
    states = {name: tx.update(grads, tx.init(params), params, value=value)[1] for name, tx in txs.items()}
    expected = {name: tx.update(grads, states[name], params, value=value) for name, tx in txs.items()}
    torch._dynamo.reset()
    compiled = torch.compile(lambda g, ss, p, v: {name: tx.update(g, ss[name], p, value=v) for name, tx in txs.items()}, backend="eager", fullgraph=True)
    got = compiled(grads, states, params, value)
    differ = [name for name in names if not tree.allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, equal_nan=True)]
    assert not differ, f"compiled update differs from eager for {differ}"
