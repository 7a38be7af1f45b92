"""A chunk's optimizer steps captured once in a CUDA graph, then replayed for every chunk like it.

On a GPU, an eager SGD step of a small model is launch cost: some twenty kernels issued one by one
from Python, each a few microseconds of work. A graph of the chunk's K steps is issued as one.
It holds the very kernels that eager mode runs, on buffers with the batches' shapes, strides and
alignment, so its updates are those of the eager steps, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


class ChunkGraph:
    """The K steps ``loss = loss_fn(x, y); loss.backward(); optimizer.step(); optimizer.zero_grad()``
    over static copies of a chunk's batches, captured in a CUDA graph on the first call.

    The optimizer must keep no state (plain SGD does not): the warm-up that capture needs steps
    the parameters, which are then put back. Elsewhere than on CUDA the same steps run eagerly on
    the static buffers (how the CPU tests check everything but the capture).

    Args:
        loss_fn: the loss of one batch, ``loss_fn(inputs, targets)``.
        optimizer: the torch optimizer (not Lightning's wrapper: no hooks run inside a graph).
        batches: a chunk whose layout the graph takes; it replays only chunks of the same layout.
    """

    def __init__(
        self,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: torch.optim.Optimizer,
        batches: Sequence[Batch],
    ) -> None:
        self.loss_fn, self.optimizer = loss_fn, optimizer
        self.layout = layout(batches)
        self.static = [_empty_like_batch(x, y) for x, y in batches]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.losses: torch.Tensor | None = None
        self.calls = 0

    def __call__(self, batches: Sequence[Batch]) -> torch.Tensor:
        """Takes the K steps on ``batches`` (of this graph's layout); returns their K losses."""
        torch._foreach_copy_([t for b in self.static for t in _parts(*b)], [t for b in batches for t in _parts(*b)])
        self.calls += 1
        if self.static[0][0].device.type != "cuda":
            return self._steps()
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()
        return self.losses

    def _steps(self) -> torch.Tensor:
        losses = []
        for x, y in self.static:
            loss = self.loss_fn(x, y)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        return torch.stack(losses)

    def _capture(self) -> torch.cuda.CUDAGraph:
        # torch.cuda.graph's documented recipe: warm up on a side stream, then capture (on the same
        # stream, so that cuBLAS has set up for it before). The warm-up really steps, so the
        # parameters are saved first and put back after it.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        saved = [p.detach().clone() for p in params]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                self._steps()
        finally:
            torch.cuda.current_stream().wait_stream(side)
            with torch.no_grad():
                torch._foreach_copy_(params, saved)
            self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            self.losses = self._steps()
        return graph


def layout(batches: Sequence[Batch]) -> tuple:
    """What a graph depends on: each batch's shapes and strides, and whether it is one table."""
    return tuple((x.shape, x.stride(), y.shape, y.stride(), _one_table(x, y), x.dtype, x.device) for x, y in batches)


def _one_table(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``x, y`` are the column views ``rows[:, :f], rows[:, f:]`` of one contiguous table."""
    width = x.shape[1] + y.shape[1]
    return (
        x.stride() == y.stride() == (width, 1)
        and x.dtype == y.dtype
        and y.data_ptr() == x.data_ptr() + x.shape[1] * x.element_size()
    )


def _parts(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The tensors to copy for a batch: its whole rows when it is one table (one contiguous copy)."""
    if _one_table(x, y):
        return [x.as_strided((len(x), x.shape[1] + y.shape[1]), x.stride())]
    return [x, y]


def _empty_like_batch(x: torch.Tensor, y: torch.Tensor) -> Batch:
    # A fresh allocation per batch, as eager mode has: the same alignment, so the same kernels.
    if _one_table(x, y):
        rows = x.new_empty(len(x), x.shape[1] + y.shape[1])
        return rows[:, : x.shape[1]], rows[:, x.shape[1] :]
    return x.new_empty_strided(x.shape, x.stride()), y.new_empty_strided(y.shape, y.stride())
