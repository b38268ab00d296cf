"""
A stage-3 task a tiny byte-level model learns in minutes on a CPU: addition of two numbers, written as Python.

    python -m data.arith.prepare                       # 0..99 + 0..99: 4000 train, 250 val, 500 test problems
    python -m data.arith.prepare --max_operand 999 --num_train 20000

One record: {"prompt": "assert 23 + 58 == ", "completion": "81\\n", "answer": "81"}; generation stops at "\\n".
The splits are disjoint even up to order: if 23 + 58 is a test problem, 58 + 23 appears nowhere else.
"""

import os

import numpy as np

from data.common import (PAIR_FILES, check_out_dir, non_negative_int, positive_int, prepare_parser, run_prepare,
                         save_pairs_dataset)

STOP = "\n"


def make_record(a, b):
    return {"prompt": f"assert {a} + {b} == ", "completion": f"{a + b}{STOP}", "answer": str(a + b)}


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--max_operand", type=non_negative_int, default=99,
                        help="operands are drawn from 0 .. max_operand")
    parser.add_argument("--num_train", type=positive_int, default=4000, help="training problems")
    parser.add_argument("--num_val", type=positive_int, default=250, help="validation problems")
    parser.add_argument("--num_test", type=positive_int, default=500, help="test problems")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the problems and their order")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args(argv)
    parser.check(check_out_dir, args.out_dir, PAIR_FILES)

    # every unordered pair {a, b} once, so no split sees another split's problem with the operands swapped
    pairs = [(a, b) for a in range(args.max_operand + 1) for b in range(a, args.max_operand + 1)]
    sizes = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    if sum(sizes.values()) > len(pairs):
        parser.error(f"asked for {sum(sizes.values())} problems, but 0..{args.max_operand} has {len(pairs)}")
    rng = np.random.default_rng(args.seed)
    chosen = rng.permutation(len(pairs))
    swap = rng.random(len(pairs)) < 0.5  # write each pair in a random order
    records = [make_record(*(pairs[i][::-1] if swap[i] else pairs[i])) for i in chosen]
    splits, start = {}, 0
    for split, size in sizes.items():
        splits[split] = records[start:start + size]
        start += size
    save_pairs_dataset(args.out_dir, splits, command=parser.command(args), task="arith", stop=STOP,
                       max_operand=args.max_operand, seed=args.seed)


if __name__ == "__main__":
    run_prepare(main)
