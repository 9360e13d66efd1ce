"""Running untrusted (model-generated) Python: OS isolation, seccomp, rlimits and an audit hook, with verdicts from a
separate judge process. Floor 0: imports nothing of lmforge."""

from .isolation import available, best
from .run import CodeTest, SandboxLimits, SandboxResult, run_many, run_python, run_tests

__all__ = ["CodeTest", "SandboxLimits", "SandboxResult", "run_python", "run_tests", "run_many", "available", "best"]
