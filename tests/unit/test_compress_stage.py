"""The compress verbs end to end on a tiny Llama with a real tokenizer: `lmforge quantize` to a folder and to GGUF,
compress.json's before / after measurements, the calibration windows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge import cli

EVAL = ["eval.tasks=[stdlib-ppl,stdlib-mc]", "eval.limit=2", "eval.decode_tokens=8", "eval.repeats=1"]


@pytest.fixture(scope="module")
def tiny_dir(bpe_data, tmp_path_factory) -> Path:
    """A llama-tiny (random weights, the stdlib BPE's vocabulary) saved as a Hugging Face folder."""
    from lmforge.models.loading import save
    from lmforge.models.presets import preset
    from lmforge.models.transformer import Transformer
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bpe_data.tokenizer)
    torch.manual_seed(0)
    model = Transformer(preset("llama-tiny", vocab_size=tok.vocab_size, eos_token_id=tok.eos_id))
    return save(model, tok, tmp_path_factory.mktemp("tiny") / "model")


def test_quantize_rtn_writes_a_folder_that_reloads_and_reports_before_and_after(tiny_dir, tmp_path):
    import lmforge
    from lmforge.transforms.quant import QuantLinear

    out = tmp_path / "q8"
    assert cli.main(["quantize", str(tiny_dir), f"output={out}", "bits=8", "group_size=32", *EVAL]) == 0
    report = json.loads((out / "compress.json").read_text())
    before, after = report["before"], report["after"]
    assert after["size_bytes"] < before["size_bytes"]
    for side in (before, after):
        assert side["stdlib-ppl"]["bits_per_byte"] > 0 and 0 <= side["stdlib-mc"]["acc"] <= 1
        assert side["decode_tokens_per_s"] > 0
    # int8 with 32-weight groups barely moves a random model's held-out loss
    assert after["stdlib-ppl"]["bits_per_byte"] == pytest.approx(before["stdlib-ppl"]["bits_per_byte"], rel=0.01)
    assert report["after_over_before"]["size_bytes"] == after["size_bytes"] / before["size_bytes"]
    model, _ = lmforge.load(out)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7  # q k v o gate up down per block
    assert cli.main(["report", str(out)]) == 0  # the size / quality plot and the before -> after table
    page = (out / "report.html").read_text()
    assert "<h2>Compression</h2>" in page and "alt='size and quality' src='data:image/png;base64," in page
    mb = f"{before['size_bytes'] / 1e6:.1f} → {after['size_bytes'] / 1e6:.1f}"
    assert mb in page


def test_quantize_gptq_to_gguf_calibrates_on_text(tiny_dir, tmp_path):
    pytest.importorskip("gguf")
    out = tmp_path / "q4.gguf"
    assert cli.main(["quantize", str(tiny_dir), f"output={out}", "method=gptq", "bits=4", "group_size=32",
                     "calibration_samples=4", "calibration_seq_len=32", "eval.enabled=false"]) == 0
    assert out.stat().st_size > 0
    report = json.loads(out.with_suffix(".compress.json").read_text())
    assert report["after"]["size_bytes"] == out.stat().st_size and report["config"]["method"] == "gptq"


def test_a_gguf_output_needs_a_block_format(tiny_dir, tmp_path, capsys):
    assert cli.main(["quantize", str(tiny_dir), f"output={tmp_path / 'x.gguf'}", "bits=4"]) == 2
    err = capsys.readouterr().err
    assert "Q4_0 (bits 4, symmetric)" in err and "group_size None" in err and "Traceback" not in err


def test_calibration_windows_leave_out_the_heldout_modules(bpe_data):
    from lmforge.data.calibration import calibration_windows, heldout_excludes
    from lmforge.data.stdlib import stdlib_heldout_texts
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bpe_data.tokenizer)
    a = calibration_windows(["{stdlib}"], tok, samples=6, seq_len=40, seed=3, max_documents=50)
    b = calibration_windows(["{stdlib}"], tok, samples=6, seq_len=40, seed=3, max_documents=50)
    assert a.shape == (6, 40) and a.dtype == torch.long and torch.equal(a, b)
    heldout = {name for name, _ in stdlib_heldout_texts()}
    assert heldout and all(any(p.endswith("/" + name) for p in heldout_excludes()) for name in heldout)
    with pytest.raises(ValueError, match="no document of at least"):
        calibration_windows(["{stdlib}"], tok, samples=1, seq_len=10**7, max_documents=3)


@pytest.mark.parametrize("method,target", [("wanda", "sparsity=0.5"), ("sparsegpt", "pattern=2:4"),
                                           ("magnitude", "pattern=2:4")])
def test_prune_writes_a_folder_with_the_same_zeros_and_reports_before_and_after(tiny_dir, tmp_path, method, target):
    import lmforge
    from lmforge.transforms.prune import sparsity_report

    out = tmp_path / method
    assert cli.main(["prune", str(tiny_dir), f"output={out}", f"method={method}", target,
                     "calibration_samples=4", "calibration_seq_len=32", *EVAL]) == 0
    report = json.loads((out / "compress.json").read_text())
    model, _ = lmforge.load(out)
    again = sparsity_report(model, report["config"]["pattern"])
    assert again["layers"] == report["sparsity"]["layers"] and len(again["layers"]) == 2 * 7
    assert all(abs(r["sparsity"] - 0.5) < 0.01 for r in again["layers"].values())
    assert report["config"]["pattern"] is None or again["pattern_ok"]
    conf = json.loads((out / "config.json").read_text())["pruning_config"]
    assert conf["method"] == method and len(conf["modules"]) == 2 * 7
    dense = lmforge.load(tiny_dir)[0].state_dict()
    pruned = model.state_dict()
    assert torch.equal(pruned["embed.tokens.weight"], dense["embed.tokens.weight"])  # only block linears pruned
    before, after = report["before"], report["after"]
    assert after["stdlib-ppl"]["bits_per_byte"] != before["stdlib-ppl"]["bits_per_byte"]
    assert after["decode_tokens_per_s"] > 0 and report["seconds"] >= 0


def test_prune_refuses_both_sparsity_and_a_pattern_in_one_line(tiny_dir, tmp_path, capsys):
    assert cli.main(["prune", str(tiny_dir), f"output={tmp_path / 'p'}", "sparsity=0.5", "pattern=2:4"]) == 2
    err = capsys.readouterr().err
    assert "both sparsity (0.5) and pattern ('2:4')" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()


def test_quantize_nf4_writes_a_folder_that_runs_in_the_engine(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    import lmforge
    from lmforge.transforms.quantize import NF4Linear

    out = tmp_path / "nf4"
    assert cli.main(["quantize", str(tiny_dir), f"output={out}", "method=nf4", "bits=4", "embedding=true",
                     *EVAL]) == 0
    report = json.loads((out / "compress.json").read_text())
    assert report["after"]["decode_tokens_per_s"] > 0 and report["after"]["stdlib-ppl"]["bits_per_byte"] > 0
    assert report["after"]["size_bytes"] < 0.3 * report["before"]["size_bytes"]  # 4-bit blocks, int8 embedding
    model, _ = lmforge.load(out)
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 7


def test_a_pipeline_prunes_then_quantizes_and_reports_the_tradeoff(tiny_dir, tmp_path):
    import yaml

    import lmforge
    from lmforge.transforms.prune import sparsity_report

    ev = {"tasks": ["stdlib-ppl"], "limit": 2, "decode_tokens": 4, "repeats": 1}
    spec = {"run_dir": str(tmp_path / "run"), "stages": {
        "prune": {"config": {"model": str(tiny_dir), "method": "magnitude", "pattern": "2:4", "eval": ev}},
        "quantize": {"config": {"model": "${prune.output}", "bits": 8, "group_size": 32, "eval": ev}}}}
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(spec))
    assert cli.main(["pipeline", "--config", str(tmp_path / "p.yaml")]) == 0
    quantized = tmp_path / "run" / "quantize"
    report = json.loads((quantized / "compress.json").read_text())
    assert report["config"]["model"] == str(tmp_path / "run" / "prune")
    model, _ = lmforge.load(quantized)
    assert sparsity_report(model, "2:4")["pattern_ok"]  # int8 codes keep the pruned zeros (0 -> code 0)
    assert cli.main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    section = page.split("<h2>Compression</h2>", 1)[1].split("<h2", 1)[0]
    assert "alt='size and quality'" in section
    assert "<td>prune</td><td>prune</td>" in section and "<td>quantize</td><td>quantize</td>" in section
