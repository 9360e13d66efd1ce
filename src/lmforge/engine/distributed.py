"""Processes and parallelism: torchrun environment, the (dp, tp) device mesh, DDP / ZeRO / FSDP2 and tensor
parallelism, reductions.

Parallelism is applied in a fixed order (as torchtitan): tensor parallel -> activation checkpointing -> compile ->
DDP/FSDP. ZeRO-1/2 live in `zero.py` (the trainer drives them); ZeRO-3 is FSDP2.
Launch: `torchrun --nproc_per_node=N lmforge pretrain ...`; many nodes: `torchrun --nnodes=M
--nproc_per_node=N --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=JOB lmforge pretrain ...` on each node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class ParallelConfig:
    """How the processes under torchrun share the work: a (dp, tp) mesh. `parallel: fsdp` is short for
    `parallel: {dp: fsdp}`."""

    SHORTHAND: ClassVar[str] = "dp"
    dp: Literal["ddp", "zero1", "zero2", "fsdp"] = "ddp"
    """Data parallelism over world / tp processes: ddp (replicated), zero1 (optimizer state sharded), zero2 (and
    gradients), fsdp (FSDP2, ZeRO-3: and parameters)."""
    tp: int = 1
    """Tensor-parallel degree: each block's attention heads and MLP columns split over tp processes (DTensor;
    q/k/v, gate/up column-wise, o/down row-wise). With dp > 1, dp must be fsdp."""
    sequence: bool = False
    """With tp > 1, sequence parallelism too: norms and the residual stream split by position over the tp
    processes (all-gather before attention and the MLP, reduce-scatter after); T must divide by tp."""

    def validate(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp: expected an integer >= 1, found {self.tp}")
        if self.sequence and self.tp == 1:
            raise ValueError("sequence: sequence parallelism splits positions over tensor-parallel processes; set tp")
        if self.tp > 1 and self.dp in ("zero1", "zero2"):
            raise ValueError(f"tp {self.tp} with dp {self.dp!r}: tensor parallelism combines with fsdp on the data "
                             f"dimension (or runs alone, world = tp)")

    @property
    def zero_stage(self) -> int:
        """0 for DDP, 1 and 2 for ZeRO-1/2, 3 for FSDP2."""
        return {"ddp": 0, "zero1": 1, "zero2": 2, "fsdp": 3}[self.dp]


@dataclass
class World:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    tp: int = 1
    """Tensor-parallel degree: ranks r with the same r // tp hold one model replica and read the same data."""
    mesh: Any = None
    """The ("dp", "tp") DeviceMesh when tp > 1."""

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def data_rank(self) -> int:
        """Which shard of the data this process reads (tensor-parallel ranks of one replica read the same)."""
        return self.rank // self.tp

    @property
    def data_world(self) -> int:
        """How many data shards (model replicas) there are."""
        return self.world // self.tp

    @property
    def dp_group(self) -> Any:
        """The process group over which metrics of different data shards are summed (None: all processes)."""
        return self.mesh.get_group("dp") if self.mesh is not None else None


def init(device: str = "auto", tp: int = 1) -> World:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on CUDA); a single process otherwise.
    With tp > 1 the processes form a (world / tp, tp) mesh; consecutive ranks share a replica."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local}" if device == "cuda" else device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if tp > 1 and world % tp:
        raise ValueError(f"train.parallel.tp: {tp} does not divide the {world} processes torchrun started")
    mesh = None
    if tp > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(dev.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
    return World(rank=rank, world=world, local_rank=local, device=dev, tp=tp, mesh=mesh)


def tensor_parallel(model: nn.Module, world: World, sequence: bool = False) -> None:
    """Megatron-style tensor parallelism over the mesh's tp dimension (Shoeybi et al. 2019): in each block q/k/v
    and gate/up are split by output columns, o and down by input rows, so one all-reduce closes attention and one
    the MLP; attention sees num_heads / tp heads per process. A causal LM's token embedding (and an untied head) is
    split by vocabulary rows when tp divides the vocabulary: the lookup is completed with an all-reduce and the loss
    is `models.cross_entropy.linear_cross_entropy`'s vocabulary-parallel form. Norms (and position embeddings) stay
    whole on every process, or with `sequence` (Korthikanti et al. 2022) the blocks' norms and residual stream hold
    T / tp positions: each block gathers the sequence before attention and the MLP, o and down reduce-scatter back
    to it; the first block takes its slice of the embeddings and the final norm gathers them again."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg, tp = model.cfg, world.tp
    for what, n in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp:
            raise ValueError(f"train.parallel.tp: {tp} does not divide the model's {what} ({n})")
    plan = {"attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
            "attn.o": RowwiseParallel(), "mlp.up": ColwiseParallel(), "mlp.down": RowwiseParallel()}
    if cfg.mlp == "gated":
        plan["mlp.gate"] = ColwiseParallel()
    for i, block in enumerate(model.blocks):
        for name in plan:
            layer = block.get_submodule(name)
            if type(layer) is not nn.Linear:
                raise ValueError(f"train.parallel.tp: blocks.{i}.{name} is a {type(layer).__name__}; tensor "
                                 "parallelism splits plain linear layers (not LoRA, adapters or quantized ones)")
    if sequence:
        plan.update(sequence_plan(model, world.mesh["tp"]))
    for block in model.blocks:
        parallelize_module(block, world.mesh["tp"], plan)
    if cfg.head == "lm" and cfg.vocab_size % tp == 0 and type(model.embed.tokens) is nn.Embedding:
        vocab = {"embed.tokens": RowwiseParallel(input_layouts=Replicate())}
        if not cfg.tie_embeddings and type(model.lm_head) is nn.Linear:
            vocab["lm_head"] = ColwiseParallel(use_local_output=False)  # only its weight is used: split by rows
        parallelize_module(model, world.mesh["tp"], vocab)


def sequence_plan(model: nn.Module, mesh: Any) -> dict[str, Any]:
    """A block's sequence-parallel styles (positions are dim 1 of (B, T, C)); also slices the sequence at the first
    block and gathers it at the final norm, and refuses a sequence length the tp processes cannot split evenly."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (PrepareModuleInput, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    if not model.cfg.final_norm:
        raise ValueError("train.parallel.sequence: needs a model with a final norm (where the sequence is gathered)")
    tp = mesh.size()

    def check(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is not None and ids.shape[1] % tp:
            raise ValueError(f"train.parallel.sequence: a batch of {ids.shape[1]} positions does not split over tp "
                             f"{tp}; use a sequence length divisible by tp")

    model.register_forward_pre_hook(check, with_kwargs=True)
    rest = (None,) * 4  # Block(x, rope, mask, cache, is_causal) and Attention(...): only x changes layout
    parallelize_module(model.blocks[0], mesh, PrepareModuleInput(  # whole embeddings -> this process's positions
        input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest), use_local_output=True))
    parallelize_module(model.norm, mesh, PrepareModuleInput(  # positions -> the whole sequence, for the head
        input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True))
    return {"attn_norm": SequenceParallel(use_local_output=True), "mlp_norm": SequenceParallel(use_local_output=True),
            "attn": PrepareModuleInput(input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "attn.o": RowwiseParallel(output_layouts=Shard(1)), "mlp.down": RowwiseParallel(output_layouts=Shard(1))}


def wrap(model: nn.Module, parallel: ParallelConfig, world: World,
         activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, compile and DDP/FSDP2 to `model` (blocks in
    `model.blocks`). ZeRO-1 runs inside DDP; ZeRO-2 needs no wrapper (its hooks reduce the gradients)."""
    if world.tp > 1:
        if world.data_world > 1 and parallel.dp != "fsdp":
            raise ValueError(f"train.parallel: {world.world} processes with tp {world.tp} make {world.data_world} "
                             f"replicas; with tensor parallelism the data dimension needs dp: fsdp, found "
                             f"{parallel.dp}")
        tensor_parallel(model, world, parallel.sequence)
    if activation_checkpointing:
        model.activation_checkpointing = True  # Transformer.forward recomputes each block in backward
    if compile:
        for block in model.blocks:
            block.compile()  # in place: parameter names stay those of the base model
    if world.data_world == 1 or parallel.dp == "zero2":
        return model
    if parallel.dp in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    mesh = world.mesh["dp"] if world.mesh is not None else None
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sharded(parallel: ParallelConfig, world: World) -> bool:
    """True when no single process holds the whole model (FSDP2 over several processes, or tensor parallel)."""
    return world.tp > 1 or (parallel.dp == "fsdp" and world.world > 1)


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch's `clip_grad_norm_`, also over gradients on several meshes (FSDP2 x TP) or a mix of DTensor and plain
    ones (TP alone): each DTensor norm is completed over its own mesh first. Returns the total norm, a plain tensor."""
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    norms = [torch.linalg.vector_norm(p.grad) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([n.full_tensor() if isinstance(n, DTensor) else n for n in norms]))
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef)
    return norm


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside DDP (FSDP2 shards in place, so it is the model itself)."""
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) \
        else model


def all_reduce_sum(t: torch.Tensor, world: World, group: Any = None) -> torch.Tensor:
    """Sum `t` over all processes (or over `group`, e.g. `world.dp_group`), in place."""
    if world.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
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
