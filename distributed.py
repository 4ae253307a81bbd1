"""Training on several processes with torchrun: this process's rank, sums over ranks, shards."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Distributed:
    """This process's place in a torchrun job; rank 0 of 1 without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group when started by torchrun (RANK and WORLD_SIZE are set)."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return Distributed()
    import torch.distributed as dist

    dist_info = Distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                            int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(dist_info.local_rank)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist_info


def barrier(dist_info: Distributed) -> None:
    """Wait until every rank gets here (rank 0 downloading while the others wait)."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.barrier()


def shut_down(dist_info: Distributed) -> None:
    """Leave the process group at the end of a torchrun job."""
    if dist_info.enabled:
        import torch.distributed as dist

        dist.destroy_process_group()


def all_reduce_sums(values: list[float], device: torch.device, dist_info: Distributed
                    ) -> list[float]:
    """Sum per-rank totals (loss sums, correct counts, samples) over all ranks."""
    if not dist_info.enabled:
        return values
    import torch.distributed as dist

    reduce_device = device if device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=reduce_device)
    dist.all_reduce(tensor)
    return tensor.tolist()


class ShardSampler(torch.utils.data.Sampler):
    """Every sample once per epoch, this rank's share; reshuffled from seed + epoch.

    Unlike DistributedSampler it never pads with repeated samples, so the sample
    counts (and validation metrics) equal a one-process run's; DDP's join()
    absorbs the one-batch difference between ranks that this can leave.

    With sample_seeds it yields (index, seed) pairs for my_dataset.SeededSamples: each
    sample's random transforms then depend on (seed, epoch, index) only, not on which
    loader process made it, so any --workers and a resumed run draw the same crops.
    """

    def __init__(self, num_samples: int, shuffle: bool, seed: int = 0,
                 dist_info: Distributed | None = None, sample_seeds: bool = False) -> None:
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.dist_info = dist_info or Distributed()
        self.sample_seeds = sample_seeds
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        mine = order[self.dist_info.rank::self.dist_info.world_size]
        if not self.sample_seeds:
            return mine
        # One seed per sample index (not per position), so every rank count agrees.
        seeds = torch.randint(2**63 - 1, (self.num_samples,), generator=generator).tolist()
        return [(index, seeds[index]) for index in mine]

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(range(self.dist_info.rank, self.num_samples, self.dist_info.world_size))
