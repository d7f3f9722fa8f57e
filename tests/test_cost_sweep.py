"""Cost sweep: CSV + PNG written, slopes fitted, OOM reported (not raised), bad input rejected early."""

from __future__ import annotations

import csv
import math
import os

import pytest

from evit_jax.models.attention_kernels import split_attention_specs
from evit_jax.tools import cost_sweep


def test_split_specs_keeps_commas_inside_parentheses():
    assert split_attention_specs("relu_linear, focused(power=2, scales=(3, 5)),softmax") == [
        "relu_linear", "focused(power=2, scales=(3, 5))", "softmax"]


def test_fit_slope_recovers_exponent():
    rows = [cost_sweep.CostRow("v", "block", r, (r // 32) ** 2, "ok", latency_ms=3.0 * ((r // 32) ** 2) ** 1.5)
            for r in (256, 512, 1024)]
    assert cost_sweep.fit_slope(rows) == pytest.approx(1.5)
    assert cost_sweep.fit_slope(rows, min_resolution=512) == pytest.approx(1.5)
    assert math.isnan(cost_sweep.fit_slope(rows, min_resolution=1024))


def test_sweep_writes_csv_png_and_reports_oom(tmp_path, capsys):
    out = tmp_path / "sweep"
    # 1 MiB of headroom over the 64-px point: the softmax block at 256 px (64 tokens) is over the limit.
    slopes = cost_sweep.main(["--sweep-resolution", "64,128,256", "--attention", "relu_linear,softmax(scales=())",
                              "--repeats", "2", "--memory-limit-gb", str(4.4 / 1024), "--fit-min-resolution", "0",
                              "--out-dir", str(out)])
    rows = list(csv.DictReader(open(out / "cost_sweep.csv")))
    assert len(rows) == 6 and os.path.getsize(out / "cost_sweep.png") > 10_000
    status = {(r["variant"], int(r["resolution"])): r["status"] for r in rows}
    assert status[("relu_linear", 64)] == "ok"
    assert "OOM" in status.values()
    assert all(float(r["peak_memory_mb"]) > 0 for r in rows)
    assert set(slopes) == {"relu_linear", "softmax(scales=())"}
    assert "slope relu_linear" in capsys.readouterr().out


def test_whole_model_target(tmp_path):
    row = cost_sweep.measure_point("relu_linear", "model", 64, model_name="efficientvit_b0", repeats=1)
    assert row.status == "ok" and row.latency_ms > 0 and row.tokens == 64 * 64


def test_xla_oom_error_is_a_result(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 99GiB")
    monkeypatch.setattr(cost_sweep, "random_variables", boom)
    row = cost_sweep.measure_point("softmax", "block", 64, repeats=1)
    assert row.status == "OOM" and "RESOURCE_EXHAUSTED" in row.note


@pytest.mark.parametrize("argv,message", [
    (["--sweep-resolution", "100"], "multiples of 32"),
    (["--sweep-resolution", "a,b"], "comma-separated integers"),
    (["--attention", "nope"], "unknown attention"),
    (["--attention", "softmax(p=1)"], "has no option"),
    (["--target", "model", "--model", "efficientvit_zz"], "unknown model"),
])
def test_bad_input_fails_before_work(tmp_path, argv, message):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=message):
        cost_sweep.main(argv + ["--out-dir", str(out)])
    assert not out.exists()
