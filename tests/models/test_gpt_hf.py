"""Hugging Face GPT-2 in and out (the `hf` extra, installed by `make test`): random GPT-2s built
from a GPT2Config (nothing is downloaded) convert to craftfn's GPT and back with the same logits
and the same greedy generations; `craftfn export --format hf` writes what AutoModelForCausalLM loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers  # the hf extra; `make test` installs it, so a missing package fails here

from craftfn import data
from craftfn.generation import generate_text_sampling
from craftfn.models import GPT, GPTConfig, from_hf_gpt2, to_hf_gpt2
from craftfn.models.gpt import config_from_hf_gpt2, state_dict_from_hf_gpt2, state_dict_to_hf_gpt2

TINY_GPT2 = dict(vocab_size=61, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None)


def random_gpt2(seed=0, **overrides):
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY_GPT2, **overrides})).eval()
    with torch.no_grad():  # HF initialises biases and LayerNorms to 0/1: randomise them so each conversion is checked
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def ids(batch=3, length=20, vocab=TINY_GPT2["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_hf_gpt2_to_craftfn_and_back_keeps_the_logits(activation):
    hf = random_gpt2(activation_function=activation)
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        ours = from_hf_gpt2(hf)
        assert ours.config.activation == {"gelu_new": "gelu_tanh", "gelu": "gelu"}[activation]
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        back = to_hf_gpt2(ours)
        torch.testing.assert_close(back(x).logits, expected, rtol=1e-5, atol=1e-5)
    assert back.config.activation_function == ("gelu_new" if activation == "gelu_new" else "gelu")


def test_the_activation_matters_gpt2_weights_need_tanh_gelu():
    # GPT-2 was trained with tanh GELU; the same weights under exact GELU give other logits.
    hf = random_gpt2()
    ours = from_hf_gpt2(hf)
    exact = GPT(GPTConfig(**{**ours.config.__dict__, "activation": "gelu"}))
    exact.load_state_dict(ours.state_dict())
    x = ids()
    with torch.no_grad():
        assert (exact(x) - hf(x).logits).abs().max() > 1e-4


def test_greedy_generations_are_identical():
    hf = random_gpt2(seed=5, initializer_range=0.3)  # larger weights: continuations that vary
    ours = from_hf_gpt2(hf)
    prompt = ids(batch=2, length=5, seed=4)
    with torch.no_grad():
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        mine = generate_text_sampling(ours, prompt, max_new_tokens=12, temperature=0.0)
        back = to_hf_gpt2(ours).generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(mine, theirs) and torch.equal(back, theirs)
    assert all(len(set(row[5:].tolist())) > 2 for row in theirs)  # real continuations, not one repeated token


def test_state_dict_conversion_transposes_the_conv1d_weights_only():
    hf = random_gpt2()
    ours = state_dict_from_hf_gpt2(hf.state_dict())
    assert torch.equal(ours["transformer.h.0.attn.c_attn.weight"], hf.state_dict()["transformer.h.0.attn.c_attn.weight"].t())
    assert torch.equal(ours["transformer.h.1.ln_2.bias"], hf.state_dict()["transformer.h.1.ln_2.bias"])
    back = state_dict_to_hf_gpt2(ours)
    assert set(back) == set(hf.state_dict())
    assert all(torch.equal(back[k], v) for k, v in hf.state_dict().items())
    # A bare GPT2Model's keys (no "transformer." prefix, no head) convert too.
    bare = state_dict_from_hf_gpt2(hf.transformer.state_dict())
    assert set(bare) == set(ours) and torch.equal(bare["lm_head.weight"], ours["transformer.wte.weight"])


@pytest.mark.parametrize(
    "field, value",
    [("layer_norm_epsilon", 1e-6), ("n_inner", 100), ("scale_attn_by_inverse_layer_idx", True), ("activation_function", "relu")],
)
def test_unsupported_gpt2_variants_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        config_from_hf_gpt2(transformers.GPT2Config(**{**TINY_GPT2, field: value}))


def test_export_hf_loads_in_auto_model_for_causal_lm(tmp_path, capsys):
    from craftfn.cli import main
    from craftfn.state import TrainState
    from craftfn.training.checkpointing import export_params

    # A run directory as craftfn train leaves it (weights + model_config.json), from a random model.
    config = GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_embd=32, activation="gelu_tanh")
    torch.manual_seed(0)
    model = GPT(config).eval()
    run = tmp_path / "run"
    run.mkdir()
    export_params(TrainState.create(model=model, tx=None), run / "model.safetensors")
    (run / "model_config.json").write_text(json.dumps(config.__dict__))
    tok = data.CharTokenizer("".join(chr(c) for c in range(32, 92)), [data.EOT])  # 60 characters + EOT = 61
    tok.save(run / "tokenizer.json")

    out = tmp_path / "hf"
    assert main(["export", "--format", "hf", str(run), str(out)]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x), rtol=1e-5, atol=1e-5)
    # The run's tokenizer goes along: AutoTokenizer encodes and decodes like craftfn's.
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "HELLO, WORLD 42!" + data.EOT
    assert hf_tok(text)["input_ids"] == tok.encode(text) and hf_tok.eos_token_id == tok.eot_id == 60
    assert hf_tok.decode(tok.encode(text)) == text
    # Exporting over a directory that holds something is refused: nothing the user made is lost.
    assert main(["export", "--format", "hf", str(run), str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
