"""`lmforge pipeline` and `lmforge report` end to end at tiny sizes: every stage of the quickstart's path
(tokenizer -> prepare -> pretrain -> SFT -> DPO -> evaluate -> serve check) in one run directory; a re-run skips
finished stages, --from re-runs, a failing stage is named and earlier artifacts stay; the report holds every
stage's curves and tables."""

from __future__ import annotations

import base64
import html.parser
import inspect
import json
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import yaml

from lmforge import cli

STDLIB = Path(sysconfig.get_paths()["stdlib"])
FILES = ["json", "textwrap.py", "shlex.py", "base64.py", "string.py", "fnmatch.py", "heapq.py", "bisect.py",
         "colorsys.py", "glob.py", "copy.py", "fractions.py"]


def _pairs(path: Path) -> Path:
    """Real preference pairs: "What does textwrap.dedent do?" -> its docstring's first line vs another's."""
    import bisect
    import heapq
    import textwrap

    facts = [(f"{m.__name__}.{n}", (inspect.getdoc(f) or "").splitlines()[0])
             for m in (textwrap, heapq, bisect) for n, f in sorted(vars(m).items())
             if inspect.isfunction(f) and not n.startswith("_") and inspect.getdoc(f)]
    rows = [{"prompt": f"What does {name} do?", "chosen": doc, "rejected": facts[(i + 3) % len(facts)][1]}
            for i, (name, doc) in enumerate(facts) if doc != facts[(i + 3) % len(facts)][1]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(steps: int, **extra) -> dict:
    return {"steps": steps, "micro_batch": 4, "log_every": 1, "eval_every": steps, "eval_batches": 2,
            "save_every": steps, "tensorboard": False, "progress_bar": False, "precision": "fp32", "device": "cpu",
            "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 0}, **extra}


def pipeline_yaml(tmp: Path, **stage_over) -> Path:
    files = [str(STDLIB / f) for f in FILES]
    stages = {
        "tokenizer": {"config": {"inputs": files, "kind": "bpe", "vocab_size": 600, "heldout_fraction": 0.2}},
        "data": {"verb": "prepare", "config": {"inputs": files, "tokenizer": "${tokenizer.output}",
                                               "validation_fraction": 0.2}},
        "pretrain": {"config": {"model": {"preset": "llama-tiny"}, "data": {"train": ["${data.output}"],
                                                                            "seq_len": 64}, "train": _train(4)}},
        "sft": {"verb": "finetune", "config": {"task": "sft", "method": "full",
                                               "model": {"init_from": "${pretrain.output}"},
                                               "data": {"train": files[:4], "format": "python_functions",
                                                        "validation_fraction": 0.2, "max_length": 96},
                                               "train": _train(3)}},
        "dpo": {"config": {"loss": "dpo", "method": "lora", "model": {"init_from": "${sft.output}"},
                           "data": {"train": [str(_pairs(tmp / "pairs.jsonl"))], "max_length": 64,
                                    "validation_fraction": 0.3},
                           "lora": {"rank": 4, "alpha": 8}, "train": _train(3, eval_at_start=True)}},
        "evaluate": {"config": {"model": "${dpo.output}", "tasks": ["stdlib-ppl", "stdlib-mc", "humaneval"],
                                "limit": 2, "max_length": 64, "max_new_tokens": 8, "chat": True}},
        "merge": {"verb": "convert", "config": {"src": "${dpo.output}", "dtype": "bfloat16"}},
        "serve": {"config": {"model": "${merge.output}", "port": 0, "check": "Say hi.", "check_max_tokens": 4,
                             "log_level": "warning"}},
    }
    for name, cfg in stage_over.items():
        stages[name]["config"].update(cfg)
    bars = [{"stage": "evaluate", "what": "bits per byte below 100", "below": 100,
             "value": "evaluate/eval.json:tasks.stdlib-ppl.bits_per_byte"},
            {"stage": "serve", "what": "the check answered", "value": "serve/serve.json:accepted", "above": 1},
            {"stage": "dpo", "what": "a number no stage writes", "value": "dpo/eval.json:nothing.here", "above": 0}]
    path = tmp / "pipe.yaml"
    path.write_text(yaml.safe_dump({"run_dir": str(tmp / "run"), "stages": stages, "bars": bars}, sort_keys=False))
    return path


def _markers(run: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in run.glob("*/stage.json")}


@pytest.fixture(scope="module")
def piped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    path = pipeline_yaml(tmp)
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    return tmp, path


def test_bars_are_checked_at_the_end_and_a_missing_number_fails_its_bar(piped):
    tmp, _ = piped
    run = tmp / "run"
    bars = json.loads((run / "pipeline.json").read_text())["bars"]
    assert [b["pass"] for b in bars] == [True, True, False]
    ppl = json.loads((run / "evaluate" / "eval.json").read_text())["tasks"]["stdlib-ppl"]["bits_per_byte"]
    assert bars[0]["value"] == ppl and bars[0]["reference"] == 100
    assert "no 'nothing.here'" in bars[2]["error"]
    served = json.loads((run / "serve" / "serve.json").read_text())  # the check's question, reply and verdict
    assert served["accepted"] == 1 and served["checks"][0]["ask"] == "Say hi." and served["checks"][0]["accepted"]


def test_every_stage_runs_and_hands_on_its_output(piped, capsys):
    tmp, _ = piped
    run = tmp / "run"
    marks = _markers(run)
    assert [s["name"] for s in json.loads((run / "pipeline.json").read_text())["stages"]] == [
        "tokenizer", "data", "pretrain", "sft", "dpo", "evaluate", "merge", "serve"]
    assert {m["status"] for m in marks.values()} == {"done"}
    assert (run / "tokenizer" / "tokenizer.json").exists() and (run / "pretrain" / "final" / "config.json").exists()
    # references resolved to the earlier stage's output, and recorded as the stage's parents (lineage)
    assert marks["sft"]["config"]["model"]["init_from"] == str(run / "pretrain" / "final")
    assert marks["dpo"]["parents"] == {"sft": str(run / "sft" / "final")}
    assert json.loads((run / "sft" / "final" / "lmforge.json").read_text())["parent"] == str(run / "pretrain" / "final")
    ev = json.loads((run / "evaluate" / "eval.json").read_text())
    assert set(ev["tasks"]) == {"stdlib-ppl", "stdlib-mc", "humaneval"}
    assert "bits_per_byte" in ev["tasks"]["stdlib-ppl"] and "pass@k" in ev["tasks"]["humaneval"]
    merged = json.loads((run / "merge" / "config.json").read_text())
    assert merged.get("torch_dtype", merged.get("dtype")) == "bfloat16"
    assert marks["serve"]["config"]["model"] == str(run / "merge")


def test_a_rerun_skips_finished_stages_and_from_reruns(piped, capsys):
    tmp, path = piped
    run = tmp / "run"
    before = _markers(run)
    capsys.readouterr()
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("finished before with this config and inputs: skipped") == 8
    assert {n: m["run_id"] for n, m in _markers(run).items()} == {n: m["run_id"] for n, m in before.items()}
    assert cli.main(["pipeline", "--config", str(path), "--from", "dpo"]) == 0
    after = _markers(run)
    for name in ("tokenizer", "data", "pretrain", "sft"):
        assert after[name]["run_id"] == before[name]["run_id"]
    for name in ("dpo", "evaluate", "merge", "serve"):
        assert after[name]["run_id"] != before[name]["run_id"]


def test_a_changed_config_reruns_that_stage_and_what_depends_on_it(piped, tmp_path):
    tmp, _ = piped
    shutil.copytree(tmp / "run", tmp_path / "run")  # a moved run folder keeps its finished stages
    shutil.copy(tmp / "pairs.jsonl", tmp_path / "pairs.jsonl")
    path = pipeline_yaml(tmp_path, evaluate={"tasks": ["stdlib-ppl"]})
    path.write_text(path.read_text().replace(str(tmp_path / "pairs.jsonl"), str(tmp / "pairs.jsonl")))
    before = _markers(tmp_path / "run")
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    after = _markers(tmp_path / "run")
    assert [n for n in after if after[n]["run_id"] != before[n]["run_id"]] == ["evaluate"]
    path = pipeline_yaml(tmp_path, evaluate={"tasks": ["stdlib-ppl"]}, sft={"train": _train(2)})
    path.write_text(path.read_text().replace(str(tmp_path / "pairs.jsonl"), str(tmp / "pairs.jsonl")))
    assert cli.main(["pipeline", "--config", str(path)]) == 0
    again = _markers(tmp_path / "run")
    assert sorted(n for n in again if again[n]["run_id"] != after[n]["run_id"]) == [
        "dpo", "evaluate", "merge", "serve", "sft"]


def test_a_failing_stage_is_named_and_earlier_artifacts_stay(piped, tmp_path, capsys):
    tmp, _ = piped
    shutil.copytree(tmp / "run", tmp_path / "run")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "chosen": "a"}\n')
    path = pipeline_yaml(tmp_path, dpo={"data": {"train": [str(tmp_path / "bad.jsonl")], "max_length": 64}})
    capsys.readouterr()
    assert cli.main(["pipeline", "--config", str(path)]) != 0
    err = capsys.readouterr().err
    assert "stage 5/8 'dpo' (dpo) failed" in err and "missing 'rejected'" in err
    marks = _markers(tmp_path / "run")
    assert marks["dpo"]["status"] == "failed" and marks["sft"]["status"] == "done"
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "pipeline.json").read_text())["status"] == "failed"
    # a reference to a later or unknown stage is a config error naming the key
    bad = pipeline_yaml(tmp_path, sft={"model": {"init_from": "${dpo.output}"}})
    assert cli.main(["pipeline", "--config", str(bad)]) == 2
    assert "stages.sft.config.model.init_from: ${dpo.output} refers to no earlier stage" in capsys.readouterr().err


def test_an_interrupted_training_stage_resumes_from_its_checkpoint(piped, tmp_path, capsys):
    tmp, _ = piped
    shutil.copytree(tmp / "run", tmp_path / "run")
    shutil.copy(tmp / "pairs.jsonl", tmp_path / "pairs.jsonl")
    run = tmp_path / "run"
    marker = run / "pretrain" / "stage.json"
    state = json.loads(marker.read_text())
    marker.write_text(json.dumps({**state, "status": "interrupted"}))  # as after Ctrl-C: checkpoints kept
    shutil.rmtree(run / "pretrain" / "final")
    rows = (run / "pretrain" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert cli.main(["pipeline", "--config", str(pipeline_yaml(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "'pretrain' (pretrain) resuming" in out and "finished before" in out  # tokenizer, data skipped
    assert (run / "pretrain" / "metrics.jsonl").read_text().startswith(rows)  # kept, not started again
    assert (run / "pretrain" / "final" / "model.safetensors").exists()
    after, first = _markers(run), _markers(tmp / "run")
    assert after["pretrain"]["status"] == "done" and after["data"]["run_id"] == first["data"]["run_id"]
    assert after["sft"]["run_id"] != first["sft"]["run_id"]  # its input was made again


class _Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []
        self.h2: list[str] = []
        self.cells: list[str] = []
        self.external: list[str] = []
        self._tag = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._tag = tag
        if tag == "img":
            self.images.append((a.get("alt", ""), a.get("src", "")))
        if tag in ("script", "link") or (tag == "img" and not a.get("src", "").startswith("data:")):
            self.external.append(tag)

    def handle_data(self, data):
        if self._tag == "h2":
            self.h2.append(data.strip())
        if self._tag in ("td", "th"):
            self.cells.append(data.strip())


def test_report_holds_every_stages_curves_and_tables(piped, capsys):
    tmp, _ = piped
    run = tmp / "run"
    capsys.readouterr()
    assert cli.main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "pretrain" in out and "stdlib-ppl · bits_per_byte" in out and "val_loss" in out
    page = _Page()
    page.feed((run / "report.html").read_text())
    assert not page.external  # self-contained
    for name in ("tokenizer", "data", "pretrain", "sft", "dpo", "evaluate", "merge", "serve"):
        assert name in page.h2
    curves = {alt: src for alt, src in page.images}
    assert set(curves) == {"pretrain curves", "sft curves", "dpo curves"}
    for src in curves.values():
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "val_rewards/accuracy" in page.cells and "humaneval · pass@1" in page.cells  # before/after, tasks
    assert "What each stage achieved (2 of 3 bars met)" in page.h2 and "a number no stage writes" in page.cells
    assert "bar met? NO " in out
    assert any(c.startswith('"sft"') or "sft/final" in c for c in page.cells)  # lineage


@pytest.mark.slow
def test_report_renders_in_headless_chromium(piped, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    tmp, _ = piped
    run = tmp / "run"
    assert cli.main(["report", str(run)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2400", (run / "report.html").resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    from PIL import Image

    img = Image.open(shot).convert("L")
    lo, hi = img.getextrema()
    assert hi - lo > 100  # not blank: text and plots drawn
    colors = len(set(img.resize((300, 600)).getdata()))
    assert colors > 20


@pytest.mark.slow
def test_quickstart_meets_every_bar(tmp_path):
    """recipes/quickstart.yaml end to end (about 12 minutes on 2 cores with native bf16, 22 without): every
    stage done and every bar of the quickstart met (curation, pretraining against xz, SFT and DPO on held-out data,
    quantization, three served answers), the report written."""
    recipe = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
    run = tmp_path / "quickstart"
    assert cli.main(["pipeline", "--config", str(recipe), f"run_dir={run}"]) == 0
    pipe = json.loads((run / "pipeline.json").read_text())
    assert pipe["status"] == "done" and all(s["status"] == "done" for s in pipe["stages"])
    bars = pipe["bars"]
    assert {b["stage"] for b in bars} == {"curate", "pretrain", "sft", "dpo", "quantize", "serve"}
    assert [b["what"] for b in bars if not b["pass"]] == []
    served = json.loads((run / "serve" / "serve.json").read_text())
    assert served["accepted"] == served["questions"] == 3
    assert cli.main(["report", str(run)]) == 0 and (run / "report.html").stat().st_size > 50_000
