"""The quickstart as a new user runs it: a fresh clone of this repository's HEAD, `bash scripts/quickstart.sh` in it
(set-up of a new .venv included; the alignment data built afresh in an empty $LMFORGE_CACHE), timed end to end.
Records the wall time of set-up and of each stage, every bar of recipes/quickstart.yaml with its verdict, and the
served model's answers. pip's download cache is this machine's (a machine that never installed these packages
downloads them too; that time is not in the figure).

    python benchmarks/quickstart.py [--work DIR]   # 12-22 minutes; writes results/quickstart.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SCRATCH, Record, add_out_argument


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(SCRATCH / "quickstart"), help="folder for the clone (emptied first)")
    add_out_argument(ap)
    args = ap.parse_args(argv)
    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    rec = Record("quickstart", args, sizes={"recipe": "recipes/quickstart.yaml"})
    clone = work / "lmforge"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["LMFORGE_CACHE"] = str(work / "cache")  # {align} is built as on a new machine
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if ".venv" not in p)
    log = work / "quickstart.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(["bash", "scripts/quickstart.sh"], cwd=clone, env=env, stdout=f,
                              stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    run = clone / "runs" / "quickstart"
    pipe = json.loads((run / "pipeline.json").read_text()) if (run / "pipeline.json").exists() else {}
    served = json.loads((run / "serve" / "serve.json").read_text()) if (run / "serve" / "serve.json").exists() else {}
    stages = [{"name": s["name"], "verb": s["verb"], "seconds": s.get("seconds"), "status": s["status"]}
              for s in pipe.get("stages", [])]
    pipeline_s = sum(s["seconds"] or 0 for s in stages)
    tail = log.read_text(errors="replace").splitlines()[-40:]
    result = {"exit_code": code, "wall_s": round(wall, 1), "setup_s": round(wall - float(pipe.get("seconds", 0)), 1),
              "pipeline_s": pipe.get("seconds"), "stages_s": round(pipeline_s, 1), "stages": stages,
              "bars": pipe.get("bars", []), "served": served.get("checks", []), "closing_lines": tail}
    rec.write(result)
    print("\n".join(tail))
    return 0 if code == 0 and result["bars"] and all(b["pass"] for b in result["bars"]) else 1


if __name__ == "__main__":
    sys.exit(main())
