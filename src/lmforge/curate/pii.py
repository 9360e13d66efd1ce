"""PII redaction with Microsoft Presidio: every e-mail address, phone number, IP address, credit-card number and IBAN
found is replaced by a typed placeholder (`<EMAIL>`, `<PHONE>`, ...), as BigCode's StarCoder PII pipeline and Dolma do;
a document is never removed for its PII. Person and location names (spaCy NER) are added when an NER model is
installed.

Offline by construction: the pattern entities run with presidio's `NoOpNlpEngine` (no spaCy model, no NER pass);
names run a spaCy pipeline that is already installed or saved on disk (presidio's own engine would download a missing
one, so it is never asked to load); the e-mail check of the domain's public suffix uses tldextract's bundled snapshot
(`suffix_list_urls=()`, no cache) instead of presidio's module-level `tldextract.extract`, which fetches the public
suffix list on first use. Beyond presidio's recognisers: cards of 12 to 19 digits (Luhn-checked: Visa 19, Mastercard's
2-series, Maestro), North-American phone formats with extensions and `+country` numbers that `phonenumbers` rejects
as unassigned, and no decimal numbers (`0.333333333`) taken for phones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Doc, Verdict

__all__ = ["PIIConfig", "PII", "ENTITIES", "NER_ENTITIES"]

ENTITIES = {"email": "EMAIL_ADDRESS", "phone": "PHONE_NUMBER", "ip": "IP_ADDRESS", "credit_card": "CREDIT_CARD",
            "iban": "IBAN_CODE", "person": "PERSON", "location": "LOCATION"}
"""Our entity names -> presidio's entity types."""
NER_ENTITIES = frozenset({"person", "location"})
"""Entities found by a spaCy NER model (the rest are patterns and checksums)."""
_PRESIDIO = {v: k for k, v in ENTITIES.items()}
_IMPORT_HINT = "pip install 'lmforge[curate]'"
_DECIMAL = re.compile(r"[+-]?\d*\.\d+")
_DIGIT = re.compile(r"\d")
_INTL_PHONE = (r"(?<![\w+])\+\d{1,3}[ -]?(?:\(0\)\s?)?(?:\(\d{1,5}\)[ -]?)?\d{1,5}(?:[ .-]?\d{2,5}){1,4}"
               r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?\b")
"""A number written with its +country code: +44 121 496 0281, +49 (0) 69 711688, +33 5 94 59 56 92."""
_NANP_PHONE = (r"(?<![\w+.])(?:(?:\+1|001|1)[-. ]?)?(?:\(\d{3}\)|\d{3})[-. ]?\d{3}[-. ]\d{4}"
               r"(?:\s?(?:x|ext\.?)\s?\d{1,5})?\b")
"""A North-American layout, extension included: (460)648-7647x5938, 001-497-476-5823, 396.383.7359."""
_EXTENSION = re.compile(r"\s?(?:x|ext\.?)\s?\d+$")


@dataclass
class PIIConfig:
    """PII redaction (Presidio): each found span is replaced by its typed placeholder; no document is removed."""

    entities: list[str] = field(default_factory=lambda: ["email", "phone", "ip", "credit_card", "iban"])
    """What to redact: email, phone, ip, credit_card, iban (patterns and checksums); person, location (spaCy NER:
    need an installed model, see ner_models)."""
    placeholder: str = "<{}>"
    """The replacement; {} is the entity's upper-case name (EMAIL, PHONE, IP, CREDIT_CARD, IBAN, PERSON, LOCATION)."""
    languages: list[str] = field(default_factory=lambda: ["en"])
    """Languages to analyse as: a document's meta["language"] (from the language step) when listed, else the first."""
    ner_models: dict[str, str] = field(default_factory=lambda: {"en": "en_core_web_sm"})
    """spaCy NER pipeline per language for person / location: an installed package or a saved pipeline's folder
    (never downloaded)."""
    phone_regions: list[str] = field(default_factory=lambda: ["US", "GB", "DE", "FR", "IL", "IN", "CA", "BR"])
    """Regions whose national formats `phonenumbers` matches (presidio's default; +country numbers always). Each is one
    more pass over the text: these 8 run at about 1 MB/s per core, ["US"] alone about 3 MB/s."""
    phone_leniency: int = 1
    """`phonenumbers` leniency: 0 any possible number (many false hits on figures), 1 a valid number (default), 2-3
    stricter grouping."""
    min_score: float = 0.3
    """Least presidio score to redact (checksum-validated cards and IBANs score 1.0; phones 0.4; bare '::' 0.1)."""

    def validate(self) -> None:
        unknown = [e for e in self.entities if e not in ENTITIES]
        if unknown or not self.entities:
            raise ValueError(f"pii.entities has {unknown or 'nothing'}; expected some of {', '.join(ENTITIES)}")
        if len(set(self.entities)) != len(self.entities):
            raise ValueError(f"pii.entities lists one twice: {self.entities}")
        if "{}" not in self.placeholder:
            raise ValueError(f"pii.placeholder is {self.placeholder!r}; expected a text with {{}} for the name")
        bad = [c for c in self.languages if not isinstance(c, str) or not c or c != c.strip().lower()]
        if bad or not self.languages:
            raise ValueError(f"pii.languages has {bad or 'nothing'}; expected lower-case ISO 639 codes like 'en'")
        if NER_ENTITIES & set(self.entities):
            missing = [c for c in self.languages if not self.ner_models.get(c)]
            if missing:
                raise ValueError(f"pii.ner_models has no model for {missing}; person / location need one per "
                                 f"language, found {self.ner_models}")
        if self.phone_leniency not in (0, 1, 2, 3):
            raise ValueError(f"pii.phone_leniency is {self.phone_leniency}; expected 0, 1, 2 or 3")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"pii.min_score is {self.min_score}; expected a score in [0, 1]")


def _recognizers(cfg: PIIConfig, language: str) -> list[Any]:
    """Presidio's recognisers for the pattern entities of `cfg`, for one language, with our offline e-mail check and
    the extra card and phone patterns."""
    import tldextract
    from presidio_analyzer import Pattern, PatternRecognizer
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        PhoneRecognizer,
    )

    # The bundled public-suffix snapshot, no cache file, no fetch (presidio calls the module's default extractor).
    suffixes = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmail(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return suffixes(pattern_text).fqdn != ""

    class Cards(CreditCardRecognizer):
        # presidio's pattern stops at 17 digits and at prefixes 1 and 3-6; cards run 12-19 digits (ISO/IEC 7812) and
        # Mastercard issues 2221-2720: the Luhn check (validate_result) still gates every match.
        PATTERNS = CreditCardRecognizer.PATTERNS + [
            Pattern("Card 12-19 digits", r"\b(?:0604|[1-6]\d{3})(?:[ -]?\d){8,15}\b", 0.3)]

    class Phones(PhoneRecognizer):
        def analyze(self, text: str, entities: list[str], nlp_artifacts: Any = None) -> list[Any]:
            return [r for r in super().analyze(text, entities, nlp_artifacts)
                    if not _DECIMAL.fullmatch(text[r.start:r.end])]

    class IntlPhones(PatternRecognizer):
        """Numbers written with their +country code (or a NANP layout) that phonenumbers calls unassigned."""

        def validate_result(self, pattern_text: str) -> bool | None:
            number = _EXTENSION.split(pattern_text)[0]  # E.164: at most 15 digits, 18 with an 00x exit code
            return None if 8 <= len(_DIGIT.findall(number)) <= 18 else False

    out: list[Any] = []
    wanted = set(cfg.entities)
    if "email" in wanted:
        out.append(OfflineEmail(supported_language=language))
    if "phone" in wanted:
        out.append(Phones(supported_language=language, supported_regions=tuple(cfg.phone_regions),
                          leniency=cfg.phone_leniency))
        out.append(IntlPhones(supported_entity="PHONE_NUMBER", supported_language=language, name="IntlPhones",
                              patterns=[Pattern("+country", _INTL_PHONE, 0.4), Pattern("NANP", _NANP_PHONE, 0.4)]))
    if "ip" in wanted:
        out.append(IpRecognizer(supported_language=language))
    if "credit_card" in wanted:
        out.append(Cards(supported_language=language))
    if "iban" in wanted:
        out.append(IbanRecognizer(supported_language=language))
    return out


def _ner_pipeline(name: str, language: str) -> Any:
    """The installed (or saved) spaCy pipeline `name` with only what NER needs; never downloads."""
    import spacy

    if not (spacy.util.is_package(name) or Path(name).is_dir()):
        raise ValueError(f"pii.ner_models[{language!r}] is {name!r}, which is neither an installed spaCy package nor "
                         f"a saved pipeline's folder; install it (e.g. pip install {name}) or drop person / location "
                         "from pii.entities (models are never downloaded)")
    nlp = spacy.load(name, exclude=["parser", "lemmatizer", "senter", "tagger", "attribute_ruler", "morphologizer"])
    if not nlp.has_pipe("ner") and not nlp.has_pipe("entity_ruler"):
        raise ValueError(f"pii.ner_models[{language!r}] is {name!r}, which has no ner / entity_ruler component")
    nlp.max_length = 1 << 30  # documents are already capped by the run's max_doc_mb
    return nlp


class PII:
    """A Filter that redacts: each span presidio finds is replaced by its placeholder (`<EMAIL>`); the verdict is
    always None. `extra()` counts the replacements of the partition per type (`{"pii:EMAIL": 3}`) and
    `meta["pii"]` the document's own, when it had any. The analyser is built once per worker process."""

    name = "pii"

    def __init__(self, cfg: PIIConfig):
        cfg.validate()
        self.cfg = cfg
        try:
            from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
            from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
            from presidio_analyzer.nlp_engine import (
                NerModelConfiguration,
                NoOpNlpEngine,
                SpacyNlpEngine,
            )
            from presidio_analyzer.predefined_recognizers import SpacyRecognizer
            from presidio_anonymizer import AnonymizerEngine
            from presidio_anonymizer.entities import (
                ConflictResolutionStrategy,
                OperatorConfig,
            )
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"the pii step needs presidio-analyzer and presidio-anonymizer: {_IMPORT_HINT}") from e
        if "phone" in cfg.entities:
            import phonenumbers

            unknown = sorted(set(cfg.phone_regions) - phonenumbers.SUPPORTED_REGIONS)
            if unknown:
                raise ValueError(f"pii.phone_regions has {unknown}; expected ISO 3166 region codes like 'US', 'GB'")
        langs = list(cfg.languages)
        registry = RecognizerRegistry(supported_languages=langs)
        self.ner = bool(NER_ENTITIES & set(cfg.entities))
        if self.ner:
            # SpacyNlpEngine.load() would download a missing model and move spaCy to a GPU: fill its pipelines here.
            ner_entities = [ENTITIES[e] for e in cfg.entities if e in NER_ENTITIES]
            engine = SpacyNlpEngine(models=[{"lang_code": c, "model_name": cfg.ner_models[c]} for c in langs],
                                    ner_model_configuration=NerModelConfiguration())
            engine.nlp = {c: _ner_pipeline(cfg.ner_models[c], c) for c in langs}
            for c in langs:
                registry.add_recognizer(SpacyRecognizer(supported_language=c, supported_entities=ner_entities))
        else:
            engine = NoOpNlpEngine(models=[{"lang_code": c, "model_name": "none"} for c in langs])
            engine.load()
        for c in langs:
            for r in _recognizers(cfg, c):
                registry.add_recognizer(r)
        # No context boost: presidio raises a score when a context word ("phone") is near, by lemma, which needs a
        # lemmatiser; the patterns' own scores and checksums decide here (every one is at least min_score's 0.3).
        enhancer = ContextAwareEnhancer(0.0, 0.0, 0, 0)
        self._analyzer = AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=langs,
                                        default_score_threshold=cfg.min_score, context_aware_enhancer=enhancer)
        self._anonymizer = AnonymizerEngine()
        self._entities = [ENTITIES[e] for e in cfg.entities]
        self._operators = {ENTITIES[e]: OperatorConfig("replace", {"new_value": cfg.placeholder.format(e.upper())})
                           for e in cfg.entities}
        self._conflicts = ConflictResolutionStrategy.REMOVE_INTERSECTIONS  # overlapping types: the higher score wins
        self._counts: dict[str, int] = {}

    def language(self, doc: Doc) -> str:
        """The language to analyse `doc` as: its meta["language"] when listed, else the first of `languages`."""
        lang = doc.meta.get("language")
        return lang if lang in self.cfg.languages else self.cfg.languages[0]

    def redact(self, text: str, language: str | None = None) -> tuple[str, dict[str, int]]:
        """(`text` with every found span replaced by its placeholder, replacements per entity name)."""
        return self.redact_many([text], language or self.cfg.languages[0])[0]

    def redact_many(self, texts: list[str], language: str) -> list[tuple[str, dict[str, int]]]:
        """`redact` of each text, all in `language`; with NER, spaCy reads them in batches (`nlp.pipe`)."""
        if not self.ner:
            return [self._replace(t, self._analyzer.analyze(text=t, language=language, entities=self._entities))
                    if _maybe_pii(t) else (t, {}) for t in texts]
        batches = self._analyzer.nlp_engine.process_batch(texts, language, batch_size=32)
        return [self._replace(t, self._analyzer.analyze(text=t, language=language, entities=self._entities,
                                                        nlp_artifacts=artifacts))
                for t, (_, artifacts) in zip(texts, batches)]

    def _replace(self, text: str, found: list[Any]) -> tuple[str, dict[str, int]]:
        if not found:
            return text, {}
        result = self._anonymizer.anonymize(text=text, analyzer_results=found, operators=self._operators,
                                            conflict_resolution=self._conflicts)
        counts: dict[str, int] = {}
        for item in result.items:
            name = _PRESIDIO.get(item.entity_type, item.entity_type.lower()).upper()
            counts[name] = counts.get(name, 0) + 1
        return result.text, counts

    def __call__(self, docs: list[Doc]) -> list[Verdict]:
        self._counts = {}
        by_language: dict[str, list[Doc]] = {}
        for d in docs:
            by_language.setdefault(self.language(d), []).append(d)
        for language, group in by_language.items():
            for d, (text, counts) in zip(group, self.redact_many([d.text for d in group], language)):
                d.text = text
                if counts:
                    d.meta["pii"] = counts
                for name, n in counts.items():
                    key = f"pii:{name}"
                    self._counts[key] = self._counts.get(key, 0) + n
        return [None] * len(docs)

    def extra(self) -> dict[str, int]:
        return dict(self._counts)


def _maybe_pii(text: str) -> bool:
    """False when no pattern entity can be in `text`: each needs an '@', a ':' or a digit (a cheap skip)."""
    return "@" in text or ":" in text or _DIGIT.search(text) is not None

