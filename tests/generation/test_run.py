"""`craftfn generate` and generate_from_run_dir on a run directory laid out as `craftfn train` writes it."""

import pytest
import safetensors.torch
import torch

from craftfn.cli import main
from craftfn.data import CharTokenizer
from craftfn.generation import TextGenerator
from craftfn.generation.run import generate_from_run_dir, load_run
from craftfn.models import GPT, GPTConfig

TEXT = "def f(x):\n    return x + 1\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16))
    # As the trainer exports it: the TrainState params (named_parameters: the tied head is not repeated).
    safetensors.torch.save_file({k: v.detach() for k, v in model.named_parameters()}, str(run / "model.safetensors"))
    tok.save(run / "tokenizer.json")
    (run / "config.gin").write_text("GPTConfig.n_embd = 16\nGPTConfig.n_head = 2\nGPTConfig.n_layer = 2\n")
    return run, model.eval(), tok


def test_load_run_restores_the_model(run_dir):
    run, model, tok = run_dir
    loaded, loaded_tok = load_run(run)
    assert loaded.config == model.config and loaded_tok == tok
    x = torch.tensor([tok.encode("def f")])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_generate_from_run_dir_and_cli(run_dir, capsys):
    run, model, tok = run_dir
    texts = generate_from_run_dir(run, "def", max_new_tokens=10, temperature=0.0)
    assert texts == TextGenerator(model, tok).generate("def", max_new_tokens=10, do_sample=False)
    assert main(["generate", "--run_dir", str(run), "--prompt", "def", "--max_new_tokens", "10", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == texts[0] + "\n"
    # Past the context (24) sampling slides the window; beams and samples print one block each.
    long = generate_from_run_dir(run, "def", max_new_tokens=40, top_k=5, num_samples=2, seed=1)
    assert len(long) == 2 and all(len(t) == 43 for t in long)
    assert main(["generate", "--run_dir", str(run), "--prompt", "x", "--max_new_tokens", "5", "--num_beams", "3", "--num_samples", "2"]) == 0
    assert capsys.readouterr().out.count("--- sample") == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", "def"], "not a directory"),
        (["--prompt", "Z"], "'Z'"),
        (["--prompt", "def", "--top_p", "0"], "top_p"),
        (["--prompt", "def", "--max_new_tokens", "-1"], "max_new_tokens"),
        (["--prompt", "def", "--num_beams", "2", "--num_samples", "3"], "num_return_sequences=3"),
    ],
)
def test_cli_user_errors_exit_2_with_one_paragraph(run_dir, capsys, args, message):
    run = run_dir[0] if message != "not a directory" else run_dir[0] / "missing"
    assert main(["generate", "--run_dir", str(run), *args]) == 2
    err = capsys.readouterr().err
    # The paragraph is wrapped at 100 columns, where the line breaks fall depends on the path's length.
    assert err.startswith("craftfn generate: error:") and message in " ".join(err.split()) and "Traceback" not in err
