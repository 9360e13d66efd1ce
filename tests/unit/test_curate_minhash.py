"""MinHash LSH near dedup on real text (standard-library functions and classes): signatures are the permutations'
minimums, seeded near-duplicates are found at the rate the S-curve 1 − (1 − s^r)^b predicts with no false merges,
and the result does not depend on how the corpus is split."""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmforge.curate.base import Doc
from lmforge.curate.exact import normalise
from lmforge.curate.minhash import MERSENNE, NO_WORDS, NearDedup, NearDedupConfig, candidate_probability

STDLIB = Path(sysconfig.get_paths()["stdlib"])
WORD = re.compile(r"[^\W_]+")  # a word as `normalise` splits them


def _sources(n_files: int) -> list[tuple[str, str]]:
    """(file:line, source) of every function and class in the first standard-library modules."""
    out = []
    for p in sorted(STDLIB.glob("*.py"))[:n_files]:
        text = p.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                out.append((f"{p.name}:{node.lineno}", "".join(lines[node.lineno - 1:node.end_lineno])))
    return out


def _shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """The exact shingle set (no hashing): word n-grams of the normalised text."""
    w = normalise(text).split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)} if len(w) >= n else {tuple(w)}


def _jaccard(a: str, b: str) -> float:
    sa, sb = _shingles(a), _shingles(b)
    return len(sa & sb) / len(sa | sb)


def _distinct(texts: list[tuple[str, str]], min_words: int, limit: float = 0.2) -> list[tuple[str, str]]:
    """Texts of at least `min_words` words, none with an exact Jaccard >= `limit` to one kept before it (the
    library itself has near-duplicate functions; those would blur which removals are right)."""
    index: dict[tuple[str, ...], list[int]] = {}
    kept: list[tuple[str, str]] = []
    sets: list[set] = []
    for key, text in texts:
        if len(normalise(text).split()) < min_words:
            continue
        s = _shingles(text)
        shared = Counter(j for sh in s for j in index.get(sh, ()))
        if any(c / (len(s) + len(sets[j]) - c) >= limit for j, c in shared.items()):
            continue
        for sh in s:
            index.setdefault(sh, []).append(len(kept))
        kept.append((key, text))
        sets.append(s)
    return kept


def _edit(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """`rate` of the words (at least one) substituted, deleted, or followed by an inserted word, at random places."""
    spans = [m.span() for m in WORD.finditer(text)]
    for i in sorted(rng.sample(range(len(spans)), max(1, round(rate * len(spans)))), reverse=True):
        a, b = spans[i]
        op, new = rng.randrange(3), rng.choice(vocab)
        text = text[:a] + (new if op == 0 else "" if op == 1 else text[a:b] + " " + new) + text[b:]
    return text


@pytest.fixture(scope="module")
def base() -> list[tuple[str, str]]:
    docs = _distinct(_sources(260), min_words=40)
    assert len(docs) >= 1200, len(docs)
    return docs[:1200]


def _step(**kw) -> NearDedup:
    return NearDedup(NearDedupConfig(**kw))


def test_config_is_checked():
    NearDedupConfig().validate()
    for bad in ({"shingle": 0}, {"bands": 0}, {"rows": -1}, {"bands": 100, "rows": 100}, {"seed": -1}):
        with pytest.raises(ValueError, match="near_dedup"):
            NearDedup(NearDedupConfig(**bad))
    bench = (Path(__file__).parents[2] / "benchmarks" / "curate_dedup.py").read_text()
    assert f"BANDS, ROWS = {NearDedupConfig().bands}, {NearDedupConfig().rows}" in bench  # the benchmark runs them
    cfg = NearDedupConfig()  # the defaults catch ≤ 3% word edits (Jaccard ≥ 0.77 with 5-word shingles) at >= 0.95
    assert candidate_probability(0.77, cfg.bands, cfg.rows) >= 0.95 > candidate_probability(0.77, 14, 8)


def test_signature_is_each_permutations_minimum_over_the_shingles(base):
    """Against a plain-Python reference: BLAKE2b word hashes, the shingle mix, then min_x (a·x + b mod 2^64) mod p."""
    step = _step()
    docs = [Doc(k, t, k) for k, t in base[:40]] + [Doc("short", "Hello, world!", "s")]
    sig = step.signatures(docs)
    m64, k = (1 << 64) - 1, 0x9E3779B97F4A7C15

    def fmix(h: int) -> int:
        for mult in (0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53):
            h = ((h ^ (h >> 33)) * mult) & m64
        return h ^ (h >> 33)

    def word(w: str) -> int:
        return int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little")

    a, b = step._a[:, 0].tolist(), step._b[:, 0].tolist()
    for i in (0, 7, 39, 40):
        ws = normalise(docs[i].text).split()
        grams = [ws[j:j + 5] for j in range(len(ws) - 4)] or [ws]
        xs = []
        for g in grams:
            h = 0
            for w in g + [None] * (5 - len(g)):
                h = ((h ^ (word(w) if w else 0)) * k) & m64
            xs.append(fmix(h))
        ref = [min(((ai * x + bi) & m64) % MERSENNE for x in xs) for ai, bi in zip(a, b)]
        assert sig[i].tolist() == ref, docs[i].key


def test_seeded_near_duplicates_are_found_without_false_merges(base):
    """1,200 distinct real documents + 400 seeded copies of random ones: exact copies (half of them re-cased and
    re-spaced) and 1%, 2%, 3% word edits, shuffled into the corpus. Recall: a copy ends in its original's cluster;
    precision: a removed document's kept one is from its own group. With the default 18 bands x 6 rows every kind
    (3% edits: Jaccard ≈ 0.77) is found at >= 0.95, and 3% edits at the rate the S-curve predicts."""
    rng = random.Random(0)
    vocab = sorted({w for _, t in base[:300] for w in WORD.findall(t)})
    docs = [(key, text, key) for key, text in base]  # (key, text, group)
    kinds = {}
    for n, kind in enumerate(["copy", 0.01, 0.02, 0.03] * 100):
        key, text = base[rng.randrange(len(base))]
        if kind == "copy":
            new = text if n % 8 else "  " + text.upper().replace("\n", "\n\n")
        else:
            new = _edit(text, kind, rng, vocab)
        docs.append((f"seeded{n}", new, key))
        kinds[f"seeded{n}"] = kind
    rng.shuffle(docs)
    step = _step()
    corpus = [Doc(k, t, k) for k, t, _ in docs]
    keys = step.keys(corpus)
    dups = step.duplicates([d.key for d in corpus], keys)
    group = {k: g for k, _, g in docs}
    root = step.clusters(keys)
    pos = {d.key: i for i, d in enumerate(corpus)}
    found = {k: root[pos[k]] == root[pos[group[k]]] for k in kinds}
    easy = [found[k] for k, kind in kinds.items() if kind != 0.03]
    hard = [k for k, kind in kinds.items() if kind == 0.03]
    recall_easy, recall_hard = np.mean(easy), np.mean([found[k] for k in hard])
    originals = dict(base)
    p = candidate_probability(np.array([_jaccard(docs[pos[k]][1], originals[group[k]]) for k in hard]),
                              step.cfg.bands, step.cfg.rows)
    sd = np.sqrt((p * (1 - p)).sum()) / len(p)
    precision = np.mean([group[k] == group[rel] for k, (_, rel) in dups.items()])
    print(f"recall copies+1-2%: {recall_easy:.3f}, 3%: {recall_hard:.3f} (S-curve {p.mean():.3f}), "
          f"all: {np.mean(list(found.values())):.3f}; precision {precision:.4f} of {len(dups)} removed")
    assert all(found[k] for k, kind in kinds.items() if kind == "copy")
    assert recall_easy >= 0.95 and np.mean(list(found.values())) >= 0.95
    assert abs(recall_hard - p.mean()) <= 4 * sd + 0.01
    assert precision >= 0.99
    assert all(reason == "near_duplicate" for reason, _ in dups.values())
    for k, (_, rel) in dups.items():  # the one kept is the first of its cluster in corpus order
        assert root[pos[k]] == pos[rel] < pos[k] and rel not in dups


def test_the_s_curve_catches_pairs_at_0_9_and_almost_never_at_0_3(base):
    """Pairs A = X + Y, B = X + Z of real text (X shared, Y and Z from elsewhere) sized for a Jaccard near
    0.3 / 0.5 / 0.7 / 0.9: the share caught (any band equal) follows 1 − (1 − s^8)^14 for each pair's exact s, and
    the share of equal minimums estimates s."""
    rng = random.Random(1)
    stream = [w for _, t in base for w in normalise(t).split()]
    step = _step(bands=14, rows=8)
    for target, lo, hi in ((0.9, 0.98, 1.0), (0.7, 0.3, 0.8), (0.5, 0.0, 0.2), (0.3, 0.0, 0.01)):
        pairs, sims = [], []
        for _ in range(200):
            n = rng.randrange(120, 240)
            extra = max(1, round((n - 4) * (1 / target - 1) / 2) - 2)  # less the shingles across X|Y
            x, y, z = (stream[(o := rng.randrange(len(stream) - m)):o + m] for m in (n, extra, extra))
            pairs += [Doc(f"a{len(sims)}", " ".join(x + y), ""), Doc(f"b{len(sims)}", " ".join(x + z), "")]
            sims.append(_jaccard(pairs[-2].text, pairs[-1].text))
        sims = np.array(sims)
        keys = step.keys(pairs)
        caught = (keys[0::2] == keys[1::2]).any(axis=1)
        p = candidate_probability(sims, 14, 8)
        sd = np.sqrt((p * (1 - p)).sum()) / len(p)
        sig = step.signatures(pairs)
        estimate = (sig[0::2] == sig[1::2]).mean(axis=1)
        print(f"s≈{target}: mean s {sims.mean():.3f}, caught {caught.mean():.3f}, predicted {p.mean():.3f}, "
              f"|estimate - s| {np.abs(estimate - sims).mean():.3f}")
        assert abs(sims.mean() - target) < 0.06
        assert lo <= caught.mean() <= hi
        assert abs(caught.mean() - p.mean()) <= 4 * sd + 0.01
        assert np.abs(estimate - sims).mean() < 0.05  # 112 minimums: standard error sqrt(s(1-s)/112) <= 0.047


def test_same_result_whatever_the_partitioning(base):
    """Keys from three uneven partitions, each by a fresh step (as in separate workers), equal the keys of the
    whole corpus; the removals are the same."""
    rng = random.Random(2)
    vocab = sorted({w for _, t in base[:100] for w in WORD.findall(t)})
    docs = [Doc(k, t, k) for k, t in base[:500]]
    docs += [Doc(f"e{i}", _edit(docs[i].text, 0.01, rng, vocab), "") for i in range(0, 500, 5)]
    rng.shuffle(docs)
    whole = _step()
    keys = whole.keys(docs)
    parts = [docs[:37], docs[37:402], docs[402:]]
    split = [_step().keys(p) for p in reversed(parts)][::-1]  # the last partition first, each by a new step
    assert np.array_equal(np.concatenate(split), keys)
    dups = whole.duplicates([d.key for d in docs], keys)
    assert len(dups) >= 95 and _step().duplicates([d.key for d in docs], np.concatenate(split)) == dups
    assert not np.array_equal(_step(seed=2).keys(docs[:10]), keys[:10])  # the seed changes the permutations


def test_short_and_wordless_documents():
    """Fewer words than a shingle: the words are one shingle (equal only to the same words); no words at all (only
    punctuation): never a near-duplicate."""
    step = _step()
    docs = [Doc("a", "Hello, world!", ""), Doc("b", "hello   WORLD", ""), Doc("c", "hello there world", ""),
            Doc("d", "!!! ...", ""), Doc("e", "?!", "")]
    keys = step.keys(docs)
    assert (keys[3] == NO_WORDS).all() and (keys[4] == NO_WORDS).all() and (keys[:3] != NO_WORDS).all()
    assert step.duplicates([d.key for d in docs], keys) == {"b": ("near_duplicate", "a")}
    assert step.keys([]).shape == (0, step.cfg.bands)
    assert step.duplicates([], np.zeros((0, step.cfg.bands), np.uint64)) == {}


def test_union_find_joins_clusters_transitively_onto_their_first_row():
    """Random bucket sharing over 3,000 rows: every row points at the smallest row of its connected component, as a
    plain union-find over the same edges says."""
    rng = np.random.default_rng(3)
    n, bands = 3000, 14
    keys = rng.integers(1, 2**63, size=(n, bands), dtype=np.uint64)
    for _ in range(2500):  # copy one band of a row into another row: an edge
        i, j, b = rng.integers(n), rng.integers(n), rng.integers(bands)
        keys[i, b] = keys[j, b]
    root = _step().clusters(keys)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for b in range(bands):
        first: dict[int, int] = {}
        for i, h in enumerate(keys[:, b].tolist()):
            ra, rb = find(first.setdefault(h, i)), find(i)
            parent[max(ra, rb)] = min(ra, rb)
    assert root.tolist() == [find(i) for i in range(n)]
    assert (root < np.arange(n)).sum() > 1000
