"""
A random-token corpus: the control that tells NCA's structure apart from a mere warm start. Stage 1 on it runs the
same optimiser steps, learning rate and token budget as the NCA arm, but there is nothing to learn: every token is
drawn uniformly and independently, so the best possible loss is ln(256) and any help it gives stage 2 comes from
the steps themselves (weight norms, optimiser state, a settled residual stream), not from structure in the data.

    python -m data.random.prepare                          # 5M uniform random bytes, documents of 1024
    python -m data.random.prepare --num_tokens 1_000_000 --doc_length 256

Tokens are bytes (the vocabulary of a stage-1 corpus is re-initialised anyway); documents end with end-of-text.
"""

import os

import numpy as np

from data.common import (TOKEN_FILES, check_out_dir, fraction, get_tokenizer, held_out_documents, non_negative_int,
                         positive_int, prepare_parser, run_prepare, save_token_dataset)


def random_documents(num_documents, doc_length, eot_token, rng):
    """(num_documents, doc_length + 1) uint16: uniform random bytes, each row closed by the end-of-text token."""
    docs = np.empty((num_documents, doc_length + 1), dtype=np.uint16)
    docs[:, :-1] = rng.integers(0, 256, size=(num_documents, doc_length), dtype=np.uint16)
    docs[:, -1] = eot_token
    return docs


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--num_tokens", type=positive_int, default=5_000_000,
                        help="tokens to write, train and val together")
    parser.add_argument("--doc_length", type=positive_int, default=1024,
                        help="random bytes per document, before its end-of-text")
    parser.add_argument("--val_fraction", type=fraction, default=0.01, help="fraction of documents held out for val")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the tokens and the split")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args(argv)
    parser.check(check_out_dir, args.out_dir, TOKEN_FILES)
    num_documents = -(-args.num_tokens // (args.doc_length + 1))  # enough whole documents for num_tokens
    try:
        is_val = held_out_documents(num_documents, args.val_fraction, args.seed)
    except ValueError as e:
        parser.error(f"{e} (--num_tokens {args.num_tokens}, --doc_length {args.doc_length}, "
                     f"--val_fraction {args.val_fraction})")

    enc = get_tokenizer("bytes")
    docs = random_documents(num_documents, args.doc_length, enc.eot_token, np.random.default_rng(args.seed))
    save_token_dataset(args.out_dir, enc, docs[~is_val].ravel(), docs[is_val].ravel(), parser.command(args),
                       doc_length=args.doc_length, seed=args.seed)


if __name__ == "__main__":
    run_prepare(main)
