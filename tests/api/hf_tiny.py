"""A tiny BERT classifier and word-level tokenizer built locally (nothing from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["good", "great", "fine", "bad", "awful", "dull", "the", "film", "plot", "was", "a", "very"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


def tiny_bert(layers: int = 2, seed: int = 0, num_labels: int = 2, sharp: float = 1.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS) + 4, hidden_size=16, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                        num_labels=num_labels)
    model = BertForSequenceClassification(config)
    with torch.no_grad():  # a decisive teacher: scaled-up head
        model.classifier.weight.mul_(sharp)
    return model.eval()


def sentences(n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 8, (n,), generator=generator).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=generator))
            for k in lengths]


def save_tiny(folder: Path, **kwargs) -> Path:
    tiny_bert(**kwargs).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
