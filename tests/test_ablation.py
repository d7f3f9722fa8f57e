"""Ablation runner: variant parsing/validation, metrics reading, the table, and one real variant trained
through `python -m evit_jax.main` with configs/ablate_attention.py:smoke."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from evit_jax import ablation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "ablate_attention.py")


def test_config_lists_valid_variants():
    config = ablation.load_config_file(CONFIG)
    from evit_jax.models.attention_kernels import split_attention_specs

    sweep = ablation.load_config_file(CONFIG, "get_ablation")
    variants = ablation.validate_variants(split_attention_specs(sweep.variants), config.model.name)
    labels = [v[0] for v in variants]
    assert {"relu_linear", "softmax", "elu_linear", "focused", "cosformer", "relu_linear(scales=(3, 5))",
            "efficientvit_v1_b0@relu_linear"} <= set(labels)
    with pytest.raises(ValueError, match="takes"):
        ablation.load_config_file(CONFIG + ":bogus")


def test_validate_variants_errors():
    with pytest.raises(ValueError, match="unknown attention"):
        ablation.validate_variants(["relu_linear", "nope"], "efficientvit_b0")
    with pytest.raises(ValueError, match="unknown model"):
        ablation.validate_variants(["efficientvit_q9@relu_linear"], "efficientvit_b0")
    with pytest.raises(ValueError, match="twice"):
        ablation.validate_variants(["softmax", "softmax()"], "efficientvit_b0")


def test_read_metrics_and_tables(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "train/images_per_s": 1.0}, {"step": 2, "train/images_per_s": 10.0},
               {"step": 3, "train/images_per_s": 30.0}, {"step": 3, "eval/top1": 50.0, "eval_ema/top1": 40.0}]
    path.write_text("\n".join(json.dumps(r) for r in records))
    m = ablation.read_metrics(str(path))
    assert m == {"top1": 50.0, "top1_ema": 40.0, "train_images_per_s": 20.0}
    assert math.isnan(ablation.read_metrics(str(tmp_path / "missing.jsonl"))["top1"])
    rows = [dict(variant="a|b", model="m", attention="a", params_m=1.0, gmacs_224=0.1, gmacs_1024=2.0, **m,
                 status="ok")]
    csv_path, md_path = ablation.write_tables(rows, str(tmp_path), (224, 1024))
    assert list(csv.DictReader(open(csv_path)))[0]["gmacs_1024"] == "2"
    assert "a\\|b" in open(md_path).read()


def test_model_costs_match_the_paper_convention():
    costs = ablation.model_costs("efficientvit_b1", "relu_linear", 1000, (224,))
    assert costs["gmacs_224"] == pytest.approx(0.52, abs=0.01)  # the paper's B1 figure
    assert costs["params_m"] == pytest.approx(9.1, abs=0.05)
    softmax = ablation.model_costs("efficientvit_b1", "softmax", 1000, (224, 1024))
    linear = ablation.model_costs("efficientvit_b1", "relu_linear", 1000, (1024,))
    assert softmax["gmacs_1024"] > linear["gmacs_1024"]


def test_bad_cli_input_fails_before_work(tmp_path):
    wd = tmp_path / "wd"
    with pytest.raises(FileNotFoundError):
        ablation.main(["--config=configs/none.py", f"--workdir={wd}"])
    with pytest.raises(ValueError, match="per variant"):
        ablation.main([f"--config={CONFIG}:smoke", f"--workdir={wd}", "--config.model.attention=softmax"])
    with pytest.raises(ValueError, match="unknown attention"):
        ablation.main([f"--config={CONFIG}:smoke", f"--workdir={wd}", "--variants=relu_linear,bogus"])
    assert not wd.exists()


def test_one_variant_end_to_end(tmp_path, monkeypatch):
    """Trains one variant with the smoke recipe through the real entry point and writes the table."""
    monkeypatch.setenv("EVIT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(REPO)
    rows = ablation.main([f"--config={CONFIG}:smoke", f"--workdir={tmp_path / 'wd'}", "--variants=cosformer",
                          "--config.total_steps=2", "--config.log_every_steps=1"])
    final = [json.loads(line) for line in open(tmp_path / "wd" / "cosformer" / "metrics.jsonl") if "eval/top1" in line]
    assert rows[0]["status"] == "ok" and rows[0]["train_images_per_s"] > 0
    assert (rows[0]["top1"], rows[0]["top1_ema"]) == (final[-1]["eval/top1"], final[-1]["eval_ema/top1"])
    table = open(tmp_path / "wd" / "ablation.md").read()
    assert "| cosformer | efficientvit_b0 | cosformer |" in table
    assert os.path.exists(tmp_path / "wd" / "cosformer" / "metrics.jsonl")
