"""Generation: sampling, beam search and batched generation on a static KV cache.

Example:
    >>> import torch
    >>> from craftfn.models import GPT, GPTConfig
    >>> from craftfn.generation import generate_text_sampling
    >>> model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=1, n_head=2, n_embd=8))
    >>> generate_text_sampling(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4, temperature=0.0).shape
    torch.Size([1, 7])
"""

from craftfn.generation import kv_cache
from craftfn.generation.batch_generation import batch_generate
from craftfn.generation.beam_search import BeamSearchOutput, beam_search_generate
from craftfn.generation.kv_cache import KVCache, left_pad, positions_from_mask
from craftfn.generation.sampling import (
    SamplingOptions,
    apply_repetition_penalty,
    apply_temperature,
    generate_text_sampling,
    min_p_filter,
    process_logits,
    sample_text,
    sample_token,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
)
from craftfn.generation.text_generator import TextGenerator, is_hf_model

__all__ = [
    "kv_cache",
    "KVCache",
    "left_pad",
    "positions_from_mask",
    "SamplingOptions",
    "apply_temperature",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "apply_repetition_penalty",
    "suppress_tokens",
    "process_logits",
    "sample_token",
    "generate_text_sampling",
    "sample_text",
    "BeamSearchOutput",
    "beam_search_generate",
    "batch_generate",
    "TextGenerator",
    "is_hf_model",
]
