"""
Several processes (torchrun): each rank trains on its own data, PyTorch's DistributedDataParallel averages the
gradients. train.py asks this file who it is (Dist) and what each rank does of a step (its batch and micro-steps);
everything collective it needs (gather the ranks' resume state, share rank 0's decision, average a loss) is here.

  torchrun --standalone --nproc_per_node=4 train.py    # 4 GPUs (or, with --device cpu, 4 gloo processes)
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

import safety

RANK_SEED_STRIDE = 1000  # rank r of a torchrun job draws data (and dropout) with seed + r * RANK_SEED_STRIDE


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    batch_size: int = 16  # sequences per micro-step of this process
    micro_steps: int = 1  # micro-steps per optimizer step of this process
    device: str = "cpu"

    @property
    def master(self):  # only rank 0 prints, logs and saves
        return self.rank == 0

    def gather(self, obj):
        """A list with every rank's obj (what each rank needs to resume), [obj] for one process."""
        if self.world == 1:
            return [obj]
        objects = [None] * self.world
        dist.all_gather_object(objects, obj)
        return objects

    def share(self, obj):
        """Rank 0's obj on every rank (so that a refusal on rank 0 stops every rank, not only rank 0)."""
        if self.world == 1:
            return obj
        objects = [obj]
        dist.broadcast_object_list(objects, src=0)
        return objects[0]

    def mean(self, value):
        """The mean of a float over the ranks: every rank sees the same loss, so a NaN stops them all."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(tensor)
        return tensor.item() / self.world


def setup_distributed(cfg):
    """Join the torchrun job if there is one (RANK set), else a single process; either way on cfg.device."""
    if "RANK" not in os.environ:
        if cfg.device.startswith("cuda"):
            torch.cuda.set_device(cfg.device)  # cuda:1 must be the current GPU too (pinned memory, new tensors)
        return Dist(batch_size=cfg.batch_size, micro_steps=cfg.grad_accum, device=cfg.device)
    rank, world, local_rank = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    batch_size, micro_steps = safety.split_batch(cfg, world)
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{local_rank}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo",
                            device_id=torch.device(cfg.device) if cfg.device.startswith("cuda") else None)
    ddp = Dist(rank, world, local_rank, batch_size, micro_steps, cfg.device)
    if ddp.master:
        print(f"torchrun: {world} processes share each step's {cfg.batch_size} x {cfg.grad_accum} sequences: "
              f"{micro_steps} micro-step(s) of {batch_size} per process")
    else:
        sys.stdout = open(os.devnull, "w")  # one log for the job: rank 0's (errors still reach every rank's stderr)
    return ddp


def rng_state(device):
    """The random state a resumed run needs (dropout): the CPU generator's, and the GPU's on a GPU."""
    cuda = torch.device(device).type == "cuda"
    return {"rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state(device) if cuda else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") is not None and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
