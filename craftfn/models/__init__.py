"""Reference models: a nanoGPT-class decoder-only transformer with a static KV cache.

Example:
    >>> from craftfn.models import GPT, GPTConfig
    >>> GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=8)).num_params() > 0
    True
"""

from craftfn.models.gpt import GPT, GPTConfig, KVCache, from_hf_gpt2, lm_eval_metrics, lm_loss, to_hf_gpt2

__all__ = ["GPT", "GPTConfig", "KVCache", "lm_loss", "lm_eval_metrics", "from_hf_gpt2", "to_hf_gpt2"]
