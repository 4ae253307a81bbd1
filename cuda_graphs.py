"""CUDA graphs for training steps: replay one captured forward and backward per batch."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from distributed import Distributed
from utils import autocast


def use_cuda_graphs(requested: bool | None, device: torch.device, dist_info: Distributed,
                    log: Callable[[str], None] = print) -> bool:
    """Whether train.py replays CUDA graphs: where they work, one CUDA process (with or
    without --compile: the graphs are then captured around the compiled module).
    requested is --cuda-graphs (None: where they work); asked for by name and not possible,
    a note says why."""
    if requested is False:
        return False
    reason = None
    if device.type != "cuda":
        reason = f"they need a CUDA device, and this run uses {device.type}"
    elif dist_info.enabled:
        reason = "DistributedDataParallel's gradient hooks cannot be captured"
    if reason is None:
        return True
    if requested:
        log(f"note: --cuda-graphs is off: {reason}.")
    return False


class _Forward(nn.Module):
    """A module whose forward is the wrapped model's: make_graphed_callables replaces this
    forward, and the model's own stays eager for the batches the graph cannot take."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class CudaGraphModel(nn.Module):
    """Runs training steps as replayed CUDA graphs of one captured batch shape.

    At small batches an eager ViT-B/16 step is bound by launching its ~830 kernels from
    Python, not by the GPU (BENCHMARKS.md measures the step both ways).
    The first training batch's forward and backward are captured once with
    torch.cuda.make_graphed_callables; later batches replay the graphs. A shorter last
    batch is padded with zero images to the captured size and its extra logits dropped:
    samples never interact in a ViT (no batch norm), so the padding changes no loss and no
    gradient, and no second set of activations is needed beside the graph's. Evaluation
    and no-grad calls run the model itself, not a replay, on the same parameters. The
    loss, clipping and optimiser step stay eager, so accumulation, gradient scaling and the
    learning-rate schedule work unchanged.

    The model may be a torch.compile'd module (train.py's --compile): the capture then
    records the compiler's fused kernels, compiled during make_graphed_callables' warm-up
    passes, and a replay launches them all at once. This route rather than the compiler's
    own graphs (mode="reduce-overhead") because our padding keeps every training batch at
    one shape, where reduce-overhead would compile and capture again for the short last
    batch; and because one capture mechanism then serves compiled and eager models alike,
    with the same fallback, accumulation and autocast handling.

    If capturing fails, a note is printed once and training goes on without graphs, with
    the model as given: the compiled module where there is one, never a plain copy.

    Gradient accumulation (accumulate=True) needs one more step: a replayed backward hands
    out gradients that live in the graph's memory, and autograd keeps such a tensor as
    .grad when .grad is None, so the next replay would overwrite the first micro-batch's
    gradients. Giving every .grad its own zeros before a replay makes autograd add instead.
    """

    def __init__(self, model: nn.Module, amp_dtype: torch.dtype | None = None,
                 accumulate: bool = False, capture=None, log=print) -> None:
        super().__init__()
        self.model = model
        self.amp_dtype = amp_dtype
        self.accumulate = accumulate
        # Injectable so that the routing can be tested where CUDA is absent.
        self.capture = capture or torch.cuda.make_graphed_callables
        self.log = log
        self.graphed: nn.Module | None = None
        self.batch_shape: torch.Size | None = None
        self.failed = False

    def capture_for(self, images: torch.Tensor) -> None:
        """Capture the graphs for training batches shaped like `images` (only its shape,
        dtype and device matter). forward() does it at the first training batch; train.py
        calls it before any data loader starts, because the capture fails when another
        thread allocates pinned host memory meanwhile, as a loader's pin-memory thread does
        (and that thread's error then ends the run)."""
        forward = _Forward(self.model).train()
        sample = torch.zeros_like(images)  # only shape, dtype and device matter
        try:
            # Autocast's weight cache would keep casts from the capture alive across replays.
            with autocast(images.device.type, self.amp_dtype, cache_enabled=False), \
                    warnings.catch_warnings():
                # make_graphed_callables warms up and captures on a stream of its own; recent
                # torch versions warn there that gradients cross streams and that cuBLAS found no
                # context on the backward thread. Both are expected and harmless here.
                for message in ("The AccumulateGrad node's stream", "Attempting to run cuBLAS"):
                    warnings.filterwarnings("ignore", category=UserWarning, message=message)
                self.graphed = self.capture(forward, (sample,))
            self.batch_shape = images.shape
        except Exception as err:  # a model or torch build the graphs cannot take
            self.failed = True
            self.log(f"note: CUDA graphs could not be captured ({type(err).__name__}: "
                     f"{str(err).splitlines()[0] if str(err) else ''}); training without them.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()) or self.failed:
            return self.model(images)
        if self.graphed is None:
            self.capture_for(images)
        if (self.graphed is None or images.shape[1:] != self.batch_shape[1:]
                or len(images) > self.batch_shape[0]):
            return self.model(images)
        if self.accumulate:
            for param in self.model.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
        count = len(images)
        if count < self.batch_shape[0]:
            padding = images.new_zeros((self.batch_shape[0] - count, *images.shape[1:]))
            images = torch.cat([images, padding])
        return self.graphed(images)[:count]
