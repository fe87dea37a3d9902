"""The OpenAI-compatible teacher against the project's own server serving a real tiny LM."""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import pytest
import torch

from kdkit.teachers import (
    BackendUnavailableError,
    HFTeacher,
    OpenAITeacher,
    RateLimiter,
    ResponseStore,
    SamplingParams,
    TeacherRequestError,
    VLLMTeacher,
    collect,
    vllm_available,
)
from kdkit.teachers.http import parse_retry_after
from tests.teachers.server import FAULTS, TinyLMServer

FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}


def model_logprobs(tiny_lm: tuple[Any, Any], prompt: str, continuation: str | list[str]) -> list[float]:
    """log p(continuation's tokens | prompt) computed directly from the model (text or token names)."""
    model, tok = tiny_lm
    p_ids = tok(prompt)["input_ids"]
    if isinstance(continuation, str):
        c_ids = tok(continuation, add_special_tokens=False)["input_ids"]
    else:
        c_ids = tok.convert_tokens_to_ids(continuation)
    with torch.no_grad():
        lp = model(input_ids=torch.tensor([p_ids + c_ids])).logits[0].log_softmax(-1)
    return [float(lp[len(p_ids) - 1 + i, t]) for i, t in enumerate(c_ids)]


def test_completions_samples_carry_the_models_own_logprobs(server: TinyLMServer, tiny_lm) -> None:
    teacher = OpenAITeacher(server.url, "tiny", **FAST)
    params = SamplingParams(temperature=1.0, max_tokens=8, top_logprobs=3, seed=1)
    (samples,) = teacher.generate(["12+34="], params, n=3)
    assert len(samples) == 3
    for sample in samples:
        assert len(sample.tokens) == len(sample.token_logprobs) == len(sample.top_logprobs) > 0
        assert "".join(t for t in sample.tokens if not t.startswith("<")) == sample.text
        expected = model_logprobs(tiny_lm, "12+34=", sample.tokens)
        assert sample.token_logprobs == pytest.approx(expected, abs=1e-4)
        for lp, top in zip(sample.token_logprobs, sample.top_logprobs):
            assert len(top) == 3 and lp <= max(top.values()) + 1e-6
    assert server.answered() == 1  # n samples in one request


def test_chat_api_returns_text_and_top_logprobs(server: TinyLMServer, tiny_lm) -> None:
    teacher = OpenAITeacher(server.url, "tiny", api="chat", **FAST)
    (samples,) = teacher.generate(
        [[{"role": "user", "content": "7+8="}]], SamplingParams(max_tokens=6, top_logprobs=2), n=2
    )
    assert len(samples) == 2
    expected = model_logprobs(tiny_lm, "7+8=", samples[0].tokens)
    assert samples[0].token_logprobs == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 2 for top in samples[0].top_logprobs)
    with pytest.raises(TeacherRequestError, match="completions API"):
        teacher.score(["7+8="], ["15"])


def test_echo_scoring_matches_the_model_and_the_local_backend(server: TinyLMServer, tiny_lm) -> None:
    served = OpenAITeacher(server.url, "tiny", **FAST)
    local = HFTeacher(*tiny_lm, teacher_id="tiny")
    prompts, continuations = ["12+34=", "5+5="], ["2+4+0=06|", "5+5+0=10|=10"]
    remote = served.score(prompts, continuations, top_logprobs=4)
    here = local.score(prompts, continuations, top_logprobs=4)
    for r, h, p, c in zip(remote, here, prompts, continuations):
        assert r.tokens == h.tokens == list(c)
        assert r.token_logprobs == pytest.approx(model_logprobs(tiny_lm, p, c), abs=1e-4)
        assert h.token_logprobs == pytest.approx(r.token_logprobs, abs=1e-4)
        assert [sorted(t) for t in r.top_logprobs] == [sorted(t) for t in h.top_logprobs]


def test_every_injected_fault_is_survived_and_the_store_holds_one_response_per_key(
    server: TinyLMServer, tmp_path
) -> None:
    server.faults.extend(FAULTS * 2)  # delay, 500, 429 (Retry-After 0.2 s), malformed, drop — twice
    teacher = OpenAITeacher(server.url, "tiny", max_concurrency=3, timeout_s=0.5, max_retries=6, **FAST)
    prompts = [f"{i}+{2 * i}=" for i in range(12)]
    params = SamplingParams(max_tokens=5)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        report = collect(teacher, store, prompts, params, n=2, progress=False)
        assert report.complete and report.failed == 0 and report.stored == 24
        assert not server.faults  # every fault was served
        for fault in FAULTS:
            assert server.count(fault) == 2, fault
        assert teacher.counts["retries"] >= len(FAULTS) * 2
        rows = store._db.execute(
            "SELECT prompt_hash, sample_index, COUNT(*) FROM responses GROUP BY prompt_hash, sample_index"
        ).fetchall()
        assert len(rows) == 24 and all(count == 1 for *_, count in rows)
        assert store.missing(teacher.teacher_id, prompts, params, 2) == {}
        # A second run asks for nothing.
        before = len(server.events)
        again = collect(teacher, store, prompts, params, n=2, progress=False)
        assert again.requested == 0 and len(server.events) == before


def test_retry_after_is_honoured(server: TinyLMServer) -> None:
    server.retry_after = "1"
    server.faults.append("429")
    teacher = OpenAITeacher(server.url, "tiny", backoff_base_s=0.001, backoff_max_s=0.002)
    teacher.generate(["1+1="], SamplingParams(max_tokens=3))
    first, second = server.events
    assert first["outcome"] == "429" and second["status"] == 200
    assert second["time"] - first["time"] >= 0.95  # backoff alone would wait ~1 ms


def test_a_4xx_that_retrying_cannot_fix_is_raised_after_one_request(server: TinyLMServer, tmp_path) -> None:
    teacher = OpenAITeacher(server.url, "no-such-model", **FAST)
    with ResponseStore(tmp_path / "r.sqlite") as store, pytest.raises(TeacherRequestError, match="HTTP 404"):
        collect(teacher, store, ["1+1=", "2+2="], SamplingParams(max_tokens=3), progress=False)
    assert len(server.events) <= 2 and teacher.counts["retries"] == 0


def test_exhausted_retries_are_recorded_and_fetched_by_the_next_run(server: TinyLMServer, tmp_path) -> None:
    server.faults.extend(["500"] * 3)
    teacher = OpenAITeacher(server.url, "tiny", max_concurrency=1, max_retries=2, **FAST)
    params = SamplingParams(max_tokens=3)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        report = collect(teacher, store, ["1+1=", "2+2="], params, progress=False)
        assert report.failed == 1 and report.stored == 1 and not report.complete
        (failure,) = store.failures()
        assert "HTTP 500" in failure["error"]
        report = collect(teacher, store, ["1+1=", "2+2="], params, progress=False)
        assert report.requested == 1 and report.complete and store.failures() == []


def test_requests_per_minute_spaces_request_starts() -> None:
    limiter = RateLimiter(requests_per_minute=1200)  # one per 50 ms
    started = time.monotonic()
    for _ in range(6):
        limiter.acquire()
    assert time.monotonic() - started >= 0.25 - 1e-3
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_rate_limit_holds_across_threads(server: TinyLMServer) -> None:
    teacher = OpenAITeacher(server.url, "tiny", max_concurrency=4, requests_per_minute=600, **FAST)
    teacher.generate([f"{i}+1=" for i in range(5)], SamplingParams(max_tokens=2))
    times = sorted(e["time"] for e in server.events)
    # Starts are 60/600 s apart; arrival times at the server jitter, so check the whole span.
    assert times[-1] - times[0] >= 4 * 0.1 - 0.05


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= parse_retry_after(future) <= 31


def test_api_key_never_reaches_any_file_log_or_exception(tiny_lm, tmp_path, monkeypatch) -> None:
    key = "sk-kdkit-test-7f3a9c2e51b84d06"
    wrong = "sk-kdkit-wrong-2b9d7e1f00aa"
    monkeypatch.setenv("KDKIT_TEST_KEY", key)
    monkeypatch.setenv("KDKIT_WRONG_KEY", wrong)
    run = tmp_path / "run"
    run.mkdir()
    handler = logging.FileHandler(run / "run.log")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        with TinyLMServer(*tiny_lm, api_key=key) as server:
            server.faults.extend(["500", "429", "malformed"])
            teacher = OpenAITeacher(server.url, "tiny", api_key_env="KDKIT_TEST_KEY", **FAST)
            params = SamplingParams(max_tokens=4, top_logprobs=2)
            with ResponseStore(run / "responses.sqlite") as store:
                assert collect(teacher, store, ["1+2=", "3+4="], params, n=2, progress=False).complete
                store.to_jsonl(run / "responses.jsonl")
                store.to_dataset().save_to_disk(str(run / "dataset"))
            (run / "config.json").write_text(json.dumps({"teacher": teacher.describe()}))
            (run / "repr.txt").write_text(repr(teacher) + str(vars(teacher).get("counts")))
            bad = OpenAITeacher(server.url, "tiny", api_key_env="KDKIT_WRONG_KEY", **FAST)
            with pytest.raises(TeacherRequestError) as caught:
                bad.generate(["1+1="], params)
            message = str(caught.value)
            assert "HTTP 401" in message and wrong not in message and "***" in message
            (run / "error.txt").write_text(message)
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
    assert json.loads((run / "config.json").read_text())["teacher"]["api_key_env"] == "KDKIT_TEST_KEY"
    assert "retry" in (run / "run.log").read_text()  # the log did record the faults
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 6
    for path in files:
        data = path.read_bytes()
        assert key.encode() not in data and wrong.encode() not in data, path


def test_missing_key_variable_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.delenv("KDKIT_ABSENT_KEY", raising=False)
    with pytest.raises(TeacherRequestError, match="KDKIT_ABSENT_KEY"):
        OpenAITeacher("http://127.0.0.1:9/v1", "m", api_key_env="KDKIT_ABSENT_KEY")
    with pytest.raises(ValueError, match="api_key_env"):
        OpenAITeacher("http://user:secret@127.0.0.1:9/v1", "m")


def test_vllm_backend_says_clearly_why_it_is_unavailable() -> None:
    usable, reason = vllm_available()
    if usable:
        pytest.skip("vLLM and a GPU are present")
    with pytest.raises(BackendUnavailableError, match="vLLM") as caught:
        VLLMTeacher("some/model")
    assert reason in str(caught.value)


def test_local_backend_batches_and_reports_its_own_logprobs(tiny_lm) -> None:
    teacher = HFTeacher(*tiny_lm, teacher_id="tiny", batch_size=4)
    params = SamplingParams(max_tokens=6, top_logprobs=3)
    out = teacher.generate(["1+1=", "22+33=", "9+9="], params, n=3)  # 9 rows -> batches of 4, 4, 1
    assert [len(samples) for samples in out] == [3, 3, 3]
    for prompt, samples in zip(["1+1=", "22+33=", "9+9="], out):
        for sample in samples:
            expected = model_logprobs(tiny_lm, prompt, sample.tokens)
            assert sample.token_logprobs == pytest.approx(expected, abs=1e-4)
            assert all(math.isfinite(x) and x <= 0 for x in sample.token_logprobs)
