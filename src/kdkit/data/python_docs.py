"""The Python 3.11 documentation sources as a language-modelling corpus (~500 reStructuredText files).

Files come from the Debian package `python3.11-doc` (/usr/share/doc/python3.11/html/_sources) or
an explicit `root`. A file is held out when a hash of its relative path falls in the first
`held_out_percent` of 100 buckets, so the split is the same on every machine and does not move
when files are added. Tokenised corpora are cached per tokenizer as safetensors in
`cache_dir("data", "python_docs")`.

Samples are fixed-length token blocks `{"input_ids", "attention_mask", "labels"}` (labels = the
input ids; models shift them internally), or prompt/completion blocks whose first `prompt_tokens`
positions are the prompt (labels -100) and carry `prompt_length`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from kdkit.losses.tokens import IGNORE_INDEX
from kdkit.paths import cache_dir

DEFAULT_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
ENV_VAR = "KDKIT_PYTHON_DOCS"
Split = Literal["train", "held_out"]


class PythonDocsNotFound(FileNotFoundError):
    """The documentation sources are not installed; the message says how to get them."""


def docs_root(root: str | Path | None = None) -> Path:
    """The sources folder: `root`, else `$KDKIT_PYTHON_DOCS`, else the Debian package's folder."""
    folder = Path(root or os.environ.get(ENV_VAR) or DEFAULT_ROOT)
    if not folder.is_dir() or not any(folder.rglob("*.txt")):
        raise PythonDocsNotFound(
            f"no Python documentation sources under {folder}; install them with "
            "`apt-get install python3.11-doc` or point $KDKIT_PYTHON_DOCS at a folder of *.rst.txt files"
        )
    return folder


def is_held_out(relative_path: str, held_out_percent: int = 5) -> bool:
    """Whether a file (path relative to the root, '/'-separated) belongs to the held-out split."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 100
    return bucket < held_out_percent


def docs_files(
    split: Split = "train",
    *,
    root: str | Path | None = None,
    held_out_percent: int = 5,
    max_files: int | None = None,
) -> list[Path]:
    """The split's source files, sorted by relative path; `max_files` keeps the first ones."""
    if split not in ("train", "held_out"):
        raise ValueError(f"split={split!r}: use 'train' or 'held_out'")
    folder = docs_root(root)
    files = sorted(folder.rglob("*.txt"), key=lambda p: p.relative_to(folder).as_posix())
    want_held_out = split == "held_out"
    chosen = [
        p for p in files if is_held_out(p.relative_to(folder).as_posix(), held_out_percent) == want_held_out
    ]
    return chosen[:max_files] if max_files is not None else chosen


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would split text differently."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # slow tokenizers: the vocabulary and class are the best available description
        text = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tokenize_files(files: list[Path], tokenizer: Any, max_tokens: int | None) -> torch.Tensor:
    """All files' tokens, each document followed by the eos id (if any): [N] int64."""
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces: list[torch.Tensor] = []
    total = 0
    for path in files:
        ids = tokenizer(path.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)[
            "input_ids"
        ]
        pieces.append(torch.tensor(list(ids) + separator, dtype=torch.long))
        total += len(pieces[-1])
        if max_tokens is not None and total >= max_tokens:
            break  # stop tokenising early: the point of max_tokens is a fast run
    tokens = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return tokens[:max_tokens] if max_tokens is not None else tokens


def load_docs_tokens(
    tokenizer: Any,
    split: Split = "train",
    *,
    root: str | Path | None = None,
    held_out_percent: int = 5,
    max_files: int | None = None,
    max_tokens: int | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """The split tokenised as one stream, documents separated by eos: [N] int64 token ids.

    The result is cached per (tokenizer, files, limits) under `cache_dir("data", "python_docs")`;
    the whole corpus is ~3M tokens (~12 MB as int32).
    """
    files = docs_files(split, root=root, held_out_percent=held_out_percent, max_files=max_files)
    folder = docs_root(root)
    key_parts = {
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "files": [(p.relative_to(folder).as_posix(), p.stat().st_size) for p in files],
        "max_tokens": max_tokens,
    }
    key = hashlib.sha256(json.dumps(key_parts).encode()).hexdigest()[:20]
    cache_file = cache_dir("data", "python_docs") / f"{split}-{key}.safetensors"
    if use_cache and cache_file.is_file():
        return load_file(cache_file)["tokens"].long()
    tokens = _tokenize_files(files, tokenizer, max_tokens)
    if use_cache:
        # Write to a temp file and rename so a crash never leaves a truncated cache that later
        # runs would trust. int32 halves the file; every vocabulary fits.
        handle, temp = tempfile.mkstemp(dir=cache_file.parent, suffix=".tmp")
        os.close(handle)
        try:
            save_file({"tokens": tokens.to(torch.int32).contiguous()}, temp)
            os.replace(temp, cache_file)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
    return tokens


def token_blocks(
    tokens: torch.Tensor, block_size: int, *, pad_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a token stream [N] into blocks: (input_ids [B, block_size], lengths [B]).

    The final partial block is dropped, or padded with `pad_id` when one is given.
    """
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be positive")
    full = tokens.numel() // block_size
    blocks = tokens[: full * block_size].reshape(full, block_size)
    lengths = torch.full((full,), block_size, dtype=torch.long)
    rest = tokens.numel() - full * block_size
    if pad_id is not None and rest > 0:
        last = torch.full((1, block_size), pad_id, dtype=tokens.dtype)
        last[0, :rest] = tokens[full * block_size :]
        blocks = torch.cat([blocks, last])
        lengths = torch.cat([lengths, torch.tensor([rest])])
    return blocks.long(), lengths


class TokenBlockDataset(Dataset):
    """Fixed-length LM samples from token blocks, optionally split into prompt + completion.

    blocks: [B, T] int64, lengths: [B] real tokens per block (the rest is padding).
    prompt_tokens: 0 -> plain LM samples (labels on every real token); k > 0 -> the first k tokens
    are a prompt (labels -100) and samples carry `prompt_length` = k for generation.
    Samples: input_ids [T], attention_mask [T], labels [T] (-100 on prompt and padding).
    """

    def __init__(
        self, blocks: torch.Tensor, lengths: torch.Tensor | None = None, *, prompt_tokens: int = 0
    ) -> None:
        block_size = blocks.shape[1]
        if not 0 <= prompt_tokens < block_size:
            raise ValueError(f"prompt_tokens={prompt_tokens} must be in [0, block_size={block_size})")
        self.blocks = blocks
        self.lengths = lengths if lengths is not None else torch.full((blocks.shape[0],), block_size)
        self.prompt_tokens = prompt_tokens

    def __len__(self) -> int:
        return int(self.blocks.shape[0])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        input_ids = self.blocks[index]
        positions = torch.arange(input_ids.numel())
        attention_mask = (positions < self.lengths[index]).long()
        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
        sample = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.prompt_tokens:
            sample["labels"] = labels.masked_fill(positions < self.prompt_tokens, IGNORE_INDEX)
            sample["prompt_length"] = torch.tensor(self.prompt_tokens)
        return sample


def load_python_docs(
    tokenizer: Any,
    split: Split = "train",
    *,
    block_size: int = 128,
    prompt_tokens: int = 0,
    root: str | Path | None = None,
    held_out_percent: int = 5,
    max_files: int | None = None,
    max_tokens: int | None = None,
    use_cache: bool = True,
) -> TokenBlockDataset:
    """The Python docs split as fixed-length blocks of `block_size` tokens (see TokenBlockDataset).

    e.g. load_python_docs(tok, "held_out", block_size=64, prompt_tokens=16, max_tokens=20_000)
    gives prompt/completion samples: 16 prompt tokens, 48 completion tokens with labels.
    """
    tokens = load_docs_tokens(
        tokenizer,
        split,
        root=root,
        held_out_percent=held_out_percent,
        max_files=max_files,
        max_tokens=max_tokens,
        use_cache=use_cache,
    )
    blocks, lengths = token_blocks(tokens, block_size)
    return TokenBlockDataset(blocks, lengths, prompt_tokens=prompt_tokens)
