"""`lmforge chat --model M`: talk to a model in the terminal. Replies stream from the engine (no HTTP); the
conversation is kept and re-rendered through the model's chat template every turn. Commands: /reset, /exit;
Ctrl-D exits, Ctrl-C stops the reply being written. Piped standard input works too: one message per line."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .generate import Options

if TYPE_CHECKING:
    from ..inference.request import Stream

HELP = "commands: /reset (start a new conversation), /exit (or Ctrl-D); Ctrl-C stops a reply"


@dataclass
class Config(Options):
    max_new_tokens: int = 512
    """Longest reply, in tokens."""
    kv_cache_gb: float = 0.5
    """Memory for the KV cache, in GiB."""

    def validate(self) -> None:
        super().validate()
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, found {self.kv_cache_gb}")


def main(cfg: Config) -> int:
    import torch

    from ..inference.engine import Engine, EngineConfig, RequestError
    from ..tokenizer.chat import encode_chat
    from ..transforms.peft import load

    model, tok = load(cfg.model, dtype=getattr(torch, cfg.dtype), device=cfg.device, allow_pickle=cfg.allow_pickle)
    if tok is None or model.cfg.head != "lm":
        print(f"error: {cfg.model} needs a tokenizer and a causal LM head to chat", file=sys.stderr)
        return 2
    engine = Engine(model, tok, EngineConfig(kv_cache_gb=cfg.kv_cache_gb))
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": cfg.system}] if cfg.system else []
    history = list(start)
    if interactive:
        print(f"chatting with {cfg.model}; {HELP}", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            if interactive:
                print()
            return 0
        except KeyboardInterrupt:  # at the prompt: leave
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("[new conversation]", file=sys.stderr)
            continue
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        ids = encode_chat(tok, history, add_generation_prompt=True).ids
        try:
            steps = engine.stream([ids], cfg.params(seed_offset=turn))
        except RequestError as e:
            history.pop()
            print(f"error: {e}; /reset starts a new conversation", file=sys.stderr)
            continue
        turn += 1
        reply, stopped = _print_reply(steps)
        history.append({"role": "assistant", "content": reply})
        if stopped:
            print("[stopped]", file=sys.stderr)


def _print_reply(steps: Stream) -> tuple[str, bool]:
    """Print the reply as it comes; Ctrl-C (checked between engine steps, so the engine stays consistent)
    aborts it. Returns (reply text, whether it was stopped)."""
    interrupted = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set()) if in_main else None
    reply = ""
    try:
        with steps:  # leaving it aborts an unfinished reply
            while not steps.done and not interrupted.is_set():
                for out in next(steps):
                    sys.stdout.write(out.text)
                    sys.stdout.flush()
                    reply += out.text
            aborted = not steps.done
    finally:
        if in_main:
            signal.signal(signal.SIGINT, previous)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return reply, aborted
