"""Parameter counts, size on disk and latency of small known modules."""

import torch
from torch import nn

from kdkit.eval import measure_latency, model_footprint


def test_footprint_of_a_linear_layer():
    footprint = model_footprint(nn.Linear(100, 50))
    assert footprint["parameters"] == 100 * 50 + 50
    # fp32 weights plus a small safetensors header (JSON index + 8-byte length).
    assert 4 * 5050 < footprint["size_on_disk_bytes"] < 4 * 5050 + 1024


def test_tied_weights_are_counted_and_stored_once():
    embed = nn.Embedding(200, 16)
    head = nn.Linear(16, 200, bias=False)
    head.weight = embed.weight
    footprint = model_footprint(nn.ModuleDict({"embed": embed, "head": head}))
    assert footprint["parameters"] == 200 * 16
    assert footprint["size_on_disk_bytes"] < 4 * 200 * 16 + 1024


def test_buffers_count_on_disk_but_not_as_parameters():
    footprint = model_footprint(nn.BatchNorm1d(256))
    assert footprint["parameters"] == 2 * 256
    assert footprint["size_on_disk_bytes"] > 4 * 4 * 256  # weight, bias, running mean and var


def test_latency_of_a_tensor_batch():
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).train()
    result = measure_latency(model, torch.randn(8, 32), repeats=7, warmup=2)
    assert result["batch_size"] == 8 and result["repeats"] == 7
    assert 0 < result["latency_ms_median"] <= result["latency_ms_p90"]
    assert result["latency_ms_per_example"] == result["latency_ms_median"] / 8
    assert result["threads"] == torch.get_num_threads()
    assert model.training  # mode restored


def test_latency_of_a_dict_batch_passes_keywords():
    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)

        def forward(self, input_ids, attention_mask):
            return self.embed(input_ids) * attention_mask[..., None]

    batch = {"input_ids": torch.randint(0, 50, (3, 5)), "attention_mask": torch.ones(3, 5)}
    result = measure_latency(Keywords(), batch, repeats=3, warmup=1)
    assert result["batch_size"] == 3
    assert result["latency_ms_median"] > 0
