"""
The paper's stage-2 corpora from the Hugging Face Hub, streamed, so a slice needs no full download.

    pip install datasets
    python -m data.hf.prepare --dataset openwebtext --max_tokens 100_000_000   # -> data/openwebtext/
    python -m data.hf.prepare --dataset codeparrot --max_docs 50_000           # -> data/codeparrot/
    python -m data.hf.prepare --dataset c4 --from_file my_c4_slice.jsonl --tokenizer bytes   # local data, offline

--from_file takes a .jsonl file (one document per line, in the corpus's text field) or a text file whose
documents are separated by <|endoftext|>, and writes it exactly as the streamed corpus would be written.
"""

import itertools
import os

from data.common import (DATA_DIR, EOT_TEXT, HF_CORPORA as CORPORA, TOKENIZERS, TOKEN_FILES, check_out_dir, fraction,
                         get_tokenizer, input_file, non_negative_int, positive_int, prepare_parser, read_jsonl,
                         run_prepare, save_token_dataset, tokenize_documents)


def stream_documents(dataset):
    """Texts of the corpus's train split, streamed from the Hub."""
    hf_id, config, field = CORPORA[dataset]
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError("the Hugging Face corpora need the datasets package: pip install datasets") from e
    try:
        rows = load_dataset(hf_id, config, split="train", streaming=True)
    except Exception as e:
        raise RuntimeError(f"could not open {hf_id} on the Hugging Face Hub ({e}); this needs the network. "
                           "For local data use --from_file") from e
    return (row[field] for row in rows)


def file_documents(path, field):
    """Texts of a local .jsonl file (field of each line) or text file (split on <|endoftext|>)."""
    if path.endswith(".jsonl"):
        rows = read_jsonl(path)
        missing = next((n for n, row in enumerate(rows, 1) if not isinstance(row, dict) or field not in row), None)
        if missing:
            raise ValueError(f"--from_file {path}, record {missing}: no {field!r} field, where this corpus keeps "
                             "its text")
        return [row[field] for row in rows]
    with open(path, encoding="utf-8") as f:
        return [doc for doc in f.read().split(EOT_TEXT) if doc]


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--dataset", required=True, choices=CORPORA, help="which corpus")
    parser.add_argument("--tokenizer", default="gpt2", choices=TOKENIZERS, help="token ids to write")
    parser.add_argument("--max_docs", type=positive_int, default=None, help="take at most this many documents")
    parser.add_argument("--max_tokens", type=positive_int, default=None, help="stop after about this many tokens")
    parser.add_argument("--val_fraction", type=fraction, default=0.005, help="fraction of documents held out for val")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the train/val split of documents")
    parser.add_argument("--from_file", type=input_file, default=None,
                        help="local .jsonl or text file instead of the Hub")
    parser.add_argument("--out_dir", default=None, help="output folder (default data/<dataset>)")
    args = parser.parse_args(argv)
    out_dir = os.path.join(DATA_DIR, args.dataset) if args.out_dir is None else args.out_dir
    parser.check(check_out_dir, out_dir, TOKEN_FILES)

    enc = get_tokenizer(args.tokenizer)
    if args.from_file:
        documents = parser.check(file_documents, args.from_file, CORPORA[args.dataset][2])[: args.max_docs]
    else:
        documents = itertools.islice(stream_documents(args.dataset), args.max_docs)
    try:
        train_ids, val_ids = tokenize_documents(documents, enc, args.val_fraction, args.seed, args.max_tokens)
    except ValueError as e:  # too few documents for train and val
        parser.error(f"{e}; give more of them (--from_file, --max_docs, --max_tokens)")
    save_token_dataset(out_dir, enc, train_ids, val_ids, parser.command(args), dataset=args.dataset,
                       source=args.from_file or CORPORA[args.dataset][0], val_fraction=args.val_fraction,
                       seed=args.seed)


if __name__ == "__main__":
    run_prepare(main)
