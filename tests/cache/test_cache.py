"""The teacher-logit cache: durable (kill/resume), checksummed, refuses the wrong run, bounded reads."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from kdkit.cache import CacheReader, CacheSettings, ManifestMismatchError, ShardDamagedError, write_cache
from kdkit.cache.format import bytes_per_token_formula, id_width, pack_ids, unpack_ids
from kdkit.cache.store import CacheStore
from kdkit.samplers.collate import PromptCompletionCollator
from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _teacher(seed=0, vocab_size=None):
    tok = arithmetic_tokenizer()
    model = build_arithmetic_lm(
        tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )
    if vocab_size is not None:
        model.resize_token_embeddings(vocab_size)
    return model.eval(), tok


def _write(path, settings, *, samples=None, seed=0, log=lambda message: None, **kw):
    model, tok = _teacher(seed)
    samples = samples if samples is not None else arithmetic_dataset(60, (1, 3), seed=0)
    return write_cache(
        path,
        teacher=model,
        tokenizer=tok,
        samples=samples,
        collate=PromptCompletionCollator(tok),
        settings=settings,
        progress=False,
        log=log,
        **kw,
    )


def _files(path):
    return {p.name: p.read_bytes() for p in sorted((Path(path) / "shards").iterdir())}


SAMPLED = CacheSettings(mode="sampled", draws=12, samples_per_shard=8, seed=3)


def test_modes_store_what_the_teacher_says(tmp_path):
    model, tok = _teacher()
    samples = arithmetic_dataset(20, (1, 3))
    collate = PromptCompletionCollator(tok)
    batch = collate([samples[7]])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1][batch["labels"][:, 1:] != -100]
    log_p = torch.log_softmax(logits, -1)
    quantised = CacheSettings(mode="topk", k=4, values="uint8")
    for settings in (CacheSettings(mode="topk", k=4), quantised, CacheSettings(mode="dense"), SAMPLED):
        folder = tmp_path / f"{settings.mode}-{settings.values}"
        summary = _write(folder, settings, samples=samples)
        assert summary.complete and summary.shards_written == summary.shards_total
        target, _ = CacheReader(folder).target(7)
        if settings.mode == "dense":
            torch.testing.assert_close(target["logprobs"], log_p, atol=2e-3, rtol=0)
        elif settings.mode == "topk":
            assert torch.equal(target["ids"], log_p.topk(4, -1).indices)
            atol = 2e-3 if settings.values == "float16" else 1 / 32 + 2e-3  # half a 1/16-nat step
            torch.testing.assert_close(target["logprobs"], log_p.topk(4, -1).values, atol=atol, rtol=0)
            kept = log_p.topk(4, -1).values.exp().sum(-1)
            torch.testing.assert_close(target["tail_logprob"].exp(), 1 - kept, atol=2e-3, rtol=1e-2)
        else:
            torch.testing.assert_close(target["weights"].sum(-1), torch.ones(len(log_p)))
            assert (target["weights"] > 0).sum(-1).le(12).all()
            entropy = -(log_p.exp() * log_p).sum(-1)
            torch.testing.assert_close(target["entropy"], entropy, atol=2e-3, rtol=1e-3)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_cache(tmp_path):
    reference = tmp_path / "reference"
    _write(reference, SAMPLED, batch_size=2)  # same batches: padding changes float rounding
    killed = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import time, torch
        from kdkit.cache import write_cache, CacheSettings
        from kdkit.samplers.collate import PromptCompletionCollator
        from kdkit.tasks.arithmetic import arithmetic_dataset, arithmetic_tokenizer, build_arithmetic_lm
        tok = arithmetic_tokenizer()
        m = build_arithmetic_lm(tok, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=0)
        forward = m.forward
        m.forward = lambda *a, **k: (time.sleep(0.15), forward(*a, **k))[1]   # slow teacher
        write_cache({str(killed)!r}, teacher=m, tokenizer=tok, samples=arithmetic_dataset(60, (1, 3), seed=0),
                    collate=PromptCompletionCollator(tok), batch_size=2, progress=False,
                    settings=CacheSettings(mode="sampled", draws=12, samples_per_shard=8, seed=3))
    """)
    env = dict(os.environ, PYTHONPATH=SRC, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env)
    store = CacheStore(killed)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if store.shard_dir.exists() and len(list(store.shard_dir.glob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    time.sleep(0.4)  # somewhere inside the next shard
    assert proc.poll() is None, "the writer finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(store.shard_dir.glob("*.json")))
    assert 2 <= done_before < 8  # killed part-way (8 shards in all)
    summary = _write(killed, SAMPLED, batch_size=2)
    assert summary.shards_reused == done_before and summary.shards_written == 8 - done_before
    assert _files(killed) == _files(reference)  # no temporaries, no missing or duplicated positions
    reader = CacheReader(killed)
    assert [i for i, _ in reader.iter_samples()] == list(range(60))


def test_leftovers_of_a_crash_are_cleaned_and_recomputed(tmp_path):
    _write(tmp_path, SAMPLED)
    reference = _files(tmp_path)
    store = CacheStore(tmp_path)
    store.record_path(2).unlink()  # killed between the shard's rename and its record's
    (store.shard_dir / f".{store.shard_path(5).name}.1234.tmp").write_bytes(b"half a shard")
    store.shard_path(5).unlink()
    store.record_path(5).unlink()
    summary = _write(tmp_path, SAMPLED)
    assert summary.shards_written == 2 and [s for s, _ in summary.damaged] == [2]
    assert _files(tmp_path) == reference


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_shard_is_detected_never_read_and_rebuilt(tmp_path, damage):
    _write(tmp_path, SAMPLED)
    reference = _files(tmp_path)
    path = CacheStore(tmp_path).shard_path(3)
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) - 10]
    path.write_bytes(bytes(data))
    reader = CacheReader(tmp_path)
    reader.target(0)  # intact shards still read
    with pytest.raises(ShardDamagedError, match="shard 3.*(checksum|truncated)"):
        reader.target(3 * 8 + 1)
    messages = []
    summary = _write(tmp_path, SAMPLED, log=messages.append)
    assert summary.shards_written == 1 and summary.damaged[0][0] == 3
    assert any("shard 3" in m for m in messages)
    assert _files(tmp_path) == reference


def test_mismatched_manifest_is_refused_with_what_differs(tmp_path):
    _write(tmp_path, SAMPLED)
    with pytest.raises(ManifestMismatchError, match="teacher.weights_sha256"):
        _write(tmp_path, SAMPLED, seed=1)  # another teacher
    with pytest.raises(ManifestMismatchError, match="data.fingerprint"):
        _write(tmp_path, SAMPLED, samples=arithmetic_dataset(60, (1, 3), seed=9))
    with pytest.raises(ManifestMismatchError, match="settings.draws"):
        _write(tmp_path, CacheSettings(mode="sampled", draws=6, samples_per_shard=8, seed=3))
    # the reader refuses a training run with another teacher, whatever the cache settings
    other = CacheReader(tmp_path).manifest | {"teacher": {"weights_sha256": "0" * 64, "config_sha256": "x"}}
    with pytest.raises(ManifestMismatchError, match="not built for this run.*teacher.weights_sha256"):
        CacheReader(tmp_path, expect=other)
    CacheReader(tmp_path, expect=CacheReader(tmp_path).manifest)  # the matching run is accepted


def test_ranks_write_disjoint_shards_that_make_the_same_cache(tmp_path):
    _write(tmp_path / "one", SAMPLED)
    first = _write(tmp_path / "two", SAMPLED, rank=1, world=2)
    assert first.shards_written == 4 and not first.complete
    second = _write(tmp_path / "two", SAMPLED, rank=0, world=2)
    assert second.shards_written == 4 and second.complete
    assert _files(tmp_path / "one") == {k: v for k, v in _files(tmp_path / "two").items()}
    reader = CacheReader(tmp_path / "two")
    parts = [reader.shards_for(r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == list(range(8)) and not set(parts[0]) & set(parts[1])


def test_reading_a_cache_larger_than_the_memory_budget_stays_within_it(tmp_path):
    budget = 4 << 20  # 4 MiB
    model, tok = _teacher(vocab_size=1024)  # dense: 2 KiB per token
    samples = arithmetic_dataset(480, (2, 3), seed=0)
    summary = write_cache(
        tmp_path,
        teacher=model,
        tokenizer=tok,
        samples=samples,
        collate=PromptCompletionCollator(tok),
        settings=CacheSettings(mode="dense", samples_per_shard=64),
        batch_size=64,
        progress=False,
    )
    size = sum(p.stat().st_size for p in (tmp_path / "shards").glob("*.safetensors"))
    assert size > 4 * budget
    reader = CacheReader(tmp_path, max_open_shards=2)

    def rss():
        return (
            int(next(line for line in open("/proc/self/status") if line.startswith("VmRSS")).split()[1]) << 10
        )

    before = rss()
    tracemalloc.start()
    total = 0
    for index in range(reader.num_samples):
        target, _ = reader.target(index)
        total += target["logprobs"].shape[0]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert total == summary.positions_written
    assert peak < budget
    assert rss() - before < budget


def test_id_packing_and_widths():
    assert [id_width(v) for v in (16, 256, 257, 49_152, 65_536, 128_256, 1 << 24, (1 << 24) + 1)] == [
        1,
        1,
        2,
        2,
        2,
        3,
        3,
        4,
    ]
    ids = np.array([[0, 1, 128_255], [70_000, 16_777_215, 5]])
    packed = pack_ids(ids, 3)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, 3)
    assert np.array_equal(unpack_ids(packed, 3), ids)


def test_bytes_per_token_matches_the_formula(tmp_path):
    samples = arithmetic_dataset(256, (2, 3))
    for settings in (
        CacheSettings(mode="topk", k=8, samples_per_shard=256),
        CacheSettings(mode="dense", samples_per_shard=256),
    ):
        summary = _write(tmp_path / f"{settings.mode}-{settings.values}", settings, samples=samples)
        formula = bytes_per_token_formula(settings, 16)
        per_sample = 8 * 256 / summary.positions_written  # sample_tokens + sample_crc
        assert formula + per_sample <= summary.bytes_per_token < formula + per_sample + 0.1 * formula


def test_batch_target_aligns_cached_positions_with_a_shuffled_batch(tmp_path):
    from kdkit.cache.batch import IndexedCollate, IndexedSamples, batch_target
    from kdkit.cache.store import CacheError

    model, tok = _teacher()
    samples = arithmetic_dataset(40, (1, 3))
    collate = PromptCompletionCollator(tok)
    _write(tmp_path / "topk", CacheSettings(mode="topk", k=3, samples_per_shard=8), samples=samples)
    _write(tmp_path / "sampled", SAMPLED, samples=samples)
    indexed = IndexedSamples(samples)
    batch = IndexedCollate(collate)([indexed[i] for i in (33, 2, 17, 9)])
    assert batch["cache_index"].tolist() == [33, 2, 17, 9]
    mask = batch["labels"][:, 1:] != -100
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1], -1)
    topk = batch_target(CacheReader(tmp_path / "topk"), batch)
    assert topk["ids"].shape == (*mask.shape, 3)
    assert torch.equal(topk["ids"][mask], log_p.topk(3, -1).indices[mask])
    torch.testing.assert_close(topk["logprobs"][mask], log_p.topk(3, -1).values[mask], atol=2e-3, rtol=0)
    assert (topk["logprobs"][~mask] < -1e20).all()
    sampled = batch_target(CacheReader(tmp_path / "sampled"), batch)
    torch.testing.assert_close(sampled["weights"].sum(-1), mask.float())
    # a row that is not the cached sample is refused
    batch["input_ids"][1, 1] = 5 if batch["input_ids"][1, 1] != 5 else 6  # another prompt digit
    with pytest.raises(CacheError, match=r"row 1 \(sample 2\) is not the sample"):
        batch_target(CacheReader(tmp_path / "topk"), batch)
    del batch["cache_index"]
    with pytest.raises(CacheError, match="cache_index"):
        batch_target(CacheReader(tmp_path / "topk"), batch)


def test_one_teacher_pass_writes_several_caches_byte_identical_to_separate_writes(tmp_path):
    from kdkit.cache import write_caches

    settings = {
        "top4": CacheSettings(mode="topk", k=4, samples_per_shard=8),
        "top4_u8": CacheSettings(mode="topk", k=4, values="uint8", samples_per_shard=8),
        "sampled": SAMPLED,
        "sampled_t2": CacheSettings(mode="sampled", draws=12, samples_per_shard=8, seed=3, temperature=2.0),
    }
    for name, s in settings.items():
        _write(tmp_path / "alone" / name, s)
    model, tok = _teacher()
    calls = []
    forward = model.forward
    model.forward = lambda *a, **k: (calls.append(1), forward(*a, **k))[1]
    summaries = write_caches(
        [(tmp_path / "together" / name, s) for name, s in settings.items()],
        teacher=model,
        tokenizer=tok,
        samples=arithmetic_dataset(60, (1, 3), seed=0),
        collate=PromptCompletionCollator(tok),
        progress=False,
        log=lambda _: None,
    )
    assert len(calls) == 8  # one forward per shard of 8 samples (batch 16), not one per cache
    assert all(s.complete and s.shards_written == 8 for s in summaries)
    for name in settings:
        assert _files(tmp_path / "together" / name) == _files(tmp_path / "alone" / name)
    with pytest.raises(ValueError, match="samples_per_shard"):
        write_caches(
            [(tmp_path / "a", SAMPLED), (tmp_path / "b", CacheSettings(mode="topk", k=2))],
            teacher=model,
            tokenizer=tok,
            samples=arithmetic_dataset(60, (1, 3), seed=0),
            collate=PromptCompletionCollator(tok),
            progress=False,
        )


def test_a_shard_another_writer_holds_is_waited_for_not_computed_twice(tmp_path):
    """Two writers of one cache (same shards): the per-shard lock makes one wait for the other."""
    import shutil
    import threading

    _write(tmp_path / "reference", SAMPLED)
    store = CacheStore(tmp_path / "busy")
    result = {}
    with store.lock(3) as held:  # "another process" is writing shard 3
        assert held
        worker = threading.Thread(target=lambda: result.update(summary=_write(tmp_path / "busy", SAMPLED)))
        worker.start()
        deadline = time.time() + 60
        while time.time() < deadline and len(list(store.shard_dir.glob("shard-*.json"))) < 7:
            time.sleep(0.02)
        time.sleep(0.2)
        assert worker.is_alive(), "the writer did not wait for the locked shard"
        assert not store.record_path(3).exists()
        with store.lock(3, block=False) as again:
            assert not again  # flock conflicts across open files, even within one process
        # the other writer finishes shard 3 (same bytes as it would compute) and releases it
        ref = CacheStore(tmp_path / "reference")
        shutil.copy(ref.shard_path(3), store.shard_path(3))
        shutil.copy(ref.record_path(3), store.record_path(3))
    worker.join(60)
    summary = result["summary"]
    assert summary.shards_written == 7 and summary.shards_reused == 1 and summary.complete
    assert _files(tmp_path / "busy") == _files(tmp_path / "reference")


@pytest.mark.parametrize(
    "device",
    [
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
        ),
        "cpu",
    ],
)
def test_positions_encode_the_same_from_the_teachers_device(device):
    """The writer keeps the teacher's log-probs on its device and encode_positions moves only what
    it keeps to the host: every mode encodes as from host log-probs (top-k ids and values exactly;
    sampled draws from the same CPU generator)."""
    from kdkit.cache.format import encode_positions
    from kdkit.losses.sparse import temperature_log_probs

    torch.manual_seed(0)
    log_p = temperature_log_probs(torch.randn(20, 300) * 3, 1.0)
    for settings in (
        CacheSettings(mode="topk", k=8),
        CacheSettings(mode="topk", k=8, values="uint8"),
        CacheSettings(mode="sampled", draws=12),
        CacheSettings(mode="dense"),
    ):
        host = encode_positions(log_p, settings, 300, torch.Generator().manual_seed(1))
        moved = encode_positions(log_p.to(device), settings, 300, torch.Generator().manual_seed(1))
        assert host.keys() == moved.keys()
        for key in host:
            if key == "entropy":  # summed on the device: the same number to float16 rounding
                np.testing.assert_allclose(host[key], moved[key], rtol=1e-3)
            else:
                np.testing.assert_array_equal(host[key], moved[key], err_msg=f"{settings.mode}: {key}")
