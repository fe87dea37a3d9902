"""Causal-LM builders: load, build, derive a student from the teacher, save a plain HF folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel

from kdkit.eval import count_parameters
from kdkit.models.lm import (
    build_causal_lm,
    decoder_layers,
    derive_student,
    load_causal_lm,
    save_pretrained_folder,
    select_layers,
)
from tests.models.test_tokenizers import tiny_tokenizer

VOCAB = 64


def tiny_llama(layers: int = 4, **overrides: object) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **overrides,
    )
    return build_causal_lm(config).eval()


def logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids).logits


IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def test_build_from_dict_and_config_give_the_same_architecture() -> None:
    from_dict = build_causal_lm(
        {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64}
        | {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2},
        seed=3,
    )
    again = build_causal_lm(from_dict.config, seed=3)
    assert type(from_dict).__name__ == "LlamaForCausalLM" and from_dict.config.num_hidden_layers == 2
    assert torch.equal(logits(from_dict, IDS), logits(again, IDS))  # seed makes the init reproducible
    with pytest.raises(ValueError, match="model_type"):
        build_causal_lm({"hidden_size": 32})


@pytest.mark.parametrize(
    ("num_layers", "keep", "expected"),
    [
        (30, "every_k:3", [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]),
        (10, 4, [0, 3, 6, 9]),
        (10, 1, [9]),
        (6, [-1, 0, 2, 2], [0, 2, 5]),
    ],
)
def test_select_layers(num_layers: int, keep: object, expected: list[int]) -> None:
    assert select_layers(num_layers, keep) == expected


@pytest.mark.parametrize("bad", ["every_k:0", "every_third", 0, 7, [6]])
def test_select_layers_rejects_bad_choices(bad: object) -> None:
    with pytest.raises(ValueError):
        select_layers(6, bad)


def test_derived_student_keeps_chosen_layers_and_reloads_with_plain_transformers(tmp_path: Path) -> None:
    teacher = tiny_llama(4)
    student = derive_student(teacher, keep_layers=[0, 2])
    assert student.config.num_hidden_layers == 2 and len(decoder_layers(student)[1]) == 2
    assert count_parameters(student) < count_parameters(teacher)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    for name, tensor in s_state.items():
        source = name.replace("layers.1.", "layers.2.")  # student layer 1 is teacher layer 2
        assert torch.equal(tensor, t_state[source]), name
    up = "model.layers.1.mlp.up_proj.weight"
    assert not torch.equal(s_state[up], t_state[up])
    # Attention layers must know their new index (KV cache slots) or generation breaks.
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    tokenizer = tiny_tokenizer()
    folder = save_pretrained_folder(student, tokenizer, tmp_path / "student")
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == 2
    assert torch.equal(logits(reloaded, IDS), logits(student, IDS))
    assert AutoTokenizer.from_pretrained(folder)("the cat")["input_ids"] == tokenizer("the cat")["input_ids"]
    generated = reloaded.generate(IDS[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=1)
    assert generated.shape == (1, 7)


def test_keeping_every_layer_reproduces_the_teacher_exactly() -> None:
    teacher = tiny_llama(3, tie_word_embeddings=True)
    student = derive_student(teacher, keep_layers=3)
    assert torch.equal(logits(student, IDS), logits(teacher, IDS))
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


def test_narrower_mlp_keeps_the_units_with_the_largest_norms(tmp_path: Path) -> None:
    teacher = tiny_llama(2)
    strong = [5, 17, 40]
    with torch.no_grad():
        mlp = teacher.model.layers[1].mlp
        mlp.up_proj.weight[strong] *= 50.0
        mlp.gate_proj.weight[strong] *= 50.0
    student = derive_student(teacher, keep_layers=[1], intermediate_size=8)
    assert student.config.intermediate_size == 8
    s_mlp = student.model.layers[0].mlp
    kept_rows = list(s_mlp.up_proj.weight)
    chosen = [i for i in range(64) if any(torch.equal(mlp.up_proj.weight[i], row) for row in kept_rows)]
    assert set(strong) <= set(chosen) and len(chosen) == 8
    # Each unit's row of up/gate and column of down move together, in the teacher's order.
    assert torch.equal(s_mlp.up_proj.weight, mlp.up_proj.weight[chosen])
    assert torch.equal(s_mlp.gate_proj.weight, mlp.gate_proj.weight[chosen])
    assert torch.equal(s_mlp.down_proj.weight, mlp.down_proj.weight[:, chosen])

    first = derive_student(teacher, keep_layers=[1], intermediate_size=8, mlp_selection="first")
    assert torch.equal(first.model.layers[0].mlp.down_proj.weight, mlp.down_proj.weight[:, :8])

    save_pretrained_folder(student, None, tmp_path / "narrow")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    assert torch.equal(logits(reloaded, IDS), logits(student, IDS))


def test_per_layer_config_lists_follow_the_kept_layers(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=2,
    )  # fmt: skip
    teacher = build_causal_lm(config).eval()
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    student = derive_student(teacher, keep_layers=[1, 3])
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    save_pretrained_folder(student, None, tmp_path / "qwen")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qwen")
    assert reloaded.config.layer_types == ["full_attention", "sliding_attention"]
    assert torch.equal(logits(reloaded, IDS), logits(student, IDS))


def test_derivation_is_generic_across_decoder_families() -> None:
    gpt2 = {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": 4, "n_head": 4}
    teacher = build_causal_lm(gpt2)
    student = derive_student(teacher.eval(), keep_layers="every_k:2", intermediate_size=48)
    assert decoder_layers(teacher)[0] == "transformer.h"
    assert student.config.n_layer == 3 and student.config.n_inner == 48
    s_attn, t_attn = student.transformer.h[1].attn, teacher.transformer.h[2].attn
    assert torch.equal(s_attn.c_attn.weight, t_attn.c_attn.weight)
    assert student.transformer.h[0].mlp.c_fc.weight.shape == (32, 48)  # GPT-2 Conv1D is [in, out]


def test_fresh_student_has_the_derived_shape_but_new_weights() -> None:
    teacher = tiny_llama(4)
    student = derive_student(teacher, keep_layers=2, copy_weights=False)
    assert student.config.num_hidden_layers == 2
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def test_load_causal_lm_reads_a_local_folder_and_adds_a_pad_token(tmp_path: Path) -> None:
    model = tiny_llama(2)
    tokenizer = tiny_tokenizer()
    assert tokenizer.pad_token is None
    save_pretrained_folder(model, tokenizer, tmp_path / "m")
    loaded, loaded_tokenizer = load_causal_lm(tmp_path / "m", dtype="bfloat16")
    assert loaded_tokenizer.pad_token == "<eos>" and len(loaded_tokenizer) == len(tokenizer)  # no new ids
    assert loaded.dtype == torch.bfloat16 and not loaded.training
    assert loaded.get_input_embeddings().weight.shape[0] == VOCAB
    with pytest.raises(ValueError, match="unknown dtype"):
        load_causal_lm(tmp_path / "m", dtype="float33")
