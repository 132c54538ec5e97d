"""Run optax itself on the cases of optax_cases.py and store the parameter trajectories.

Run it in a side environment that has jax and optax (craftfn's own environment never needs them):

    python3 -m venv /tmp/sideenv-optax && /tmp/sideenv-optax/bin/pip install jax optax
    /tmp/sideenv-optax/bin/python tests/optim/reference/make_optax_reference.py

Writes optax_reference.npz next to this file: for each case, the parameters after the steps in
SNAPSHOTS (float32, one row per snapshot, leaves flattened in SHAPES order), the outcomes of the
programs of optax_programs.py, plus the optax and jax versions and optax's public names (for the names test).
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = pathlib.Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("optax_cases", HERE / "optax_cases.py")
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
_pspec = importlib.util.spec_from_file_location("optax_programs", HERE / "optax_programs.py")
programs = importlib.util.module_from_spec(_pspec)
_pspec.loader.exec_module(programs)


def run_program(source: str) -> dict:
    namespace = {"optax": optax, "jnp": jnp}
    exec(compile(source, "<optax program>", "exec"), namespace)
    return programs.flat_result(namespace["result"], lambda x: np.asarray(x, dtype=np.float32))


def run(case: str) -> np.ndarray:
    build, extras = cases.CASES[case]
    tx = build(optax)
    params = {k: jnp.asarray(v) for k, v in cases.initial_params().items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    rows = []
    for step in range(cases.STEPS):
        value, grads = cases.value_and_grad({k: np.asarray(v) for k, v in params.items()}, step)
        if "per_example" in extras:
            grads = cases.per_example(grads)
        kwargs = {"value": jnp.asarray(value, jnp.float32)} if "value" in extras else {}
        updates, state = update({k: jnp.asarray(v) for k, v in grads.items()}, state, params, **kwargs)
        params = optax.apply_updates(params, updates)
        if step + 1 in cases.SNAPSHOTS:
            rows.append(cases.flatten({k: np.asarray(v) for k, v in params.items()}))
    return np.stack(rows)


def public_names() -> dict:
    names = {}
    for label, module in (("optax", optax), ("optax.contrib", optax.contrib), ("optax.losses", optax.losses),
                          ("optax.schedules", optax.schedules), ("optax.tree_utils", optax.tree_utils)):
        names[label] = sorted(n for n in dir(module) if not n.startswith("_"))
    return names


def main() -> None:
    arrays = {}
    for case in cases.CASES:
        arrays[case] = run(case)
        print(f"{case}: done", file=sys.stderr)
    for name, source in programs.PROGRAMS.items():
        for path, value in run_program(source).items():
            arrays[f"program:{name}:{path}"] = value
    meta = {"optax": optax.__version__, "jax": jax.__version__, "numpy": np.__version__, "names": public_names(),
            "cases": list(cases.CASES), "snapshots": list(cases.SNAPSHOTS)}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez_compressed(HERE / "optax_reference.npz", **arrays)


if __name__ == "__main__":
    main()
