"""Local text teachers: a Hugging Face causal LM generating in batches, and vLLM where a GPU is present.

Both give the same `TextTeacher` interface as the HTTP client, so a collection, a store and a
method do not care where the text comes from. The log-probs they return are the model's own
(log-softmax of the raw logits, before temperature or top-p), as vLLM and OpenAI report them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from kdkit.teachers.base import (
    BackendUnavailableError,
    Generation,
    Outcome,
    Prompt,
    Request,
    SamplingParams,
    Scored,
    TeacherRequestError,
    TextTeacher,
)


def _prompt_text(tokenizer: Any, prompt: Prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None) is None:
        raise TeacherRequestError("a chat prompt needs a tokenizer with a chat template; pass plain text")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _top(logprobs: torch.Tensor, k: int, tokenizer: Any) -> list[dict[str, float]]:
    """[N, V] log-probs -> N dicts {token: log-prob} of the k largest."""
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return [
        {tokenizer.convert_ids_to_tokens(int(i)): float(v) for i, v in zip(row_ids, row_values)}
        for row_ids, row_values in zip(ids, values)
    ]


class HFTeacher(TextTeacher):
    """A local Hugging Face causal LM as a text teacher (batched `generate` with the KV cache).

    model, tokenizer: the LM and its tokenizer (a pad or EOS token is required). teacher_id: the
    store key's teacher name (default "hf:<name_or_path>"; give each distinct model its own).
    batch_size: prompts per `generate` call. A request for n samples of a prompt repeats the
    prompt n times in the batch. `params.stop` strings cut the decoded text after generation.
    """

    can_score = True

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, teacher_id: str | None = None, batch_size: int = 32
    ) -> None:
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs a pad or EOS token for batched generation")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        name = getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        self.teacher_id = teacher_id or f"hf:{name}"

    def describe(self) -> dict[str, Any]:
        return {"backend": "hf", "teacher_id": self.teacher_id, "batch_size": self.batch_size}

    @property
    def _pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad

    def stream(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[Outcome]:
        """Generate batch by batch (prompts repeated n times); yields each request when its batch ends."""
        rows: list[tuple[int, Prompt]] = [(index, prompt) for index, prompt, n in requests for _ in range(n)]
        wanted = {index: n for index, _, n in requests}
        results: dict[int, list[Generation]] = {index: [] for index in wanted}
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            generations = self._generate_rows([p for _, p in chunk], params)
            for (index, _), generation in zip(chunk, generations):
                results[index].append(generation)
                if len(results[index]) == wanted[index]:
                    yield index, results.pop(index)
        for index in list(results):  # n == 0 requests
            yield index, results.pop(index)

    @torch.no_grad()
    def _generate_rows(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[Generation]:
        from kdkit.data.padding import left_pad

        tok = self.tokenizer
        encoded = [tok(_prompt_text(tok, p))["input_ids"] for p in prompts]
        device = next(self.model.parameters()).device
        ids, mask = left_pad(encoded, self._pad)
        sampling = params.temperature > 0
        options: dict[str, Any] = {"do_sample": sampling}
        if sampling:
            options |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        if params.seed is not None:
            torch.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=params.max_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=self._pad,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=params.top_logprobs is not None,
                **options,
            )
        finally:
            self.model.train(was_training)
        new = out.sequences[:, ids.shape[1] :].cpu()
        logits = torch.stack(out.logits, 1).float().cpu() if params.top_logprobs is not None else None
        result = []
        for row in range(len(prompts)):
            token_ids = new[row].tolist()
            finish = "length"
            if tok.eos_token_id in token_ids:
                token_ids = token_ids[: token_ids.index(tok.eos_token_id) + 1]
                finish = "stop"
            keep = [t for t in token_ids if t != tok.eos_token_id]
            text = tok.decode(keep, skip_special_tokens=False)
            for stop in params.stop:
                if stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            generation = Generation(text=text, finish_reason=finish)
            if logits is not None:
                lp = logits[row, : len(token_ids)].log_softmax(-1)
                generation.tokens = tok.convert_ids_to_tokens(token_ids)
                generation.token_logprobs = lp.gather(1, torch.tensor(token_ids)[:, None])[:, 0].tolist()
                if params.top_logprobs:
                    generation.top_logprobs = _top(lp, params.top_logprobs, tok)
            result.append(generation)
        return result

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], top_logprobs: int = 0
    ) -> list[Scored]:
        """log p(continuation tokens | prompt), continuations tokenized alone (no special tokens)."""
        from kdkit.data.padding import right_pad

        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        tok, device = self.tokenizer, next(self.model.parameters()).device
        out: list[Scored] = []
        for start in range(0, len(prompts), self.batch_size):
            p_ids = [tok(_prompt_text(tok, p))["input_ids"] for p in prompts[start : start + self.batch_size]]
            c_ids = [
                tok(c, add_special_tokens=False)["input_ids"]
                for c in continuations[start : start + self.batch_size]
            ]
            full = [p + c for p, c in zip(p_ids, c_ids)]
            ids = right_pad(full, self._pad).to(device)
            mask = right_pad([[1] * len(r) for r in full], 0, value=0).to(device)
            was_training = self.model.training
            self.model.eval()
            try:
                lp = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1).cpu()
            finally:
                self.model.train(was_training)
            for row, (p, c) in enumerate(zip(p_ids, c_ids)):
                positions = lp[row, len(p) - 1 : len(p) - 1 + len(c)]  # position t predicts token t+1
                token_lp = positions.gather(1, torch.tensor(c, dtype=torch.long)[:, None])[:, 0].tolist()
                out.append(
                    Scored(
                        tokens=tok.convert_ids_to_tokens(c),
                        token_logprobs=token_lp,
                        top_logprobs=_top(positions, top_logprobs, tok) if top_logprobs else None,
                    )
                )
        return out


def vllm_available() -> tuple[bool, str]:
    """(usable, reason): vLLM needs the `vllm` package and a CUDA GPU."""
    if importlib.util.find_spec("vllm") is None:
        return False, "the vllm package is not installed (pip install vllm, on a machine with a CUDA GPU)"
    if not torch.cuda.is_available():
        return False, "vLLM needs a CUDA GPU and torch sees none"
    return True, ""


class VLLMTeacher(TextTeacher):
    """A local model served in-process by vLLM (only where `vllm` is installed and a GPU is present).

    model: a local folder or hub id vLLM can load. engine_options go to `vllm.LLM(...)` (e.g.
    gpu_memory_utilization, dtype, max_model_len). Raises `BackendUnavailableError` otherwise.
    """

    can_score = True

    def __init__(self, model: str, *, teacher_id: str | None = None, **engine_options: Any) -> None:
        usable, reason = vllm_available()
        if not usable:
            raise BackendUnavailableError(f"the vLLM teacher backend is not available here: {reason}")
        import vllm  # type: ignore[import-not-found]

        self._vllm = vllm
        self.llm = vllm.LLM(model=model, **engine_options)
        self.teacher_id = teacher_id or f"vllm:{model}"
        self.model_name = model

    def describe(self) -> dict[str, Any]:
        return {"backend": "vllm", "teacher_id": self.teacher_id, "model": self.model_name}

    def _sampling(self, params: SamplingParams, n: int) -> Any:
        return self._vllm.SamplingParams(
            n=n,
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            seed=params.seed,
            logprobs=params.top_logprobs,
        )

    def stream(self, requests: Sequence[Request], params: SamplingParams) -> Iterator[Outcome]:
        tok = self.llm.get_tokenizer()
        by_n: dict[int, list[tuple[int, Prompt]]] = {}
        for index, prompt, n in requests:
            by_n.setdefault(n, []).append((index, prompt))
        for n, group in by_n.items():
            outputs = self.llm.generate([_prompt_text(tok, p) for _, p in group], self._sampling(params, n))
            for (index, _), output in zip(group, outputs):
                yield index, [self._generation(o, tok) for o in output.outputs]

    @staticmethod
    def _generation(completion: Any, tok: Any) -> Generation:
        generation = Generation(text=completion.text, finish_reason=completion.finish_reason)
        if completion.logprobs is not None:
            generation.tokens = tok.convert_ids_to_tokens(list(completion.token_ids))
            generation.token_logprobs = [
                float(step[t].logprob) for step, t in zip(completion.logprobs, completion.token_ids)
            ]
            generation.top_logprobs = [
                {tok.convert_ids_to_tokens(i): float(lp.logprob) for i, lp in step.items()}
                for step in completion.logprobs
            ]
        return generation

    def score(
        self, prompts: Sequence[Prompt], continuations: Sequence[str], top_logprobs: int = 0
    ) -> list[Scored]:
        tok = self.llm.get_tokenizer()
        texts, starts = [], []
        for prompt, continuation in zip(prompts, continuations):
            prompt_text = _prompt_text(tok, prompt)
            texts.append(prompt_text + continuation)
            starts.append(len(tok(prompt_text)["input_ids"]))
        sampling = self._vllm.SamplingParams(
            max_tokens=1, temperature=0.0, prompt_logprobs=max(top_logprobs, 0)
        )
        out = []
        for output, start in zip(self.llm.generate(texts, sampling), starts):
            ids = list(output.prompt_token_ids)[start:]
            steps = list(output.prompt_logprobs)[start:]
            out.append(
                Scored(
                    tokens=tok.convert_ids_to_tokens(ids),
                    token_logprobs=[float(step[t].logprob) for step, t in zip(steps, ids)],
                    top_logprobs=[
                        {tok.convert_ids_to_tokens(i): float(lp.logprob) for i, lp in step.items()}
                        for step in steps
                    ]
                    if top_logprobs
                    else None,
                )
            )
        return out


__all__ = ["HFTeacher", "VLLMTeacher", "vllm_available"]
