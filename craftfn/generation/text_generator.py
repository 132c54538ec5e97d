"""``TextGenerator``: strings in, strings out, with a Hugging Face style ``.generate()``.

For craftfn models (and any ``nn.Module`` mapping ids to logits, or a ``TrainState``) it runs
craftfn's own loops: :func:`generate_text_sampling` (KV cache, optional ``torch.compile``) and
:func:`beam_search_generate`. For a Hugging Face ``PreTrainedModel`` (optional extra ``hf``:
``pip install craftfn[hf]``) it maps the same options onto a ``transformers.GenerationConfig`` and
calls the model's own ``generate``.

Example:
    >>> import torch
    >>> from craftfn.data import ByteTokenizer
    >>> from craftfn.models import GPT, GPTConfig
    >>> from craftfn.generation import TextGenerator
    >>> model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16))
    >>> texts = TextGenerator(model, ByteTokenizer()).generate(["ab", "c"], max_new_tokens=4, do_sample=False)
    >>> len(texts)
    2
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from craftfn.generation import kv_cache as kvc
from craftfn.generation.batch_generation import batch_generate
from craftfn.generation.sampling import SamplingOptions, _positive_int, check_max_new_tokens

__all__ = ["TextGenerator", "is_hf_model"]


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (False when transformers is absent)."""
    if not isinstance(model, nn.Module) or not type(model).__module__.startswith("transformers"):
        return False
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is an optional extra
        return False
    return isinstance(model, PreTrainedModel)


class TextGenerator:
    """Generate text from a model and a tokenizer.

    Args:
        model: a craftfn ``GPT`` (or any ``nn.Module`` mapping ids to logits), a ``TrainState``,
            or a Hugging Face causal LM.
        tokenizer: has ``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` (craftfn's
            tokenizers and Hugging Face tokenizers both do).
        eos_token_id: ends a sequence (default: the tokenizer's ``eos_token_id`` attribute, if any).
        pad_token_id: pads prompts on the left and sequences after EOS (default: EOS, else 0).
        compile: for craftfn models, compile the decode step (``True`` or ``torch.compile`` options).
        use_cache: for craftfn models: ``False`` recomputes the window each token (and can slide past
            the context); default: use the KV cache when the model has one.
        steps_per_call: for craftfn models with the KV cache, decode (or search) steps per call of
            the loop (default: the loop's own, 8). Same tokens for any value; with ``compile`` a
            larger value runs faster and compiles longer (1 step: ~30 s on a 2-core CPU, 8: ~80 s).

    Example:
        >>> from craftfn.data import ByteTokenizer
        >>> from craftfn.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16))
        >>> gen = TextGenerator(model, ByteTokenizer())
        >>> gen.generate("ab", max_new_tokens=3, temperature=0.8, top_k=20, seed=1)[0].startswith("ab")
        True
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        eos_token_id: Optional[int] = None,
        pad_token_id: Optional[int] = None,
        compile: Union[bool, Mapping[str, Any]] = False,
        use_cache: Optional[bool] = None,
        steps_per_call: Optional[int] = None,
    ) -> None:
        if not (callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
            raise TypeError(f"tokenizer must have encode() and decode(), got {type(tokenizer).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.hf = is_hf_model(model)
        if not self.hf:
            kvc.as_decoder(model)  # type check now, not at the first generate
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        kvc.eos_and_pad(eos_token_id, pad_token_id)
        self.compile = compile
        self.use_cache = use_cache
        if steps_per_call is not None:
            _positive_int("steps_per_call", steps_per_call)
        self.steps_per_call = steps_per_call

    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        *,
        max_new_tokens: int = 50,
        do_sample: Optional[bool] = None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        suppress_tokens: Sequence[int] = (),
        num_beams: int = 1,
        num_return_sequences: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool = False,
        seed: int = 0,
        return_full_text: bool = True,
    ) -> list[str]:
        """Generate continuations of one prompt or a list of prompts.

        Args:
            prompts: a non-empty string or a list of them.
            max_new_tokens: tokens to generate per sequence.
            do_sample: sample (True) or decode greedily / by beam search (False); default: sample
                when ``num_beams == 1`` and ``temperature > 0``.
            temperature, top_k, top_p, min_p, repetition_penalty, suppress_tokens: sampling options
                (see :class:`~craftfn.generation.SamplingOptions`).
            num_beams: > 1 runs beam search.
            num_return_sequences: results per prompt; without sampling at most ``num_beams``.
            length_penalty, early_stopping: beam search options.
            seed: the sampling seed.
            return_full_text: prompt + continuation (default) or the continuation only.

        Returns:
            ``len(prompts) * num_return_sequences`` strings, prompt-major; each stops before EOS.
        """
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ValueError("prompts must hold at least one prompt")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t:
                raise ValueError(f"prompt {i} must be a non-empty string, got {t!r}")
        check_max_new_tokens(max_new_tokens)
        SamplingOptions(temperature, top_k, top_p, min_p, repetition_penalty, tuple(suppress_tokens))
        for name, value in (("num_beams", num_beams), ("num_return_sequences", num_return_sequences)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if do_sample is None:
            do_sample = num_beams == 1 and temperature > 0
        if not do_sample and num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences={num_return_sequences} must be <= num_beams={num_beams} without sampling"
            )
        if do_sample and num_beams > 1:
            raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported; pick one")
        if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
        encoded = [list(self.tokenizer.encode(t)) for t in texts]
        for i, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {i} ({texts[i]!r}) encodes to no tokens")
        options = dict(
            max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            min_p=min_p, repetition_penalty=repetition_penalty, suppress_tokens=tuple(suppress_tokens),
            num_beams=num_beams, num_return_sequences=num_return_sequences, length_penalty=length_penalty,
            early_stopping=early_stopping, seed=seed,
        )
        outputs = self._generate_hf(encoded, **options) if self.hf else self._generate_craftfn(encoded, **options)
        per_prompt = len(outputs) // len(encoded)
        results = []
        for i, ids in enumerate(outputs):
            prompt_len = len(encoded[i // per_prompt])
            ids = kvc.strip_after_eos(ids, self.eos_token_id, prompt_len)
            results.append(self.tokenizer.decode(ids if return_full_text else ids[prompt_len:]))
        return results

    def _generate_craftfn(self, encoded: list[list[int]], *, do_sample, num_beams, num_return_sequences, temperature,
                          length_penalty, early_stopping, top_k, top_p, min_p, repetition_penalty, suppress_tokens,
                          max_new_tokens, seed) -> list[list[int]]:
        common = dict(
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, max_new_tokens=max_new_tokens,
            use_cache=self.use_cache,
        )
        if self.steps_per_call is not None:
            common["steps_per_call"] = self.steps_per_call
        if num_beams > 1:
            outs = batch_generate(
                self.model, encoded, num_beams=num_beams, num_return_sequences=num_return_sequences,
                length_penalty=length_penalty, early_stopping=early_stopping, **common,
            )
        else:
            # Sampled return sequences are rows of one batch: each row draws its own noise.
            rows = [ids for ids in encoded for _ in range(num_return_sequences)]
            outs = batch_generate(
                self.model, rows, temperature=temperature if do_sample else 0.0, top_k=top_k, top_p=top_p,
                min_p=min_p, repetition_penalty=repetition_penalty, suppress_tokens=suppress_tokens, seed=seed,
                compile=self.compile, **common,
            )
        return [o.tolist() for o in outs]

    def _generate_hf(self, encoded: list[list[int]], *, do_sample, seed, suppress_tokens, top_k, **options) -> list[list[int]]:
        from transformers import GenerationConfig

        model = self.model
        context = kvc.as_decoder(model).block_size
        longest = max(len(e) for e in encoded)
        if context is not None and longest > context:
            raise ValueError(f"a prompt has {longest} tokens, longer than the model's context of {context}")
        eos, pad = kvc.eos_and_pad(self.eos_token_id, self.pad_token_id)
        device = kvc.model_device(model)
        ids, mask = kvc.left_pad(encoded, pad, device=device)
        # Pass only the options that apply, so transformers does not warn about unused ones.
        sampling = ("temperature", "top_p", "min_p")
        beam = ("length_penalty", "early_stopping")
        kept = {k: v for k, v in options.items() if (k not in sampling or do_sample) and (k not in beam or options["num_beams"] > 1)}
        config = GenerationConfig(
            do_sample=do_sample, top_k=top_k if (top_k > 0 and do_sample) else None,
            suppress_tokens=list(suppress_tokens) or None, eos_token_id=None if eos < 0 else eos, pad_token_id=pad,
            **kept,
        )
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        width = ids.shape[1]
        per_prompt = out.shape[0] // len(encoded)
        return [out[i, width - len(encoded[i // per_prompt]) :].tolist() for i in range(out.shape[0])]
