"""Several processes with torch.distributed: data-parallel calibration.

Each rank runs its slice of the calibration windows through the block; the statistics (Gram
matrices, norms, counts) are all-reduced, so every rank holds the same sums; the solves are split
across ranks by job (an input group or a layer, round robin) and each result is broadcast from the
rank that computed it; every rank propagates its own slice; rank 0 writes the output. Launched with
`torchrun --nproc-per-node N -m llmpress compress ...`, or from Python under an initialized process
group (gloo on CPUs, nccl on GPUs).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: torch.device) -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment), join the process group: gloo for the
    CPU, nccl for CUDA (each rank on cuda:LOCAL_RANK). Returns whether it is distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def local_device(device: torch.device) -> torch.device:
    """cuda -> this rank's GPU under torchrun; other devices as they are."""
    if device.type == "cuda" and device.index is None and world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def all_reduce_stats(stats: dict) -> int:
    """Sum every InputStats across ranks in place (same dict order on every rank); returns the
    bytes each rank sent into the reductions."""
    sent = 0
    for s in stats.values():
        for t in (s.gram, s.sq_sum, s.abs_sum, s.cross):
            if t is not None:
                dist.all_reduce(t)
                sent += t.numel() * t.element_size()
        count = torch.tensor([float(s.count)], dtype=torch.float64, device=s.abs_sum.device)
        dist.all_reduce(count)
        s.count = int(count.item())
        s.memo = {}
    return sent


def broadcast_results(results, owner: int, device: torch.device):
    """The solver's [(module, info)] from rank `owner` onto every rank: specs and infos as objects,
    then each stored tensor. Non-owners pass results=None and get shells filled by the broadcast."""
    from llmpress.modules import from_spec, module_spec
    rank, _ = world()
    header = [[(module_spec(m), info) for m, info in results] if rank == owner else None]
    dist.broadcast_object_list(header, src=owner)
    if rank != owner:
        results = [(from_spec(spec).to(device), info) for spec, info in header[0]]
    for module, _ in results:
        for t in module.state_dict().values():
            dist.broadcast(t, src=owner)        # shells' buffers are filled in place
    return results
