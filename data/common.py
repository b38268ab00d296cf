"""
Pieces shared by every data/<name>/prepare.py: tokenizers, writing and checking the files on disk.

Token datasets (stages 1 and 2) follow nanoGPT:
    data/<name>/train.bin, val.bin   uint16 token ids, documents separated by the end-of-text token
    data/<name>/meta.json            {vocab_size, tokenizer, eot_token, ...}
NCA rows (stage 1, data/nca/prepare.py) are token files too, of whole rows, one NCA rule each:
    data/<name>/train.bin, val.bin   uint16, row_len = seq_len + 1 tokens per row
    data/<name>/meta.json            {kind: "nca-rows", vocab_size, seq_len, row_len, masked_targets, nca_config, ...}
Fine-tuning datasets (stage 3) are text, tokenised later with the model's own tokenizer:
    data/<name>/{train,val,test}.jsonl   one {"prompt", "completion", "answer"} per line
    data/<name>/meta.json                {task, stop, ...}
Metadata is JSON, so a downloaded data folder cannot run code (nanoGPT's meta.pkl could: unpickling calls
whatever the file names). An old meta.pkl is converted on first use by a reader that builds plain values only.

A prepare is all or nothing (see preparing): meta.json is written last and records the command that made the folder
("prepare") and, for token datasets, the size and a digest of train.bin and val.bin ("files"), which the loaders
check; a prepare stopped half-way leaves a folder they refuse, and two prepares into one folder take turns.

Scripts are run as modules from the repository root, e.g. `python -m data.stdlib.prepare`.
"""

import argparse
import fcntl
import hashlib
import io
import json
import os
import pickle
import re
import shlex
import sys
import tempfile
import time
from collections.abc import Sized
from contextlib import contextmanager

import numpy as np
import tiktoken

DATA_DIR = os.path.dirname(os.path.abspath(__file__))
TOKENIZERS = ("bytes", "gpt2")
TOKENIZER_IDS = {"bytes": (257, 256), "gpt2": (50257, 50256)}  # (vocab_size, eot_token) each tokenizer writes
EOT_TEXT = "<|endoftext|>"
UINT16_LIMIT = 2**16  # uint16 holds ids 0 .. 65535
OFFLINE_DATA = ("stdlib", "dyck", "random", "arith")  # made from what is on this machine: prepared on first use
STREAMED = ("nca", "nca-shuffled")  # stage-1 data that nca.py makes on the fly: no files
NCA_ROWS = "nca-rows"  # meta.json's "kind" of a folder of NCA rows written by data/nca/prepare.py
# the paper's web corpora, prepared by data/hf/prepare.py: name -> (Hugging Face id, config, text field)
HF_CORPORA = {
    "openwebtext": ("Skylion007/openwebtext", None, "text"),
    "openwebmath": ("open-web-math/open-web-math", None, "text"),
    "codeparrot": ("codeparrot/codeparrot-clean", None, "content"),
    "c4": ("allenai/c4", "en", "text"),
}

# -----------------------------------------------------------------------------
# command-line flags: a bad value is refused in one line naming the flag, before any work
TOKEN_FILES = "train.bin/val.bin/meta.json"
PAIR_FILES = "train.jsonl/val.jsonl/test.jsonl/meta.json"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag prints one line naming it, not the whole usage first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def check(self, check, *args):
        """check(*args), with a ValueError it raises (a message naming the flag) turned into that one line."""
        try:
            return check(*args)
        except ValueError as e:
            self.error(str(e))


class PrepareParser(ArgumentParser):
    """The flags of a prepare script. command(args) is the command line that makes the same data again, which
    meta.json records: the flags that differ from their defaults, --out_dir left out (the loaders add the folder
    they were given, wherever it has been moved to)."""

    def command(self, args):
        flags = [word for key, value in vars(args).items() if key != "out_dir" and value != self.get_default(key)
                 for word in (f"--{key}", *map(str, value if isinstance(value, list) else [value]))]
        return shlex.join(self.prog.split() + flags)


def run_prepare(main):
    """A prepare script's main(), with Ctrl-C ending it in one line: a folder it was writing stays marked unfinished
    (see preparing), which every loader refuses."""
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (Ctrl-C); a folder half-written is marked unfinished: run the command again")


def prepare_parser(script, doc):
    """The flag parser of data/<name>/prepare.py (script: its __file__), named by the command that runs it."""
    name = os.path.basename(os.path.dirname(os.path.abspath(script)))
    return PrepareParser(prog=f"python -m data.{name}.prepare", description=doc,
                         formatter_class=argparse.RawDescriptionHelpFormatter)


def check_out_dir(out_dir, holds):
    """Raise ValueError, naming --out_dir and the fix, unless out_dir is (or can be made as) a folder this process
    can write in: not "", not a file, not under a file. holds: what the folder is for. Leaves nothing behind."""
    if not out_dir.strip():
        raise ValueError(f'--out_dir "": give a folder for {holds}')
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path):  # the nearest existing folder above it is where it will be made
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "that" if path == os.path.abspath(out_dir) else path
        what = "a file, not a folder" if os.path.isfile(path) else "not a folder"
        raise ValueError(f"--out_dir {out_dir}: {where} is {what}; give a folder for {holds}")
    try:  # os.access says yes to root even in /proc, so make a file there; it has no name, so nothing is left
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        raise ValueError(f"--out_dir {out_dir}: this user cannot write in {path}; give a folder you can write "
                         f"to, for {holds}") from None


def _whole_number(text, least):
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {number}")
    return number


def positive_int(text):
    """argparse type: a whole number >= 1 (a count)."""
    return _whole_number(text, 1)


def non_negative_int(text):
    """argparse type: a whole number >= 0 (a seed, a largest value)."""
    return _whole_number(text, 0)


def fraction(text):
    """argparse type: a number strictly between 0 and 1 (a val fraction)."""
    try:
        value = float(text)
        check_val_fraction(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (not either), got {text}") from e
    return value


def input_file(path):
    """argparse type: a file that exists (checked before any work, not when it is opened)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"{path}: " + ("a folder, not a file" if os.path.isdir(path) else
                                                         "no such file"))
    return path


# -----------------------------------------------------------------------------
# tokenizers


def get_tokenizer(name):
    """A tiktoken Encoding by name: "bytes" (offline, vocab 257) or "gpt2" (BPE, vocab 50257, downloads once)."""
    if name == "bytes":
        # every byte is its own token and nothing merges, so the split pattern only chunks the work
        return tiktoken.Encoding(
            name="bytes",
            pat_str=r"\S+|\s+",
            mergeable_ranks={bytes([i]): i for i in range(256)},
            special_tokens={EOT_TEXT: 256},
        )
    if name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # tiktoken fetches the BPE ranks over the network the first time
            raise RuntimeError(
                f"could not load the gpt2 tokenizer ({type(e).__name__}: {e}); tiktoken downloads it once "
                "and caches it, so this needs the network the first time. Offline, use --tokenizer bytes"
            ) from e
    raise ValueError(f"unknown tokenizer {name!r}; valid names: {', '.join(TOKENIZERS)}")


def tokenize_documents(documents, enc, val_fraction, seed, max_tokens=None):
    """
    Encode each document and append the end-of-text token, then split whole documents (not tokens) into
    train and val: a seeded random choice of round(val_fraction * n) documents, at least 1, goes to val.
    Documents keep their input order within each split. Stops early once max_tokens tokens are encoded.
    Returns (train_ids, val_ids) as np.uint16 arrays.
    """
    check_val_fraction(val_fraction)
    if enc.n_vocab > UINT16_LIMIT:
        raise ValueError(f"tokenizer {enc.name} has {enc.n_vocab} ids; uint16 files hold ids < {UINT16_LIMIT}")
    total_documents = len(documents) if isinstance(documents, Sized) else None
    encoded, num_tokens = [], 0
    start = last_print = time.time()
    for text in documents:
        ids = enc.encode_ordinary(text)
        ids.append(enc.eot_token)
        encoded.append(np.array(ids, dtype=np.uint16))
        num_tokens += len(ids)
        if max_tokens is not None and num_tokens >= max_tokens:
            break
        if time.time() - last_print > 5:
            last_print = time.time()
            _print_progress(len(encoded), total_documents, num_tokens, max_tokens, last_print - start)
    print(f"tokenized {len(encoded):,} documents into {num_tokens:,} tokens in {time.time() - start:.1f}s")

    is_val = held_out_documents(len(encoded), val_fraction, seed)
    train_ids = np.concatenate([ids for ids, v in zip(encoded, is_val) if not v])
    val_ids = np.concatenate([ids for ids, v in zip(encoded, is_val) if v])
    return train_ids, val_ids


def check_val_fraction(val_fraction):
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")


def held_out_documents(n, val_fraction, seed):
    """Which of n documents go to val: round(val_fraction * n) of them, at least 1 and at most n - 1, by seed."""
    check_val_fraction(val_fraction)
    if n < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {n}")
    return held_out_mask(n, min(max(1, round(val_fraction * n)), n - 1), seed)


def held_out_mask(n, num_held_out, seed):
    """A boolean mask over n items with num_held_out of them, chosen at random by seed, set."""
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng(seed).permutation(n)[:num_held_out]] = True
    return mask


def _print_progress(num_documents, total_documents, num_tokens, max_tokens, elapsed):
    line = f"tokenized {num_documents:,}" + (f"/{total_documents:,}" if total_documents else "")
    line += f" documents, {num_tokens:,} tokens, {num_tokens / max(elapsed, 1e-9) / 1e6:.2f}M tokens/s"
    fraction = num_documents / total_documents if total_documents else None
    if max_tokens:
        fraction = max(fraction or 0, num_tokens / max_tokens)
    if fraction:
        line += f", ETA {elapsed * (1 - fraction) / fraction:.0f}s"
    print(line)


# -----------------------------------------------------------------------------
# writing (atomically: a crash never leaves a half-written file under the final name)


def _atomic_write(path, write, mode="wb"):
    # a temp file of its own in the same folder (os.replace is then a rename): two prepare runs side by side never
    # write into one file
    folder, name = os.path.split(path)
    fd, tmp_path = tempfile.mkstemp(dir=folder or ".", prefix=name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp_path, 0o644)  # mkstemp's files are private (0600); data files are readable like any other
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_split(path, ids):
    """Write token ids to path as raw uint16 (nanoGPT's train.bin / val.bin)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= UINT16_LIMIT):
        bad = ids.max() if ids.max() >= UINT16_LIMIT else ids.min()
        raise ValueError(f"{path}: token id {bad} does not fit; uint16 holds ids 0 .. {UINT16_LIMIT - 1}")
    _atomic_write(path, lambda f: ids.astype(np.uint16).tofile(f))


def write_meta(out_dir, **fields):
    """Write fields as a JSON object to out_dir/meta.json. Datasets go through save_token_dataset/save_pairs_dataset."""
    _atomic_write(os.path.join(out_dir, "meta.json"), lambda f: json.dump(fields, f, indent=1), mode="w")


PREPARE_LOCK = ".prepare.lock"  # held by the prepare writing the folder
DATA_FILES = ("train.bin", "val.bin", "train.jsonl", "val.jsonl", "test.jsonl", "meta.json")
UNFINISHED = "a prepare began writing this folder and has not finished: it was stopped, or is still running"
DIGEST_SPAN = 2**20  # bytes digested at each end of a data file


@contextmanager
def preparing(out_dir, command):
    """
    Write a dataset folder all or nothing: the body of the with-block writes the data files, then meta.json.
    - out_dir/.prepare.lock is held throughout, so two prepares into one folder take turns (the second says it
      waits, then writes the whole folder again) and never mix their files.
    - First, meta.json becomes a note that a prepare is under way (with the command, for the loaders' messages):
      a prepare stopped before it writes the final meta.json leaves a folder the loaders refuse, naming the command.
    - The temporary files a stopped prepare left behind are removed (no other prepare is writing now).
    """
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, PREPARE_LOCK), "a+") as lock:  # closing it releases the lock
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            print(f"waiting for another prepare into {out_dir} to finish ({lock.read().strip() or 'unknown'})",
                  flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}: {command or 'a prepare'}\n")
        lock.flush()
        for name in os.listdir(out_dir):
            if name.endswith(".tmp") and name.startswith(tuple(f + "." for f in DATA_FILES)):
                os.remove(os.path.join(out_dir, name))
        write_meta(out_dir, prepare=command, unfinished=UNFINISHED)
        yield


def file_record(path):
    """What meta.json records of a data file: its size, and a blake2b digest of its first and last MiB (of the whole
    file when it is smaller than 2 MiB). That tells one prepare's file from another's at a cost that does not grow
    with the corpus (a web corpus is GBs, and every run checks it); it is no check against a byte changed mid-file."""
    size = os.path.getsize(path)
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= 2 * DIGEST_SPAN:
            digest.update(f.read())
        else:
            digest.update(f.read(DIGEST_SPAN))
            f.seek(size - DIGEST_SPAN)
            digest.update(f.read())
    return {"bytes": size, "blake2b_first_last_mib": digest.hexdigest()}


def save_token_dataset(out_dir, enc, train_ids, val_ids, command=None, **fields):
    """Write train.bin and val.bin, then meta.json (vocab_size, tokenizer, eot_token, fields, the command that made
    the folder and file_record of each file), all or nothing (see preparing), and print sizes."""
    with preparing(out_dir, command):
        for split, ids in (("train", train_ids), ("val", val_ids)):
            path = os.path.join(out_dir, f"{split}.bin")
            write_split(path, ids)
            print(f"wrote {path}: {len(ids):,} tokens ({os.path.getsize(path) / 1e6:.1f} MB)")
        files = {name: file_record(os.path.join(out_dir, name)) for name in ("train.bin", "val.bin")}
        write_meta(out_dir, vocab_size=enc.n_vocab, tokenizer=enc.name, eot_token=enc.eot_token, **fields,
                   prepare=command, files=files)
    print(f"wrote {os.path.join(out_dir, 'meta.json')}: vocab_size {enc.n_vocab}, tokenizer {enc.name}")


def save_pairs_dataset(out_dir, splits, task, stop, command=None, **fields):
    """Write {split}.jsonl for each list of records in splits, then meta.json (task, stop, num_<split>, fields, the
    command), all or nothing (see preparing). The records are text one may edit by hand, and every one is checked
    when it is loaded, so meta.json records no digest of them."""
    with preparing(out_dir, command):
        for split, records in splits.items():
            path = os.path.join(out_dir, f"{split}.jsonl")
            lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
            _atomic_write(path, lambda f: f.write(lines), mode="w")
            print(f"wrote {path}: {len(records):,} records")
        counts = {f"num_{split}": len(records) for split, records in splits.items()}
        write_meta(out_dir, task=task, stop=stop, **counts, **fields, prepare=command)
    print(f"wrote {os.path.join(out_dir, 'meta.json')}: task {task}, stop {stop!r}")


def read_jsonl(path):
    """The JSON objects of a .jsonl file, one per non-blank line; a bad line (not UTF-8, not JSON) is named by file
    and line number."""
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                 f"{e.start + 1})") from None
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
    return records


# -----------------------------------------------------------------------------
# reading back, with errors that say how to make the missing files


def prepare_command(data_dir, name=None):
    """The command that (re)makes data_dir: the one its meta.json records (see recorded_command), else the script
    the folder's name points to, e.g. 'python -m data.stdlib.prepare'; with --out_dir unless data_dir is where that
    command writes anyway. name (of the dataset) defaults to the folder's."""
    name = name or os.path.basename(os.path.normpath(data_dir))
    words = recorded_command(data_dir)
    if words is None and name in HF_CORPORA:  # the web corpora share one script
        words = ["python", "-m", "data.hf.prepare", "--dataset", name]
    elif words is None and os.path.exists(os.path.join(DATA_DIR, name, "prepare.py")):
        words = ["python", "-m", f"data.{name}.prepare"]
    elif words is None:  # a corpus of your own: from a local file
        return f"python -m data.hf.prepare --from_file YOUR_FILE.jsonl --out_dir {shlex.quote(data_dir)}"
    script = words[2].split(".")[1]  # python -m data.<script>.prepare ...
    dataset = words[words.index("--dataset") + 1] if "--dataset" in words[3:-1] else None
    default_dir = os.path.join(DATA_DIR, dataset if script == "hf" and dataset else script)
    if os.path.abspath(data_dir) != default_dir:
        words = words + ["--out_dir", data_dir]
    return shlex.join(words)


def recorded_command(data_dir):
    """The words of the command data_dir/meta.json records as its maker ("prepare"), if that is one of this
    repository's prepare scripts written as shlex.join writes it, else None. The command is printed, never run, and
    so checked: a folder from elsewhere must not choose what a user pastes into a shell."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            command = json.load(f).get("prepare")
        words = shlex.split(command) if isinstance(command, str) else []
    except (OSError, ValueError, AttributeError):
        return None
    script = re.fullmatch(r"data\.(\w+)\.prepare", words[2]) if words[:2] == ["python", "-m"] and len(words) > 2 \
        else None
    if script and os.path.exists(os.path.join(DATA_DIR, script[1], "prepare.py")) and shlex.join(words) == command:
        return words
    return None


class PlainValues(pickle.Unpickler):
    """Reads a pickle that holds only plain values (dict, list, str, numbers ...). Anything else (a class, a
    function: how a pickle runs code) is refused, so an old meta.pkl can be read without trusting it."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, and metadata may hold plain values only")


def load_meta(data_dir, name=None):
    """data_dir/meta.json as a dict. A folder with only nanoGPT's meta.pkl gets a meta.json made from it first; one
    that a prepare is writing, or was stopped while writing, is refused."""
    path, old = os.path.join(data_dir, "meta.json"), os.path.join(data_dir, "meta.pkl")
    if not os.path.exists(path) and os.path.exists(old):
        try:
            with open(old, "rb") as f:
                meta = PlainValues(io.BytesIO(f.read())).load()
            if not isinstance(meta, dict):
                raise pickle.UnpicklingError(f"it holds a {type(meta).__name__}, not a dict")
            write_meta(data_dir, **meta)
            print(f"converted {old} to {path} (plain values only)")
        except Exception as e:
            raise ValueError(f"{old} is not plain metadata ({e}); remake the folder: "
                             f"{prepare_command(data_dir, name)}") from e
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; run: {prepare_command(data_dir, name)}")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({e}); run: {prepare_command(data_dir, name)}") from e
    if not isinstance(meta, dict):
        raise ValueError(f"{path} holds no JSON object; run: {prepare_command(data_dir, name)}")
    if "unfinished" in meta:
        raise ValueError(f"{path}: {UNFINISHED}; once no prepare is running, run: {prepare_command(data_dir, name)}")
    return meta


def check_field(meta, key, want, ok, path, remake):
    """Raise ValueError, naming the file, unless meta has key and ok(its value); want says what ok accepts."""
    if key not in meta:
        raise ValueError(f"{path} lacks {key!r} ({want}); run: {remake}")
    if not ok(meta[key]):
        raise ValueError(f"{path}: {key} must be {want}, got {meta[key]!r}; remake the folder: {remake}")


def whole_number(value, least, most):
    """value is an int (not a bool, not a float or a string) from least to most."""
    return type(value) is int and least <= value <= most


def check_prepared(data_dir, name=None):
    """A token dataset (stages 1 and 2) train.py can use, or a ValueError/FileNotFoundError naming the file and the
    command that remakes it: train.bin and val.bin whole, meta.json's fields of the right type and range, and both
    files the ones meta.json records (see check_files). Returns the meta dict."""
    remake = prepare_command(data_dir, name)
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.bin")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing; run: {remake}")
        size = os.path.getsize(path)
        if size == 0 or size % 2:
            raise ValueError(f"{path} is truncated ({size} bytes); run: {remake}")
    meta, path = load_meta(data_dir, name), os.path.join(data_dir, "meta.json")
    check_field(meta, "vocab_size", f"a whole number from 1 to {UINT16_LIMIT} (ids are uint16)",
                lambda v: whole_number(v, 1, UINT16_LIMIT), path, remake)
    if meta.get("kind") == NCA_ROWS:
        check_row_fields(meta, data_dir, remake)
    else:
        check_field(meta, "tokenizer", f"one of {', '.join(TOKENIZERS)}", lambda v: v in TOKENIZERS, path, remake)
        vocab_size, eot_token = TOKENIZER_IDS[meta["tokenizer"]]  # a decoder of another vocabulary reads nonsense
        check_field(meta, "vocab_size", f"{vocab_size}, the vocabulary of tokenizer {meta['tokenizer']}",
                    lambda v: v == vocab_size, path, remake)
        check_field(meta, "eot_token", f"{eot_token}, the <|endoftext|> id of tokenizer {meta['tokenizer']}",
                    lambda v: whole_number(v, eot_token, eot_token), path, remake)
    check_files(meta, data_dir, ("train.bin", "val.bin"), remake)
    return meta


def check_row_fields(meta, data_dir, remake):
    """The fields of a folder of NCA rows (data/nca/prepare.py): rows of row_len = seq_len + 1 tokens, as many in each
    file as meta.json says, START and END inside the vocabulary, the masked targets inside a row, the NCA config an
    object (train.py checks its values)."""
    path, most = os.path.join(data_dir, "meta.json"), 2 ** 40
    check_field(meta, "seq_len", "a whole number >= 1", lambda v: whole_number(v, 1, most), path, remake)
    check_field(meta, "row_len", f"seq_len + 1 = {meta['seq_len'] + 1}", lambda v: v == meta["seq_len"] + 1, path,
                remake)
    token_ids = f"a token id, a whole number from 0 to vocab_size - 1 = {meta['vocab_size'] - 1}"
    for key in ("start_token", "end_token"):
        check_field(meta, key, token_ids, lambda v: whole_number(v, 0, meta["vocab_size"] - 1), path, remake)
    check_field(meta, "masked_targets", f"a whole number from 0 to seq_len = {meta['seq_len']}",
                lambda v: whole_number(v, 0, meta["seq_len"]), path, remake)
    check_field(meta, "nca_config", "a JSON object of NCA flags", lambda v: isinstance(v, dict), path, remake)
    for split in ("train", "val"):
        rows = os.path.getsize(os.path.join(data_dir, f"{split}.bin")) / (2 * meta["row_len"])
        check_field(meta, f"num_{split}_rows", f"the number of rows {split}.bin holds ({rows:g})",
                    lambda v: whole_number(v, 1, most) and v == rows, path, remake)


def nca_rows(data_dir):
    """Whether data_dir/meta.json says the folder holds NCA rows (a folder whose prepare has not finished does not:
    its meta.json is a note, which the loaders refuse)."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            return json.load(f).get("kind") == NCA_ROWS
    except (OSError, ValueError, AttributeError):
        return False


UNRECORDED = set()  # folders already noted as having a meta.json that records no files


def check_files(meta, data_dir, names, remake):
    """Each of the named data files must be the one meta.json records (file_record: size and digest); a mismatch
    means the folder mixes files of two prepares, or was changed since. A meta.json that records no files (made by
    hand, by nanoGPT, or before prepares recorded them) is taken as it is, with a note."""
    path, files = os.path.join(data_dir, "meta.json"), meta.get("files")
    if files is None:
        if os.path.abspath(data_dir) not in UNRECORDED:
            UNRECORDED.add(os.path.abspath(data_dir))
            print(f"note: {path} records no sizes or digests of {' and '.join(names)}, so they are used as they are "
                  f"({remake} records them)")
        return
    if not isinstance(files, dict):
        raise ValueError(f"{path}: files must be a JSON object, got {files!r}; remake the folder: {remake}")
    for name in names:
        if files.get(name) != file_record(os.path.join(data_dir, name)):
            raise ValueError(f"{os.path.join(data_dir, name)} is not the file {path} records (its size or digest "
                             f"differs): the folder mixes two prepares, or was changed since; remake it: {remake}")


def check_task(data_dir, name=None):
    """A fine-tuning task's meta.json (stage 3) as a dict, its fields checked: task a string, stop (where generation
    stops) a non-empty string; else a ValueError naming the file."""
    meta, remake = load_meta(data_dir, name), prepare_command(data_dir, name)
    path = os.path.join(data_dir, "meta.json")
    check_field(meta, "task", "a string", lambda v: isinstance(v, str), path, remake)
    check_field(meta, "stop", "a non-empty string (where generation stops)", lambda v: isinstance(v, str) and v,
                path, remake)
    return meta


def load_pairs(data_dir, split, name=None):
    """The fine-tuning records of one split ("train", "val" or "test") as a list of dicts, each with a non-empty
    prompt and completion (checked here, so a bad record stops the run at load, not when it is sampled)."""
    path = os.path.join(data_dir, f"{split}.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing; run: {prepare_command(data_dir, name)}")
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path} holds no records; run: {prepare_command(data_dir, name)}")
    for number, record in enumerate(records, start=1):
        bad = [k for k in ("prompt", "completion") if not (isinstance(record, dict) and
                                                           isinstance(record.get(k), str) and record[k])]
        if bad:
            raise ValueError(f"{path}, record {number}: {' and '.join(bad)} missing or empty; every record needs "
                             f'a non-empty "prompt" and "completion"')
    return records


def extract_answer(completion, stop):
    """The answer a completion gives: its text up to the stop string, after the last '####' if any (GSM8K)."""
    text = completion.split(stop)[0]
    return text.split("####")[-1].strip().replace(",", "")


def prepared(root, name, kind):
    """(root/<name>, its metadata), checked (kind: "tokens" or "pairs"); the offline datasets are made on first use."""
    data_dir = os.path.join(root, name)
    check = check_prepared if kind == "tokens" else check_task
    try:
        return data_dir, check(data_dir, name)
    except (FileNotFoundError, ValueError):
        if name not in OFFLINE_DATA:
            raise
    print(f"preparing {data_dir} (python -m data.{name}.prepare --out_dir {data_dir}) ...")
    __import__(f"data.{name}.prepare", fromlist=["main"]).main(["--out_dir", data_dir])
    return data_dir, check(data_dir, name)


class Progress:
    """Prints a line at most every `seconds`, so long loops show they are alive without flooding the terminal."""

    def __init__(self, seconds=10.0):
        self.seconds, self.last = seconds, time.time()

    def __call__(self, message):
        if time.time() - self.last > self.seconds:
            self.last = time.time()
            print(message, flush=True)
