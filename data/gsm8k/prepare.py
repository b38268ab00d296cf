"""
GSM8K grade-school math (stage 3 in the paper): fine-tune on the chain-of-thought answers, score the final number.

    pip install datasets
    python -m data.gsm8k.prepare                  # openai/gsm8k "main" from the Hugging Face Hub
    python -m data.gsm8k.prepare --from_file grade_school_math/data/train.jsonl \\
                                 --test_file grade_school_math/data/test.jsonl    # local copies, offline

One record: {"prompt": "Question: <question>\\nAnswer:", "completion": " <reasoning> #### 72\\n\\n", "answer": "72"}.
The completion ends with the stop string "\\n\\n" so the model learns to stop. Val is carved out of train (by seed);
test is GSM8K's own test split.
"""

import os

from data.common import (PAIR_FILES, check_out_dir, extract_answer, held_out_mask, input_file, non_negative_int,
                         positive_int, prepare_parser, read_jsonl, run_prepare, save_pairs_dataset)

STOP = "\n\n"


def make_record(row):
    """A GSM8K row {"question", "answer": "<reasoning>\\n#### 72"} as a prompt/completion record."""
    completion = " " + row["answer"].strip() + STOP
    return {"prompt": f"Question: {row['question'].strip()}\nAnswer:", "completion": completion,
            "answer": extract_answer(completion, STOP)}


def load_rows(from_file, test_file):
    """(train rows, test rows) from local jsonl files, or else from the Hub."""
    if from_file or test_file:
        if not (from_file and test_file):
            raise ValueError("give both --from_file (the train split) and --test_file")
        return read_jsonl(from_file), read_jsonl(test_file)
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise RuntimeError("GSM8K from the Hub needs the datasets package: pip install datasets "
                           "(or pass local files with --from_file and --test_file)") from e
    try:
        dataset = load_dataset("openai/gsm8k", "main")
    except Exception as e:
        raise RuntimeError(f"could not load openai/gsm8k from the Hugging Face Hub ({e}); this needs the network. "
                           "For local files use --from_file and --test_file") from e
    return list(dataset["train"]), list(dataset["test"])


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--num_val", type=positive_int, default=500, help="training problems held out for validation")
    parser.add_argument("--seed", type=non_negative_int, default=1337, help="seed of the train/val split")
    parser.add_argument("--from_file", type=input_file, default=None,
                        help="local GSM8K train .jsonl (question, answer per line)")
    parser.add_argument("--test_file", type=input_file, default=None,
                        help="local GSM8K test .jsonl, given with --from_file")
    parser.add_argument("--out_dir", default=os.path.dirname(os.path.abspath(__file__)), help="output folder")
    args = parser.parse_args(argv)
    parser.check(check_out_dir, args.out_dir, PAIR_FILES)

    train_rows, test_rows = load_rows(args.from_file, args.test_file)
    if not 0 < args.num_val < len(train_rows):
        parser.error(f"--num_val must be between 1 and {len(train_rows) - 1} (the train split's size - 1)")
    is_val = held_out_mask(len(train_rows), args.num_val, args.seed)
    splits = {
        "train": [make_record(row) for row, v in zip(train_rows, is_val) if not v],
        "val": [make_record(row) for row, v in zip(train_rows, is_val) if v],
        "test": [make_record(row) for row in test_rows],
    }
    save_pairs_dataset(args.out_dir, splits, command=parser.command(args), task="gsm8k", stop=STOP, seed=args.seed,
                       source=args.from_file or "openai/gsm8k main")


if __name__ == "__main__":
    run_prepare(main)
