"""A durable store of teacher responses (SQLite, WAL mode) and the collection driver over it.

Every response costs money or time, so each one is committed the moment it arrives: a crash or a
SIGKILL loses at most the requests in flight, and rerunning `collect` asks the teacher only for
what the store does not hold yet. A response's key is

    (teacher_id, prompt hash, sampling-parameters hash, sample index)

so the same prompt sampled by another teacher, with other parameters, or for more samples, is a
different key. The student's own samples (SODA's frozen snapshot) live in the same store under a
teacher id such as "student:<name>". Failures (retries exhausted, a per-prompt 4xx) are recorded
in their own table and requested again by the next `collect`.

Exports: JSONL (one response per line) and a Hugging Face `datasets.Dataset`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdkit.teachers.base import Generation, Prompt, SamplingParams, TextTeacher, prompt_hash

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    teacher_id   TEXT NOT NULL,
    prompt_hash  TEXT NOT NULL,
    params_hash  TEXT NOT NULL,
    sample_index INTEGER NOT NULL,
    prompt       TEXT NOT NULL,      -- JSON: a string or a message list
    params       TEXT NOT NULL,      -- JSON of SamplingParams
    response     TEXT NOT NULL,      -- JSON of Generation
    created_at   REAL NOT NULL,
    PRIMARY KEY (teacher_id, prompt_hash, params_hash, sample_index)
);
CREATE TABLE IF NOT EXISTS failures (
    teacher_id   TEXT NOT NULL,
    prompt_hash  TEXT NOT NULL,
    params_hash  TEXT NOT NULL,
    error        TEXT NOT NULL,
    attempts     INTEGER NOT NULL,
    updated_at   REAL NOT NULL,
    PRIMARY KEY (teacher_id, prompt_hash, params_hash)
);
"""


@dataclass(frozen=True)
class Record:
    """One stored response and its key."""

    teacher_id: str
    prompt: Prompt
    params: dict[str, Any]
    sample_index: int
    generation: Generation

    def to_json(self) -> dict[str, Any]:
        return {
            "teacher_id": self.teacher_id,
            "prompt": self.prompt,
            "params": self.params,
            "sample_index": self.sample_index,
            "prompt_hash": prompt_hash(self.prompt),
        } | self.generation.to_json()


class ResponseStore:
    """SQLite-backed responses; one connection per store object, used from one thread.

    path: the database file (created with its folder). Readers in other processes may open the
    same file while a collection writes (WAL mode).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
        self._db.executescript(SCHEMA)
        self._db.commit()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def put(
        self,
        teacher_id: str,
        prompt: Prompt,
        params: SamplingParams,
        sample_index: int,
        generation: Generation,
    ) -> bool:
        """Store one response and commit; False (and nothing written) if the key already exists."""
        return self.put_many(teacher_id, prompt, params, [(sample_index, generation)]) == 1

    def put_many(
        self,
        teacher_id: str,
        prompt: Prompt,
        params: SamplingParams,
        samples: Sequence[tuple[int, Generation]],
    ) -> int:
        """Store several samples of one prompt in one transaction; returns how many were new."""
        p_hash, s_hash = prompt_hash(prompt), params.hash()
        now = time.time()
        rows = [
            (
                teacher_id,
                p_hash,
                s_hash,
                index,
                json.dumps(prompt, ensure_ascii=False),
                json.dumps(params.to_json()),
                json.dumps(generation.to_json(), ensure_ascii=False),
                now,
            )
            for index, generation in samples
        ]
        with self._db:
            cursor = self._db.executemany(
                "INSERT OR IGNORE INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows
            )
            inserted = cursor.rowcount  # summed over rows; an ignored duplicate counts 0
            self._db.execute(
                "DELETE FROM failures WHERE teacher_id=? AND prompt_hash=? AND params_hash=?",
                (teacher_id, p_hash, s_hash),
            )
        return inserted

    def record_failure(self, teacher_id: str, prompt: Prompt, params: SamplingParams, error: str) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO failures VALUES (?, ?, ?, ?, 1, ?) ON CONFLICT DO UPDATE SET "
                "error=excluded.error, attempts=attempts+1, updated_at=excluded.updated_at",
                (teacher_id, prompt_hash(prompt), params.hash(), error[:2000], time.time()),
            )

    # ------------------------------------------------------------------ reading

    def sample_indices(self, teacher_id: str, prompt: Prompt, params: SamplingParams) -> set[int]:
        rows = self._db.execute(
            "SELECT sample_index FROM responses WHERE teacher_id=? AND prompt_hash=? AND params_hash=?",
            (teacher_id, prompt_hash(prompt), params.hash()),
        )
        return {r[0] for r in rows}

    def missing(
        self, teacher_id: str, prompts: Sequence[Prompt], params: SamplingParams, n: int
    ) -> dict[int, list[int]]:
        """{prompt position: sample indices in [0, n) not stored yet}; complete prompts are left out.

        Repeated prompts count once (the first position), since they share a key.
        """
        held: dict[str, set[int]] = {}
        rows = self._db.execute(
            "SELECT prompt_hash, sample_index FROM responses WHERE teacher_id=? AND params_hash=?",
            (teacher_id, params.hash()),
        )
        for p_hash, index in rows:
            held.setdefault(p_hash, set()).add(index)
        out, seen = {}, set()
        for position, prompt in enumerate(prompts):
            p_hash = prompt_hash(prompt)
            if p_hash in seen:
                continue
            seen.add(p_hash)
            lacking = [i for i in range(n) if i not in held.get(p_hash, set())]
            if lacking:
                out[position] = lacking
        return out

    def get(
        self, teacher_id: str, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Generation]]:
        """The stored samples 0..n-1 of each prompt, in order; KeyError naming the first gap."""
        out = []
        for prompt in prompts:
            rows = dict(
                self._db.execute(
                    "SELECT sample_index, response FROM responses WHERE teacher_id=? AND prompt_hash=? "
                    "AND params_hash=? AND sample_index < ?",
                    (teacher_id, prompt_hash(prompt), params.hash(), n),
                ).fetchall()
            )
            if len(rows) < n:
                raise KeyError(
                    f"the store holds {len(rows)} of {n} samples of prompt {str(prompt)[:60]!r} from "
                    f"{teacher_id}; run collect() first"
                )
            out.append([Generation.from_json(json.loads(rows[i])) for i in range(n)])
        return out

    def failures(self, teacher_id: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT teacher_id, prompt_hash, params_hash, error, attempts FROM failures"
        rows = self._db.execute(
            query + (" WHERE teacher_id=?" if teacher_id else ""), (teacher_id,) if teacher_id else ()
        )
        keys = ("teacher_id", "prompt_hash", "params_hash", "error", "attempts")
        return [dict(zip(keys, r)) for r in rows]

    def count(self, teacher_id: str | None = None) -> int:
        if teacher_id is None:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        return self._db.execute(
            "SELECT COUNT(*) FROM responses WHERE teacher_id=?", (teacher_id,)
        ).fetchone()[0]

    def records(self, teacher_id: str | None = None) -> Iterator[Record]:
        """Every stored response (optionally of one teacher), ordered by key."""
        query = "SELECT teacher_id, prompt, params, sample_index, response FROM responses"
        args: tuple[Any, ...] = ()
        if teacher_id is not None:
            query, args = query + " WHERE teacher_id=?", (teacher_id,)
        for t_id, prompt, params, index, response in self._db.execute(
            query + " ORDER BY teacher_id, prompt_hash, params_hash, sample_index", args
        ):
            yield Record(
                t_id,
                json.loads(prompt),
                json.loads(params),
                index,
                Generation.from_json(json.loads(response)),
            )

    # ------------------------------------------------------------------ export

    def to_jsonl(self, path: str | Path, teacher_id: str | None = None) -> int:
        """Write one JSON object per response (key fields + the generation); returns the count."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        count = 0
        tmp = path.with_suffix(path.suffix + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for record in self.records(teacher_id):
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
                count += 1
        tmp.replace(path)
        return count

    def to_dataset(self, teacher_id: str | None = None) -> Any:
        """A `datasets.Dataset` with columns teacher_id, prompt, completion, sample_index,
        finish_reason, token_logprobs (list or None) and params (JSON text)."""
        try:
            from datasets import Dataset
        except ImportError as error:  # pragma: no cover - datasets is in the lm extra
            raise ImportError("to_dataset needs the 'datasets' package (pip install kdkit[lm])") from error
        rows = [
            {
                "teacher_id": r.teacher_id,
                "prompt": r.prompt if isinstance(r.prompt, str) else json.dumps(r.prompt),
                "completion": r.generation.text,
                "sample_index": r.sample_index,
                "finish_reason": r.generation.finish_reason,
                "token_logprobs": r.generation.token_logprobs,
                "params": json.dumps(r.params, sort_keys=True),
            }
            for r in self.records(teacher_id)
        ]
        return Dataset.from_list(rows)


# ---------------------------------------------------------------------- collection


@dataclass
class CollectionReport:
    """What one `collect` call did. requested: prompts sent (not counting retries); stored: new
    responses written; already: responses the store held before; failed: prompts that failed."""

    teacher_id: str
    total: int
    already: int
    requested: int
    stored: int
    failed: int
    seconds: float

    @property
    def complete(self) -> bool:
        return self.already + self.stored == self.total

    def to_json(self) -> dict[str, Any]:
        return self.__dict__ | {"complete": self.complete}


def collect(
    teacher: TextTeacher,
    store: ResponseStore,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    n: int = 1,
    *,
    progress: bool = True,
    description: str | None = None,
) -> CollectionReport:
    """Make the store hold samples 0..n-1 of every prompt from `teacher`; ask only for what is missing.

    Each request asks for one prompt's missing samples (n at most); responses are committed as
    they arrive. A prompt whose request failed (retries exhausted, a per-prompt 4xx) is recorded
    in the failures table and left for the next call; the rest go on. The progress bar shows
    done / pending / failed and the request rate.
    """
    from tqdm.auto import tqdm

    started = time.perf_counter()
    unique = {prompt_hash(p) for p in prompts}
    total = len(unique) * n
    missing = store.missing(teacher.teacher_id, prompts, params, n)
    need = sum(len(v) for v in missing.values())
    already = total - need
    requests = [(position, prompts[position], len(indices)) for position, indices in missing.items()]
    stored = failed = 0
    bar = tqdm(
        total=total,
        initial=already,
        desc=description or f"collect {teacher.teacher_id}",
        disable=not progress,
        unit="resp",
        dynamic_ncols=True,
    )
    try:
        for done_requests, (position, result) in enumerate(teacher.stream(requests, params), start=1):
            prompt = prompts[position]
            if isinstance(result, BaseException):
                failed += 1
                store.record_failure(teacher.teacher_id, prompt, params, str(result))
                log.warning("teacher request failed for prompt %d: %s", position, result)
            else:
                indices = missing[position]
                if len(result) != len(indices):
                    failed += 1
                    store.record_failure(
                        teacher.teacher_id, prompt, params, f"asked {len(indices)} samples, got {len(result)}"
                    )
                else:
                    new = store.put_many(teacher.teacher_id, prompt, params, list(zip(indices, result)))
                    stored += new
                    bar.update(new)
            rate = done_requests / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(
                done=already + stored, pending=total - already - stored, failed=failed, req_s=f"{rate:.1f}"
            )
    finally:
        bar.close()
    report = CollectionReport(
        teacher.teacher_id, total, already, len(requests), stored, failed, time.perf_counter() - started
    )
    log.info("collection %s", report.to_json())
    return report


__all__ = ["CollectionReport", "Record", "ResponseStore", "collect"]
