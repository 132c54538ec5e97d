"""Generate from a trained run directory (what ``craftfn generate`` calls).

A run directory of ``craftfn train`` holds ``model.safetensors`` (the weights, with the model
config in their metadata), ``model_config.json``, ``tokenizer.json`` and ``config.gin``. The model
is rebuilt from ``model_config.json`` (older runs: the weights' shapes and the ``GPTConfig.n_head``
binding in ``config.gin``, read as text: no gin import below the CLI).

Example:
    >>> generate_from_run_dir("runs/char_gpt", "def ", max_new_tokens=100)  # doctest: +SKIP
    ['def __init__(self, ...']
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional, Union

import safetensors
import safetensors.torch

from craftfn.data import load_tokenizer
from craftfn.generation.text_generator import TextGenerator
from craftfn.models import GPT, GPTConfig
from craftfn.training.checkpointing import load_exported

__all__ = ["load_model", "load_run", "generate_from_run_dir"]


def _n_head_from_gin(text: str) -> Optional[int]:
    match = re.search(r"^\s*GPTConfig\.n_head\s*=\s*(\S+)\s*$", text, re.MULTILINE)
    if not match:
        return None
    value = match.group(1)
    if value.startswith("%"):  # a macro: NAME = value elsewhere in the file
        macro = re.search(rf"^\s*{re.escape(value[1:])}\s*=\s*(\d+)\s*$", text, re.MULTILINE)
        value = macro.group(1) if macro else ""
    return int(value) if value.isdigit() else None


def _config_from_shapes(weights: dict[str, Any], run: Path) -> GPTConfig:
    """Runs written before model_config.json: the shape from the weights, the heads from config.gin."""
    n_head = _n_head_from_gin((run / "config.gin").read_text()) if (run / "config.gin").is_file() else None
    if n_head is None:
        raise ValueError(f"cannot find the number of heads: no model_config.json and no GPTConfig.n_head in {str(run / 'config.gin')!r}")
    embedding = weights.get("transformer.wte.weight", weights.get("lm_head.weight"))
    if embedding is None or "transformer.wpe.weight" not in weights:
        raise ValueError("the weights are not craftfn GPT weights (no transformer.wte/wpe)")
    vocab_size, n_embd = embedding.shape
    n_layer = len({k.split(".")[2] for k in weights if k.startswith("transformer.h.")})
    return GPTConfig(
        vocab_size=vocab_size, block_size=weights["transformer.wpe.weight"].shape[0], n_layer=n_layer,
        n_head=int(n_head), n_embd=n_embd, bias="transformer.ln_f.bias" in weights,
    )


def load_model(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None) -> GPT:
    """The trained ``GPT`` of a run directory, in eval mode.

    The model's config is ``run_dir/model_config.json``, else the one in the weights file's
    metadata (``craftfn train`` writes both), else (older runs) the shapes of the weights and
    the heads bound in ``config.gin``. The weights may store the tied embedding once
    (``safetensors.torch.save_model``) or under each name.

    Args:
        run_dir: the run directory.
        checkpoint: a safetensors file of model weights (default ``run_dir/model.safetensors``).

    Raises:
        ValueError: naming the missing or unreadable file.

    Example:
        >>> load_model("runs/char_gpt").config.n_layer  # doctest: +SKIP
        4
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run_dir {str(run)!r} is not a directory; train first (craftfn train --run_dir {run})")
    weights_path = Path(checkpoint) if checkpoint else run / "model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"no model weights at {str(weights_path)!r}; train first or pass --checkpoint")
    config_json = run / "model_config.json"
    described, source = (config_json.read_text(), str(config_json)) if config_json.is_file() else (None, "")
    if described is None:
        try:
            with safetensors.safe_open(str(weights_path), framework="pt") as f:
                described, source = (f.metadata() or {}).get("model_config"), f"the metadata of {str(weights_path)!r}"
            if described is None:
                config = _config_from_shapes(safetensors.torch.load_file(str(weights_path)), run)
        except (OSError, safetensors.SafetensorError) as e:
            raise ValueError(f"cannot read the weights in {str(weights_path)!r}: {e}") from None
    if described is not None:
        try:
            config = GPTConfig(**json.loads(described))
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"the model config in {source} is not a GPTConfig: {e}") from None
    model = GPT(config)
    load_exported(model, weights_path)
    return model.eval()


def load_run(run_dir: Union[str, Path], checkpoint: Optional[Union[str, Path]] = None) -> tuple[GPT, Any]:
    """The trained ``GPT`` (eval mode, see :func:`load_model`) and tokenizer of a run directory.

    Args:
        run_dir: the run directory.
        checkpoint: a safetensors file of model weights (default ``run_dir/model.safetensors``).

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: naming the missing or unreadable file.
    """
    run = Path(run_dir)
    model = load_model(run, checkpoint)
    tokenizer_path = run / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise ValueError(f"no tokenizer at {str(tokenizer_path)!r}; the run directory is incomplete")
    tokenizer = load_tokenizer(tokenizer_path)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"the weights have a vocabulary of {model.config.vocab_size}, the tokenizer {tokenizer.vocab_size}: they are from different runs"
        )
    return model, tokenizer


def generate_from_run_dir(
    run_dir: Union[str, Path],
    prompt: str,
    *,
    num_samples: int = 1,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    seed: int = 0,
    checkpoint: Optional[Union[str, Path]] = None,
    compile: bool = False,
    steps_per_call: Optional[int] = None,
) -> list[str]:
    """Generate ``num_samples`` texts from a trained run.

    Sampling continues past the model's context by sliding the window (without the KV cache)
    when prompt + ``max_new_tokens`` does not fit; beam search needs them to fit.

    Args:
        run_dir: the run directory of ``craftfn train``.
        prompt: a non-empty string of characters the tokenizer knows.
        num_samples: samples (or, with beams, best hypotheses) to return.
        max_new_tokens, temperature, top_k, top_p, num_beams, seed: generation options
            (``temperature=0``: greedy).
        checkpoint: other weights than ``run_dir/model.safetensors``.
        compile: compile the decode step with ``torch.compile``.
        steps_per_call: decode steps per call with the KV cache (default 8; see
            :class:`~craftfn.generation.TextGenerator`): 1 compiles fastest.

    Returns:
        The texts, prompt included.
    """
    for name, value, low in (("num_samples", num_samples, 1), ("num_beams", num_beams, 1), ("max_new_tokens", max_new_tokens, 0), ("top_k", top_k, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    model, tokenizer = load_run(run_dir, checkpoint)
    fits = len(tokenizer.encode(prompt)) + max(int(max_new_tokens), 0) <= model.config.block_size
    generator = TextGenerator(
        model, tokenizer, compile=compile and fits, use_cache=None if fits else False, steps_per_call=steps_per_call
    )
    if num_beams > 1:
        return generator.generate(prompt, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                  num_return_sequences=num_samples, do_sample=False)
    return generator.generate(
        prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        num_return_sequences=num_samples, seed=seed, do_sample=temperature > 0,
    )
