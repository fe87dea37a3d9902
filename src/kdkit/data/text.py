"""Text datasets in the three common record formats, tokenised with prompt tokens masked.

Accepted records (one format per record; a dataset may mix them):

- plain text: `"some text"` or `{"text": "..."}` — every token is trained on;
- prompt/completion: `{"prompt": "...", "completion": "..."}` — only completion tokens are
  trained on; prompt and completion may also be message lists (conversational prompt/completion);
- chat: `{"messages": [{"role": ..., "content": ...}, ...]}` — only assistant turns are trained on.

The chat template is applied only to chat records and only when the tokenizer has one; without a
template, messages are written as "role: content" lines. Plain text needs no template and no pad
token beyond what `collate_text` is given.

A sample is `{"input_ids": [L], "attention_mask": [L], "labels": [L], "prompt_length": []}` (int64),
labels -100 where no loss is taken. `prompt_length` is the number of tokens before the last trained
span (the prompt a generator continues). `collate_text` gives the batch layout of
`kdkit.samplers.collate.build_lm_batch`: right-padded input_ids/attention_mask/labels plus
left-padded `prompt_ids`/`prompt_attention_mask`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

import torch
from torch.utils.data import Dataset

from kdkit.data.padding import left_pad, right_pad
from kdkit.losses.tokens import IGNORE_INDEX

Message = dict[str, str]


def record_format(record: Any) -> str:
    """ "text", "prompt_completion" or "chat"; ValueError naming the keys for anything else."""
    if isinstance(record, str) or (isinstance(record, dict) and "text" in record):
        return "text"
    if isinstance(record, dict) and "messages" in record:
        return "chat"
    if isinstance(record, dict) and "prompt" in record and "completion" in record:
        return "prompt_completion"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(
        f"unrecognised text record with keys {keys}; expected 'text', 'prompt' + 'completion', or 'messages'"
    )


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _render_chat(tokenizer: Any, messages: Sequence[Message], *, generation_prompt: bool) -> str:
    """The text of `messages`: the tokenizer's chat template, or "role: content" lines without one."""
    if _has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=generation_prompt
        )
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant: " if generation_prompt else "")


def _chat_segments(tokenizer: Any, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    """Split a conversation's rendered text into (text, trained) pieces; assistant turns are trained.

    Each assistant turn's text is the difference between the conversation rendered up to and
    including it and the conversation before it with the generation prompt, which holds for
    templates that render a prefix of the conversation as a prefix of the text (all common ones).
    """
    segments: list[tuple[str, bool]] = []
    done = ""
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, messages[:turn], generation_prompt=True)
        through = _render_chat(tokenizer, messages[: turn + 1], generation_prompt=False)
        if not before.startswith(done) or not through.startswith(before):
            raise ValueError(
                "the chat template does not render conversations prefix-consistently; "
                "cannot tell assistant tokens apart (use prompt/completion records instead)"
            )
        segments.append((before[len(done) :], False))
        segments.append((through[len(before) :], True))
        done = through
    full = _render_chat(tokenizer, messages, generation_prompt=False)
    if full[len(done) :]:
        segments.append((full[len(done) :], False))  # trailing user/system turns: context only
    return segments


def _segments(record: Any, tokenizer: Any) -> tuple[list[tuple[str, bool]], bool]:
    """(text pieces with a trained flag, whether the tokenizer should add its special tokens)."""
    kind = record_format(record)
    if kind == "text":
        return [(record if isinstance(record, str) else record["text"], True)], True
    if kind == "chat":
        return _chat_segments(tokenizer, record["messages"]), not _has_chat_template(tokenizer)
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, list):  # conversational prompt/completion: messages on both sides
        completion_messages = (
            completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        )
        return _chat_segments(tokenizer, list(prompt) + list(completion_messages)), not _has_chat_template(
            tokenizer
        )
    return [(prompt, False), (completion, True)], True


def tokenize_record(
    record: Any, tokenizer: Any, *, max_length: int | None = None, add_eos: bool = True
) -> dict[str, torch.Tensor]:
    """One record -> {"input_ids", "attention_mask", "labels", "prompt_length"} (int64 tensors).

    Each piece is tokenised on its own and the ids concatenated, so the prompt's ids are exactly
    what a generator would be given. Special tokens (e.g. BOS) are added by the tokenizer for plain
    text and prompt/completion, and come from the chat template for chat records. `add_eos` appends
    eos to plain text and completions (not to templated chats, whose template ends turns itself),
    so the student learns to stop. `max_length` truncates from the right.
    """
    segments, special = _segments(record, tokenizer)
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_length = 0
    for text, trained in segments:
        # Special tokens (BOS) belong once, at the start of the sequence.
        ids = list(tokenizer(text, add_special_tokens=special and not input_ids)["input_ids"]) if text else []
        if trained:
            prompt_length = len(input_ids)
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    templated = not special  # a chat template ends every turn with its own end-of-turn token
    if add_eos and not templated and tokenizer.eos_token_id is not None:
        trained_last = bool(segments) and segments[-1][1]
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id if trained_last else IGNORE_INDEX)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        prompt_length = min(prompt_length, len(input_ids))
    return {
        "input_ids": torch.tensor(input_ids, dtype=torch.long),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "prompt_length": torch.tensor(prompt_length, dtype=torch.long),
    }


class TextDataset(Dataset):
    """Records of any accepted format, tokenised once at construction (see `tokenize_record`)."""

    def __init__(
        self, records: Iterable[Any], tokenizer: Any, *, max_length: int | None = None, add_eos: bool = True
    ) -> None:
        self.samples = [
            tokenize_record(r, tokenizer, max_length=max_length, add_eos=add_eos) for r in records
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.samples[index]


def collate_text(samples: Sequence[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad samples into a batch (B rows, T = longest sample, P = longest prompt).

    input_ids [B, T] (right-padded with pad_token_id), attention_mask [B, T], labels [B, T] (-100 on
    padding); prompt_ids [B, P] and prompt_attention_mask [B, P]: each row's first prompt_length
    tokens, *left*-padded so batched generation continues every row from its last prompt token.
    Samples without prompt_length (e.g. plain LM blocks) have an empty prompt.
    """
    rows = [sample["input_ids"].tolist() for sample in samples]
    prompts = [row[: int(sample.get("prompt_length", 0))] for row, sample in zip(rows, samples)]
    prompt_ids, prompt_attention_mask = left_pad(prompts, pad_token_id)
    return {
        "input_ids": right_pad(rows, pad_token_id),
        "attention_mask": right_pad([s["attention_mask"].tolist() for s in samples], pad_token_id, value=0),
        "labels": right_pad([s["labels"].tolist() for s in samples], pad_token_id, value=IGNORE_INDEX),
        "prompt_ids": prompt_ids,
        "prompt_attention_mask": prompt_attention_mask,
    }


def text_collator(tokenizer: Any):
    """`collate_text` bound to the tokenizer's pad id (its eos when it has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token")
    return partial(collate_text, pad_token_id=pad)
