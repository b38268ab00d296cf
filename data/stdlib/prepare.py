"""
The default stage-2 corpus, offline: the Python standard library's own .py source files, one document per file.

    python -m data.stdlib.prepare                        # all of it (~12 MB on 3.11), byte tokens, ~3 s
    python -m data.stdlib.prepare --max_bytes 1000000    # a 1 MB slice
    python -m data.stdlib.prepare --tokenizer gpt2       # GPT-2 BPE instead (downloads the tokenizer once)

Writes data/stdlib/train.bin, val.bin (uint16 ids, files separated by <|endoftext|>) and meta.json.
Files are taken in sorted path order until --max_bytes; whole files go to train or val.
"""

import os
import sys
import sysconfig

from data.common import (TOKENIZERS, TOKEN_FILES, check_out_dir, fraction, get_tokenizer, non_negative_int,
                         positive_int, prepare_parser, run_prepare, save_token_dataset, tokenize_documents)

# installed packages, the test suites and their data (some deliberately odd files) are not "the standard library"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def source_files(stdlib_dir, max_bytes):
    """Sorted paths of the standard library's .py files, as many as fit in max_bytes."""
    paths = []
    for root, dirs, files in os.walk(stdlib_dir):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        paths += [os.path.join(root, f) for f in files if f.endswith(".py")]
    chosen, total = [], 0
    for path in sorted(paths):
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        chosen.append(path)
        total += size
    return chosen


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--tokenizer", default="bytes", choices=TOKENIZERS, help="token ids to write")
    parser.add_argument("--max_bytes", type=positive_int, default=20_000_000, help="cap on the corpus size in bytes")
    parser.add_argument("--val_fraction", type=fraction, default=0.05, help="fraction of files held out for val")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the train/val split of files")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args(argv)
    parser.check(check_out_dir, args.out_dir, TOKEN_FILES)

    stdlib_dir = sysconfig.get_paths()["stdlib"]
    paths = source_files(stdlib_dir, args.max_bytes)
    if len(paths) < 2:  # one for train, one for val
        parser.error(f"--max_bytes {args.max_bytes}: only {len(paths)} source file(s) fit, and train and val need "
                     "one each; give a larger --max_bytes")
    num_bytes = sum(os.path.getsize(p) for p in paths)
    print(f"{len(paths):,} files, {num_bytes / 1e6:.1f} MB of Python {sys.version.split()[0]} source in {stdlib_dir}")
    enc = get_tokenizer(args.tokenizer)
    documents = [read_text(p) for p in paths]
    train_ids, val_ids = tokenize_documents(documents, enc, args.val_fraction, args.seed)
    save_token_dataset(args.out_dir, enc, train_ids, val_ids, parser.command(args), num_files=len(paths),
                       num_bytes=num_bytes, python_version=sys.version.split()[0], val_fraction=args.val_fraction,
                       seed=args.seed)


if __name__ == "__main__":
    run_prepare(main)
