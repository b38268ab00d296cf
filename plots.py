"""
The figures of eval.py's commands and the NCA picture of study.py, the two helpers every figure uses, and the
probe's profile as one line of text. matplotlib is imported only when a figure is drawn, without a display.
"""
import time
import warnings

import numpy as np
import torch

import nca


def pyplot():
    """matplotlib's pyplot without a display (imported only by the commands that plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out):
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    pyplot().close(fig)
    print(f"wrote {out}")


def plot_icl(results, out, title):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(results["k"], results["cell_accuracy"], "o-", label="cell accuracy")
    ax.plot(results["k"], results["frame_accuracy"], "s-", label="whole-frame accuracy")
    ax.plot(results["k"], results["copy_accuracy"], "k--", label="baseline: copy the last frame (cells)")
    ax.set_xticks(results["k"])
    ax.set_xlabel("frames of context k")
    ax.set_ylabel("accuracy on frame k+1")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend()
    save_figure(fig, out)


def plot_probe(losses, icl, out, title, frame_len=None):
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(len(losses)), losses, lw=0.8, color="gray", label="loss at position")
    if frame_len:
        by_frame = icl["loss_by_frame"]
        centres = np.arange(len(by_frame)) * frame_len - 1 + frame_len / 2
        ax.plot(centres, by_frame, "o-", color="C0", label="mean loss of the frame")
    for (start, stop), name, color in ((icl["early"], "early", "C2"), (icl["late"], "late", "C3")):
        ax.axvspan(start, stop, color=color, alpha=0.15, label=f"{name} window [{start}, {stop})")
    ax.set_xlabel("position in the block (predicting the next token)")
    ax.set_ylabel("validation loss (nats)")
    ax.set_title(f"{title}\nin-context score {icl['icl_score']:+.3f} (late - early)", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, out)


def demo(cfg, device, out="nca_demo.png", num_rules=512, frames_shown=8):
    """The picture to look at first: one rule from each gzip band and i.i.d. noise, each as its frames and, below
    them, the cells that changed since the frame before; then the histogram of the ratios, with the band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = torch.arange(num_rules, device=device)
    rule_seeds, grid_seeds = nca.stream_seeds(0, nca.RULE_SEEDS, index), nca.stream_seeds(0, nca.GRID_SEEDS, index)
    t0 = time.perf_counter()
    ratios, frames, _, _, _ = nca.score_rules(rule_seeds, grid_seeds, cfg)
    dt = time.perf_counter() - t0
    print(f"simulated and scored {num_rules} rules x {cfg.burn_in + cfg.score_frames} steps in {dt:.2f}s "
          f"({num_rules * cfg.score_frames * cfg.frame_len / dt:,.0f} raw tokens/s)")
    noise = torch.randint(cfg.num_colors, (1, cfg.score_frames, cfg.grid, cfg.grid), device=device,
                          generator=torch.Generator(device).manual_seed(0))
    examples = []  # (title, frames): the rule of median ratio in each band, then noise
    for name, lo, hi in [("low", 0.0, 0.3), ("middle", 0.3, 0.5), ("high", 0.5, 1.0)]:
        members = np.flatnonzero((ratios > lo) & (ratios < hi))
        if len(members):
            pick = members[np.argsort(ratios[members])[len(members) // 2]]
            examples.append((f"{name} band ({lo}, {hi}), gzip {ratios[pick]:.2f}", frames[pick].cpu()))
    examples.append((f"i.i.d. noise, gzip {nca.gzip_ratio(nca.patch_ids(noise, cfg).cpu())[0]:.2f}", noise[0].cpu()))
    rows = 2 * len(examples)
    fig, axes = plt.subplots(rows + 1, frames_shown, figsize=(1.5 * frames_shown, 1.6 * (rows + 1.5)))
    for e, (title, rollout) in enumerate(examples):
        changed = (rollout[1:] != rollout[:-1]).float().mean().item()
        for j in range(frames_shown):
            top, bottom = axes[2 * e, j], axes[2 * e + 1, j]
            top.imshow(rollout[j], cmap="tab10", vmin=0, vmax=max(cfg.num_colors - 1, 9))
            if j > 0:
                bottom.imshow(rollout[j] != rollout[j - 1], cmap="gray_r", vmin=0, vmax=1)
            top.axis("off")
            bottom.axis("off")
        axes[2 * e, 0].set_title(title, fontsize=8, loc="left")
        axes[2 * e + 1, 1].set_title(f"changed cells (black): {changed:.0%} per step", fontsize=8, loc="left")
    for ax in axes[rows]:
        ax.remove()
    hist = fig.add_subplot(rows + 1, 1, rows + 1)
    hist.hist(ratios, bins=50, color="gray")
    for edge in (cfg.band_lo, cfg.band_hi):
        hist.axvline(edge, color="red", linestyle="--")
    hist.axvline(float(examples[-1][0].split()[-1]), color="black", linestyle=":")
    hist.set_xlabel(f"gzip ratio of {num_rules} random rules (red: the band, {nca.in_band(ratios, cfg).mean():.0%} "
                    f"accepted; dotted: noise)", fontsize=8)
    fig.suptitle(f"NCA rollouts, {cfg.grid}x{cfg.grid}, {cfg.num_colors} colours; frames left to right, dT={cfg.dT}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}")


def loss_profile(losses, by_frame, buckets=8):
    """One line: the loss of each scored frame (NCA), or of `buckets` equal runs of positions (text)."""
    if by_frame is not None:
        return "loss by frame: " + " ".join(f"{f}:{v:.3f}" for f, v in enumerate(by_frame) if not np.isnan(v))
    edges = np.linspace(0, len(losses), buckets + 1).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a bucket without targets: nan
        parts = [f"{a}-{b - 1}:{np.nanmean(losses[a:b]):.3f}" for a, b in zip(edges[:-1], edges[1:])]
    return "loss by position: " + " ".join(parts)
