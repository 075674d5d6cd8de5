"""Keeps the GPU tests runnable: their smallest case of each family runs here on CPU in dry-run mode
(EP_COMM_TEST_DRY_RUN=1: the reference backend stands in for the kernels, see tests/gpu/common.py).
This checks the tests' own plumbing (arguments, tuple arity, shapes, handles, hooks), not the
kernels, so a scarce GPU session is not spent on a broken test."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

CASES = [
    "tests/gpu/test_intranode.py::test_intranode_matches_reference[2]",
    "tests/gpu/test_low_latency.py::test_low_latency_against_reference[2]",
    "tests/gpu/test_internode.py::test_internode_matches_reference[4-2]",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(os.environ.get("EP_COMM_TEST_DRY_RUN", "0") not in ("", "0"), reason="already a dry run")
def test_gpu_tests_pass_in_dry_run():
    env = dict(os.environ, EP_COMM_TEST_DRY_RUN="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CASES], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "3 passed" in result.stdout, result.stdout[-2000:]
