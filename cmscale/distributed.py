"""Devices and data parallelism: which device a rank uses, (rank, world), all-reduce and broadcast.

With ``WORLD_SIZE > 1`` (torchrun, or submitit's environment on SLURM) every rank computes its
share of the batch, gradients are averaged with ``all_reduce``, and rank 0 writes. Everything here
is a no-op for a single process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def pick_device(requested: str) -> torch.device:
    """``auto``: this rank's GPU (``LOCAL_RANK``) when CUDA is available, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(requested)


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) from torchrun's variables, or from SLURM through submitit."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_writer_process() -> bool:
    """Whether this process writes the run's files (rank 0): from torchrun's RANK, else SLURM's task id,
    so it can be answered before the process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0


def init_distributed(device: torch.device) -> tuple[int, int]:
    rank, world = distributed_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world


def average_gradients(parameters: list[torch.nn.Parameter], world: int) -> None:
    """All-reduce and average gradients across ranks in one flat buffer (what DDP does, unbucketed).

    Each rank's loss is the mean over its equal share of the batch, so the average of the ranks'
    gradients is the gradient of the mean over the whole batch.
    """
    if world == 1:
        return
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    flat = torch.cat([parameter.grad.reshape(-1) for parameter in parameters])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad.copy_(flat[offset : offset + count].view_as(parameter.grad))
        offset += count


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar tensor over ranks, as a Python float."""
    value = value.detach().float().clone()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return float(value)


def any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if it is true on any rank, so that all ranks leave a loop at the same step."""
    if world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)  # NCCL needs a device tensor
    dist.all_reduce(value)
    return bool(value.item() > 0)


def max_over_ranks(value: int, world: int, device: torch.device) -> int:
    """The largest of an integer over ranks, on every rank (the same answer everywhere)."""
    if world == 1:
        return value
    tensor = torch.tensor([float(value)], device=device)  # NCCL needs a device tensor
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def barrier() -> None:
    """Wait until every rank gets here (no-op for a single process)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_parameters(modules: list[torch.nn.Module]) -> None:
    """Make every rank start from rank 0's weights (fresh inits could differ across hosts)."""
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)
