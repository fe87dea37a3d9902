"""The cache folder on disk: manifest, shards, per-shard index records, checksums, atomic writes.

```
<cache>/manifest.json              teacher, tokenizer, data, settings, format version (written first)
<cache>/shards/shard-000012.safetensors   samples [12·S, 13·S) (S = samples_per_shard)
<cache>/shards/shard-000012.json   its index record: samples, positions, bytes, sha256
<cache>/index.json                 all records together, written once every shard is present
```

A shard counts as present only when its record exists and the file's size and SHA-256 match the
record. Both are written atomically (temporary file, fsync, rename), the shard before its record,
so a process killed at any instant leaves either a complete shard or one that is recomputed: never a
half-written file that looks valid. Records are one file per shard (not one shared index file) so
that several processes can write disjoint shard ranges without coordinating.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from kdkit.paths import file_lock
from kdkit.settings import ConfigError

#: Manifest fields that are descriptive only: two caches differing just there are the same cache.
INFO_KEYS = ("created", "info", "name", "source", "bytes_per_token")


class CacheError(ConfigError):
    """A cache that cannot be used as asked; the message says why and what to do (the CLI prints
    it as one line, like any config a person must fix)."""


class ManifestMismatchError(CacheError):
    """The cache was built for another teacher, tokenizer, data or settings."""


class ShardDamagedError(CacheError):
    """A shard's bytes do not match the checksum in its index record."""


# ------------------------------------------------------------------------------------------ helpers


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file, or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, read in `chunk`-byte pieces (memory stays at one chunk)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def json_sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            if key in INFO_KEYS:
                continue
            out |= _flatten(value, f"{prefix}{key}.")
        return out
    return {prefix[:-1]: obj}


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text[:12] + "…" if isinstance(value, str) and len(value) == 64 else text


def manifest_differences(
    found: dict[str, Any], expected: dict[str, Any], sections: tuple[str, ...] = ()
) -> list[str]:
    """Human-readable differences between two manifests (descriptive fields ignored).

    sections: compare only these top-level keys (e.g. ("teacher", "tokenizer", "data")); all if empty.
    """
    if sections:
        found = {k: v for k, v in found.items() if k in sections}
        expected = {k: v for k, v in expected.items() if k in sections}
    a, b = _flatten(found), _flatten(expected)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(
                f"{key}: {_short(a.get(key, '<absent>'))} in the cache, {_short(b.get(key, '<absent>'))} now"
            )
    return out


# ------------------------------------------------------------------------------------------ store


class CacheStore:
    """Paths and atomic operations of one cache folder (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.shard_dir = self.root / "shards"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def shard_path(self, shard: int) -> Path:
        return self.shard_dir / f"shard-{shard:06d}.safetensors"

    def record_path(self, shard: int) -> Path:
        return self.shard_dir / f"shard-{shard:06d}.json"

    # ------------------------------------------------------------------ manifest

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())

    def ensure_manifest(self, manifest: dict[str, Any]) -> None:
        """Write `manifest` if the folder has none; refuse (ManifestMismatchError) if it has another."""
        found = self.read_manifest()
        if found is None:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(
                self.manifest_path, json.dumps(manifest | {"created": time.time()}, indent=2).encode()
            )
            return
        differences = manifest_differences(found, manifest)
        if differences:
            raise ManifestMismatchError(
                f"the cache at {self.root} was built with other settings, so it is not extended: "
                + "; ".join(differences)
                + ". Choose another cache folder (cache.path) or delete this one to rebuild it."
            )
        self.shard_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ shards

    def write_shard(self, shard: int, payload: bytes, record: dict[str, Any]) -> dict[str, Any]:
        """Store a shard's bytes, then its record (with size and SHA-256). Returns the record."""
        record = record | {
            "shard": shard,
            "bytes": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        atomic_write(self.shard_path(shard), payload)
        atomic_write(self.record_path(shard), json.dumps(record, sort_keys=True).encode())
        return record

    def record(self, shard: int) -> dict[str, Any] | None:
        path = self.record_path(shard)
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"damaged_record": True}

    def problem(self, shard: int, record: dict[str, Any] | None, *, full: bool = True) -> str | None:
        """Why shard `shard` cannot be used (None = it is complete and intact).

        full: compare the SHA-256 (reads the file); else only its presence and size.
        """
        path = self.shard_path(shard)
        if record is None:
            return "missing" if not path.exists() else "incomplete (no index record)"
        if record.get("damaged_record"):
            return "its index record is unreadable"
        if not path.exists():
            return "file missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"truncated or resized ({size:,} bytes, index says {record['bytes']:,})"
        if full:
            digest = file_sha256(path)
            if digest != record["sha256"]:
                return f"checksum mismatch (sha256 {digest[:12]}…, index says {record['sha256'][:12]}…)"
        return None

    def lock(self, shard: int, *, block: bool = True) -> contextlib.AbstractContextManager[bool]:
        """An exclusive lock on `shard` (`kdkit.paths.file_lock` on shards/.shard-NNNNNN.lock): yields
        True once held, or False at once with block=False when another process holds it."""
        return file_lock(self.shard_dir / f".{self.shard_path(shard).stem}.lock", block=block)

    def remove_shard(self, shard: int) -> None:
        for path in (self.record_path(shard), self.shard_path(shard)):
            path.unlink(missing_ok=True)

    def clean_temporaries(self, shards: list[int]) -> None:
        """Delete temporary files of `shards` left by killed writers (only this process's shards:
        another live process may be writing its own right now)."""
        for shard in shards:
            for name in (self.shard_path(shard).name, self.record_path(shard).name):
                for path in self.shard_dir.glob(f".{name}.*.tmp"):
                    path.unlink(missing_ok=True)

    def records(self, shards: range | list[int]) -> dict[int, dict[str, Any]]:
        return {i: r for i in shards if (r := self.record(i)) is not None}

    def write_index(self, num_shards: int) -> dict[str, Any] | None:
        """index.json with every record, if all `num_shards` records exist (else None)."""
        records = self.records(range(num_shards))
        if len(records) != num_shards:
            return None
        totals = {
            "shards": num_shards,
            "samples": sum(r["samples"] for r in records.values()),
            "positions": sum(r["positions"] for r in records.values()),
            "bytes": sum(r["bytes"] for r in records.values()),
        }
        index = {"totals": totals, "records": [records[i] for i in range(num_shards)]}
        atomic_write(self.root / "index.json", json.dumps(index, indent=1, sort_keys=True).encode())
        return index


_CODES = {
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "uint8": "U8",
    "int8": "I8",
    "uint16": "U16",
    "int16": "I16",
    "uint32": "U32",
    "int32": "I32",
    "uint64": "U64",
    "int64": "I64",
}


def serialize(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The safetensors bytes of `arrays` with a *deterministic* header (sorted keys, no hash-map order).

    Readable by `safetensors.numpy.load`; the same arrays always give the same bytes, so a recomputed
    shard has the checksum of the one it replaces.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    offset, chunks = 0, []
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _CODES[array.dtype.name],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        chunks.append(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + b"".join(chunks)


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(byte offset of the data section, the safetensors header) of a shard, reading only the header."""
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ShardDamagedError(f"{path} is truncated (no safetensors header)")
        length = int(np.frombuffer(raw, dtype="<u8")[0])
        header = json.loads(handle.read(length))
    return 8 + length, header
