"""
Train a small Llama in three stages: NCA pre-pre-training, language pre-training, fine-tuning.

  stage 1 prepretrain  next-token prediction on NCA rollouts streamed from nca.py (or a control corpus: dyck,
                       random, c4)
  stage 2 pretrain     the same transformer on text (data/<name>/train.bin); token embedding and output head are
                       re-initialised because the vocabulary changes, everything else carries over
  stage 3 finetune     prompt/completion pairs (data/<task>/*.jsonl), the loss on completion tokens only

Read it in this order: build_model (what stage 2 keeps of stage 1), then the loop: train_stage -> setup_stage,
optimizer_step, evaluate_and_save. The data sources (NCAData, TokenData, PairData) come before it; StopSignal, Meter
(Ctrl-C, speed book-keeping), --bench and --check can be skipped on a first read.

Every hyperparameter is a flag (python train.py --help). Examples:

  python train.py                                   # all three stages on the offline default (stdlib code, arith)
  python train.py --prepretrain_iters 0             # the control: the same run with no stage 1 (from scratch)
  python train.py --prepretrain_data dyck           # the Dyck control for stage 1
  python train.py --prepretrain_data random         # the random-token control: a warm start with nothing to learn
  python train.py --stage pretrain --init_from out/prepretrain/ckpt.pt --reinit embedding,head,attention
  python train.py --resume                          # continue an interrupted run where it stopped
  python train.py --check                           # on a new machine: every GPU path, PASS/FAIL per item

Each stage writes out_dir/<stage>/ckpt.pt (the latest state, saved atomically) and out_dir/<stage>/log.jsonl
(one line per evaluation, read by eval.py).
"""
import argparse
import dataclasses
import fcntl
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, asdict, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import nca
from eval import probe
from data.common import DATA_DIR, check_prepared, get_tokenizer, load_meta, load_pairs, prepare_command, read_jsonl
from model import GPT, GROUPS, ModelConfig, arg, estimate_memory, load_checkpoint, transfer

STAGES = ("prepretrain", "pretrain", "finetune")
REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
OFFLINE_DATA = ("stdlib", "dyck", "random", "arith")  # made from what is on this machine: prepared on first use
NCA_DATA = ("nca", "nca-shuffled")  # stage-1 data streamed from nca.py


@dataclass
class TrainConfig:
    # run
    stage: str = arg("all", "prepretrain | pretrain | finetune | all (the three in order)")
    out_dir: str = arg("out", "each stage writes out_dir/<stage>/ckpt.pt and log.jsonl")
    init_from: str = arg("", 'checkpoint to start from ("" = from scratch; --stage all chains the stages)')
    resume: bool = arg(False, "continue out_dir/<stage>/ckpt.pt where it stopped")
    seed: int = arg(0, "seeds the model init and the data order")
    data_dir: str = arg(DATA_DIR, "datasets live in data_dir/<name>/")
    device: str = arg("auto", "cpu, cuda or cuda:N; auto: cuda when torch sees a GPU, else cpu")
    dtype: str = arg("auto", "autocast precision: float32, bfloat16 or float16; auto: bfloat16 on a GPU that runs it "
                             "natively (Ampere or newer), else float32 (weights and AdamW stay float32)")
    compile: bool = arg(False, "torch.compile the model (GPU)")
    peak_tflops: float = arg(0.0, "the device's peak for the MFU estimate; 0 = look the GPU up in PEAK_TFLOPS")
    bench: bool = arg(False, "measure NCA and training throughput on this config, then exit")
    check: bool = arg(False, "check every GPU path in a few minutes (PASS/FAIL per item), then exit")
    # stage 1: pre-pre-training. "nca" streams fresh rules; any other name is a token corpus in data/
    prepretrain_data: str = arg("nca", "nca (streamed); nca-shuffled (the same with every sequence's patch tokens "
                                       "permuted: the control with NCA's token statistics and no dynamics); or a token "
                                       "corpus in data_dir as a control (dyck, random, c4)")
    prepretrain_iters: int = arg(150, "0 skips the stage: the from-scratch control")
    prepretrain_lr: float = arg(3e-4, "gentle: aggressive stage-1 rates hurt the transfer at small scale")
    prepretrain_schedule: str = arg("cosine", "cosine (as the other stages) or ramp: linear warmup over the whole "
                                              "stage, never decayed (what the authors' code ran)")
    nca_prefetch: bool = arg(True, "make the next NCA batch in a background thread while the model trains")
    nca_num_rules: int = arg(0, "0: a fresh rule for every sequence; N: a fixed pool of N rules")
    nca_chunk: int = arg(0, "NCA rules simulated together (0: 512 on CPU, 4096 on a GPU)")
    # stage 2: language pre-training
    pretrain_data: str = arg("stdlib", "a token corpus in data_dir")
    pretrain_iters: int = arg(1000, "iterations of stage 2")
    pretrain_lr: float = arg(2e-3, "peak learning rate of stage 2")
    reinit: str = arg("auto", "groups re-initialised on transfer (comma-separated: embedding, head, attention, mlp, "
                              "norm); auto: embedding,head after stage 1 (as the paper; also for controls with the "
                              "same vocabulary) or on a new vocabulary")
    freeze: str = arg("", "groups kept frozen after transfer (comma-separated, as --reinit)")
    embed_init: str = arg("small", "how a fresh embedding and head of the text stages start (from scratch, or "
                                   "re-initialised after NCA): small (N(0, 0.02)) or torch (PyTorch's defaults: "
                                   "embedding N(0, 1), head uniform; the authors' code, in both arms). Stage 1 always "
                                   "starts small")
    # stage 3: fine-tuning
    finetune_data: str = arg("arith", "prompt/completion pairs in data_dir")
    finetune_iters: int = arg(300, "iterations of stage 3")
    finetune_lr: float = arg(5e-4, "peak learning rate of stage 3")
    # optimisation, shared by the stages
    batch_size: int = arg(16, "sequences per micro-step")
    grad_accum: int = arg(1, "micro-steps per optimizer step")
    warmup_frac: float = arg(0.1, "linear warmup over this fraction of the stage's iterations")
    min_lr_frac: float = arg(0.1, "cosine decay ends at min_lr_frac * lr")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    beta1: float = arg(0.9, "AdamW beta1")
    beta2: float = arg(0.95, "AdamW beta2")
    grad_clip: float = arg(1.0, "0 disables clipping")
    # evaluation and logging
    eval_interval: int = arg(100, "iterations between evaluations (and checkpoints)")
    eval_iters: int = arg(10, "batches per loss estimate (the same fixed batches every time)")
    log_interval: int = arg(10, "iterations between log lines")

    def __post_init__(self):  # "auto" resolves to what this machine has
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.dtype == "auto":
            native_bf16 = self.device.startswith("cuda") and torch.cuda.is_available() and \
                torch.cuda.is_bf16_supported(including_emulation=False)
            self.dtype = "bfloat16" if native_bf16 else "float32"


# dense bf16 peak of common GPUs (vendor datasheets), for the MFU estimate: (pattern searched in
# torch.cuda.get_device_name, TFLOP/s), the first match wins, so variants come before their family. CPUs get no MFU.
PEAK_TFLOPS = [(r"H[12]00.*NVL", 835.0), (r"H100.*PCIe", 756.0), (r"H100|H200", 989.0), (r"A100", 312.0),
               (r"L40S", 362.0), (r"L40\b", 181.0), (r"L4\b", 121.0), (r"A10G", 70.0), (r"A10\b", 125.0),
               (r"RTX 4090", 165.0), (r"RTX 3090", 71.0)]
WARMUP_STEPS = 5  # steps the benchmark leaves out of its steady-state numbers (compilation, allocator)
RANK_SEED_STRIDE = 1000  # rank r of a torchrun job draws data with seed + r * RANK_SEED_STRIDE


# -----------------------------------------------------------------------------
# flags: one per dataclass field, defaults live in the dataclasses only

def add_flags(parser, cls, skip=()):
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.type is bool or isinstance(f.default, bool):
            parser.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=f.metadata.get("help"))
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, help=f.metadata.get("help"))


def pick(args, cls, **extra):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}, **extra)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, TrainConfig)
    add_flags(parser, ModelConfig, skip=("vocab_size",))  # the vocabulary comes from the data
    nca.add_config_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg = pick(args, TrainConfig)
        model_cfg = pick(args, ModelConfig, vocab_size=1)
        nca_cfg = nca.config_from_args(args)
        validate(cfg, model_cfg, nca_cfg)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg, model_cfg, nca_cfg


def split_groups(flag, value):
    groups = [g for g in value.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"--{flag}: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    return groups


def validate(cfg, model_cfg, nca_cfg):
    """Every check that can be made before any work, with a message naming the flag and the fix."""
    validate_flags(cfg)
    model_cfg.validate()
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    validate_checkpoints(cfg, model_cfg, nca_cfg, stages)
    for stage in stages:
        validate_data(stage, cfg, model_cfg, nca_cfg)


def validate_flags(cfg):
    if cfg.stage not in STAGES + ("all",):
        raise ValueError(f"--stage {cfg.stage!r}: choose one of {', '.join(STAGES)} or all")
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.bench and cfg.prepretrain_iters <= WARMUP_STEPS:
        raise ValueError(f"--bench measures stage 1 after {WARMUP_STEPS} warm-up steps; --prepretrain_iters "
                         f"{cfg.prepretrain_iters} leaves none, use e.g. --prepretrain_iters 50")
    if cfg.nca_chunk < 0:
        raise ValueError(f"--nca_chunk must be >= 0 (0 picks by device), got {cfg.nca_chunk}")
    if cfg.nca_num_rules < 0 or cfg.nca_num_rules > 10 ** 8:
        raise ValueError(f"--nca_num_rules {cfg.nca_num_rules}: use 0 (a fresh rule per sequence) or a pool of 1 to "
                         f"10^8 rules (the paper: 16000)")
    for stage in STAGES:
        if getattr(cfg, f"{stage}_iters") < 0:
            raise ValueError(f"--{stage}_iters must be >= 0, got {getattr(cfg, f'{stage}_iters')}")
        lr = getattr(cfg, f"{stage}_lr")
        if not 0 < lr < 1:
            raise ValueError(f"--{stage}_lr={lr} is out of range; learning rates are in (0, 1), e.g. 1e-3")
    for name in ("warmup_frac", "min_lr_frac"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {cfg.dtype!r}: choose float32, bfloat16 or float16")
    for flag, value, choices in (("prepretrain_schedule", cfg.prepretrain_schedule, ("cosine", "ramp")),
                                 ("embed_init", cfg.embed_init, ("small", "torch"))):
        if value not in choices:
            raise ValueError(f"--{flag} {value!r}: choose {' or '.join(choices)}")
    validate_device(cfg.device)
    validate_optimizer(cfg)
    if cfg.reinit != "auto":
        split_groups("reinit", cfg.reinit)
    if set(split_groups("freeze", cfg.freeze)) >= set(GROUPS):
        raise ValueError(f"--freeze {cfg.freeze}: every group frozen leaves nothing to train")


def validate_checkpoints(cfg, model_cfg, nca_cfg, stages):
    """out_dir, --init_from and --resume (read lazily with mmap: a big checkpoint costs nothing here)."""
    if os.path.exists(cfg.out_dir) and not os.path.isdir(cfg.out_dir):
        raise ValueError(f"--out_dir {cfg.out_dir} is a file; give a folder (it will hold <stage>/ckpt.pt)")
    if cfg.init_from and cfg.resume:
        raise ValueError("--init_from and --resume exclude each other: --resume continues out_dir/<stage>/ckpt.pt")
    if cfg.init_from:
        load_checkpoint(cfg.init_from, flag="--init_from ", mmap=True)  # fail now, not after preparing data
    if cfg.resume:  # the flags that shape the model, the schedule and the data must be the checkpoint's
        for stage in stages:
            path = os.path.join(cfg.out_dir, stage, "ckpt.pt")
            if os.path.exists(path):
                check_resume(load_checkpoint(path, "--resume: ", mmap=True), stage, cfg, model_cfg, nca_cfg, path)


def validate_data(stage, cfg, model_cfg, nca_cfg):
    """The stage's dataset exists and looks whole (the offline ones are made on first use)."""
    if not os.path.isdir(cfg.data_dir):
        raise ValueError(f"--data_dir {cfg.data_dir}: no such folder (the default is this repository's data/)")
    name = getattr(cfg, f"{stage}_data")
    if stage == "prepretrain" and name in NCA_DATA:
        if model_cfg.block_size < nca_cfg.frame_len:
            raise ValueError(f"--block_size {model_cfg.block_size} is shorter than one NCA frame "
                             f"({nca_cfg.frame_len} tokens); use at least {2 * nca_cfg.frame_len}")
        return
    if name in OFFLINE_DATA:
        return
    data_dir = os.path.join(cfg.data_dir, name)
    if not os.path.isdir(data_dir):
        known = sorted({d for d in os.listdir(cfg.data_dir) if os.path.isdir(os.path.join(cfg.data_dir, d))}
                       - {"hf", "__pycache__"} | set(OFFLINE_DATA))
        raise ValueError(f"--{stage}_data {name!r}: there is no {data_dir}; datasets there or made offline: "
                         f"{', '.join(known)} (the web corpora: python -m data.hf.prepare --dataset NAME)")
    if stage == "finetune":  # missing or broken files: say so now, not hours later
        load_meta(data_dir, name)
        for split in ("train", "val"):
            load_pairs(data_dir, split, name)
    else:
        check_prepared(data_dir, name)


def validate_device(device):
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device name torch knows; use cpu, cuda or cuda:N") from None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: torch sees no GPU here (a CPU-only torch build, or no driver); use "
                             f"--device cpu")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif kind != "cpu":
        raise ValueError(f"--device {device}: train.py runs on cpu or cuda")


def validate_optimizer(cfg):
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be in [0, 1), got {getattr(cfg, name)} (AdamW's usual: 0.9 and 0.95)")
    for name in ("weight_decay", "grad_clip"):
        value = getattr(cfg, name)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} must be a finite number >= 0, got {value}")


# -----------------------------------------------------------------------------
# several processes (torchrun): PyTorch's DistributedDataParallel, each rank with its own data

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def master(self):  # only rank 0 prints, logs and saves
        return self.rank == 0


def setup_distributed(cfg):
    """Join the torchrun job if there is one (RANK set); a single process otherwise."""
    if "RANK" not in os.environ:
        return Dist()
    ddp = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if cfg.grad_accum % ddp.world:
        raise ValueError(f"--grad_accum {cfg.grad_accum}: the micro-steps of one optimizer step are shared by the "
                         f"{ddp.world} processes, so use a multiple of {ddp.world}")
    if cfg.device.startswith("cuda"):
        cfg.device = f"cuda:{ddp.local_rank}"
        torch.cuda.set_device(cfg.device)
    dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
    if not ddp.master:
        sys.stdout = open(os.devnull, "w")  # one log for the job: rank 0's
    return ddp


def gather(obj, ddp):
    """A list with every rank's obj (what each rank needs to resume), [obj] for one process."""
    if ddp.world == 1:
        return [obj]
    objects = [None] * ddp.world
    dist.all_gather_object(objects, obj)
    return objects


# -----------------------------------------------------------------------------
# data: three sources with one interface (get_batch, vocabulary, state for --resume)

def prepared(cfg, name, kind):
    """Check data_dir/<name> is prepared; the offline datasets are prepared on first use."""
    data_dir = os.path.join(cfg.data_dir, name)
    check = check_prepared if kind == "tokens" else load_meta
    try:
        return data_dir, check(data_dir, name)
    except (FileNotFoundError, ValueError):
        if name not in OFFLINE_DATA:
            raise
    print(f"preparing {data_dir} (python -m data.{name}.prepare --out_dir {data_dir}) ...")
    __import__(f"data.{name}.prepare", fromlist=["main"]).main(["--out_dir", data_dir])
    return data_dir, check(data_dir, name)


class Data:
    """What the loop needs of a data source: get_batch("train"), the fixed validation batches, and the state that
    --resume restores. Subclasses draw training batches with self.generator and build self.val once."""

    def val_batches(self):
        return self.val

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


class NCAData(Data):
    """Stage-1 batches streamed from nca.py; the validation set is a fixed set of held-out rules."""

    def __init__(self, nca_cfg, cfg, block_size, rank=0, shuffle=False):
        self.name, self.tokenizer, self.eot_token = "nca-shuffled" if shuffle else "nca", None, None
        self.nca_cfg, self.shuffle = nca_cfg, shuffle
        self.vocab_size = nca_cfg.vocab_size
        self.stream = nca.NCAStream(nca_cfg, cfg.batch_size, block_size, seed=cfg.seed + RANK_SEED_STRIDE * rank,
                                    device=cfg.device, num_rules=cfg.nca_num_rules, chunk=cfg.nca_chunk)
        held_out = nca.NCAStream(nca_cfg, cfg.batch_size, block_size, seed=cfg.seed, device=cfg.device,
                                 chunk=cfg.nca_chunk, held_out=True)  # rules no training stream draws
        self.val = [self.shuffled(*held_out.next_batch()) for _ in range(cfg.eval_iters)]
        # one batch made ahead in a thread: simulation (torch) and the gzip filter (zlib) release the GIL, so the
        # next batch is made while the training step runs. The thread works on the one stream, one batch at a time.
        self.worker = ThreadPoolExecutor(max_workers=1) if cfg.nca_prefetch else None
        self.ahead = None  # future of (stream state before the batch, batch, CUDA event marking it ready)
        # on a GPU the thread queues its work on a CUDA stream of its own: its waits (the gzip filter reads rollouts
        # back to the CPU) then wait for its own kernels only, never for the training step's
        gpu = torch.device(cfg.device).type == "cuda"
        self.side_stream = torch.cuda.Stream(cfg.device) if gpu and self.worker else None

    def make_batch(self):
        state = self.stream.state_dict()  # plain numbers: no copy from the GPU
        if self.side_stream is None:
            return state, self.shuffled(*self.stream.next_batch()), None
        with torch.cuda.stream(self.side_stream):
            batch = self.shuffled(*self.stream.next_batch())
            ready = torch.cuda.Event()
            ready.record(self.side_stream)
        return state, batch, ready

    def get_batch(self, split):
        if self.worker is None:
            return self.shuffled(*self.stream.next_batch())
        _, batch, ready = (self.ahead or self.worker.submit(self.make_batch)).result()
        self.ahead = self.worker.submit(self.make_batch)
        if ready is not None:
            training_stream = torch.cuda.current_stream(self.side_stream.device)
            training_stream.wait_event(ready)  # the GPU waits for the batch; the CPU goes on
            for tensor in batch:  # made on the side stream, used on this one: the allocator must know
                tensor.record_stream(training_stream)
        return batch

    def shuffled(self, x, y):
        """For nca-shuffled: the patch tokens of each sequence permuted (nca.shuffle_patches), targets re-made."""
        if not self.shuffle:
            return x, y
        tokens = nca.shuffle_patches(torch.cat([x, y[:, -1:]], dim=1), self.nca_cfg)
        x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        y[:, :self.nca_cfg.frame_len - 1] = -1  # the first frame stays unscored, as in nca.NCAStream
        return x, y

    def state_dict(self):
        # a checkpoint records the batches the model has seen, not the one made ahead: the state before that one
        return self.ahead.result()[0] if self.ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state):
        if self.ahead is not None:
            self.ahead.result()  # let the thread finish before the stream is rewound
            self.ahead = None
        self.stream.load_state_dict(state)


def to_device(tensors, device):
    """CPU batches to the device; from pinned memory the copy is asynchronous, so the GPU does not wait for it."""
    if torch.device(device).type != "cuda":
        return tensors
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


class TokenData(Data):
    """nanoGPT's memmapped uint16 corpus: random windows for training, fixed windows for validation."""

    def __init__(self, name, cfg, block_size, rank=0):
        self.data_dir, meta = prepared(cfg, name, "tokens")
        self.name, self.tokenizer, self.eot_token = name, meta["tokenizer"], meta["eot_token"]
        self.vocab_size, self.block_size, self.batch_size = meta["vocab_size"], block_size, cfg.batch_size
        self.device = cfg.device
        self.generator = torch.Generator().manual_seed(cfg.seed + RANK_SEED_STRIDE * rank)
        for split in ("train", "val"):  # checked now: a bad id would crash the first forward (on CUDA: an assert)
            path = os.path.join(self.data_dir, f"{split}.bin")
            tokens = np.memmap(path, dtype=np.uint16, mode="r")
            if len(tokens) <= block_size + 1:
                raise ValueError(f"{path} holds {len(tokens)} tokens, too few for --block_size {block_size}")
            if int(tokens.max()) >= self.vocab_size:
                raise ValueError(f"{path} holds token id {int(tokens.max())}, but its meta.json says vocab_size "
                                 f"{self.vocab_size}; remake the folder: {prepare_command(self.data_dir, name)}")
        fixed = torch.Generator().manual_seed(1234)  # the same validation windows at every evaluation
        self.val = [self.batch("val", fixed) for _ in range(cfg.eval_iters)]

    def batch(self, split, generator):
        # a new memmap per batch: nanoGPT's way to avoid numpy's memmap holding on to memory
        data = np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - self.block_size - 1, (self.batch_size,), generator=generator)
        rows = torch.stack([torch.from_numpy(data[i:i + self.block_size + 1].astype(np.int64)) for i in starts])
        return to_device((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()), self.device)

    def get_batch(self, split):
        return self.batch(split, self.generator)


class PairData(Data):
    """Stage-3 prompt/completion pairs, tokenised with the model's tokenizer; loss on completion tokens only."""

    def __init__(self, name, cfg, block_size, tokenizer, rank=0):
        self.data_dir, meta = prepared(cfg, name, "pairs")
        self.name, self.tokenizer, self.stop = name, tokenizer, meta["stop"]
        enc = get_tokenizer(tokenizer)
        self.vocab_size, self.eot_token = enc.n_vocab, enc.eot_token
        self.batch_size, self.block_size, self.device = cfg.batch_size, block_size, cfg.device
        self.pairs = {split: [(enc.encode_ordinary(r["prompt"]), enc.encode_ordinary(r["completion"]))
                              for r in load_pairs(self.data_dir, split)] for split in ("train", "val")}
        longest = max(len(p) + len(c) for pairs in self.pairs.values() for p, c in pairs)
        if longest > block_size + 1:
            raise ValueError(f"{self.data_dir} has a prompt + completion of {longest} tokens; --block_size "
                             f"{block_size} must be at least {longest - 1}")
        self.generator = torch.Generator().manual_seed(cfg.seed + RANK_SEED_STRIDE * rank)
        val = self.pairs["val"]
        self.val = [self.collate(val[i:i + self.batch_size]) for i in
                    range(0, min(len(val), cfg.eval_iters * self.batch_size), self.batch_size)]

    def collate(self, pairs):
        """Pad to the longest pair with eot; targets are -1 on the prompt and the padding."""
        T = max(len(p) + len(c) for p, c in pairs) - 1
        x = torch.full((len(pairs), T), self.eot_token)
        y = torch.full((len(pairs), T), -1)
        for row, (prompt, completion) in enumerate(pairs):
            seq = torch.tensor(prompt + completion)
            x[row, :len(seq) - 1] = seq[:-1]
            y[row, len(prompt) - 1:len(seq) - 1] = seq[len(prompt):]  # targets: the completion tokens only
        return to_device((x, y), self.device)

    def get_batch(self, split):
        pairs = self.pairs[split]
        picks = torch.randint(len(pairs), (self.batch_size,), generator=self.generator)
        return self.collate([pairs[i] for i in picks])


def make_data(stage, cfg, nca_cfg, block_size, tokenizer, rank=0):
    if stage == "prepretrain" and cfg.prepretrain_data in NCA_DATA:
        return NCAData(nca_cfg, cfg, block_size, rank, shuffle=cfg.prepretrain_data == "nca-shuffled")
    if stage == "finetune":
        return PairData(cfg.finetune_data, cfg, block_size, tokenizer, rank)
    return TokenData(getattr(cfg, f"{stage}_data"), cfg, block_size, rank)


# -----------------------------------------------------------------------------
# schedule and evaluation

def get_lr(it, max_iters, lr, warmup_frac, min_lr_frac):
    """Linear warmup from (it+1)/warmup, then cosine decay to min_lr_frac * lr at the last iteration."""
    warmup = int(warmup_frac * max_iters)
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, max_iters - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def lr_at(run, cfg):
    """The learning rate of the stage's current iteration. Stage 1 may ramp instead (--prepretrain_schedule ramp):
    warmup over the whole stage and no decay, so it ends at its peak rate."""
    if run.name == "prepretrain" and cfg.prepretrain_schedule == "ramp":
        return get_lr(run.iter_num, run.max_iters, run.base_lr, warmup_frac=1.0, min_lr_frac=1.0)
    return get_lr(run.iter_num, run.max_iters, run.base_lr, cfg.warmup_frac, cfg.min_lr_frac)


@torch.no_grad()
def estimate_loss(model, data, autocast):
    """Mean loss over the fixed validation batches (the same ones every time, so curves are comparable)."""
    model.eval()
    losses = []
    for x, y in data.val_batches():
        with autocast:
            losses.append(model(x, y)[1].item())
    model.train()
    return float(np.mean(losses))


def peak_flops(cfg):
    """FLOP/s of one device at 100% utilisation, or None where unknown (CPUs, GPUs not in PEAK_TFLOPS)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if torch.device(cfg.device).type == "cuda":
        name = torch.cuda.get_device_name(cfg.device)
        for pattern, tflops in PEAK_TFLOPS:
            if re.search(pattern, name):
                return tflops * 1e12
    return None


# -----------------------------------------------------------------------------
# checkpoints and logs: one writer per stage folder, written so that a kill at any moment loses nothing

def save_checkpoint(path, checkpoint):
    """Write to a temporary file of this process in the same folder, then rename it over the old checkpoint: a kill
    mid-save leaves the previous checkpoint whole. A failed save removes its temporary file."""
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except Exception as e:
        free = shutil.disk_usage(folder).free  # before the partial file is removed
        if free < 2 ** 26:  # torch.save says "unexpected pos ..." when the disk fills up
            raise RuntimeError(f"saving {path}: the disk is full ({free / 2 ** 20:.0f} MiB free); free some space "
                               f"and continue with --resume (the previous checkpoint is kept)") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def stage_lock(stage_dir, ddp):
    """One run per stage folder: rank 0 holds an exclusive lock on stage_dir/lock while the stage runs, and a second
    run on the same folder stops at once with a message naming the first."""
    if not ddp.master:
        yield
        return
    with open(os.path.join(stage_dir, "lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise RuntimeError(f"{stage_dir} is in use by another run ({f.read().strip() or 'unknown'}); wait for "
                               f"it to finish or give this run another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        f.flush()
        for name in os.listdir(stage_dir):  # what a run killed mid-save left (no other writer can be at work now)
            if name.startswith("ckpt.pt.") and name.endswith(".tmp"):
                os.remove(os.path.join(stage_dir, name))
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_log(log_path, record):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(log_path, iter_num):
    """On --resume: keep the records up to the checkpoint's iteration (later ones are made again) and drop a torn or
    blank line that a kill mid-write left. A missing log starts anew."""
    if not os.path.exists(log_path):
        print(f"--resume: {log_path} is missing; a new log starts at iteration {iter_num}")
        return
    kept = []
    with open(log_path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("iter", math.inf) <= iter_num:
                kept.append(json.dumps(record) + "\n")
    with open(log_path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(log_path + ".tmp", log_path)


RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "warmup_frac", "min_lr_frac")


def check_resume(checkpoint, stage, cfg, model_cfg, nca_cfg, ckpt_path):
    """--resume continues a run as it was planned: flags that shape the model, the schedule or the data must be the
    checkpoint's, or the run would silently keep the old model or re-plan its learning rate."""
    saved, saved_cfg = checkpoint["model_args"], checkpoint.get("config", {})
    differ = [f"--{k} {v} (checkpoint: {saved.get(k)})" for k, v in asdict(model_cfg).items()
              if k != "vocab_size" and saved.get(k) != v]
    for k in (f"{stage}_iters", f"{stage}_lr", f"{stage}_data") + RESUME_MUST_MATCH:
        if saved_cfg.get(k) != getattr(cfg, k):
            differ.append(f"--{k} {getattr(cfg, k)} (checkpoint: {saved_cfg.get(k)})")
    saved_nca = checkpoint.get("nca_config")
    if saved_nca is not None:
        differ += [f"--{k} {v} (checkpoint: {saved_nca.get(k)})" for k, v in asdict(nca_cfg).items()
                   if saved_nca.get(k) != v]
    if differ:
        raise ValueError(f"--resume: {ckpt_path} was made with other settings: {'; '.join(differ)}. Resume with the "
                         f"checkpoint's values, or start afresh with another --out_dir")


# -----------------------------------------------------------------------------
# one stage: set up (or resume), then optimizer steps, evaluating and saving every eval_interval

@dataclass
class Stage:
    """What one stage's loop works on. `model` is what is saved; `train_model` what runs forward and backward (the
    same module, DDP-wrapped and/or compiled); `ddp_model` the DDP wrapper, where gradient sync is switched."""
    name: str
    model: GPT
    optimizer: torch.optim.Optimizer
    data: "Data"
    max_iters: int
    base_lr: float
    ckpt_path: str
    log_path: str
    iter_num: int = 0
    tokens_seen: int = 0
    prior_tokens: int = 0  # tokens of the stages before, for the compute-matched comparison
    best_val_loss: float = math.inf
    start_iter: int = 0
    resumed: bool = False
    train_model: torch.nn.Module = None
    ddp_model: torch.nn.Module = None
    autocast: object = None
    scaler: object = None


def build_model(stage, cfg, model_cfg, data, init):
    """From scratch, or from a previous stage's checkpoint through the explicit transfer (model.transfer): the
    transformer carries over, the groups in --reinit (by default the embedding and the head, whose vocabulary
    changes after NCA) start afresh. Built on the CPU; the caller moves it to the device."""
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    if init is None:
        model, reinit = GPT(model_cfg), ["embedding", "head"]
        print(f"model: from scratch, {model.num_params():,} parameters")
    else:
        model, reinit = transferred_model(stage, cfg, model_cfg, data, init)
    if cfg.embed_init == "torch" and stage != "prepretrain":  # PyTorch's own init of a fresh embedding and head
        for group, module in (("embedding", model.embed_tokens), ("head", model.lm_head)):
            if group in reinit:
                module.reset_parameters()
    return model


def transferred_model(stage, cfg, model_cfg, data, init):
    """The model carried over from the checkpoint init, and the groups that start afresh."""
    if cfg.reinit == "auto":  # a new corpus after pre-pre-training (or a new vocabulary): new embedding and head
        new_corpus = init["stage"] == "prepretrain" or init["model_args"]["vocab_size"] != data.vocab_size
        reinit = ["embedding", "head"] if new_corpus else []
    else:
        reinit = split_groups("reinit", cfg.reinit)
    if "embedding" not in reinit and init["data"]["tokenizer"] != data.tokenizer:
        raise ValueError(f"--init_from was trained with tokenizer {init['data']['tokenizer']!r} but data "
                         f"{data.name!r} uses {data.tokenizer!r}: add embedding,head to --reinit")
    print(f"model: {stage} starts from the {init['stage']} checkpoint ({init['data']['name']}, "
          f"{init['tokens_seen']:,} tokens)")
    return transfer(init["model"], model_cfg, reinit=reinit, freeze=split_groups("freeze", cfg.freeze)), reinit


def setup_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp):
    """The model, optimizer and data of a stage, from scratch, from init_path, or resumed from its own checkpoint.
    Checkpoints are read to the CPU and dropped once copied: nothing of them stays alive during training."""
    stage_dir = os.path.join(cfg.out_dir, stage)
    ckpt_path, log_path = os.path.join(stage_dir, "ckpt.pt"), os.path.join(stage_dir, "log.jsonl")
    resume = init = None
    if cfg.resume and os.path.exists(ckpt_path):
        resume = load_checkpoint(ckpt_path, "--resume: ")
    else:
        if cfg.resume:
            print(f"--resume: there is no {ckpt_path} yet, so {stage} starts fresh")
        if init_path:  # the previous stage's checkpoint (or --init_from)
            init = load_checkpoint(init_path, "--init_from ")
    max_iters, base_lr = getattr(cfg, f"{stage}_iters"), getattr(cfg, f"{stage}_lr")
    if resume is not None and resume["iter_num"] >= max_iters:
        print(f"== {stage}: already complete in {ckpt_path}, skipping")
        return None
    tokenizer = (resume or init or {}).get("data", {}).get("tokenizer")
    if stage == "finetune" and tokenizer is None:  # from scratch: the pre-training corpus's tokenizer
        tokenizer = prepared(cfg, cfg.pretrain_data, "tokens")[1]["tokenizer"]
    print(f"== {stage}: {max_iters} iterations on {getattr(cfg, f'{stage}_data')}, lr {base_lr}")
    torch.manual_seed(cfg.seed)
    data = make_data(stage, cfg, nca_cfg, model_cfg.block_size, tokenizer, ddp.rank)
    if resume is not None:
        model = GPT(ModelConfig(**resume["model_args"]))
        model.load_state_dict(resume["model"])
        for name, p in model.named_parameters():  # frozen groups stay frozen across a resume
            p.requires_grad_(name in resume["trainable"])
        print(f"resuming {ckpt_path} at iteration {resume['iter_num']}")
    else:
        model = build_model(stage, cfg, model_cfg, data, init)
    check_memory(model.config, cfg, ddp)
    model.to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, base_lr, (cfg.beta1, cfg.beta2),
                                           torch.device(cfg.device).type)
    run = Stage(stage, model, optimizer, data, max_iters, base_lr, ckpt_path, log_path)
    if init is not None:
        run.prior_tokens = init["prior_tokens"] + init["tokens_seen"]
    if resume is not None:
        restore(run, resume, ddp)
    elif ddp.master:
        open(log_path, "w").close()  # a fresh run starts a fresh log
    return run


def restore(run, resume, ddp):
    """Continue where the checkpoint stopped: optimizer state (moved to the parameters' device by torch), every
    rank's data order and RNG state, the counters, and the log cut back to the checkpoint."""
    if len(resume["rank_state"]) != ddp.world:
        raise ValueError(f"--resume: {run.ckpt_path} was written by {len(resume['rank_state'])} processes; resume "
                         f"it with as many (this job has {ddp.world}) to continue the same data order")
    run.optimizer.load_state_dict(resume["optimizer"])
    rank_state = resume["rank_state"][ddp.rank]
    run.data.load_state_dict(rank_state["data"])
    torch.set_rng_state(rank_state["rng"])
    run.iter_num = run.start_iter = resume["iter_num"]
    run.resumed = True
    run.tokens_seen, run.prior_tokens, run.best_val_loss = (resume["tokens_seen"], resume["prior_tokens"],
                                                            resume["best_val_loss"])
    if ddp.master:
        trim_log(run.log_path, run.iter_num)


def prepare_for_training(run, cfg, ddp):
    """Mixed precision, DistributedDataParallel, then torch.compile of the wrapped model (so that compile can split
    the graph at DDP's gradient buckets and the all-reduce overlaps the backward pass)."""
    device_type = torch.device(cfg.device).type
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    run.autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    run.scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    run.train_model = run.model
    if ddp.world > 1:  # averages gradients across the ranks during backward; the rotary tables need no broadcast
        device_ids = [ddp.local_rank] if device_type == "cuda" else None
        run.train_model = run.ddp_model = DistributedDataParallel(run.model, device_ids=device_ids,
                                                                  broadcast_buffers=False)
    if cfg.compile:
        run.train_model = torch.compile(run.train_model)


def optimizer_step(run, cfg, micro_steps, world):
    """One step of the method: grad_accum micro-batches, clip, AdamW. -> (loss, tokens, seconds waiting for data)"""
    lr = lr_at(run, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    data_time, tokens, loss_sum = 0.0, 0, 0.0
    for micro_step in range(micro_steps):
        t0 = time.time()
        x, y = run.data.get_batch("train")
        data_time += time.time() - t0
        if run.ddp_model is not None:  # average the gradients across ranks only once, on the last micro-step
            run.ddp_model.require_backward_grad_sync = micro_step == micro_steps - 1
        with run.autocast:
            _, loss = run.train_model(x, y)
        run.scaler.scale(loss / micro_steps).backward()
        loss_sum += loss.detach()  # not .item(): that would make the CPU wait for the GPU at every micro-step
        tokens += x.numel() * world  # fine-tuning batches vary in length
    loss_value = float(loss_sum) / micro_steps  # the one wait for the GPU in a step
    if not math.isfinite(loss_value):
        raise RuntimeError(f"{run.name}: training loss is {loss_value} at iteration {run.iter_num}; stopping "
                           f"without saving. {kept_checkpoint(run)}; try a lower --{run.name}_lr")
    if cfg.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    run.tokens_seen += tokens
    return loss_value, tokens, data_time


def kept_checkpoint(run):
    if os.path.exists(run.ckpt_path):
        return f"The last good checkpoint is kept in {run.ckpt_path}"
    return "No checkpoint of this stage was written yet"


def checkpoint_of(run, cfg, nca_cfg, rank_state):
    data = run.data
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "model_args": asdict(run.model.config), "config": asdict(cfg),
            "nca_config": asdict(nca_cfg) if isinstance(data, NCAData) else None, "stage": run.name,
            "data": {"name": data.name, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                     "eot_token": data.eot_token},
            "iter_num": run.iter_num, "max_iters": run.max_iters, "tokens_seen": run.tokens_seen,
            "prior_tokens": run.prior_tokens, "best_val_loss": run.best_val_loss, "rank_state": rank_state,
            "trainable": [n for n, p in run.model.named_parameters() if p.requires_grad]}


def save(run, cfg, nca_cfg, ddp):
    """Every rank hands rank 0 what it needs to resume (data order, RNG); rank 0 writes the checkpoint."""
    rank_state = gather({"data": run.data.state_dict(), "rng": torch.get_rng_state()}, ddp)
    if ddp.master:
        save_checkpoint(run.ckpt_path, checkpoint_of(run, cfg, nca_cfg, rank_state))


def evaluate_and_save(run, cfg, nca_cfg, ddp, train_loss, elapsed):
    """Validation loss on the fixed batches, one log record, then the checkpoint it describes. The record is written
    first: a kill between the two leaves a record past the checkpoint, which --resume drops and makes again."""
    val_loss = estimate_loss(run.model, run.data, run.autocast)
    run.best_val_loss = min(run.best_val_loss, val_loss)
    print(f"iter {run.iter_num}: val loss {val_loss:.4f} (best {run.best_val_loss:.4f})", flush=True)
    if not math.isfinite(val_loss):
        raise RuntimeError(f"{run.name}: validation loss is {val_loss} at iteration {run.iter_num}; stopping. "
                           f"{kept_checkpoint(run)}")
    if ddp.master:
        append_log(run.log_path, {
            "iter": run.iter_num, "tokens": run.tokens_seen, "prior_tokens": run.prior_tokens,
            "lr": lr_at(run, cfg), "train_loss": train_loss, "val_loss": val_loss, "elapsed": elapsed,
            **probe_context(run, cfg)})
    if run.iter_num > run.start_iter:
        save(run, cfg, nca_cfg, ddp)


def probe_context(run, cfg):
    """How much the model uses its context (eval.probe): the loss late in a validation sequence minus early in it
    (for NCA, by whole frames), and how well it copies a repeated random sequence. null where undefined."""
    data = run.data
    frame_len = data.nca_cfg.frame_len if isinstance(data, NCAData) else None
    special = (data.nca_cfg.start_token, data.nca_cfg.end_token) if frame_len else (data.eot_token,)
    values = probe(run.model, data.val_batches(), data.vocab_size, run.model.config.block_size, cfg.device,
                   run.autocast, frame_len=frame_len, exclude=special)
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step; the loop then saves a checkpoint at
    that iteration, so --resume loses nothing. A second signal stops at once. One process only: under torchrun the
    ranks would not agree on the step, and the last evaluation's checkpoint is what --resume continues."""

    def __init__(self, enabled):
        self.requested, self.previous = None, {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Meter:
    """Book-keeping of speed for the log lines and the benchmark: tokens/s, time waiting for data, MFU, ETA, and
    the steady state (the steps after the first WARMUP_STEPS, without evaluation or saving)."""

    def __init__(self, run, cfg, world):
        self.run, self.world, self.start_iter = run, world, run.iter_num
        self.flops_per_token, self.peak = run.model.flops_per_token(), peak_flops(cfg)
        self.t_start = self.t_log = time.time()
        self.tokens_start = self.tokens_log = run.tokens_seen
        self.data_log = self.data_total = 0.0
        self.steady = {"seconds": 0.0, "tokens": 0, "data": 0.0}

    def mfu(self, tokens_per_s):
        return self.flops_per_token * tokens_per_s / (self.peak * self.world) if self.peak else None

    def step(self, seconds, tokens, data_time):
        self.data_log += data_time
        self.data_total += data_time
        if self.run.iter_num - self.start_iter > WARMUP_STEPS:
            self.steady["seconds"] += seconds
            self.steady["tokens"] += tokens
            self.steady["data"] += data_time

    def log_line(self, loss, lr):
        run, now = self.run, time.time()
        tok_per_s = (run.tokens_seen - self.tokens_log) / (now - self.t_log)
        eta = (now - self.t_start) / (run.iter_num - self.start_iter) * (run.max_iters - run.iter_num)
        mfu = f" | mfu {self.mfu(tok_per_s):.1%}" if self.peak else ""
        print(f"{run.name} iter {run.iter_num}/{run.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
              f"tokens {run.tokens_seen / 1e6:.2f}M | {tok_per_s:,.0f} tok/s{mfu} | "
              f"data {self.data_log / (now - self.t_log):.0%} | eta {eta / 60:.1f} min", flush=True)
        self.t_log, self.tokens_log, self.data_log = now, run.tokens_seen, 0.0

    def summary(self):
        seconds = time.time() - self.t_start
        tokens_per_s = (self.run.tokens_seen - self.tokens_start) / seconds
        stats = {"tokens_per_s": tokens_per_s, "data_wait": self.data_total / seconds, "mfu": self.mfu(tokens_per_s),
                 "seconds": seconds}
        s = self.steady
        if s["seconds"] > 0:
            stats["steady"] = {"tokens_per_s": s["tokens"] / s["seconds"], "data_wait": s["data"] / s["seconds"],
                               "steps": self.run.iter_num - self.start_iter - WARMUP_STEPS,
                               "mfu": self.mfu(s["tokens"] / s["seconds"])}
        return stats


def train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp=Dist()):
    """Train one stage; returns its checkpoint path and what was measured (tokens/s, data wait, MFU)."""
    stage_dir = os.path.join(cfg.out_dir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    with stage_lock(stage_dir, ddp):
        run = setup_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp)
        if run is None:
            return os.path.join(stage_dir, "ckpt.pt"), {}
        prepare_for_training(run, cfg, ddp)
        micro_steps = cfg.grad_accum // ddp.world  # per rank; cfg.grad_accum is the whole job's
        meter, stop, loss = Meter(run, cfg, ddp.world), StopSignal(enabled=ddp.world == 1), None
        try:
            while True:
                if run.iter_num == run.max_iters or (run.iter_num % cfg.eval_interval == 0 and
                                                     (run.iter_num > run.start_iter or not run.resumed)):
                    evaluate_and_save(run, cfg, nca_cfg, ddp, loss, time.time() - meter.t_start)
                if run.iter_num >= run.max_iters:
                    break
                if stop.requested:
                    save(run, cfg, nca_cfg, ddp)
                    raise SystemExit(f"{stop.requested}: stopped at iteration {run.iter_num} of {stage} and saved "
                                     f"{run.ckpt_path}; continue with the same command and --resume")
                t_step, lr = time.time(), lr_at(run, cfg)
                loss, tokens, data_time = optimizer_step(run, cfg, micro_steps, ddp.world)
                meter.step(time.time() - t_step, tokens, data_time)
                if run.iter_num % cfg.log_interval == 0:
                    meter.log_line(loss, lr)
        finally:
            stop.restore()
        stats = meter.summary()
        print(f"== {stage} done in {stats['seconds'] / 60:.1f} min: best val loss {run.best_val_loss:.4f}, "
              f"{stats['tokens_per_s']:,.0f} tok/s, waiting for data {stats['data_wait']:.1%} of the time, "
              f"checkpoint {run.ckpt_path}")
        return run.ckpt_path, stats


# -----------------------------------------------------------------------------
# memory: an estimate before anything is allocated

def check_memory(config, cfg, ddp):
    """Print the estimated peak GPU memory of this stage; on a GPU, refuse a run that would not fit."""
    estimate = estimate_memory(config, cfg.batch_size, cfg.dtype, cfg.grad_accum // ddp.world)
    print(f"memory estimate: {describe_memory(estimate)}")
    if torch.device(cfg.device).type == "cuda":
        total = torch.cuda.get_device_properties(cfg.device).total_memory
        if estimate["total"] > 0.95 * total:
            raise ValueError(f"this run needs about {estimate['total'] / 2 ** 30:.1f} GiB of GPU memory and "
                             f"{torch.cuda.get_device_name(cfg.device)} has {total / 2 ** 30:.1f} GiB: lower "
                             f"--batch_size and raise --grad_accum (the same batch per step), or shrink the model")


def describe_memory(estimate):
    unit, size = ("GiB", 2 ** 30) if estimate["total"] >= 2 ** 30 else ("MiB", 2 ** 20)
    parts = ", ".join(f"{k} {v / size:.2f}" for k, v in estimate.items() if k not in ("total", "per_token_layer"))
    return f"{estimate['total'] / size:.2f} {unit} ({parts})"


# -----------------------------------------------------------------------------
# benchmark and main

def benchmark(cfg, model_cfg, nca_cfg, ddp):
    """NCA tokens/s (raw and filtered), then stage-1 training tokens/s, data wait, MFU and peak memory."""
    speed = nca.measure_throughput(nca_cfg, cfg.device, batch_size=cfg.batch_size, seq_len=model_cfg.block_size,
                                   chunk=cfg.nca_chunk)
    with tempfile.TemporaryDirectory() as tmp:
        bench_cfg = dataclasses.replace(cfg, out_dir=tmp, eval_interval=10 ** 9, resume=False, init_from="")
        _, stats = train_stage("prepretrain", bench_cfg, model_cfg, nca_cfg, "", ddp)
    if torch.device(cfg.device).type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(cfg.device) / 2 ** 30
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    estimate = estimate_memory(dataclasses.replace(model_cfg, vocab_size=nca_cfg.vocab_size), cfg.batch_size,
                               cfg.dtype)["total"] / 2 ** 30
    steady = stats["steady"]
    mfu = f"{steady['mfu']:.1%}" if steady["mfu"] is not None else "n/a (no peak known for this device: --peak_tflops)"
    print(f"bench: nca_raw_tokens_per_s={speed['raw']:.0f} nca_filtered_tokens_per_s={speed['filtered']:.0f} "
          f"train_tokens_per_s={steady['tokens_per_s']:.0f} data_wait={steady['data_wait']:.1%} mfu={mfu} "
          f"peak_memory_gib={peak_memory:.2f} estimated_memory_gib={estimate:.2f} device={cfg.device} "
          f"world={ddp.world} (training numbers: the last {steady['steps']} steps, without the {WARMUP_STEPS} "
          f"warm-up steps, evaluation and saving)")
    return stats


# -----------------------------------------------------------------------------
# --check: every GPU path, small and fast, for the first run on a new machine

class Checks:
    """Runs commands of this repository in their own processes and keeps PASS / FAIL / SKIP per item."""

    def __init__(self):
        self.results = []

    def record(self, name, ok, note):
        self.results.append((name, ok, note))
        print(f"check: {'PASS' if ok else 'FAIL' if ok is not None else 'SKIP'} {name} ({note})", flush=True)

    def run(self, name, command, expect=()):
        t0 = time.time()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        missing = [e for e in expect if e not in proc.stdout]
        ok = proc.returncode == 0 and not missing
        note = f"{time.time() - t0:.0f}s"
        if proc.returncode:
            note += ": " + (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
        elif missing:
            note += f": the output lacks {missing}"
        self.record(name, ok, note)
        return proc


def gpu_check(cfg, model_cfg, nca_cfg):
    """Run what a GPU user relies on, at a small size, and print PASS/FAIL per item and the benchmark line.
    `python train.py --check --device cpu` runs the same items on the CPU (the test suite does)."""
    gpu = torch.device(cfg.device).type == "cuda"
    out, py, checks = os.path.join(cfg.out_dir, "check"), sys.executable, Checks()
    shutil.rmtree(out, ignore_errors=True)
    # the paths matter here, not the scale: a small model, and on the CPU a tiny one with a tiny NCA
    small = ["--device", cfg.device, "--eval_iters", "2", "--log_interval", "10", "--data_dir", cfg.data_dir] + (
        ["--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "128", "--batch_size", "8"] if gpu else
        ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "48", "--batch_size", "4",
         "--grid", "6", "--num_colors", "4", "--band", "0.0", "1.0", "--nca_chunk", "64"])
    if not gpu or torch.cuda.is_bf16_supported(including_emulation=False):
        small += ["--dtype", "bfloat16"]
    stages = ["--prepretrain_iters", "20", "--pretrain_iters", "20", "--finetune_iters", "10", "--eval_interval", "10"]
    run = os.path.join(out, "run")
    checks.run(f"three stages ({small[-1]}, fused AdamW {gpu}, NCA prefetch)",
               [py, "train.py", *small, *stages, "--out_dir", run], expect=["== finetune done", f"fused={gpu}"])
    checks.run("torch.compile", [py, "train.py", *small, "--stage", "pretrain", "--pretrain_iters", "20", "--compile",
                                 "--out_dir", os.path.join(out, "compiled")], expect=["== pretrain done"])
    check_resume_after_kill(checks, [py, "train.py", *small, "--stage", "pretrain", "--pretrain_iters", "200",
                                     "--eval_interval", "20"], out, exact=not gpu)
    if (torch.cuda.device_count() if gpu else 2) >= 2:  # on a CPU: 2 gloo processes
        checks.run("torchrun, 2 processes, --stage all",
                   [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *small,
                    *stages, "--grad_accum", "2", "--out_dir", os.path.join(out, "ddp")], expect=["== finetune done"])
    else:
        checks.record("torchrun, 2 processes", None, "needs 2 GPUs")
    checks.run("eval.py icl", [py, "eval.py", "icl", "--ckpt", f"{run}/prepretrain/ckpt.pt", "--device", cfg.device,
                               "--num_rules", "8", "--out", os.path.join(out, "icl.png")], expect=["cell accuracy"])
    checks.run("eval.py passk (generation with the KV cache)",
               [py, "eval.py", "passk", "--ckpt", f"{run}/finetune/ckpt.pt", "--device", cfg.device, "--n", "4",
                "--k", "1", "2", "--max_problems", "4"], expect=["pass@1"])
    checks.run("eval.py export", [py, "eval.py", "export", "--ckpt", f"{run}/pretrain/ckpt.pt", "--out_dir",
                                  os.path.join(out, "hf")], expect=["pytorch_model.bin"])
    bench_model = ["--device", cfg.device, "--data_dir", cfg.data_dir] if gpu else small  # the default model on a GPU
    bench = checks.run("train.py --bench", [py, "train.py", *bench_model, "--bench", "--prepretrain_iters", "30"],
                       expect=["bench:"])
    print("\n".join(line for line in bench.stdout.splitlines() if line.startswith("bench:")))
    failed = [name for name, ok, _ in checks.results if ok is False]
    print(f"check on {torch.cuda.get_device_name(cfg.device) if gpu else 'the cpu'}: "
          + (f"FAILED: {'; '.join(failed)}" if failed else f"all {len(checks.results)} items passed or skipped"))
    if failed:
        raise SystemExit(1)


def check_resume_after_kill(checks, command, out, exact):
    """A run killed with SIGKILL after its first checkpoints and then resumed must log what a straight run logs:
    bit for bit on a CPU; on a GPU within 1e-2 (some kernels, e.g. attention's backward, sum in varying order)."""
    straight, killed = os.path.join(out, "straight"), os.path.join(out, "killed")
    checks.run("resume: a straight run", command + ["--out_dir", straight])
    proc = subprocess.Popen(command + ["--out_dir", killed], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_path, deadline = os.path.join(killed, "pretrain", "log.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(log_path) and open(log_path).read().count("\n") >= 3:  # iterations 0, 20, 40 logged
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    checks.run("resume: kill -9 mid-run, then --resume", command + ["--out_dir", killed, "--resume"],
               expect=["resuming"])
    logs = [read_jsonl(os.path.join(run, "pretrain", "log.jsonl")) for run in (straight, killed)]
    worst = max((abs(a["val_loss"] - b["val_loss"]) for a, b in zip(*logs)), default=math.inf)
    same = [r["iter"] for r in logs[0]] == [r["iter"] for r in logs[1]]
    limit = 0.0 if exact else 1e-2
    checks.record("resume: the resumed log equals the straight one", same and worst <= limit,
                  f"largest val-loss difference {worst:.1e}, allowed {limit:.0e}")


def prepare_datasets(cfg, stages, ddp):
    """The offline datasets are made on first use, by rank 0 alone (two ranks writing one file would corrupt it);
    the other ranks wait for it."""
    if ddp.master:
        for stage in stages:
            name = getattr(cfg, f"{stage}_data")
            if stage == "finetune":
                prepared(cfg, name, "pairs")
                if cfg.pretrain_data in OFFLINE_DATA:  # a from-scratch fine-tune uses its tokenizer
                    prepared(cfg, cfg.pretrain_data, "tokens")
            elif not (stage == "prepretrain" and name in NCA_DATA):
                prepared(cfg, name, "tokens")
    if ddp.world > 1:
        dist.barrier()


def main(argv=None):
    cfg, model_cfg, nca_cfg = parse_args(argv)
    ddp = setup_distributed(cfg)
    if torch.device(cfg.device).type == "cuda":  # TF32 matmuls for the model (the NCA rules run in float64)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print("config:", json.dumps({**asdict(cfg), **asdict(model_cfg), **asdict(nca_cfg)}))
    try:
        if cfg.check:
            return gpu_check(cfg, model_cfg, nca_cfg)
        if cfg.bench:
            return benchmark(cfg, model_cfg, nca_cfg, ddp)
        stages = [s for s in (STAGES if cfg.stage == "all" else (cfg.stage,)) if getattr(cfg, f"{s}_iters") > 0]
        prepare_datasets(cfg, stages, ddp)
        init_path = cfg.init_from
        for stage in STAGES if cfg.stage == "all" else (cfg.stage,):
            if stage not in stages:
                print(f"== {stage}: 0 iterations, skipped")
                continue
            init_path, _ = train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp)
            if ddp.world > 1:
                dist.barrier()  # the next stage (and the exit) waits for rank 0's checkpoint
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("TRAIN_DEBUG"):
            raise
        sys.exit(f"train.py: {e} (TRAIN_DEBUG=1 shows the traceback)")
