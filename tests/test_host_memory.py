"""host_memory.keep_freed_memory: freed tensors' pages are reused (no page faults), results unchanged.

Every check runs in a fresh interpreter: the allocator setting is process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator (Linux)")


def _run(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


FAULTS = """
    import json, resource, sys, torch
    from craftfn import host_memory
    keep = sys.argv[1:] == [] and {keep}
    applied = host_memory.keep_freed_memory() if keep else False
    faults = []
    for _ in range(12):  # a 64 MB tensor filled and freed, as a step's new moments would be
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(16 << 20)
        t.fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({{"applied": applied, "keeping": host_memory.keeping_freed_memory(), "faults": faults}}))
"""


def test_freed_tensors_are_reused_without_page_faults():
    default = _run(FAULTS.format(keep=False))
    kept = _run(FAULTS.format(keep=True))
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    # glibc's default: a block this large is mmap'd fresh and unmapped on free, every time.
    assert not default["keeping"] and all(f >= pages * 0.9 for f in default["faults"][-4:]), default["faults"]
    # kept: once the heap has settled (the first few rounds may still grow it), the same
    # pages come back, already mapped.
    assert kept["applied"] and kept["keeping"]
    assert all(f < pages * 0.01 for f in kept["faults"][-4:]), kept["faults"]


TRAIN = """
    import hashlib, json, torch
    from craftfn import TrainState, host_memory, make_train_step, optim, tree
    from craftfn.models import GPT, GPTConfig, lm_loss
    if {keep}:
        assert host_memory.keep_freed_memory()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=64))
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    state = TrainState.create(model=model, tx=tx, seed=1)
    step = make_train_step(lm_loss)  # pure: a new state every step
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        x = torch.randint(0, 512, (8, 33), generator=g)
        state, metrics = step(state, {{"input_ids": x[:, :-1], "labels": x[:, 1:]}})
    digest = hashlib.sha256()
    for leaf in tree.leaves(state):
        digest.update(leaf.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    print(json.dumps({{"digest": digest.hexdigest(), "loss": float(metrics["loss"]), "keeping": host_memory.keeping_freed_memory()}}))
"""


def test_kept_memory_gives_bit_identical_training():
    default, kept = _run(TRAIN.format(keep=False)), _run(TRAIN.format(keep=True))
    assert kept["keeping"] and not default["keeping"]
    assert kept["digest"] == default["digest"] and kept["loss"] == default["loss"]


TRAINER = """
    import json, torch
    from craftfn import TrainState, host_memory, make_train_step, optim
    from craftfn.training import Trainer
    loss = lambda s, p, b, rng: torch.mean((s.apply(p, b["x"]) - b["y"]) ** 2)
    state = TrainState.create(model=torch.nn.Linear(2, 1), tx=optim.sgd(0.1))
    data = lambda step: {{"x": torch.ones(4, 2), "y": torch.zeros(4, 1)}}
    before = host_memory.keeping_freed_memory()
    Trainer(make_train_step(loss), data, max_steps=1, {kwargs}).fit(state)
    print(json.dumps({{"before": before, "after": host_memory.keeping_freed_memory()}}))
"""


@pytest.mark.parametrize("kwargs, expected", [("", True), ("keep_freed_memory=False", False)])
def test_trainer_keeps_freed_memory_unless_told_not_to(kwargs, expected):
    out = _run(TRAINER.format(kwargs=kwargs))
    assert out == {"before": False, "after": expected}


def test_switching_back_and_bad_argument():
    out = _run("""
        import json
        from craftfn import host_memory
        on = host_memory.keep_freed_memory()
        off = host_memory.keep_freed_memory(False)
        print(json.dumps({"on": on, "off": off, "now": host_memory.keeping_freed_memory()}))
    """)
    assert out == {"on": True, "off": False, "now": False}
    from craftfn import host_memory

    with pytest.raises(TypeError, match="enabled must be True or False"):
        host_memory.keep_freed_memory("yes")
