"""Checkpoints end to end (subprocesses of evit_jax.main with the tiny test model):
exact resume after SIGKILL, SIGTERM -> save and clean exit (also at a step just saved), a
crash during a save, starting a finished run again (also one killed before its final
evaluation), and the workdir/model guard."""

import os
import shutil
import signal
import subprocess

import numpy as np
import pytest

from tests import _train_helpers as h

STEPS = 12


def _overrides(*extra):
    return (f"--config.total_steps={STEPS}", "--config.checkpoint.every_steps=3",
            "--config.mix.mixup_alpha=0.5", "--config.mix.cutmix_alpha=0.5", *extra)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run of STEPS steps: (workdir, completed process)."""
    ref = str(tmp_path_factory.mktemp("ref") / "ref")
    result = h.run_main(ref, data_dir, *_overrides())
    assert result.returncode == 0, result.stderr[-3000:]
    return ref, result


def _assert_same_run(ref, work):
    """Same final state (bitwise), same train losses and final evaluation as the reference."""
    ref_state, got_state = h.restore_raw_state(ref), h.restore_raw_state(work)
    assert int(got_state["step"]) == STEPS
    h.assert_trees_equal(ref_state, got_state)  # params, BN stats, Adam moments, EMA, rng: bitwise
    ref_m, got_m = h.read_metrics(ref), h.read_metrics(work)
    for step in range(1, STEPS + 1):
        assert got_m[step]["train/loss"] == ref_m[step]["train/loss"], step
    assert got_m[STEPS]["eval/top1"] == ref_m[STEPS]["eval/top1"]
    assert got_m[STEPS]["eval_ema/top1"] == ref_m[STEPS]["eval_ema/top1"]


def test_resume_after_sigkill_is_exact(tmp_path, data_dir, reference):
    ref, _ = reference
    work = str(tmp_path / "killed")
    # Killed after step 8 is logged: between checkpoints (every 3 steps), possibly mid-save.
    proc = subprocess.Popen(h.main_command(work, data_dir, *_overrides()), cwd=h.REPO, env=h.env_for(1),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        h.wait_for_step(work, 8, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = max(h.read_metrics(work))
    assert killed_at < STEPS, "the run finished before it was killed"
    resumed = h.run_main(work, data_dir, *_overrides())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step" in resumed.stderr
    _assert_same_run(ref, work)


def test_sigterm_at_a_step_just_saved_exits_cleanly_and_resumes(tmp_path, data_dir, reference):
    # The run sends itself SIGTERM right after the periodic save of step 6 (tests/_train_main.py),
    # so it stops at a step that is already saved: the preemption save must skip it.
    work = str(tmp_path / "term_after_save")
    result = h.run_main(work, data_dir, *_overrides(), extra_env={"EVIT_TEST_SIGTERM_AFTER_SAVE": "6"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "preempted=True" in result.stdout and "step=6 " in result.stdout, result.stdout
    assert int(h.restore_raw_state(work)["step"]) == 6
    resumed = h.run_main(work, data_dir, *_overrides())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from the checkpoint of step 6" in resumed.stderr
    _assert_same_run(reference[0], work)


def test_starting_a_finished_run_again_reports_its_result(tmp_path, data_dir, reference):
    ref, first = reference
    work = str(tmp_path / "again")
    shutil.copytree(ref, work)
    logged = open(os.path.join(work, "metrics.jsonl")).read()
    again = h.run_main(work, data_dir, *_overrides())
    assert again.returncode == 0, again.stderr[-3000:]
    assert h.final_line(again) == h.final_line(first)
    # Nothing trained, nothing compiled (what made the restart slow), nothing written.
    assert "Compiled" not in again.stderr, again.stderr[-3000:]
    assert open(os.path.join(work, "metrics.jsonl")).read() == logged
    assert h.restore_raw_state(work)["step"] == STEPS


def test_finished_run_killed_before_its_final_evaluation_only_evaluates(tmp_path, data_dir, reference):
    ref, first = reference
    work = str(tmp_path / "no_final_eval")
    shutil.copytree(ref, work)
    path = os.path.join(work, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    assert '"eval/top1"' in lines[-1] and '"step": %d,' % STEPS in lines[-1]  # the final evaluation
    # Killed while writing it: the line is cut short (no newline).
    open(path, "w").write("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    result = h.run_main(work, data_dir, *_overrides())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compiled eval step" in result.stderr and "Compiled train step" not in result.stderr
    assert h.final_line(result) == h.final_line(first)
    assert h.read_metrics(work)[STEPS] == h.read_metrics(ref)[STEPS]  # same checkpoint, same evaluation
    # ... and the run is now complete: started again, it only reports.
    again = h.run_main(work, data_dir, *_overrides())
    assert again.returncode == 0 and "Compiled" not in again.stderr
    assert h.final_line(again) == h.final_line(first)


def test_checkpoint_past_the_schedule_is_refused(tmp_path, data_dir, reference):
    work = str(tmp_path / "past")
    shutil.copytree(reference[0], work)
    before = sorted(os.listdir(work))
    result = h.run_main(work, data_dir, *_overrides("--config.total_steps=6"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = h.last_error_line(result)
    assert line.startswith("error:") and f"step {STEPS}" in line and "--config.mode=eval" in line, line
    assert sorted(os.listdir(work)) == before


def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
    work = str(tmp_path / "term")
    proc = subprocess.Popen(h.main_command(work, data_dir, "--config.total_steps=400",
                                           "--config.checkpoint.every_steps=1000"),
                            cwd=h.REPO, env=h.env_for(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        h.wait_for_step(work, 3, proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "preempted=True" in out
    state = h.restore_raw_state(work)
    step = int(state["step"])
    assert 3 <= step < 400
    assert step == max(h.read_metrics(work))  # saved exactly where it stopped


def test_crash_during_save_keeps_last_complete_checkpoint(tmp_path, data_dir):
    work = str(tmp_path / "crash")
    result = h.run_main(work, data_dir, "--config.total_steps=4", "--config.checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = os.path.join(work, "checkpoints")
    saved = h.restore_raw_state(work, 4)  # readable before the crash
    # A save that died half-way: Orbax writes into "<step>.orbax-checkpoint-tmp" and renames
    # only when complete. Fake such a leftover (a copy with its state partly written).
    partial = os.path.join(ckpt, "6.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ckpt, "4"), partial)
    for root, _, files in os.walk(os.path.join(partial, "state")):
        for name in files[: len(files) // 2]:
            os.remove(os.path.join(root, name))
    from evit_jax.train import checkpoint as ckpt_lib
    assert ckpt_lib.latest_complete_step(work) == 4
    # Resuming (to 6 steps) starts from the complete checkpoint 4 and overwrites the debris.
    result = h.run_main(work, data_dir, "--config.total_steps=6", "--config.checkpoint.every_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Resuming from the checkpoint of step 4" in result.stderr
    assert int(h.restore_raw_state(work, 6)["step"]) == 6
    del saved


def test_workdir_of_another_model_is_refused(tmp_path, data_dir):
    work = str(tmp_path / "other")
    result = h.run_main(work, data_dir, "--config.total_steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    before = sorted(os.listdir(work))
    result = h.run_main(work, data_dir, "--config.total_steps=2", tiny=False)  # efficientvit_b0
    assert result.returncode != 0
    line = h.last_error_line(result)
    assert "holds a checkpoint" in line and "tiny_test_cnn" in line and "efficientvit_b0" in line, line
    assert sorted(os.listdir(work)) == before
