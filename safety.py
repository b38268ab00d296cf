"""
Run safety for train.py (and eval.py): everything that keeps a run from starting wrong or ending with lost work,
kept out of the method so that train.py reads as the method. Each guard is called from train.py in one line.

  arg, add_flags      a config dataclass's fields are the flags, with their help: the defaults live in one place
  add_nca_flags       the same for NCAConfig (the band as --band LO HI); nca_config checks what they parse to

  validate            every flag, checkpoint and dataset checked before any work, one message naming the flag
  check_memory        the estimated peak memory of a stage (estimate_memory) against the device's, before step 1
  load_checkpoint     a checkpoint read to the CPU with weights_only=True: nothing read from disk can run code
  save_checkpoint     written to a temporary file, then renamed: a kill mid-save keeps the previous checkpoint
  run_lock            one run per out_dir, for its whole life; a finished stage is never replaced by accident
  trim_log            --resume cuts a stage's log back to its checkpoint
  check_resume        --resume refuses flags that differ from the checkpoint's
  StopSignal          Ctrl-C / SIGTERM stop after the current step, with a checkpoint
"""
import argparse
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import dataclasses
from contextlib import contextmanager
from dataclasses import asdict, field, fields

import numpy as np
import torch

from data.common import (NCA_ROWS, OFFLINE_DATA, STREAMED, check_out_dir, check_prepared, check_task, get_tokenizer,
                         load_pairs, prepare_command, prepared)
from model import GPT, ModelConfig, likely_cause
from nca import NCAConfig

# -----------------------------------------------------------------------------
# flags: a dataclass field per flag, with its help

def arg(default, help=""):
    """A config field with its --help text; the dataclass is the one place for both."""
    return field(default=default, metadata={"help": help})


def add_flags(parser, cls, skip=()):
    """One flag per dataclass field: the defaults live in the dataclasses only."""
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


def add_nca_flags(parser):
    """One flag per NCAConfig field, the band as --band LO HI."""
    add_flags(parser, NCAConfig, skip=("band_lo", "band_hi"))
    parser.add_argument("--band", type=float, nargs=2, default=(NCAConfig.band_lo, NCAConfig.band_hi),
                        metavar=("LO", "HI"), help="keep rules with LO < gzip ratio < HI")


def nca_config(args):
    """The NCAConfig of add_nca_flags' flags, checked (check_nca_config)."""
    return check_nca_config(pick(args, NCAConfig, band_lo=args.band[0], band_hi=args.band[1]))


# -----------------------------------------------------------------------------
# before any work: flags, checkpoints, data

def split_groups(flag, value, known):
    groups = [g for g in value.split(",") if g]
    unknown = [g for g in groups if g not in known]
    if unknown:
        raise ValueError(f"--{flag}: unknown group(s) {unknown}; choose from {', '.join(known)}")
    return groups


def validate(cfg, model_cfg, nca_cfg, all_stages, groups):
    """Every check that can be made before any work, with a message naming the flag and the fix."""
    if cfg.stage not in all_stages + ("all",):
        raise ValueError(f"--stage {cfg.stage!r}: choose one of {', '.join(all_stages)} or all")
    validate_flags(cfg, all_stages, groups)
    check_model_config(model_cfg)
    stages = all_stages if cfg.stage == "all" else (cfg.stage,)
    check_out_dir(cfg.out_dir, "<stage>/ckpt.pt and log.jsonl")
    validate_checkpoints(cfg, model_cfg, nca_cfg, stages)
    for stage in stages:
        validate_data(stage, cfg, model_cfg, nca_cfg)
        if getattr(cfg, f"{stage}_iters") > 0:
            check_memory(model_cfg, cfg, stage_vocab(stage, cfg, nca_cfg), int(os.environ.get("WORLD_SIZE", 1)),
                         quiet=True)


def validate_flags(cfg, all_stages, groups):
    for name in ("batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.nca_chunk < 0:
        raise ValueError(f"--nca_chunk must be >= 0 (0 picks by device), got {cfg.nca_chunk}")
    if cfg.nca_num_rules < 0 or cfg.nca_num_rules > 10 ** 8:
        raise ValueError(f"--nca_num_rules {cfg.nca_num_rules}: use 0 (a fresh rule per sequence) or a pool of 1 to "
                         f"10^8 rules (the paper: 16000)")
    for stage in all_stages:
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
        split_groups("reinit", cfg.reinit, groups)
    if set(split_groups("freeze", cfg.freeze, groups)) >= set(groups):
        raise ValueError(f"--freeze {cfg.freeze}: every group frozen leaves nothing to train")


def check_model_config(config, flag="--"):
    """The model's shape, checked before any tensor is made (train.py's flags, a checkpoint's model_args; GPT()
    checks only the head width). flag prefixes the names in messages: "--" for flags, "model_args." for a
    checkpoint's settings."""
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name not in ("dropout", "ffn_dim") and not value > 0:
            raise ValueError(f"{flag}{f.name}={value} must be positive")
    if config.n_embd % config.n_head != 0:
        raise ValueError(f"{flag}n_embd={config.n_embd} is not divisible by {flag}n_head={config.n_head}; every head "
                         f"gets n_embd/n_head channels, so pick an n_embd that is a multiple of {config.n_head}")
    head_dim = config.n_embd // config.n_head
    if head_dim % 2 != 0:
        raise ValueError(f"head dim {flag}n_embd/{flag}n_head = {config.n_embd}/{config.n_head} = {head_dim} is odd; "
                         f"rotary embeddings rotate pairs of channels, so use an n_embd that is a multiple of "
                         f"2*n_head = {2 * config.n_head}")
    if config.ffn_dim < 0:
        raise ValueError(f"{flag}ffn_dim={config.ffn_dim} must be >= 0 (0 = 2/3 * 4 * n_embd rounded to multiple_of)")
    if not 0.0 <= config.dropout < 1.0:
        raise ValueError(f"{flag}dropout={config.dropout} must be in [0, 1) (0 disables it)")


MAX_VOCAB = 2 ** 16  # token ids must fit the uint16 format the rest of the pipeline uses


def check_nca_config(cfg):
    """Stop with a message that names the flag and the fix, before any NCA rule is simulated. -> cfg"""
    def fail(flag, msg):
        raise ValueError(f"--{flag}: {msg}")
    for name in ("grid", "num_colors", "patch", "dT", "score_frames"):
        if getattr(cfg, name) < 1:
            fail(name, f"must be a positive integer, got {getattr(cfg, name)}")
    if cfg.num_colors < 2:
        fail("num_colors", f"an alphabet needs at least 2 states, got {cfg.num_colors}")
    if cfg.grid % cfg.patch != 0:
        fail("patch", f"the grid ({cfg.grid}) must be divisible by the patch size ({cfg.patch}); "
                      f"try --patch {max(d for d in range(1, cfg.patch + 1) if cfg.grid % d == 0)}")
    if cfg.burn_in < 0:
        fail("burn_in", f"must be >= 0, got {cfg.burn_in}")
    if not math.isfinite(cfg.identity_bias):
        fail("identity_bias", f"must be a finite number, got {cfg.identity_bias}")
    if cfg.temperature < 0 or not math.isfinite(cfg.temperature):
        fail("temperature", f"must be a finite number >= 0 (0 means argmax), got {cfg.temperature}")
    if not (0.0 <= cfg.band_lo < cfg.band_hi <= 1.0):
        fail("band", f"need 0 <= lo < hi <= 1, got ({cfg.band_lo}, {cfg.band_hi}); the paper uses 0.5 1.0")
    if cfg.vocab_size > MAX_VOCAB:
        fail("num_colors", f"num_colors**(patch*patch) + 2 = {cfg.vocab_size:,} token ids is more than a model "
                           f"embedding can hold here (max {MAX_VOCAB:,}); use fewer colours or a smaller patch")
    return cfg


def validate_checkpoints(cfg, model_cfg, nca_cfg, stages):
    """out_dir, --init_from and --resume (read lazily with mmap: a big checkpoint costs nothing here)."""
    if cfg.init_from:
        load_checkpoint(cfg.init_from, flag="--init_from ", mmap=True)  # fail now, not after preparing data
    if cfg.resume:  # the flags that shape the model, the schedule and the data must be the checkpoint's
        for stage in stages:
            path = os.path.join(cfg.out_dir, stage, "ckpt.pt")
            if os.path.exists(path):
                check_resume(load_checkpoint(path, "--resume: ", mmap=True), stage, cfg, model_cfg, nca_cfg, path)


def validate_data(stage, cfg, model_cfg, nca_cfg):
    """The stage's dataset exists, looks whole and its meta.json's fields are of the right type and range (the offline
    ones are made on first use, and made again when they fail these checks)."""
    if not os.path.isdir(cfg.data_dir):
        raise ValueError(f"--data_dir {cfg.data_dir}: no such folder (the default is this repository's data/)")
    name = getattr(cfg, f"{stage}_data")
    if stage == "prepretrain" and name in STREAMED:
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
    if stage == "finetune":  # missing or broken files, or a pair longer than the block: say so now, not hours later
        check_task(data_dir, name)
        enc = get_tokenizer(finetune_tokenizer(cfg))
        check_pairs_fit({split: [(enc.encode_ordinary(r["prompt"]), enc.encode_ordinary(r["completion"]))
                                 for r in load_pairs(data_dir, split, name)] for split in ("train", "val")},
                        data_dir, model_cfg.block_size)
    else:
        meta = check_prepared(data_dir, name)
        if meta.get("kind") == NCA_ROWS:
            check_nca_rows(stage, meta, data_dir, cfg, model_cfg, nca_cfg)


def check_nca_rows(stage, meta, data_dir, cfg, model_cfg, nca_cfg):
    """A folder of NCA rows (python -m data.nca.prepare, its fields checked by check_prepared) serves stage 1 when its
    NCA config is one (with the vocabulary, START/END and masked targets that follow from it), its rows hold a block
    and its val rows the fixed validation batches. Its NCA config is used, not the command line's (a note if they
    differ)."""
    path, remake = os.path.join(data_dir, "meta.json"), prepare_command(data_dir)
    if stage != "prepretrain":
        raise ValueError(f"--{stage}_data {os.path.basename(data_dir)}: {path} says it holds NCA rows (kind "
                         f"{NCA_ROWS}), which are stage-1 data: use it as --prepretrain_data")
    try:
        rows_cfg = check_nca_config(dataclasses.replace(nca_cfg, **meta["nca_config"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: nca_config is not a valid NCA config ({e}); remake the folder: {remake}") from None
    implied = {"vocab_size": rows_cfg.vocab_size, "start_token": rows_cfg.start_token,
               "end_token": rows_cfg.end_token, "masked_targets": rows_cfg.frame_len - 1}
    for key, value in implied.items():
        if meta[key] != value:
            raise ValueError(f"{path}: {key} is {meta[key]}, but its nca_config makes it {value}; remake the "
                             f"folder: {remake}")
    block, seq_len, need = model_cfg.block_size, meta["seq_len"], cfg.eval_iters * cfg.batch_size
    if not rows_cfg.frame_len <= block <= seq_len:
        raise ValueError(f"--block_size {block}: the rows of {path} serve a block of {rows_cfg.frame_len} (one frame) "
                         f"to {seq_len} tokens (seq_len); use one, or remake the rows with --seq_len {block}")
    if meta["num_val_rows"] < need:
        raise ValueError(f"{path}: {meta['num_val_rows']} val rows, fewer than --eval_iters x --batch_size = {need}; "
                         f"lower --eval_iters, or remake the folder with --val_rows {need}")
    if rows_cfg != nca_cfg:
        print(f"note: {data_dir} holds NCA rows made by {remake}: its NCA config is used, not the NCA flags of "
              f"this command")


def finetune_tokenizer(cfg):
    """The tokenizer stage 3 will use: its --init_from checkpoint's, else the stage-2 corpus's (an offline corpus not
    yet made: bytes)."""
    if cfg.init_from and cfg.stage == "finetune":
        tokenizer = load_checkpoint(cfg.init_from, "--init_from ", mmap=True)["data"]["tokenizer"]
        if tokenizer:  # (none after stage 1: then the stage-2 corpus's, as train.py does)
            return tokenizer
    try:
        return check_prepared(os.path.join(cfg.data_dir, cfg.pretrain_data), cfg.pretrain_data)["tokenizer"]
    except (FileNotFoundError, ValueError):
        if cfg.pretrain_data in OFFLINE_DATA:
            return "bytes"
        raise


def check_pairs_fit(encoded, data_dir, block_size):
    """encoded: {split: [(prompt ids, completion ids), ...]}. A pair longer than the block cannot be trained on."""
    for split, pairs in encoded.items():
        for number, (prompt, completion) in enumerate(pairs, start=1):
            if len(prompt) + len(completion) > block_size + 1:
                raise ValueError(f"{os.path.join(data_dir, split)}.jsonl, record {number}: its prompt + completion "
                                 f"is {len(prompt) + len(completion)} tokens; --block_size {block_size} must be at "
                                 f"least {len(prompt) + len(completion) - 1}")


def prepare_offline_data(cfg, stages, ddp):
    """The offline datasets are made on first use, by rank 0 alone (two writers would corrupt a file); the other
    ranks wait. A fine-tune from scratch needs its pre-training corpus too: its tokenizer."""
    needed = [(getattr(cfg, f"{s}_data"), "pairs" if s == "finetune" else "tokens") for s in stages]
    if "finetune" in stages and cfg.pretrain_data in OFFLINE_DATA:
        needed.append((cfg.pretrain_data, "tokens"))
    for name, kind in needed if ddp.master else ():
        if name not in STREAMED:
            prepared(cfg.data_dir, name, kind)
    if ddp.world > 1:
        torch.distributed.barrier()


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
def run_lock(out_dir, master=True, share=lambda refusal: refusal, refuse=lambda: None):
    """One run per out_dir: rank 0 (master) holds an exclusive lock on out_dir/lock for the whole run, every stage
    of it, and a second run on the same folder stops at once with a message naming the first. Once the lock is held,
    refuse() may give a reason to stop all the same (a finished stage this run would replace). share(refusal) hands
    rank 0's refusal (or None) to every rank, so that all ranks of a refused torchrun job stop, not rank 0 alone."""
    if not master:
        refusal = share(None)
        if refusal:
            raise RuntimeError(refusal)
        yield
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "lock"), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refusal = refuse()
        except BlockingIOError:
            f.seek(0)
            refusal = (f"{out_dir} is in use by another run ({f.read().strip() or 'unknown'}); wait for it to "
                       f"finish or give this run another --out_dir")
        if share(refusal):
            raise RuntimeError(refusal)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
        f.flush()
        for stage_dir in [os.path.join(out_dir, d) for d in os.listdir(out_dir)]:  # what a run killed mid-save left
            for name in os.listdir(stage_dir) if os.path.isdir(stage_dir) else ():  # (no other writer is at work)
                if name.startswith("ckpt.pt.") and name.endswith(".tmp"):
                    os.remove(os.path.join(stage_dir, name))
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def would_replace(cfg, stages):
    """Without --resume, a run that finds a checkpoint of a stage it will run would replace it: the reason to stop,
    or None."""
    found = [path for path in (os.path.join(cfg.out_dir, stage, "ckpt.pt") for stage in stages)
             if os.path.exists(path)]
    if cfg.resume or not found:
        return None
    return (f"{found[0]} exists, and a run without --resume would replace it: continue it with --resume, or give this "
            f"run another --out_dir (delete {cfg.out_dir} to start over)")


def append_log(log_path, record):
    with open(log_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(log_path, iter_num):
    """On --resume: keep the records up to the checkpoint's iteration (later ones are made again) and drop a torn or
    blank line that a kill mid-write left. A missing log starts anew. -> the iteration of the last record kept (-1:
    none)"""
    if not os.path.exists(log_path):
        print(f"--resume: {log_path} is missing; a new log starts at iteration {iter_num}")
        return -1
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
    return json.loads(kept[-1])["iter"] if kept else -1


RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "warmup_frac", "min_lr_frac")


def check_resume(checkpoint, stage, cfg, model_cfg, nca_cfg, ckpt_path):
    """--resume continues a run as it was planned: flags that shape the model, the schedule or the data must be the
    checkpoint's, or the run would silently keep the old model or re-plan its learning rate."""
    if checkpoint["stage"] != stage:
        raise ValueError(f"--resume: {ckpt_path} is a checkpoint of the {checkpoint['stage']!r} stage, not of "
                         f"{stage!r}; put it back where it came from, or start afresh with another --out_dir")
    saved, saved_cfg = checkpoint["model_args"], checkpoint.get("config", {})
    differ = [f"--{k} {v} (checkpoint: {saved.get(k)})" for k, v in asdict(model_cfg).items()
              if k != "vocab_size" and saved.get(k) != v]
    for k in (f"{stage}_iters", f"{stage}_lr", f"{stage}_data") + RESUME_MUST_MATCH:
        if saved_cfg.get(k) != getattr(cfg, k):
            differ.append(f"--{k} {getattr(cfg, k)} (checkpoint: {saved_cfg.get(k)})")
    saved_nca = checkpoint.get("nca_config")
    if saved_nca is not None and getattr(cfg, f"{stage}_data") in STREAMED:  # else an NCA rows folder's config
        differ += [f"--{k} {v} (checkpoint: {saved_nca.get(k)})" for k, v in asdict(nca_cfg).items()
                   if saved_nca.get(k) != v]
    if differ:
        raise ValueError(f"--resume: {ckpt_path} was made with other settings: {'; '.join(differ)}. Resume with the "
                         f"checkpoint's values, or start afresh with another --out_dir")


def check_resume_world(checkpoint, ckpt_path, world):
    if len(checkpoint["rank_state"]) != world:
        raise ValueError(f"--resume: {ckpt_path} was written by {len(checkpoint['rank_state'])} processes; resume "
                         f"it with as many (this job has {world}) to continue the same data order")


def check_token_file(file, vocab_size, block_size, remake):
    """A token split (an open file) must hold more than a block and no id past the vocabulary (on CUDA a bad id is
    an assert)."""
    path, tokens = file.name, np.memmap(file, dtype=np.uint16, mode="r")
    if len(tokens) <= block_size + 1:
        raise ValueError(f"{path} holds {len(tokens)} tokens, too few for --block_size {block_size}")
    if int(tokens.max()) >= vocab_size:
        raise ValueError(f"{path} holds token id {int(tokens.max())}, but its meta.json says vocab_size "
                         f"{vocab_size}; remake the folder: {remake}")


def kept_checkpoint(ckpt_path):
    """For a run stopped by a bad loss: what is left to continue from."""
    if os.path.exists(ckpt_path):
        return f"The last good checkpoint is kept in {ckpt_path}"
    return "No checkpoint of this stage was written yet"


class StopRequested(Exception):
    """Raised by StopSignal inside an interruptible() block: what was under way there is dropped."""


class StopSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop: the first prints one line at once, and the loop saves a
    checkpoint at the next safe point (after the current step, or at once from an evaluation or a wait for data,
    which are dropped), so --resume loses nothing. A second signal ends the process at once, keeping the last whole
    checkpoint. One process only: under torchrun the ranks would not agree on the step, and the last evaluation's
    checkpoint is what --resume continues."""

    def __init__(self, enabled):
        self.requested, self.previous, self.immediate = None, {}, False
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested is not None:
            print(f"{name} again: stopping now; the last checkpoint is kept", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signum)  # at once: no thread (an NCA batch being made) is waited for
        self.requested = name
        print(f"{name}: stopping at the next safe point, with a checkpoint (send it again to stop at once)",
              file=sys.stderr, flush=True)
        if self.immediate:
            raise StopRequested(name)

    @contextmanager
    def interruptible(self):
        """Inside, a stop request raises StopRequested at once: for work whose result may be dropped."""
        if self.requested:
            raise StopRequested(self.requested)
        self.immediate = True
        try:
            yield
        finally:
            self.immediate = False

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


EVAL_POSITIVE = ("num_rules", "n", "max_problems", "batch_size", "max_new_tokens", "num_batches", "num_sequences")


def check_max_k(max_k, block_size, frame_len):
    """eval.py icl: k frames of context and the predicted frame must fit the model's block. -> max_k (0: largest)"""
    largest = (block_size + 1) // frame_len - 1
    if largest < 1:
        raise ValueError(f"the model's block ({block_size} tokens) is shorter than two NCA frames")
    if not 1 <= (max_k or largest) <= largest:
        raise ValueError(f"--max_k {max_k}: the model's block of {block_size} tokens holds at most {largest} frames "
                         f"of context plus the predicted frame ({frame_len} tokens each); use --max_k {largest} or "
                         f"leave it out")
    return max_k or largest


def check_eval_args(args):
    """The numbers of every subcommand, checked before any model is loaded."""
    for name in EVAL_POSITIVE:
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("block_size", "max_tokens"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1 (or left out), got {getattr(args, name)}")
    if getattr(args, "max_k", 0) < 0:
        raise ValueError(f"--max_k must be >= 1 (0 or left out: as many as the model's block holds), got {args.max_k}")
    if hasattr(args, "temperature") and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0 (0: greedy), got {args.temperature}")
    if hasattr(args, "k") and (max(args.k) > args.n or min(args.k) < 1):
        raise ValueError(f"--k {args.k}: every k must be between 1 and --n {args.n}")
    if hasattr(args, "top_p") and not 0 < args.top_p <= 1:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")


def check_text_data(ckpt, meta, data_dir, ckpt_path):
    """The dataset must be tokenised the way the checkpoint was trained, or the loss is meaningless."""
    trained = ckpt["data"]
    if (meta["tokenizer"], meta["vocab_size"]) != (trained["tokenizer"], trained["vocab_size"]):
        raise ValueError(f"{data_dir} is tokenised with {meta['tokenizer']} (vocab {meta['vocab_size']}) but "
                         f"{ckpt_path} was trained with {trained['tokenizer']} (vocab {trained['vocab_size']}); "
                         f"pick a dataset prepared with --tokenizer {trained['tokenizer']}")


# -----------------------------------------------------------------------------
# memory: an estimate before anything is allocated

def split_batch(cfg, world):
    """How `world` processes share an optimizer step of batch_size x grad_accum sequences (the same global batch for
    any number of processes): (sequences per process and micro-step, micro-steps per process). The micro-steps are
    shared out when they divide evenly (as nanoGPT does), else each micro-batch is."""
    if cfg.grad_accum % world == 0:
        return cfg.batch_size, cfg.grad_accum // world
    if cfg.batch_size % world == 0:
        return cfg.batch_size // world, cfg.grad_accum
    raise ValueError(f"--batch_size {cfg.batch_size} x --grad_accum {cfg.grad_accum} sequences per step cannot be "
                     f"shared evenly by {world} processes; make --batch_size or --grad_accum a multiple of {world}")


def stage_vocab(stage, cfg, nca_cfg):
    """The vocabulary a stage will train on, from its metadata alone (an offline dataset not yet made, or to be made
    again: 257 bytes)."""
    name = getattr(cfg, f"{stage}_data")
    if stage == "prepretrain" and name in STREAMED:
        return nca_cfg.vocab_size
    data_dir = os.path.join(cfg.data_dir, cfg.pretrain_data if stage == "finetune" else name)
    try:
        return check_prepared(data_dir)["vocab_size"]
    except (FileNotFoundError, ValueError):
        return 257


def device_memory(device):
    """(bytes this process may use, what they are): free GPU memory, or the RAM the kernel says is available."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return available, "of RAM available"


def check_memory(model_cfg, cfg, vocab_size, world=1, quiet=False):
    """Refuse a stage whose estimated peak memory (estimate_memory, per process) exceeds what the device has free;
    print the estimate unless quiet. Run before any data or model is made, so a size too big fails in seconds."""
    per_rank_batch, micro_steps = split_batch(cfg, world)
    config = dataclasses.replace(model_cfg, vocab_size=vocab_size)
    estimate = estimate_memory(config, per_rank_batch, cfg.dtype, micro_steps)
    if not quiet:
        print(f"memory estimate: {describe_memory(estimate)}")
    limit, what = device_memory(cfg.device)
    if estimate["total"] > 0.95 * limit:
        raise ValueError(f"--block_size {model_cfg.block_size} x --batch_size {cfg.batch_size} needs about "
                         f"{estimate['total'] / 2 ** 30:,.1f} GiB (estimate_memory), and {limit / 2 ** 30:,.1f} GiB "
                         f"are {what}: lower --batch_size and raise --grad_accum (the same batch per step), or "
                         f"shrink --block_size or the model")


def describe_memory(estimate):
    unit, size = ("GiB", 2 ** 30) if estimate["total"] >= 2 ** 30 else ("MiB", 2 ** 20)
    parts = ", ".join(f"{k} {v / size:.2f}" for k, v in estimate.items() if k not in ("total", "per_token_layer"))
    return f"{estimate['total'] / size:.2f} {unit} ({parts})"


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def estimate_memory(config, batch_size, dtype="bfloat16", grad_accum=1):
    """Bytes that a training step of GPT(config) needs at its peak, from the config alone (nothing is allocated),
    to choose --batch_size before a run. batch_size is the micro-batch, of block_size tokens per row; dtype is
    the autocast dtype ("float32": no autocast); every parameter is taken as trainable. Returns a dict:
      weights           float32 master weights, 4 bytes per parameter
      gradients         float32, 4 per parameter
      adamw             exp_avg and exp_avg_sq, 8 per parameter
      autocast_weights  the copy in dtype of every linear weight that autocast makes and backward keeps
      activations       what the forward keeps for backward (formula below), batch_size * block_size tokens
      logits            (a + 12) bytes per token and vocabulary entry, all alive as backward starts: the
                        logits in dtype, the float32 log-probabilities cross-entropy keeps, their gradient and
                        the gradient of the float32 logits
      total             the peak of every step after the first (the first makes the AdamW state at its end),
                        with grad_accum = 1 (grads set to None after each step, as train.py does):
                        weights + adamw + max(autocast_weights + activations + logits, gradients), since backward
                        frees activations as it makes gradients; with grad_accum > 1 all of it at once
      per_token_layer   activations of one token in one layer (the formula)
    Activations of one token in one layer, in bytes, with a = bytes of dtype, C = n_embd, H = hidden_dim:
      RMSNorm x 2        16C + 8    float32 input and normalised output, 1/rms (the residual stream is float32)
      linear inputs      5aC        autocast casts the norm's output separately for q, k, v, gate and up
                         (8C)       float32: the two norms' outputs, each shared by its linears
      attention          4aC + 4nh  rotated q, k, v and the output (which is o_proj's input), log-sum-exp
      SwiGLU             4aH        gate, silu(gate), up and their product (down_proj's input)
    = 34C + 8H + 4nh + 8 in bfloat16 (132.1 KiB at C=2048, H=8192, nh=16; 132.6 KiB was measured on a GPU),
      40C + 16H + 4nh + 8 in float32. Plus per token: input ids and targets (16), the final norm (8C + 4) and
    lm_head's input (aC, or 4C in float32); plus, under autocast, each layer's casts of the rotary tables.
    Assumes a fused attention kernel (flash or memory-efficient, as on GPUs and in CPU builds of torch 2.x):
    O(T) per head. The math fallback would also keep (B, nh, T, T) attention weights per layer. Not counted:
    the CUDA context, cuBLAS workspaces and the caching allocator's fragmentation (leave ~10% headroom), and
    torch.compile, which fuses element-wise ops and keeps less. Checked on CPU (test_smoke.py): activations
    exactly as autograd saves them; total within 3% of a step's peak resident memory."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    a = DTYPE_BYTES[dtype]
    autocast = dtype != "float32"
    C, H, nh, T, V, L = (config.n_embd, config.hidden_dim, config.n_head, config.block_size, config.vocab_size,
                         config.n_layer)
    tokens = batch_size * T
    linear_params = L * (4 * C * C + 3 * C * H) + V * C  # attention, MLP, lm_head
    params = linear_params + V * C + L * 2 * C + C  # + embedding table, norm gains
    per_token_layer = (16 * C + 8) + (5 * a * C if autocast else 8 * C) + (4 * a * C + 4 * nh) + 4 * a * H
    per_token_outside = 16 + (8 * C + 4) + (a * C if autocast else 4 * C)
    rope_casts = L * 4 * T * (C // nh) * a if autocast else 0  # cos and sin, for q and for k
    memory = {
        "weights": 4 * params,
        "gradients": 4 * params,
        "adamw": 8 * params,
        "autocast_weights": a * linear_params if autocast else 0,
        "activations": tokens * (L * per_token_layer + per_token_outside) + rope_casts,
        "logits": tokens * V * (a + 4 + 4 + 4),
        "per_token_layer": per_token_layer,
    }
    in_flight = memory["autocast_weights"] + memory["activations"] + memory["logits"]
    if grad_accum > 1:  # later micro-steps run forward and backward with every gradient held
        in_flight += memory["gradients"]
    memory["total"] = memory["weights"] + memory["adamw"] + max(in_flight, memory["gradients"])
    return memory


def load_checkpoint(path, flag="", mmap=False):
    """A checkpoint of train.py, always loaded to the CPU: the caller moves what runs (weights with model.to,
    optimizer state with optimizer.load_state_dict), and the RNG states stay CPU byte tensors, the only kind
    generators accept. weights_only=True: loading builds tensors and plain containers, never runs code from the file.
    mmap=True reads tensors lazily (to look at the settings of a big checkpoint). flag names the flag in messages."""
    if not os.path.isfile(path):
        raise ValueError(f"{flag}{path}: no checkpoint file at that path; train.py writes out_dir/<stage>/ckpt.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise ValueError(f"{flag}{path} is not a checkpoint torch can load safely ({type(e).__name__}); "
                         f"give a ckpt.pt written by train.py") from e
    if not isinstance(checkpoint, dict) or not {"model", "model_args", "stage"} <= checkpoint.keys():
        raise ValueError(f"{flag}{path} is not a checkpoint of train.py (it lacks model / model_args / stage)")
    try:
        check_checkpoint(checkpoint)
    except ValueError as e:
        raise ValueError(f"{flag}{path}: {e}; give a ckpt.pt written by train.py") from None
    return checkpoint


CHECKPOINT_NUMBERS = ("iter_num", "tokens_seen", "prior_tokens")  # counters every checkpoint of train.py holds


def check_checkpoint(checkpoint):
    """What a checkpoint claims, checked before anything is built from it: its stage; model_args against
    ModelConfig's fields, types and ranges; the weights' names and shapes against the model model_args describe
    (built on the meta device: no memory); the size of what building it allocates; the data it was trained on."""
    if checkpoint["stage"] not in ("prepretrain", "pretrain", "finetune"):
        raise ValueError(f"its stage {checkpoint['stage']!r} is not one of train.py's")
    args, known = checkpoint["model_args"], {f.name: f for f in fields(ModelConfig)}
    if not isinstance(args, dict) or set(args) - set(known):
        raise ValueError(f"model_args holds {sorted(set(args) - set(known)) if isinstance(args, dict) else args!r}, "
                         f"which model.py's ModelConfig does not know")
    for name, value in args.items():
        kind = type(known[name].default)
        if type(value) is not kind and not (kind is float and type(value) is int):
            raise ValueError(f"model_args.{name} is {value!r}, not a number of type {kind.__name__}")
    config = ModelConfig(**args)
    check_model_config(config, flag="model_args.")
    rope_bytes = 2 * 4 * config.block_size * (config.n_embd // config.n_head)
    if rope_bytes > device_memory("cpu")[0] / 4:
        raise ValueError(f"model_args.block_size={config.block_size} would need {rope_bytes / 2 ** 30:,.1f} GiB of "
                         f"rotary tables")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPT(config).state_dict().items()}
    weights = checkpoint["model"]
    found = {k: tuple(v.shape) for k, v in weights.items()} if isinstance(weights, dict) and all(
        isinstance(v, torch.Tensor) for v in weights.values()) else None
    if found is None:
        raise ValueError("its model entry is not a state dict of tensors")
    if found != expected:
        wrong = sorted(set(expected) ^ set(found)) or [k for k in expected if found[k] != expected[k]]
        raise ValueError(f"its weights do not fit its model_args: {likely_cause(weights, config, ())} (first "
                         f"mismatch: {wrong[0]})")
    data = checkpoint.get("data")
    if not (isinstance(data, dict) and isinstance(data.get("name"), str) and
            isinstance(data.get("tokenizer"), (str, type(None))) and type(data.get("vocab_size")) is int):
        raise ValueError("its data record (name, tokenizer, vocab_size) is missing or malformed")
    for name in CHECKPOINT_NUMBERS:
        if type(checkpoint.get(name)) is not int or checkpoint[name] < 0:
            raise ValueError(f"its {name} is {checkpoint.get(name)!r}, not a count")
