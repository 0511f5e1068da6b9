"""Training on several processes or GPUs: ``torch.distributed`` and DistributedDataParallel.

``speckle2self train ... --nproc N`` starts N processes through torchrun (``python -m
torch.distributed.run --standalone``); ``torchrun --nproc_per_node N -m Speckle2SelfLib.cli
train ...`` (also across machines, ``--nnodes``) does the same by hand. Each process reads the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) through
:func:`from_environment`; :func:`Speckle2SelfLib.engine.training.train` then

* joins the process group (NCCL on CUDA, gloo on CPU) and wraps the network in
  DistributedDataParallel: gradients are averaged over the processes at every step, so every
  rank holds the same weights;
* draws its own crops (rank 0 the single-process stream of the seed, rank r > 0 a stream
  seeded by (seed, rank), and after a resume by (seed, step, rank)): the global batch is
  N x ``--batch``;
* lets rank 0 alone write checkpoints, previews and the exported model; the checkpoint holds
  no rank state, so a run resumes with another N.

Without torchrun's environment (WORLD_SIZE unset or 1) nothing changes: one process, no group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

NPROC_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None
    owns_group: bool = False          # this context created the process group (and destroys it)

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.active and device.startswith("cuda"):
            import torch
            device = f"cuda:{self.local_rank}"
            torch.cuda.set_device(self.local_rank)
        return device

    def wrap(self, net, device: str):
        """The network as the training step calls it: DistributedDataParallel when distributed."""
        if not self.active:
            return net
        from torch.nn.parallel import DistributedDataParallel

        ids = [int(device.split(":")[1])] if device.startswith("cuda:") else None
        return DistributedDataParallel(net, device_ids=ids)

    def agree(self, values: Sequence[float], stop: bool, clock: float = 0.0) -> tuple:
        """The ranks' mean of ``values`` (the step's losses), whether any rank wants to stop, and
        rank 0's ``clock`` (the elapsed time a budget is judged by): one small all-reduce per step,
        so every rank takes the same decisions."""
        if not self.active:
            return list(values), stop, clock
        import torch
        import torch.distributed as dist

        device = "cuda" if self.backend == "nccl" else "cpu"
        buf = torch.tensor(list(values) + [1.0 if stop else 0.0, clock if self.is_main else 0.0],
                           dtype=torch.float64, device=device)
        dist.all_reduce(buf)
        out = buf.cpu().tolist()
        return [v / self.world_size for v in out[:-2]], out[-2] > 0, out[-1]

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def from_environment(device: str = "auto") -> DistContext:
    """The process group torchrun's environment describes (joined here if it is not yet);
    a single-process context when there is none."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistContext()
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = str(device).startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
    return DistContext(rank, world, local_rank, dist.get_backend(), owns)


def under_torchrun() -> bool:
    return all(key in os.environ for key in NPROC_ENV)


def without_nproc(argv: Sequence[str]) -> List[str]:
    """The command line less ``--nproc N`` (the processes torchrun starts must not start more)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``speckle2self`` with ``argv`` (less ``--nproc``) in ``nproc`` processes through
    torchrun on this machine; returns its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(int(nproc)),
               "-m", "Speckle2SelfLib.cli", *without_nproc([str(a) for a in argv])]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    return subprocess.call(command, env=env)
