"""
The machine side of train.py's run, each piece called there in one line:

  Dist, setup_distributed  several processes (torchrun): each rank trains on its own data, PyTorch's
                           DistributedDataParallel averages the gradients; who a rank is, what it does of a step (its
                           batch and micro-steps), and what the ranks share (resume state, rank 0's decision, a loss)
  rng_state                what a rank needs to continue its random numbers (dropout) after --resume
  to_device, Prefetch      batches onto the GPU without waiting: pinned copies, the next batch made in a thread
  Meter                    speed for the log lines and bench.py

  torchrun --standalone --nproc_per_node=4 train.py    # 4 GPUs (or, with --device cpu, 4 gloo processes)
"""
import os
import sys
import time
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import torch.distributed as dist
# imported before init_process_group, not after: its functions' defaults (group=group.WORLD) are evaluated at import,
# and DistributedDataParallel imports it (through torch._dynamo) on first use. Imported then, it keeps the process group
# alive past destroy_process_group, and the group's gloo threads outlive the interpreter: a rare SIGABRT at exit
if dist.is_available():
    import torch.distributed.nn  # noqa: F401

import safety

RANK_SEED_STRIDE = 1000  # rank r of a torchrun job draws its dropout masks with seed + r * RANK_SEED_STRIDE


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

    def sum(self, value):
        """The sum over the ranks of a number, or of a tensor (in place, on its device: no wait for the GPU). Every
        rank gets the same result, so a NaN loss stops them all."""
        if self.world == 1:
            return value
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value)
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL reduces GPU tensors only
        dist.all_reduce(tensor)
        return tensor.item()


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


def to_device(tensors, device):
    """CPU batches to the device; from pinned memory the copy is asynchronous, so the GPU does not wait for it."""
    if torch.device(device).type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


class Prefetch:
    """make() -> batch, called one batch ahead in a background thread: the NCA simulation (torch) and its gzip filter
    (zlib) release the GIL, so the next batch is made while the training step runs. state() is the data source's
    state before the batch being made, taken when it is asked for (for --resume). The thread is a daemon, so a
    process told to stop never waits for a batch. On a GPU the thread queues its work on a CUDA stream of its own: its
    waits (the gzip filter reads rollouts back to the CPU) then wait for its own kernels only, never for the training
    step's."""

    def __init__(self, make, state, device):
        self.make, self.state, self.ahead = make, state, None  # ahead: (state before the batch, future of it)
        self.side_stream = torch.cuda.Stream(device) if torch.device(device).type == "cuda" else None

    def made(self):
        if self.side_stream is None:
            return self.make(), None
        with torch.cuda.stream(self.side_stream):
            batch = self.make()
            ready = torch.cuda.Event()
            ready.record(self.side_stream)
        return batch, ready

    def submit(self):
        """Start making the next batch; -> (the state before it, its future)."""
        state, future = self.state(), Future()

        def work():
            try:
                future.set_result(self.made())
            except BaseException as e:  # handed to whoever waits for the batch
                future.set_exception(e)
        threading.Thread(target=work, name="nca-prefetch", daemon=True).start()
        return state, future

    def wait(self):
        """Wait until the next batch is made, without taking it."""
        self.ahead = self.ahead or self.submit()
        self.ahead[1].result()

    def next(self):
        self.wait()
        batch, ready = self.ahead[1].result()
        self.ahead = self.submit()
        if ready is not None:
            training_stream = torch.cuda.current_stream(self.side_stream.device)
            training_stream.wait_event(ready)  # the GPU waits for the batch; the CPU goes on
            for tensor in batch:  # made on the side stream, used on this one: the allocator must know
                tensor.record_stream(training_stream)
        return batch

    def state_ahead(self):
        """The state before the batch made ahead (None if there is none): what the batches handed out leave."""
        return self.ahead[0] if self.ahead is not None else None

    def close(self, wait=True):
        """Drop the batch made ahead; with wait, after the thread has finished it (then nothing runs on)."""
        if self.ahead is not None and wait:
            self.ahead[1].exception()
        self.ahead = None


class Meter:
    """Speed for the log lines (tokens/s, the share of time spent waiting for data, ETA), and every step's
    (seconds, tokens, seconds waiting for data) for bench.py."""

    def __init__(self, run):
        self.run, self.start_iter, self.steps = run, run.iter_num, []
        self.t_start = self.t_log = time.time()
        self.tokens_start = self.tokens_log = run.tokens_seen
        self.data_log = 0.0

    def step(self, seconds, tokens, data_time):
        self.steps.append((seconds, tokens, data_time))
        self.data_log += data_time

    def log_line(self, loss, lr):
        run, now = self.run, time.time()
        tok_per_s = (run.tokens_seen - self.tokens_log) / (now - self.t_log)
        eta = (now - self.t_start) / (run.iter_num - self.start_iter) * (run.max_iters - run.iter_num)
        print(f"{run.name} iter {run.iter_num}/{run.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
              f"tokens {run.tokens_seen / 1e6:.2f}M | {tok_per_s:,.0f} tok/s | "
              f"data {self.data_log / (now - self.t_log):.0%} | eta {eta / 60:.1f} min", flush=True)
        self.t_log, self.tokens_log, self.data_log = now, run.tokens_seen, 0.0

    def summary(self):
        seconds = time.time() - self.t_start
        return {"seconds": seconds, "tokens_per_s": (self.run.tokens_seen - self.tokens_start) / seconds,
                "data_wait": sum(s[2] for s in self.steps) / seconds, "steps": self.steps,
                "flops_per_token": self.run.model.flops_per_token()}
