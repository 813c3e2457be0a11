"""Run a script under Triton's interpreter (``TRITON_INTERPRET=1``) in a process of its own: the interpreter is
chosen when Triton is imported, so kernels tested on CPU tensors need a fresh interpreter process. The
repository root and tests/ are on the script's path."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_interpreted(script: str) -> subprocess.CompletedProcess:
    """Run `script` with Triton's interpreter (the test is skipped where Triton is not installed); fail with
    the end of its stderr if it fails."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.path.join(root, "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
