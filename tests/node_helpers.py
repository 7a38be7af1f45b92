"""Callbacks that the multi-node and outage tests add with ``--trainer.callbacks+=tests.node_helpers.<Name>``:
they hold or kill one process at a chosen step, as a lost node, a killed worker or a slow fit would."""

import os
import signal
import time
from pathlib import Path

import lightning as L


class StopAt(L.Callback):
    """At the end of training step ``step`` (or the first call past it) on global rank ``rank``:
    ``pause`` writes ``stopped`` in the working folder and sleeps, so that the test kills the node
    there; ``kill`` writes ``killed`` and SIGKILLs this process, on torchrun's first attempt only
    (the restarted group runs on)."""

    def __init__(self, step: int, rank: int = 1, action: str = "pause") -> None:
        self.step, self.rank, self.action, self.done = step, rank, action, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # `>=`, once: a streamed fit may take several steps per call (a chunk of batches)
        if self.done or trainer.global_rank != self.rank or trainer.global_step < self.step:
            return
        self.done = True
        if self.action == "kill":
            if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
                Path("killed").write_text(str(trainer.global_step))
                os.kill(os.getpid(), signal.SIGKILL)
            return
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
