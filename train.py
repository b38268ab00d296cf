"""
Train a small Llama in three stages: NCA pre-pre-training, language pre-training, fine-tuning.

  stage 1 prepretrain  next-token prediction on NCA rollouts streamed from nca.py, or the same rows from files
                       (python -m data.nca.prepare), or a control corpus (dyck, random, c4)
  stage 2 pretrain     the same transformer on text (data/<name>/train.bin); token embedding and output head are
                       re-initialised because the vocabulary changes, everything else carries over
  stage 3 finetune     prompt/completion pairs (data/<task>/*.jsonl), the loss on completion tokens only

Read it top to bottom: the flags, the data sources, the schedule and the validation loss, build_model (what stage 2
keeps of stage 1), setup_stage, the step and the loop of one stage, and main, which chains the stages. The guards of
safety.py and the machine side of runtime.py (torchrun, GPU copies, prefetch, speed) are called in one line each.

  python train.py                                   # all three stages on the offline default (stdlib code, arith)
  python train.py --prepretrain_iters 0             # the control: the same run with no stage 1 (from scratch)
  python train.py --prepretrain_data dyck           # the Dyck control for stage 1
  python train.py --prepretrain_data random         # the random-token control: a warm start with nothing to learn
  python train.py --stage pretrain --init_from out/prepretrain/ckpt.pt --reinit embedding,head,attention
  python train.py --resume                          # continue an interrupted run where it stopped
  torchrun --standalone --nproc_per_node=4 train.py # 4 GPUs share each step's batch

Each stage writes out_dir/<stage>/ckpt.pt (the latest state), log.jsonl (a line per evaluation) and config.json (its
settings and torch version).
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import nca
import safety
from runtime import RANK_SEED_STRIDE, Dist, Meter, Prefetch, rng_state, set_rng_state, setup_distributed, to_device
from data.common import (DATA_DIR, STREAMED, ArgumentParser, Progress, get_tokenizer, load_pairs,
                         nca_rows, prepare_command, prepared)
from probes import probe
from model import GPT, GROUPS, ModelConfig, freeze_groups, transfer
from safety import arg

STAGES = ("prepretrain", "pretrain", "finetune")


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
    # stage 1: pre-pre-training. "nca" streams fresh rules; any other name is a folder in data_dir: NCA rows or tokens
    prepretrain_data: str = arg("nca", "nca (streamed); nca-shuffled (each sequence's patch tokens permuted: NCA's "
                                       "statistics, no dynamics); a folder of NCA rows (python -m data.nca.prepare; "
                                       "its NCA flags, not these); or a token corpus as a control (dyck, random, c4)")
    prepretrain_iters: int = arg(60, "0 skips the stage: the from-scratch control")
    prepretrain_lr: float = arg(3e-4, "gentle: aggressive stage-1 rates hurt the transfer at small scale")
    prepretrain_schedule: str = arg("cosine", "cosine, or ramp: warmup over the whole stage (the authors' code)")
    nca_prefetch: bool = arg(True, "make the next NCA batch in a background thread while the model trains")
    nca_num_rules: int = arg(0, "0: a fresh rule for every sequence; N: a fixed pool of N rules")
    nca_chunk: int = arg(0, "NCA rules simulated together (0: 512 on CPU, 4096 on a GPU)")
    # stage 2: language pre-training
    pretrain_data: str = arg("stdlib", "a token corpus in data_dir")
    pretrain_iters: int = arg(500, "iterations of stage 2")
    pretrain_lr: float = arg(2e-3, "peak learning rate of stage 2")
    reinit: str = arg("auto", "groups of stage 2 (or of the one --stage) re-initialised: embedding,head,attention,mlp,"
                              "norm; auto: embedding,head on a new vocabulary (the paper)")
    freeze: str = arg("", "groups of stage 2 (or of the one --stage) kept frozen, from a checkpoint or from scratch")
    embed_init: str = arg("small", "a fresh embedding and head of the text stages: small (N(0, 0.02)) or torch "
                                   "(PyTorch's defaults, embedding N(0, 1): the authors' code, in both arms)")
    # stage 3: fine-tuning
    finetune_data: str = arg("arith", "prompt/completion pairs in data_dir")
    finetune_iters: int = arg(300, "iterations of stage 3")
    finetune_lr: float = arg(5e-4, "peak learning rate of stage 3")
    # optimisation, shared by the stages
    batch_size: int = arg(16, "sequences per micro-step (of all processes together under torchrun)")
    grad_accum: int = arg(1, "micro-steps per step: a step sees batch_size x grad_accum sequences, for any world")
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


def parse_args(argv=None, prog=None):
    """(TrainConfig, ModelConfig, NCAConfig) from the command line, every value checked (safety.validate) before any
    work; a bad value exits with one line naming the flag."""
    parser = ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    safety.add_flags(parser, TrainConfig)
    safety.add_flags(parser, ModelConfig, skip=("vocab_size",))  # the vocabulary comes from the data
    safety.add_nca_flags(parser)
    args = parser.parse_args(argv)
    try:
        cfg, model_cfg, nca_cfg = safety.pick(args, TrainConfig), safety.pick(args, ModelConfig, vocab_size=1), \
            safety.nca_config(args)
        safety.validate(cfg, model_cfg, nca_cfg, STAGES, GROUPS)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    return cfg, model_cfg, nca_cfg


# -----------------------------------------------------------------------------
# data: four sources with one interface (get_batch, the fixed validation batches, state for --resume)

class Data:
    """What the loop needs of a data source: get_batch("train"), the fixed validation batches (self.val), and the
    state that --resume restores. Subclasses draw training batches with self.generator and build self.val once.
    Under torchrun the ranks share one data stream: every rank draws the rows of all ranks (its generator seeded
    alike) and keeps its own block (own_rows), so together they train on the rows one process would. The validation
    set is eval_iters batches of --batch_size sequences whatever the number of processes: rank r of `world` keeps
    rows r, r + world, ... of each (validation_batches), and estimate_loss sums over the ranks."""
    nca_cfg = None  # the NCA config of stage-1 NCA data (for the probe and the checkpoint), else None
    files = {}  # the prepared files a source reads (open_splits)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def ready(self):
        """Wait until the next training batch can be taken (made ahead in a thread: NCA)."""

    def close(self, wait=True):
        for file in self.files.values():
            file.close()


def open_splits(data_dir):
    """train.bin and val.bin of a prepared folder, opened once for the whole run: a prepare that remakes the folder
    meanwhile writes new files and renames them into place, so this run goes on reading the files it checked."""
    return {split: open(os.path.join(data_dir, f"{split}.bin"), "rb") for split in ("train", "val")}


class NCAData(Data):
    """Stage-1 batches streamed from nca.py; the validation set is a fixed set of held-out rules."""

    def __init__(self, nca_cfg, cfg, batch_size, block_size, rank=0, world=1, shuffle=False):
        self.name, self.tokenizer, self.eot_token = "nca-shuffled" if shuffle else "nca", None, None
        self.nca_cfg = nca_cfg
        self.vocab_size = nca_cfg.vocab_size
        # one stream shared by the ranks: each takes every world-th rule (or pool sequence), the pool is the same
        self.stream = nca.NCAStream(nca_cfg, batch_size, block_size, seed=cfg.seed, device=cfg.device,
                                    num_rules=cfg.nca_num_rules, chunk=cfg.nca_chunk, rank=rank, world=world,
                                    shuffle=shuffle)
        # the validation rules are held out: no training stream draws them
        held_out = nca.NCAStream(nca_cfg, cfg.batch_size, block_size, seed=cfg.seed, device=cfg.device,
                                 chunk=cfg.nca_chunk, held_out=True, shuffle=shuffle)
        self.val = validation_batches(held_out.next_batch, cfg.eval_iters, rank, world)
        # the next batch is made in a thread while the model trains (the stream's state before it, for --resume)
        self.prefetch = Prefetch(self.stream.next_batch, self.stream.state_dict, cfg.device) if cfg.nca_prefetch \
            else None

    def get_batch(self, split):
        return self.prefetch.next() if self.prefetch else self.stream.next_batch()

    def ready(self):
        if self.prefetch:
            self.prefetch.wait()

    def state_dict(self):
        # a checkpoint records the batches the model has seen, not the one made ahead: the state before that one
        ahead = self.prefetch.state_ahead() if self.prefetch else None
        return self.stream.state_dict() if ahead is None else ahead

    def load_state_dict(self, state):
        if self.prefetch:
            self.prefetch.close()  # the thread finishes before the stream is rewound
        self.stream.load_state_dict(state)

    def close(self, wait=True):
        if self.prefetch:
            self.prefetch.close(wait)  # a finished stage must not go on simulating, nor keep its batch alive


class TokenData(Data):
    """nanoGPT's memmapped uint16 corpus: random windows for training, fixed windows for validation."""

    def __init__(self, name, cfg, batch_size, block_size, rank=0, world=1):
        self.data_dir, meta = prepared(cfg.data_dir, name, "tokens")
        self.files = open_splits(self.data_dir)
        self.name, self.tokenizer, self.eot_token = name, meta["tokenizer"], meta["eot_token"]
        self.vocab_size, self.block_size, self.batch_size = meta["vocab_size"], block_size, batch_size
        self.device, self.world, self.own_rows = cfg.device, world, slice(rank * batch_size, (rank + 1) * batch_size)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        for split, file in self.files.items():  # a bad id would crash the first forward (on CUDA: an assert)
            safety.check_token_file(file, self.vocab_size, block_size, prepare_command(self.data_dir, name))
        fixed = torch.Generator().manual_seed(1234)  # the same validation windows at every evaluation
        self.val = validation_batches(lambda: self.batch("val", fixed, cfg.batch_size), cfg.eval_iters, rank, world)

    def batch(self, split, generator, num_rows, keep=slice(None)):
        """Windows at num_rows random starts, of which the rows `keep` are read."""
        # a new memmap per batch: nanoGPT's way to avoid numpy's memmap holding on to memory
        data = np.memmap(self.files[split], dtype=np.uint16, mode="r")
        starts = torch.randint(len(data) - self.block_size - 1, (num_rows,), generator=generator)[keep]
        rows = torch.stack([torch.from_numpy(data[i:i + self.block_size + 1].astype(np.int64)) for i in starts])
        return to_device((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()), self.device)

    def get_batch(self, split):
        return self.batch(split, self.generator, self.batch_size * self.world, self.own_rows)


class NCARowData(Data):
    """Stage-1 NCA rows from a folder of python -m data.nca.prepare: row i of batch b is row b * batch_size + i of
    train.bin, cut to block_size + 1 tokens, the first frame's targets masked: the batches NCAData streams for the
    folder's seed and NCA config. Under torchrun the k-th batches of the ranks are rows k*B*world .. (k+1)*B*world - 1,
    rank r's the r-th B of them (B rows per rank). After the last row, the first again. The validation set is the
    first eval_iters x batch_size val rows (held-out rules: NCAData's), shared by the ranks (validation_batches)."""

    def __init__(self, name, cfg, batch_size, block_size, rank=0, world=1):
        self.data_dir, meta = prepared(cfg.data_dir, name, "tokens")
        self.files = open_splits(self.data_dir)
        self.name, self.tokenizer, self.eot_token, self.vocab_size = name, None, None, meta["vocab_size"]
        self.nca_cfg = nca.NCAConfig(**meta["nca_config"])
        self.row_len, self.block_size = meta["row_len"], block_size
        self.batch_size, self.rank, self.world, self.device = batch_size, rank, world, cfg.device
        self.next_row = 0  # the first row of the ranks' next batches
        for split, file in self.files.items():  # a bad id would crash the first forward (on CUDA: an assert)
            safety.check_token_file(file, self.vocab_size, block_size, prepare_command(self.data_dir, name))
        starts = iter(range(0, cfg.eval_iters * cfg.batch_size, cfg.batch_size))
        self.val = validation_batches(lambda: self.rows("val", next(starts), cfg.batch_size), cfg.eval_iters, rank,
                                      world)

    def rows(self, split, start, num_rows):
        """Rows start .. start + num_rows - 1 of a split (modulo its length) as (x, y)."""
        data = np.memmap(self.files[split], dtype=np.uint16, mode="r").reshape(-1, self.row_len)
        rows = torch.from_numpy(data[np.arange(start, start + num_rows) % len(data), :self.block_size + 1]
                                .astype(np.int64))
        return to_device(nca.inputs_and_targets(rows, self.nca_cfg), self.device)  # the first frame masked

    def get_batch(self, split):
        start = self.next_row + self.rank * self.batch_size  # this rank's block of the ranks' next rows
        self.next_row += self.batch_size * self.world
        return self.rows("train", start, self.batch_size)

    def state_dict(self):
        return {"next_row": self.next_row}

    def load_state_dict(self, state):
        self.next_row = state["next_row"]


class PairData(Data):
    """Stage-3 prompt/completion pairs, tokenised with the model's tokenizer; loss on completion tokens only."""

    def __init__(self, name, cfg, batch_size, block_size, tokenizer, rank=0, world=1):
        self.data_dir, meta = prepared(cfg.data_dir, name, "pairs")
        self.name, self.tokenizer, self.stop = name, tokenizer, meta["stop"]
        enc = get_tokenizer(tokenizer)
        self.vocab_size, self.eot_token = enc.n_vocab, enc.eot_token
        self.batch_size, self.block_size, self.device = batch_size, block_size, cfg.device
        self.world, self.own_rows = world, slice(rank * batch_size, (rank + 1) * batch_size)
        self.pairs = {split: [(enc.encode_ordinary(r["prompt"]), enc.encode_ordinary(r["completion"]))
                              for r in load_pairs(self.data_dir, split)] for split in ("train", "val")}
        safety.check_pairs_fit(self.pairs, self.data_dir, block_size)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        val = self.pairs["val"][:cfg.eval_iters * cfg.batch_size]
        batches = iter(range(0, len(val), cfg.batch_size))  # batches of --batch_size, this rank's rows of each
        self.val = validation_batches(lambda: self.collate(val[next(batches):][:cfg.batch_size]),
                                      math.ceil(len(val) / cfg.batch_size), rank, world)

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
        picks = torch.randint(len(pairs), (self.batch_size * self.world,), generator=self.generator)[self.own_rows]
        return self.collate([pairs[i] for i in picks])


def validation_batches(make, count, rank, world):
    """This rank's share of `count` validation batches made by make(): rows rank, rank + world, ... of each."""
    batches, progress = [], Progress()
    for i in range(count):
        x, y = make()
        if len(x) > rank:
            batches.append((x[rank::world], y[rank::world]))
        progress(f"validation set: batch {i + 1:,} of {count:,}")  # a line every 10 s
    return batches


def make_data(stage, cfg, nca_cfg, block_size, tokenizer, ddp):
    if stage == "prepretrain" and cfg.prepretrain_data in STREAMED:
        return NCAData(nca_cfg, cfg, ddp.batch_size, block_size, ddp.rank, ddp.world,
                       shuffle=cfg.prepretrain_data == "nca-shuffled")
    if stage == "prepretrain" and nca_rows(os.path.join(cfg.data_dir, cfg.prepretrain_data)):
        return NCARowData(cfg.prepretrain_data, cfg, ddp.batch_size, block_size, ddp.rank, ddp.world)
    if stage == "finetune":
        return PairData(cfg.finetune_data, cfg, ddp.batch_size, block_size, tokenizer, ddp.rank, ddp.world)
    return TokenData(getattr(cfg, f"{stage}_data"), cfg, ddp.batch_size, block_size, ddp.rank, ddp.world)


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
def estimate_loss(model, data, autocast, ddp=Dist(), progress=lambda message: None):
    """The loss per target token over the fixed validation batches (the same ones every time, so curves are
    comparable): every rank sums its share, the sums and counts are added across ranks, so the number does not depend
    on the number of processes."""
    model.eval()
    loss_sum, targets = 0.0, 0
    for i, (x, y) in enumerate(data.val):
        with autocast:
            loss = model(x, y)[1]  # the mean over the batch's targets
        count = int((y != -1).sum())
        loss_sum, targets = loss_sum + loss.item() * count, targets + count
        progress(f"evaluating: batch {i + 1:,} of {len(data.val):,}")
    model.train()
    return ddp.sum(loss_sum) / ddp.sum(targets)


def probe_context(run, cfg):
    """How much the model uses its context (probes.probe): the loss late in a validation sequence minus early in it
    (for NCA, by whole frames), and how well it copies a repeated random sequence. null where undefined."""
    data = run.data
    frame_len = data.nca_cfg.frame_len if data.nca_cfg else None
    special = (data.nca_cfg.start_token, data.nca_cfg.end_token) if frame_len else (data.eot_token,)
    values = probe(run.model, data.val, data.vocab_size, run.model.config.block_size, cfg.device, run.autocast,
                   frame_len=frame_len, exclude=special)
    return {k: v if math.isfinite(v) else None for k, v in values.items()}


# -----------------------------------------------------------------------------
# the model of a stage: from scratch, or carried over from the stage before

def build_model(stage, cfg, model_cfg, data, init):
    """From scratch, or from a previous stage's checkpoint through the explicit transfer (model.transfer): the
    transformer carries over, the groups in --reinit (by default the embedding and the head, whose vocabulary
    changes after NCA) start afresh, the groups in --freeze stay as they are. The two flags are for one stage: stage
    2 under --stage all (stage 3 then carries and trains everything), or the one stage --stage names (with
    --init_from, the same transfer by hand). Built on the CPU; the caller moves it to the device."""
    model_cfg = dataclasses.replace(model_cfg, vocab_size=data.vocab_size)
    flagged = stage == ("pretrain" if cfg.stage == "all" else cfg.stage)  # the stage --reinit and --freeze are for
    frozen = [g for g in cfg.freeze.split(",") if g] if flagged else []
    if init is None:
        model, reinit = GPT(model_cfg), ["embedding", "head"]
        print(f"model: from scratch, {model.num_params():,} parameters")
    else:
        if cfg.reinit == "auto" or not flagged:  # a new corpus after stage 1 (or a new vocabulary): new embedding, head
            new_corpus = init["stage"] == "prepretrain" or init["model_args"]["vocab_size"] != data.vocab_size
            reinit = ["embedding", "head"] if new_corpus else []
        else:
            reinit = [g for g in cfg.reinit.split(",") if g]
        if "embedding" not in reinit and init["data"]["tokenizer"] != data.tokenizer:
            raise ValueError(f"--init_from was trained with tokenizer {init['data']['tokenizer']!r} but data "
                             f"{data.name!r} uses {data.tokenizer!r}: add embedding,head to --reinit")
        print(f"model: {stage} starts from the {init['stage']} checkpoint ({init['data']['name']}, "
              f"{init['tokens_seen']:,} tokens)")
        model = transfer(init["model"], model_cfg, reinit=reinit)
    if cfg.embed_init == "torch" and stage != "prepretrain":  # PyTorch's own init of a fresh embedding and head
        for group, module in (("embedding", model.embed_tokens), ("head", model.lm_head)):
            if group in reinit:
                module.reset_parameters()
    freeze_groups(model, frozen)
    if frozen:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"frozen: {', '.join(frozen)}; trainable: {', '.join(g for g in GROUPS if g not in frozen)} "
              f"({trainable:,} parameters)")
    return model


# -----------------------------------------------------------------------------
# one stage: set up (or resume), then optimizer steps, evaluating and saving every eval_interval

@dataclass
class Stage:
    """What one stage's loop works on. `model` is what is saved; `train_model` what runs forward and backward (the
    same module, DDP-wrapped and/or compiled); `ddp_model` the DDP wrapper, where gradient sync is switched."""
    name: str
    model: GPT
    optimizer: torch.optim.Optimizer
    data: Data
    max_iters: int
    base_lr: float
    ckpt_path: str
    log_path: str
    iter_num: int = 0
    tokens_seen: int = 0
    prior_tokens: int = 0  # tokens of the stages before, for the compute-matched comparison
    best_val_loss: float = math.inf
    start_iter: int = 0
    last_logged: int = -1  # the iteration of the last log record: an evaluation already made
    train_model: torch.nn.Module = None
    ddp_model: torch.nn.Module = None
    autocast: object = None
    scaler: object = None


def setup_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp):
    """The model, optimizer and data of a stage, from scratch, from init_path, or resumed from its own checkpoint
    (optimizer, every rank's data order and RNG, the counters, the log cut back to the checkpoint). Checkpoints are
    read to the CPU and dropped once copied: nothing of them stays alive during training."""
    stage_dir = os.path.join(cfg.out_dir, stage)
    ckpt_path, log_path = os.path.join(stage_dir, "ckpt.pt"), os.path.join(stage_dir, "log.jsonl")
    resume = init = None
    if cfg.resume and os.path.exists(ckpt_path):
        resume = safety.load_checkpoint(ckpt_path, "--resume: ")
        safety.check_resume_world(resume, ckpt_path, ddp.world)
    elif cfg.resume:
        print(f"--resume: there is no {ckpt_path} yet, so {stage} starts fresh")
    if resume is None and init_path:  # the previous stage's checkpoint (or --init_from)
        init = safety.load_checkpoint(init_path, "--init_from ")
    max_iters, base_lr = getattr(cfg, f"{stage}_iters"), getattr(cfg, f"{stage}_lr")
    last_logged = -1  # the iteration of the log's last record
    if resume is not None:  # the log cut back to the checkpoint (rank 0's file, rank 0's word)
        last_logged = ddp.share(safety.trim_log(log_path, resume["iter_num"]) if ddp.master else None)
        if resume["iter_num"] >= max_iters and last_logged == resume["iter_num"]:
            print(f"== {stage}: already complete in {ckpt_path}, skipping")
            return None
    tokenizer = (resume or init or {}).get("data", {}).get("tokenizer")
    if stage == "finetune" and tokenizer is None:  # from scratch: the pre-training corpus's tokenizer
        tokenizer = prepared(cfg.data_dir, cfg.pretrain_data, "tokens")[1]["tokenizer"]
    print(f"== {stage}: {max_iters} iterations on {getattr(cfg, f'{stage}_data')}, lr {base_lr}")
    torch.manual_seed(cfg.seed)
    data = make_data(stage, cfg, nca_cfg, model_cfg.block_size, tokenizer, ddp)
    if resume is not None:
        model = GPT(ModelConfig(**resume["model_args"]))
        model.load_state_dict(resume["model"])
        for name, p in model.named_parameters():  # frozen groups stay frozen across a resume
            p.requires_grad_(name in resume["trainable"])
        print(f"resuming {ckpt_path} at iteration {resume['iter_num']}")
    else:
        model = build_model(stage, cfg, model_cfg, data, init)
    if ddp.world > 1:  # the same weights on every rank (DDP broadcasts rank 0's), but each its own dropout masks
        torch.manual_seed(cfg.seed + RANK_SEED_STRIDE * ddp.rank)
    safety.check_memory(model.config, cfg, model.config.vocab_size, ddp.world)
    model.to(cfg.device)
    optimizer = model.configure_optimizers(cfg.weight_decay, base_lr, (cfg.beta1, cfg.beta2),
                                           torch.device(cfg.device).type)
    run = Stage(stage, model, optimizer, data, max_iters, base_lr, ckpt_path, log_path, last_logged=last_logged)
    # mixed precision: autocast to cfg.dtype; float16 also scales the loss (GradScaler), whose scale is saved
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    device_type = torch.device(cfg.device).type
    run.autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
    run.scaler = torch.amp.GradScaler(device_type, enabled=(ptdtype == torch.float16))
    if init is not None:
        run.prior_tokens = init["prior_tokens"] + init["tokens_seen"]
    if resume is not None:
        restore(run, resume, cfg, ddp)
    elif ddp.master:
        open(log_path, "w").close()  # a fresh run starts a fresh log
        with open(os.path.join(stage_dir, "config.json"), "w") as f:  # its settings, readable without torch
            json.dump(settings(run, cfg), f, indent=1)
    return run


def restore(run, resume, cfg, ddp):
    """Where a resumed stage stood: optimizer, float16 loss scale, this rank's data order and RNG, the counters."""
    run.optimizer.load_state_dict(resume["optimizer"])  # moved to the parameters' device by torch
    if resume.get("scaler"):  # (empty when it ran in another precision)
        run.scaler.load_state_dict(resume["scaler"])
    rank_state = resume["rank_state"][ddp.rank]
    run.data.load_state_dict(rank_state["data"])
    set_rng_state(rank_state, cfg.device)
    run.iter_num = run.start_iter = resume["iter_num"]
    run.tokens_seen, run.prior_tokens, run.best_val_loss = (resume["tokens_seen"], resume["prior_tokens"],
                                                            resume["best_val_loss"])


def settings(run, cfg):
    """The run's settings: the config that rebuilds the model (model_args), the training flags, the NCA config of
    the stage's NCA data (the flags', or an NCA rows folder's), and the torch version that ran it (numbers drift
    between versions)."""
    return {"model_args": asdict(run.model.config), "config": asdict(cfg),
            "nca_config": asdict(run.data.nca_cfg) if run.data.nca_cfg else None, "torch": str(torch.__version__)}


def save(run, cfg, ddp):
    """Every rank hands rank 0 what it needs to resume (data order, RNG); rank 0 writes the checkpoint: a plain dict
    of plain types and state dicts, with the config that rebuilds the model (model_args)."""
    rank_state = ddp.gather({"data": run.data.state_dict(), **rng_state(cfg.device)})
    if not ddp.master:
        return
    data = run.data
    safety.save_checkpoint(run.ckpt_path, {
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
        **settings(run, cfg),
        "stage": run.name,
        "data": {"name": data.name, "tokenizer": data.tokenizer, "vocab_size": data.vocab_size,
                 "eot_token": data.eot_token},
        "iter_num": run.iter_num, "max_iters": run.max_iters, "tokens_seen": run.tokens_seen,
        "prior_tokens": run.prior_tokens, "best_val_loss": run.best_val_loss, "rank_state": rank_state,
        "trainable": [n for n, p in run.model.named_parameters() if p.requires_grad]})


def evaluate_and_save(run, cfg, ddp, train_loss, elapsed):
    """Validation loss on the fixed batches, one log record, then the checkpoint it describes. The record is written
    first: a kill between the two leaves a record past the checkpoint, which --resume drops and makes again."""
    val_loss = estimate_loss(run.model, run.data, run.autocast, ddp, Progress())  # a line every 10 s
    run.best_val_loss = min(run.best_val_loss, val_loss)
    print(f"iter {run.iter_num}: val loss {val_loss:.4f} (best {run.best_val_loss:.4f})", flush=True)
    if not math.isfinite(val_loss):
        raise RuntimeError(f"{run.name}: validation loss is {val_loss} at iteration {run.iter_num}; stopping. "
                           f"{safety.kept_checkpoint(run.ckpt_path)}")
    if ddp.master:
        safety.append_log(run.log_path, {
            "iter": run.iter_num, "tokens": run.tokens_seen, "prior_tokens": run.prior_tokens,
            "lr": lr_at(run, cfg), "train_loss": train_loss, "val_loss": val_loss, "elapsed": elapsed,
            **probe_context(run, cfg)})
    run.last_logged = run.iter_num
    if run.iter_num > run.start_iter:
        save(run, cfg, ddp)


def forward_backward(run, ddp):
    """The gradients of one optimizer step: micro_steps micro-batches on every rank. The step's loss is the sum of
    the losses of all its target tokens (every micro-batch of every rank) over their number, so each token counts
    alike however the step is cut up or padded: each micro-batch's mean loss is weighted by its number of targets,
    and the gradients are divided by the step's total once it is known. -> (loss, tokens, seconds waiting for data);
    tokens: the positions trained on, every rank's, up to each row's last target (fine-tuning's padding left out)."""
    full = ddp.batch_size * run.model.config.block_size  # the targets of a micro-batch with every position scored
    totals, data_time = 0, 0.0  # on the device: the sums of (loss x targets, targets, tokens)
    for micro_step in range(ddp.micro_steps):
        t0 = time.time()
        x, y = run.data.get_batch("train")
        data_time += time.time() - t0
        if run.ddp_model is not None:  # average the gradients across ranks only on the last micro-step
            run.ddp_model.require_backward_grad_sync = micro_step == ddp.micro_steps - 1
        with run.autocast:
            _, loss = run.train_model(x, y)  # the mean over the micro-batch's targets
        scored = y != -1
        targets, tokens = scored.sum(), scored.flip(1).cumsum(1).gt(0).sum()
        run.scaler.scale(loss * (targets / full)).backward()
        # on the device (not .item(): that would make the CPU wait for the GPU at every micro-step)
        totals = totals + torch.stack([loss.detach().double() * targets, targets.double(), tokens.double()])
    totals = ddp.sum(totals)
    grads = [p.grad for p in run.model.parameters() if p.grad is not None]  # DDP averaged them over the ranks:
    torch._foreach_mul_(grads, (full * ddp.world / totals[1]).float())    # sum / (full * world) -> sum / targets
    loss_x_targets, targets, tokens = totals.tolist()  # the one wait for the GPU in a step
    return loss_x_targets / targets, int(tokens), data_time


def train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp=Dist()):
    """Train one stage; returns its checkpoint path and what was measured (Meter.summary). Ctrl-C or SIGTERM stops it
    at the next safe point with a checkpoint (safety.StopSignal)."""
    stage_dir = os.path.join(cfg.out_dir, stage)
    os.makedirs(stage_dir, exist_ok=True)
    stop = safety.StopSignal(enabled=ddp.world == 1)
    try:
        with stop.interruptible():  # making the data may take long (an NCA pool); nothing to save yet
            run = setup_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp)
        if run is None:
            return os.path.join(stage_dir, "ckpt.pt"), {}
        # DDP averages gradients across the ranks during backward; torch.compile wraps DDP, so it can split the
        # graph at DDP's gradient buckets and the all-reduce overlaps the backward pass
        run.train_model = run.model
        if ddp.world > 1:  # the rotary tables are derived, identical on every rank: no buffer sync in forward
            run.train_model = run.ddp_model = DistributedDataParallel(
                run.model, device_ids=[ddp.local_rank] if torch.device(cfg.device).type == "cuda" else None,
                forward_sync_buffers=False)
        if cfg.compile:
            run.train_model = torch.compile(run.train_model)
        return train_loop(run, cfg, ddp, stop)
    except safety.StopRequested:
        raise SystemExit(f"{stop.requested}: stopped before {stage} began; nothing to save") from None
    finally:
        stop.restore()


def train_loop(run, cfg, ddp, stop):
    """Optimizer steps until max_iters, evaluating and saving every eval_interval iterations and at the end."""
    meter, loss = Meter(run), None
    try:
        while True:
            if (run.iter_num == run.max_iters or run.iter_num % cfg.eval_interval == 0) and \
                    run.iter_num != run.last_logged:  # (not again at an iteration resumed from)
                with stop.interruptible():  # a stop drops the evaluation; --resume makes it again
                    evaluate_and_save(run, cfg, ddp, loss, time.time() - meter.t_start)
            if run.iter_num >= run.max_iters:
                break
            with stop.interruptible():  # the next batch may take long to make (NCA with a narrow band)
                run.data.ready()
            t_step, lr = time.time(), lr_at(run, cfg)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            loss, tokens, data_time = forward_backward(run, ddp)
            if not math.isfinite(loss):
                raise RuntimeError(f"{run.name}: training loss is {loss} at iteration {run.iter_num}; stopping "
                                   f"without saving. {safety.kept_checkpoint(run.ckpt_path)}; try a lower "
                                   f"--{run.name}_lr")
            if cfg.grad_clip > 0:
                run.scaler.unscale_(run.optimizer)
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.optimizer.zero_grad(set_to_none=True)
            run.iter_num += 1
            run.tokens_seen += tokens
            meter.step(time.time() - t_step, tokens, data_time)
            if run.iter_num % cfg.log_interval == 0:
                meter.log_line(loss, lr)
    except safety.StopRequested:  # Ctrl-C or SIGTERM: a checkpoint at this very step, then out
        save(run, cfg, ddp)
        raise SystemExit(f"{stop.requested}: stopped at iteration {run.iter_num} of {run.name} and saved "
                         f"{run.ckpt_path}; continue with the same command and --resume") from None
    finally:
        run.data.close(wait=stop.requested is None)  # a stopping process does not wait for a batch being made
    stats = meter.summary()
    print(f"== {run.name} done in {stats['seconds'] / 60:.1f} min: best val loss {run.best_val_loss:.4f}, "
          f"{stats['tokens_per_s']:,.0f} tok/s, waiting for data {stats['data_wait']:.1%} of the time, "
          f"checkpoint {run.ckpt_path}")
    return run.ckpt_path, stats


def main(argv=None):
    cfg, model_cfg, nca_cfg = parse_args(argv)
    ddp = setup_distributed(cfg)
    if torch.device(cfg.device).type == "cuda":  # TF32 matmuls for the model (the NCA rules run in float64)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print("config:", json.dumps({**asdict(cfg), **asdict(model_cfg), **asdict(nca_cfg)}))
    stages = [s for s in (STAGES if cfg.stage == "all" else (cfg.stage,)) if getattr(cfg, f"{s}_iters") > 0]
    try:  # one run per out_dir, and a finished stage is not replaced without --resume
        with safety.run_lock(cfg.out_dir, ddp.master, ddp.share, refuse=lambda: safety.would_replace(cfg, stages)):
            run_stages(cfg, model_cfg, nca_cfg, stages, ddp)
    finally:
        if ddp.world > 1:
            dist.destroy_process_group()


def run_stages(cfg, model_cfg, nca_cfg, stages, ddp):
    """The stages in order, each starting from the checkpoint of the one before (or --init_from)."""
    safety.prepare_offline_data(cfg, stages, ddp)
    init_path = cfg.init_from
    for stage in STAGES if cfg.stage == "all" else (cfg.stage,):
        if stage not in stages:
            print(f"== {stage}: 0 iterations, skipped")
            continue
        # only the checkpoint (init_path) of a stage carries over: the next stage's memory is its own
        init_path, _ = train_stage(stage, cfg, model_cfg, nca_cfg, init_path, ddp)
        if cfg.compile:  # compiled graphs hold the stage (and its process group) until reset
            torch._dynamo.reset()
            gc.collect()
        if torch.device(cfg.device).type == "cuda":
            torch.cuda.empty_cache()
        if ddp.world > 1:
            dist.barrier()  # the next stage (and the exit) waits for rank 0's checkpoint


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        if os.environ.get("TRAIN_DEBUG"):
            raise
        sys.exit(f"train.py: {e} (TRAIN_DEBUG=1 shows the traceback)")
