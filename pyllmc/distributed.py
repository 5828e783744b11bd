"""Data parallelism for train_gpt2.py: the processes, the gradient all-reduce overlapped with
the backward, and ZeRO-1's sharded optimizer with its parameter exchange as one all-gather.

setup(): one process per GPU under torchrun (RANK, LOCAL_RANK, WORLD_SIZE in the environment),
NCCL between GPUs and gloo between CPU processes; a plain `python train_gpt2.py` is one process.
Every rank starts from rank 0's parameters (broadcast_parameters) and applies the same averaged
update, so the replicas stay identical.

GradientBuckets: the gradients live in a few flat buffers ("buckets" of about 25 MB, filled in
reverse parameter order, roughly the order in which the backward produces them), and every
param.grad is a view of its bucket, so autograd accumulates straight into the buffers and
nothing is copied in or out. On the last micro step of an optimizer step, a hook counts each
parameter's gradient in; when a bucket's last one is in, the bucket's all-reduce starts
(asynchronously) while the backward goes on with the layers below. finish() waits for them
and divides by the world size: element by element the same arithmetic as one all-reduce of
every gradient after the backward, and still one reduction per step (DDP's no_sync).

ShardedParameters (ZeRO-1): each rank steps the parameters it owns. The parameters are views
of one flat buffer laid out rank by rank (each rank's part padded to the longest), so one
all-gather into that buffer hands every rank all the new values: one collective per step,
not one broadcast per parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

BUCKET_BYTES = 25 * 2**20  # DDP's default: big enough to keep the network busy, small enough to start early


@dataclass
class Process:
    """This process's place in the run."""
    rank: int
    local_rank: int
    world_size: int
    device: str        # "cuda:N" or "cpu"
    ddp: bool          # several processes (or one under torchrun): torch.distributed is initialised

    @property
    def device_type(self) -> str:
        return "cuda" if self.device.startswith("cuda") else "cpu"

    @property
    def master(self) -> bool:
        """Rank 0: the one that prints, logs and writes files."""
        return self.rank == 0


def setup(device: str = "") -> Process:
    """This process's rank and device (--device, else cuda when available; one GPU per local rank under
    torchrun), with the process group initialised when there are several."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
    else:
        rank, local_rank, world_size = 0, 0, 1
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and ddp:
        device = f"cuda:{local_rank}"
    process = Process(rank, local_rank, world_size, device, ddp)
    if process.device_type == "cuda":
        torch.cuda.set_device(device)
    if ddp:
        dist.init_process_group(backend="nccl" if process.device_type == "cuda" else "gloo")
    return process


def teardown(process: Process) -> None:
    if process.ddp and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(params: list) -> None:
    """Every replica starts from rank 0's parameters."""
    for p in params:
        dist.broadcast(p.data, src=0)


def partition_parameters(params: list, world_size: int) -> list[int]:
    """ZeRO-1 ownership, the owner rank of each parameter: greedy by size, largest first, onto the
    least-loaded rank (deterministic: every rank computes the same)."""
    load = [0] * world_size
    owner = {}
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += params[i].numel()
    return [owner[i] for i in range(len(params))]


def data_parallel(params: list, optimizer, process: Process, zero_stage: int = 0):
    """(gradient buckets, ZeRO-1's ShardedParameters, this rank's optimizer) for a run of several processes;
    (None, None, optimizer) for one. Every replica starts from rank 0's parameters; the gradients are averaged
    over the ranks bucket by bucket while the step's last backward goes on; with zero_stage 1 each rank holds
    and steps 1/world_size of the optimizer's state (zero1_optimizer)."""
    if not process.ddp:
        return None, None, optimizer
    broadcast_parameters(params)
    buckets = GradientBuckets(params, process.world_size)
    if zero_stage != 1:
        return buckets, None, optimizer
    optimizer, sharded = zero1_optimizer(optimizer, params, process.rank, process.world_size)
    return buckets, sharded, optimizer


def zero1_optimizer(optimizer, params: list, rank: int, world_size: int):
    """ZeRO-1: (this rank's optimizer, None if it owns no parameter; the ShardedParameters whose
    exchange() hands every rank the others' updated parameters after each step). `optimizer` is the
    full one (pyllmc.optim.AdamW over every parameter); the returned one keeps its parameter groups'
    settings for the parameters this rank owns, so each rank holds and steps 1/world_size of the state."""
    owners = partition_parameters(params, world_size)
    sharded = ShardedParameters(params, owners, rank, world_size)
    owned = {id(p) for p, owner in zip(params, owners) if owner == rank}
    groups = []
    for group in optimizer.param_groups:
        mine = [p for p in group["params"] if id(p) in owned]
        if mine:
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": mine})
    if not groups:
        return None, sharded
    return type(optimizer)(groups, **optimizer.defaults, backend=optimizer.backend), sharded


@dataclass
class _Bucket:
    buffer: torch.Tensor                          # (numel,) flat gradients
    params: list = field(default_factory=list)
    ready: int = 0                                # gradients counted in during this step
    work: object = None                           # the async all-reduce, once started


class GradientBuckets:
    """The gradients of `params` in flat buckets, all-reduced during the last backward of a step."""

    def __init__(self, params: list, world_size: int, bucket_bytes: int = BUCKET_BYTES):
        self.world_size = world_size
        self.buckets: list[_Bucket] = []
        self._bucket_of: dict = {}
        self._armed = False
        groups: list[list] = []
        size = 0
        for p in reversed(params):  # the backward reaches the last layers first
            if not p.requires_grad:
                continue
            if not groups or size + p.numel() * p.element_size() > bucket_bytes or p.dtype != groups[-1][0].dtype \
                    or p.device != groups[-1][0].device:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel() * p.element_size()
        for group in groups:
            bucket = _Bucket(torch.zeros(sum(p.numel() for p in group), dtype=group[0].dtype, device=group[0].device))
            offset = 0
            for p in group:
                p.grad = bucket.buffer[offset:offset + p.numel()].view_as(p)  # accumulated into in place
                offset += p.numel()
                bucket.params.append(p)
                self._bucket_of[p] = bucket
                p.register_post_accumulate_grad_hook(self._on_gradient)
            self.buckets.append(bucket)

    def zero_grad(self) -> None:
        """Zero every gradient (one memset per bucket; the .grad views stay)."""
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def arm(self) -> None:
        """The next backward is the step's last micro step: reduce buckets as they fill."""
        self._armed = True
        for bucket in self.buckets:
            bucket.ready, bucket.work = 0, None

    def _on_gradient(self, param: torch.Tensor) -> None:
        if not self._armed:
            return
        bucket = self._bucket_of[param]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, async_op=True)

    def finish(self) -> None:
        """Wait for the reductions (starting any a parameter without gradient held back) and average."""
        for bucket in self.buckets:
            if bucket.work is None:
                bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, async_op=True)
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            bucket.work = None
        self._armed = False


class ShardedParameters:
    """ZeRO-1's parameter exchange: params (owner rank per param) as views of one flat buffer."""

    def __init__(self, params: list, owners: list, rank: int, world_size: int):
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"ShardedParameters takes params of one dtype; got {sorted(map(str, dtypes))}")
        per_rank = [[p for p, owner in zip(params, owners) if owner == r] for r in range(world_size)]
        self.segment = max(sum(p.numel() for p in mine) for mine in per_rank)
        self.flat = torch.zeros(world_size * self.segment, dtype=params[0].dtype, device=params[0].device)
        with torch.no_grad():
            for r, mine in enumerate(per_rank):
                offset = r * self.segment
                for p in mine:
                    view = self.flat[offset:offset + p.numel()].view_as(p)
                    view.copy_(p.data)
                    p.data = view
                    offset += p.numel()
        self.rank = rank
        self.world_size = world_size

    def exchange(self) -> None:
        """After each rank stepped its own parameters: every rank gets all of them (one all-gather)."""
        mine = self.flat[self.rank * self.segment:(self.rank + 1) * self.segment]
        _all_gather_single(self.flat, mine)  # in place: each rank's input is its own segment


# torch 2.13 renamed all_gather_into_tensor (the GPU machine's torch may predate the new name)
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
