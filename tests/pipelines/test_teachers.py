"""Teachers kdkit trains itself and caches (pipelines own model training; tasks define problems)."""

from __future__ import annotations

import json

import pytest
import torch

from kdkit.config.lm import ArithmeticTeacherConfig
from kdkit.pipelines import teachers
from kdkit.pipelines.teachers import arithmetic_teacher_key, get_arithmetic_teacher


def test_teacher_is_trained_once_then_loaded_from_cache(kdkit_cache, monkeypatch) -> None:
    config = ArithmeticTeacherConfig(
        digits=(1, 2), hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, steps=2, batch_size=4
    )
    model, tokenizer, folder = get_arithmetic_teacher(config)
    assert (
        folder.parent == kdkit_cache / "teachers"
        and folder.name == f"arithmetic-{arithmetic_teacher_key(config)}"
    )
    info = json.loads((folder / "kdkit_teacher.json").read_text())
    assert set(info["exact_match_by_length"]) == {"1", "2", "3"}  # one length past training
    assert (folder / "config.json").exists() and (folder / "tokenizer.json").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("the cached teacher was retrained")

    monkeypatch.setattr(teachers, "train_causal_lm", no_training)
    again, tokenizer2, folder2 = get_arithmetic_teacher(config)
    assert folder2 == folder and not again.training
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
    assert tokenizer2("1+2=")["input_ids"] == tokenizer("1+2=")["input_ids"]
    assert arithmetic_teacher_key(ArithmeticTeacherConfig(steps=3)) != arithmetic_teacher_key(
        ArithmeticTeacherConfig()
    )


def test_default_teacher_key_is_stable() -> None:
    # the cache folder of the default teacher must not move when its settings' code moves
    # (retraining costs minutes): the key is the hash of the same JSON as before
    assert arithmetic_teacher_key(ArithmeticTeacherConfig()) == "611e448ae332"


def test_arithmetic_teacher_settings_are_validated() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="hidden_sise"):
        ArithmeticTeacherConfig.model_validate({"hidden_sise": 8})


def test_a_cached_model_is_built_once_when_two_ask_at_the_same_time(tmp_path):
    """Two callers of load_or_build_lm on one folder: one trains it, the other waits and loads it
    (without the lock both would train into the same run folder and checkpoints)."""
    import threading
    import time

    # imported here once: transformers' lazy imports are not safe from two threads at once
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: F401

    from kdkit.pipelines.teachers import load_or_build_lm
    from kdkit.tasks.arithmetic import arithmetic_tokenizer, build_arithmetic_lm

    folder = tmp_path / "model"
    builds = []

    def build():
        builds.append(threading.get_ident())
        time.sleep(0.5)  # a slow training run: the other caller arrives meanwhile
        tok = arithmetic_tokenizer()
        model = build_arithmetic_lm(tok, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        (folder / "done.json").write_text("{}")
        return model.eval(), tok

    results = [None, None]

    def ask(i):
        results[i] = load_or_build_lm(folder, "done.json", build)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join(60)
    assert len(builds) == 1
    a, b = (r[0] for r in results)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
