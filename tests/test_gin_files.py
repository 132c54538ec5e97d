"""craftfn.gin_files: shipped configs by bare name, includes relative to the including file,
command-line bindings that beat scoped bindings, and gin values on the command line."""

from __future__ import annotations

from pathlib import Path

import gin
import pytest

from craftfn import gin_config, gin_files, gin_training
from craftfn.cli import _gin_value, parse_gin_arguments

del gin_config, gin_training  # imported to register create_optimizer, the schedules and GPTConfig

REPO_GIN = Path(__file__).resolve().parent.parent / "gin"


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@gin.configurable("probe", module="tests_gin_files")
def probe(value=0, names=()):
    return value, names


def test_shipped_configs_are_the_checkouts_gin_folder_when_run_from_source():
    assert gin_files.shipped_config_dir() == REPO_GIN
    names = dict(gin_files.list_configs())
    assert {"char_gpt.gin", "text_file_gpt.gin", "models/gpt_tiny.gin", "optim/adamw.gin", "schedules/wsd.gin"} <= set(names)
    assert names["models/gpt_tiny.gin"].startswith("A tiny GPT")


def test_a_bare_name_finds_a_shipped_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gin_files.find_config("char_gpt.gin") == REPO_GIN / "char_gpt.gin"
    assert gin_files.find_config("gin/optim/lion.gin") == REPO_GIN / "optim" / "lion.gin"  # the checkout's spelling
    (tmp_path / "char_gpt.gin").write_text("# mine\n")
    assert gin_files.find_config("char_gpt.gin") == tmp_path / "char_gpt.gin"  # a file the user names comes first


def test_a_missing_file_names_every_place_searched(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(gin_files.GinFileNotFoundError) as e:
        gin_files.find_config("nope.gin")
    message = str(e.value)
    assert "'nope.gin'" in message and str(REPO_GIN / "nope.gin") in message and "craftfn configs" in message


def test_includes_resolve_relative_to_the_including_file_at_any_depth(tmp_path, monkeypatch, caplog):
    # job.gin includes sub/a.gin, which includes b.gin next to itself (sub/b.gin), not the
    # b.gin in the working directory; a shipped config is found by its bare name.
    (tmp_path / "sub").mkdir()
    (tmp_path / "job.gin").write_text("include 'sub/a.gin'\ninclude 'models/gpt_tiny.gin'\nprobe.names = ('job',)\n")
    (tmp_path / "sub" / "a.gin").write_text("include 'b.gin'\n")
    (tmp_path / "sub" / "b.gin").write_text("probe.value = 2\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "b.gin").write_text("probe.value = 99\n")
    monkeypatch.chdir(elsewhere)
    gin_files.parse_config([tmp_path / "job.gin"], [])
    assert probe() == (2, ("job",))
    assert gin.query_parameter("GPTConfig.n_embd") == 16  # models/gpt_tiny.gin, shipped
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # gin's resource reader stays quiet


def test_a_missing_include_names_the_including_file_and_the_places_searched(tmp_path):
    (tmp_path / "job.gin").write_text("probe.value = 1\ninclude 'absent.gin'\n")
    with pytest.raises(OSError) as e:
        gin_files.parse_config([tmp_path / "job.gin"], [])
    message = str(e.value)
    assert "'absent.gin'" in message and str(tmp_path / "job.gin") in message and str(tmp_path / "absent.gin") in message


def test_a_command_line_binding_beats_the_scoped_bindings_of_a_file(tmp_path):
    (tmp_path / "replayed.gin").write_text(
        "probe.value = 1\nrun/probe.value = 2\nother/probe.value = 3\nrun/probe.names = ('x',)\n"
    )
    gin_files.parse_config([tmp_path / "replayed.gin"], ["probe.value = 7"])
    assert probe() == (7, ())
    with gin.config_scope("run"):
        assert probe() == (7, ("x",))  # the scoped value gave way; the other scoped binding stays
    with gin.config_scope("other"):
        assert probe()[0] == 7


def test_later_command_line_bindings_still_win_over_earlier_ones_scoped_or_not(tmp_path):
    (tmp_path / "replayed.gin").write_text("run/probe.value = 2\n")
    gin_files.parse_config([tmp_path / "replayed.gin"], ["probe.value = 7", "run/probe.value = 8"])
    with gin.config_scope("run"):
        assert probe()[0] == 8
    gin.clear_config()
    gin_files.parse_config([tmp_path / "replayed.gin"], ["run/probe.value = 8", "probe.value = 7\nprobe.names = ('a',)"])
    with gin.config_scope("run"):
        assert probe() == (7, ("a",))


@pytest.mark.parametrize(
    "typed, gin_text",
    [
        ("bias,ln_", "['bias', 'ln_']"),
        ("[bias, ln_]", "['bias', 'ln_']"),
        ("(bias,ln_)", "('bias', 'ln_')"),
        ("['bias', 'ln_']", "['bias', 'ln_']"),
        ("'bias,ln_'", "'bias,ln_'"),  # quoted: the user asked for one string
        ("1,2", "[1, 2]"),
        ("[@f(), %M]", "[@f(), %M]"),
        ("data/in.txt", "'data/in.txt'"),
        ("3e-4", "3e-4"),
    ],
)
def test_command_line_values_become_gin_lists_or_scalars(typed, gin_text):
    assert _gin_value(typed) == gin_text


def test_no_decay_typed_as_a_comma_list_reaches_the_optimizer_as_patterns():
    from craftfn import optim

    _, bindings = parse_gin_arguments(["train", "--gin.create_optimizer.no_decay=bias,ln_"])
    gin_files.parse_config([], ["create_optimizer.name = 'adamw'", "create_optimizer.learning_rate = 0.1", *bindings])
    assert gin.query_parameter("create_optimizer.no_decay") == ["bias", "ln_"]
    mask = optim.no_decay_mask(gin.query_parameter("create_optimizer.no_decay"))
    assert [mask(n, None) for n in ("h.0.attn.c_attn.bias", "h.0.ln_1.weight", "h.0.mlp.c_fc.weight")] == [False, False, True]


def test_a_comma_inside_one_no_decay_pattern_is_rejected():
    from craftfn import optim

    with pytest.raises(ValueError, match=r"'bias,ln_' contains a comma.*\['bias', 'ln_'\]"):
        optim.no_decay_mask("bias,ln_")
