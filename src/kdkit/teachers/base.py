"""The one interface every text teacher offers: sample continuations, optionally score given ones.

A *text teacher* is reachable only through text (an HTTP API, a local generator): it returns
sampled continuations, and where the backend offers them, the log-probabilities of the sampled
tokens and of the top-k alternatives at each position. Where the backend can score a given text
(prompt log-probs / ``echo``), `score` returns the teacher's log-probs of a continuation the
*student* wrote, which is what on-policy distillation from a served teacher needs.

Prompts are plain strings, or chat message lists (``[{"role": "user", "content": ...}, ...]``)
for backends that speak chat.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

Prompt = str | list[dict[str, str]]


class TeacherError(RuntimeError):
    """A teacher could not answer. The message never contains credentials."""


class TeacherRequestError(TeacherError):
    """The request itself is wrong (a 4xx other than 408/409/429): retrying cannot fix it."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class TeacherUnavailableError(TeacherError):
    """Transient failures (timeouts, 429, 5xx, dropped connections) outlasted every retry."""


class BackendUnavailableError(TeacherError):
    """The backend cannot run here (a missing optional package or no GPU)."""


@dataclass(frozen=True)
class SamplingParams:
    """How a teacher samples. Part of the response-store key (see `params_hash`).

    temperature: sampling temperature (0 = greedy). top_p: nucleus mass. max_tokens: the most
    new tokens per sample. stop: strings that end a sample (not included in the text). seed: the
    backend's sampling seed where it offers one (None = unseeded). top_logprobs: return the
    log-probs of the k most likely tokens at every sampled position (0 = only the sampled
    tokens' own log-probs where the backend offers them; None = no log-probs at all).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0 or None, got {self.top_logprobs}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"stop": list(self.stop)}

    def hash(self) -> str:
        """A stable 16-hex-digit hash of every field (the store's sampling-parameters key)."""
        return stable_hash(self.to_json())


def stable_hash(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces), first 16 hex digits."""
    blob = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def prompt_hash(prompt: Prompt) -> str:
    """The store's prompt key: a hash of the text, or of the canonical JSON of a message list."""
    return stable_hash(prompt)


@dataclass
class Generation:
    """One sampled continuation.

    text: the continuation (prompt excluded, stop string excluded). finish_reason: "stop" (EOS or
    a stop string) or "length" (max_tokens reached), as the backend reports it. tokens: the
    continuation's tokens as the backend names them (empty if it returned no log-probs).
    token_logprobs: [len(tokens)] log p_T of each sampled token (nats). top_logprobs:
    [len(tokens)] dicts {token: log-prob} of the k most likely tokens at each position, or None.
    """

    text: str
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Generation:
        return cls(**data)


@dataclass
class Scored:
    """The teacher's log-probs of a given continuation (prompt scoring / echo).

    tokens: the continuation's tokens. token_logprobs: [len(tokens)] log p_T(token | prefix).
    top_logprobs: [len(tokens)] dicts {token: log-prob} of the k most likely tokens, or None.
    """

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None = None


# One unit of work: (position in the caller's list, prompt, number of samples wanted).
Request = tuple[int, Prompt, int]
# What a backend yields per request: the generations, or the error that ended it.
Outcome = tuple[int, list[Generation] | BaseException]


class TextTeacher:
    """Base class of text teachers. Subclasses implement `stream` (and `score` where offered).

    teacher_id: a stable name for the teacher's identity (model and endpoint, never a secret);
    it is the first part of every response-store key, so a different teacher never reuses
    another's responses.
    """

    teacher_id: str = "teacher"
    #: True where `score` is implemented (the backend offers prompt log-probs / echo).
    can_score: bool = False

    def stream(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[Outcome]:
        """Yield `(index, generations | error)` for each request as it finishes (any order).

        A request's error is yielded, not raised, so one bad prompt does not end a collection;
        errors that concern every request (a wrong key, a bad URL) are raised.
        """
        raise NotImplementedError

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams, n: int = 1
    ) -> list[list[Generation]]:
        """`n` samples for each prompt, in the prompts' order; raises the first request error."""
        out: list[list[Generation] | None] = [None] * len(prompts)
        for index, result in self.stream([(i, p, n) for i, p in enumerate(prompts)], params):
            if isinstance(result, BaseException):
                raise result
            out[index] = result
        return [r if r is not None else [] for r in out]

    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], top_logprobs: int = 0
    ) -> list[Scored]:
        """The teacher's log-probs of each continuation given its prompt (where offered)."""
        raise TeacherRequestError(f"{type(self).__name__} does not offer scoring of given text")

    def describe(self) -> dict[str, Any]:
        """A JSON-safe description for run configs and reports (never a credential)."""
        return {"backend": type(self).__name__, "teacher_id": self.teacher_id}
