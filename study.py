"""
The study's tools: a look at the NCA data (a picture, gzip statistics, complexity bands), and the analysis of
study.sh's runs (validation curves against a baseline arm, the probe against the gain, the gain against model
size). None of it is needed to train; STUDY.md shows what each command printed.

  python study.py demo                                   # nca_demo.png: one rule per gzip band, and the histogram
  python study.py stats --rules 2000                     # gzip-ratio deciles and the acceptance of the band
  python study.py stats --num_colors 4 --quantiles 0.2 0.4 0.6 0.8   # low/middle/high bands, as --band flags
  python study.py compare --runs 'out/study/*' --baseline scratch   # <arm>_seed<k> runs -> table and plot
  python study.py probes --runs 'out/study/*' --out probe_vs_gain.png # in-context probe against the stage-2 gain
  python study.py size --runs 'out/study/*_seed*' --out size.png     # the gain against parameters, every width
  python study.py carried --runs 'out/study/*-w256_seed*'            # the gain by what stage 2 carried of stage 1
"""
import argparse
import glob
import json
import math
import os
import re
import sys

import numpy as np
import torch

import nca
from data.common import ArgumentParser, read_jsonl
from model import GPT, ModelConfig
from plots import demo, pyplot, save_figure
from safety import add_nca_flags, load_checkpoint, nca_config

# -----------------------------------------------------------------------------
# the NCA data: gzip statistics, complexity bands, a picture

def random_ratios(cfg, n, seed=0, device="cpu", chunk=512):
    """gzip ratios of n random (unfiltered) rules: the first n rules an NCAStream with this seed tries."""
    out = []
    for i in range(0, n, chunk):
        index = torch.arange(i, min(i + chunk, n), device=device)
        rule_seeds = nca.stream_seeds(seed, nca.RULE_SEEDS, index)
        grid_seeds = nca.stream_seeds(seed, nca.GRID_SEEDS, index)
        out.append(nca.score_rules(rule_seeds, grid_seeds, cfg)[0])
    return np.concatenate(out)


def quantile_bands(ratios, quantiles):
    """The bands between consecutive quantiles of the ratios, as (q_lo, q_hi, LO, HI, fraction of the ratios with
    LO < ratio < HI). LO is rounded up and HI down to 3 decimals, so a band never takes in the tied ratios at its
    edge (many dead rules share one ratio); quantile 0 gives LO 0.0 and quantile 1 gives HI 1.0 (the largest band
    allowed) rather than the sample's extremes, which new rules may pass. LO >= HI: quantiles equal to 3 decimals."""
    values = np.quantile(ratios, quantiles)
    bands = []
    for (qa, a), (qb, b) in zip(zip(quantiles, values), zip(quantiles[1:], values[1:])):
        lo = 0.0 if qa == 0 else math.ceil(round(a * 1000, 6)) / 1000
        hi = 1.0 if qb == 1 else math.floor(round(b * 1000, 6)) / 1000
        bands.append((qa, qb, lo, hi, float(((ratios > lo) & (ratios < hi)).mean())))
    return values, bands


def band_names(k):
    return {2: ("low", "high"), 3: ("low", "middle", "high")}.get(k, [f"band {i + 1}" for i in range(k)])


def print_stats(cfg, n, device, quantiles=()):
    """Deciles and acceptance of the current band for n random rules; with quantiles, the ratio at each and the
    bands between consecutive ones as --band flags (e.g. low, middle and high complexity for another alphabet)."""
    ratios = random_ratios(cfg, n, device=device)
    deciles = np.quantile(ratios, np.linspace(0, 1, 11))
    print("gzip_deciles: " + " ".join(f"{d:.3f}" for d in deciles))
    print(f"accept_rate: {nca.in_band(ratios, cfg).mean():.3f} (band {cfg.band_lo} < ratio < {cfg.band_hi}, "
          f"{n} rules, mean ratio {ratios.mean():.3f})")
    if not quantiles:
        return
    values, bands = quantile_bands(ratios, list(quantiles))
    print("gzip_quantiles: " + " ".join(f"{q:g}:{v:.3f}" for q, v in zip(quantiles, values)))
    for name, (qa, qb, lo, hi, accepted) in zip(band_names(len(bands)), bands):
        if lo >= hi:
            print(f"{name}: none (quantiles {qa:g} and {qb:g} are both ~{values[quantiles.index(qa)]:.3f})")
        else:
            print(f"{name}: --band {lo:.3f} {hi:.3f} (quantiles {qa:g}-{qb:g}, accepts {accepted:.3f} of these "
                  f"rules)")



# -----------------------------------------------------------------------------
# comparing runs: curves, final loss, convergence speed-up

def read_log(run_dir, stage):
    """(stage tokens, prior tokens, val losses) of one run's stage, as arrays in iteration order."""
    path = os.path.join(run_dir, stage, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no log at {path}; did the run finish stage {stage}? (--stage picks another)")
    records = read_jsonl(path)  # a bad line is named by file and line number
    by_iter = {r["iter"]: r for r in records if r.get("val_loss") is not None}  # on a repeat, the later one counts
    if not by_iter:
        raise ValueError(f"{path} has no evaluation yet")
    records = [by_iter[i] for i in sorted(by_iter)]
    return tuple(np.array([r[key] for r in records], dtype=float) for key in ("tokens", "prior_tokens", "val_loss"))


def tokens_to_reach(tokens, losses, target):
    """Tokens at which a curve first reaches `target`, interpolated linearly between eval points; None if never."""
    hits = np.flatnonzero(losses <= target)
    if len(hits) == 0:
        return None
    i = hits[0]
    if i == 0:
        return tokens[0]
    fraction = (losses[i - 1] - target) / (losses[i - 1] - losses[i])
    return tokens[i - 1] + fraction * (tokens[i] - tokens[i - 1])


def speedup(baseline_curve, curve):
    """Tokens the baseline needed to reach its final loss / tokens `curve` needed to reach the same loss.
    Curves are (tokens, losses) arrays. None when the curve never reaches it (a speed-up below 1 then)."""
    target = baseline_curve[1][-1]
    needed = tokens_to_reach(*curve, target)
    if needed is None:
        return None
    return tokens_to_reach(*baseline_curve, target) / needed if needed > 0 else math.inf


def expand_runs(patterns):
    """Run folders from names and glob patterns (quoted patterns reach us unexpanded), each once, in order."""
    runs = []
    for pattern in patterns:
        matches = sorted(p for p in glob.glob(pattern) if os.path.isdir(p))
        if not matches:
            raise FileNotFoundError(f"--runs: {pattern} matches no folder; give run folders (train.py --out_dir)")
        runs += [p for p in matches if os.path.normpath(p) not in map(os.path.normpath, runs)]
    return runs


def stage_settings(run_dir, stage):
    """The settings train.py writes beside a stage's log (config.json: model_args, config, nca_config), or None."""
    path = os.path.join(run_dir, stage, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            settings = json.load(f)
        if not isinstance(settings.get("model_args"), dict) or not isinstance(settings.get("config"), dict):
            raise ValueError
    except (ValueError, AttributeError):
        raise ValueError(f"--runs: {path} is not the settings train.py writes (JSON with model_args and config)")
    return settings


def unfinished(run_dir, stage):
    """Why a run's stage is not finished (no evaluation yet, or its last one short of the iterations its checkpoint,
    or else its config.json, planned), or None. A study still running, or stopped, must not enter a table with the
    loss it has reached so far. A log with neither beside it counts as finished: nothing says otherwise."""
    record, settings = final_record(run_dir, stage), stage_settings(run_dir, stage)
    if record is None:
        return f"no {stage} evaluation yet"
    ckpt_path = os.path.join(run_dir, stage, "ckpt.pt")
    if settings is None and os.path.exists(ckpt_path):  # a run from before train.py wrote config.json
        settings = load_checkpoint(ckpt_path, f"--runs {run_dir}: ", mmap=True)
    if settings is None:
        return None
    planned = settings["config"].get(f"{stage}_iters")
    if planned is not None and record["iter"] < planned:
        return f"{stage} is at iteration {record['iter']} of {planned}"
    return None


def finished_runs(run_dirs, required, optional=()):
    """The runs whose required stages, and the optional ones they have, are finished; the others are named and left
    out."""
    kept = []
    for run in run_dirs:
        stages = list(required) + [s for s in optional if os.path.isdir(os.path.join(run, s))]
        why = next(filter(None, (unfinished(run, s) for s in stages)), None)
        if why is None:
            kept.append(run)
        else:
            print(f"left out {run}: {why}")
    if not kept:
        raise ValueError(f"--runs: none of the {len(run_dirs)} run folder(s) has a finished {required[0]} stage; "
                         f"give folders that train.py --out_dir wrote")
    return kept


def arm_of(run_dir):
    """(arm, seed) of a run: runs named <arm>_seed<k> are repeats of one arm; any other run is an arm of its own
    (seed None)."""
    name = os.path.basename(os.path.normpath(run_dir))
    match = re.fullmatch(r"(.+)_seed(\d+)", name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def mean_curve(curves):
    """Mean and std of (tokens, losses) curves on the first one's eval points, where all of them have data."""
    tokens = curves[0][0][curves[0][0] <= min(t[-1] for t, _ in curves)]
    losses = np.stack([np.interp(tokens, t, l) for t, l in curves])
    std = losses.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(tokens))
    return tokens, losses.mean(axis=0), std


def mean_std(values, digits, suffix="", signed=False):
    """'mean ± std' (the std over runs, ddof 1); signed: a difference, with its sign even when positive."""
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.{digits}f}{suffix}"
    return f"{np.mean(values):{sign}.{digits}f} ± {np.std(values, ddof=1):.{digits}f}{suffix}"


def format_speedups(speedups, bounds):
    """Speed-ups of an arm's runs; a run that never reached the target has an upper bound (baseline tokens / its
    own last tokens) instead."""
    reached = [s for s in speedups if s is not None]
    if not reached:
        return f"<{max(bounds):.2f}x (never reached)"
    text = mean_std(reached, 2, "x")
    return text if len(reached) == len(speedups) else f"{text} ({len(reached)}/{len(speedups)} reached)"


def compare_runs(run_dirs, stage="pretrain", baseline=None):
    """Read every run's log, group runs into arms, and measure each arm against the baseline arm.
    Returns (arms: {arm: {"runs", "curves", "total_curves"}}, rows: one summary dict per arm, baseline arm)."""
    arms = {}
    for run in run_dirs:
        tokens, prior, losses = read_log(run, stage)
        name, seed = arm_of(run)
        arm = arms.setdefault(name, {"runs": [], "seeds": [], "curves": [], "total_curves": []})
        arm["runs"].append(run)
        arm["seeds"].append(seed)
        arm["curves"].append((tokens, losses))
        arm["total_curves"].append((prior + tokens, losses))  # matched total compute: earlier stages count too
    if baseline is None:
        scratch = [a for a in arms if "scratch" in a]
        if len(scratch) > 1:
            raise ValueError(f"several arms look like the baseline ({', '.join(scratch)}); pick one with --baseline")
        baseline = scratch[0] if scratch else next(iter(arms))
    if baseline not in arms:
        raise ValueError(f"--baseline {baseline!r} is none of the arms: {', '.join(arms)}")
    base, base_total = mean_curve(arms[baseline]["curves"]), mean_curve(arms[baseline]["total_curves"])
    base_tokens = tokens_to_reach(base[0], base[1], base[1][-1])
    base_total_tokens = tokens_to_reach(base_total[0], base_total[1], base_total[1][-1])
    base_by_seed = dict(zip(arms[baseline]["seeds"], arms[baseline]["curves"]))
    rows = []
    for name, arm in arms.items():
        finals = [losses[-1] for _, losses in arm["curves"]]
        # the paired view: each run against the baseline run of the same seed (same stage-2 data order), which
        # removes the seed-to-seed spread that both arms share
        paired = [] if name == baseline else [f - base_by_seed[seed][1][-1]
                                              for seed, f in zip(arm["seeds"], finals) if seed in base_by_seed]
        rows.append({
            "arm": name, "runs": len(arm["runs"]), "final_loss": finals,
            "change": [100 * (f / base[1][-1] - 1) for f in finals],
            "ppl_change": [100 * (math.exp(f - base[1][-1]) - 1) for f in finals],
            "speedup": [speedup(base[:2], c) for c in arm["curves"]],
            "speedup_bound": [base_tokens / c[0][-1] for c in arm["curves"]],
            "speedup_total": [speedup(base_total[:2], c) for c in arm["total_curves"]],
            "speedup_total_bound": [base_total_tokens / c[0][-1] for c in arm["total_curves"]],
            "paired": paired,
        })
    return arms, rows, baseline


def markdown_table(rows, baseline):
    lines = [f"| arm | runs | final val loss | final ppl | loss vs {baseline} | ppl vs {baseline} | "
             f"speed-up (language tokens) | speed-up (total tokens) | loss - {baseline}, same seed (lower in) |",
             "|" + " --- |" * 9]
    for r in sorted(rows, key=lambda r: r["arm"] != baseline):  # the baseline first, then the arms in order
        paired = "-"
        if r["paired"]:
            lower = sum(d < 0 for d in r["paired"])
            paired = f"{mean_std(r['paired'], 4, signed=True)} ({lower}/{len(r['paired'])})"
        lines.append(f"| {r['arm']} | {r['runs']} | {mean_std(r['final_loss'], 4)} | "
                     f"{mean_std([math.exp(f) for f in r['final_loss']], 3)} | {mean_std(r['change'], 1, '%')} | "
                     f"{mean_std(r['ppl_change'], 1, '%')} | {format_speedups(r['speedup'], r['speedup_bound'])} | "
                     f"{format_speedups(r['speedup_total'], r['speedup_total_bound'])} | {paired} |")
    return "\n".join(lines)


def difference_curve(arm, base_arm):
    """Mean and std over an arm's runs of (its loss - the baseline's loss) at the baseline's eval points (language
    tokens); each run is paired with the baseline run of its seed, or with the baseline mean if there is none."""
    base_by_seed = dict(zip(base_arm["seeds"], base_arm["curves"]))
    base_tokens, base_mean, _ = mean_curve(base_arm["curves"])
    tokens = base_tokens[base_tokens <= min(t[-1] for t, _ in arm["curves"])]
    diffs = []
    for seed, (t, losses) in zip(arm["seeds"], arm["curves"]):
        reference = np.interp(tokens, *base_by_seed[seed]) if seed in base_by_seed else base_mean[:len(tokens)]
        diffs.append(np.interp(tokens, t, losses) - reference)
    diffs = np.stack(diffs)
    std = diffs.std(axis=0, ddof=1) if len(diffs) > 1 else np.zeros(len(tokens))
    return tokens, diffs.mean(axis=0), std


def plot_compare(arms, out, stage, baseline=None):
    """Validation loss of every arm (mean +- std over seeds) against language tokens and against all tokens; with a
    baseline, a third panel shows each arm's loss minus the baseline's, where differences of 1% are visible."""
    plt = pyplot()

    fig, panels = plt.subplots(1, 3 if baseline else 2, figsize=(18 if baseline else 12, 4.5))
    colours = {name: f"C{i}" for i, name in enumerate(arms)}

    def draw(ax, name, tokens, mean, std):
        n = len(arms[name]["runs"])
        ax.plot(tokens, mean, color=colours[name], label=f"{name} (mean of {n})" if n > 1 else name)
        if n > 1:
            ax.fill_between(tokens, mean - std, mean + std, color=colours[name], alpha=0.2)

    tops = []
    for ax, key, xlabel in ((panels[0], "curves", f"{stage} tokens (matched language tokens)"),
                            (panels[1], "total_curves", "all tokens, earlier stages included (matched total compute)")):
        for name, arm in arms.items():
            tokens, mean, std = mean_curve(arm[key])
            draw(ax, name, tokens, mean, std)
            tops.append(mean[min(1, len(mean) - 1)])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
    # the loss at iteration 0 (about ln V for a fresh head) would flatten everything after it, so cut the view at
    # the first evaluation after training began
    bottom = min(min(losses.min() for _, losses in arm["curves"]) for arm in arms.values())
    for ax in panels[:2]:
        ax.set_ylim(bottom - 0.02 * abs(bottom), max(tops) * 1.02)
    panels[0].legend()
    if baseline:
        ax = panels[2]
        for name, arm in arms.items():
            if name != baseline:
                tokens, mean, std = difference_curve(arm, arms[baseline])
                draw(ax, name, tokens[1:], mean[1:], std[1:])  # from the first eval after training began
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel(f"{stage} tokens (matched language tokens)")
        ax.set_ylabel(f"validation loss - {baseline}\n(same seed; below 0 is better)")
        ax.grid(alpha=0.3)
    save_figure(fig, out)


def run_compare(args):
    arms, rows, baseline = compare_runs(finished_runs(expand_runs(args.runs), [args.stage]), args.stage,
                                        args.baseline)
    table = markdown_table(rows, baseline)
    print(table)
    plot_compare(arms, args.out, args.stage, baseline)
    return table


def final_record(run_dir, stage):
    """The last evaluation record of a run's stage, or None when the run has no such stage."""
    path = os.path.join(run_dir, stage, "log.jsonl")
    if not os.path.exists(path):
        return None
    records = read_jsonl(path)
    return records[-1] if records else None


def probe_rows(run_dirs, baseline="scratch"):
    """Per run: its arm, seed, the probe at the end of stage 1 and of stage 2, and its stage-2 gain: final val loss
    minus the baseline run's of the same seed (same stage-2 data order; negative = better than the baseline)."""
    runs = [(run, *arm_of(run)) for run in run_dirs]
    base = {seed: final_record(run, "pretrain")["val_loss"] for run, arm, seed in runs if arm == baseline}
    if not base:
        raise ValueError(f"--baseline {baseline!r}: none of the runs is of that arm")
    rows = []
    for run, arm, seed in runs:
        stage1, stage2 = final_record(run, "prepretrain"), final_record(run, "pretrain")
        rows.append({"arm": arm, "seed": seed, "gain": stage2["val_loss"] - base[seed] if seed in base else None,
                     **{f"{key}_{n}": (s or {}).get(key) for n, s in ((1, stage1), (2, stage2))
                        for key in ("icl_score", "induction_score")}})
    return rows


def probe_table(rows, baseline):
    """Markdown: per arm, the paired gain over the baseline and the probe values at the end of each stage."""
    keys = ("gain", "icl_score_1", "induction_score_1", "icl_score_2", "induction_score_2")
    lines = [f"| arm | runs | loss - {baseline}, same seed (lower in) | in-context score, end of stage 1 | "
             f"induction score, end of stage 1 | in-context score, end of stage 2 | induction score, end of stage 2 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        cells = []
        for key in keys:
            values = [r[key] for r in mine if r[key] is not None]
            if not values or (key == "gain" and arm == baseline):
                cells.append("-")
                continue
            cells.append(f"{np.mean(values):+.4f} ± {np.std(values, ddof=1) if len(values) > 1 else 0:.4f}" +
                         (f" ({sum(v < 0 for v in values)}/{len(values)})" if key == "gain" else ""))
        lines.append(f"| {arm} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def probe_points(rows):
    """The runs with both an in-context score after stage 1 and a paired gain, and Pearson's r between the two
    (None for fewer than 3 runs)."""
    points = [r for r in rows if r["icl_score_1"] is not None and r["gain"] is not None]
    if len(points) < 3:
        return points, None
    return points, float(np.corrcoef([p["icl_score_1"] for p in points], [p["gain"] for p in points])[0, 1])


def plot_probe_vs_gain(rows, out, baseline):
    """Every run with a stage 1 as a point: its in-context score at the end of stage 1 (x) against its stage-2 gain
    over the baseline of the same seed (y), coloured by arm."""
    plt = pyplot()

    points, corr = probe_points(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in points)):
        mine = [r for r in points if r["arm"] == arm]
        ax.scatter([r["icl_score_1"] for r in mine], [r["gain"] for r in mine], label=arm, color=f"C{i}", s=30)
    ax.axhline(0, color="black", linewidth=0.8)
    if corr is not None:
        ax.set_title(f"{len(points)} runs, Pearson r = {corr:+.2f}", fontsize=9)
    ax.set_xlabel("in-context score after stage 1 (late - early loss, nats; lower: more use of context)", fontsize=8)
    ax.set_ylabel(f"stage-2 final loss - {baseline}, same seed (nats)", fontsize=8)
    if points:
        ax.legend(fontsize=7, loc="best")
    save_figure(fig, out)


def run_probes(args):
    rows = probe_rows(finished_runs(expand_runs(args.runs), ["pretrain"], ["prepretrain"]), args.baseline)
    print(probe_table(rows, args.baseline))
    points, corr = probe_points(rows)
    if corr is not None:
        print(f"in-context score after stage 1 against the gain: Pearson r = {corr:+.2f} over {len(points)} runs")
    plot_probe_vs_gain(rows, args.out, args.baseline)
    return rows


# -----------------------------------------------------------------------------
# the gain against model size: every run paired with the baseline run of its width and seed

# Reference marks, read off public reports: (label, parameters, loss - scratch, unit). Ours are nats per byte.
# The authors' blog (1.6B Llama, ~9B tokens of OpenWebText in stage 2, GPT-2 BPE): scratch 2.685, NCA 2.626,
# Dyck ~2.664; independent re-runs: nanochat d12 (124M) +0.0007 to +0.0089 bits/byte, a 108M run (6B tokens) 2.931
# against 2.925, a 1.4B-class data-limited run 3.207 against 3.177.
REFERENCES = (("authors, NCA", 1.6e9, 2.626 - 2.685, "nats/token"),
              ("authors, Dyck", 1.6e9, 2.664 - 2.685, "nats/token"),
              ("nanochat d12, NCA (worst)", 124e6, 0.0089 * math.log(2), "nats/byte"),
              ("nanochat d12, NCA (best)", 124e6, 0.0007 * math.log(2), "nats/byte"),
              ("108M run, NCA", 108e6, 2.931 - 2.925, "nats/token"),
              ("1.4B data-limited, NCA", 1.4e9, 3.207 - 3.177, "nats/token"))


def two_sided_p(t, dof):
    """Two-sided p-value of Student's t with dof degrees of freedom: 1 - 2 x (the density's integral from 0 to |t|),
    by Simpson's rule (no SciPy)."""
    if math.isinf(t):
        return 0.0
    x = np.linspace(0.0, abs(t), 2001)
    log_norm = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    density = np.exp(log_norm - (dof + 1) / 2 * np.log1p(x ** 2 / dof))
    integral = (x[1] - x[0]) / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum())
    return float(min(1.0, max(0.0, 1 - 2 * integral)))


def paired_t(differences):
    """(t, two-sided p) of the paired differences' mean against 0, with len - 1 degrees of freedom; None for < 2."""
    if len(differences) < 2:
        return None
    mean, std = float(np.mean(differences)), float(np.std(differences, ddof=1))
    t = mean / (std / math.sqrt(len(differences))) if std > 0 else math.copysign(math.inf, mean)
    return t, two_sided_p(t, len(differences) - 1)


def family_of(arm):
    """An arm's name without its width and precision suffixes: nca-w256, nca-w512-bf16 and nca are the same stage 1
    at three widths (the precision is read from the run's settings, not its name)."""
    return re.sub(r"(-w\d+)?(-bf16|-fp16)?$", "", arm)


def run_size(run_dir):
    """(width, parameters, autocast precision) of a run, from the settings train.py writes beside the stage-2 log."""
    settings = stage_settings(run_dir, "pretrain")
    if settings is None:
        raise FileNotFoundError(f"--runs: no {os.path.join(run_dir, 'pretrain', 'config.json')}; train.py writes it "
                                f"when a stage starts")
    model_args = settings["model_args"]
    with torch.device("meta"):  # the shapes only: no memory, no initialisation
        model = GPT(ModelConfig(**model_args))
    return model_args["n_embd"], model.num_params(), settings["config"].get("dtype", "float32")


def size_rows(run_dirs, families, baseline="scratch"):
    """Per run of the given families: its width, parameters, precision, seed and stage-2 gain (final val loss - the
    baseline family's run of the same width, precision and seed: numbers made in different precisions do not pair).
    Runs without such a twin are named and left out."""
    runs = []
    for run in run_dirs:
        arm, seed = arm_of(run)
        runs.append((run, family_of(arm), seed, *run_size(run), read_log(run, "pretrain")[2][-1]))
    base = {(params, dtype, seed): loss for _, family, seed, _, params, dtype, loss in runs if family == baseline}
    rows = []
    for run, family, seed, width, params, dtype, loss in runs:
        if family not in families:
            continue
        if (params, dtype, seed) not in base:
            print(f"left out {run}: no {baseline} run of width {width}, {dtype} and seed {seed} to pair it with")
            continue
        rows.append({"family": family, "arm": arm_of(run)[0], "width": width, "params": params, "dtype": dtype,
                     "seed": seed, "loss": loss, "gain": loss - base[params, dtype, seed]})
    if not rows:
        raise ValueError(f"--runs: no run of {', '.join(families)} has a {baseline} twin of its width and seed")
    return rows


def precision_order(dtype):
    """Sort key of a precision: float32 first, then the others by name."""
    return dtype != "float32", dtype


def size_groups(rows):
    """{(family, width, params, precision): [gains in seed order]}, in family then width order."""
    groups = {}
    for r in sorted(rows, key=lambda r: (r["family"], r["params"], precision_order(r["dtype"]), r["seed"])):
        groups.setdefault((r["family"], r["width"], r["params"], r["dtype"]), []).append(r["gain"])
    return groups


def width_name(width, dtype):
    """512, or 512 bfloat16 for a run in another precision than float32."""
    return f"{width}" if dtype == "float32" else f"{width} {dtype}"


def width_groups(rows):
    """The (width, precision) pairs of the rows, by width, float32 first."""
    return sorted({(r["width"], r["dtype"]) for r in rows}, key=lambda g: (g[0], precision_order(g[1])))


def size_table(rows, baseline):
    lines = [f"| stage 1 | width | parameters | seeds | loss - {baseline}, same width and seed (lower in) | per seed | "
             f"paired t | two-sided p |", "|" + " --- |" * 8]
    for (family, width, params, dtype), gains in size_groups(rows).items():
        test = paired_t(gains)
        lower = sum(g < 0 for g in gains)
        lines.append(f"| {family} | {width_name(width, dtype)} | {params:,} | {len(gains)} | "
                     f"{mean_std(gains, 4, signed=True)} ({lower}/{len(gains)}) | "
                     f"{' '.join(f'{g:+.3f}' for g in gains)} | " +
                     (f"{test[0]:+.2f} | {test[1]:.2f} |" if test else "- | - |"))
    return "\n".join(lines)


def plot_size(rows, out, baseline):
    """Every run's gain against its parameter count (log scale), the mean and std per width, and the public
    results at 100M+ parameters as reference marks (their units in the legend)."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(9, 5))
    families = list(dict.fromkeys(r["family"] for r in sorted(rows, key=lambda r: r["family"])))
    for (family, _, params, _), gains in size_groups(rows).items():
        colour = f"C{families.index(family)}"
        shift = 1.06 ** (families.index(family) - (len(families) - 1) / 2)  # side by side, not on top of each other
        ax.scatter([params * shift] * len(gains), gains, color=colour, s=18, alpha=0.6)
        std = np.std(gains, ddof=1) if len(gains) > 1 else 0.0
        ax.errorbar(params * shift, np.mean(gains), yerr=std, color=colour, marker="_", markersize=14, capsize=4)
    for i, family in enumerate(families):
        ax.plot([], [], color=f"C{i}", marker="o", label=f"{family}: runs, mean ± std (ours, nats/byte)")
    for (label, params, gain, unit), marker in zip(REFERENCES, "**v^sD"):  # a marker each: the legend tells them apart
        ax.scatter(params, gain, marker=marker, s=70 if marker == "*" else 40, color="k" if "NCA" in label else "grey",
                   label=f"{label} ({unit})")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"final stage-2 loss - {baseline} (below 0: stage 1 helped)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    save_figure(fig, out)


def run_size_command(args):
    rows = size_rows(finished_runs(expand_runs(args.runs), ["pretrain"]), args.arms, args.baseline)
    table = size_table(rows, args.baseline)
    print(table)
    plot_size(rows, args.out, args.baseline)
    return table


# what carries the transfer: the stage-1 model with parts re-initialised before stage 2 (study.sh's component arms)
CARRIED = {"nca-mlp-only": "MLP", "nca-attention-only": "attention", "nca": "attention + MLP"}  # besides norms


def carried_table(rows, baseline):
    """Per width: the baseline's final loss, then each arm's: loss, loss - baseline of the same seed (lower in),
    per seed, paired t and p."""
    lines = []
    for width, dtype in width_groups(rows):
        here = [r for r in rows if (r["width"], r["dtype"]) == (width, dtype)]
        base = {r["seed"]: r["loss"] - r["gain"] for r in here}  # the baseline's final loss, by seed
        lines += [f"Width {width_name(width, dtype)} ({here[0]['params']:,} parameters), {baseline} (nothing carried): "
                  f"final loss {mean_std(list(base.values()), 4)} over {len(base)} seeds", "",
                  f"| carried into stage 2 | arm | seeds | final loss | loss - {baseline}, same seed (lower in) | "
                  f"per seed | paired t | two-sided p |", "|" + " --- |" * 8]
        for family, what in CARRIED.items():
            arm = sorted((r for r in here if r["family"] == family), key=lambda r: r["seed"])
            if not arm:
                continue
            gains, test = [r["gain"] for r in arm], paired_t([r["gain"] for r in arm])
            lines.append(f"| {what} | {arm[0]['arm']} | {len(arm)} | {mean_std([r['loss'] for r in arm], 4)} | "
                         f"{mean_std(gains, 4, signed=True)} ({sum(g < 0 for g in gains)}/{len(gains)}) | "
                         f"{' '.join(f'{g:+.3f}' for g in gains)} | " +
                         (f"{test[0]:+.2f} | {test[1]:.2f} |" if test else "- | - |"))
        lines.append("")
    return "\n".join(lines)


def plot_carried(rows, out, baseline):
    """One panel per width: the stage-2 gain over the baseline by what was carried, every seed a point (the same seed
    joined across arms), with the mean and std."""
    plt = pyplot()
    widths = width_groups(rows)
    fig, axes = plt.subplots(1, len(widths), figsize=(4.5 * len(widths), 4), squeeze=False, sharey=True)
    for ax, (width, dtype) in zip(axes[0], widths):
        here = [r for r in rows if (r["width"], r["dtype"]) == (width, dtype)]
        for seed in sorted({r["seed"] for r in here}):
            points = [(i + 1, r["gain"]) for i, family in enumerate(CARRIED) for r in here
                      if r["family"] == family and r["seed"] == seed]
            ax.plot(*zip((0, 0.0), *points), color="grey", alpha=0.4, lw=0.8, marker="o", markersize=4)
        for i, family in enumerate(CARRIED, start=1):
            gains = [r["gain"] for r in here if r["family"] == family]
            if gains:
                ax.errorbar(i + 0.12, np.mean(gains), yerr=np.std(gains, ddof=1) if len(gains) > 1 else 0,
                            color=f"C{i}", marker="D", capsize=4)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(CARRIED) + 1), ["nothing\n(scratch)", *[w.replace(" + ", "\n+ ") for w in
                                                                         CARRIED.values()]])
        ax.set_title(f"width {width_name(width, dtype)} ({here[0]['params'] / 1e6:.1f}M parameters)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"final stage-2 loss - {baseline}, same seed\n(below 0: stage 1 helped)")
    save_figure(fig, out)


def run_carried(args):
    rows = size_rows(finished_runs(expand_runs(args.runs), ["pretrain"]), list(CARRIED), args.baseline)
    table = carried_table(rows, args.baseline)
    print(table)
    plot_carried(rows, args.out, args.baseline)
    return table


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help in (("demo", "a picture of rollouts by gzip band, and the histogram of ratios"),
                       ("stats", "gzip-ratio deciles and acceptance of random rules; with --quantiles, bands")):
        sub = commands.add_parser(name, help=help, description=help)
        add_nca_flags(sub)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                         help="where rules are simulated: cpu or cuda")
    commands.choices["demo"].add_argument("--out", default="nca_demo.png", help="where to write the picture")
    commands.choices["stats"].add_argument("--rules", type=int, default=2000, help="random rules to score")
    commands.choices["stats"].add_argument("--quantiles", type=float, nargs="+", default=(), metavar="Q",
                                           help="the gzip ratio at these quantiles (0..1, ascending) and the bands "
                                                "between them as --band flags, e.g. --quantiles 0.2 0.4 0.6 0.8")
    sub = commands.add_parser("compare", help="validation curves of several runs, final loss and speed-up")
    sub.add_argument("--runs", nargs="+", required=True, help="run folders (train.py --out_dir) or glob patterns")
    sub.add_argument("--stage", default="pretrain", choices=("prepretrain", "pretrain", "finetune"),
                     help="whose validation curves to compare")
    sub.add_argument("--baseline", help="arm to compare against (default: the one whose name contains 'scratch')")
    sub.add_argument("--out", default="compare.png", help="where to write the plot")
    sub = commands.add_parser("probes", help="the probe at the end of each stage against the stage-2 gain, per arm")
    sub.add_argument("--runs", nargs="+", required=True, help="run folders (<arm>_seed<k>) or glob patterns")
    sub.add_argument("--baseline", default="scratch", help="the arm every run is paired with, seed by seed")
    sub.add_argument("--out", default="probe_vs_gain.png", help="where to write the scatter plot")
    sub = commands.add_parser("size", help="the stage-2 gain of each run against its parameter count")
    sub.add_argument("--runs", nargs="+", required=True, help="run folders (<arm>_seed<k>, <arm>-w<width>_seed<k>)")
    sub.add_argument("--arms", nargs="+", default=("nca", "dyck"), help="stage-1 arms to draw (without -w<width>)")
    sub.add_argument("--baseline", default="scratch", help="the arm every run is paired with, by width and seed")
    sub.add_argument("--out", default="size.png", help="where to write the figure")
    sub = commands.add_parser("carried", help="the stage-2 gain by what stage 2 carried of stage 1, per width")
    sub.add_argument("--runs", nargs="+", required=True, help="run folders (nca-w256_seed0, nca-mlp-only-w256_seed0, "
                                                              "scratch-w256_seed0, ...) or glob patterns")
    sub.add_argument("--baseline", default="scratch", help="the arm every run is paired with, by width and seed")
    sub.add_argument("--out", default="carried.png", help="where to write the figure")
    args = parser.parse_args(argv)
    try:
        if args.command in ("demo", "stats"):
            cfg = nca_config(args)
            if args.command == "demo":
                return demo(cfg, args.device, out=args.out)
            quantiles = list(args.quantiles)
            if args.rules < 1:
                raise ValueError(f"--rules must be >= 1, got {args.rules}")
            if any(not 0 <= q <= 1 for q in quantiles) or any(a >= b for a, b in zip(quantiles, quantiles[1:])):
                raise ValueError(f"--quantiles must be ascending numbers in [0, 1], got {quantiles}")
            return print_stats(cfg, args.rules, args.device, quantiles)
        return {"compare": run_compare, "probes": run_probes, "size": run_size_command,
                "carried": run_carried}[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # our own messages name the flag or file and the fix
        sys.exit(f"study.py {args.command}: error: {e}")


if __name__ == "__main__":
    main()
