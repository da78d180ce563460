"""Many processes through ``torch.distributed``: the process group, and what distill and eval need of it.

``torchrun`` starts one process per rank with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set (its
launch protocol, not a switch of ours); :func:`process_group` joins them (gloo on CPU, nccl where CUDA
is available) and yields a :class:`Group`. Launched without torchrun, or with one process, it yields
the single-process group and no collective runs.

* data: :meth:`Group.shard` gives a rank its slice of a global batch or list of windows;
* sums and means: :meth:`Group.sum`, :meth:`Group.mean` (all-reduce);
* the models: :func:`replicate` (DDP, the estimator stage) and :func:`shard_model` (FSDP2's
  ``fully_shard`` per transformer block, stage full);
* checkpoints hold full tensors whatever the world size: :func:`full` gathers a sharded tensor,
  :func:`assign` / :func:`shard_like` put a full one back into a sharded parameter or state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by torchrun for every process it starts


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of a run (the defaults: one process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: one process, no process group

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes files."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        """This rank's share of ``items`` (rows of a global batch, windows to score): every
        world_size-th item from the rank's index; the ranks' shares make up ``items`` exactly once."""
        return items[self.rank::self.world_size]

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if self.backend is None:
            return [float(v) for v in values]
        total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.tolist()

    def average(self, values: dict[str, float]) -> dict[str, float]:
        """Each value averaged over the ranks (every rank has the same keys)."""
        keys = sorted(values)
        return dict(zip(keys, (v / self.world_size for v in self.sum([values[k] for k in keys]))))

    def mean(self, value: Tensor) -> Tensor:
        """A tensor's mean over the ranks (no autograd through it)."""
        if self.backend is None:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def from_main(self, produce: Callable[[], T]) -> T:
        """``produce()`` run on rank 0 only, its result (or its error) handed to every rank."""
        if self.backend is None:
            return produce()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = (produce(), None)
            except Exception as error:  # noqa: BLE001 - re-raised on every rank below
                box[0] = (None, error)
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.backend is not None:
            dist.barrier()


def launched_by_torchrun() -> dict[str, int] | None:
    """torchrun's rank, world size and local rank of this process, or None when it did not start it."""
    if not all(name in os.environ for name in TORCHRUN_VARIABLES):
        return None
    return {name.lower(): int(os.environ[name]) for name in TORCHRUN_VARIABLES}


@contextmanager
def process_group(backend: str | None = None) -> Iterator[Group]:
    """The process group of a torchrun launch (destroyed on exit), or the single-process group.

    ``backend`` defaults to nccl where CUDA is available, else gloo.
    """
    launch = launched_by_torchrun()
    if launch is None or launch["world_size"] == 1:
        yield Group()
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    group = Group(launch["rank"], launch["world_size"], launch["local_rank"], backend)
    if backend == "nccl":
        torch.cuda.set_device(group.device)
    dist.init_process_group(backend)
    try:
        yield group
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------- models
def replicate(module: nn.Module, group: Group) -> nn.Module:
    """``module`` under DDP (gradients averaged over the ranks in backward); itself in one process."""
    if group.backend is None:
        return module
    device_ids = [group.local_rank] if group.device.type == "cuda" else None
    # buffers (SEA's random features) are drawn from the seed and the step on every rank alike
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)


@contextmanager
def no_sync(replicas: Iterable[nn.Module], skip: bool) -> Iterator[None]:
    """With ``skip``, the DDP replicas accumulate this backward's gradients without averaging them
    (every micro-batch but a step's last)."""
    with ExitStack() as stack:
        for module in replicas if skip else ():
            if isinstance(module, nn.parallel.DistributedDataParallel):
                stack.enter_context(module.no_sync())
        yield


def transformer_blocks(model: nn.Module, attention_names: Sequence[str]) -> list[nn.Module]:
    """The repeated blocks holding the attention layers: ``model.layers.3`` of ``model.layers.3.self_attn``."""
    blocks = []
    for name in attention_names:
        parts = name.split(".")
        index = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
        if index is None:
            raise ValueError(f"cannot shard {name}: it is not inside a numbered block (e.g. model.layers.0)")
        blocks.append(model.get_submodule(".".join(parts[: index + 1])))
    return blocks


def shard_model(model: nn.Module, attention_names: Sequence[str], group: Group) -> nn.Module:
    """FSDP2: each transformer block its own shard group, the rest (embeddings, head) the root's."""
    if group.backend is None:
        return model
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model, attention_names):
        fully_shard(block)
    fully_shard(model)
    return model


# ---------------------------------------------------------------------------------------- checkpoints
def full(value: Any) -> Any:
    """A sharded tensor gathered whole (a collective: every rank calls it); anything else as is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(value: Tensor, like: Tensor) -> Tensor:
    """A full tensor cut like ``like`` (this rank's shard where ``like`` is sharded)."""
    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements)
    return value.to(like.device)


@torch.no_grad()
def assign(target: Tensor, value: Tensor) -> None:
    """Copy a full tensor into a parameter or buffer, sharded or not."""
    target.copy_(shard_like(value, target))


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's ``state_dict()`` with every sharded state tensor gathered (the one-process format)."""
    per_param = {index: {key: full(value) for key, value in values.items()}
                 for index, values in state["state"].items()}
    return {**state, "state": per_param}


def shard_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of a full state: each parameter-shaped state tensor cut like its parameter."""
    for param, values in optimizer.state.items():
        if isinstance(param, DTensor):
            for key, value in values.items():
                if isinstance(value, Tensor) and not isinstance(value, DTensor) and value.shape == param.shape:
                    values[key] = shard_like(value, param)
