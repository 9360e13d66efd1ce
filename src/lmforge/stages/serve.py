"""`lmforge serve --model M`: an OpenAI-compatible HTTP API (completions, chat, embeddings, classification) over
the continuously batching engine, on 127.0.0.1 unless told otherwise. The server lives in `inference/bridge.py`
(the engine thread), `inference/http.py` (errors, guard, uvicorn) and `inference/routes.py` (the routes, `create_app`);
this stage loads the model, builds the engine and runs it until SIGINT / SIGTERM (then drains gracefully)."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_ADAPTER = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]{0,63})=(.+)$")


@dataclass
class Check:
    """One question of the smoke test: a user message and what its reply must contain."""

    SHORTHAND = "ask"
    ask: str
    """The user message, sent as one chat request (greedy)."""
    accept: list[str] = field(default_factory=list)
    """Regular expressions (case-insensitive) that must each be found in the reply for it to pass; none: any
    reply passes."""

    def validate(self) -> None:
        for pattern in self.accept:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"accept: {pattern!r} is not a regular expression: {e}") from None

    def verdict(self, reply: str) -> list[str]:
        """The patterns the reply lacks (empty: it passes)."""
        return [p for p in self.accept if not re.search(p, reply, re.IGNORECASE)]


@dataclass
class Config:
    model: str
    """Model: a Hugging Face folder, a .gguf file, a hub id, or a local alias (smollm2-135m-instruct)."""
    served_model_name: str | None = None
    """Name clients put in `model`; default: the model folder's or file's name."""
    adapter: list[str] = field(default_factory=list)
    """LoRA adapters as NAME=PATH (PEFT folders), comma-separated on the command line; clients select one by
    sending its NAME as `model`."""
    draft: str | None = None
    """Draft model for speculative decoding (same tokenizer); implies speculative=draft."""
    speculative: Literal["none", "ngram", "draft"] = "none"
    """Speculative decoding: none, prompt lookup (ngram) or a draft model."""
    num_speculative_tokens: int = 4
    """Tokens proposed per step when speculating."""
    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 exposes the server to the network (set an API key)."""
    port: int = 8000
    """TCP port (0 picks a free one)."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` (default: the LMFORGE_API_KEY environment variable, else none)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Compute dtype of the model."""
    device: str = "cpu"
    """Device to run on (cpu, cuda, cuda:1, ...)."""
    kv_cache_gb: float = 1.0
    """Memory for the paged KV cache, in GiB."""
    block_size: int = 16
    """Token slots per KV-cache block."""
    max_running: int = 64
    """Most sequences decoded together."""
    max_batch_tokens: int = 2048
    """Most tokens in one forward pass (longer prompts are prefilled in chunks)."""
    prefix_caching: bool = True
    """Share the KV blocks of identical prompt prefixes between requests."""
    max_queue: int = 256
    """Requests allowed to wait for a batch slot; more get HTTP 429."""
    max_body_bytes: int = 1048576
    """Largest request body; larger ones get HTTP 413."""
    default_max_tokens: int | None = None
    """Chat completions without max_tokens stop after this many tokens (null: at the end of the context)."""
    shutdown_grace_s: float = 30.0
    """On SIGINT / SIGTERM, seconds in-flight requests may finish before they are aborted."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    """uvicorn's log level."""
    allow_pickle: bool = False
    """Allow loading pickle (.bin/.pt) checkpoints; only for files you trust."""
    check: list[Check] = field(default_factory=list)
    """A smoke test: start the server, ask each question as one chat request through the OpenAI client, print the
    replies and their verdicts, write them to `output`/serve.json and stop (exit 0 when every reply was accepted;
    a pipeline's last step). Each item is a message, or {ask, accept: [regex, ...]}."""
    check_max_tokens: int = 64
    """Longest reply to a check question."""
    output: str | None = None
    """Folder for serve.json, the check's questions, replies and verdicts (a pipeline sets it)."""

    def validate(self) -> None:
        for k in ("num_speculative_tokens", "block_size", "max_running", "max_batch_tokens", "max_queue",
                  "max_body_bytes", "check_max_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, found {getattr(self, k)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], found {self.port}")
        if self.kv_cache_gb <= 0 or self.shutdown_grace_s < 0:
            raise ValueError(f"kv_cache_gb must be > 0 and shutdown_grace_s >= 0, found {self.kv_cache_gb} and "
                             f"{self.shutdown_grace_s}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1 or null, found {self.default_max_tokens}")
        if self.speculative == "draft" and not self.draft:
            raise ValueError("speculative=draft needs --draft PATH")
        for c in self.check:
            c.validate()
        self.adapters()

    def adapters(self) -> dict[str, str]:
        """{name: path} from the NAME=PATH entries (names are checked; paths come from the operator)."""
        out: dict[str, str] = {}
        for item in self.adapter:
            m = _ADAPTER.match(item.strip())
            if m is None:
                raise ValueError(f"adapter: expected NAME=PATH (NAME: letters, digits, '.', '_', '-'), found "
                                 f"{item!r}")
            if m[1] in out or m[1] == self.model_name():
                raise ValueError(f"adapter: name {m[1]!r} is used twice (or is the served model's name)")
            out[m[1]] = m[2]
        return out

    def model_name(self) -> str:
        """served_model_name, else the model's folder or file name (a run's final/ is named after the run)."""
        path = Path(self.model.rstrip("/"))
        return self.served_model_name or (path.parent.name if path.name == "final" else path.name).removesuffix(
            ".gguf")


def main(cfg: Config) -> int:
    import torch

    from ..inference.bridge import AsyncEngine
    from ..inference.engine import Engine, EngineConfig
    from ..inference.http import serve
    from ..inference.routes import create_app
    from ..transforms.peft import load

    api_key = cfg.api_key if cfg.api_key is not None else os.environ.get("LMFORGE_API_KEY") or None
    dtype = getattr(torch, cfg.dtype)
    model, tok = load(cfg.model, dtype=dtype, device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None:
        print(f"error: {cfg.model} has no tokenizer.json; serving needs one", file=sys.stderr)
        return 2
    draft = load(cfg.draft, dtype=dtype, device=cfg.device, allow_pickle=cfg.allow_pickle)[0] if cfg.draft else None
    speculative = "draft" if draft is not None else cfg.speculative
    engine = Engine(model, tok, EngineConfig(
        block_size=cfg.block_size, kv_cache_gb=cfg.kv_cache_gb, max_running=cfg.max_running,
        max_batch_tokens=cfg.max_batch_tokens, prefix_caching=cfg.prefix_caching, speculative=speculative,
        num_speculative_tokens=cfg.num_speculative_tokens), draft=draft)
    for name, path in cfg.adapters().items():
        engine.load_adapter(name, path)
    name = cfg.model_name()
    async_engine = AsyncEngine(engine, max_queue=cfg.max_queue, background=False)  # serve() runs it here
    app = create_app(async_engine, tok, name, api_key=api_key, max_body_bytes=cfg.max_body_bytes,
                     default_max_tokens=cfg.default_max_tokens)
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {cfg.host} without an API key: anyone who can reach this port can use the "
              "model (set --api-key or LMFORGE_API_KEY)", file=sys.stderr)

    answered: list[dict] = []

    def started(running) -> None:
        if cfg.check:
            threading.Thread(target=_check, args=(running.url, async_engine, cfg, name, api_key, answered),
                             name="lmforge-check", daemon=True).start()
            return
        shown = "$LMFORGE_API_KEY" if cfg.api_key is None else "YOUR_KEY"
        auth = f' -H "Authorization: Bearer {shown}"' if api_key else ""
        decode = f", decode {engine.decode_path}" if model.cfg.head == "lm" else ""
        print(f"serving {name} ({model.cfg.family}, head {model.cfg.head}{decode}) at {running.url}/v1 "
              f"- Ctrl-C to stop", flush=True)
        print(f"try: curl {running.url}{_example(name, model.cfg)}{auth}", flush=True)

    serve(app, async_engine, cfg.host, cfg.port, cfg.shutdown_grace_s, cfg.log_level, on_started=started)
    if not cfg.check:
        return 0
    accepted = sum(a["accepted"] for a in answered)
    if cfg.output:
        from ..atomic import write_text

        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        write_text(Path(cfg.output) / "serve.json", json.dumps(
            {"model": cfg.model, "questions": len(cfg.check), "answered": len(answered), "accepted": accepted,
             "checks": answered}, indent=2) + "\n")
    print(f"serve check: {accepted} of {len(cfg.check)} replies accepted", flush=True)
    return 0 if accepted == len(cfg.check) else 1


def _check(url: str, async_engine, cfg: Config, name: str, api_key: str | None, answered: list[dict]) -> None:
    """Ask the running server each check question through the official OpenAI client, print each exchange and
    its verdict, then stop the server (the way a signal would)."""
    import asyncio

    try:
        from openai import OpenAI

        client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", max_retries=0, timeout=600)
        print(f"serve check at {url}/v1 (OpenAI client, model {name!r}):", flush=True)
        for c in cfg.check:
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": c.ask}],
                                                   max_tokens=cfg.check_max_tokens, temperature=0)
            text = reply.choices[0].message.content or ""
            missing = c.verdict(text)
            answered.append({"ask": c.ask, "reply": text, "accept": c.accept, "missing": missing,
                             "accepted": not missing, "tokens": reply.usage.completion_tokens,
                             "finish_reason": reply.choices[0].finish_reason})
            verdict = "accepted" if not missing else f"not accepted: lacks {', '.join(map(repr, missing))}"
            print(f"  user: {c.ask}\n  assistant: {text.strip()!r} ({reply.usage.completion_tokens} tokens, "
                  f"{reply.choices[0].finish_reason}){' - ' + verdict if c.accept else ''}", flush=True)
    except Exception as e:  # reported, then the server stops and the stage fails
        print(f"serve check failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        asyncio.run(async_engine.shutdown(cfg.shutdown_grace_s))


def _example(name: str, model_cfg) -> str:
    """The tail of an example curl line (path and body) for this kind of model."""
    if model_cfg.head == "classifier":
        return "/v1/classify -H 'Content-Type: application/json' -d '{\"input\": \"I love this!\"}'"
    if model_cfg.head == "span":
        return ("/v1/qa -H 'Content-Type: application/json' -d '{\"input\": {\"question\": \"Who wrote it?\", "
                "\"context\": \"It was written by Ada.\"}}'")
    if not model_cfg.causal:
        return (f"/v1/embeddings -H 'Content-Type: application/json' -d '{{\"model\": \"{name}\", "
                f"\"input\": \"Hello world\"}}'")
    return (f"/v1/chat/completions -H 'Content-Type: application/json' -d '{{\"model\": \"{name}\", "
            f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}], \"max_tokens\": 64}}'")
