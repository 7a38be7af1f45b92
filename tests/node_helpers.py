"""Callbacks that the multi-node and outage tests add with ``--trainer.callbacks+=tests.node_helpers.<Name>``:
they hold one process at a chosen step, as a lost node or a slow fit would."""

import time
from pathlib import Path

import lightning as L


class StopAt(L.Callback):
    """At the end of training step ``step`` (or the first call past it) on global rank ``rank``:
    writes ``stopped`` in the working folder and sleeps, so that the test kills the node there."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank, self.done = step, rank, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # `>=`, once: a streamed fit may take several steps per call (a chunk of batches)
        if self.done or trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        self.done = True
        Path("stopped").write_text(str(trainer.global_step))
        time.sleep(3600)


class SlowSteps(L.Callback):
    """Sleeps ``seconds`` after every training step and writes the step reached to ``step`` in the
    working folder, so that a test can act while the fit is at a known point."""

    def __init__(self, seconds: float = 0.2) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        Path("step").write_text(str(trainer.global_step))
        time.sleep(self.seconds)
