"""Processes and parallelism: torchrun environment, DDP / FSDP2 wrapping, reductions.

Parallelism is applied in a fixed order (as torchtitan): activation checkpointing -> compile -> DDP/FSDP.
Launch: `torchrun --nproc_per_node=N lmforge pretrain ...`; many nodes: `torchrun --nnodes=M
--nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=JOB lmforge pretrain ...` on each node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> World:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank=rank, world=world, local_rank=local, device=dev)


def wrap(model: nn.Module, parallel: Literal["none", "ddp", "fsdp"], world: World,
         activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, compile and DDP/FSDP2 to `model` (blocks in `model.blocks`)."""
    if activation_checkpointing:
        model.activation_checkpointing = True  # Transformer.forward recomputes each block in backward
    if compile:
        for block in model.blocks:
            block.compile()  # in place: parameter names stay those of the base model
    if not world.distributed or parallel == "none":
        return model
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside DDP (FSDP2 shards in place, so it is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj: Any, world: World, src: int = 0) -> Any:
    """`obj` as process `src` holds it, on every process (pickled over the process group: our own objects only)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group together (a rank that leaves while another still works can abort gloo)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
