"""craftfn as a user installs it: the wheel ships the gin configs, and a non-editable install in a
fresh virtual environment trains, evaluates and generates from an empty directory.

The fresh environment reuses this interpreter's installed dependencies (a .pth file naming its
site-packages: no download) and installs craftfn from a copy of the checkout with
``pip install --no-deps --no-build-isolation --no-index``, so it runs offline. The build needs
setuptools in this environment (the ``dev`` extra that ``make test`` installs has it).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis",
    ".ruff_cache", "out", "*.safetensors",
)


def _copy_checkout(dest: Path) -> Path:
    """The source tree without build outputs (setuptools builds in the source folder: not in the checkout)."""
    shutil.copytree(REPO, dest, ignore=_NOT_SOURCE)
    return dest


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME") and not k.startswith("PIP_")}
    return {**env, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "OMP_NUM_THREADS": "1", **extra}


def _require_setuptools() -> None:
    try:
        import setuptools  # noqa: F401
    except ImportError:  # pragma: no cover - make test installs it (dev extra)
        pytest.skip("setuptools is not installed here: the offline build cannot run (make test installs it with the dev extra)")


def _run(cmd, cwd, env, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_ships_every_gin_config_as_package_data(tmp_path):
    _require_setuptools()
    src = _copy_checkout(tmp_path / "src")
    proc = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", src],
                tmp_path, _clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("craftfn-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"craftfn/configs/{p.relative_to(REPO / 'gin').as_posix()}" for p in (REPO / "gin").rglob("*.gin")}
    assert shipped and shipped <= names, shipped - names
    # No top-level gin/ in the wheel: it would shadow the gin-config library.
    assert not [n for n in names if n.startswith("gin/")]
    packages = {str(p.parent.relative_to(REPO).as_posix()) for p in (REPO / "craftfn").rglob("__init__.py")}
    assert {f"{p}/__init__.py" for p in packages} <= names  # every subpackage, found (not hand-listed)


@pytest.mark.slow
def test_fresh_venv_install_trains_evaluates_and_generates_from_an_empty_directory(tmp_path):
    _require_setuptools()
    src = _copy_checkout(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, _clean_env()).stdout.strip())
    # Reuse this environment's dependencies (torch, gin, ...; pip and setuptools for the build): a
    # plain path, so this environment's own .pth files (an editable craftfn) are not processed.
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "craftfn_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    env = _clean_env()

    install = _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", src], tmp_path, env)
    assert install.returncode == 0, f"offline install of the checkout failed:\n{install.stdout[-2000:]}\n{install.stderr[-3000:]}"
    shutil.rmtree(src)  # the installed package must not need the checkout

    craftfn_cli = venv / "bin" / "craftfn"
    work = tmp_path / "empty"
    work.mkdir()
    # Where the fresh interpreter finds craftfn, without importing it (an import of torch costs ~4 s).
    where = _run([python, "-c", "import importlib.util; print(importlib.util.find_spec('craftfn').origin)"], work, env)
    assert where.stdout.strip() == str(site / "craftfn" / "__init__.py"), where.stdout + where.stderr

    version = _run([craftfn_cli, "--version"], work, env)
    assert version.returncode == 0 and version.stdout.startswith("craftfn "), version.stderr
    listing = _run([craftfn_cli, "configs"], work, env)
    assert listing.returncode == 0 and "char_gpt.gin" in listing.stdout, listing.stdout + listing.stderr
    assert f"(in {site / 'craftfn' / 'configs'})" in listing.stdout, listing.stdout  # the shipped configs, in the install

    # A few steps and a short sample: what is tested is that the installed package trains from an
    # empty directory (each step of char_gpt costs ~0.3 s, each sampled token ~25 ms here).
    train = _run([craftfn_cli, "train", "--gin_file", "char_gpt.gin", "--run_dir", "r", "--gin.MAX_STEPS=3", "--gin.train.sample_tokens=20"],
                 work, env, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "final validation loss" in train.stdout
    assert {"config.gin", "model.safetensors", "model_config.json", "tokenizer.json"} <= {p.name for p in (work / "r").iterdir()}

    evaluation = _run([craftfn_cli, "eval", "--run_dir", "r"], work, env)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "loss" in evaluation.stdout and "perplexity" in evaluation.stdout

    generated = _run([craftfn_cli, "generate", "--run_dir", "r", "--prompt", "def ", "--max_new_tokens", "20"], work, env)
    assert generated.returncode == 0, generated.stderr[-3000:]
    assert generated.stdout.startswith("def ") and len(generated.stdout.rstrip("\n")) > len("def ")
    assert sorted(p.name for p in work.iterdir()) == ["r"]  # nothing written outside the run directory
