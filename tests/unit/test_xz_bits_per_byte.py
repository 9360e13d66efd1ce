"""`xz_bits_per_byte`: the xz baseline counts the compressed information, not the .xz container's overhead."""

import lzma
import random

from lmforge.eval.tasks import xz_bits_per_byte


def _entries(n: int = 300) -> list[str]:
    """Short dictionary-like entries (a few hundred bytes each) from a small vocabulary."""
    rng = random.Random(0)
    words = ["tree", "river", "stone", "light", "quick", "slow", "house", "north", "water", "green", "cold"]
    return [f"{rng.choice(words)}{i} (noun): " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + "."
            for i in range(n)]


def test_one_raw_stream_over_the_concatenated_text():
    texts = _entries()
    data = "".join(texts).encode()
    lzma2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
    raw = lzma.compress(data, format=lzma.FORMAT_RAW, filters=lzma2)
    assert xz_bits_per_byte(texts) == 8 * len(raw) / len(data)
    container = lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)  # `xz -9e`: the same stream + ~60 bytes of frame
    assert 0 < len(container) - len(raw) <= 80


def test_short_documents_are_not_charged_a_container_each():
    texts = _entries()
    n = sum(len(t.encode()) for t in texts)
    per_container = 8 * sum(len(lzma.compress(t.encode(), preset=9)) for t in texts) / n  # the old measure
    per_stream = xz_bits_per_byte(texts, per_document=True)
    joint = xz_bits_per_byte(texts)
    assert joint < per_stream < per_container
    assert per_container - per_stream > 8 * 50 * len(texts) / n  # >= 50 bytes of container per document gone
    assert joint < 0.5 * per_container


def test_redundant_text_compresses_and_empty_input_is_zero():
    assert xz_bits_per_byte(["abc" * 10000]) < 0.05
    assert xz_bits_per_byte([]) == 0.0 and xz_bits_per_byte([""], per_document=True) == 0.0
