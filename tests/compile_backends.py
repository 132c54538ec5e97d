"""A torch.compile backend for tests: counts (and keeps) the graphs dynamo hands it.

Importable from any test module (tests/ is on sys.path through its conftest.py).
"""

from __future__ import annotations

import torch


class CountingBackend:
    """A torch.compile backend that counts (and keeps) the graphs it is given and runs them with ``inner``."""

    def __init__(self, inner: str = "aot_eager") -> None:
        self.inner = torch._dynamo.lookup_backend(inner)
        self.graphs = 0
        self.modules: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        self.modules.append(gm)
        return self.inner(gm, example_inputs)

    def targets(self, i: int = 0) -> set[str]:
        """The names of the functions graph ``i`` calls."""
        return {str(n.target) for n in self.modules[i].graph.nodes if n.op == "call_function"}
