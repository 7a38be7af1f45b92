"""A callback that records, per DDP rank, the rows trained on, the checkpoint writes and the final
weights; the distributed tests add it with ``--trainer.callbacks+=tests.ddp_helpers.RecordRank``."""

import json
from pathlib import Path

import lightning as L
import torch

import cropyield.reader
from cropyield.batches import Chunk

# The files this process reads cells of (text columns, missing cells) through the data module's
# first pass: the wrapper is in place from this module's import, when the command parses its
# arguments, before it builds the data module and the model.
READ: list[str] = []
_read_cells = cropyield.reader.read_cells


def _recorded(piece, *args, **kwargs):
    READ.append(Path(getattr(piece, "path", piece)).name)
    return _read_cells(piece, *args, **kwargs)


cropyield.reader.read_cells = _recorded


class RecordRank(L.Callback):
    def setup(self, trainer, pl_module, stage):
        self.first_pass = sorted(set(READ))  # read before the callbacks' setup: learning the levels
        self.folder = Path(trainer.default_root_dir)
        self.rows, self.writes = [], []
        io = trainer.strategy.checkpoint_io
        save = io.save_checkpoint

        def recorded(checkpoint, path, storage_options=None):
            self.writes.append(Path(path).name)
            return save(checkpoint, path, storage_options)

        io.save_checkpoint = recorded

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 0:
            for x, _ in batch if isinstance(batch, Chunk) else [batch]:  # a chunk holds several batches
                self.rows += x.tolist()

    def on_fit_end(self, trainer, pl_module):
        rank = trainer.global_rank
        torch.save(pl_module.linear.state_dict(), self.folder / f"rank{rank}.pt")
        record = {"rows": self.rows, "writes": self.writes, "world_size": trainer.world_size,
                  "first_pass": self.first_pass}  # fmt: skip
        (self.folder / f"rank{rank}.json").write_text(json.dumps(record))
