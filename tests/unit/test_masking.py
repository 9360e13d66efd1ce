"""Masked-LM corruption and NSP pairs (BERT §3.1) on real WordPiece shards of the standard library, and short
real-data pretraining runs whose loss must fall: masked LM on an encoder, causal LM on a decoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import write_config

from lmforge import cli
from lmforge.data.loader import PackedLoader, SourceSpec
from lmforge.data.shards import open_split
from lmforge.objectives.causal_lm import IGNORE
from lmforge.objectives.masked_lm import MaskingConfig, MLMCollate, mask_tokens
from lmforge.tokenizer import Tokenizer

SEQ = 64
WINDOW = SEQ - 3  # [CLS] A [SEP] B [SEP]


def within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """`count` successes of `n` trials is within `sigmas` binomial standard deviations of n·p."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


# ---------------------------------------------------------------------------------------------- mask_tokens

@pytest.mark.parametrize("cfg", [MaskingConfig(), MaskingConfig(mask_prob=0.3, replace_mask=0.5, replace_random=0.3)],
                         ids=["bert", "custom"])
def test_mask_tokens_proportions(cfg):
    n, vocab, mask_id = 200_000, 1000, 4
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (n,), generator=gen)
    special = torch.rand(n, generator=gen) < 0.1
    inputs, labels = mask_tokens(ids, special, cfg, mask_id, vocab, torch.Generator().manual_seed(1))
    assert inputs.shape == labels.shape == ids.shape

    chosen = labels != IGNORE
    assert not chosen[special].any(), "special tokens must never be chosen"
    assert torch.equal(inputs[special], ids[special])
    assert torch.equal(inputs[~chosen], ids[~chosen]), "tokens not chosen must stay as they are"
    assert torch.equal(labels[chosen], ids[chosen]), "labels are the original tokens"
    n_ordinary, n_chosen = int((~special).sum()), int(chosen.sum())
    assert within(n_chosen, n_ordinary, cfg.mask_prob), (n_chosen / n_ordinary, cfg.mask_prob)

    x, y = inputs[chosen], ids[chosen]
    masked = int((x == mask_id).sum())
    kept = int((x == y).sum())
    randomized = n_chosen - masked - kept
    p_keep = 1 - cfg.replace_mask - cfg.replace_random
    # a random replacement hits the original token (or [MASK]) with probability 1/vocab each
    p_rand_same = cfg.replace_random / vocab
    assert within(masked, n_chosen, cfg.replace_mask + p_rand_same), masked / n_chosen
    assert within(kept, n_chosen, p_keep + p_rand_same), kept / n_chosen
    assert within(randomized, n_chosen, cfg.replace_random - 2 * p_rand_same), randomized / n_chosen
    rand_ids = x[(x != mask_id) & (x != y)]
    assert rand_ids.min() >= 0 and rand_ids.max() < vocab
    assert len(rand_ids.unique()) > 0.9 * vocab  # spread over the vocabulary


def test_mask_tokens_is_a_function_of_the_generator():
    ids = torch.randint(5, 500, (1000,))
    special = torch.zeros(1000, dtype=torch.bool)
    a = mask_tokens(ids, special, MaskingConfig(), 4, 500, torch.Generator().manual_seed(7))
    b = mask_tokens(ids, special, MaskingConfig(), 4, 500, torch.Generator().manual_seed(7))
    c = mask_tokens(ids, special, MaskingConfig(), 4, 500, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


# ---------------------------------------------------------------------------------------------- MLMCollate + NSP

class Wiring:
    """The tokenizer ids and collate that `lmforge pretrain objective=masked_lm` builds."""

    def __init__(self, data, seed: int = 0):
        tok = Tokenizer.from_dir(data.tokenizer)
        self.cls, self.sep, self.mask = tok.token_id("[CLS]"), tok.token_id("[SEP]"), tok.mask_id
        self.pad = tok.pad_id
        self.specials = [i for i in (tok.pad_id, tok.eos_id, tok.bos_id, tok.token_id(tok.unk_token)) if i is not None]
        self.vocab = tok.vocab_size
        self.shards = data.shards
        self.collate = MLMCollate(MaskingConfig(), self.cls, self.sep, self.mask, self.vocab, self.specials, seed)

    def loader(self, micro_batch: int = 8, collate=None) -> PackedLoader:
        return PackedLoader([SourceSpec(str(self.shards))], SEQ, micro_batch, seed=0, collate=collate or self.collate,
                            window=WINDOW)

    def raw_loader(self, micro_batch: int = 8) -> PackedLoader:
        """The same sample stream, uncorrupted: (windows, global sample ids)."""
        return self.loader(micro_batch, collate=lambda windows, ids, loader: (windows, ids))


@pytest.fixture(scope="module")
def nsp_samples(wordpiece_data):
    """40 batches of 8 (320 samples) from the real shards, with the uncorrupted windows they came from."""
    w = Wiring(wordpiece_data)
    loader, raw = w.loader(), w.raw_loader()
    batches, windows, ids = [], [], []
    for _ in range(40):
        batches.append(loader.next_batch())
        ws, gs = raw.next_batch()
        windows += ws
        ids += gs
    cat = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return w, cat, windows, ids


def _original(batch, i):
    """The sample before corruption: labels hold the original token wherever one was chosen."""
    return torch.where(batch["labels"][i] != IGNORE, batch["labels"][i], batch["input_ids"][i])


def test_nsp_pairs_layout_and_balance(nsp_samples):
    w, batch, windows, ids = nsp_samples
    n = len(windows)
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == batch["labels"].shape == (n, SEQ)
    assert ids == list(range(n))
    nsp = batch["nsp_labels"]
    assert set(nsp.tolist()) <= {0, 1}
    assert within(int(nsp.sum()), n, 0.5), f"NotNext share {nsp.float().mean():.3f} over {n} samples"

    for i in range(n):
        x, tt = batch["input_ids"][i], batch["token_type_ids"][i]
        assert x[0] == w.cls and x[-1] == w.sep
        k = int((tt == 1).nonzero()[0])  # first token of segment B
        assert torch.equal(tt[:k], torch.zeros(k, dtype=torch.long)) and (tt[k:] == 1).all()
        assert 2 <= k - 1 < SEQ - 2 and x[k - 1] == w.sep  # A has >= 1 token, then [SEP]; B has >= 1 token
        # the structural [CLS]/[SEP] (and any [SEP] that ends a document inside the window) are never chosen
        structural = torch.isin(_original(batch, i), torch.tensor([w.cls, w.sep, w.pad]))
        assert (batch["labels"][i][structural] == IGNORE).all()


def test_isnext_b_continues_a_in_the_shard(nsp_samples):
    w, batch, windows, _ = nsp_samples
    train = np.concatenate([np.asarray(a, dtype=np.int64) for a in open_split(w.shards, "train")])
    differs = []
    for i, window in enumerate(windows):
        orig, tt = _original(batch, i), batch["token_type_ids"][i]
        k = int((tt == 1).nonzero()[0])
        a, b = orig[1:k - 1], orig[k:-1]
        assert len(a) + len(b) == WINDOW
        assert torch.equal(a, torch.from_numpy(window[:len(a)])), "segment A is the start of the sample's window"
        true_b = torch.from_numpy(window[len(a):])
        if batch["nsp_labels"][i] == 0:
            assert torch.equal(b, true_b), f"sample {i}: IsNext but B is not the continuation of A"
        else:
            differs.append(not torch.equal(b, true_b))
    assert differs and sum(differs) >= 0.9 * len(differs), "NotNext segments should not be the true continuation"
    # and the windows are contiguous runs of the shard's token stream
    for window in windows[:5]:
        starts = np.flatnonzero(train[:len(train) - WINDOW + 1] == window[0])
        assert any(np.array_equal(train[s:s + WINDOW], window) for s in starts)


def test_mlm_rates_on_real_pairs(nsp_samples):
    w, batch, _, _ = nsp_samples
    orig = torch.stack([_original(batch, i) for i in range(len(batch["input_ids"]))])
    special = torch.isin(orig, torch.tensor([w.cls, w.sep, w.mask, *w.specials]))
    chosen = batch["labels"] != IGNORE
    assert not (chosen & special).any()
    assert within(int(chosen.sum()), int((~special).sum()), 0.15)
    masked = int((batch["input_ids"][chosen] == w.mask).sum())
    assert within(masked, int(chosen.sum()), 0.8 + 0.1 / w.vocab)


def test_collate_is_deterministic_per_global_sample(wordpiece_data):
    w = Wiring(wordpiece_data)
    seq = w.loader()
    stream = [seq.next_batch() for _ in range(6)]
    # a loader resumed at batch 4 produces batch 4 exactly (same windows, same corruption, same NSP draws)
    state = w.loader()
    for _ in range(4):
        state.next_batch()
    resumed = w.loader()
    resumed.load_state_dict(state.state_dict())
    again = resumed.next_batch()
    assert again.keys() == stream[4].keys()
    for key in again:
        assert torch.equal(again[key], stream[4][key]), key
    # the collate alone: same (window, global index) -> same output; another index -> other corruption
    raw = w.raw_loader(micro_batch=1)
    (window,), (g,) = raw.next_batch()
    one = w.collate([window], [g], seq)
    two = w.collate([window], [g], seq)
    other = w.collate([window], [g + 12345], seq)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["labels"], other["labels"])
    reseeded = MLMCollate(MaskingConfig(), w.cls, w.sep, w.mask, w.vocab, w.specials, seed=1)([window], [g], seq)
    assert not torch.equal(one["labels"], reseeded["labels"])


# ---------------------------------------------------------------------------------------------- real-data runs

def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_mlm_loss_falls_on_an_encoder(wordpiece_data, tmp_path):
    config = write_config(tmp_path / "config.yaml", tmp_path / "run", wordpiece_data.shards, steps=40,
                          micro_batch=16, grad_accum=1, eval_every=0, save_every=0, optimizer={"lr": 5e-3})
    assert cli.main(["pretrain", "--config", str(config), "objective=masked_lm", "model.preset=bert-tiny"]) == 0
    rows = [r for r in _rows(tmp_path / "run") if "mlm_loss" in r]
    mlm = [r["mlm_loss"] for r in rows]
    assert len(mlm) == 40 and all("nsp_loss" in r for r in rows)
    first, last = mlm[0], sum(mlm[-5:]) / 5
    assert first == pytest.approx(math.log(512), abs=0.6)  # a fresh model is near uniform over the vocabulary
    assert last < first - 0.5, (first, last, mlm)
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert final["model_type"] == "bert"


def test_causal_lm_loss_falls_on_a_decoder(bpe_data, tmp_path):
    config = write_config(tmp_path / "config.yaml", tmp_path / "run", bpe_data.shards, steps=60, grad_accum=1,
                          eval_every=0, save_every=0)
    assert cli.main(["pretrain", "--config", str(config)]) == 0
    losses = [r["loss"] for r in _rows(tmp_path / "run") if "loss" in r]
    assert len(losses) == 60
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first == pytest.approx(math.log(512), abs=0.6)
    assert last < first - 0.7, (first, last)
    assert losses[-1] < first - 0.7
