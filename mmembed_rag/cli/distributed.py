"""Which share of the work this process does when a launcher (``torchrun``, ``accelerate launch``) started several.

The launcher sets ``RANK`` and ``WORLD_SIZE`` in every process; they alone decide the shard, so two processes
started by hand with those variables split the work the same way. When the launcher also set
``MASTER_ADDR`` (torchrun and accelerate do), an accelerate ``PartialState`` joins the processes in a
process group, which gives a barrier (the first process creates the collection before the others open it;
the last report sees every write) and lets the first process print the one report of the whole run.

On a CPU-only machine ``accelerate launch --cpu`` starts a single process whatever ``--num_processes``
says; use ``torchrun --nproc_per_node N`` (or ``accelerate launch --multi_gpu --num_processes N``) there.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .common import UsageError

__all__ = ["Shard", "env_rank", "join_processes"]

logger = logging.getLogger(__name__)


def env_rank() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment, ``(0, 1)`` when no launcher set them.

    Raises:
        UsageError: the variables are not integers or the rank is out of range.
    """
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError as exc:
        raise UsageError(f"RANK and WORLD_SIZE must be integers: {exc}") from exc
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


@dataclass
class Shard:
    """This process's place in the run.

    Attributes:
        rank: process index, 0 to ``world_size - 1``.
        world_size: number of processes.
        state: the accelerate ``PartialState`` when the processes share a process group, else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    state: Any = None

    def owns(self, ordinal: int) -> bool:
        """Whether the item numbered ``ordinal`` (in the global, deterministic order) is this process's."""
        return ordinal % self.world_size == self.rank

    @property
    def device(self) -> str | None:
        """The accelerator the launcher gave this process (``cuda:LOCAL_RANK``), or ``None`` for the default."""
        if self.state is not None and self.state.device.type != "cpu":
            return str(self.state.device)
        return None

    @property
    def grouped(self) -> bool:
        """True when the processes share a process group (barrier and gather work)."""
        return self.state is not None

    def barrier(self) -> None:
        """Wait for every process (a no-op without a process group)."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every process, in rank order (only this process's without a process group)."""
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def close(self) -> None:
        """Leave the process group."""
        if self.state is not None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def join_processes(device: str | None) -> Shard:
    """Find this process's rank; with several processes and a launcher's rendezvous, join their process group.

    Args:
        device: the ``--device`` option: ``"cpu"`` (or no CUDA) makes the group use gloo.
    """
    rank, world = env_rank()
    if world == 1:
        return Shard()
    if "MASTER_ADDR" not in os.environ:
        logger.info("rank %d of %d from RANK/WORLD_SIZE (no MASTER_ADDR: no process group)", rank, world)
        return Shard(rank, world)
    import torch
    from accelerate import PartialState

    cpu = (device is not None and device.startswith("cpu")) or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if (state.process_index, state.num_processes) != (rank, world):
        logger.warning("accelerate sees process %d of %d but RANK/WORLD_SIZE say %d of %d; sharding by the "
                       "environment, without a process group", state.process_index, state.num_processes, rank, world)
        return Shard(rank, world)
    logger.info("rank %d of %d joined the process group (%s)", rank, world, state.distributed_type)
    return Shard(rank, world, state)
