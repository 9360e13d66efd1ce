"""Heuristic quality rules, as FineWeb runs them: datatrove's own implementations of Gopher's quality and repetition
rules (Rae et al. 2021, MassiveText), C4's page rules (Raffel et al. 2020) and FineWeb's line rules (Penedo et al.
2024), called through their `.filter(Document)`, not rewritten. The defaults are FineWeb's recipe (datatrove's
defaults; C4 without its terminal-punctuation line rule).

Words and sentences come from datatrove's tokenizer for the document's language (`meta["language"]` when a language
step ran before, else `default_language`): a blank spaCy pipeline for most languages, nothing downloaded. A language
datatrove has no working tokenizer for here falls back to `default_language` (counted in `extra()`). Gopher's stop
words are English: on other languages lower `min_stop_words` or set it to 0.

C4's rule drops lines (fewer than 3 words, "javascript", cookie/terms-of-use lines, with blank lines, so paragraph
breaks go too) and rewrites the text. By default only its page verdict is used and the text is kept as it was
(`c4_rewrite=true` keeps the line-filtered text, as C4 and FineWeb did; the lines dropped are counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import Doc, Verdict

__all__ = ["QualityConfig", "Quality", "RULES"]

RULES = ("gopher_quality", "gopher_repetition", "c4", "fineweb")
"""The rules, in their default order."""

_IMPORT_HINT = "pip install 'lmforge[curate]'"


@dataclass
class QualityConfig:
    """Heuristic quality rules (datatrove's Gopher, C4 and FineWeb filters)."""

    rules: list[str] = field(default_factory=lambda: list(RULES))
    """The rules to run, in order (the first that fires names the removal): gopher_quality, gopher_repetition, c4,
    fineweb."""
    min_doc_words: int = 50
    """gopher_quality: fewest words (not counting punctuation) a document may have."""
    min_stop_words: int = 2
    """gopher_quality: fewest of Gopher's English stop words (the, be, to, of, and, that, have, with); 0: off."""
    min_alpha_words_ratio: float = 0.8
    """gopher_quality: least share of words (datatrove counts punctuation tokens as words) with a letter; 0: off."""
    dup_line_frac: float = 0.3
    """gopher_repetition: most share of lines that repeat an earlier line; 0: off."""
    dup_para_frac: float = 0.3
    """gopher_repetition: most share of paragraphs that repeat an earlier paragraph; 0: off."""
    c4_terminal_punct: bool = False
    """c4: also drop lines without terminal punctuation (C4 did; FineWeb turned it off: it drops too much)."""
    c4_min_sentences: int = 5
    """c4: fewest sentences a page may have after its lines are filtered; 0: off."""
    c4_rewrite: bool = False
    """c4: keep the text with C4's lines dropped (as C4 and FineWeb did); false: only remove failing pages."""
    fineweb_line_punct_thr: float = 0.12
    """fineweb: least share of lines ending in terminal punctuation; 0: off."""
    fineweb_char_dup_ratio: float = 0.01
    """fineweb: most share of characters in lines that repeat an earlier line; 1: off."""
    default_language: str = "en"
    """The language (ISO 639 code) of documents without `meta["language"]`, and the fallback tokenizer."""

    def validate(self) -> None:
        bad = [r for r in self.rules if r not in RULES]
        if bad or not self.rules or len(set(self.rules)) != len(self.rules):
            raise ValueError(f"rules: must be distinct names of {', '.join(RULES)}, found {self.rules}")
        if self.min_doc_words < 1:
            raise ValueError(f"min_doc_words: must be >= 1 (a document without words cannot be scored), found "
                             f"{self.min_doc_words}")
        for name in ("min_stop_words", "c4_min_sentences"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0: off), found {getattr(self, name)}")
        for name in ("min_alpha_words_ratio", "dup_line_frac", "dup_para_frac", "fineweb_line_punct_thr",
                     "fineweb_char_dup_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be a fraction in [0, 1], found {getattr(self, name)}")
        if not self.default_language:
            raise ValueError("default_language: must be an ISO 639 code like 'en', found ''")


class Quality:
    """A Filter: runs the configured datatrove rules in order on each document; the first that fails removes it as
    `<rule>:<datatrove's reason>` (`gopher_repetition:dup_line_frac`; gopher_quality's reasons lose their `gopher_`
    prefix: `gopher_quality:short_doc`). `extra()`: `language_fallback` (documents scored with the default
    language's tokenizer) and, with `c4_rewrite`, `c4_lines_dropped`."""

    name = "quality"

    def __init__(self, cfg: QualityConfig):
        cfg.validate()
        self.cfg = cfg
        try:
            from datatrove.data import Document
            from datatrove.pipeline.filters.c4_filters import C4QualityFilter
            from datatrove.pipeline.filters.fineweb_quality_filter import FineWebQualityFilter
            from datatrove.pipeline.filters.gopher_quality_filter import GopherQualityFilter
            from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter
            from datatrove.utils.word_tokenizers import load_word_tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"the quality step needs datatrove and spacy: {_IMPORT_HINT}") from e
        self._document = Document
        self._load_tokenizer = load_word_tokenizer
        self._classes = {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
                         "c4": C4QualityFilter, "fineweb": FineWebQualityFilter}
        self._filters: dict[tuple[str, str], Any] = {}
        self._languages: dict[str, str | None] = {}
        self._counts: dict[str, int] = {}
        if self._tokenizer_language(cfg.default_language) is None:
            raise ValueError(f"default_language: datatrove has no working word tokenizer for it here, found "
                             f"{cfg.default_language!r}; expected a language like 'en'")

    def _tokenizer_language(self, lang: str) -> str | None:
        """`lang` if datatrove can split its words here (its tokenizer's libraries are installed), else None."""
        if lang not in self._languages:
            try:
                self._load_tokenizer(lang).word_tokenize("a test")
                self._languages[lang] = lang
            except (ValueError, ImportError, OSError, KeyError):  # no assignment, or its library is missing
                self._languages[lang] = None
        return self._languages[lang]

    def _filter(self, rule: str, lang: str) -> Any:
        """The datatrove filter for `rule` in language `lang` (built once: datatrove fixes the language per filter)."""
        key = (rule, lang)
        if key not in self._filters:
            c = self.cfg
            if rule == "gopher_quality":
                kw: dict[str, Any] = dict(min_doc_words=c.min_doc_words, min_stop_words=c.min_stop_words or None,
                                          max_non_alpha_words_ratio=c.min_alpha_words_ratio or None)
            elif rule == "gopher_repetition":
                kw = dict(dup_line_frac=c.dup_line_frac or None, dup_para_frac=c.dup_para_frac or None)
            elif rule == "c4":
                kw = dict(filter_no_terminal_punct=c.c4_terminal_punct, min_num_sentences=c.c4_min_sentences or -1)
            else:
                kw = dict(line_punct_thr=c.fineweb_line_punct_thr, char_duplicates_ratio=c.fineweb_char_dup_ratio)
            self._filters[key] = self._classes[rule](language=lang, **kw)
        return self._filters[key]

    def _count(self, name: str, n: int = 1) -> None:
        self._counts[name] = self._counts.get(name, 0) + n

    def check(self, doc: Doc) -> Verdict:
        """None if `doc` passes every rule (its text may be C4's, with `c4_rewrite`), else the first rule's reason."""
        wanted = str(doc.meta.get("language") or self.cfg.default_language)
        lang = self._tokenizer_language(wanted)
        if lang is None:
            lang = self.cfg.default_language
            self._count("language_fallback")
        dt = self._document(text=doc.text, id=str(doc.id), metadata={"language": lang})
        for rule in self.cfg.rules:
            before = dt.text
            target = dt if rule != "c4" or self.cfg.c4_rewrite else self._document(text=dt.text, id=dt.id)
            result = self._filter(rule, lang).filter(target)
            if result is not True:
                reason = result[1] if isinstance(result, tuple) else "removed"
                if rule == "gopher_quality" and reason.startswith("gopher_"):
                    reason = reason[len("gopher_"):]
                return f"{rule}:{reason}"
            if rule == "c4" and dt.text != before:
                if not dt.text.strip():
                    return "c4:empty"
                self._count("c4_lines_dropped", sum(1 for line in before.splitlines() if line.strip())
                            - len(dt.text.splitlines()))
        doc.text = dt.text
        return None

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        self._counts = {}
        return [self.check(d) for d in docs]

    def extra(self) -> dict[str, int]:
        return dict(self._counts)
