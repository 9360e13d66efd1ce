"""PII redaction (presidio) and the toxicity filter (alt-profanity-check) on real text: Faker documents with PII
planted at known spans, standard-library docstrings as clean prose, and clearly abusive sentences."""

from __future__ import annotations

import ast
import socket
import sysconfig
import time
from pathlib import Path

import pytest

from lmforge.curate.base import Doc, Filter

pytest.importorskip("presidio_analyzer")
pytest.importorskip("presidio_anonymizer")
pytest.importorskip("profanity_check")
pytest.importorskip("faker")

from lmforge.curate.pii import PII, PIIConfig
from lmforge.curate.toxicity import Toxicity, ToxicityConfig, chunks

STDLIB = Path(sysconfig.get_paths()["stdlib"])
PLACEHOLDER = {"email": "<EMAIL>", "phone": "<PHONE>", "ip": "<IP>", "credit_card": "<CREDIT_CARD>",
               "iban": "<IBAN>"}


def _stdlib_docstrings(min_chars: int = 200, limit: int = 4000) -> list[str]:
    """Real prose: docstrings (modules, classes, functions) of the standard library, tests and site-packages left
    out, in a fixed order."""
    out: list[str] = []
    seen: set[str] = set()
    files = sorted(p for p in STDLIB.rglob("*.py")
                   if not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(p.parts))
    for p in files:
        try:
            tree = ast.parse(p.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars and doc not in seen:
                    seen.add(doc)
                    out.append(doc)
                    if len(out) == limit:
                        return out
    return out


# Sentences around the planted value: (text before, text after); the value is the only PII in the sentence.
TEMPLATES = {
    "email": [("If the nightly build breaks again, write to ", " and attach the log."),
              ("Her new address is ", ", so please update the mailing list."),
              ("Questions about the invoice can be sent to ", " before the end of the month.")],
    "phone": [("You can reach the front desk at ", " between nine and five."),
              ("Call me back on ", " when you land."),
              ("The number on the delivery slip was ", ", but nobody answered.")],
    "ip": [("The requests all came from ", " during the night."),
           ("We moved the database to ", " last week and nothing broke."),
           ("Block ", " on the firewall until the audit is done.")],
    "credit_card": [("The charge was made with card ", " on Tuesday."),
                    ("She paid with ", " and asked for a receipt."),
                    ("Please cancel the card ", " immediately.")],
    "iban": [("Transfer the deposit to ", " by Friday."),
             ("The refund went to account ", " after two days."),
             ("Our bank details changed: the IBAN is now ", " for all payments.")],
}


def _value(fake, kind: str, i: int) -> str:
    if kind == "email":
        return fake.email()
    if kind == "phone":
        return fake.phone_number()
    if kind == "ip":
        return fake.ipv4() if i % 2 else fake.ipv6()
    if kind == "credit_card":
        return fake.credit_card_number()
    return fake.iban()


def _faker_corpus(n: int = 500, seed: int = 1234) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """`n` documents of filler sentences (spaCy's English examples and Faker's) with PII planted in template
    sentences: [(text, [(kind, value, text before it), ...])], emails, phones (US, GB, DE, FR formats), IPv4 and
    IPv6, card numbers of every Faker issuer and IBANs."""
    from faker import Faker
    from spacy.lang.en.examples import sentences as real

    Faker.seed(seed)
    fake = Faker(["en_US", "en_GB", "de_DE", "fr_FR"])
    import random

    rng = random.Random(seed)
    kinds = list(TEMPLATES)
    docs = []
    for i in range(n):
        parts: list[str] = []
        planted: list[tuple[str, str, str]] = []
        for j in range(rng.randint(2, 4)):
            parts.append(rng.choice(real) + " " + fake.sentence() + " ")
            kind = kinds[(i + j) % len(kinds)]
            before, after = rng.choice(TEMPLATES[kind])
            value = _value(fake, kind, i + j)
            parts.append(before)
            planted.append((kind, value, "".join(parts)[-40:]))
            parts.append(value + after + " ")
        parts.append(fake.paragraph())
        docs.append(("".join(parts), planted))
    return docs


@pytest.fixture(scope="module")
def pii() -> PII:
    return PII(PIIConfig())


@pytest.fixture(scope="module")
def docstrings() -> list[str]:
    return _stdlib_docstrings()


def test_pii_recall_on_faker_documents(pii: PII):
    """Each planted span is found (its text is gone and its placeholder stands right after the text before it)
    for >= 95% of the spans of every type, on 500 seeded Faker documents."""
    corpus = _faker_corpus()
    docs = [Doc(f"faker:{i}", text, str(i)) for i, (text, _) in enumerate(corpus)]
    t0 = time.perf_counter()
    verdicts = pii(docs)
    seconds = time.perf_counter() - t0
    assert verdicts == [None] * len(docs)  # redaction never removes a document
    found: dict[str, list[int]] = {k: [0, 0] for k in TEMPLATES}
    missed: dict[str, list[str]] = {k: [] for k in TEMPLATES}
    for d, (_, planted) in zip(docs, corpus):
        for kind, value, before in planted:
            ok = value not in d.text and (before + PLACEHOLDER[kind]) in d.text
            found[kind][0] += ok
            found[kind][1] += 1
            if not ok:
                missed[kind].append(value)
    recall = {k: hit / total for k, (hit, total) in found.items()}
    print(f"\nPII recall on {len(docs)} Faker documents ({seconds:.2f} s): "
          + ", ".join(f"{k} {r:.3f} of {found[k][1]}" for k, r in recall.items()))
    print("missed:", {k: v[:5] for k, v in missed.items() if v})
    assert all(r >= 0.95 for r in recall.values()), (recall, missed)
    extra = pii.extra()
    planted_total = sum(total for _, total in found.values())
    assert sum(extra.values()) >= planted_total * 0.95
    assert {"pii:EMAIL", "pii:PHONE", "pii:IP", "pii:CREDIT_CARD", "pii:IBAN"} <= set(extra)
    assert all(d.meta["pii"] for d in docs)  # every document had PII and says how much was replaced
    assert sum(sum(d.meta["pii"].values()) for d in docs) == sum(extra.values())


def test_pii_on_clean_prose_inserts_few_placeholders(pii: PII, docstrings: list[str]):
    """Precision-ish: placeholders inserted into standard-library docstrings, where no PII was planted (the
    e-mail addresses found there are real ones: authors' addresses in module docstrings)."""
    docs = [Doc(f"stdlib:{i}", t, str(i)) for i, t in enumerate(docstrings)]
    mb = sum(len(t.encode()) for t in docstrings) / 1e6
    t0 = time.perf_counter()
    pii(docs)
    seconds = time.perf_counter() - t0
    extra = pii.extra()
    changed = sum(d.text != t for d, t in zip(docs, docstrings))
    print(f"\nPII on {len(docs)} stdlib docstrings ({mb:.2f} MB, {mb / seconds:.2f} MB/s): {changed} documents "
          f"changed ({changed / len(docs):.2%}); placeholders {extra}; per MB "
          + ", ".join(f"{k} {v / mb:.1f}" for k, v in sorted(extra.items())))
    assert len(docs) >= 1000
    assert changed / len(docs) <= 0.05
    # Card numbers and IBANs pass a checksum: on prose they stay (near) absent.
    assert extra.get("pii:CREDIT_CARD", 0) + extra.get("pii:IBAN", 0) <= 5
    assert extra.get("pii:PHONE", 0) / mb <= 30
    # A document without anything PII-like comes back unchanged, character for character.
    plain = [(d, t) for d, t in zip(docs, docstrings) if "@" not in t and not any(c.isdigit() for c in t)]
    assert len(plain) >= 100 and all(d.text == t and "pii" not in d.meta for d, t in plain)


def test_pii_redacts_each_type_with_its_placeholder(pii: PII):
    text = ("Mail ada@example.org or call +1-202-555-0143 from 10.0.0.7 or 2001:db8::8a2e:370:7334; card "
            "4111 1111 1111 1111, IBAN DE89370400440532013000. Version 3.12 and 0.333333333 are numbers.")
    out, counts = pii.redact(text)
    assert out == ("Mail <EMAIL> or call <PHONE> from <IP> or <IP>; card <CREDIT_CARD>, IBAN <IBAN>. "
                   "Version 3.12 and 0.333333333 are numbers.")
    assert counts == {"EMAIL": 1, "PHONE": 1, "IP": 2, "CREDIT_CARD": 1, "IBAN": 1}
    # Luhn and the IBAN checksum: one digit off, nothing is redacted.
    assert pii.redact("card 4111 1111 1111 1112, IBAN DE89370400440532013001")[1] == {}
    # Only the entities asked for; the placeholder format is the config's.
    only = PII(PIIConfig(entities=["email"], placeholder="[{}]"))
    assert only.redact(text)[0].startswith("Mail [EMAIL] or call +1-202-555-0143 from 10.0.0.7")
    assert isinstance(only, Filter)


def test_pii_uses_the_documents_language(pii: PII):
    two = PII(PIIConfig(languages=["en", "de"]))
    d = Doc("x:1", "Schreiben Sie an ada@example.org.", "1", {"language": "de"})
    assert two.language(d) == "de" and two.language(Doc("x:2", "", "2", {"language": "fr"})) == "en"
    assert two([d]) == [None] and d.text == "Schreiben Sie an <EMAIL>." and d.meta["pii"] == {"EMAIL": 1}


@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to connect or resolve a name raises and is recorded."""
    attempts: list[str] = []

    def refuse(what):
        def blocked(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what == 'connect' else args[:2]}")
            raise OSError(f"network access blocked by the test: {what}")
        return blocked

    monkeypatch.setattr(socket.socket, "connect", refuse("connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", refuse("connect_ex"))
    monkeypatch.setattr(socket, "getaddrinfo", refuse("getaddrinfo"))
    monkeypatch.setattr(socket, "create_connection", refuse("create_connection"))
    return attempts


def test_pii_never_touches_the_network(no_network, tmp_path, monkeypatch):
    """Building the step and redacting (e-mails included) attempts no connection and never calls tldextract's
    module-level extractor, which presidio's own e-mail check uses and which fetches the public suffix list."""
    import tldextract

    def module_extractor(*args, **kwargs):
        raise AssertionError("tldextract.extract (the fetching default extractor) was called")

    monkeypatch.setattr(tldextract, "extract", module_extractor)
    step = PII(PIIConfig())
    docs = [Doc(f"t:{i}", text, str(i)) for i, (text, _) in enumerate(_faker_corpus(40, seed=7))]
    step(docs)
    assert step.extra().get("pii:EMAIL", 0) >= 20
    assert no_network == []
    # The fixture does catch what it guards against: a default extractor with an empty cache tries to fetch.
    tldextract.TLDExtract(cache_dir=str(tmp_path / "cache"))("ada@example.org")
    assert no_network and "publicsuffix.org" in no_network[0]


def test_pii_names_with_a_saved_spacy_pipeline(tmp_path):
    """person / location run spaCy NER from a pipeline on disk (here: a blank English pipeline with an entity ruler,
    saved to a folder; an installed model such as en_core_web_sm is named the same way), with the patterns."""
    import spacy

    nlp = spacy.blank("en")
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns([{"label": "PERSON", "pattern": [{"LOWER": "ada"}, {"LOWER": "lovelace"}]},
                        {"label": "GPE", "pattern": "London"}])
    nlp.to_disk(tmp_path / "ner")
    step = PII(PIIConfig(entities=["person", "location", "email"], ner_models={"en": str(tmp_path / "ner")}))
    d = Doc("n:1", "Ada Lovelace lived in London and wrote to ada@example.org.", "1")
    assert step([d]) == [None]
    assert d.text == "<PERSON> lived in <LOCATION> and wrote to <EMAIL>."
    assert step.extra() == {"pii:PERSON": 1, "pii:LOCATION": 1, "pii:EMAIL": 1}


def test_pii_config_errors():
    with pytest.raises(ValueError, match="ssn"):
        PIIConfig(entities=["email", "ssn"]).validate()
    with pytest.raises(ValueError, match="placeholder"):
        PIIConfig(placeholder="<PII>").validate()
    with pytest.raises(ValueError, match="ner_models has no model for"):
        PIIConfig(entities=["person"], languages=["fr"]).validate()
    with pytest.raises(ValueError, match="phone_regions"):
        PII(PIIConfig(phone_regions=["US", "XX"]))
    with pytest.raises(ValueError, match="never downloaded"):
        PII(PIIConfig(entities=["person"], ner_models={"en": "no_such_spacy_model_xx"}))


# ----------------------------------------------------------------------------- toxicity

# Clearly abusive short texts (insults, threats, slurs-free profanity), as the model's training data had.
TOXIC = [
    "You are a fucking idiot.",
    "Shut up, you stupid bitch.",
    "Go fuck yourself, asshole.",
    "What a worthless piece of shit you are.",
    "I hope you die, you pathetic moron.",
    "Fuck off and never come back here, dickhead.",
    "This is the dumbest shit I have ever read, you retard.",
    "Eat shit, loser.",
    "You cunt, nobody wants you here.",
    "Suck my dick, you ugly bastard.",
    "You're a goddamn fucking disgrace.",
    "Stupid motherfucker, learn to read.",
]


@pytest.fixture(scope="module")
def toxicity() -> Toxicity:
    return Toxicity(ToxicityConfig())


def test_toxicity_removes_clearly_toxic_texts(toxicity: Toxicity):
    docs = [Doc(f"tox:{i}", t, str(i)) for i, t in enumerate(TOXIC)]
    verdicts = toxicity(docs)
    scores = [d.meta["toxicity"] for d in docs]
    print(f"\ntoxic texts: {sum(v is not None for v in verdicts)}/{len(docs)} removed, scores {scores}")
    assert verdicts == ["toxicity:above_threshold"] * len(docs)
    assert isinstance(toxicity, Filter) and toxicity.extra() == {}


def test_toxicity_keeps_stdlib_prose(toxicity: Toxicity, docstrings: list[str]):
    docs = [Doc(f"stdlib:{i}", t, str(i)) for i, t in enumerate(docstrings)]
    mb = sum(len(t.encode()) for t in docstrings) / 1e6
    t0 = time.perf_counter()
    verdicts = toxicity(docs)
    seconds = time.perf_counter() - t0
    kept = sum(v is None for v in verdicts) / len(docs)
    worst = sorted(docs, key=lambda d: -d.meta["toxicity"])[:3]
    print(f"\ntoxicity on {len(docs)} stdlib docstrings ({mb:.2f} MB, {mb / seconds:.1f} MB/s): {kept:.2%} kept; "
          f"highest {[(d.meta['toxicity'], d.text[:60]) for d in worst]}")
    assert len(docs) >= 1000 and kept >= 0.99
    assert all(0.0 <= d.meta["toxicity"] <= 1.0 for d in docs)


def test_toxicity_scores_long_documents_per_chunk(toxicity: Toxicity, docstrings: list[str]):
    """One abusive paragraph in a long benign document: scored whole, the TF-IDF vector dilutes it below the
    threshold; scored per chunk (max), the document is removed. A 0.9 quantile forgives one chunk in many."""
    abuse = TOXIC[0] + " " + TOXIC[3]
    long_doc = "\n\n".join(docstrings[:40] + [abuse] + docstrings[40:80])
    whole = float(toxicity._predict([long_doc])[0])
    d = Doc("long:1", long_doc, "1")
    assert toxicity([d]) == ["toxicity:above_threshold"]
    print(f"\nlong document ({len(long_doc)} chars, {len(chunks(long_doc, 500))} chunks): whole-text score "
          f"{whole:.3f}, per-chunk max {d.meta['toxicity']}")
    assert whole < 0.8 <= d.meta["toxicity"]
    lenient = Toxicity(ToxicityConfig(quantile=0.9))
    assert lenient([Doc("long:2", long_doc, "2")]) == [None]


def test_chunks_are_paragraphs_cut_at_lines():
    text = "First paragraph.\n\nSecond one,\nover two lines.\n\n\n" + "x" * 1200 + "\nA last line.\n\nEnd."
    out = chunks(text, 500)
    assert out == ["First paragraph.", "Second one,\nover two lines.", "x" * 500, "x" * 500,
                   "x" * 200 + "\nA last line.", "End."]
    assert chunks("   ", 500) == ["   "] and chunks("one line", 3) == ["one", " li", "ne"]


def test_toxicity_config_errors():
    with pytest.raises(ValueError, match="threshold"):
        ToxicityConfig(threshold=1.5).validate()
    with pytest.raises(ValueError, match="backend"):
        ToxicityConfig(backend="perspective").validate()
    with pytest.raises(ValueError, match="quantile"):
        ToxicityConfig(quantile=0.0).validate()
