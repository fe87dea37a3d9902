"""A small OpenAI-compatible HTTP server of kdkit's own, serving a real causal LM, with fault switches.

Used by the tests (and the black-box benchmark) to exercise the HTTP teacher against real sampling
and real log-probabilities, never a mock. It binds 127.0.0.1 on an ephemeral port in a thread.

Endpoints: ``POST /v1/completions`` (``prompt``, ``n``, ``max_tokens``, ``temperature``, ``top_p``,
``stop``, ``seed``, ``logprobs`` = top-k, ``echo``) and ``POST /v1/chat/completions`` (the last
user message is the prompt: the tiny models have no chat template; ``logprobs`` + ``top_logprobs``).
Log-probs are log-softmax of the raw logits, as vLLM reports them; tokens are the tokenizer's.

Faults (`server.faults.extend([...])` queues them; each request takes the next one):
``"delay"`` (sleep `fault_delay_s` before answering, past the client's timeout), ``"500"``,
``"429"`` (with ``Retry-After: retry_after``), ``"malformed"`` (200 with truncated JSON),
``"drop"`` (close the connection without a response). A gate (`gate_after`) holds every request
after that many answered ones until `release_gate()`: the kill-and-resume test uses it to know
exactly which requests were answered when the client died.

Counting: `events` lists every request (path, prompt, n, what happened); `answered(prompt)` is how
many 200 responses that prompt got.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from torch import nn

FAULTS = ("delay", "500", "429", "malformed", "drop")


class TinyLMServer:
    """Serve `model` (a HF causal LM) and `tokenizer` as model `model_name` (see module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        model_name: str = "tiny",
        api_key: str | None = None,
        fault_delay_s: float = 2.0,
        retry_after: str = "0.2",
        gate_after: int | None = None,
        latency_s: float = 0.0,
        port: int = 0,
    ) -> None:
        self.model, self.tokenizer, self.model_name = model.eval(), tokenizer, model_name
        self.api_key, self.fault_delay_s, self.retry_after = api_key, fault_delay_s, retry_after
        self.latency_s = latency_s
        self.faults: collections.deque[str] = collections.deque()
        self.events: list[dict[str, Any]] = []
        self.gate_after = gate_after
        self._gate = threading.Event()
        self._lock = threading.Lock()  # the model and the counters
        self._model_lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def start(self) -> TinyLMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> TinyLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release_gate(self) -> None:
        self.gate_after = None
        self._gate.set()

    # ------------------------------------------------------------------ counting

    def answered(self, prompt: str | None = None) -> int:
        with self._lock:
            return sum(
                1 for e in self.events if e["status"] == 200 and (prompt is None or e["prompt"] == prompt)
            )

    def count(self, fault: str) -> int:
        """How many requests were served the fault `fault`."""
        with self._lock:
            return sum(1 for e in self.events if e.get("fault") == fault)

    def held(self) -> int:
        with self._lock:
            return sum(1 for e in self.events if e["outcome"] == "held")

    # ------------------------------------------------------------------ handling

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", 0))
        raw = handler.rfile.read(length)
        event: dict[str, Any] = {
            "path": handler.path,
            "prompt": None,
            "n": None,
            "outcome": "?",
            "status": None,
            "time": time.monotonic(),
        }
        with self._lock:
            self.events.append(event)
            fault = self.faults.popleft() if self.faults else None
            event["fault"] = fault
        try:
            body = json.loads(raw)
        except ValueError:
            return self._send(handler, event, 400, {"error": {"message": "request body is not JSON"}})
        event["prompt"] = _prompt_of(body)
        event["n"] = body.get("n", 1)
        if self.api_key is not None:
            given = handler.headers.get("Authorization", "")
            if given != f"Bearer {self.api_key}":
                # Echo the key given, as some providers do: the client must redact it.
                message = f"Incorrect API key provided: {given.removeprefix('Bearer ')}"
                return self._send(handler, event, 401, {"error": {"message": message}})
        if fault is not None:
            event["outcome"] = fault
            if fault == "drop":
                handler.close_connection = True
                handler.connection.shutdown(2)  # no status line at all
                return None
            if fault == "500":
                return self._send(handler, event, 500, {"error": {"message": "injected server error"}})
            if fault == "429":
                payload = {"error": {"message": "injected rate limit"}}
                return self._send(handler, event, 429, payload, {"Retry-After": self.retry_after})
            if fault == "delay":
                time.sleep(self.fault_delay_s)
        if self.gate_after is not None and self.answered() >= self.gate_after:
            event["outcome"] = "held"
            self._gate.wait()
            return None  # the client is gone by now; answer nothing
        if self.latency_s:
            time.sleep(self.latency_s)
        path = handler.path.rstrip("/")
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            if body.get("model") != self.model_name:
                return self._send(handler, event, 404, {"error": {"message": f"model {body.get('model')!r}"}})
            response = self._completions(body)
        elif path.endswith("/chat/completions"):
            response = self._chat(body)
        else:
            return self._send(handler, event, 404, {"error": {"message": f"no route {handler.path}"}})
        if fault == "malformed":
            text = json.dumps(response)
            return self._send_raw(handler, event, 200, text[: len(text) // 2].encode())
        if event["outcome"] == "?":
            event["outcome"] = "ok"
        return self._send(handler, event, 200, response)

    def _send(
        self,
        handler: BaseHTTPRequestHandler,
        event: dict[str, Any],
        status: int,
        payload: dict[str, Any],
        headers: dict[str, str] | None = None,
    ) -> None:
        self._send_raw(handler, event, status, json.dumps(payload).encode(), headers)

    def _send_raw(
        self,
        handler: BaseHTTPRequestHandler,
        event: dict[str, Any],
        status: int,
        data: bytes,
        headers: dict[str, str] | None = None,
    ) -> None:
        if event["outcome"] == "?":
            event["outcome"] = f"http_{status}"
        # Recorded before the client can read the response (a test reading the counters right after
        # its request returns must see it); undone if the client is gone.
        with self._lock:
            event["status"] = status if event["outcome"] != "malformed" else "malformed"
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(data)
            handler.wfile.flush()
        except OSError:
            with self._lock:
                event["outcome"], event["status"] = "client_gone", None

    # ------------------------------------------------------------------ the model

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def _token(self, token_id: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(token_id))

    def _text_of(self, token_id: int) -> str:
        return "" if token_id in self.tokenizer.all_special_ids else self._token(token_id)

    @torch.no_grad()
    def _sample(self, prompt: str, body: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """n samples: text, token ids, [len, V] log-probs (raw model), finish reason."""
        ids = torch.tensor([self._encode(prompt)] * n)
        temperature = float(body.get("temperature", 1.0))
        options: dict[str, Any] = {"do_sample": temperature > 0}
        if temperature > 0:
            options |= {"temperature": temperature, "top_p": float(body.get("top_p", 1.0)), "top_k": 0}
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        with self._model_lock:
            if body.get("seed") is not None:
                torch.manual_seed(int(body["seed"]))
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=int(body.get("max_tokens", 16)),
                eos_token_id=eos,
                pad_token_id=pad,
                return_dict_in_generate=True,
                output_logits=True,
                **options,
            )
        logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)
        samples = []
        for row in range(n):
            new = out.sequences[row, ids.shape[1] :].tolist()
            finish = "length"
            if eos in new:
                new, finish = new[: new.index(eos)], "stop"
            text = "".join(self._text_of(t) for t in new)
            for stop in body.get("stop") or []:
                if stop in text:
                    cut = text.index(stop)
                    text, finish = text[:cut], "stop"
                    new = new[:cut]  # one character per token in the tiny tokenizers
            lp = logprobs[row, : len(new)]
            samples.append({"text": text, "ids": new, "logprobs": lp, "finish": finish})
        return samples

    def _top(self, row: torch.Tensor, k: int) -> dict[str, float]:
        values, ids = row.topk(min(k, row.shape[-1]))
        return {self._token(i): float(v) for i, v in zip(ids.tolist(), values.tolist())}

    def _completions(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, n, k = body["prompt"], int(body.get("n", 1)), body.get("logprobs")
        choices = []
        if body.get("echo"):
            echo = self._echo(prompt, k)
        for index, sample in enumerate(self._sample(prompt, body, n)):
            choice: dict[str, Any] = {"index": index, "text": sample["text"], "logprobs": None}
            choice["finish_reason"] = sample["finish"]
            if k is not None:
                lp, offset = sample["logprobs"], len(prompt)
                tokens, offsets = [], []
                for t in sample["ids"]:
                    tokens.append(self._token(t))
                    offsets.append(offset)
                    offset += len(self._text_of(t))
                choice["logprobs"] = {
                    "tokens": tokens,
                    "token_logprobs": [float(lp[i, t]) for i, t in enumerate(sample["ids"])],
                    "top_logprobs": [self._top(lp[i], k) for i in range(len(tokens))] if k else None,
                    "text_offset": offsets,
                }
            if body.get("echo"):
                choice["text"] = prompt + choice["text"]
                if choice["logprobs"] is not None:
                    for key in ("tokens", "token_logprobs", "text_offset"):
                        choice["logprobs"][key] = echo[key] + choice["logprobs"][key]
                    if k:
                        top = choice["logprobs"]["top_logprobs"]
                        choice["logprobs"]["top_logprobs"] = echo["top_logprobs"] + top
            choices.append(choice)
        return {"id": "cmpl-kdkit", "object": "text_completion", "model": self.model_name, "choices": choices}

    @torch.no_grad()
    def _echo(self, prompt: str, k: int | None) -> dict[str, Any]:
        ids = self._encode(prompt)
        with self._model_lock:
            lp = self.model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
        tokens, offsets, values, tops, offset = [], [], [], [], 0
        for i, t in enumerate(ids):
            tokens.append(self._token(t))
            offsets.append(offset)
            # Offsets index the text as sent: a BOS the tokenizer added is not in it, an "<eos>" is.
            added_bos = i == 0 and t == self.tokenizer.bos_token_id
            offset += 0 if added_bos else len(self._token(t))
            values.append(None if i == 0 else float(lp[i - 1, t]))
            tops.append(None if i == 0 or not k else self._top(lp[i - 1], k))
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def _chat(self, body: dict[str, Any]) -> dict[str, Any]:
        prompt, n = _prompt_of(body), int(body.get("n", 1))
        k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        choices = []
        for index, sample in enumerate(self._sample(prompt, body, n)):
            logprobs = None
            if k is not None:
                lp = sample["logprobs"]
                logprobs = {
                    "content": [
                        {
                            "token": self._token(t),
                            "logprob": float(lp[i, t]),
                            "top_logprobs": [
                                {"token": a, "logprob": b} for a, b in self._top(lp[i], k).items() if k
                            ],
                        }
                        for i, t in enumerate(sample["ids"])
                    ]
                }
            choices.append(
                {
                    "index": index,
                    "message": {"role": "assistant", "content": sample["text"]},
                    "logprobs": logprobs,
                    "finish_reason": sample["finish"],
                }
            )
        return {"id": "chat-kdkit", "object": "chat.completion", "model": self.model_name, "choices": choices}


def _prompt_of(body: dict[str, Any]) -> str | None:
    if "prompt" in body:
        return body["prompt"]
    messages = body.get("messages") or []
    users = [m.get("content") for m in messages if m.get("role") == "user"]
    return users[-1] if users else None


def tiny_arithmetic_lm(seed: int = 0) -> tuple[nn.Module, Any]:
    """A randomly initialised 1-layer Llama (width 16) over the arithmetic tokenizer: real sampling."""
    from kdkit.tasks.arithmetic import arithmetic_tokenizer, build_arithmetic_lm

    tokenizer = arithmetic_tokenizer()
    model = build_arithmetic_lm(
        tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, seed=seed
    )
    return model.eval(), tokenizer
