"""Teacher-logit caches: run the teacher once, store sparse distributions, train many students.

- `format`: what is stored per token in each mode (top-k + tail, random sampling, dense) and how
  compactly (`CacheSettings`, bytes per token).
- `store`: the folder (manifest, shards, index records), atomic writes and checksums.
- `identity`: fingerprints of teacher weights, tokenizer and data that a cache is checked against.
- `writer`: `write_cache` / `write_caches` (several caches, one teacher pass; resumable, parallel
  by rank/world or by per-shard locks, progress bar).
- `reader`: `CacheReader` (streaming, bounded memory, checksum-verified).
"""

from kdkit.cache.format import FORMAT_VERSION, CacheSettings, bytes_per_token_formula, id_width
from kdkit.cache.reader import CacheReader
from kdkit.cache.store import CacheError, ManifestMismatchError, ShardDamagedError
from kdkit.cache.writer import CacheSummary, build_manifest, write_cache, write_caches

__all__ = [
    "FORMAT_VERSION",
    "CacheError",
    "CacheReader",
    "CacheSettings",
    "CacheSummary",
    "ManifestMismatchError",
    "ShardDamagedError",
    "build_manifest",
    "bytes_per_token_formula",
    "id_width",
    "write_cache",
    "write_caches",
]
