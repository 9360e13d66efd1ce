"""lmforge models as an lm-evaluation-harness model type, so the harness's own tasks run on them.

Importing this module registers the name ``lmforge`` in lm-eval's model registry:
``lm_eval.simple_evaluate(model="lmforge", model_args="path=MODEL")`` in Python, or on the command line
``lmforge-lm-eval --model lmforge --model_args path=MODEL --tasks …`` (lm-eval's own CLI, arguments verbatim;
lm-eval 0.4.13 discovers no third-party models, so the bare ``lm_eval`` command cannot see this one).

Requests are encoded and scored as lm-eval's ``HFLM`` does for causal models, so numbers compare with ``--model hf``
on the same weights: log-likelihoods through `eval.harness`, generation through the inference `Engine`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

try:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own models first: its registry fills lazily when empty)
    from lm_eval.api.instance import Instance
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("lmforge.eval.lm_eval_model needs lm-evaluation-harness: pip install 'lmforge[eval]'") from e

from ..models.transformer import Transformer
from ..tokenizer.base import DEFAULT_CHAT_TEMPLATE, Tokenizer
from .harness import loglikelihood, rolling_loglikelihood
from .multiple_choice import encode_pair

__all__ = ["LMForgeLM", "register", "main", "MODEL_NAME"]

log = logging.getLogger(__name__)

MODEL_NAME = "lmforge"
_TARGET = "lmforge.eval.lm_eval_model:LMForgeLM"  # by import path: also right when run as `python -m`
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message
_GEN_KWARGS = {"do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}


def register() -> None:
    """Register ``lmforge`` in lm-eval's model registry (lazily, by import path; calling it again is a no-op)."""
    model_registry.register(MODEL_NAME, target=_TARGET)


def _parse_batch_size(value: int | str | None, max_batch_size: int | None) -> int:
    """lm-eval's batch size (an int, a digit string, "auto" or "auto:N") as a fixed number of rows."""
    if value is None:
        return 1
    if isinstance(value, str) and value.startswith("auto"):
        return int(max_batch_size or 16)  # no memory probe: the engine and harness batch within this bound
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be an integer or 'auto', found {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, found {size}")
    return size


def _parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype) or value == "auto":
        return None if value == "auto" else value
    if value not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', found {value!r}")
    return _DTYPES[value]


class LMForgeLM(LM):
    """An lmforge causal LM (HF folder, .gguf, alias, hub id; optional LoRA adapter) behind lm-eval's `LM` API."""

    def __init__(self, path: str | None = None, adapter: str | None = None, dtype: str | torch.dtype | None = None,
                 device: str | None = None, batch_size: int | str | None = 1, max_batch_size: int | None = None,
                 max_length: int | str | None = None, seed: int | str = 1234, pretrained: str | None = None,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 trust_remote_code: bool | None = None) -> None:
        """`path` (alias `pretrained`) is anything `lmforge.load` takes; or pass a loaded `model` + `tokenizer`.
        `seed` seeds sampled generations (request i uses seed + i unless its gen_kwargs carry a seed)."""
        super().__init__()
        del trust_remote_code  # lm-eval's CLI may pass it; lmforge runs no remote code
        path = path or pretrained
        if device is None:
            device = model.device if model is not None else "cuda" if torch.cuda.is_available() else "cpu"
        if model is None:
            if path is None:
                raise ValueError("model_args needs path=MODEL (a Hugging Face folder, a .gguf file or an alias)")
            from ..transforms.peft import load

            model, tokenizer = load(path, dtype=_parse_dtype(dtype), device=str(device))
        elif _parse_dtype(dtype) is not None:
            model = model.to(_parse_dtype(dtype))
        if tokenizer is None:
            raise ValueError(f"{path}: no tokenizer (tokenizer.json) next to the model; lm-eval tasks need text")
        if model.cfg.head != "lm":
            raise ValueError(f"{path}: the model has a {model.cfg.head!r} head; lm-eval needs a causal LM")
        if adapter:
            from ..transforms.peft import load_adapter

            load_adapter(model, adapter)
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.path = str(path) if path is not None else "lmforge-model"
        self._device = torch.device(device)
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)
        positions = model.cfg.max_position_embeddings
        self._max_length = int(max_length) if max_length else positions
        if self._max_length > positions:
            raise ValueError(f"max_length={self._max_length} exceeds the model's {positions} positions")
        self.seed = int(seed)
        self._engine = None

    # ---- what lm-eval and HFLM expose
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context or a rolling document is conditioned on: BOS, else EOS (as HFLM)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str:
        return self.tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "model_revision": "main", "model_sha": ""}

    def tok_encode(self, text: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None) -> list[int]:
        """HFLM.tok_encode: the tokenizer's special tokens unless the text already starts with the prefix token."""
        if add_special_tokens is None:
            prefix = self.tokenizer.bos_token or self.tokenizer.eos_token
            add_special_tokens = not (prefix and text.startswith(prefix))
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ---- requests
    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """TemplateLM.loglikelihood's encoding; an empty context becomes the prefix token."""
        if context:
            return encode_pair(self.tokenizer, context, continuation)
        cont = self.tokenizer.encode(continuation, add_special_tokens=False)
        if cont and cont[0] == self.prefix_token_id:
            return cont[:1], cont[1:]
        return [self.prefix_token_id], cont

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per (context, continuation) request."""
        args = [req.args for req in requests]
        pairs = [self._pair(ctx, cont) for ctx, cont in args]
        out: list[tuple[float, bool]] = []
        step = max(64, 16 * self.batch_size)  # chunks only for the progress bar; the choices of a doc stay together
        quiet = disable_tqdm or self.rank != 0
        with tqdm(total=len(pairs), disable=quiet, desc="Running loglikelihood requests") as bar:
            for i in range(0, len(pairs), step):
                out += loglikelihood(self.model, pairs[i:i + step], self.batch_size, self.max_length)
                bar.update(len(pairs[i:i + step]))
        for a, res in zip(args, out):
            self.cache_hook.add_partial("loglikelihood", a, res)
        return out

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole string, conditioned on the prefix token, in disjoint max_length windows."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood_rolling"):
            (text,) = req.args
            total, _ = rolling_loglikelihood(self.model, self.tok_encode(text), self.max_length,
                                             prefix_token_id=self.prefix_token_id, batch_size=self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def _params(self, gen_kwargs: dict[str, Any], index: int) -> tuple[Any, list[str]]:
        """SamplingParams and lm-eval's stop strings (EOS text added) for one request's gen_kwargs."""
        from ..inference.sampling import SamplingParams

        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: gen_kwargs must be a dict, found {gen_kwargs!r}")
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos = self.tokenizer.decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = int(kwargs.pop("max_gen_toks"))
        if max_gen >= self.max_length:
            raise ValueError(f"max_gen_toks={max_gen} must be less than the model's max_length {self.max_length}")
        if kwargs.get("num_beams", 1) == 1:
            kwargs.pop("num_beams", None)
        unknown = sorted(set(kwargs) - _GEN_KWARGS)
        if unknown:
            raise ValueError(f"generate_until: unsupported generation kwargs {unknown}; supported: "
                             f"{sorted(_GEN_KWARGS | {'until', 'max_gen_toks', 'num_beams'})}")
        temperature = 0.0
        if kwargs.get("do_sample"):
            temperature = float(kwargs.get("temperature", 1.0))  # transformers' default when none is given
            if temperature <= 0:
                raise ValueError(f"do_sample=True needs temperature > 0, found {temperature}")
        params = SamplingParams(max_new_tokens=max_gen, temperature=temperature,
                                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                                repetition_penalty=float(kwargs.get("repetition_penalty") or 1.0),
                                seed=int(kwargs.get("seed", self.seed + index)),
                                stop=tuple(s for s in until if s))
        return params, until

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Continuations of each context until a stop string, EOS or max_gen_toks, all requests batched in the
        engine; contexts are left-truncated to max_length - max_gen_toks and the text cut at the first stop."""
        from ..inference.engine import Engine, EngineConfig

        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, EngineConfig(max_running=self.batch_size))
        engine = self._engine
        bos = self.tokenizer.bos_token
        prompts = []
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            params, until = self._params(gen_kwargs, i)
            # HFLM.tok_batch_encode: special tokens unless the context starts with BOS; left-truncated
            ids = self.tokenizer.encode(context, add_special_tokens=not (bos and context.startswith(bos)))
            prompts.append((ids[-(self.max_length - params.max_new_tokens):] or [self.prefix_token_id], params, until))
        steps = engine.stream([ids for ids, _, _ in prompts], [params for _, params, _ in prompts])
        tokens: dict[str, list[int]] = {rid: [] for rid in steps.ids}
        quiet = disable_tqdm or self.rank != 0
        with steps, tqdm(total=len(steps.ids), disable=quiet, desc="Running generate_until") as bar:
            for outs in steps:  # leaving early (an error) aborts the rest: the engine is empty for the next call
                for out in outs:
                    tokens[out.request_id] += out.token_ids
                    if out.finished:
                        bar.update(1)
        results = []
        for req, rid, (_, _, until) in zip(requests, steps.ids, prompts):
            text = postprocess_generated_text(self.tokenizer.decode(tokens[rid]), stop=until, think_end_token=None)
            self.cache_hook.add_partial("generate_until", req.args, text)
            results.append(text)
        return results

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The model's chat template (HFLM's semantics: without a generation prompt the last message is continued;
        a template that rejects the system role is retried without it)."""
        from jinja2.exceptions import TemplateError

        from ..tokenizer.chat import ChatFormatError

        try:
            return self._render(chat_history, add_generation_prompt)
        except (TemplateError, ChatFormatError):
            log.warning("the chat template failed; retrying without the system message")
            return self._render([m for m in chat_history if m["role"] != "system"], add_generation_prompt)

    def _render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
        from ..tokenizer.chat import render

        messages = [dict(m) for m in messages]
        if add_generation_prompt or not messages:
            return render(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)
        # transformers' continue_final_message: mark the end of the last message and cut the rendering there
        messages[-1]["content"] += _CONTINUE_TAG
        text = render(self.tokenizer, messages, add_generation_prompt=False)
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0:
            raise ValueError("the chat template drops the final message, so it cannot be continued")
        return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


register()


def main(argv: Sequence[str] | None = None) -> None:
    """`lmforge-lm-eval ARGS`: lm-eval's own command line (same arguments) with the `lmforge` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = [Path(saved[0]).name if saved else "lmforge-lm-eval",
                *(saved[1:] if argv is None else list(argv))]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


if __name__ == "__main__":
    main()
