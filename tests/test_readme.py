"""Every ```python block in README.md runs, in order, in one namespace, as a user would paste them."""

import pathlib
import re
import sys
import types

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_examples():
    assert len(python_blocks()) >= 2


@pytest.mark.slow
def test_readme_code_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    # The blocks run in a module of their own, as a pasted script runs in __main__ (torch.compile
    # looks a compiled function's globals up through sys.modules[__name__]).
    module = types.ModuleType("__readme__")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace: dict = module.__dict__
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md block {i}", "exec"), namespace)
        except Exception as e:  # pragma: no cover - the message names the block
            raise AssertionError(f"README.md python block {i} failed: {e!r}\n{block}") from e
