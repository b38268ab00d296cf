"""
NCA rows for any trainer: the stage-1 data that nca.py streams to train.py, written once to files, with its card.

    python -m data.nca.prepare --tokens 2000000                      # data/nca-rows/, the paper's NCA settings
    python -m data.nca.prepare --tokens 2000000 --num_colors 4 --band 0.25 1.0 --seq_len 256 --out_dir data/nca4

The folder (written all or nothing, as every prepare: a stopped one leaves a folder the loaders refuse):
  train.bin, val.bin  uint16 rows of seq_len + 1 tokens, one rule per row. train.bin holds the rows nca.NCAStream
                      hands out for --seed and these NCA flags, in order: batch b of any batch size B is rows
                      b*B .. b*B + B - 1. val.bin holds the first rows of held-out rules (NCAStream(held_out=True),
                      the validation set train.py streams), none of them a training rule.
  rules.csv           one line per row: split, row, rule index in its stream, rule seed, grid seed, gzip ratio
  meta.json           kind "nca-rows", the NCA config, seed, vocabulary, START/END ids, seq_len, row_len, how many
                      targets of a row are masked (the first frame's), the command, file sizes and digests
  README.md           the dataset card, with gzip_ratios.png (the accepted rules' gzip ratios)

train.py pre-pre-trains on it by name (python train.py --stage prepretrain --prepretrain_data nca-rows): the same
batches, so the same losses, as the stream of the same seed. Every other trainer: see the card, or the repository
README's "Use it in your own stack". Rows are kept in memory until written: 2 bytes a token.
"""

import os
import shlex
import time
from dataclasses import asdict

import numpy as np
import torch

import nca
import plots
import safety
from data.common import (DATA_DIR, NCA_ROWS, UINT16_LIMIT, Progress, check_out_dir, file_record, non_negative_int,
                         positive_int, prepare_parser, preparing, run_prepare, write_meta, write_split)

ROW_FILES = "train.bin/val.bin/rules.csv/meta.json/README.md"


def nca_config(args):
    """The NCAConfig of the flags, checked before any work (a ValueError names the flags): first that its vocabulary
    fits uint16 rows, then nca's own checks, then that a row holds more than its masked first frame."""
    cfg = safety.pick(args, nca.NCAConfig, band_lo=args.band[0], band_hi=args.band[1])
    if cfg.num_colors >= 2 and cfg.patch >= 1 and cfg.vocab_size > UINT16_LIMIT:
        raise ValueError(f"--num_colors {cfg.num_colors} --patch {cfg.patch}: the vocabulary, num_colors**(patch*"
                         f"patch) + 2 = {cfg.vocab_size:,} token ids, does not fit uint16 rows (ids 0 .. "
                         f"{UINT16_LIMIT - 1:,}); use fewer colours or a smaller patch")
    safety.check_nca_config(cfg)
    if args.seq_len < cfg.frame_len:
        raise ValueError(f"--seq_len {args.seq_len}: a row shorter than one frame ({cfg.frame_len} tokens) has "
                         f"every target masked; use at least {2 * cfg.frame_len}")
    return cfg


def stream_rows(stream, num_rows, progress):
    """The first num_rows rows of an NCA stream in the order its batches hand them out, and their table: (rows
    (num_rows, seq_len + 1) uint16, {rule_index, rule_seed, grid_seed, gzip_ratio} arrays). A chunk's accepted rules
    come as next_batch takes them (fresh_sequences, encode, the first seq_len + 1 tokens); a rule's gzip ratio is
    score_rules' (gzip_ratio of its scoring frames, which open its rollout), its seeds nca.stream_seeds'."""
    cfg, rows, numbers, ratios = stream.cfg, [], [], []
    while len(numbers) < num_rows:
        frames, accepted = stream.fresh_sequences()  # one process: rule number j is rule index j of the stream
        if accepted:
            rows.append(nca.encode(frames, cfg)[:, :stream.seq_len + 1].numpy().astype(np.uint16))
            ratios.append(nca.gzip_ratio(nca.patch_ids(frames[:, :cfg.score_frames], cfg)))
            numbers += accepted
        progress(min(len(numbers), num_rows))
    index = torch.tensor(numbers[:num_rows])
    seeds = {name: nca.stream_seeds(stream.seed, which, index, stream.held_out).numpy()
             for name, which in (("rule_seed", nca.RULE_SEEDS), ("grid_seed", nca.GRID_SEEDS))}
    return np.concatenate(rows)[:num_rows], {"rule_index": index.numpy(), **seeds,
                                             "gzip_ratio": np.concatenate(ratios)[:num_rows]}


def make_rows(cfg, args, num_train):
    """{split: (rows, table)}: num_train training rows of the stream --seed, then --val_rows of its held-out rules,
    with a progress line (rows, tokens/s, ETA) every 10 seconds."""
    total, done, start, tick = num_train + args.val_rows, 0, time.time(), Progress(10)

    def progress(rows):
        elapsed = max(time.time() - start, 1e-9)
        tick(f"{done + rows:,}/{total:,} rows, {(done + rows) * (args.seq_len + 1) / elapsed:,.0f} tokens/s, "
             f"ETA {elapsed * (total - done - rows) / max(done + rows, 1):.0f}s")

    splits = {}
    for split, num_rows in (("train", num_train), ("val", args.val_rows)):
        stream = nca.NCAStream(cfg, 1, args.seq_len, seed=args.seed, held_out=split == "val")
        splits[split] = stream_rows(stream, num_rows, progress)
        done += num_rows
    print(f"simulated {total:,} rows in {time.time() - start:.1f}s")
    return splits


def write_table(path, splits):
    """rules.csv: one line per row of both splits (the gzip ratio in full: float64's 17 digits)."""
    with open(path, "w") as f:
        f.write("split,row,rule_index,rule_seed,grid_seed,gzip_ratio\n")
        for split, (_, table) in splits.items():
            for row, (index, rule_seed, grid_seed, ratio) in enumerate(zip(*table.values())):
                f.write(f"{split},{row},{index},{rule_seed},{grid_seed},{ratio:.17g}\n")


def plot_ratios(path, ratios, cfg):
    """The histogram of the accepted rules' gzip ratios, the band marked (matplotlib imported only here)."""
    plt = plots.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(ratios, bins=50, color="tab:blue")
    for edge in (cfg.band_lo, cfg.band_hi):
        ax.axvline(edge, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("gzip ratio of the rule's first frames (dashed: the band)")
    ax.set_ylabel("training rows")
    ax.set_title(f"{len(ratios):,} accepted rules, {cfg.num_colors} colours, {cfg.grid}x{cfg.grid} grid", fontsize=9)
    plots.save_figure(fig, path)


def card(meta, command, out_dir):
    """README.md of the folder: what it holds, the command that remakes it bit for bit, its numbers, how to load it."""
    cfg, ratios = meta["nca_config"], meta["gzip_ratio"]
    config = ", ".join(f"{key} {value}" for key, value in cfg.items())
    return f"""# NCA rows: {meta['num_train_tokens']:,} tokens of neural cellular automata

Token sequences rolled out from random neural cellular automata (NCA) for pre-pre-training a language model
(Lee et al. 2026, arXiv:2603.10055), made by `data/nca/prepare.py` of nca-pretrain. Every row is one rule's rollout
from one random grid: frames of {cfg['grid']}x{cfg['grid']} cells in {cfg['num_colors']} colours, cut into \
{cfg['patch']}x{cfg['patch']} patches of one token each, every frame written as START, its patches, END. Predicting \
a row means inferring its hidden rule in context.

Remake it bit for bit (the rows are a pure function of the seed and the NCA flags, on any machine):

    {command} --out_dir {shlex.quote(out_dir)}

| | train.bin | val.bin |
| --- | --- | --- |
| rows = rules | {meta['num_train_rows']:,} | {meta['num_val_rows']:,} (held out: no training rule) |
| tokens | {meta['num_train_tokens']:,} | {meta['num_val_rows'] * meta['row_len']:,} |

- Rows: {meta['row_len']} uint16 tokens each (seq_len {meta['seq_len']} + 1), vocabulary {meta['vocab_size']:,}: \
patch ids 0 .. {meta['start_token'] - 1:,}, START {meta['start_token']:,}, END {meta['end_token']:,}; a frame is \
{meta['frame_len']} tokens. The rows of train.bin are the batches of train.py's NCA stream of seed {meta['seed']}, \
in order.
- Filter: a rule is kept when {cfg['band_lo']} < gzip ratio < {cfg['band_hi']} (gzip level 9 of its first \
{cfg['score_frames']} frames' patch ids as int32, over their raw size); {meta['acceptance']:.1%} of the \
{meta['rules_tried']:,} training rules tried were kept. Their ratios: mean {np.mean(ratios):.3f}, \
{np.min(ratios):.3f} .. {np.max(ratios):.3f}.
- NCA config: {config}.
- rules.csv: each row's rule index in its stream, rule seed, grid seed and gzip ratio; meta.json: all of the above.

![gzip ratios of the accepted rules](gzip_ratios.png)

Load it (numpy; the first frame's targets are masked, -1: nothing to infer a rule from yet):

```python
import json, numpy as np
meta = json.load(open("meta.json"))
rows = np.fromfile("train.bin", dtype=np.uint16).reshape(-1, meta["row_len"]).astype(np.int64)
x, y = rows[:, :-1], rows[:, 1:].copy()
y[:, :meta["masked_targets"]] = -1  # ignore_index of the loss
```

With nca-pretrain: `python train.py --stage prepretrain --prepretrain_data <this folder's name> --data_dir <its
parent>` (a --block_size up to {meta['seq_len']}: the first block_size + 1 tokens of every row).
"""


def write_folder(out_dir, splits, cfg, args, command):
    """train.bin, val.bin, rules.csv, the card and its figure, then meta.json: all or nothing (preparing)."""
    with preparing(out_dir, command):
        for split, (rows, _) in splits.items():
            write_split(os.path.join(out_dir, f"{split}.bin"), rows.ravel())
        write_table(os.path.join(out_dir, "rules.csv"), splits)
        ratios, rule_index = splits["train"][1]["gzip_ratio"], splits["train"][1]["rule_index"]
        num_train, num_val = len(splits["train"][0]), len(splits["val"][0])
        meta = dict(kind=NCA_ROWS, vocab_size=cfg.vocab_size, start_token=cfg.start_token, end_token=cfg.end_token,
                    seq_len=args.seq_len, row_len=args.seq_len + 1, masked_targets=cfg.frame_len - 1,
                    frame_len=cfg.frame_len, seed=args.seed, nca_config=asdict(cfg), num_train_rows=num_train,
                    num_val_rows=num_val, num_train_tokens=num_train * (args.seq_len + 1),
                    rules_tried=int(rule_index[-1]) + 1, acceptance=num_train / (int(rule_index[-1]) + 1))
        plot_ratios(os.path.join(out_dir, "gzip_ratios.png"), ratios, cfg)
        with open(os.path.join(out_dir, "README.md"), "w") as f:
            f.write(card({**meta, "gzip_ratio": ratios}, command, out_dir))
        files = {name: file_record(os.path.join(out_dir, name)) for name in ("train.bin", "val.bin")}
        write_meta(out_dir, **meta, prepare=command, files=files)
    print(f"wrote {out_dir}: {num_train:,} training rows ({meta['num_train_tokens']:,} tokens), {num_val:,} val "
          f"rows, {meta['acceptance']:.1%} of rules accepted; the card: {os.path.join(out_dir, 'README.md')}")


def main(argv=None):
    parser = prepare_parser(__file__, __doc__)
    parser.add_argument("--tokens", type=positive_int, default=2_000_000,
                        help="tokens of train.bin, in whole rows (rounded up to a multiple of seq_len + 1)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="the stream's seed (train.py's --seed)")
    safety.add_nca_flags(parser)
    parser.add_argument("--seq_len", type=positive_int, default=1024,
                        help="a row is seq_len + 1 tokens: it serves any train.py --block_size up to seq_len")
    parser.add_argument("--val_rows", type=positive_int, default=256,
                        help="rows of held-out rules in val.bin (train.py uses --eval_iters x --batch_size of them)")
    parser.add_argument("--out_dir", default=os.path.join(DATA_DIR, "nca-rows"), help="output folder")
    args = parser.parse_args(argv)
    cfg = parser.check(nca_config, args)
    parser.check(check_out_dir, args.out_dir, ROW_FILES)
    splits = make_rows(cfg, args, num_train=-(-args.tokens // (args.seq_len + 1)))
    write_folder(args.out_dir, splits, cfg, args, parser.command(args))


if __name__ == "__main__":
    run_prepare(main)
