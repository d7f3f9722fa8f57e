"""evit_jax.main refuses bad input with one clear line before doing any work."""

import os
import subprocess
import sys


from tests import _train_helpers as h


def _fails(workdir, data_dir, *overrides, devices=1, config="configs/demo.py:smoke"):
    result = h.run_main(workdir, data_dir, *overrides, devices=devices, tiny=False, config=config)
    assert result.returncode != 0, result.stderr[-2000:]
    assert not os.path.exists(workdir), "the workdir was written before the error"
    return h.last_error_line(result)


def test_unknown_model(tmp_path, data_dir):
    line = _fails(str(tmp_path / "w"), data_dir, "--config.model.name=efficientvit_b9")
    assert line.startswith("error:") and "efficientvit_b9" in line, line


def test_batch_not_divisible_by_devices(tmp_path, data_dir):
    line = _fails(str(tmp_path / "w"), data_dir, "--config.global_batch_size=6", devices=4)
    assert line.startswith("error:") and "6" in line and "4 devices" in line, line


def test_dataset_not_found(tmp_path, data_dir):
    line = _fails(str(tmp_path / "w"), str(tmp_path / "empty"), "--config.data.name=imagenet2012",
                  "--config.data.eval_split=validation")
    assert line.startswith("error:") and "imagenet2012" in line and "tfds build" in line, line


def test_misspelt_key_on_command_line(tmp_path, data_dir):
    line = _fails(str(tmp_path / "w"), data_dir, "--config.optim.lrr=0.1")
    assert "lrr" in line, line


def test_misspelt_key_in_config_file(tmp_path, data_dir):
    cfg = tmp_path / "typo.py"
    cfg.write_text("from configs import demo\n\ndef get_config(arg=''):\n"
                   "    c = demo.get_config('smoke')\n    c.optim.learning_rate = 0.1\n    return c\n")
    line = _fails(str(tmp_path / "w"), data_dir, config=str(cfg))
    assert "learning_rate" in line, line


def test_bad_mode_and_missing_init_from(tmp_path, data_dir):
    line = _fails(str(tmp_path / "w"), data_dir, "--config.mode=predict")
    assert line.startswith("error:") and "mode" in line, line
    line = _fails(str(tmp_path / "w"), data_dir, "--config.init_from=/nonexistent/b0.pt")
    assert line.startswith("error:") and "/nonexistent/b0.pt" in line, line


def test_explicit_distributed_flags_must_come_together(tmp_path, data_dir):
    result = subprocess.run([sys.executable, "-m", "evit_jax.main", "--config=configs/demo.py:smoke",
                             f"--workdir={tmp_path / 'w'}", "--num_processes=2"],
                            cwd=h.REPO, env=h.env_for(1), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "must be given together" in h.last_error_line(result)


# ---------------------------------------------------------------------------- command-line mistakes
def _usage_error(tmp_path, *args):
    """Runs `python -m evit_jax.main ARGS`: it must end with exactly one line on stderr,
    "error: ...", exit code 2, and write nothing."""
    workdir = tmp_path / "w"
    args = [a.replace("WORKDIR", str(workdir)) for a in args]
    result = subprocess.run([sys.executable, "-m", "evit_jax.main", *args], cwd=h.REPO, env=h.env_for(1),
                            capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    assert not workdir.exists(), "the workdir was written before the error"
    return lines[0]


SMOKE = "--config=configs/demo.py:smoke"


def test_unknown_config_key_suggests_the_close_one(tmp_path):
    line = _usage_error(tmp_path, SMOKE, "--workdir=WORKDIR", "--config.totl_steps=5")
    assert line.startswith("error: --config.totl_steps: no such config key; did you mean --config.total_steps?"), line


def test_config_value_of_the_wrong_type(tmp_path):
    line = _usage_error(tmp_path, SMOKE, "--workdir=WORKDIR", "--config.total_steps=abc")
    assert "--config.total_steps=abc" in line and "int" in line, line
    line = _usage_error(tmp_path, SMOKE, "--workdir=WORKDIR", "--config.data.image_sizes=2O0")
    assert "--config.data.image_sizes=2O0" in line and "sequence of int" in line, line


def test_missing_config_or_workdir(tmp_path):
    line = _usage_error(tmp_path, "--workdir=WORKDIR")
    assert "--config is required" in line, line
    line = _usage_error(tmp_path, SMOKE)
    assert "--workdir is required" in line, line


def test_unknown_flag_and_stray_argument(tmp_path):
    line = _usage_error(tmp_path, SMOKE, "--workdirr=WORKDIR")
    assert "--workdirr: unknown flag; did you mean --workdir?" in line, line
    line = _usage_error(tmp_path, SMOKE, "--workdir=WORKDIR", "configs/demo.py")
    assert "unexpected argument" in line and "configs/demo.py" in line, line


def test_config_file_errors(tmp_path):
    line = _usage_error(tmp_path, "--config=configs/imagenet.py:b9", "--workdir=WORKDIR")
    assert "--config=configs/imagenet.py:b9" in line and "got 'b9'" in line and "ValueError" in line, line
    line = _usage_error(tmp_path, "--config=configs/nonexistent.py", "--workdir=WORKDIR")
    assert "no such config file" in line, line
