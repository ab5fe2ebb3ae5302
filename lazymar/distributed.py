"""The torchrun layer: one process or N ranks, the same code path.

Under ``torchrun --nproc_per_node N`` each rank generates, decodes and scores its share of a run's batches
(``SamplePlan.batches(rank(), world_size())``); small results (statistics, per-sample values) are gathered in sample
order on rank 0 or on every rank (:func:`gather_samples`, :func:`gather_objects`) and rank 0 prints and writes.
Outside torchrun every function is a no-op that behaves as a world of one: ``rank() == 0``,
``gather_tensors(x) == x``. Communication uses NCCL when this rank computes on CUDA and gloo on the CPU::

    with distributed.launched(args.device) as device:   # init() ... shutdown()
        ...
        tokens = distributed.gather_samples(my_tokens, my_sample_indices)   # rank 0: all, in order; others: None
        if distributed.is_main(): print(...)
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

TIMEOUT = datetime.timedelta(minutes=30)  # a rank may wait this long for the others (e.g. rank 0 scoring FID)


def launched_by_torchrun() -> bool:
    """Whether torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR) is set."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: str | torch.device) -> torch.device:
    """The device of this rank: plain ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; others are kept."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        return torch.device("cuda", local_rank())
    return device


def init(device: str | torch.device = "cpu") -> torch.device:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return this rank's device.

    Without torchrun only the device is resolved. Calling it again is harmless.
    """
    device = rank_device(device)
    if device.type == "cuda":
        if device.index is None:  # plain "cuda" outside torchrun: the current device, named by its index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if launched_by_torchrun() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=TIMEOUT, **kwargs)
    return device


def shutdown() -> None:
    """Leave the process group (after a last barrier, so no rank exits while another still sends)."""
    if dist.is_initialized():
        barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def launched(device: str | torch.device = "cpu") -> Iterator[torch.device]:
    """``init`` on entry, ``shutdown`` on exit (without the last barrier when this rank failed)."""
    resolved = init(device)
    try:
        yield resolved
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown()


def active() -> bool:
    """Whether a process group of more than one rank is running."""
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0, the one that prints and writes."""
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for the collectives of the running backend."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_objects(obj: Any, dst: Optional[int] = 0) -> Optional[list[Any]]:
    """Every rank's picklable ``obj`` in rank order, on rank ``dst`` (None elsewhere) or on all ranks (dst=None)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    if dst is None:
        dist.all_gather_object(out, obj)
        return out
    dist.gather_object(obj, out if rank() == dst else None, dst=dst)
    return out if rank() == dst else None


def gather_tensors(tensor: Tensor, dst: Optional[int] = 0) -> Optional[Tensor]:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order (lengths may differ; the other dimensions and
    the dtype must agree), on rank ``dst`` (None elsewhere) or on all ranks (dst=None); on the input's device."""
    if not active():
        return tensor
    shapes = gather_objects((tuple(tensor.shape), str(tensor.dtype)), dst=None)
    if len({(shape[1:], dtype) for shape, dtype in shapes}) > 1:
        raise ValueError(f"gather_tensors: ranks hold tensors of different trailing shapes or dtypes: {shapes}")
    lengths = [shape[0] for shape, _ in shapes]
    padded = torch.zeros((max(lengths), *tensor.shape[1:]), dtype=tensor.dtype, device=_comm_device())
    padded[:tensor.shape[0]] = tensor.to(padded.device)
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    if dst is not None and rank() != dst:
        return None
    return torch.cat([part[:n] for part, n in zip(parts, lengths)]).to(tensor.device)


def gather_samples(values: Tensor, sample_indices: Tensor | list[int], dst: Optional[int] = 0) -> Optional[Tensor]:
    """Rows of all ranks ordered by their sample index (rank r holds the rows of samples ``sample_indices``).

    The indices of all ranks together must be 0..N-1, each once, as the batches of one ``SamplePlan`` are.
    """
    index = torch.as_tensor(sample_indices, dtype=torch.long).reshape(-1)
    if len(index) != len(values):
        raise ValueError(f"gather_samples: {len(values)} rows but {len(index)} sample indices")
    all_values, all_index = gather_tensors(values, dst), gather_tensors(index, dst)
    if all_values is None:
        return None
    order = torch.argsort(all_index)
    if not torch.equal(all_index[order], torch.arange(len(all_index))):
        raise ValueError("gather_samples: the ranks' sample indices are not 0..N-1 each exactly once")
    return all_values[order.to(all_values.device)]
