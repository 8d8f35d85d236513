"""Tiny randomly initialised causal LMs with a byte-level tokenizer, built offline.

Used by the tests and by ``proxrl rlhf demo --quick``: the real loading code (``from_pretrained`` on a
directory) runs on them, in seconds. The tokenizer maps every byte to a token (no merges) and has
separate ``<pad>``, ``<s>`` and ``</s>`` tokens (pad ≠ eos, DETAILS LM-1).
"""

from __future__ import annotations

import os
from pathlib import Path

SPECIALS = ["<pad>", "<s>", "</s>"]


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of GPT-2's byte-level BPE
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in sorted(byte_map):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tiny(out: str | os.PathLike, arch: str = "llama", layers: int = 2, hidden: int = 32, seed: int = 0,
              context: int = 512) -> Path:
    """Write a tiny random ``arch`` ∈ {llama, gpt2} model (a context of ``context`` positions) and its
    tokenizer to ``out``; returns the path."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = byte_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                          tie_word_embeddings=True, **common)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=context, **common)
    else:
        raise ValueError(f"arch must be llama or gpt2, got {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
