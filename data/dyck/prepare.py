"""
A Dyck-language corpus, the paper's structured-but-not-NCA control for stage 1: balanced brackets of several types,
one sequence per document, written as bytes (the vocabulary of a stage-1 corpus is re-initialised anyway).

    python -m data.dyck.prepare                                   # 5M tokens of ()[]{}<>
    python -m data.dyck.prepare --num_types 2 --max_depth 8 --num_tokens 1_000_000

Each sequence draws its length (even, up to --max_length) and its depth limit (1 .. --max_depth); then at every
position it opens a random bracket type with probability 1/2, unless it must close (at the depth limit, or when
the remaining positions are just enough to close everything) or must open (at depth 0).
"""

import os

import numpy as np

from data.common import (TOKEN_FILES, check_out_dir, fraction, get_tokenizer, non_negative_int, positive_int,
                         prepare_parser, run_prepare, save_token_dataset, tokenize_documents)

BRACKETS = ("()", "[]", "{}", "<>")


def generate_sequences(num_sequences, max_length, max_depth, num_types, rng):
    """num_sequences Dyck strings, simulated together: one vectorised step per position."""
    lengths = 2 * rng.integers(1, max_length // 2 + 1, size=num_sequences)
    depth_limits = rng.integers(1, max_depth + 1, size=num_sequences)
    open_types = np.zeros((num_sequences, max_depth), dtype=np.int64)  # the stack: type of each open bracket
    depth = np.zeros(num_sequences, dtype=np.int64)
    codes = np.zeros((num_sequences, max_length), dtype=np.int64)  # type t opens as t, closes as num_types + t
    rows = np.arange(num_sequences)
    for t in range(max_length):
        remaining = lengths - t  # positions left, this one included; same parity as depth
        active = remaining > 0
        may_open = (depth < depth_limits) & (remaining > depth)  # room to close everything afterwards
        opens = active & ((depth == 0) | (may_open & (rng.random(num_sequences) < 0.5)))
        closes = active & ~opens
        new_types = rng.integers(0, num_types, size=num_sequences)
        open_types[rows[opens], depth[opens]] = new_types[opens]
        codes[opens, t] = new_types[opens]
        depth[opens] += 1
        depth[closes] -= 1
        codes[closes, t] = num_types + open_types[rows[closes], depth[closes]]
    characters = np.array([pair[0] for pair in BRACKETS[:num_types]] + [pair[1] for pair in BRACKETS[:num_types]])
    return ["".join(characters[row[:length]]) for row, length in zip(codes, lengths)]


def sequence_stream(args, rng, batch_size=1024):
    while True:  # tokenize_documents stops us once it has num_tokens
        yield from generate_sequences(batch_size, args.max_length, args.max_depth, args.num_types, rng)


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--num_tokens", type=positive_int, default=5_000_000,
                        help="tokens to write, train and val together")
    parser.add_argument("--num_types", type=int, default=4, choices=range(1, len(BRACKETS) + 1),
                        help="bracket types, taken from ()[]{}<> in order")
    parser.add_argument("--max_depth", type=int, default=32, help="largest nesting depth a sequence may reach")
    parser.add_argument("--max_length", type=int, default=1024, help="longest sequence in brackets")
    parser.add_argument("--val_fraction", type=fraction, default=0.01, help="fraction of sequences held out for val")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the sequences and the split")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args(argv)
    parser.check(check_out_dir, args.out_dir, TOKEN_FILES)
    if args.max_length < 2 or args.max_depth < 1:
        parser.error("need --max_length >= 2 and --max_depth >= 1")

    enc = get_tokenizer("bytes")
    rng = np.random.default_rng(args.seed)
    try:
        train_ids, val_ids = tokenize_documents(sequence_stream(args, rng), enc, args.val_fraction, args.seed,
                                                max_tokens=args.num_tokens)
    except ValueError as e:  # too few tokens for two sequences
        parser.error(f"{e}; give a larger --num_tokens (now {args.num_tokens})")
    save_token_dataset(args.out_dir, enc, train_ids, val_ids, parser.command(args), num_types=args.num_types,
                       max_depth=args.max_depth, max_length=args.max_length, seed=args.seed)


if __name__ == "__main__":
    run_prepare(main)
