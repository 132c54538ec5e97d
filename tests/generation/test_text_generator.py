"""TextGenerator: strings in and out over craftfn loops, and over Hugging Face generate (extra 'hf')."""

import pytest
import torch

from craftfn.data import ByteTokenizer, CharTokenizer
from craftfn.generation import TextGenerator, batch_generate, is_hf_model
from craftfn.models import GPT, GPTConfig

NEWLINE = 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=256, block_size=48, n_layer=2, n_head=2, n_embd=32)).eval()


def test_generate_strings_match_token_loops(model):
    tok = ByteTokenizer()
    gen = TextGenerator(model, tok)
    texts = gen.generate(["hello", "a"], max_new_tokens=6, do_sample=False)
    outs = batch_generate(model, [tok.encode("hello"), tok.encode("a")], max_new_tokens=6, temperature=0.0)
    assert texts == [tok.decode(o) for o in outs]
    assert gen.generate("hello", max_new_tokens=6, do_sample=False, return_full_text=False) == [texts[0][5:]]
    sampled = gen.generate("hello", max_new_tokens=6, temperature=1.0, num_return_sequences=3, seed=1)
    assert len(sampled) == 3 and len(set(sampled)) > 1 and all(s.startswith("hello") for s in sampled)
    assert sampled == gen.generate("hello", max_new_tokens=6, temperature=1.0, num_return_sequences=3, seed=1)
    beams = gen.generate(["hi", "hello"], max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert len(beams) == 4 and beams[0].startswith("hi") and beams[2].startswith("hello")


def test_stops_at_eos(model):
    tok = ByteTokenizer()
    free = TextGenerator(model, tok).generate("hello", max_new_tokens=8, do_sample=False)[0]
    eos_char = free[7]
    stopped = TextGenerator(model, tok, eos_token_id=ord(eos_char)).generate("hello", max_new_tokens=8, do_sample=False)[0]
    assert stopped == free[: free.index(eos_char, 5)]


def test_char_tokenizer_and_compile_option(model):
    tok = CharTokenizer.from_text("abcdefgh")
    small = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16))
    text = TextGenerator(small, tok).generate("abc", max_new_tokens=5, top_k=3, seed=0)[0]
    assert len(text) == 8 and set(text) <= set("abcdefgh")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompts": ""}, "prompt 0 must be a non-empty string"),
        ({"prompts": ["ok", ""]}, "prompt 1"),
        ({"prompts": []}, "at least one prompt"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"num_beams": 2, "num_return_sequences": 3}, "num_return_sequences=3 must be <= num_beams=2"),
        ({"do_sample": False, "num_return_sequences": 2}, "num_return_sequences=2 must be <= num_beams=1"),
        ({"prompts": "x" * 49, "max_new_tokens": 1}, "longer than the model's context of 48"),
    ],
)
def test_bad_input(model, kwargs, match):
    gen = TextGenerator(model, ByteTokenizer())
    kwargs = {"prompts": "hi", "max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        gen.generate(kwargs.pop("prompts"), **kwargs)


def test_bad_constructor_args(model):
    with pytest.raises(TypeError, match="tokenizer"):
        TextGenerator(model, object())
    with pytest.raises(TypeError, match="model"):
        TextGenerator("not a model", ByteTokenizer())
    assert not is_hf_model(model)


# --------------------------------------------------------------------------------------------
# Hugging Face models: a tiny GPT-2 from a config, random weights, nothing downloaded.


def _hf_copy_of(model):
    import transformers  # the hf extra; `make test` installs it, so a missing package fails here
    cfg = model.config
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
            n_head=cfg.n_head, activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=NEWLINE, eos_token_id=NEWLINE,
        )
    ).eval()
    # Same architecture, same parameter names; GPT-2's Conv1D stores its weights transposed.
    conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")
    state = {k: (v.t() if k.endswith(conv1d) else v) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    return hf


def test_hf_model_with_copied_weights_generates_the_same_text(model):
    hf = _hf_copy_of(model)
    assert is_hf_model(hf)
    x = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=1e-5)
    tok = ByteTokenizer()
    ours, theirs = TextGenerator(model, tok, eos_token_id=NEWLINE), TextGenerator(hf, tok, eos_token_id=NEWLINE)
    prompts = ["hello", "a", "def f"]
    # Greedy and beam search are deterministic: HF's generate must agree with craftfn's loops.
    assert theirs.generate(prompts, max_new_tokens=8, do_sample=False) == ours.generate(prompts, max_new_tokens=8, do_sample=False)
    beam = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=1.0, early_stopping=True)
    assert theirs.generate(prompts, **beam) == ours.generate(prompts, **beam)
    # Sampling options reach GenerationConfig: top_k=1 or a tiny top_p is greedy there too.
    greedy = theirs.generate(prompts, max_new_tokens=6, do_sample=False)
    assert theirs.generate(prompts, max_new_tokens=6, top_k=1, seed=3) == greedy
    assert theirs.generate(prompts, max_new_tokens=6, top_p=1e-6, seed=3) == greedy
    sampled = theirs.generate("hello", max_new_tokens=6, num_return_sequences=3, seed=4)
    assert sampled == theirs.generate("hello", max_new_tokens=6, num_return_sequences=3, seed=4)
    with pytest.raises(ValueError, match="longer than the model's context"):
        theirs.generate("x" * 49, max_new_tokens=1)


def test_steps_per_call_reaches_the_loops_and_keeps_the_tokens(model, monkeypatch):
    import craftfn.generation.text_generator as text_generator

    seen = []
    real = text_generator.batch_generate

    def spy(*args, **kwargs):
        seen.append(kwargs.get("steps_per_call"))
        return real(*args, **kwargs)

    monkeypatch.setattr(text_generator, "batch_generate", spy)
    tok = ByteTokenizer()
    outs = {}
    for steps in (None, 1, 3):
        gen = TextGenerator(model, tok, steps_per_call=steps)
        outs[steps] = (
            gen.generate(["hello", "a"], max_new_tokens=7, do_sample=False),
            gen.generate("hi", max_new_tokens=5, temperature=1.0, top_k=5, seed=2, num_return_sequences=2),
            gen.generate("hi", max_new_tokens=5, num_beams=3),
        )
    assert seen == [None] * 3 + [1] * 3 + [3] * 3  # greedy, sampled and beam calls all get it
    assert outs[1] == outs[None] and outs[3] == outs[None]
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match=rf"steps_per_call must be a positive int, got {bad!r}"):
            TextGenerator(model, tok, steps_per_call=bad)
