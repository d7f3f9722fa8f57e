"""`python -m tests._train_main ...` = `python -m evit_jax.main ...` with the tiny test model
registered (see tests/_train_helpers.py).

``EVIT_TEST_SIGTERM_AFTER_SAVE=N``: the process sends itself SIGTERM right after it starts the
periodic checkpoint save of step N, so that the preemption lands deterministically on a step
that is already saved (tests/test_checkpoint.py).
``EVIT_TEST_SIGKILL_AT_STEP=N``: the process SIGKILLs itself once step N is logged, after the
checkpoint saves in flight have completed, so that the kill lands deterministically between two
saved steps however fast the steps are (tests/test_detection_task.py).
``EVIT_TEST_EVAL_RECORDS=DIR``: the classification task returns per-example eval records and
saves them to DIR (`_train_helpers.record_classification_eval`, tests/test_eval_records.py)."""

import os
import signal

from tests._train_helpers import record_classification_eval, register_tiny_model


def _sigterm_after_save(step: int) -> None:
    from evit_jax.train import checkpoint as ckpt_lib

    save = ckpt_lib.Checkpointer.save

    def save_then_sigterm(self, at_step, *args, **kwargs):
        saved = save(self, at_step, *args, **kwargs)
        if saved and at_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return saved

    ckpt_lib.Checkpointer.save = save_then_sigterm


def _sigkill_at_step(step: int) -> None:
    from evit_jax.train import checkpoint as ckpt_lib
    from evit_jax.train import metrics_log

    checkpointers = []
    save, log_line = ckpt_lib.Checkpointer.save, metrics_log.log_line

    def remembering_save(self, *args, **kwargs):
        checkpointers.append(self)
        return save(self, *args, **kwargs)

    def log_line_then_sigkill(at_step, *args, **kwargs):
        log_line(at_step, *args, **kwargs)
        if at_step == step:
            for checkpointer in checkpointers:
                checkpointer.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt_lib.Checkpointer.save = remembering_save
    metrics_log.log_line = log_line_then_sigkill


if __name__ == "__main__":
    register_tiny_model()
    if os.environ.get("EVIT_TEST_SIGTERM_AFTER_SAVE"):
        _sigterm_after_save(int(os.environ["EVIT_TEST_SIGTERM_AFTER_SAVE"]))
    if os.environ.get("EVIT_TEST_SIGKILL_AT_STEP"):
        _sigkill_at_step(int(os.environ["EVIT_TEST_SIGKILL_AT_STEP"]))
    if os.environ.get("EVIT_TEST_EVAL_RECORDS"):
        record_classification_eval(os.environ["EVIT_TEST_EVAL_RECORDS"])
    from evit_jax import main

    main.run()
