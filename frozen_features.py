"""Training the head on a frozen backbone without one backbone pass per small batch.

With --freeze-layers only the pre-logits and the head train. When the backbone also draws
nothing at random (no dropout, no drop-path), its class token for an image is a fixed
function of that image, so when it is computed does not matter:

- grouped (--frozen-batch N): the next N images' worth of the loader's batches go through
  the backbone in one no-grad pass, then the head takes its optimiser steps on them in the
  loader's batches, in the loader's order. The same batches as the per-batch loop, so the
  same updates; augmentation stays per epoch (each epoch's crops are new images).
- cached (--cache-train-features, with --no-augment): every training image's class token is
  computed once, and each epoch's batches are read from them in the loader's sampler order.

Both hand utils.train_one_epoch (the per-batch loop itself, with its accounting, NaN check
and progress bar) batches of (class tokens, labels) and the head as the model.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from distributed import Distributed
from utils import EpochStats, StepSettings, autocast, class_tokens, head_of, train_one_epoch
from vit_model import VisionTransformer, drop_rate

# Images per backbone pass of --cache-train-features when --frozen-batch is 0. Grouping
# is not the default: on a quiet two-core CPU a whole frozen run was 3-7% slower grouped at
# 128 than per batch (BENCHMARKS.md, "CPU, frozen, --no-augment"); on a GPU it is still to
# measure, and CUDA graphs take precedence there (why_per_batch).
DEFAULT_FROZEN_IMAGES = 128
# Keep cached features on the GPU only while they take at most this share of its free memory.
DEVICE_SHARE = 0.25


def backbone_randomness(model: VisionTransformer) -> str | None:
    """Why the backbone's class token could change between two passes over the same images
    (it trains, or it draws dropout or drop-path masks), or None when it cannot."""
    head = head_of(model)
    head_params = {id(p) for p in head.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in head_params:
            return f"the backbone trains ({name} needs gradients)"
    head_modules = {id(m) for m in head.modules()}
    for name, module in model.named_modules():
        rate = drop_rate(module)
        if rate > 0 and id(module) not in head_modules:
            return f"{name} drops at random (rate {rate})"
    return None


@torch.no_grad()
def backbone_pass(model: VisionTransformer, images: torch.Tensor,
                  amp_dtype: torch.dtype | None) -> torch.Tensor:
    """Class tokens of a frozen backbone, under the run's autocast. The module's train/eval
    mode is left alone: backbone_randomness() has checked that it changes nothing."""
    with autocast(images.device.type, amp_dtype):
        return class_tokens(model, images)


class GroupedTokens:
    """The loader's (images, labels) batches as (class tokens, labels), the backbone run once
    per `group` batches."""

    def __init__(self, model: VisionTransformer, loader, group: int, device: torch.device,
                 amp_dtype: torch.dtype | None) -> None:
        self.model, self.loader, self.group = model, loader, group
        self.device, self.amp_dtype = device, amp_dtype

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.group)):
            images = torch.cat([images.to(self.device, non_blocking=True)
                                for images, _ in group])
            tokens = backbone_pass(self.model, images, self.amp_dtype)
            sizes = [len(labels) for _, labels in group]
            for batch_tokens, (_, labels) in zip(tokens.split(sizes), group, strict=True):
                yield batch_tokens, labels


class CachedTokens:
    """--cache-train-features: every training image's class token, computed once.

    Each epoch's batches come from the loader's own batch sampler (after its set_epoch), so
    they hold the same samples in the same order as the uncached run's.
    """

    def __init__(self, model: VisionTransformer, pass_images: int, device: torch.device,
                 log: Callable[[str], None] = print) -> None:
        self.model, self.pass_images, self.device, self.log = model, pass_images, device, log
        self.tokens: torch.Tensor | None = None  # (dataset size, D), in dataset order
        self.labels: torch.Tensor | None = None

    def batches(self, loader: DataLoader, amp_dtype: torch.dtype | None) -> _SampledTokens:
        if self.tokens is None:
            self._compute(loader, amp_dtype)
        return _SampledTokens(self.tokens, self.labels, loader.batch_sampler)

    def _compute(self, loader: DataLoader, amp_dtype: torch.dtype | None) -> None:
        # The dataset in order, at the pass size; --no-augment's transform draws nothing.
        in_order = DataLoader(loader.dataset, batch_size=self.pass_images, shuffle=False,
                              num_workers=loader.num_workers, pin_memory=loader.pin_memory)
        keep_on = self._place(len(loader.dataset))
        tokens, labels = [], []
        for images, batch_labels in in_order:
            images = images.to(self.device, non_blocking=True)
            tokens.append(backbone_pass(self.model, images, amp_dtype).to(keep_on))
            labels.append(batch_labels)
        self.tokens = torch.cat(tokens)
        self.labels = torch.cat(labels)

    def _place(self, count: int) -> torch.device:
        """Where count class tokens are kept: on the device where they fit, else in host
        memory. Decided before the backbone pass, so that they never all sit on the GPU."""
        size = count * self.model.embed_dim * 4  # float32; autocast's tokens are no larger
        place, where = self.device, f"on {self.device}"
        if self.device.type == "cuda" and size > DEVICE_SHARE * torch.cuda.mem_get_info(
                self.device)[0]:
            place, where = torch.device("cpu"), "in host memory"
        self.log(f"Training features: {count} class tokens ({size / 2**20:.1f} MiB) "
                 f"computed once and kept {where}.")
        return place


class _SampledTokens:
    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor, batch_sampler) -> None:
        self.tokens, self.labels, self.batch_sampler = tokens, labels, batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for indices in self.batch_sampler:
            rows = torch.as_tensor(indices)
            yield self.tokens[rows.to(self.tokens.device)], self.labels[rows]


@dataclass
class FrozenHeadTraining:
    """The epoch's training pass when the backbone is fixed: grouped or cached tokens."""

    model: VisionTransformer
    group: int | None  # grouped: loader batches per backbone pass; None when cached
    cache: CachedTokens | None

    def train_one_epoch(self, optimizer: torch.optim.Optimizer, loader, device: torch.device,
                        epoch: int, settings: StepSettings, dist_info: Distributed
                        ) -> EpochStats:
        batches = (self.cache.batches(loader, settings.amp_dtype) if self.cache is not None
                   else GroupedTokens(self.model, loader, self.group, device,
                                      settings.amp_dtype))
        return train_one_epoch(head_of(self.model), optimizer, batches, device, epoch,
                               settings, dist_info)


def why_per_batch(args: argparse.Namespace, model: VisionTransformer, dist_info: Distributed,
                  cuda_graphs: bool) -> str | None:
    """Why the frozen-backbone paths cannot give the per-batch loop's updates (or are not
    measured to), or None when they can."""
    if not args.freeze_layers:
        return "the backbone trains (--no-freeze-layers)"
    if reason := backbone_randomness(model):
        return reason
    if dist_info.enabled:
        return "under torchrun DDP averages the head's gradients, and this path bypasses it"
    if args.compile:
        return "--compile compiles the per-batch model (the two together are not measured)"
    if cuda_graphs:
        return ("CUDA graphs replay the per-batch steps (the measured GPU path); "
                "add --no-cuda-graphs to group the backbone's passes instead")
    return None


def plan_frozen_head(args: argparse.Namespace, model: VisionTransformer, device: torch.device,
                     dist_info: Distributed, cuda_graphs: bool,
                     log: Callable[[str], None] = print) -> FrozenHeadTraining | None:
    """The frozen-backbone path --frozen-batch and --cache-train-features ask for, or None
    for the per-batch loop. Asked for by name and not possible: one note says why."""
    asked = [flag for flag, value in (("--frozen-batch", args.frozen_batch),
                                      ("--cache-train-features", args.cache_train_features))
             if value]
    if not asked:
        return None  # the per-batch loop: the default, and --frozen-batch 0
    reason = why_per_batch(args, model, dist_info, cuda_graphs)
    if reason is not None:
        log(f"note: {' and '.join(asked)} {'is' if len(asked) == 1 else 'are'} off: {reason}.")
        return None
    if args.cache_train_features:
        if not args.augment:
            log("Caching the training features: --no-augment trains on the evaluation "
                "transform's centre crops, not the report's random crops and flips.")
            pass_images = max(args.frozen_batch or DEFAULT_FROZEN_IMAGES, args.batch_size)
            return FrozenHeadTraining(model, None, CachedTokens(model, pass_images, device, log))
        log("note: --cache-train-features is off: it needs --no-augment (random crops "
            "make every epoch's images new).")
    if not args.frozen_batch:
        return None
    group = max(1, round(args.frozen_batch / args.batch_size))
    log(f"Frozen backbone: one forward pass per {group * args.batch_size} images, "
        f"head steps in batches of {args.batch_size}.")
    return FrozenHeadTraining(model, group, None)
