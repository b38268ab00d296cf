"""
Train a small Llama in three stages: NCA pre-pre-training, language pre-training, fine-tuning.

  stage 1 prepretrain  next-token prediction on NCA rollouts streamed from nca.py (or a control corpus: dyck,
                       random, c4)
  stage 2 pretrain     the same transformer on text (data/<name>/train.bin); token embedding and output head are
                       re-initialised because the vocabulary changes, everything else carries over
  stage 3 finetune     prompt/completion pairs (data/<task>/*.jsonl), the loss on completion tokens only

Every hyperparameter is a flag (python train.py --help). Examples:

  python train.py                                   # all three stages on the offline default (stdlib code, arith)
  python train.py --prepretrain_iters 0             # the control: the same run with no stage 1 (from scratch)
  python train.py --prepretrain_data dyck           # the Dyck control for stage 1
  python train.py --prepretrain_data random         # the random-token control: a warm start with nothing to learn
  python train.py --stage pretrain --init_from out/prepretrain/ckpt.pt --reinit embedding,head,attention
  python train.py --resume                          # continue an interrupted run where it stopped

Each stage writes out_dir/<stage>/ckpt.pt (the latest state, saved atomically) and out_dir/<stage>/log.jsonl
(one line per evaluation, read by eval.py).
"""
import argparse
import dataclasses
import json
import math
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, asdict, field, fields

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import nca
from data.common import DATA_DIR, check_prepared, get_tokenizer, load_meta, load_pairs
from model import GPT, GROUPS, ModelConfig, arg, transfer

STAGES = ("prepretrain", "pretrain", "finetune")
OFFLINE_DATA = ("stdlib", "dyck", "random", "arith")  # made from what is on this machine: prepared on first use


@dataclass
class TrainConfig:
    # run
    stage: str = arg("all", "prepretrain | pretrain | finetune | all (the three in order)")
    out_dir: str = arg("out", "each stage writes out_dir/<stage>/ckpt.pt and log.jsonl")
    init_from: str = arg("", 'checkpoint to start from ("" = from scratch; --stage all chains the stages)')
    resume: bool = arg(False, "continue out_dir/<stage>/ckpt.pt where it stopped")
    seed: int = arg(0, "seeds the model init and the data order")
    data_dir: str = arg(DATA_DIR, "datasets live in data_dir/<name>/")
    device: str = arg("cuda" if torch.cuda.is_available() else "cpu")
    dtype: str = arg("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32")
    compile: bool = arg(False, "torch.compile the model (GPU)")
    peak_tflops: float = arg(0.0, "the device's peak for the MFU estimate; 0 = look the GPU up in PEAK_TFLOPS")
    bench: bool = arg(False, "measure NCA and training throughput on this config, then exit")
    # stage 1: pre-pre-training. "nca" streams fresh rules; any other name is a token corpus in data/
    prepretrain_data: str = arg("nca", "nca (streamed), or a token corpus in data_dir as a control (dyck, random, c4)")
    prepretrain_iters: int = arg(150, "0 skips the stage: the from-scratch control")
    prepretrain_lr: float = arg(3e-4, "gentle: SPEC found aggressive stage-1 rates hurt transfer at small scale")
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


# dense bf16 peak of common GPUs (vendor datasheets), for the MFU estimate; CPUs get no MFU
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0,
               "RTX 4090": 165.0, "RTX 3090": 71.0}
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
    if cfg.init_from:
        load_checkpoint(cfg.init_from, "cpu", flag="--init_from ")  # fail now, not after preparing data
    if cfg.init_from and cfg.resume:
        raise ValueError("--init_from and --resume exclude each other: --resume continues out_dir/<stage>/ckpt.pt")
    if cfg.reinit != "auto":
        split_groups("reinit", cfg.reinit)
    split_groups("freeze", cfg.freeze)
    model_cfg.validate()
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    names = {"prepretrain": cfg.prepretrain_data, "pretrain": cfg.pretrain_data, "finetune": cfg.finetune_data}
    for stage in stages:
        name = names[stage]
        if stage == "prepretrain" and name == "nca":
            if model_cfg.block_size < nca_cfg.frame_len:
                raise ValueError(f"--block_size {model_cfg.block_size} is shorter than one NCA frame "
                                 f"({nca_cfg.frame_len} tokens); use at least {2 * nca_cfg.frame_len}")
            continue
        if name in OFFLINE_DATA:
            continue  # prepared on first use
        if not os.path.isdir(os.path.join(cfg.data_dir, name)):
            known = sorted({d for d in os.listdir(cfg.data_dir) if os.path.isdir(os.path.join(cfg.data_dir, d))}
                           - {"hf", "__pycache__"} | set(OFFLINE_DATA))
            raise ValueError(f"--{stage}_data {name!r}: there is no {os.path.join(cfg.data_dir, name)}; datasets "
                             f"there or made offline: {', '.join(known)} "
                             f"(the web corpora: python -m data.hf.prepare --dataset NAME)")
        data_dir = os.path.join(cfg.data_dir, name)  # missing or broken files: say so now, not hours later
        if stage == "finetune":
            load_meta(data_dir, name)
            for split in ("train", "val"):
                load_pairs(data_dir, split, name)
        else:
            check_prepared(data_dir, name)


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

    def __init__(self, nca_cfg, cfg, block_size, rank=0):
        self.name, self.tokenizer, self.eot_token = "nca", None, None
        self.vocab_size = nca_cfg.vocab_size
        self.stream = nca.NCAStream(nca_cfg, cfg.batch_size, block_size, seed=cfg.seed + RANK_SEED_STRIDE * rank,
                                    device=cfg.device, num_rules=cfg.nca_num_rules, chunk=cfg.nca_chunk)
        held_out = nca.NCAStream(nca_cfg, cfg.batch_size, block_size, seed=cfg.seed + 1_000_003, device=cfg.device,
                                 chunk=cfg.nca_chunk)
        self.val = [held_out.next_batch() for _ in range(cfg.eval_iters)]
        # one batch made ahead in a thread: simulation (torch) and the gzip filter (zlib) release the GIL, so the
        # next batch is made while the training step runs. The thread works on the one stream, one batch at a time.
        self.worker = ThreadPoolExecutor(max_workers=1) if cfg.nca_prefetch else None
        self.ahead = None  # future of (stream state before the batch, batch)

    def make_batch(self):
        return self.stream.state_dict(), self.stream.next_batch()

    def get_batch(self, split):
        if self.worker is None:
            return self.stream.next_batch()
        _, batch = (self.ahead or self.worker.submit(self.make_batch)).result()
        self.ahead = self.worker.submit(self.make_batch)
        return batch

    def state_dict(self):
        # a checkpoint records the batches the model has seen, not the one made ahead: the state before that one
        return self.ahead.result()[0] if self.ahead is not None else self.stream.state_dict()

    def load_state_dict(self, state):
        if self.ahead is not None:
            self.ahead.result()  # let the thread finish before the stream is rewound
            self.ahead = None
        self.stream.load_state_dict(state)


class TokenData(Data):
    """nanoGPT's memmapped uint16 corpus: random windows for training, fixed windows for validation."""

    def __init__(self, name, cfg, block_size, rank=0):
        self.data_dir, meta = prepared(cfg, name, "tokens")
        self.name, self.tokenizer, self.eot_token = name, meta["tokenizer"], meta["eot_token"]
        self.vocab_size, self.block_size, self.batch_size = meta["vocab_size"], block_size, cfg.batch_size
        self.device = cfg.device
        self.generator = torch.Generator().manual_seed(cfg.seed + RANK_SEED_STRIDE * rank)
        for split in ("train", "val"):
            n = os.path.getsize(os.path.join(self.data_dir, f"{split}.bin")) // 2
            if n <= block_size + 1:
                raise ValueError(f"{self.data_dir}/{split}.bin holds {n} tokens, too few for --block_size {block_size}")
        fixed = torch.Generator().manual_seed(1234)  # the same validation windows at every evaluation
        self.val = [self.batch("val", fixed) for _ in range(cfg.eval_iters)]

    def batch(self, split, generator):
        # a new memmap per batch: nanoGPT's way to avoid numpy's memmap holding on to memory
        data = np.memmap(os.path.join(self.data_dir, f"{split}.bin"), dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - self.block_size - 1, (self.batch_size,), generator=generator)
        rows = torch.stack([torch.from_numpy(data[i:i + self.block_size + 1].astype(np.int64)) for i in starts])
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.device.startswith("cuda"):  # from pinned memory the copy is asynchronous: the GPU does not wait
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

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
        return x.to(self.device), y.to(self.device)

    def get_batch(self, split):
        pairs = self.pairs[split]
        picks = torch.randint(len(pairs), (self.batch_size,), generator=self.generator)
        return self.collate([pairs[i] for i in picks])


def make_data(stage, cfg, nca_cfg, block_size, tokenizer, rank=0):
    if stage == "prepretrain" and cfg.prepretrain_data == "nca":
        return NCAData(nca_cfg, cfg, block_size, rank)
    if stage == "finetune":
        return PairData(cfg.finetune_data, cfg, block_size, tokenizer, rank)
    return TokenData(getattr(cfg, f"{stage}_data"), cfg, block_size, rank)


# -----------------------------------------------------------------------------
# schedule, evaluation, checkpoints

def get_lr(it, max_iters, lr, warmup_frac, min_lr_frac):
    """Linear warmup from (it+1)/warmup, then cosine decay to min_lr_frac * lr at the last iteration."""
    warmup = int(warmup_frac * max_iters)
    if it < warmup:
        return lr * (it + 1) / warmup
    progress = (it - warmup) / max(1, max_iters - warmup)
    return lr * (min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def peak_flops(cfg):
    """FLOP/s of one device at 100% utilisation, or None where unknown (CPUs)."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if cfg.device.startswith("cuda"):
        name = torch.cuda.get_device_name(cfg.device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


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


def save_checkpoint(path, checkpoint):
    """Write to a temporary file, then rename: a kill mid-save leaves the previous checkpoint whole."""
    tmp = path + ".tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device, flag=""):
    if not os.path.isfile(path):
        raise ValueError(f"{flag}{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise ValueError(f"{flag}{path} is not a checkpoint torch can load safely ({type(e).__name__}); "
                         f"give a ckpt.pt written by train.py") from e
    if not isinstance(checkpoint, dict) or not {"model", "model_args", "stage"} <= checkpoint.keys():
        raise ValueError(f"{flag}{path} is not a checkpoint of this train.py (it lacks model / model_args / stage)")
    return checkpoint


def build_model(stage, cfg, model_cfg, data, init):
    """From scratch, or from a previous stage's checkpoint through the explicit transfer (model.transfer)."""
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    if init is None:
        model = GPT(model_cfg)
        print(f"model: from scratch, {model.num_params():,} parameters")
        return model
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
    return transfer(init["model"], model_cfg, reinit=reinit, freeze=split_groups("freeze", cfg.freeze))


# -----------------------------------------------------------------------------
# one stage: the training loop

def train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp=Dist()):
    """Train one stage; returns its checkpoint path and what was measured (tokens/s, data wait, MFU)."""
    max_iters, base_lr = getattr(cfg, f"{stage}_iters"), getattr(cfg, f"{stage}_lr")
    stage_dir = os.path.join(cfg.out_dir, stage)
    ckpt_path, log_path = os.path.join(stage_dir, "ckpt.pt"), os.path.join(stage_dir, "log.jsonl")
    os.makedirs(stage_dir, exist_ok=True)
    resume = load_checkpoint(ckpt_path, cfg.device) if cfg.resume and os.path.exists(ckpt_path) else None
    if resume is not None and resume["iter_num"] >= max_iters:
        print(f"== {stage}: already complete in {ckpt_path}, skipping")
        return ckpt_path, {}
    init = load_checkpoint(init_path, cfg.device) if init_path and resume is None else None
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
    model.to(cfg.device)
    device_type = "cuda" if "cuda" in cfg.device else "cpu"
    optimizer = model.configure_optimizers(cfg.weight_decay, base_lr, (cfg.beta1, cfg.beta2), device_type)
    iter_num, tokens_seen, best_val_loss = 0, 0, float("inf")
    prior_tokens = (init["prior_tokens"] + init["tokens_seen"]) if init is not None else 0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if len(resume["rank_state"]) != ddp.world:
            raise ValueError(f"--resume: {ckpt_path} was written by {len(resume['rank_state'])} processes; resume it "
                             f"with as many (this job has {ddp.world}) to continue the same data order")
        data.load_state_dict(resume["rank_state"][ddp.rank]["data"])
        torch.set_rng_state(resume["rank_state"][ddp.rank]["rng"])
        iter_num, tokens_seen, best_val_loss = resume["iter_num"], resume["tokens_seen"], resume["best_val_loss"]
        prior_tokens = resume["prior_tokens"]
        if ddp.master:
            with open(log_path) as f:  # drop what was logged after the checkpoint: those iterations run again
                kept = [line for line in f if json.loads(line)["iter"] <= iter_num]
            with open(log_path, "w") as f:
                f.writelines(kept)
    elif ddp.master:
        open(log_path, "w").close()  # a fresh run starts a fresh log

    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    train_model = torch.compile(model) if cfg.compile else model  # checkpoints save the un-compiled `model`
    if ddp.world > 1:  # averages gradients across the ranks during backward
        device_ids = [ddp.local_rank] if device_type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    micro_steps = cfg.grad_accum // ddp.world  # per rank; cfg.grad_accum is the whole job's
    flops_per_token, peak = model.flops_per_token(), peak_flops(cfg)

    def checkpoint(rank_state):
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "model_args": asdict(model.config),
                "config": asdict(cfg), "nca_config": asdict(nca_cfg) if data.name == "nca" else None,
                "stage": stage, "data": {"name": data.name, "tokenizer": data.tokenizer,
                                         "vocab_size": data.vocab_size, "eot_token": data.eot_token},
                "iter_num": iter_num, "max_iters": max_iters, "tokens_seen": tokens_seen,
                "prior_tokens": prior_tokens, "best_val_loss": best_val_loss, "rank_state": rank_state,
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}

    t_start = t_log = time.time()
    data_time = total_data_time = 0.0
    tokens_at_log, tokens_at_start, it_start = tokens_seen, tokens_seen, iter_num
    # the steady state, for the benchmark: training steps only (no evaluation, no saving), after the first few
    # (torch.compile and the allocator warm up there)
    steady = {"seconds": 0.0, "tokens": 0, "data": 0.0}
    while True:
        if iter_num == max_iters or iter_num % cfg.eval_interval == 0 and (iter_num > it_start or resume is None):
            val_loss = estimate_loss(model, data, autocast)
            best_val_loss = min(best_val_loss, val_loss)
            print(f"iter {iter_num}: val loss {val_loss:.4f} (best {best_val_loss:.4f})", flush=True)
            record = {"iter": iter_num, "tokens": tokens_seen, "prior_tokens": prior_tokens,
                      "lr": get_lr(iter_num, max_iters, base_lr, cfg.warmup_frac, cfg.min_lr_frac),
                      "train_loss": loss_value if iter_num > it_start else None, "val_loss": val_loss,
                      "elapsed": time.time() - t_start}
            if not math.isfinite(val_loss):
                raise RuntimeError(f"{stage}: validation loss is {val_loss} at iteration {iter_num}; stopping. "
                                   f"The last good checkpoint is kept in {ckpt_path}")
            if iter_num > it_start or iter_num == max_iters:
                rank_state = gather({"data": data.state_dict(), "rng": torch.get_rng_state()}, ddp)  # all ranks
                if ddp.master:
                    save_checkpoint(ckpt_path, checkpoint(rank_state))
            if ddp.master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        if iter_num >= max_iters:
            break

        lr = get_lr(iter_num, max_iters, base_lr, cfg.warmup_frac, cfg.min_lr_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_step, step_data_time, step_tokens, loss_sum = time.time(), 0.0, 0, 0.0
        for micro_step in range(micro_steps):
            t0 = time.time()
            x, y = data.get_batch("train")
            step_data_time += time.time() - t0
            if ddp.world > 1:  # average the gradients across ranks only once, on the last micro-step
                train_model.require_backward_grad_sync = micro_step == micro_steps - 1
            with autocast:
                _, loss = train_model(x, y)
            scaler.scale(loss / micro_steps).backward()
            loss_sum += loss.detach()  # not .item(): that would make the CPU wait for the GPU at every micro-step
            step_tokens += x.numel() * ddp.world  # fine-tuning batches vary in length
        loss_value = loss_sum.item() / micro_steps  # the one wait for the GPU in a step
        tokens_seen += step_tokens
        data_time += step_data_time
        if not math.isfinite(loss_value):
            raise RuntimeError(f"{stage}: training loss is {loss_value} at iteration {iter_num}; stopping without "
                               f"saving. The last good checkpoint is kept in {ckpt_path}; try a lower --{stage}_lr")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        if iter_num - it_start > WARMUP_STEPS:
            steady["seconds"] += time.time() - t_step
            steady["tokens"] += step_tokens
            steady["data"] += step_data_time

        if iter_num % cfg.log_interval == 0:
            now = time.time()
            tok_per_s = (tokens_seen - tokens_at_log) / (now - t_log)
            eta = (now - t_start) / (iter_num - it_start) * (max_iters - iter_num)
            mfu = f" | mfu {flops_per_token * tok_per_s / (peak * ddp.world):.1%}" if peak else ""
            print(f"{stage} iter {iter_num}/{max_iters} | loss {loss_value:.4f} | lr {lr:.2e} | "
                  f"tokens {tokens_seen / 1e6:.2f}M | {tok_per_s:,.0f} tok/s{mfu} | "
                  f"data {data_time / (now - t_log):.0%} | eta {eta / 60:.1f} min", flush=True)
            total_data_time += data_time
            t_log, tokens_at_log, data_time = now, tokens_seen, 0.0
    seconds = time.time() - t_start
    stats = {"tokens_per_s": (tokens_seen - tokens_at_start) / seconds,
             "data_wait": (total_data_time + data_time) / seconds}
    if steady["seconds"] > 0:
        stats["steady"] = {"tokens_per_s": steady["tokens"] / steady["seconds"],
                           "data_wait": steady["data"] / steady["seconds"], "steps": iter_num - it_start - WARMUP_STEPS}
    for measured in (stats, stats.get("steady")):
        if measured:
            measured["mfu"] = flops_per_token * measured["tokens_per_s"] / (peak * ddp.world) if peak else None
    print(f"== {stage} done in {seconds / 60:.1f} min: best val loss {best_val_loss:.4f}, "
          f"{stats['tokens_per_s']:,.0f} tok/s, waiting for data {stats['data_wait']:.1%} of the time, "
          f"checkpoint {ckpt_path}")
    return ckpt_path, stats


def benchmark(cfg, model_cfg, nca_cfg, ddp):
    """NCA tokens/s (raw and filtered), then stage-1 training tokens/s, data wait, MFU and peak memory."""
    speed = nca.measure_throughput(nca_cfg, cfg.device, batch_size=cfg.batch_size, seq_len=model_cfg.block_size,
                                   chunk=cfg.nca_chunk)
    with tempfile.TemporaryDirectory() as tmp:
        bench_cfg = dataclasses.replace(cfg, out_dir=tmp, eval_interval=10 ** 9, resume=False, init_from="")
        _, stats = train_stage("prepretrain", bench_cfg, model_cfg, nca_cfg, "", ddp)
    if cfg.device.startswith("cuda"):
        peak_memory = torch.cuda.max_memory_allocated(cfg.device) / 2 ** 30
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    steady = stats["steady"]
    mfu = f"{steady['mfu']:.1%}" if steady["mfu"] is not None else "n/a (no peak known for this device: --peak_tflops)"
    print(f"bench: nca_raw_tokens_per_s={speed['raw']:.0f} nca_filtered_tokens_per_s={speed['filtered']:.0f} "
          f"train_tokens_per_s={steady['tokens_per_s']:.0f} data_wait={steady['data_wait']:.1%} mfu={mfu} "
          f"peak_memory_gib={peak_memory:.2f} device={cfg.device} world={ddp.world} "
          f"(training numbers: the last {steady['steps']} steps, without the {WARMUP_STEPS} warm-up steps, "
          f"evaluation and saving)")


def main(argv=None):
    cfg, model_cfg, nca_cfg = parse_args(argv)
    ddp = setup_distributed(cfg)
    print("config:", json.dumps({**asdict(cfg), **asdict(model_cfg), **asdict(nca_cfg)}))
    try:
        if cfg.bench:
            return benchmark(cfg, model_cfg, nca_cfg, ddp)
        stages = STAGES if cfg.stage == "all" else (cfg.stage,)
        init_path = cfg.init_from
        for stage in stages:
            if getattr(cfg, f"{stage}_iters") == 0:
                print(f"== {stage}: 0 iterations, skipped")
                continue
            init_path, _ = train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp)
        if ddp.world > 1:
            dist.barrier()  # rank 0 may still be saving: tearing gloo down under it aborts the other rank
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
