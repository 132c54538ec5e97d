"""Five programs written against optax's API run with ``from craftfn import optim as optax`` and
``import torch as jnp`` and nothing else changed, and end where optax itself ends them.

The programs (tests/optim/reference/optax_programs.py) were run unchanged under jax + optax by the
reference generator; their outcomes are stored in optax_reference.npz.
"""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve().parent / "reference"
_spec = importlib.util.spec_from_file_location("optax_programs", HERE / "optax_programs.py")
programs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(programs)
REFERENCE = np.load(HERE / "optax_reference.npz")

# The only lines that differ from the optax version of each program.
PORT_HEADER = "from craftfn import optim as optax\nimport torch as jnp\n"


@pytest.mark.parametrize("name", sorted(programs.PROGRAMS))
def test_optax_program_runs_unchanged_on_craftfn(name: str) -> None:
    namespace: dict = {}
    exec(compile(PORT_HEADER + programs.PROGRAMS[name], f"<port of {name}>", "exec"), namespace)
    ours = programs.flat_result(namespace["result"], lambda x: x.detach().float().numpy())
    expected = {k.split(":", 2)[2]: REFERENCE[k] for k in REFERENCE.files if k.startswith(f"program:{name}:")}
    assert sorted(ours) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_allclose(ours[path], value, rtol=1e-5, atol=1e-6, err_msg=f"{name}: {path}")
