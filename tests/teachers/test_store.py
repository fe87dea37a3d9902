"""The durable response store: keys, exports, and resuming a collection killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kdkit.teachers import Generation, HFTeacher, OpenAITeacher, ResponseStore, SamplingParams, collect
from tests.teachers.server import TinyLMServer

ROOT = Path(__file__).resolve().parents[2]


def test_keys_separate_teachers_params_and_sample_indices(tmp_path) -> None:
    a, b = SamplingParams(temperature=0.7), SamplingParams(temperature=1.0)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        assert store.put("t1", "1+1=", a, 0, Generation("2"))
        assert not store.put("t1", "1+1=", a, 0, Generation("other"))  # the key exists: kept as it was
        assert store.put("t1", "1+1=", b, 0, Generation("3"))
        assert store.put("t2", "1+1=", a, 0, Generation("4"))
        assert store.put_many("t1", "1+1=", a, [(1, Generation("5")), (2, Generation("6"))]) == 2
        assert store.count() == 5 and store.count("t1") == 4
        assert [g.text for g in store.get("t1", ["1+1="], a, n=3)[0]] == ["2", "5", "6"]
        assert store.missing("t1", ["1+1=", "2+2=", "1+1="], a, n=4) == {0: [3], 1: [0, 1, 2, 3]}
        with pytest.raises(KeyError, match="run collect"):
            store.get("t1", ["1+1="], a, n=4)


def test_chat_prompts_and_exports(tmp_path) -> None:
    params = SamplingParams(max_tokens=4, top_logprobs=1)
    chat = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1="}]
    with ResponseStore(tmp_path / "r.sqlite") as store:
        store.put("t", chat, params, 0, Generation("2", "stop", ["2"], [-0.1], [{"2": -0.1}]))
        store.put("t", "3+4=", params, 0, Generation("7", "stop", ["7"], [-0.2], [{"7": -0.2}]))
        assert store.to_jsonl(tmp_path / "out.jsonl") == 2
        lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert {line["text"] for line in lines} == {"2", "7"}
        assert any(line["prompt"] == chat for line in lines)
        dataset = store.to_dataset("t")
        assert len(dataset) == 2 and set(dataset["completion"]) == {"2", "7"}
        columns = ["teacher_id", "prompt", "completion", "sample_index", "finish_reason", "token_logprobs"]
        assert sorted(dataset.column_names) == sorted([*columns, "params"])


def test_local_teacher_collects_into_the_store(tiny_lm, tmp_path) -> None:
    teacher = HFTeacher(*tiny_lm, teacher_id="student:tiny", batch_size=3)
    params = SamplingParams(max_tokens=4, seed=0)
    prompts = [f"{i}+{i}=" for i in range(5)]
    with ResponseStore(tmp_path / "r.sqlite") as store:
        report = collect(teacher, store, prompts, params, n=2, progress=False)
        assert report.complete and report.stored == 10
        assert collect(teacher, store, prompts, params, n=3, progress=False).stored == 5  # only index 2


COLLECTOR = textwrap.dedent(
    """
    import sys
    from kdkit.teachers import OpenAITeacher, ResponseStore, SamplingParams, collect
    url, db, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    teacher = OpenAITeacher(url, "tiny", max_concurrency=2, timeout_s=120)
    with ResponseStore(db) as store:
        prompts = [f"{i}+{i + 1}=" for i in range(count)]
        collect(teacher, store, prompts, SamplingParams(max_tokens=4), progress=False)
    """
)


def _stored(db: Path) -> int:
    if not db.exists():
        return 0
    connection = sqlite3.connect(db, timeout=10)
    try:
        return connection.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not created yet
        return 0
    finally:
        connection.close()


def test_sigkill_during_collection_then_resume_requests_only_what_is_missing(tiny_lm, tmp_path) -> None:
    count, gate = 30, 11
    prompts = [f"{i}+{i + 1}=" for i in range(count)]
    db = tmp_path / "r.sqlite"
    with TinyLMServer(*tiny_lm, gate_after=gate) as server:
        env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        child = subprocess.Popen([sys.executable, "-c", COLLECTOR, server.url, str(db), str(count)], env=env)
        try:
            deadline = time.monotonic() + 180
            # Wait until both client threads are held at the gate and every answered response is stored.
            while not (server.held() == 2 and _stored(db) == server.answered()):
                assert child.poll() is None, "the collector exited before the kill"
                assert time.monotonic() < deadline, "the collector did not reach the gate"
                time.sleep(0.05)
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
        assert child.returncode == -signal.SIGKILL
        answered_before = {e["prompt"] for e in server.events if e["status"] == 200}
        held = {e["prompt"] for e in server.events if e["outcome"] == "held"}
        assert len(answered_before) >= gate and len(held) == 2 and not answered_before & held
        assert _stored(db) == len(answered_before)
        server.release_gate()
        seen = len(server.events)

        teacher = OpenAITeacher(server.url, "tiny", max_concurrency=2)
        with ResponseStore(db) as store:
            report = collect(teacher, store, prompts, SamplingParams(max_tokens=4), progress=False)
            assert report.complete and report.already == len(answered_before)
            assert store.count() == count
        after = [e["prompt"] for e in server.events[seen:]]
        # Resume asked exactly once for each prompt not answered before the kill, and for nothing else.
        assert sorted(after) == sorted(set(prompts) - answered_before)
        for prompt in prompts:
            assert server.answered(prompt) == 1, prompt  # no prompt answered twice, none missing


def test_failures_do_not_stop_the_collection(server: TinyLMServer, tmp_path) -> None:
    server.faults.extend(["500"] * 2)
    teacher = OpenAITeacher(server.url, "tiny", max_concurrency=1, max_retries=1, backoff_base_s=0.01)
    with ResponseStore(tmp_path / "r.sqlite") as store:
        report = collect(teacher, store, ["1+1=", "2+2=", "3+3="], SamplingParams(max_tokens=2), progress=0)
        assert (report.failed, report.stored) == (1, 2)
