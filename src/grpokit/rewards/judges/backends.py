"""Where a judge's answers come from. A backend turns chat requests (lists of messages) into
answer texts, all of one batch together:

    async def complete_many(requests: list[list[dict]]) -> list[str | BaseException]

An exception in the list is that request's failure (a timeout, a refused connection, an HTTP
error): the judge counts it and retries. `name` identifies the backend in the judge's cache.

* `OpenAIBackend`: any OpenAI-compatible chat server (vLLM, `transformers serve`, llama.cpp's
  server, a hosted API) through the `openai` client, with a concurrency limit, a request rate
  limit and a timeout per request.
* `LocalBackend`: a Hugging Face causal LM with a chat template, in this process, greedy, one
  padded batch per call.
* `FunctionBackend`: a Python function `messages -> text` (sync or async): a rule, a mock in
  a test, a client of your own.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["JudgeBackend", "OpenAIBackend", "LocalBackend", "FunctionBackend", "make_backend"]

Messages = list[dict[str, Any]]


class JudgeBackend(Protocol):
    name: str

    async def complete_many(self, requests: list[Messages]) -> list[str | BaseException]: ...


class OpenAIBackend:
    """An OpenAI-compatible chat server.

    model: the model id the server expects; base_url: e.g. http://127.0.0.1:8000/v1 (default:
    $OPENAI_BASE_URL, else OpenAI's); api_key: default $OPENAI_API_KEY, else "EMPTY" (local servers
    take any key). max_concurrency: requests in flight at once; requests_per_second: at most this
    many request starts per second (None: no limit); timeout: seconds per request.
    temperature, max_tokens: sampling of the judge; json_mode: ask for a JSON object
    (`response_format={"type": "json_object"}`, where the server supports it); extra_body: more
    fields for the server (e.g. vLLM's guided decoding).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, max_concurrency: int = 8,
                 requests_per_second: float | None = None, timeout: float = 30.0, temperature: float = 0.0,
                 max_tokens: int = 256, json_mode: bool = False, extra_body: dict | None = None):
        from grpokit.tracking import import_optional

        import_optional("openai", "an OpenAI-compatible judge needs openai", "judges")
        if max_concurrency < 1:
            raise ValueError(f"judge: max_concurrency must be >= 1, got {max_concurrency}")
        if requests_per_second is not None and not requests_per_second > 0:
            raise ValueError(f"judge: requests_per_second must be > 0 or None, got {requests_per_second}")
        self.model, self.timeout, self.temperature, self.max_tokens = model, float(timeout), temperature, max_tokens
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.max_concurrency, self.requests_per_second = int(max_concurrency), requests_per_second
        self.json_mode, self.extra_body = json_mode, dict(extra_body or {})
        self.name = f"openai:{self.base_url or 'api.openai.com'}:{model}:t={temperature}:max={max_tokens}"
        self._loop: Any = None  # the client, its semaphore and pacing belong to one event loop
        self._next_start = 0.0

    def _bind(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            import openai

            self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout,
                                              max_retries=0)  # the judge retries, within its deadline
            self._sem = asyncio.Semaphore(self.max_concurrency)
            self._pace_lock = asyncio.Lock()
            self._loop = loop
        return self._client

    async def _pace(self) -> None:
        if self.requests_per_second is None:
            return
        async with self._pace_lock:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 1.0 / self.requests_per_second
        if wait > 0:
            await asyncio.sleep(wait)

    async def complete_many(self, requests: list[Messages]) -> list[str | BaseException]:
        client = self._bind()
        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if self.json_mode else {}

        async def one(messages: Messages) -> str | BaseException:
            async with self._sem:
                await self._pace()
                try:
                    reply = await client.chat.completions.create(
                        model=self.model, messages=messages, temperature=self.temperature,
                        max_tokens=self.max_tokens, extra_body=self.extra_body or None, **extra)
                    return reply.choices[0].message.content or ""
                except Exception as e:  # noqa: BLE001  # the judge counts, retries and reports it
                    return e

        return list(await asyncio.gather(*(one(m) for m in requests)))


class LocalBackend:
    """A causal LM with a chat template in this process (greedy, `max_new_tokens`), batched.

    model: a hub id, a local folder, a built-in name such as `smollm2-135m-instruct`, or a loaded
    model (then give `tokenizer`). device: "auto" (cuda if available) or a torch device string;
    dtype: "auto" (bf16 on cuda, fp32 on cpu). Calls are serialised (one model)."""

    def __init__(self, model: Any, tokenizer: Any = None, device: str = "auto", dtype: str = "auto",
                 max_new_tokens: int = 128, batch_size: int = 8, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from grpokit.modeling.known import dequantizing, resolve_model
        from grpokit.modeling.tokenizers import load_pretrained_tokenizer
        from grpokit.rewards.model import resolve_device_dtype

        self.device, torch_dtype = resolve_device_dtype(device, dtype)
        if isinstance(model, str):
            name = model
            source, kwargs = resolve_model(model)  # a built-in name or a .gguf file too, dequantized
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                         **dequantizing(kwargs))
            if tokenizer is None:
                tokenizer = load_pretrained_tokenizer(name, trust_remote_code=trust_remote_code)
        else:
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        if tokenizer is None:
            raise ValueError("judge: a loaded judge model needs its tokenizer (tokenizer=...)")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"judge: the judge model {name!r} has no chat template; use an instruct/chat model.")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.model, self.tokenizer = model.to(self.device).eval(), tokenizer
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.name = f"local:{name}:max={max_new_tokens}"
        self._lock = threading.Lock()
        self._torch = torch

    def generate(self, requests: list[Messages]) -> list[str]:
        """Greedy answers to the requests, in order (left-padded batches of `batch_size`)."""
        torch, tok = self._torch, self.tokenizer
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in requests]
        out: list[str] = []
        with self._lock, torch.inference_mode():
            side, tok.padding_side = tok.padding_side, "left"
            try:
                for s in range(0, len(texts), self.batch_size):
                    batch = tok(texts[s:s + self.batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(self.device)
                    ids = self.model.generate(**batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id)
                    out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            finally:
                tok.padding_side = side
        return out

    async def complete_many(self, requests: list[Messages]) -> list[str | BaseException]:
        try:
            return list(await asyncio.to_thread(self.generate, requests))
        except Exception as e:  # noqa: BLE001  # every request of the batch failed the same way
            return [e] * len(requests)


class FunctionBackend:
    """A Python function as the judge: `fn(messages) -> str` (or an `async def`)."""

    def __init__(self, fn: Callable[[Messages], Any], name: str | None = None):
        self.fn = fn
        self.name = name or f"function:{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}"

    async def complete_many(self, requests: list[Messages]) -> list[str | BaseException]:
        async def one(messages: Messages) -> str | BaseException:
            try:
                value = self.fn(messages)
                if inspect.isawaitable(value):
                    value = await value
                return str(value)
            except Exception as e:  # noqa: BLE001
                return e

        return list(await asyncio.gather(*(one(m) for m in requests)))


def make_backend(backend: Any = None, *, model: Any = None, base_url: str | None = None, **options) -> JudgeBackend:
    """A backend from a reward's options: a backend object or a function as given; "openai"
    (or any `base_url`) -> OpenAIBackend(model, base_url, **options); "local" (or a model and no
    base_url) -> LocalBackend(model, **options)."""
    if backend is not None and not isinstance(backend, str):
        if hasattr(backend, "complete_many"):
            return backend
        if callable(backend):
            return FunctionBackend(backend)
        raise TypeError(f"judge: backend must be 'openai', 'local', a backend object or a function, got {backend!r}")
    kind = backend or ("openai" if base_url or os.environ.get("OPENAI_BASE_URL") else "local")
    if kind == "openai":
        if not model:
            raise ValueError("judge: the OpenAI-compatible judge needs model= (the id the server serves)")
        return OpenAIBackend(model, base_url=base_url, **options)
    if kind == "local":
        if model is None:
            raise ValueError("judge: give model= (a judge model: hub id, folder or built-in name), or base_url= "
                             "and model= for a server")
        return LocalBackend(model, **options)
    raise ValueError(f"judge: backend={kind!r}; use 'openai', 'local', a backend object or a function")
