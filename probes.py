"""
The in-context probe: how much a model uses its context. train.py logs it at every evaluation (probe: one validation
batch and 8 repeated random sequences, about two forward passes); `python eval.py probe` runs it on a checkpoint.

  in-context score  the loss late in a sequence minus the loss early in it (Olsson et al. 2022), for NCA by frames
  induction score   the loss on the second copy of a repeated random sequence minus the first: copying from context
"""
import itertools
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

EARLY_WINDOW = (0.05, 0.15)  # fractions of the scored span; see in_context_score
LATE_WINDOW = (0.85, 1.0)


def per_token_loss(logits, targets):
    """(B, T, V) logits, (B, T) targets -> (B, T) losses in float32 (0 where the target is -1)."""
    flat = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none")
    return flat.view_as(targets)


@torch.no_grad()
def loss_by_position(model, batches):
    """Mean loss (nats) at each position over (x, y) batches, targets of -1 ignored. -> float64 array as long as the
    longest batch, NaN where no row has a target. The model runs as called: under the caller's autocast, if any."""
    sums, counts = np.zeros(0), np.zeros(0)
    for x, y in batches:
        logits, _ = model(x, y)  # with targets the model returns every position's logits
        T = y.shape[1]
        if T > len(sums):  # batches of pairs are padded to their own longest pair
            sums, counts = np.pad(sums, (0, T - len(sums))), np.pad(counts, (0, T - len(counts)))
        sums[:T] += per_token_loss(logits, y).double().sum(dim=0).cpu().numpy()
        counts[:T] += (y != -1).sum(dim=0).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        return sums / counts  # 0 / 0 -> NaN


def window(n, fractions):
    """The units [lo, hi) that fractions (a, b) of n units cover: at least one, and lo < n."""
    lo = min(int(fractions[0] * n), n - 1)
    return lo, max(lo + 1, int(fractions[1] * n))


def loss_by_frame(losses, frame_len):
    """Mean loss of each frame of an NCA sequence: the target at position t is token t + 1, which lies in frame
    (t + 1) // frame_len. NaN for a frame that is not whole in the block or has an unscored position (frame 0 always:
    its first token is never a target, and the stream masks the rest)."""
    frame = (np.arange(len(losses)) + 1) // frame_len
    by_frame = np.full(frame[-1] + 1, np.nan)
    for f in range(len(by_frame)):
        part = losses[frame == f]
        if len(part) == frame_len and not np.isnan(part).any():
            by_frame[f] = part.mean()
    return by_frame


def in_context_score(losses, first_scored=None, frame_len=None, early=EARLY_WINDOW, late=LATE_WINDOW):
    """Loss late in the block minus loss early in it; below 0, the model predicts better with more context.

    Olsson et al. 2022 ("In-context learning and induction heads", arXiv:2209.11895) take the loss of the 500th
    token of the context minus that of the 50th. Our blocks are short, so the windows are fractions of the scored
    span (from first_scored, default the first position with a target, to the last scored position): early [5%, 15%),
    late [85%, 100%). In a block of 1024 the early window is positions ~50-150, around Olsson's 50th token: past the
    first few tokens, whose loss is high for want of any context at all. With frame_len (NCA), the units are the whole
    scored frames (loss_by_frame) instead of positions, so both windows weigh every place in a frame (START, patches,
    END) alike and a context-blind model scores 0; the masked first frame is never in a window.
    -> {icl_score, loss_early, loss_late, early, late: [start, stop) positions, loss_by_frame: array or None}"""
    scored = ~np.isnan(losses)
    if not scored.any():
        raise ValueError("no position has a target (all targets are -1)")
    first = int(np.argmax(scored)) if first_scored is None else first_scored
    stop = len(losses) - int(np.argmax(scored[::-1]))  # one past the last scored position
    by_frame = None
    if frame_len:
        by_frame = loss_by_frame(losses, frame_len)
        frames = [f for f in np.flatnonzero(~np.isnan(by_frame)) if f * frame_len - 1 >= first]
        if not frames:
            raise ValueError(f"no whole scored frame of {frame_len} tokens in a block of {len(losses)}")
        units, starts = by_frame[frames], [int(f) * frame_len - 1 for f in frames]
        ends = [s + frame_len for s in starts]
    else:
        units, starts = losses[first:stop], list(range(first, stop))
        ends = [s + 1 for s in starts]
    (e0, e1), (l0, l1) = window(len(units), early), window(len(units), late)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a window of unscored positions only: NaN
        loss_early, loss_late = np.nanmean(units[e0:e1]), np.nanmean(units[l0:l1])
    return {"icl_score": float(loss_late - loss_early), "loss_early": float(loss_early),
            "loss_late": float(loss_late), "early": (starts[e0], ends[e1 - 1]), "late": (starts[l0], ends[l1 - 1]),
            "loss_by_frame": by_frame}


def repeated_random_tokens(vocab_size, length, num_sequences, seed, exclude=()):
    """(num_sequences, 2 * length) ids on the CPU: `length` ids drawn uniformly from the vocabulary less `exclude`
    (special ids such as NCA's START and END or text's end-of-text), then the same ids again."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[[i for i in exclude if i is not None]] = False
    ids = allowed.nonzero().squeeze(1)
    if len(ids) == 0:
        raise ValueError(f"exclude={exclude} leaves no token of a vocabulary of {vocab_size}")
    generator = torch.Generator().manual_seed(seed)
    half = ids[torch.randint(len(ids), (num_sequences, length), generator=generator)]
    return torch.cat([half, half], dim=1)


@torch.no_grad()
def induction_score(model, vocab_size, block_size, device, num_sequences=8, seed=0, exclude=()):
    """Loss on repeated random tokens (Olsson et al. 2022, arXiv:2209.11895, section on induction heads): sequences of
    L = block_size // 2 random ids, twice. The first copy is unpredictable (~ln V for a model that knows nothing of
    them); in the second, each token can be copied from L positions back. Scored: the targets 1..L-1 of the first copy
    and L+1..2L-1 of the second (token L, the second copy's first, cannot be inferred). Those are the same (input,
    target) pairs, so a context-blind model scores exactly 0 and a perfect copier about -ln V.
    -> {loss_first_copy, loss_second_copy, induction_score: second - first, copy_accuracy: argmax on the second copy}"""
    L = block_size // 2
    if L < 2:
        raise ValueError(f"block_size {block_size} is too short for two copies of at least 2 tokens")
    tokens = repeated_random_tokens(vocab_size, L, num_sequences, seed, exclude).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]  # position t predicts token t + 1
    logits, _ = model(x, y)
    losses = per_token_loss(logits, y)
    first, second = losses[:, :L - 1].mean().item(), losses[:, L:].mean().item()
    accuracy = (logits[:, L:].argmax(dim=-1) == y[:, L:]).float().mean().item()
    return {"loss_first_copy": first, "loss_second_copy": second, "induction_score": second - first,
            "copy_accuracy": accuracy}


def probe_summary(icl, induction):
    """The plain floats train.py logs: in_context_score's and induction_score's numbers."""
    keys = ("icl_score", "loss_early", "loss_late")
    return {**{k: float(icl[k]) for k in keys}, **{k: float(v) for k, v in induction.items()}}


@torch.no_grad()
def probe(model, val_batches, vocab_size, block_size, device, autocast=None, frame_len=None, first_scored=None,
          exclude=(), num_batches=1, num_sequences=8, seed=0):
    """In-context score of the first num_batches validation batches, and induction score of num_sequences repeated
    random sequences (a fixed seed: the same sequences at every evaluation, so values are comparable). About two
    forward passes. The model runs in eval mode and is put back in the mode it was in. Prints nothing.
    -> {icl_score, loss_early, loss_late, loss_first_copy, loss_second_copy, induction_score, copy_accuracy}"""
    training = model.training
    model.eval()
    try:
        with autocast or nullcontext():
            losses = loss_by_position(model, itertools.islice(val_batches, num_batches))
            induction = induction_score(model, vocab_size, block_size, device, num_sequences, seed, exclude)
    finally:
        model.train(training)
    return probe_summary(in_context_score(losses, first_scored, frame_len), induction)
