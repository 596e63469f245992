"""The GPU side of the image classifier's loop: host-data prefetching and ``torch.compile``.

* :func:`device_batches` hands the loop each batch on the device. Data already there (or a CPU
  run) is indexed where it lies. Data kept on the host for a CUDA run (a dataset too large for the
  GPU) is gathered into pinned memory and copied on a side CUDA stream one batch ahead, so the copy
  overlaps the previous batch's compute and the host never waits for the device.
* :func:`compiled_forward` is ``forward_with_features`` through ``torch.compile`` with one static
  graph per batch shape (CUDA graphs with ``reduce-overhead``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from objectives.vision.models import ImageClassifier

_RECOMPILE_LIMIT = 64

Forward = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""What computes ``(logits, features)`` from a batch: ``model.forward_with_features`` or a compiled one."""


def device_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    spans: list[tuple[int, int]],
    order: torch.Tensor | None,
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Each span's ``(x, y)`` rows (``order[start:stop]``, or ``start:stop`` in order) on ``device``.

    Data already on the device (or a CPU run) is indexed where it lies, as before. Data kept on the
    host for a CUDA run is gathered into pinned memory and copied on a side stream, one batch
    ahead: the copy of batch i + 1 overlaps the compute of batch i, and the compute stream waits
    on an event for exactly its own batch's copy (never a host sync)."""
    if not (device.type == "cuda" and x.device.type == "cpu" and y.device.type == "cpu"):
        for start, stop in spans:
            index = order[start:stop] if order is not None else slice(start, stop)
            yield x[index], y[index].to(device, non_blocking=True)
        return
    copy_stream = torch.cuda.Stream(device=device)
    Pending = tuple[torch.Tensor, torch.Tensor, torch.cuda.Event]

    def issue(start: int, stop: int) -> Pending:
        index = order[start:stop] if order is not None else None
        host = [_pinned_rows(t, index, start, stop) for t in (x, y)]
        with torch.cuda.stream(copy_stream):
            # The caching host allocator records this copy on the pinned blocks: they are not reused
            # before the copy is done, without the host waiting for it.
            moved = [t.to(device, non_blocking=True) for t in host]
            done = torch.cuda.Event()
            done.record(copy_stream)
        return moved[0], moved[1], done

    def ready(batch: Pending) -> tuple[torch.Tensor, torch.Tensor]:
        bx, by, done = batch
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        for t in (bx, by):
            t.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return bx, by

    pending: Pending | None = None
    for start, stop in spans:
        following = issue(start, stop)
        if pending is not None:
            yield ready(pending)
        pending = following
    if pending is not None:
        yield ready(pending)


def _pinned_rows(t: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    """Rows ``index`` (or ``start:stop``) of the host tensor ``t``, gathered into pinned memory."""
    rows = len(index) if index is not None else stop - start
    out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
    if index is not None:
        torch.index_select(t, 0, index, out=out)
    else:
        out.copy_(t[start:stop])
    return out


def compiled_forward(model: ImageClassifier, mode: str = "default") -> Forward:
    """``model.forward_with_features`` through ``torch.compile`` (parameters and state dict unchanged).

    ``dynamic=False``: every batch shape gets its own static graph, so with ``reduce-overhead`` each
    is one CUDA graph. An epoch has at most two shapes per phase (full batches and the last, partial
    one, which is trained on as in eager mode: it is neither dropped nor padded, so compiled and
    eager runs see the same samples and batch-norm statistics), i.e. about four graphs per trial
    (train/eval x full/partial), within dynamo's recompile limit."""
    # Dynamo's graphs are reused by later trials with the same architecture (parameters are graph
    # inputs, not guards), but its limit of 8 graphs per function would send a worker's later trials
    # with other architectures or batch sizes back to eager mode without a word: allow more.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, _RECOMPILE_LIMIT)
    compiled = torch.compile(model.forward_with_features, mode=mode, dynamic=False)
    if mode != "reduce-overhead":
        return compiled

    def step(x: torch.Tensor, detach_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # A new iteration: the previous replay's outputs (already consumed) may be overwritten.
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, detach_head=detach_head)

    return step
