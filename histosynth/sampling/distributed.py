"""One canvas shared by many processes: PyTorch's own distributed engine (torchrun / accelerate launch).

Ranks evaluate disjoint, balanced shares of each step's micro-batches, all-gather the model outputs and apply the
same scheduler step, so every rank holds the single-process canvas bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class ProcessGroup:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_object(self, value):
        """The main process's ``value`` (picklable), on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, local: list) -> list:
        """Every process's list (picklable items), concatenated in rank order, on every process."""
        if self.world == 1:
            return list(local)
        received: list = [None] * self.world
        dist.all_gather_object(received, local)
        return [item for part in received for item in part]


def process_group() -> ProcessGroup:
    """This process's place among those started by torchrun/accelerate (gloo on CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return ProcessGroup()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def end_process_group() -> None:
    """Leave the process group together: every rank waits for the others, then closes its connections.

    A rank that simply exits while a peer is still finishing (writing files, say) can make the peer's gloo
    transport abort on the closed connection.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def gather_chunks(local: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """All ranks' outputs (n_chunks, b, C, P, P) in chunk order, from this rank's contiguous share ``local``.

    Shares differ by at most one chunk; they are padded to equal size for ``all_gather`` and trimmed after.
    """
    world = dist.get_world_size()
    base, extra = divmod(n_chunks, world)
    sizes = [base + (1 if r < extra else 0) for r in range(world)]
    padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    received = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(received, padded)
    return torch.cat([block[:size] for block, size in zip(received, sizes)])  # (n_chunks, b, C, P, P)
