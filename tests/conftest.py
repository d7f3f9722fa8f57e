"""Shared test fixtures.

- Nothing may download: timm is told the hub is offline before anything imports it.
- `torch` (fixture): PyTorch with few threads - the test machine has 2 cores shared by many runs.
- `data_dir` (fixture): an empty tfds data_dir per test module (datasets are built into it on first use).
- `highest_precision` (fixture): float32 matmuls at full precision for the duration of one parity test
  only (on accelerators the default precision is lower; other tests keep the default).
- `EVIT_STRICT_SKIPS=1` (set by .ci/run): a test skipped because a module could not be imported
  (`pytest.importorskip`, the `torch` fixture) FAILS instead, so a broken test requirement cannot pass
  green. Without it (a plain `pip install -r requirements.txt`), such tests skip.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# libtpu (a test requirement: evit_jax.aot compiles for TPU slices) otherwise lets only one process
# of the machine load it at a time; the tests run in parallel processes.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pytest  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("EVIT_STRICT_SKIPS") == "1":
        reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
        if "could not import" in reason:
            report.outcome = "failed"
            report.longrepr = f"EVIT_STRICT_SKIPS=1: a required test dependency is missing ({reason})"


@pytest.fixture(scope="session")
def torch():
    torch = pytest.importorskip("torch")
    # Under pytest-xdist two workers already share the two cores.
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)
    return torch


@pytest.fixture
def highest_precision():
    import jax

    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))
