"""`lmforge export` and `lmforge generate --backend onnxruntime` end to end on a tiny Llama with a real tokenizer: the
ONNX graph's logits and held-out bits per byte against lmforge's, ORT's int8 / int4 variants, greedy text from the
torch-free runner equal to lmforge's, a quantized folder's codes through GGUF and back, pipelines, and bad inputs."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge import cli

PROMPT = "def add(a, b):\n    return"
ROOT = Path(__file__).resolve().parents[2]
NO_ORT = any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_ort = pytest.mark.skipif(NO_ORT, reason="onnx / onnxruntime / onnxscript are not installed: "
                                              "pip install 'lmforge[onnx]'")


@pytest.fixture(scope="module")
def eval_args(tmp_path_factory) -> list[str]:
    """compress.json settings that take a second on the tiny model: bits per byte of 6 KB of held-out text (a
    standard-library module the tokenizer was not trained on), 2 multiple-choice questions, 8 decoded tokens."""
    import sysconfig

    text = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:6000]
    held = tmp_path_factory.mktemp("held") / "held.txt"
    held.write_text(text)
    return [f"eval.tasks=[ppl:{held},stdlib-mc]", "eval.limit=2", "eval.decode_tokens=8", "eval.repeats=1"]


@pytest.fixture(scope="module")
def tiny(bpe_data, tmp_path_factory):
    """(model, tokenizer, folder) of a llama-tiny with the stdlib BPE's vocabulary; a wide init, so greedy text
    varies and equality checks mean something."""
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bpe_data.tokenizer)
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                               initializer_range=0.1)).eval()
    return model, tok, save(model, tok, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def onnx_dir(tiny, eval_args, tmp_path_factory) -> Path:
    """`lmforge export` of the tiny model to a float32 ONNX folder, measured before and after."""
    if NO_ORT:
        pytest.skip("onnx / onnxruntime / onnxscript are not installed: pip install 'lmforge[onnx]'")
    out = tmp_path_factory.mktemp("export") / "onnx"
    assert cli.main(["export", str(tiny[2]), "--format", "onnx", "--output", str(out), *eval_args]) == 0
    return out


@needs_ort
def test_onnx_export_agrees_with_lmforge_and_reports_before_and_after(tiny, onnx_dir):
    from lmforge.eval.compression import disk_size

    report = json.loads((onnx_dir / "compress.json").read_text())
    ppl = report["config"]["eval"]["tasks"][0]
    before, after = report["before"], report["after"]
    gap = report["logits_check"]["float"]
    assert gap["prefill"] <= 1e-4 and gap["decode"] <= 1e-4
    # the graph scored through ONNX Runtime by lmforge's perplexity code: the same bits per byte as lmforge's
    assert after[ppl]["bits_per_byte"] == pytest.approx(before[ppl]["bits_per_byte"], rel=1e-5)
    assert after[ppl]["tokens"] == before[ppl]["tokens"] > 1000
    assert report["not_measured_after"] == ["stdlib-mc"] and 0 <= before["stdlib-mc"]["acc"] <= 1
    assert before["decode_tokens_per_s"] > 0 and after["decode_tokens_per_s"] > 0
    assert after["size_bytes"] == disk_size(onnx_dir) and before["size_bytes"] == disk_size(tiny[2])
    assert (onnx_dir / "lmforge_onnx.json").is_file() and (onnx_dir / "tokenizer.json").is_file()


@needs_ort
def test_logit_gap_sees_a_different_model(tiny, onnx_dir):
    """The check the stage records is not blind: against a model with one weight changed it reports the change."""
    from lmforge.inference.onnx_runner import OnnxGenerator
    from lmforge.stages.export import logit_gap

    model, tok, _ = tiny
    ids = tok.encode(PROMPT, add_special_tokens=False)
    gen = OnnxGenerator(onnx_dir)
    assert logit_gap(model, gen, ids, 3)["decode"] <= 1e-4
    other = type(model)(model.cfg).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.blocks[1].mlp.down.weight.mul_(1.5)
    gap = logit_gap(other, gen, ids, 3)
    with torch.no_grad():
        expected = (other(torch.tensor([ids])).logits - model(torch.tensor([ids])).logits).abs().max().item()
    assert gap["prefill"] == pytest.approx(expected, rel=1e-3, abs=1e-4) and gap["prefill"] > 1e-2


@needs_ort
@pytest.mark.parametrize("kind,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_onnx_variants_run_and_err_more_than_float(tiny, eval_args, tmp_path, kind, op):
    import onnx

    from lmforge.inference.onnx_runner import OnnxGenerator

    out = tmp_path / kind
    assert cli.main(["export", str(tiny[2]), f"output={out}", f"quantize={kind}", "exclude=[lm_head]", *eval_args]) == 0
    report = json.loads((out / "compress.json").read_text())
    assert json.loads((out / "lmforge_onnx.json").read_text())["quantization"]["kind"] == kind
    assert sum(n.op_type == op for n in onnx.load(str(out / "model.onnx")).graph.node) == 14  # 7 linears x 2 blocks
    assert not list(tmp_path.glob(".*"))  # the float graph in between is gone
    gaps = report["logits_check"]
    assert gaps["float"]["prefill"] <= 1e-4 < gaps[kind]["prefill"]
    assert report["after"]["size_bytes"] < report["float_graph_bytes"]
    ppl = report["config"]["eval"]["tasks"][0]
    ratio = report["after"][ppl]["bits_per_byte"] / report["before"][ppl]["bits_per_byte"]
    assert 1e-7 < abs(ratio - 1) < 0.05, ratio  # moved by the rounding, not broken (a random model may gain)
    assert len(OnnxGenerator(out).generate(tiny[1].encode(PROMPT), 8, ignore_eos=True)) == 8


def _generate(capsys, *args: str) -> str:
    assert cli.main(["generate", f"model={args[0]}", *args[1:], f"prompt={PROMPT}", "max_new_tokens=24"]) == 0
    return capsys.readouterr().out


@needs_ort
def test_generate_on_onnxruntime_writes_lmforge_greedy_text(tiny, onnx_dir, capsys):
    ours = _generate(capsys, str(tiny[2]))
    ort = _generate(capsys, str(onnx_dir), "--backend", "onnxruntime", "threads=1")
    assert ort == ours and len(set(ours)) > 6  # the same text, and not one token repeated
    sampled = [_generate(capsys, str(onnx_dir), "backend=onnxruntime", "temperature=1.5", f"seed={s}")
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


@needs_ort
def test_generate_on_onnxruntime_never_imports_torch(onnx_dir, capsys):
    expected = _generate(capsys, str(onnx_dir), "backend=onnxruntime")
    argv = ["generate", f"model={onnx_dir}", "backend=onnxruntime", f"prompt={PROMPT}", "max_new_tokens=24"]
    code = ("import sys; sys.modules['torch'] = None\n"
            "from lmforge import cli\n"
            f"rc = cli.main({argv!r})\n"
            "assert not any(m.startswith('torch.') for m in sys.modules)\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == expected


def test_gguf_of_a_quantized_folder_keeps_its_codes(tiny, eval_args, tmp_path):
    pytest.importorskip("gguf")
    from lmforge.models.gguf import load_gguf_quantized
    from lmforge.transforms.quant import quantize_rtn, save_quantized

    model, tok, _ = tiny
    for bits, symmetric in [(4, True), (4, False), (8, True)]:  # Q4_0, Q4_1, Q8_0
        q = type(model)(model.cfg).eval()
        q.load_state_dict(model.state_dict())
        folder = save_quantized(quantize_rtn(q, bits, 32, symmetric), tok, tmp_path / f"q{bits}{symmetric}")
        out = tmp_path / f"q{bits}{symmetric}.gguf"
        limit = eval_args if bits == 4 and symmetric else ["eval.enabled=false"]
        assert cli.main(["export", str(folder), "--format", "gguf", "--output", str(out), *limit]) == 0
        _, sd, _, qc = load_gguf_quantized(out)
        assert (qc["bits"], qc["symmetric"], qc["group_size"]) == (bits, symmetric, 32)
        saved = q.state_dict()
        names = [k for k in saved if k.endswith((".weight", ".weight_scale", ".weight_min")) and "blocks." in k
                 and "norm" not in k]
        assert len(names) == 14 * (2 if symmetric else 3)
        assert all(torch.equal(sd[k], saved[k]) for k in names)
        report = json.loads(out.with_suffix(".compress.json").read_text())
        assert report["after"]["size_bytes"] == out.stat().st_size
    # the same weights read back: bits per byte unchanged, the GGUF smaller than the safetensors folder
    report = json.loads((tmp_path / "q4True.compress.json").read_text())
    ppl = report["config"]["eval"]["tasks"][0]
    assert report["after"][ppl]["bits_per_byte"] == pytest.approx(report["before"][ppl]["bits_per_byte"], rel=1e-5)
    assert report["after"]["stdlib-mc"]["acc"] == report["before"]["stdlib-mc"]["acc"]
    assert report["after"]["decode_tokens_per_s"] is None  # a GGUF's speed is llama.cpp's


def test_float_gguf_is_what_convert_writes(tiny, tmp_path):
    pytest.importorskip("gguf")
    _, _, folder = tiny
    assert cli.main(["export", str(folder), "--format", "gguf", f"output={tmp_path / 'e'}", "dtype=float16",
                     "eval.enabled=false"]) == 0
    assert cli.main(["convert", str(folder), str(tmp_path / "c.gguf"), "dtype=float16"]) == 0
    from lmforge.models.gguf import load_gguf

    # the files differ only in their name field (the file's stem): compare what they hold
    a, b = load_gguf(tmp_path / "e" / "model.gguf")[1], load_gguf(tmp_path / "c.gguf")[1]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "e" / "compress.json").is_file()


def test_a_pipeline_quantizes_then_exports_by_reference(tiny, tmp_path):
    pytest.importorskip("gguf")
    import yaml

    import lmforge

    recipe = {"run_dir": str(tmp_path / "run"), "stages": {
        "q": {"verb": "quantize", "config": {"model": str(tiny[2]), "bits": 4, "group_size": 32,
                                             "eval": {"enabled": False}}},
        "gguf": {"verb": "export", "config": {"model": "${q.output}", "format": "gguf", "eval": {"enabled": False}}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert cli.main(["pipeline", "--config", str(tmp_path / "p.yaml")]) == 0
    stage = json.loads((tmp_path / "run" / "gguf" / "stage.json").read_text())
    assert stage["parents"] == {"q": str(tmp_path / "run" / "q")}
    model, _ = lmforge.load(tmp_path / "run" / "gguf")  # the folder's one model.gguf
    assert model.cfg.num_layers == 2 and (tmp_path / "run" / "gguf" / "compress.json").is_file()


@pytest.mark.parametrize("args,code,expected", [
    (["--format", "tflite"], 2, "format"),
    (["--format", "gguf", "quantize=int4"], 2, "expected quantize=none for gguf"),
    (["--format", "onnx", "dtype=bfloat16"], 2, "float32 or float16, found bfloat16"),
    (["--format", "onnx", "quantize=int4", "block_size=24"], 2, "power of two >= 16, found 24"),
])
def test_bad_export_settings_are_one_line(tiny, tmp_path, capsys, args, code, expected):
    assert cli.main(["export", str(tiny[2]), f"output={tmp_path / 'o'}", *args]) == code
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_missing_model_is_one_line(tmp_path, capsys):
    assert cli.main(["export", str(tmp_path / "nope"), "--format", "gguf", f"output={tmp_path / 'o.gguf'}"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "not found" in err and err.count("\n") == 1


@needs_ort
def test_onnx_of_a_quantized_folder_asks_for_float_weights(tiny, tmp_path, capsys):
    from lmforge.transforms.quant import quantize_rtn, save_quantized

    model, tok, _ = tiny
    q = type(model)(model.cfg).eval()
    q.load_state_dict(model.state_dict())
    folder = save_quantized(quantize_rtn(q, 8, 32), tok, tmp_path / "q8")
    assert cli.main(["export", str(folder), f"output={tmp_path / 'o'}", "eval.enabled=false"]) == 2
    err = capsys.readouterr().err
    assert "QuantLinear" in err and "quantize_onnx" in err and err.count("\n") == 1


@needs_ort
def test_generate_backend_errors_are_one_line(tiny, onnx_dir, tmp_path, capsys, monkeypatch):
    assert cli.main(["generate", f"model={tiny[2]}", "backend=onnxruntime", "prompt=x"]) == 2
    err = capsys.readouterr().err
    assert "no lmforge_onnx.json" in err and err.count("\n") == 1
    assert cli.main(["generate", f"model={onnx_dir}", "prompt=x"]) == 2
    assert "is an ONNX export; expected --backend onnxruntime" in capsys.readouterr().err
    assert cli.main(["generate", f"model={onnx_dir}", "backend=onnxruntime", "prompt=x", "top_p=0"]) == 2
    assert "top_p must be in (0, 1], found 0" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert cli.main(["generate", f"model={onnx_dir}", "backend=onnxruntime", "prompt=x"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'lmforge[onnx]'" in err and err.count("\n") == 1
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "onnxruntime" else object())
    assert cli.main(["export", str(tiny[2]), f"output={tmp_path / 'o'}"]) == 1
    err = capsys.readouterr().err
    assert "needs onnxruntime: pip install 'lmforge[onnx]'" in err and err.count("\n") == 1


@pytest.mark.slow
@needs_ort
def test_smollm2_onnx_int4_export_checks_and_measures(tmp_path):
    out = tmp_path / "smol-int4"
    assert cli.main(["export", "smollm2-135m-instruct", f"output={out}", "quantize=int4", "eval.tasks=[stdlib-ppl]",
                     "eval.limit=2", "eval.decode_tokens=32"]) == 0
    report = json.loads((out / "compress.json").read_text())
    print(json.dumps({k: report[k] for k in ("before", "after", "logits_check", "seconds")}, indent=1))
    assert report["logits_check"]["float"]["prefill"] <= 1e-4 and report["logits_check"]["float"]["decode"] <= 1e-4
    assert 1 < report["after_over_before"]["stdlib-ppl.bits_per_byte"] < 1.3  # 1.125 measured on 8 documents
