"""Text datasets (plain / prompt-completion / chat) and the Python-docs corpus."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdkit.data.python_docs import (
    DEFAULT_ROOT,
    PythonDocsNotFound,
    docs_files,
    is_held_out,
    load_docs_tokens,
    load_python_docs,
    token_blocks,
)
from kdkit.data.text import (
    IGNORE_INDEX,
    TextDataset,
    collate_text,
    record_format,
    text_collator,
    tokenize_record,
)
from tests.models.test_tokenizers import CHAT_TEMPLATE, tiny_tokenizer

BOS, EOS = 2, 1


def trained_tokens(sample: dict[str, torch.Tensor], tokenizer) -> list[str]:
    labels = sample["labels"]
    return tokenizer.convert_ids_to_tokens(labels[labels != IGNORE_INDEX].tolist())


def test_plain_text_trains_on_every_token_and_ends_with_eos() -> None:
    tokenizer = tiny_tokenizer()
    for record in ("the cat sat", {"text": "the cat sat"}):
        sample = tokenize_record(record, tokenizer)
        assert tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist()) == [
            "<bos>",
            "the",
            "cat",
            "sat",
            "<eos>",
        ]
        assert torch.equal(sample["labels"], sample["input_ids"])
        assert int(sample["prompt_length"]) == 0


def test_prompt_completion_masks_the_prompt() -> None:
    tokenizer = tiny_tokenizer()
    sample = tokenize_record({"prompt": "what is 1 + 2 ?", "completion": "3"}, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist())
    assert tokens == ["<bos>", "what", "is", "1", "+", "2", "?", "3", "<eos>"]
    assert sample["labels"][:7].eq(IGNORE_INDEX).all()
    assert trained_tokens(sample, tokenizer) == ["3", "<eos>"]
    assert int(sample["prompt_length"]) == 7


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None], ids=["chat-template", "no-template"])
def test_chat_trains_only_on_assistant_turns(template: str | None) -> None:
    tokenizer = tiny_tokenizer(chat_template=template)
    messages = [
        {"role": "system", "content": "answer"},
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "what is 2 + 2 ?"},
        {"role": "assistant", "content": "4"},
    ]
    sample = tokenize_record({"messages": messages}, tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(sample["input_ids"].tolist())
    if template is None:  # fallback "role: content" lines, BOS from the tokenizer, EOS appended
        assert tokens[:4] == ["<bos>", "system", ":", "answer"]
        assert trained_tokens(sample, tokenizer) == ["hi", "4", "<eos>"]
    else:  # the template writes "<eos>" after every turn, and it is trained on for assistant turns
        assert tokens[:4] == ["system", ":", "answer", "<eos>"]
        assert trained_tokens(sample, tokenizer) == ["hi", "<eos>", "4", "<eos>"]
    # The prompt is everything before the last assistant answer, ending in the generation prompt.
    prompt = tokens[: int(sample["prompt_length"])]
    assert prompt[-2:] == ["assistant", ":"] and "4" not in prompt and prompt.count("hi") == 2


def test_conversational_prompt_completion_uses_the_chat_path() -> None:
    tokenizer = tiny_tokenizer(chat_template=CHAT_TEMPLATE)
    record = {"prompt": [{"role": "user", "content": "say hi"}], "completion": "hi"}
    sample = tokenize_record(record, tokenizer)
    assert trained_tokens(sample, tokenizer) == ["hi", "<eos>"]


def test_record_formats_and_errors() -> None:
    records = ("x", {"text": "x"}, {"prompt": "a", "completion": "b"}, {"messages": []})
    assert [record_format(r) for r in records] == ["text", "text", "prompt_completion", "chat"]
    with pytest.raises(ValueError, match=r"keys \['input', 'output'\]"):
        record_format({"input": "a", "output": "b"})


def test_max_length_truncates_from_the_right() -> None:
    tokenizer = tiny_tokenizer()
    sample = tokenize_record({"prompt": "the cat sat on", "completion": "a mat"}, tokenizer, max_length=6)
    assert sample["input_ids"].numel() == 6 and trained_tokens(sample, tokenizer) == ["a"]


def test_collate_right_pads_the_batch_and_left_pads_prompts() -> None:
    tokenizer = tiny_tokenizer()
    dataset = TextDataset(
        [
            "hello world",
            {"prompt": "what is 1 + 2 ?", "completion": "3"},
            {"prompt": "say", "completion": "hi"},
        ],
        tokenizer,
    )
    batch = text_collator(tokenizer)([dataset[i] for i in range(3)])
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 9)
    assert batch["attention_mask"].sum(1).tolist() == [4, 9, 4]
    assert batch["input_ids"][0, 4:].eq(EOS).all()  # no pad token: eos pads, masked out
    assert batch["labels"][0, 4:].eq(IGNORE_INDEX).all()
    assert batch["prompt_ids"].shape == (3, 7)
    assert batch["prompt_attention_mask"].sum(1).tolist() == [0, 7, 2]
    assert batch["prompt_ids"][2, -2:].tolist() == [BOS, tokenizer.convert_tokens_to_ids("say")]
    assert batch["prompt_attention_mask"][2, :5].eq(0).all()
    # Labels on real tokens equal the ids there, so the model's internal shift trains next-token.
    real = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])


# ---- Python documentation corpus -------------------------------------------------------------------

needs_docs = pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="python3.11-doc is not installed")


@needs_docs
def test_docs_split_is_deterministic_and_disjoint() -> None:
    train, held_out = docs_files("train"), docs_files("held_out")
    assert len(train) > 400 and 10 <= len(held_out) <= 50  # ~5% of ~500 files
    assert not set(train) & set(held_out)
    assert docs_files("held_out") == held_out
    # The split depends only on the relative path, not on the machine or the file list.
    relative = held_out[0].relative_to(DEFAULT_ROOT).as_posix()
    assert is_held_out(relative) and not is_held_out(relative, held_out_percent=0)
    assert len(docs_files("train", max_files=3)) == 3


def test_missing_docs_say_how_to_install_them(tmp_path: Path) -> None:
    with pytest.raises(PythonDocsNotFound, match="apt-get install python3.11-doc"):
        docs_files(root=tmp_path)


def test_token_blocks_drop_or_pad_the_remainder() -> None:
    tokens = torch.arange(10)
    blocks, lengths = token_blocks(tokens, 4)
    assert blocks.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]] and lengths.tolist() == [4, 4]
    blocks, lengths = token_blocks(tokens, 4, pad_id=99)
    assert blocks[-1].tolist() == [8, 9, 99, 99] and lengths.tolist() == [4, 4, 2]


@needs_docs
def test_docs_blocks_and_prompt_completion_samples_are_cached(kdkit_cache: Path) -> None:
    tokenizer = tiny_tokenizer()
    tokens = load_docs_tokens(tokenizer, "held_out", max_files=2, max_tokens=3000)
    assert tokens.dtype == torch.long and 0 < tokens.numel() <= 3000
    cached = list((kdkit_cache / "data" / "python_docs").glob("held_out-*.safetensors"))
    assert len(cached) == 1
    assert torch.equal(load_docs_tokens(tokenizer, "held_out", max_files=2, max_tokens=3000), tokens)

    lm = load_python_docs(tokenizer, "held_out", block_size=32, max_files=2, max_tokens=3000)
    assert len(lm) == tokens.numel() // 32
    assert torch.equal(lm[1]["input_ids"], tokens[32:64]) and torch.equal(lm[1]["labels"], tokens[32:64])

    pc = load_python_docs(tokenizer, "held_out", block_size=32, prompt_tokens=8, max_files=2, max_tokens=3000)
    sample = pc[0]
    assert sample["labels"][:8].eq(IGNORE_INDEX).all() and torch.equal(sample["labels"][8:], tokens[8:32])
    assert int(sample["prompt_length"]) == 8
    batch = collate_text([pc[0], pc[1]], pad_token_id=0)
    assert torch.equal(batch["prompt_ids"], torch.stack([tokens[:8], tokens[32:40]]))
