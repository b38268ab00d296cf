"""
Evaluate what train.py made: perplexity, NCA in-context accuracy, an in-context learning probe, pass@k, export to
Hugging Face. Comparing several runs (study.sh's arms) is study.py's.

  python eval.py perplexity --ckpt out/nca/pretrain/ckpt.pt                 # loss and ppl on the whole val split
  python eval.py icl --ckpt out/nca/prepretrain/ckpt.pt                     # accuracy on held-out rules vs context
  python eval.py probe --ckpt out/nca/prepretrain/ckpt.pt                   # in-context + induction scores, loss plot
  python eval.py passk --ckpt out/nca/finetune/ckpt.pt --n 16 --k 1 2 4 8   # unbiased pass@k and greedy accuracy
  python eval.py export --ckpt out/nca/pretrain/ckpt.pt --out_dir hf_model  # LlamaForCausalLM.from_pretrained(dir)

Every subcommand has --help. Checkpoints are rebuilt from their own model_args, so no model flag is needed.
"""
import argparse
import math
import os
import sys
from contextlib import nullcontext

import numpy as np
import torch

import export
import nca
from data.common import (DATA_DIR, ArgumentParser, Progress, check_prepared, check_task, extract_answer,
                         get_tokenizer, load_pairs)
from model import GPT, ModelConfig
import safety
from plots import loss_profile, plot_icl, plot_probe
from probes import in_context_score, induction_score, loss_by_position, probe_summary
from safety import load_checkpoint

def load_model(ckpt_path, device):
    """(model in eval mode on device, checkpoint dict), rebuilt from the checkpoint's model_args, loaded strictly."""
    ckpt = load_checkpoint(ckpt_path, "--ckpt ")
    ckpt.pop("optimizer", None)  # evaluation needs no AdamW state (twice the weights' size)
    model = GPT(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt.pop("model"), strict=True)
    return model.to(device).eval(), ckpt


# -----------------------------------------------------------------------------
# perplexity on a fixed evaluation set

@torch.no_grad()
def perplexity(model, tokens, block_size, batch_size, device, autocast=None):
    """Mean loss (nats/token) over consecutive non-overlapping windows from the start of `tokens`: deterministic,
    and every token but the first is a target exactly once (the last, shorter window included). The model runs
    under autocast if given (train.py's validation loss runs in the training dtype), else in float32.
    Returns (mean loss, number of tokens scored)."""
    num_targets = len(tokens) - 1
    if num_targets < 1:
        raise ValueError(f"need at least 2 tokens to score, got {len(tokens)}")
    starts = list(range(0, num_targets, block_size))
    full = [s for s in starts if s + block_size <= num_targets]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    if len(full) < len(starts):
        batches.append(starts[-1:])  # the tail window is shorter, so it goes alone
    total, count, progress = 0.0, 0, Progress()
    for b, batch in enumerate(batches):
        length = min(block_size, num_targets - batch[0])
        rows = np.stack([tokens[s:s + length + 1] for s in batch]).astype(np.int64)
        chunk = torch.from_numpy(rows).to(device)  # (B, length + 1)
        with autocast or nullcontext():
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk[:, 1:].numel()  # the model returns the mean; we want the sum over all windows
        count += chunk[:, 1:].numel()
        progress(f"perplexity: batch {b + 1}/{len(batches)}, {count:,} tokens, loss so far {total / count:.4f}")
    return total / count, count


def run_perplexity(args):
    model, ckpt = load_model(args.ckpt, args.device)
    if ckpt["data"]["tokenizer"] is None:
        raise ValueError(f"{args.ckpt} was trained on {ckpt['data']['name']} tokens, not text; evaluate a pretrain "
                         f"or finetune checkpoint, or use `python eval.py icl` for NCA")
    name = args.dataset or ckpt["data"]["name"]
    data_dir = args.data_dir or os.path.join(DATA_DIR, name)
    meta = check_prepared(data_dir, name)
    safety.check_text_data(ckpt, meta, data_dir, args.ckpt)
    block_size = args.block_size or model.config.block_size
    if block_size > model.config.block_size:
        raise ValueError(f"--block_size {block_size} exceeds the model's block_size {model.config.block_size}")
    tokens = np.memmap(os.path.join(data_dir, f"{args.split}.bin"), dtype=np.uint16, mode="r")
    if args.max_tokens:
        tokens = tokens[:args.max_tokens + 1]
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    autocast = dtype and torch.autocast(torch.device(args.device).type, dtype=dtype)
    loss, count = perplexity(model, tokens, block_size, args.batch_size, args.device, autocast)
    print(f"{data_dir} {args.split}: {count:,} tokens in windows of {block_size}, in {args.dtype}"
          + (" (autocast)" if dtype else ""))
    print(f"loss={loss:.4f} ppl={math.exp(loss):.3f}")
    return loss

# -----------------------------------------------------------------------------
# NCA in-context accuracy on held-out rules

def held_out_sequences(cfg, num_rules, num_frames, seed, device="cpu"):
    """(num_rules, num_frames * frame_len) tokens of new rules that pass the checkpoint's gzip band. held_out: every
    rule and grid seed has the top bit 2^31 set, which no training seed has (nca.stream_seeds), so no training run,
    whatever its seed, has seen these rules."""
    stream = nca.NCAStream(cfg, num_rules, num_frames * cfg.frame_len - 1, seed=seed, device=device, held_out=True)
    return stream.next_sequences()


def cells_of_patches(patch_tokens, cfg):
    """Patch tokens (R, P) -> cells (R, H, W) through nca.decode. A position that holds no patch id (a START or END
    the model put in the wrong place) becomes cells of -1, which count as wrong whatever the truth is."""
    R, n, p = patch_tokens.shape[0], cfg.grid // cfg.patch, cfg.patch
    valid = patch_tokens < cfg.start_token
    start = torch.full_like(patch_tokens[:, :1], cfg.start_token)
    frame = torch.cat([start, patch_tokens.where(valid, 0), start + 1], dim=1)  # a well-formed frame for decode
    cells = nca.decode(frame, cfg)[:, 0]  # (R, H, W)
    valid_cells = valid.view(R, n, n).repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)
    return cells.where(valid_cells, -1)


def icl_accuracy(model, sequences, cfg, max_k, log=print):
    """For k = 1..max_k: show the model the first k frames, let it write frame k+1 greedily, token by token, and
    score its cells. Returns {k, cell_accuracy, frame_accuracy, copy_accuracy} as lists over k, where
    copy_accuracy is the cell accuracy of simply repeating frame k (many rules change little between frames)."""
    L = cfg.frame_len
    if sequences.shape[1] < (max_k + 1) * L:
        raise ValueError(f"--max_k {max_k} needs {max_k + 1} frames, the sequences hold {sequences.shape[1] // L}")
    block_size = getattr(getattr(model, "config", None), "block_size", None)
    if block_size is not None and (max_k + 1) * L - 1 > block_size:
        raise ValueError(f"--max_k {max_k}: {max_k} frames of context plus the predicted frame need "
                         f"{(max_k + 1) * L - 1} positions, the model has {block_size}; use --max_k "
                         f"{(block_size + 1) // L - 1}")
    results = {"k": [], "cell_accuracy": [], "frame_accuracy": [], "copy_accuracy": []}
    for k in range(1, max_k + 1):
        predicted = model.generate(sequences[:, :k * L], L, temperature=0)[:, k * L:]  # greedy, with the KV cache
        truth = cells_of_patches(sequences[:, k * L + 1:(k + 1) * L - 1], cfg)
        correct = cells_of_patches(predicted[:, 1:-1], cfg) == truth  # (R, H, W); the delimiters are not scored
        previous = cells_of_patches(sequences[:, (k - 1) * L + 1:k * L - 1], cfg)
        results["k"].append(k)
        results["cell_accuracy"].append(correct.float().mean().item())
        results["frame_accuracy"].append(correct.flatten(1).all(dim=1).float().mean().item())
        results["copy_accuracy"].append((previous == truth).float().mean().item())
        log(f"icl: k={k} cell accuracy {results['cell_accuracy'][-1]:.3f}")
    return results


def run_icl(args):
    model, ckpt = load_model(args.ckpt, args.device)
    if ckpt.get("nca_config") is None:
        raise ValueError(f"{args.ckpt} was trained on {ckpt['data']['name']}, not NCA; icl needs a prepretrain "
                         f"checkpoint trained on nca (e.g. out/<run>/prepretrain/ckpt.pt)")
    cfg = nca.NCAConfig(**ckpt["nca_config"])
    max_k = safety.check_max_k(args.max_k, model.config.block_size, cfg.frame_len)  # before any rule is simulated
    sequences = held_out_sequences(cfg, args.num_rules, max_k + 1, args.seed, args.device)
    results = icl_accuracy(model, sequences, cfg, max_k)
    print(f"\n{args.num_rules} held-out rules, band ({cfg.band_lo}, {cfg.band_hi}), {cfg.num_colors} colours\n")
    print("| k | cell accuracy | frame accuracy | copy last frame |\n| --- | --- | --- | --- |")
    for i, k in enumerate(results["k"]):
        print(f"| {k} | {results['cell_accuracy'][i]:.3f} | {results['frame_accuracy'][i]:.3f} | "
              f"{results['copy_accuracy'][i]:.3f} |")
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "icl.png")
    plot_icl(results, out, f"{args.ckpt}: {args.num_rules} held-out NCA rules")
    return results

# -----------------------------------------------------------------------------
# the in-context probe of a checkpoint (probes.py: the scores, which train.py logs at every evaluation)

def probe_batches(model, ckpt, args):
    """The checkpoint's kind of validation batches, rebuilt: held-out NCA rules (the training run's seed by default:
    the first rules train.py validated on) or random windows of a token split (train.py's validation seed, 1234, by
    default). -> (batches, frame_len or None, special ids to leave out of the induction sequences)"""
    block, count = model.config.block_size, args.batch_size * args.num_batches
    if ckpt.get("nca_config") is not None:
        cfg = nca.NCAConfig(**ckpt["nca_config"])
        seed = (ckpt.get("config") or {}).get("seed", 0) if args.seed is None else args.seed
        stream = nca.NCAStream(cfg, args.batch_size, block, seed=seed, device=args.device, held_out=True)
        return [stream.next_batch() for _ in range(args.num_batches)], cfg.frame_len, (cfg.start_token,
                                                                                        cfg.end_token)
    trained_on = (ckpt.get("config") or {}).get("pretrain_data") if ckpt["stage"] == "finetune" else \
        ckpt["data"]["name"]  # a fine-tuned model's own data are pairs; its pretraining text is tokens
    name = args.dataset or trained_on
    if not (name or args.data_dir):
        raise ValueError(f"{args.ckpt} was fine-tuned on prompt/completion pairs; name a token dataset with --dataset")
    data_dir = args.data_dir or os.path.join(DATA_DIR, name)
    safety.check_text_data(ckpt, check_prepared(data_dir, name), data_dir, args.ckpt)
    tokens = np.memmap(os.path.join(data_dir, f"{args.split}.bin"), dtype=np.uint16, mode="r")
    if len(tokens) <= block + 1:
        raise ValueError(f"{data_dir}/{args.split}.bin holds {len(tokens)} tokens, too few for a block of {block}")
    generator = torch.Generator().manual_seed(1234 if args.seed is None else args.seed)
    starts = torch.randint(len(tokens) - block - 1, (count,), generator=generator).tolist()
    rows = torch.from_numpy(np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int64)).to(args.device)
    batches = [(r[:, :-1], r[:, 1:]) for r in rows.split(args.batch_size)]
    return batches, None, (ckpt["data"].get("eot_token"),)


def run_probe(args):
    model, ckpt = load_model(args.ckpt, args.device)
    batches, frame_len, exclude = probe_batches(model, ckpt, args)
    losses = loss_by_position(model, batches)
    icl = in_context_score(losses, frame_len=frame_len)
    induction = induction_score(model, model.config.vocab_size, model.config.block_size, args.device,
                                args.num_sequences, exclude=exclude)
    results = probe_summary(icl, induction)
    print(f"{args.ckpt}: {len(batches) * args.batch_size} validation sequences of {len(losses)} positions, "
          f"early window {icl['early']}, late window {icl['late']}, {args.num_sequences} induction sequences")
    print(" ".join(f"{k}={v:.4f}" for k, v in results.items()))
    print(loss_profile(losses, icl["loss_by_frame"]))
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "probe.png")
    plot_probe(losses, icl, out, f"{args.ckpt}: loss by position", frame_len)
    return results

# -----------------------------------------------------------------------------
# pass@k on stage-3 tasks

def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k), as a product that cannot overflow."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0  # every draw of k samples contains a correct one
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def stop_token_of(enc, stop):
    """Generation can stop early on the stop string only when it is one token; else on end-of-text."""
    ids = enc.encode_ordinary(stop)
    return ids[0] if len(ids) == 1 else enc.eot_token


def decode_completions(enc, rows):
    """Token rows -> texts, each cut at its first end-of-text (what follows is padding or noise)."""
    return [enc.decode(row[:row.index(enc.eot_token)] if enc.eot_token in row else row) for row in rows.tolist()]


def sample_correct(model, enc, record, stop, n, temperature, top_p, max_new_tokens, generator, device):
    """Number of correct answers among n sampled completions of one problem (the n samples are n batch rows)."""
    prompt = enc.encode_ordinary(record["prompt"])
    idx = torch.tensor([prompt] * n, device=device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_p=top_p,
                         stop_token=stop_token_of(enc, stop), generator=generator)
    answers = [extract_answer(text, stop) for text in decode_completions(enc, out[:, len(prompt):])]
    return sum(answer == record["answer"] for answer in answers)


def greedy_accuracy(model, enc, records, stop, max_new_tokens, device):
    """Exact-match accuracy of one greedy completion per problem; prompts of equal length share a batch."""
    by_length = {}
    for record in records:
        by_length.setdefault(len(enc.encode_ordinary(record["prompt"])), []).append(record)
    correct = 0
    for group in by_length.values():
        idx = torch.tensor([enc.encode_ordinary(r["prompt"]) for r in group], device=device)
        out = model.generate(idx, max_new_tokens, temperature=0.0, stop_token=stop_token_of(enc, stop))
        texts = decode_completions(enc, out[:, idx.shape[1]:])
        correct += sum(extract_answer(t, stop) == r["answer"] for t, r in zip(texts, group))
    return correct / len(records)


def run_passk(args):
    model, ckpt = load_model(args.ckpt, args.device)
    tokenizer = ckpt["data"]["tokenizer"]
    if tokenizer is None:
        raise ValueError(f"{args.ckpt} was trained on NCA tokens and has no text tokenizer; use a finetune checkpoint")
    task = args.task or (ckpt["data"]["name"] if ckpt["stage"] == "finetune" else None)
    if task is None:
        raise ValueError(f"--task: {args.ckpt} is a {ckpt['stage']} checkpoint; name the task, e.g. --task arith")
    data_dir = args.data_dir or os.path.join(DATA_DIR, task)
    stop = check_task(data_dir, task)["stop"]
    records = load_pairs(data_dir, args.split, task)[:args.max_problems]
    enc = get_tokenizer(tokenizer)
    cropped = sum(len(enc.encode_ordinary(r["prompt"])) + args.max_new_tokens > model.config.block_size
                  for r in records)
    if cropped:  # generate slides the context: such a prompt loses its start
        print(f"passk: {cropped} of {len(records)} prompts and their completion of up to {args.max_new_tokens} tokens "
              f"exceed the model's block of {model.config.block_size} tokens, so their prompts are cropped from the "
              f"left while generating")
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    counts, progress = [], Progress()
    for i, record in enumerate(records):
        counts.append(sample_correct(model, enc, record, stop, args.n, args.temperature, args.top_p,
                                     args.max_new_tokens, generator, args.device))
        progress(f"passk: {i + 1}/{len(records)} problems, {sum(counts)} of {args.n * (i + 1)} samples correct")
    results = {f"pass@{k}": float(np.mean([pass_at_k(args.n, c, k) for c in counts])) for k in args.k}
    results["greedy"] = greedy_accuracy(model, enc, records, stop, args.max_new_tokens, args.device)
    print(f"{task} {args.split}: {len(records)} problems, n={args.n} samples each at temperature "
          f"{args.temperature}, top_p {args.top_p}")
    print(" ".join(f"{name}={value:.4f}" for name, value in results.items()))
    return results

# -----------------------------------------------------------------------------
# command line

def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name, function, help):
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(function=function)
        sub.add_argument("--ckpt", required=True, help="checkpoint written by train.py: out/<run>/<stage>/ckpt.pt")
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda:1 ...")
        return sub

    sub = command("perplexity", run_perplexity, "mean loss and perplexity on a fixed set of windows of a split")
    sub.add_argument("--dataset", help="data/<name> to score (default: the checkpoint's training data)")
    sub.add_argument("--data_dir", help="a prepared dataset folder anywhere (overrides --dataset)")
    sub.add_argument("--split", default="val", choices=("train", "val"), help="which split of the dataset")
    sub.add_argument("--block_size", type=int, help="window length (default: the model's block_size)")
    sub.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    sub.add_argument("--max_tokens", type=int, help="score only the first N tokens of the split")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="precision; the training run's --dtype reproduces the validation loss it logged (autocast "
                          "shifts the loss by a small, systematic amount)")

    sub = command("passk", run_passk, "unbiased pass@k of sampled completions, and greedy exact-match accuracy")
    sub.add_argument("--task", help="data/<task> (default: the checkpoint's fine-tuning task)")
    sub.add_argument("--data_dir", help="a prepared task folder anywhere (overrides --task's folder)")
    sub.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split's problems")
    sub.add_argument("--n", type=int, default=16, help="samples per problem")
    sub.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8], help="k values of pass@k (each <= n)")
    sub.add_argument("--temperature", type=float, default=0.4, help="sampling temperature (the paper: 0.4)")
    sub.add_argument("--top_p", type=float, default=0.95, help="nucleus sampling mass (the paper: 0.95)")
    sub.add_argument("--max_problems", type=int, default=100, help="evaluate the first N problems of the split")
    sub.add_argument("--max_new_tokens", type=int, default=16, help="longest completion")
    sub.add_argument("--seed", type=int, default=0, help="seed of the sampling")

    sub = command("export", export.run_export,
                  "write a Hugging Face LlamaForCausalLM folder (config.json, model.safetensors or pytorch_model.bin)")
    sub.add_argument("--out_dir", required=True, help="folder to write")

    sub = command("icl", run_icl, "NCA in-context accuracy: predict frame k+1 of held-out rules from k frames")
    sub.add_argument("--num_rules", type=int, default=64, help="held-out rules (one sequence each)")
    sub.add_argument("--max_k", type=int, default=0, help="largest number of context frames (default: as many as "
                                                          "the model's block holds)")
    sub.add_argument("--seed", type=int, default=12345, help="seed of the held-out rules and initial grids")
    sub.add_argument("--out", help="plot of accuracy vs k (default: icl.png next to the checkpoint)")

    sub = command("probe", run_probe, "in-context score (loss late minus early in the block), induction score on "
                                      "repeated random tokens, and a plot of loss by position")
    sub.add_argument("--dataset", help="data/<name> of a text checkpoint's windows (default: its training data; "
                                       "a fine-tuned one's pretraining data)")
    sub.add_argument("--data_dir", help="a prepared token dataset folder anywhere (overrides --dataset)")
    sub.add_argument("--split", default="val", choices=("train", "val"), help="which split of the dataset")
    sub.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    sub.add_argument("--num_batches", type=int, default=4, help="validation batches averaged")
    sub.add_argument("--num_sequences", type=int, default=8, help="repeated random sequences of the induction score")
    sub.add_argument("--seed", type=int, help="seed of the held-out NCA rules (default: the training run's) or of "
                                              "the text windows (default: 1234, train.py's)")
    sub.add_argument("--out", help="plot of loss by position (default: probe.png next to the checkpoint)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        safety.check_eval_args(args)
        safety.validate_device(args.device)
        return args.function(args)
    except (FileNotFoundError, ValueError) as e:  # our own messages name the flag or file and the fix
        sys.exit(f"eval.py {args.command}: error: {e}")


if __name__ == "__main__":
    main()
