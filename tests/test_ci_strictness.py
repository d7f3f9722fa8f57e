"""Under .ci/run (EVIT_STRICT_SKIPS=1) a test skipped for a missing dependency fails, so a broken
test requirement cannot pass green; other skips stay skips, and without the variable nothing changes."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = '''
import pytest

def test_needs_a_missing_module():
    pytest.importorskip("no_such_module_for_evit_jax")

def test_not_applicable():
    pytest.skip("not applicable on this backend")
'''


def _run(tmp_path, strict: bool) -> str:
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("EVIT_STRICT_SKIPS", None)
    if strict:
        env["EVIT_STRICT_SKIPS"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "-c", os.devnull, str(probe)], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    return result.stdout.strip().splitlines()[-1]


def test_missing_dependency_fails_under_ci(tmp_path):
    assert _run(tmp_path, strict=True).startswith("1 failed, 1 skipped")


def test_missing_dependency_skips_otherwise(tmp_path):
    assert _run(tmp_path, strict=False).startswith("2 skipped")
