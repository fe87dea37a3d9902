"""Read a teacher-logit cache by streaming: memory bounded by a few shards' metadata, not the cache.

`CacheReader.sample(i)` reads only sample i's byte ranges from its shard (`os.pread`, no memory map,
so the pages read do not stay in the process's resident memory); per shard it keeps the parsed
header and the per-sample (and, for sampled caches, per-position) offsets, for at most
`max_open_shards` shards at a time (least recently used dropped). A shard is checked against the
SHA-256 in its index record the first time it is opened (read in 1 MiB pieces): a damaged shard
raises `ShardDamagedError` and nothing of it reaches training.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.cache.format import FLAT_ARRAYS, CacheSettings, decode_positions
from kdkit.cache.store import (
    CacheError,
    CacheStore,
    ManifestMismatchError,
    ShardDamagedError,
    manifest_differences,
    read_header,
)

_DTYPES = {
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
    "U8": np.uint8,
    "I8": np.int8,
    "U16": np.uint16,
    "I16": np.int16,
    "U32": np.uint32,
    "I32": np.int32,
    "U64": np.uint64,
    "I64": np.int64,
}
#: What a training run must share with the cache it reads (settings may differ: the loss adapts).
TRAINING_SECTIONS = ("format_version", "teacher", "tokenizer", "data")


@dataclass
class _Shard:
    fd: int
    data_offset: int
    header: dict[str, Any]
    first_sample: int
    sample_starts: np.ndarray  # [S + 1] int64, position offsets of the samples
    flat_starts: np.ndarray | None  # [n + 1] int64, id-slot offsets of the positions (sampled)

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of stored array `name`."""
        dtype, trailing, row, offset = self.layout[name]
        count = (stop - start) * row
        raw = os.pread(self.fd, count, self.data_offset + offset + start * row) if count else b""
        if len(raw) != count:
            raise ShardDamagedError(f"shard read past its end ({name}): the file is truncated")
        return np.frombuffer(raw, dtype=dtype).reshape(stop - start, *trailing)

    @property
    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...], int, int]]:
        """name -> (dtype, trailing shape, bytes per row, data offset), computed once."""
        cached = self.__dict__.get("_layout")
        if cached is None:
            cached = {}
            for name, entry in self.header.items():
                if name == "__metadata__":
                    continue
                dtype, trailing = np.dtype(_DTYPES[entry["dtype"]]), tuple(entry["shape"][1:])
                row = int(np.prod(trailing, dtype=np.int64)) * dtype.itemsize
                cached[name] = (dtype, trailing, row, entry["data_offsets"][0])
            self.__dict__["_layout"] = cached
        return cached


class CacheReader:
    """Random and sequential access to the samples of a cache folder.

    expect: a manifest (from `build_manifest`) to check the cache against; only `sections` are compared
        (by default teacher, tokenizer, data and format version; the cache's own settings decide the
        loss). A difference raises ManifestMismatchError naming each field that differs.
    verify: check each shard's SHA-256 when first opened.
    max_open_shards: how many shards' metadata (and file handles) are kept.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        expect: dict[str, Any] | None = None,
        sections: tuple[str, ...] = TRAINING_SECTIONS,
        verify: bool = True,
        max_open_shards: int = 2,
    ) -> None:
        self.store = CacheStore(root)
        manifest = self.store.read_manifest()
        if manifest is None:
            raise CacheError(
                f"no teacher-logit cache at {root} (no manifest.json): build it with `kdkit cache CONFIG`"
            )
        if expect is not None:
            differences = manifest_differences(manifest, expect, sections)
            if differences:
                raise ManifestMismatchError(
                    f"the cache at {root} was not built for this run: "
                    + "; ".join(differences)
                    + ". Rebuild it for this teacher, tokenizer and data with `kdkit cache CONFIG`, or "
                    "point to the right cache."
                )
        self.manifest = manifest
        stored = dict(manifest["settings"])
        self.settings = CacheSettings(**stored)
        self.vocab_size = int(manifest["vocab_size"])
        self.num_samples = int(manifest["data"]["samples"])
        self.samples_per_shard = self.settings.samples_per_shard
        self.num_shards = -(-self.num_samples // self.samples_per_shard)
        self.verify = verify
        self.max_open_shards = max(1, max_open_shards)
        self._open: OrderedDict[int, _Shard] = OrderedDict()

    # ------------------------------------------------------------------ checks

    def problems(self, *, full: bool = False) -> list[tuple[int, str]]:
        """(shard, why) for every shard that is missing or damaged (`full` compares checksums)."""
        out = []
        for shard in range(self.num_shards):
            problem = self.store.problem(shard, self.store.record(shard), full=full)
            if problem is not None:
                out.append((shard, problem))
        return out

    def require_complete(self) -> None:
        """Raise CacheError if any shard is missing or has the wrong size (checksums: on first use)."""
        problems = self.problems(full=False)
        if problems:
            listed = ", ".join(f"{s} ({p})" for s, p in problems[:5]) + (" …" if len(problems) > 5 else "")
            raise CacheError(
                f"the cache at {self.store.root} is incomplete or damaged: {len(problems)} of "
                f"{self.num_shards} shards unusable: {listed}. "
                "Rerun `kdkit cache CONFIG` to finish or repair it."
            )

    def bytes_per_token(self) -> float:
        """Stored bytes (all shard files) / stored positions."""
        records = self.store.records(range(self.num_shards))
        positions = sum(r["positions"] for r in records.values())
        return sum(r["bytes"] for r in records.values()) / max(positions, 1)

    # ------------------------------------------------------------------ access

    def shard_of(self, index: int) -> int:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"sample {index} is outside the cache's {self.num_samples} samples")
        return index // self.samples_per_shard

    def sample(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        """(stored arrays of sample `index`'s positions, the sample's CRC)."""
        shard = self._shard(self.shard_of(index))
        local = index - shard.first_sample
        start, stop = int(shard.sample_starts[local]), int(shard.sample_starts[local + 1])
        flat_names = FLAT_ARRAYS.get(self.settings.mode, ())
        out = {}
        for name in shard.header:
            if name in ("__metadata__", "sample_tokens", "sample_crc"):
                continue
            if name in flat_names:
                assert shard.flat_starts is not None
                out[name] = shard.read(name, int(shard.flat_starts[start]), int(shard.flat_starts[stop]))
            else:
                out[name] = shard.read(name, start, stop)
        crc = int(shard.read("sample_crc", local, local + 1)[0])
        return out, crc

    def target(self, index: int) -> tuple[dict[str, torch.Tensor], int]:
        """(the decoded sparse target of sample `index`: see `format.decode_positions`, its CRC)."""
        arrays, crc = self.sample(index)
        return decode_positions(arrays, self.settings, self.vocab_size), crc

    def shards_for(self, rank: int = 0, world: int = 1) -> list[int]:
        """The shards process `rank` of `world` reads when they split the cache (i ≡ rank mod world)."""
        return list(range(rank, self.num_shards, world))

    def iter_samples(self, rank: int = 0, world: int = 1) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(sample index, stored arrays) for every sample of this process's shards, in order."""
        for shard in self.shards_for(rank, world):
            first = shard * self.samples_per_shard
            for index in range(first, min(first + self.samples_per_shard, self.num_samples)):
                yield index, self.sample(index)[0]

    def close(self) -> None:
        while self._open:
            _, shard = self._open.popitem()
            os.close(shard.fd)

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ shards

    def _shard(self, shard: int) -> _Shard:
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        path = self.store.shard_path(shard)
        problem = self.store.problem(shard, self.store.record(shard), full=self.verify)
        if problem is not None:
            raise ShardDamagedError(
                f"cache shard {shard} ({path}) cannot be used: {problem}. Nothing was read from it; rerun "
                "`kdkit cache CONFIG` to recompute it."
            )
        data_offset, header = read_header(path)
        fd = os.open(path, os.O_RDONLY)
        view = _Shard(fd, data_offset, header, shard * self.samples_per_shard, np.zeros(1, np.int64), None)
        tokens = view.read("sample_tokens", 0, header["sample_tokens"]["shape"][0]).astype(np.int64)
        view.sample_starts = np.concatenate([[0], np.cumsum(tokens)])
        if self.settings.mode == "sampled":
            n_unique = view.read("n_unique", 0, header["n_unique"]["shape"][0]).astype(np.int64)
            view.flat_starts = np.concatenate([[0], np.cumsum(n_unique)])
        self._open[shard] = view
        while len(self._open) > self.max_open_shards:
            _, old = self._open.popitem(last=False)
            os.close(old.fd)
        return view
