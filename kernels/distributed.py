"""torch.distributed plumbing for training and evaluation, launched by ``torchrun``.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE`` in each
process; :func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo
on CPU).  Without them (a plain ``dynas train``) it is one process and every collective below
is the identity, so the training code has one path.

Data order: :class:`EpochSampler` is a ``DistributedSampler`` (seeded permutation per epoch,
``set_epoch`` every epoch, every ``world``-th sample per process) that also

* yields ``(index, key)`` with a key per (seed, epoch), from which the data set draws each
  sample's augmentation (:class:`~dynas.kernels.imagefolder.ImageFolderDataset`), so crops do
  not depend on the number of processes or loader workers; and
* starts ``start`` samples into the epoch, to resume mid-epoch past the consumed batches.

Process ``r``'s ``k``-th batch of ``b`` holds the permutation's positions ``[k B, (k+1) B)``
with ``B = b * world`` (the strided split), so the global batches are the same for any number
of processes.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from dynas.errors import ConfigError, DynasError

__all__ = ["DistEnv", "init_distributed", "shutdown", "EpochSampler", "DEVICES"]

from dynas.kernels.options import DEVICES


@dataclass
class DistEnv:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over processes of ``t`` (a tensor on this process's device); in place."""
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` in every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: str | None) -> None:
        """Raise the first process's error in every process (so all stop together), or return."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise ConfigError(errors[0])

    @contextlib.contextmanager
    def together(self) -> Iterator[None]:
        """A block that may fail with a :class:`DynasError` in some processes only: then it fails in
        all of them with the first message (no collective call may be made inside)."""
        try:
            yield
        except DynasError as exc:
            if self.distributed:
                self.gather(str(exc))
            raise
        else:
            self.agree(None)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"environment {name}={value!r} is not an integer; allowed: what torchrun sets") from None


def init_distributed(device: str = "auto") -> DistEnv:
    """This process's :class:`DistEnv`; joins the process group when ``WORLD_SIZE`` > 1.

    ``device``: ``"cuda"`` (this node's GPU ``LOCAL_RANK``), ``"cpu"``, or ``"auto"`` (CUDA if
    available).  Joining twice (train, then evaluate in one process) reuses the group.
    """
    if device not in DEVICES:
        raise ConfigError(f"device={device!r} is unknown; allowed: {', '.join(DEVICES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device; allowed: auto or cpu here")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    env = DistEnv(
        rank=_env_int("RANK", 0),
        world=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world=_env_int("LOCAL_WORLD_SIZE", 1),
    )
    if cuda:
        if env.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={env.local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "allowed: --nproc-per-node at most the GPU count"
            )
        env.device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(env.device)
    if env.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return env


def shutdown(env: DistEnv) -> None:
    """Leave the process group (if this process joined one)."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


class EpochSampler(torch.utils.data.distributed.DistributedSampler):
    """A ``DistributedSampler`` (drop_last) that yields ``(index, key)`` and can start mid-epoch (module doc)."""

    def __init__(self, dataset: Any, env: DistEnv, seed: int):
        super().__init__(dataset, num_replicas=env.world, rank=env.rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip this process's first ``start`` samples of the current epoch (already trained on)."""
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        key = self.seed * 1_000_003 + self.epoch
        for index in list(super().__iter__())[self.start :]:
            yield index, key

    def __len__(self) -> int:
        return super().__len__() - self.start
