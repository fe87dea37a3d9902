"""Text teachers (an OpenAI-compatible API, a local HF model, vLLM) and the durable response store.

teacher = OpenAITeacher("http://127.0.0.1:8000/v1", "my-model", api_key_env="OPENAI_API_KEY")
with ResponseStore("responses.sqlite") as store:
    collect(teacher, store, prompts, SamplingParams(temperature=0.7, max_tokens=256), n=4)
    store.to_jsonl("responses.jsonl")
"""

from kdkit.teachers.base import (
    BackendUnavailableError,
    Generation,
    Prompt,
    SamplingParams,
    Scored,
    TeacherError,
    TeacherRequestError,
    TeacherUnavailableError,
    TextTeacher,
    prompt_hash,
)
from kdkit.teachers.http import OpenAITeacher, RateLimiter
from kdkit.teachers.local import HFTeacher, VLLMTeacher, vllm_available
from kdkit.teachers.store import CollectionReport, Record, ResponseStore, collect

__all__ = [
    "BackendUnavailableError",
    "CollectionReport",
    "Generation",
    "HFTeacher",
    "OpenAITeacher",
    "Prompt",
    "RateLimiter",
    "Record",
    "ResponseStore",
    "SamplingParams",
    "Scored",
    "TeacherError",
    "TeacherRequestError",
    "TeacherUnavailableError",
    "TextTeacher",
    "VLLMTeacher",
    "collect",
    "prompt_hash",
    "vllm_available",
]
