"""The gin CLI: a tiny end-to-end run (TensorBoard tags, metrics.jsonl, config.gin, resume, eval)
and user errors (one paragraph on stderr, exit status 2, no traceback)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch

from craftfn.cli import main, parse_gin_arguments

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GIN = str(REPO / "gin" / "char_gpt.gin")
TEXT_GIN = str(REPO / "gin" / "text_file_gpt.gin")

# The default job shrunk to seconds: a tiny GPT, a small corpus, 10 steps.
TINY = [
    "--gin.MAX_STEPS=10",
    "--gin.warmup_cosine_decay.warmup_steps=2",
    "--gin.Trainer.eval_every=5",
    "--gin.Trainer.save_every=5",
    "--gin.GPTConfig.n_layer=1",
    "--gin.GPTConfig.n_head=2",
    "--gin.GPTConfig.n_embd=16",
    "--gin.BLOCK_SIZE=16",
    "--gin.lm_task.batch_size=8",
    "--gin.lm_task.eval_windows=16",
    "--gin.stdlib_corpus.max_bytes=20000",
    "--gin.train.sample_tokens=20",
    "--gin.train.tensorboard_every=1",
    "--gin.train.num_threads=1",
    "--gin_bindings",
    "train.console_every = 5",
]


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "craftfn", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_parse_gin_arguments_keeps_order_and_quotes_bare_words():
    rest, bindings = parse_gin_arguments(
        ["train", "--gin.A=1", "--gin_bindings", "B = 'x'", "--run_dir", "r", "--gin.PATH=data/in.txt", "--gin.C=@f()"]
    )
    assert rest == ["train", "--run_dir", "r"]
    assert bindings == ["A = 1", "B = 'x'", "PATH = 'data/in.txt'", "C = @f()"]


@pytest.mark.slow
def test_tiny_default_job_end_to_end_with_resume_and_eval(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    proc = run_cli("train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "final validation loss" in proc.stdout and "unigram entropy" in proc.stdout
    assert "sample after 10 steps" in proc.stdout
    assert "Traceback" not in proc.stderr

    for name in ("config.gin", "metrics.jsonl", "model.safetensors", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    config = (run_dir / "config.gin").read_text()
    assert "Trainer.max_steps = %MAX_STEPS" in config and "MAX_STEPS = 10" in config and "GPTConfig.n_embd = 16" in config

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss", "lr", "grad_norm", "throughput/tokens_per_sec", "mfu"} <= scalars
    assert {"config/text_summary", "samples/text_summary"} <= set(acc.Tags()["tensors"])
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))
    lrs = [e.value for e in acc.Scalars("lr")]
    assert lrs[1] > lrs[0] and lrs[-1] < max(lrs)  # warm-up then decay, read from the optimizer state

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [5, 10]
    weights = safetensors.torch.load_file(str(run_dir / "model.safetensors"))
    assert "lm_head.weight" in weights and "transformer.wte.weight" not in weights  # tied: stored once, as save_model does

    # Running again with more steps resumes from the checkpoint at step 10.
    proc = run_cli("train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY, "--gin.MAX_STEPS=14")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from the checkpoints" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 15))

    # craftfn eval reproduces the final evaluation of the run.
    status = main(["eval", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY, "--gin.MAX_STEPS=14"])
    assert status == 0
    out = capsys.readouterr().out
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert f"loss {final_eval['loss']:.4f}" in out


def _assert_one_paragraph_error(status, err, *needles):
    assert status == 2
    assert "Traceback" not in err
    text = err.strip()
    assert text and "\n\n" not in text and len(text.splitlines()) <= 6, err
    assert "error:" in text
    flat = " ".join(text.split())
    assert "In call to configurable" not in flat
    for needle in needles:
        assert needle in flat, text


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--gin_file", "no/such/job.gin"], ["no/such/job.gin", "not found"]),
        (["--gin_file", DEFAULT_GIN, "--gin.Trainer.max_stepz=3"], ["unknown gin binding", "max_stepz"]),
        (["--gin_file", DEFAULT_GIN, "--gin_bindings", "NoSuchThing.x = 1"], ["unknown gin binding", "NoSuchThing"]),
        (["--gin_file", TEXT_GIN], ["DATA_PATH", "required", "--gin.DATA_PATH="]),
        (["--gin_file", TEXT_GIN, "--gin.DATA_PATH=/no/such/file.txt"], ["/no/such/file.txt", "does not exist"]),
        (["--gin_file", DEFAULT_GIN, "--gin.MAX_STEPS=60", "--gin.WARMUP_STEPS=100"], ["warmup_steps=100", "decay_steps=60"]),
    ],
)
def test_user_errors_exit_2_with_one_paragraph(args, needles, tmp_path, capsys):
    status = main(["train", *args, "--run_dir", str(tmp_path / "run")])
    _assert_one_paragraph_error(status, capsys.readouterr().err, *needles)


def test_missing_required_parameter_is_a_user_error(tmp_path, capsys):
    job = tmp_path / "no_optimizer.gin"
    job.write_text("include 'gin/models/gpt_tiny.gin'\nlm_task.text = @stdlib_corpus()\nlm_task.model_config = @GPTConfig\n")
    status = main(["train", "--gin_file", str(job), "--run_dir", str(tmp_path / "run")])
    _assert_one_paragraph_error(status, capsys.readouterr().err, "train needs a value for", "optimizer")


def test_empty_data_file_is_a_user_error(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    status = main(["train", "--gin_file", TEXT_GIN, f"--gin.DATA_PATH={empty}", "--run_dir", str(tmp_path / "run")])
    _assert_one_paragraph_error(status, capsys.readouterr().err, str(empty), "empty")


def test_user_error_in_a_real_process_has_no_traceback(tmp_path):
    # The data file is read deepest in the build (inside gin configurables): the likeliest to leak a traceback.
    proc = run_cli("train", "--gin_file", TEXT_GIN, "--gin.DATA_PATH=/no/such/file.txt", "--run_dir", str(tmp_path / "run"))
    _assert_one_paragraph_error(proc.returncode, proc.stderr, "/no/such/file.txt", "does not exist")
    assert proc.stdout == ""


def test_eval_without_weights_is_a_user_error(tmp_path, capsys):
    status = main(["eval", "--gin_file", DEFAULT_GIN, "--run_dir", str(tmp_path / "nothing"), *TINY])
    _assert_one_paragraph_error(status, capsys.readouterr().err, "no model weights")


def test_text_file_job_trains_on_a_users_file(tmp_path):
    data = tmp_path / "input.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 40)
    status = main(["train", "--gin_file", TEXT_GIN, f"--gin.DATA_PATH={data}", "--run_dir", str(tmp_path / "run"), *TINY, "--gin.train.save_checkpoints=False"])
    assert status == 0
    vocab = json.loads((tmp_path / "run" / "tokenizer.json").read_text())
    assert "q" in json.dumps(vocab) and (tmp_path / "run" / "model.safetensors").is_file()


def test_resuming_with_a_different_model_is_a_user_error(tmp_path, capsys):
    run = ["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(tmp_path / "run"), *TINY, "--gin.MAX_STEPS=3", "--gin.Trainer.eval_every=3"]
    assert main(run) == 0
    capsys.readouterr()
    status = main([*run, "--gin.GPTConfig.n_embd=32", "--gin.MAX_STEPS=6"])
    _assert_one_paragraph_error(status, capsys.readouterr().err, "different model", "fresh --run_dir")


def test_step_options_from_gin_bf16_remat_donate(tmp_path, capsys):
    # Mixed precision, activation checkpointing and donation are gin bindings of `train`.
    run_dir = tmp_path / "run"
    status = main(
        [
            "train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY,
            "--gin.MAX_STEPS=4", "--gin.train.policy='bf16'", "--gin.train.remat='transformer.h.*'",
            "--gin.train.donate=True", "--gin.train.save_checkpoints=False",
        ]
    )
    out = capsys.readouterr().out
    assert status == 0
    config = (run_dir / "config.gin").read_text()
    assert "train.policy = 'bf16'" in config and "train.remat = 'transformer.h.*'" in config
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert "final validation loss" in out


# --------------------------------------------------------------------------------------------
# Configs by name, replayed configs, self-describing run directories (issue 14)
# --------------------------------------------------------------------------------------------

# TINY without its warm-up binding: the shipped default's warm-up must fit any run length.
TINY_MODEL = [a for a in TINY if "warmup_steps" not in a]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the default job, shared by the tests that read its run directory."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["train", "--gin_file", "char_gpt.gin", "--run_dir", str(run_dir), *TINY, "--gin.train.save_checkpoints=False"]) == 0
    return run_dir


def _operative(run_dir):
    return (run_dir / "config.gin").read_text()


@pytest.mark.parametrize("max_steps", [1, 20, 50])
def test_max_steps_alone_trains_any_run_length(max_steps, tmp_path):
    run_dir = tmp_path / "run"
    status = main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY_MODEL, f"--gin.MAX_STEPS={max_steps}",
                   "--gin.train.save_checkpoints=False", "--gin.train.sample_tokens=2"])
    assert status == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, max_steps + 1))
    # The warm-up (5% of the run: 0, 1, 2 steps) ends inside the run: the peak rate is reached.
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    assert max(lrs) == pytest.approx(3e-3)


def test_a_replayed_config_trains_with_the_command_line_override(tmp_path):
    # The replayed operative config binds every create_optimizer parameter inside the scope
    # `main`; the unscoped override on the command line must still be what trains.
    job = tmp_path / "job.gin"
    job.write_text("include 'char_gpt.gin'\ntrain.optimizer = @main/create_optimizer()\nmain/create_optimizer.name = 'adamw'\n")
    first, second = tmp_path / "first", tmp_path / "second"
    common = [*TINY_MODEL, "--gin.MAX_STEPS=2", "--gin.train.save_checkpoints=False", "--gin.train.sample_tokens=2"]
    assert main(["train", "--gin_file", str(job), "--run_dir", str(first), *common]) == 0
    assert "main/create_optimizer.name = 'adamw'" in _operative(first)
    assert main(["train", "--gin_file", str(first / "config.gin"), "--run_dir", str(second), "--gin.create_optimizer.name=lion",
                 "--gin.MAX_STEPS=3"]) == 0
    config = _operative(second)
    assert "main/create_optimizer.name = 'lion'" in config and "'adamw'" not in config and "MAX_STEPS = 3" in config
    records = [json.loads(line) for line in (second / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3]


def test_no_decay_typed_as_comma_list_on_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "--gin_file", DEFAULT_GIN, "--run_dir", str(run_dir), *TINY_MODEL, "--gin.MAX_STEPS=1",
                 "--gin.create_optimizer.no_decay=bias,ln_", "--gin.train.save_checkpoints=False"]) == 0
    assert "create_optimizer.no_decay = ['bias', 'ln_']" in _operative(run_dir)


def test_shipped_configs_by_name_from_another_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--gin_file", "text_file_gpt.gin", "--run_dir", "r"]) == 2  # found; DATA_PATH is required
    assert "DATA_PATH" in capsys.readouterr().err
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "char_gpt.gin" in out and "optim/adamw.gin" in out and "schedules/wsd.gin" in out


def test_version_flag(capsys):
    import craftfn

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"craftfn {craftfn.__version__}"


def test_run_directory_is_self_describing(tiny_run):
    from safetensors import safe_open

    from craftfn.models import GPT, GPTConfig

    described = json.loads((tiny_run / "model_config.json").read_text())
    with safe_open(str(tiny_run / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["model_config"]) == described
    # No craftfn code beyond the class: safetensors' own strict loader takes the file.
    with open(tiny_run / "model_config.json") as f:
        model = GPT(GPTConfig(**json.load(f)))
    missing, unexpected = safetensors.torch.load_model(model, str(tiny_run / "model.safetensors"), strict=True)
    assert not missing and not unexpected
    assert "world size 1" in _operative(tiny_run).splitlines()[0]


def test_run_files_respect_the_umask(tiny_run):
    # Every file of the run was created the way open() creates files (0o666 less the umask).
    probe = tiny_run / "probe"
    probe.write_text("")
    expected = probe.stat().st_mode & 0o777
    probe.unlink()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tiny_run.iterdir() if p.is_file()}
    assert {"config.gin", "tokenizer.json", "model_config.json", "model.safetensors", "metrics.jsonl"} <= set(modes)
    assert set(modes.values()) == {expected}, modes


def test_eval_replays_the_runs_config_and_takes_a_save_model_file(tiny_run, tmp_path, capsys):
    from craftfn.models import GPT, GPTConfig

    assert main(["eval", "--run_dir", str(tiny_run)]) == 0  # no --gin_file: the run's own config.gin
    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    assert f"loss {final['loss']:.4f}" in capsys.readouterr().out

    model = GPT(GPTConfig(**json.loads((tiny_run / "model_config.json").read_text())))
    safetensors.torch.load_model(model, str(tiny_run / "model.safetensors"))
    saved = tmp_path / "save_model.safetensors"
    safetensors.torch.save_model(model, str(saved))
    both = tmp_path / "both_names.safetensors"  # the layout older craftfn runs wrote
    safetensors.torch.save_file({k: v.clone() for k, v in model.state_dict().items()}, str(both))
    for weights in (saved, both):
        assert main(["eval", "--run_dir", str(tiny_run), "--checkpoint", str(weights)]) == 0
        assert f"loss {final['loss']:.4f}" in capsys.readouterr().out
        assert main(["generate", "--run_dir", str(tiny_run), "--checkpoint", str(weights), "--prompt", "def ",
                     "--max_new_tokens", "5", "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("def ")


def test_eval_without_a_config_is_a_user_error(tmp_path, capsys):
    status = main(["eval", "--run_dir", str(tmp_path / "nothing")])
    _assert_one_paragraph_error(status, capsys.readouterr().err, "no config.gin", "--gin_file")


def test_generate_takes_steps_per_call_with_the_same_text_and_refuses_zero(tiny_run, capsys):
    base = ["generate", "--run_dir", str(tiny_run), "--prompt", "def ", "--max_new_tokens", "7", "--temperature", "0"]
    texts = []
    for steps in (None, "1", "3"):
        assert main(base + ([] if steps is None else ["--steps_per_call", steps])) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0].startswith("def ") and texts[1] == texts[0] and texts[2] == texts[0]
    status = main(base + ["--steps_per_call", "0"])
    _assert_one_paragraph_error(status, capsys.readouterr().err, "steps_per_call must be a positive int", "0")
