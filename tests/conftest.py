"""Shared test configuration: bounded hypothesis runs (CI has 2 cores and a time budget)."""

import os
import tempfile

import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "craftfn",
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("thorough", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "craftfn"))

# Tests use tiny tensors: a second thread only adds synchronisation (measured ~10x slower
# per tiny step under load on the 2-core CI machine), and subprocess tests use the other core.
torch.set_num_threads(1)

# Token shards that tests build (craftfn.data.prepare_corpus, `lm_task.data`) go to a temporary
# folder, never to the user's ~/.cache; subprocesses inherit it.
if "CRAFTFN_CACHE_DIR" not in os.environ:
    os.environ["CRAFTFN_CACHE_DIR"] = tempfile.mkdtemp(prefix="craftfn-test-tokens-")
