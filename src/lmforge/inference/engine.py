"""The generation engine: continuous batching over a paged KV cache, per-request sampling, stop strings,
log-probs, speculative decoding (draft model or prompt lookup), LoRA adapters per request, and batched
embeddings / classification for encoders. The library behind `lmforge generate`, `chat`, `serve`, and the
rollouts of the RL stages.

Each `step()` is one forward pass over a flattened batch: every running sequence contributes the tokens it has
not cached yet (one while decoding, a chunk of its prompt while prefilling, 1 + k while verifying k drafted
tokens), waiting requests are admitted while KV blocks and the token budget allow, and finished ones leave at
once, so no request waits for the longest one in its batch (Yu et al., 2022, "Orca").
"""

from __future__ import annotations

import contextlib
import itertools
import random
from typing import Sequence

import torch
from torch import Tensor

from ..models.transformer import Transformer
from .options import EngineConfig
from .paged import BlockManager, PagedKVCache, chain_hashes
from .request import AdapterNotFound, RequestOutput, SeqState, Stream, join_outputs
from .sampling import (RequestError, SamplingParams, StopStrings, TokenLogprob, apply_penalties, choose,
                       processed_logprobs, token_logprobs)
from .speculative import accept, lookup

# the engine's whole vocabulary, wherever each name is defined
__all__ = ["Engine", "EngineConfig", "SamplingParams", "RequestOutput", "TokenLogprob", "RequestError",
           "AdapterNotFound", "Stream"]


NATIVE_ROWS = 16  # steps of sequences of at most this many new tokens run natively, one row per token


class Engine:
    """Continuous-batching generation over one model (and optionally a draft model with the same tokenizer).
    Not thread-safe: call it from one thread (the server runs it in its own)."""

    def __init__(self, model: Transformer, tokenizer=None, config: EngineConfig | None = None,
                 draft: Transformer | None = None):
        self.cfg = config or EngineConfig()
        self.cfg.validate()
        if self.cfg.speculative == "draft" and draft is None:
            raise ValueError("speculative: 'draft' needs a draft model")
        if draft is not None and draft.cfg.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"draft model vocabulary ({draft.cfg.vocab_size}) differs from the model's "
                             f"({model.cfg.vocab_size}); the draft must share the tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.draft = draft.eval() if draft is not None and self.cfg.speculative == "draft" else None
        self.max_context = model.cfg.max_position_embeddings
        prompt = getattr(model, "prompt", None)  # prompt tuning: P virtual tokens before every prompt
        self.virtual = [-(i + 1) for i in range(prompt.num_virtual)] if prompt is not None else []
        self.device = model.device
        self.adapters: list[str] = []
        self.default_adapter: str | None = None
        self._lora: list = []
        self._sync_adapters()
        eos = model.cfg.eos_token_id
        self.eos = frozenset(i for i in [*(eos if isinstance(eos, list) else [eos]),
                                         getattr(tokenizer, "eos_id", None)] if i is not None)
        self.seqs_waiting: list[SeqState] = []
        self._steps = 0  # steps run, the clock of the waiting queue
        self.running: list[SeqState] = []
        self._aborted: list[RequestOutput] = []
        self._ids = itertools.count()
        self.counters = dict(prompt_tokens_total=0, generation_tokens_total=0, prefix_cache_hit_tokens=0,
                             requests_finished_total=0, draft_tokens_total=0, draft_tokens_accepted=0)
        if model.cfg.head == "lm":
            self._build_cache()
        self._pack()

    def _pack(self) -> None:
        """CPU fast paths: packed copies of the linear weights and the native decode step (rebuilt when adapters
        change the layers)."""
        self.packed: dict[int, object] = {}  # id(model) -> cpu.PackedWeights
        self.native: dict[int, object] = {}  # id(model) -> native.NativeDecoder
        models = [self.model] + ([self.draft] if self.draft is not None else [])
        if self.cfg.pack_weights:
            from . import cpu

            for m in models:
                if cpu.available(m.device, next(m.parameters()).dtype):
                    self.packed[id(m)] = cpu.PackedWeights(m)
        why = "native_decode is off"
        if self.cfg.native_decode and self.model.cfg.head == "lm":
            from .native import NativeDecoder

            for m in models:
                decoder, why_m = NativeDecoder.build(m)
                if decoder is not None:
                    self.native[id(m)] = decoder
                elif m is self.model:
                    why = why_m
        self.decode_path = "native" if id(self.model) in self.native else f"pytorch ({why})"

    # ---- setup
    def _build_cache(self) -> None:
        dtype = next(self.model.parameters()).dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        models = [self.model] + ([self.draft] if self.draft is not None else [])
        per_token = sum(PagedKVCache.bytes_per_token(m.cfg, dtype) for m in models)
        bs = self.cfg.block_size
        budget = self.cfg.kv_cache_gb * 2**30 if self.cfg.kv_cache_gb is not None else min(
            2**30, self.cfg.max_running * (self.max_context + bs) * per_token)
        num_blocks = int(budget // (per_token * bs))
        if num_blocks < 2:
            raise ValueError(f"kv_cache_gb {self.cfg.kv_cache_gb} holds fewer than 2 blocks of {bs} tokens")
        self.blocks = BlockManager(num_blocks, bs)
        self.cache = PagedKVCache(self.model.cfg, num_blocks, bs, self.device, dtype)
        self.draft_cache = (PagedKVCache(self.draft.cfg, num_blocks, bs, self.device, dtype)
                            if self.draft is not None else None)
        self.capacity = num_blocks * bs

    def _sync_adapters(self) -> None:
        from ..transforms.lora import lora_layers, adapter_names

        wrappers = lora_layers(self.model)
        self._lora = [w for _, w in wrappers]
        self.adapters = adapter_names(self.model)
        active = {w.active for _, w in wrappers if isinstance(w.active, str)}
        if any(w.merged is not None for _, w in wrappers):
            raise ValueError("the model has a merged LoRA adapter; unmerge it (or unwrap) before serving")
        if active:
            self.default_adapter = sorted(active)[0]  # a model loaded from an adapter folder serves it by default

    def load_adapter(self, name: str, path: str) -> None:
        """Load a PEFT LoRA adapter folder under `name`; requests choose it with `adapter=name`."""
        from ..transforms.lora import route_adapters
        from ..transforms.peft import load_adapter

        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        default = self.default_adapter
        load_adapter(self.model, path, name)
        route_adapters(self.model, {})
        self._sync_adapters()
        self.default_adapter = default
        self._pack()

    # ---- requests
    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams, *, request_id: str | None = None,
                    adapter: str | None = None) -> str:
        """Queue a request; returns its id. Raises RequestError for requests that cannot run."""
        if self.model.cfg.head != "lm":
            raise RequestError(f"this model has a {self.model.cfg.head!r} head; only causal LMs generate text")
        params.validate()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise RequestError("the prompt is empty: give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.model.cfg.vocab_size:
            raise RequestError(f"prompt token ids must be in [0, {self.model.cfg.vocab_size}), found "
                               f"{min(prompt)}..{max(prompt)}")
        total = len(self.virtual) + len(prompt) + params.max_new_tokens
        if total > self.max_context:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                               f"exceeds the context length {self.max_context}")
        if total > self.capacity:
            raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                               f"exceeds the KV cache ({self.capacity} tokens); raise kv_cache_gb")
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need the engine to have a tokenizer")
        adapter = adapter if adapter is not None else self.default_adapter
        if adapter is not None and adapter not in self.adapters:
            raise AdapterNotFound(f"adapter {adapter!r} is not loaded; loaded: {self.adapters}")
        rid = request_id or f"req-{next(self._ids)}"
        gen = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else random.SystemRandom().getrandbits(63)
            gen = torch.Generator(device=self.device).manual_seed(seed)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos)
        seq = SeqState(rid, prompt, params, adapter, gen, stops, tokens=self.virtual + prompt,
                       start=total - params.max_new_tokens, logprobs=[] if params.logprobs is not None else None,
                       watch=StopStrings(params.stop) if params.stop else None)
        seq.queued = self._steps
        self.seqs_waiting.append(seq)
        self.counters["prompt_tokens_total"] += len(prompt)
        return rid

    def abort(self, request_id: str) -> None:
        """Cancel a request; its blocks return to the pool and the next step reports it with reason 'abort'."""
        for queue in (self.seqs_waiting, self.running):
            for s in queue:
                if s.id == request_id:
                    queue.remove(s)
                    self._release(s)
                    s.finish_reason = "abort"
                    self._aborted.append(self._output(s, flush=True))
                    return

    def _forget(self, request_id: str) -> None:
        """Abort a request nobody listens to any more: no 'abort' output is reported for it."""
        self.abort(request_id)
        self._aborted = [o for o in self._aborted if o.request_id != request_id]

    def has_unfinished(self) -> bool:
        return bool(self.seqs_waiting or self.running or self._aborted)

    def stats(self) -> dict[str, int]:
        lm = self.model.cfg.head == "lm"
        return dict(waiting=len(self.seqs_waiting), running=len(self.running),
                    kv_blocks_used=self.blocks.used if lm else 0, kv_blocks_total=self.blocks.num_blocks if lm else 0,
                    **self.counters)

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
               adapter: str | None = None) -> Stream:
        """Add one request per prompt, all or none (raises RequestError / AdapterNotFound), and step them: the
        returned `Stream` yields their outputs, one list per step, until all have finished."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp, adapter=adapter))
        except BaseException:
            for rid in ids:
                self._forget(rid)
            raise
        return Stream(ids, self.step, self._forget)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 adapter: str | None = None) -> list[RequestOutput]:
        """Run prompts to completion together; one aggregated output per prompt, in order."""
        parts: dict[str, list[RequestOutput]] = {}
        with self.stream(prompts, params, adapter) as steps:
            for outs in steps:
                for out in outs:
                    parts.setdefault(out.request_id, []).append(out)
        return [join_outputs(parts[rid]) for rid in steps.ids]

    # ---- one iteration
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Admit, run one forward pass over every scheduled sequence, sample, retire; outputs of this step."""
        outs, self._aborted = self._aborted, []
        self._steps += 1
        plan = self._schedule()
        if not plan:
            return outs
        proposals = self._propose([s for s, _ in plan if s in self._spec_room]) if self._spec_room else {}
        singles = [(s, 1) for s, n in plan if n == 1 and s not in proposals]
        multis = [(s, n) for s, n in plan if n > 1] + [(s, 1 + len(proposals[s][0])) for s, n in plan
                                                       if s in proposals]
        rows = singles + multis  # (sequence, new tokens) in flat order: single tokens first, as plan() wants
        ids, pos, keep = [], [], []
        for s, n in rows:
            new = s.tokens[s.cached:s.cached + n] if s not in proposals else [s.tokens[-1], *proposals[s][0]]
            start = len(ids)
            ids.extend(new)
            pos.extend(range(s.cached, s.cached + n))
            if s in proposals:
                keep.extend(range(start, start + n))
            elif s.cached + n == len(s.tokens):
                keep.append(start + n - 1)
        logits = self._forward(self.model, self.cache, rows, ids, pos, keep)  # (R, V)
        r = 0
        finishing: list[tuple[SeqState, int]] = []
        for s, n in rows:
            if s in proposals:
                self._verify(s, proposals[s], logits[r:r + n])
                r += n
            else:
                s.cached += n
                if s.cached == len(s.tokens):
                    finishing.append((s, r))
                    r += 1
        if finishing:
            self._sample([s for s, _ in finishing], logits[[i for _, i in finishing]])
        for s, _ in rows:
            self._register(s)
            if s.finish_reason is None:
                self._check_length(s)
            if s.new_tokens or s.finish_reason:
                outs.append(self._output(s, flush=s.finish_reason is not None))
            if s.finish_reason is not None:
                self.running.remove(s)
                self._release(s)
                self.counters["requests_finished_total"] += 1
        return outs

    def _forward(self, model: Transformer, cache: PagedKVCache, rows: list[tuple[SeqState, int]], ids: list[int],
                 pos: list[int], keep: list[int], native: bool = True) -> Tensor:
        """One pass of `model` over the flattened step; logits (R, V) of the positions in `keep`. LoRA layers are
        routed per row for the pass and their own routing is put back afterwards (a model being trained and
        evaluated with the engine trains the adapters it trained before)."""
        native = self.native.get(id(model)) if native else None
        if native is not None and all(n <= NATIVE_ROWS for _, n in rows):  # decoding, verifying drafts
            # one row per token: a layer writes every row's keys before any row attends up to its own position
            tables = [s.table for s, n in rows for _ in range(n)]
            return native(ids, pos, tables, cache.k, cache.v, cache.block_size)[keep]  # (R, V)
        singles = next((i for i, (_, n) in enumerate(rows) if n > 1), len(rows))  # single-token rows come first
        if native is not None and singles:  # decode rows natively, prompt chunks in PyTorch
            logits = native(ids[:singles], pos[:singles], [s.table for s, _ in rows[:singles]], cache.k, cache.v,
                            cache.block_size)  # (singles, V)
            head = logits[[k for k in keep if k < singles]]
            rest = self._forward(model, cache, rows[singles:], ids[singles:], pos[singles:],
                                 [k - singles for k in keep if k >= singles], native=False)
            return torch.cat([head, rest])
        cache.plan([(s.table, s.cached if cache is self.cache else s.draft_cached, n) for s, n in rows])
        dev = self.device
        saved = [w.active for w in self._lora] if model is self.model else []
        if saved:
            from ..transforms.lora import route_adapters

            routes: dict[str, list[int]] = {}
            start = 0
            for s, n in rows:
                if s.adapter is not None:
                    routes.setdefault(s.adapter, []).extend(range(start, start + n))
                start += n
            route_adapters(model, {a: torch.tensor(r, device=dev) for a, r in routes.items()})
        packed = self.packed.get(id(model))
        try:
            with packed.installed() if packed is not None else contextlib.nullcontext():
                return self._run(model, cache, ids, pos, keep)
        finally:
            for w, a in zip(self._lora, saved):
                w.active = a

    def _run(self, model: Transformer, cache: PagedKVCache, ids: list[int], pos: list[int], keep: list[int]
             ) -> Tensor:
        dev = self.device
        x = torch.tensor([ids], device=dev)  # (1, N)
        kw = dict(position_ids=torch.tensor([pos], device=dev), cache=cache,
                  logits_to_keep=torch.tensor(keep, dtype=torch.long, device=dev))
        prompt = getattr(model, "prompt", None)
        if prompt is None:
            return model(x, **kw).logits[0].float()  # (R, V)
        emb = model.embed.tokens(x.clamp(min=0))  # (1, N, C); placeholders -1..-P take the virtual tokens
        virtual = x < 0
        emb[virtual] = prompt.embedding.to(emb.dtype)[-x[virtual] - 1]
        model.prompt = None  # the engine placed them: the model must not prepend them again
        try:
            return model(inputs_embeds=emb, **kw).logits[0].float()
        finally:
            model.prompt = prompt

    # ---- scheduling
    def _blocks_for(self, s: SeqState, end: int) -> int:
        """Blocks to add so that positions < end have slots."""
        return max(0, -(-end // self.blocks.block_size) - len(s.table))

    def _grow(self, s: SeqState, end: int) -> None:
        for _ in range(self._blocks_for(s, end)):
            s.table.append(self.blocks.allocate())

    def _release(self, s: SeqState) -> None:
        self.blocks.release(s.table)
        s.table, s.hashes, s.cached, s.draft_cached = [], [], 0, 0

    def _schedule(self) -> list[tuple[SeqState, int]]:
        """Pick (sequence, new tokens) for this step: running sequences first (oldest first), preempting the
        newest when blocks run out, then waiting requests while blocks, budget and max_running allow. Prompt
        tokens share the smaller budget max_prefill_tokens."""
        budget, prefill = self.cfg.max_batch_tokens, self.cfg.max_prefill_tokens
        speculating = self.cfg.speculative != "none"
        plan: list[tuple[SeqState, int]] = []
        self._spec_room: set[SeqState] = set()  # sequences with slots for drafted tokens this step
        for s in list(self.running):
            if s not in self.running:
                continue  # preempted below
            left = len(s.tokens) - s.cached
            n = min(left, budget if left == 1 else min(budget, prefill))
            if n <= 0:
                continue
            extra = self._draft_budget(s) if speculating and n == 1 else 0  # slots for drafted tokens
            while self._blocks_for(s, s.cached + n + extra) > self.blocks.available:
                victim = self.running[-1]
                self._preempt(victim)
                plan = [(q, m) for q, m in plan if q is not victim]
                self._spec_room.discard(victim)
                if victim is s:
                    break
            if s not in self.running:
                continue
            self._grow(s, s.cached + n + extra)
            if extra:
                self._spec_room.add(s)
            plan.append((s, n))
            budget -= n + extra
            prefill -= n if left > 1 else 0
        watermark = max(1, self.blocks.num_blocks // 100)
        while self.seqs_waiting and min(budget, prefill) > 0 and len(self.running) < self.cfg.max_running:
            s = min(self.seqs_waiting, key=self._priority)
            if not s.table:
                self._match_prefix(s)
            n = min(len(s.tokens) - s.cached, budget, prefill)
            if self._blocks_for(s, s.cached + n) + (watermark if self.running else 0) > self.blocks.available:
                n = (self.blocks.available + len(s.table)) * self.blocks.block_size - s.cached
                if self.running or plan or n <= 0:  # a waiting request holds no blocks (its prefix matches again)
                    self._release(s)
                    break  # otherwise nothing would free blocks: it takes what fits
            self.seqs_waiting.remove(s)
            self.counters["prefix_cache_hit_tokens"] += s.cached  # what it matched, counted once it is admitted
            self._grow(s, s.cached + n)
            self.running.append(s)
            plan.append((s, n))
            budget -= n
            prefill -= n
        return plan

    def _priority(self, s: SeqState) -> int:
        """Waiting requests go fewest prompt tokens left first, each step waited counting as one prefill chunk (a
        long prompt waits at most len / max_prefill_tokens steps behind short ones); preempted ones before all."""
        waited = self._steps - s.queued
        return -(1 << 62) if s.queued < 0 else len(s.tokens) - s.cached - waited * self.cfg.max_prefill_tokens

    def _preempt(self, s: SeqState) -> None:
        """Give a running sequence's blocks back; it re-queues first and recomputes (its full blocks usually
        come back from the prefix cache)."""
        self.running.remove(s)
        self._release(s)
        s.queued = -1
        self.seqs_waiting.insert(0, s)

    def _match_prefix(self, s: SeqState) -> None:
        if not self.cfg.prefix_caching:
            return
        usable = (len(s.tokens) - 1) // self.blocks.block_size  # the last token is always computed
        for h in chain_hashes(s.tokens[:usable * self.blocks.block_size], self.blocks.block_size, s.adapter):
            b = self.blocks.lookup(h)
            if b is None:
                break
            s.table.append(b)
            s.hashes.append(h)
        s.cached = s.draft_cached = len(s.table) * self.blocks.block_size

    def _register(self, s: SeqState) -> None:
        """Make this sequence's newly completed full blocks findable by later requests."""
        if not self.cfg.prefix_caching or s.finish_reason is not None:
            return
        done = min(s.cached, s.draft_cached) if self.draft is not None else s.cached
        bs = self.blocks.block_size
        new = chain_hashes(s.tokens[:done // bs * bs], bs, s.adapter, start=len(s.hashes),
                           prev=s.hashes[-1] if s.hashes else None)
        for h in new:
            self.blocks.register(s.table[len(s.hashes)], h)
            s.hashes.append(h)

    # ---- sampling and stopping
    def _sample(self, seqs: list[SeqState], logits: Tensor) -> None:
        params = [s.params for s in seqs]
        if any(p.penalised for p in params):
            logits = torch.stack([apply_penalties(row, s.params, s.prompt, s.output) if s.params.penalised else row
                                  for row, s in zip(logits, seqs)])
        greedy = all(p.greedy for p in params)  # then the argmax of the raw logits, as transformers' greedy search
        chosen = choose(logits if greedy else processed_logprobs(logits, params), params, [s.generator for s in seqs])
        for s, t, row in zip(seqs, chosen, range(len(seqs))):
            self._append(s, [t], logits[row:row + 1])

    def _append(self, s: SeqState, new: list[int], raw_logits: Tensor) -> None:
        """Add sampled tokens (with the raw logits rows that produced them) until a stop condition."""
        for i, t in enumerate(new):
            if s.finish_reason is not None:
                return
            s.tokens.append(t)
            s.new_tokens.append(t)
            self.counters["generation_tokens_total"] += 1
            if s.logprobs is not None:
                s.new_logprobs.extend(token_logprobs(raw_logits[i:i + 1], [t], s.params.logprobs or 0))
            if t in s.stops:
                s.finish_reason = "stop"
            elif self._decode_text(s):
                s.finish_reason = "stop"
            else:
                self._check_length(s)

    def _check_length(self, s: SeqState) -> None:
        if s.finish_reason is None and (s.n_output >= s.params.max_new_tokens or len(s.tokens) >= self.max_context):
            s.finish_reason = "length"

    def _decode_text(self, s: SeqState) -> bool:
        """Add the newest token's text to s.pending; True when a stop string appeared (the text is cut before it).
        Only the tokens since the last complete character are decoded, so a step costs the same however long
        the output already is."""
        if self.tokenizer is None:
            return False
        if s.tokens[-1] in s.stops:
            return False
        prefix, read = s.offsets
        before = self.tokenizer.decode(s.tokens[s.start + prefix:s.start + read])
        after = self.tokenizer.decode(s.tokens[s.start + prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            s.offsets = (read, s.n_output)
            s.pending += piece
            at = s.watch.feed(piece) if s.watch is not None else None
            if at is not None:
                s.pending = s.pending[:len(s.pending) - (s.watch.fed - at)]
                return True
        return False

    def _output(self, s: SeqState, flush: bool) -> RequestOutput:
        hold = s.watch.hold if s.watch is not None and not flush else 0  # a tail that may grow into a stop string
        end = max(0, len(s.pending) - hold)
        text, s.pending = s.pending[:end], s.pending[end:]
        out = RequestOutput(s.id, s.new_tokens, text, s.new_logprobs if s.logprobs is not None else None,
                            s.finish_reason is not None, s.finish_reason, len(s.prompt), s.n_output)
        if s.logprobs is not None:
            s.logprobs.extend(s.new_logprobs)
        s.new_tokens, s.new_logprobs = [], []
        return out

    # ---- speculative decoding (Leviathan et al., 2023; Chen et al., 2023; prompt lookup: Saxena, 2023)
    def _draft_budget(self, s: SeqState) -> int:
        """Tokens `s` may draft this step: leaves room for the token verification adds; 0 with penalties (they
        depend on each preceding token)."""
        room = min(s.params.max_new_tokens - s.n_output, self.max_context - len(s.tokens))
        return 0 if s.params.penalised else max(0, min(self.cfg.num_speculative_tokens, room - 1))

    def _propose(self, seqs: list[SeqState]) -> dict[SeqState, tuple[list[int], Tensor | None]]:
        """Draft tokens per decoding sequence, with the draft's probabilities (None for prompt lookup)."""
        ks = {s: self._draft_budget(s) for s in seqs}
        out: dict[SeqState, tuple[list[int], Tensor | None]] = {}
        for s, k in ks.items():
            if self.draft is None:
                found = lookup(s.tokens, k, self.cfg.ngram_min, self.cfg.ngram_max)
                if found:
                    out[s] = (found, None)
            elif k > 0:
                out[s] = ([], [])  # filled by the draft passes below
        if self.draft is not None and out:
            for _ in range(max(ks.values())):
                # first pass: each sequence catches the draft up to its last token; then one token per pass
                rows = sorted(((s, len(s.tokens) + len(out[s][0]) - s.draft_cached) for s in out
                               if len(out[s][0]) < ks[s]), key=lambda r: r[1] != 1)  # single tokens first
                ids, pos, keep = [], [], []
                for s, n in rows:
                    ids.extend((s.tokens + out[s][0])[s.draft_cached:])
                    pos.extend(range(s.draft_cached, s.draft_cached + n))
                    keep.append(len(ids) - 1)
                logits = self._forward(self.draft, self.draft_cache, rows, ids, pos, keep)
                params = [s.params for s, _ in rows]
                lp = processed_logprobs(logits, params)
                chosen = choose(lp, params, [s.generator for s, _ in rows])
                for (s, n), t, row in zip(rows, chosen, lp):
                    s.draft_cached += n
                    out[s][0].append(t)
                    out[s][1].append(row.exp())
            out = {s: (toks, torch.stack(q)) for s, (toks, q) in out.items()}
        return out

    def _verify(self, s: SeqState, proposal: tuple[list[int], Tensor | None], logits: Tensor) -> None:
        """Accept a prefix of the drafted tokens against the target's logits (1 + k rows), add one more token."""
        drafts, q = proposal
        p = processed_logprobs(logits, [s.params] * len(logits)).exp()  # (k + 1, V)
        accepted, nxt = accept(p, drafts, q, s.params.greedy, s.generator)
        i = len(accepted)
        self.counters["draft_tokens_total"] += len(drafts)
        self.counters["draft_tokens_accepted"] += i
        s.cached += 1 + i
        s.draft_cached = min(s.draft_cached, s.cached)
        self._append(s, accepted + [nxt], logits[:i + 1])

    # ---- encoders and classifiers
    @torch.inference_mode()
    def embed(self, batch: Sequence[Sequence[int]], normalize: bool = True, batch_size: int = 64) -> Tensor:
        """Sentence embeddings (B, C) in fp32: the mean of the final hidden states over real tokens for encoders,
        the last token's for decoders; L2-normalised unless normalize=False."""
        parts = []
        for i in range(0, len(batch), batch_size):
            ids, mask = self._pad(batch[i:i + batch_size])
            h = self.model(ids, attention_mask=mask).hidden.float()  # (b, T, C)
            if self.model.cfg.causal:
                parts.append(self.model.pool(h, mask, ids))
            else:
                m = mask[..., None].float()
                parts.append((h * m).sum(1) / m.sum(1).clamp(min=1))
        e = torch.cat(parts) if parts else torch.empty(0, self.model.cfg.hidden_size)
        return torch.nn.functional.normalize(e, dim=-1) if normalize else e

    @torch.inference_mode()
    def classify(self, batch: Sequence[Sequence[int]], batch_size: int = 64) -> Tensor:
        """Classifier logits (B, num_labels) in fp32 for a batch of token lists."""
        if self.model.cfg.head != "classifier":
            raise RequestError(f"this model has a {self.model.cfg.head!r} head, not a classifier")
        parts = []
        for i in range(0, len(batch), batch_size):
            ids, mask = self._pad(batch[i:i + batch_size])
            parts.append(self.model(ids, attention_mask=mask).logits.float())
        return torch.cat(parts) if parts else torch.empty(0, self.model.cfg.num_labels)

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
        """Right-padded ids and attention mask (B, T)."""
        if any(len(x) == 0 for x in batch):
            raise RequestError("every input needs at least one token")
        longest = max(len(x) for x in batch)
        if longest > self.max_context:
            raise RequestError(f"input of {longest} tokens exceeds the context length {self.max_context}")
        ids = torch.full((len(batch), longest), self.model.cfg.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(list(x))
            mask[i, :len(x)] = 1
        return ids.to(self.device), mask.to(self.device)

