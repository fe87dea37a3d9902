"""A character-level tokenizer for procedurally generated text tasks (built offline, no files).

Ids: <pad>=0, <bos>=1, <eos>=2, then one id per character, in the order given. Encoding adds <bos>
in front; decoding joins characters without spaces, so decode(encode(s)) == s. The arithmetic task
uses the same layout (`kdkit.tasks.arithmetic.arithmetic_tokenizer`); the arithmetic judge and the
planning task build theirs with this function over their own characters.
"""

from __future__ import annotations

from typing import Any

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"


def char_tokenizer(characters: str) -> Any:
    """A `PreTrainedTokenizerFast` over `characters` (each a token) plus <pad>, <bos>, <eos>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if len(set(characters)) != len(characters):
        raise ValueError(f"characters must be distinct, got {characters!r}")
    vocab = {PAD: 0, BOS: 1, EOS: 2} | {ch: i + 3 for i, ch in enumerate(characters)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, padding_side="right"
    )


__all__ = ["BOS", "EOS", "PAD", "char_tokenizer"]
