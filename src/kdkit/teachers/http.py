"""A teacher behind an OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp, TGI, ...).

Speaks ``/v1/completions`` (plain prompts; sampled-token and top-k log-probs with ``logprobs``;
scoring of given text with ``echo`` + ``logprobs``, which vLLM offers) and
``/v1/chat/completions`` (message lists; ``logprobs`` + ``top_logprobs``). Standard library only:
one thread per in-flight request, up to `max_concurrency`.

Reliability, per request:

- a timeout (`timeout_s`, on connecting and on every read);
- retries with exponential backoff and jitter on 429, 408/409, 5xx, timeouts, dropped
  connections and malformed or incomplete JSON: the k-th retry waits
  ``d/2 + uniform(0, d/2)`` with ``d = min(backoff_max_s, backoff_base_s · 2**k)``, and at least
  the server's ``Retry-After`` (seconds or an HTTP date, capped at `max_retry_after_s`);
- a requests-per-minute limit shared by all threads (request starts are spaced 60/rpm s apart;
  retries count as requests);
- any other 4xx is not retried: `TeacherRequestError` with the status and the server's message.
  401/403/404/405 concern every request (a wrong key, model or URL) and end the whole stream.

The API key is read from the environment variable named by `api_key_env` when the teacher is
built, sent only in the ``Authorization`` header, and never written anywhere: not in `describe()`
(which names the variable, not its value), logs or exception texts (server messages that echo it
are redacted).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal
from urllib.parse import urlsplit

from kdkit.teachers.base import (
    Generation,
    Outcome,
    Prompt,
    Request,
    SamplingParams,
    Scored,
    TeacherError,
    TeacherRequestError,
    TeacherUnavailableError,
    TextTeacher,
)

log = logging.getLogger(__name__)

#: 4xx statuses that are transient by definition (retried like 5xx).
RETRYABLE_4XX = frozenset({408, 409, 429})
#: 4xx statuses that concern every request: the stream stops instead of failing prompt by prompt.
FATAL_4XX = frozenset({401, 403, 404, 405})
REDACTED = "***"


class _Retryable(Exception):
    """Internal: an attempt failed in a way a retry can fix."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class RateLimiter:
    """Space request starts at least 60/rpm seconds apart across threads (None = unlimited)."""

    def __init__(self, requests_per_minute: float | None) -> None:
        if requests_per_minute is not None and requests_per_minute <= 0:
            raise ValueError(f"requests_per_minute must be > 0 or None, got {requests_per_minute}")
        self.interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Block until this request may start; returns the seconds waited."""
        if not self.interval:
            return 0.0
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        wait_s = start - now
        if wait_s > 0:
            time.sleep(wait_s)
        return wait_s


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class OpenAITeacher(TextTeacher):
    """A text teacher served over an OpenAI-compatible API (see the module docstring).

    base_url: the API root, e.g. "http://127.0.0.1:8000/v1". model: the served model name.
    api: "completions" or "chat". api_key_env: the environment variable holding the key (None:
    no key, e.g. a local vLLM). extra_body: fields merged into every request body (e.g. vLLM's
    {"top_k": 50, "return_tokens_as_token_ids": true}). teacher_id: the store key's teacher name
    (default "<api>:<model>@<host/path>").
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api: Literal["completions", "chat"] = "completions",
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        max_retries: int = 6,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        requests_per_minute: float | None = None,
        extra_body: dict[str, Any] | None = None,
        score_max_tokens: int = 1,
        teacher_id: str | None = None,
        seed: int | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL like http://host:8000/v1, got {base_url!r}")
        if parts.username or parts.password:
            raise ValueError("put credentials in the environment variable named by api_key_env, not the URL")
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("need max_concurrency >= 1, max_retries >= 0 and timeout_s > 0")
        self._api_key: str | None = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise TeacherRequestError(
                    f"the environment variable {api_key_env} (api_key_env) is not set or empty"
                )
            self._api_key = key
        self.base_url = base_url.rstrip("/")
        self._scheme, self._host, self._port = parts.scheme, parts.hostname, parts.port
        self._root = parts.path.rstrip("/")
        self.model, self.api, self.api_key_env = model, api, api_key_env
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.requests_per_minute = requests_per_minute
        self.limiter = RateLimiter(requests_per_minute)
        self.extra_body = dict(extra_body or {})
        self.score_max_tokens = score_max_tokens
        self.teacher_id = teacher_id or f"{api}:{model}@{parts.hostname}:{parts.port or ''}{self._root}"
        self.can_score = api == "completions"
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._counts_lock = threading.Lock()
        self.counts = {"requests": 0, "retries": 0, "failures": 0}

    # ------------------------------------------------------------------ description / secrets

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "openai",
            "teacher_id": self.teacher_id,
            "base_url": self.base_url,
            "model": self.model,
            "api": self.api,
            "api_key_env": self.api_key_env,  # the variable's name, never its value
            "max_concurrency": self.max_concurrency,
            "timeout_s": self.timeout_s,
            "max_retries": self.max_retries,
            "requests_per_minute": self.requests_per_minute,
        }

    def __repr__(self) -> str:
        return f"OpenAITeacher({self.teacher_id!r}, api_key_env={self.api_key_env!r})"

    def redact(self, text: str) -> str:
        """`text` with every occurrence of the API key replaced by ***."""
        return text.replace(self._api_key, REDACTED) if self._api_key else text

    # ------------------------------------------------------------------ public API

    def stream(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[Outcome]:
        """Run the requests on up to `max_concurrency` threads; yield each outcome as it lands.

        Only `max_concurrency` requests are in flight at a time, so stopping the iteration (or a
        crash) abandons at most that many. A fatal 4xx (401/403/404/405) is raised.
        """
        abort = threading.Event()
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="kdkit-teacher")
        pending: dict[Future[list[Generation]], int] = {}
        todo = iter(requests)
        try:
            while True:
                while len(pending) < self.max_concurrency:
                    item = next(todo, None)
                    if item is None:
                        break
                    index, prompt, n = item
                    pending[pool.submit(self._generate_one, prompt, n, params, abort)] = index
                if not pending:
                    return
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    index = pending.pop(future)
                    error = future.exception()
                    if error is None:
                        yield index, future.result()
                    elif isinstance(error, TeacherRequestError) and error.status in FATAL_4XX:
                        raise error
                    elif isinstance(error, TeacherError):
                        yield index, error
                    else:
                        raise error
        finally:
            abort.set()
            pool.shutdown(wait=False, cancel_futures=True)

    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], top_logprobs: int = 0
    ) -> list[Scored]:
        """Teacher log-probs of each continuation via ``echo`` (completions API only).

        The server tokenizes prompt + continuation together; the continuation's tokens are those
        whose text offset is at or after the prompt's end (a token straddling the boundary counts
        as the prompt's).
        """
        if self.api != "completions":
            raise TeacherRequestError(
                "scoring given text needs the completions API (echo + logprobs); chat has no echo. "
                "Use api='completions' with a server that offers echo (e.g. vLLM)"
            )
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        abort = threading.Event()
        with ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="kdkit-score") as pool:
            futures = [
                pool.submit(self._score_one, p, c, top_logprobs, abort)
                for p, c in zip(prompts, continuations)
            ]
            try:
                return [f.result() for f in futures]
            finally:
                abort.set()

    # ------------------------------------------------------------------ one request

    def _payload(self, prompt: Prompt, n: int, params: SamplingParams) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "n": n,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        if self.api == "completions":
            if not isinstance(prompt, str):
                raise TeacherRequestError(
                    "the completions API takes text prompts; use api='chat' for messages"
                )
            body["prompt"] = prompt
            if params.top_logprobs is not None:
                body["logprobs"] = params.top_logprobs
            path = "/completions"
        else:
            body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            if params.top_logprobs is not None:
                body["logprobs"] = True
                body["top_logprobs"] = params.top_logprobs
            path = "/chat/completions"
        return path, body | self.extra_body

    def _generate_one(
        self, prompt: Prompt, n: int, params: SamplingParams, abort: threading.Event
    ) -> list[Generation]:
        path, body = self._payload(prompt, n, params)
        parse = _parse_completions if self.api == "completions" else _parse_chat
        return self._call(path, body, lambda data: parse(data, n), abort)

    def _score_one(self, prompt: Prompt, continuation: str, k: int, abort: threading.Event) -> Scored:
        if not isinstance(prompt, str):
            raise TeacherRequestError("scoring takes text prompts")
        body = {
            "model": self.model,
            "prompt": prompt + continuation,
            "max_tokens": self.score_max_tokens,
            "temperature": 0.0,
            "echo": True,
            "logprobs": k,
        } | self.extra_body
        start, end = len(prompt), len(prompt) + len(continuation)
        return self._call("/completions", body, lambda data: _parse_echo(data, start, end), abort)

    def _call(self, path: str, body: dict[str, Any], parse: Any, abort: threading.Event) -> Any:
        """POST with retries (see the module docstring); returns parse(response JSON)."""
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if abort.is_set():
                raise TeacherUnavailableError("request abandoned: the collection stopped")
            self.limiter.acquire()
            self._count("requests")
            try:
                return self._attempt(path, body, parse)
            except _Retryable as failure:
                last = failure.reason
                if attempt == self.max_retries:
                    break
                delay = self._backoff(attempt, failure.retry_after)
                self._count("retries")
                log.warning(
                    "teacher request to %s failed (%s); retry %d/%d in %.2f s",
                    path,
                    failure.reason,
                    attempt + 1,
                    self.max_retries,
                    delay,
                )
                if abort.wait(delay):
                    raise TeacherUnavailableError("request abandoned: the collection stopped") from None
        self._count("failures")
        raise TeacherUnavailableError(
            f"{self.teacher_id}{path}: gave up after {self.max_retries + 1} attempts; last failure: {last}"
        )

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        with self._rng_lock:
            delay = cap / 2 + self._rng.uniform(0, cap / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    def _count(self, name: str) -> None:
        with self._counts_lock:
            self.counts[name] += 1

    def _attempt(self, path: str, body: dict[str, Any], parse: Any) -> Any:
        connection_type = (
            http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        )
        connection = connection_type(self._host, self._port, timeout=self.timeout_s)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            connection.request("POST", self._root + path, body=json.dumps(body).encode(), headers=headers)
            response = connection.getresponse()
            status, retry_after, raw = response.status, response.getheader("Retry-After"), response.read()
        except TimeoutError as error:
            raise _Retryable(f"timed out after {self.timeout_s:g} s") from error
        except (http.client.HTTPException, OSError) as error:  # refused, reset, closed mid-response
            raise _Retryable(self.redact(f"connection error: {type(error).__name__}: {error}")) from error
        finally:
            connection.close()
        if status == 429 or status >= 500 or status in RETRYABLE_4XX:
            raise _Retryable(f"HTTP {status}", parse_retry_after(retry_after))
        if status != 200:
            message = f"HTTP {status} from {self.base_url}{path} (not retried): {_server_message(raw)}"
            raise TeacherRequestError(self.redact(message), status)
        try:
            return parse(json.loads(raw))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            raise _Retryable(
                f"malformed response: {type(error).__name__}: {self.redact(str(error))[:200]}"
            ) from error


# ---------------------------------------------------------------------- response parsing


def _server_message(raw: bytes) -> str:
    """The error message of an OpenAI-style error body, else the body's first 300 characters."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message") if isinstance(error, dict) else None
        return str(message or error)[:300]
    except ValueError:
        return text[:300]


def _choices(data: dict[str, Any], n: int) -> list[dict[str, Any]]:
    choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ValueError(f"asked for {n} choices, got {len(choices)}")
    return choices


def _parse_completions(data: dict[str, Any], n: int) -> list[Generation]:
    out = []
    for choice in _choices(data, n):
        text = choice["text"]
        if not isinstance(text, str):
            raise TypeError("choice text is not a string")
        generation = Generation(text=text, finish_reason=choice.get("finish_reason"))
        logprobs = choice.get("logprobs")
        if logprobs:
            generation.tokens = list(logprobs["tokens"])
            generation.token_logprobs = [float(x) for x in logprobs["token_logprobs"]]
            top = logprobs.get("top_logprobs")
            if top is not None:
                generation.top_logprobs = [{str(k): float(v) for k, v in (t or {}).items()} for t in top]
        out.append(generation)
    return out


def _parse_chat(data: dict[str, Any], n: int) -> list[Generation]:
    out = []
    for choice in _choices(data, n):
        text = choice["message"]["content"] or ""
        generation = Generation(text=text, finish_reason=choice.get("finish_reason"))
        logprobs = choice.get("logprobs")
        if logprobs and logprobs.get("content") is not None:
            content = logprobs["content"]
            generation.tokens = [str(t["token"]) for t in content]
            generation.token_logprobs = [float(t["logprob"]) for t in content]
            if any(t.get("top_logprobs") for t in content):
                generation.top_logprobs = [
                    {str(a["token"]): float(a["logprob"]) for a in t.get("top_logprobs") or []}
                    for t in content
                ]
        out.append(generation)
    return out


def _parse_echo(data: dict[str, Any], start: int, end: int) -> Scored:
    logprobs = data["choices"][0]["logprobs"]
    offsets, tokens = logprobs["text_offset"], logprobs["tokens"]
    values, top = logprobs["token_logprobs"], logprobs.get("top_logprobs")
    keep = [i for i, offset in enumerate(offsets) if start <= offset < end and i > 0]
    if not keep and end > start:
        raise ValueError("the echoed tokens do not cover the continuation (does the server offer echo?)")
    return Scored(
        tokens=[str(tokens[i]) for i in keep],
        token_logprobs=[float(values[i]) for i in keep],
        top_logprobs=None
        if top is None
        else [{str(k): float(v) for k, v in (top[i] or {}).items()} for i in keep],
    )


__all__ = ["OpenAITeacher", "RateLimiter", "TeacherError", "parse_retry_after"]
