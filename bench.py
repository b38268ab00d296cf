"""
Speed and the GPU self-check: how fast the NCA stream and the training loop run on this machine, and one command that
runs every GPU path of the project at a small size. None of it is needed to train.

  python bench.py nca                      # filtered and raw NCA tokens/s at the paper's settings (12x12, 10 colours)
  python bench.py nca --device cuda --chunk 8192   # on a GPU: more rules per tensor program
  python bench.py train                    # stage-1 training tokens/s, data wait, MFU, peak memory (train.py flags)
  python bench.py train --n_layer 24 --n_embd 2048 --block_size 1024 --batch_size 8   # a paper-size model
  python bench.py check                    # on a new machine: every GPU path, PASS/FAIL per item, in a few minutes

The memory estimate that train.py checks before a run is safety.estimate_memory.
"""
import argparse
import dataclasses
import importlib.util
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch

import nca
import safety
import train
from model import GPT, ModelConfig
from runtime import setup_distributed
from data.common import ArgumentParser, read_jsonl

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
WARMUP_STEPS = 5  # steps the training benchmark leaves out of its steady-state numbers (compilation, allocator)
# dense bf16 peak of common GPUs (vendor datasheets), for the MFU estimate: (pattern searched in
# torch.cuda.get_device_name, TFLOP/s), the first match wins, so variants come before their family. CPUs get no MFU.
PEAK_TFLOPS = [(r"H[12]00.*NVL", 835.0), (r"H100.*PCIe", 756.0), (r"H100|H200", 989.0), (r"A100", 312.0),
               (r"L40S", 362.0), (r"L40\b", 181.0), (r"L4\b", 121.0), (r"A10G", 70.0), (r"A10\b", 125.0),
               (r"RTX 4090", 165.0), (r"RTX 3090", 71.0)]

# -----------------------------------------------------------------------------
# the NCA stream

def synchronize(device):
    """Wait for queued GPU work, so that a timer measures work done, not work launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_throughput(cfg, device, batch_size=64, seq_len=1024, seconds=10.0, chunk=0):
    """Tokens per second, raw (simulate and tokenize, no filter) and filtered (everything the training loop would
    wait for: rejection sampling with gzip included), and the gzip filter alone in rules per second."""
    chunk, frames = chunk or nca.default_chunk(device), math.ceil((seq_len + 1) / cfg.frame_len)
    seeds = torch.arange(chunk, device=device)
    def raw_chunk(offset):  # simulate and tokenize one chunk of rules, no filter
        grid, rules = nca.initial_grids(seeds + offset, cfg), nca.sample_rules(seeds + offset, cfg.num_colors)
        frames_out = nca.rollout(grid, rules, seeds, 0, frames, cfg, burn_in=cfg.burn_in)[0]
        return nca.encode(frames_out, cfg)[:, :seq_len].numel()
    raw_chunk(0)  # warm up
    raw_tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 4:
        raw_tokens += raw_chunk(raw_tokens)
    synchronize(device)
    raw = raw_tokens / (time.perf_counter() - t0)

    ids = nca.patch_ids(nca.score_rules(seeds, seeds, cfg)[1], cfg).cpu()  # one chunk's scoring frames
    gzipped, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds / 8:
        nca.gzip_ratio(ids)
        gzipped += len(ids)
    gzip_rules = gzipped / (time.perf_counter() - t0)

    stream = nca.NCAStream(cfg, batch_size, seq_len, seed=0, device=device, chunk=chunk)
    stream.next_batch()  # warm up
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x, _ = stream.next_batch()
        tokens += x.numel()
    synchronize(device)
    acceptance = stream.accepted / stream.tried
    return {"raw": raw, "filtered": tokens / (time.perf_counter() - t0), "acceptance": acceptance,
            "rules_tried": stream.tried, "gzip_rules": gzip_rules, "gzip_ceiling": gzip_rules * acceptance * seq_len,
            "chunk": chunk}


def bench_nca(cfg, device, seconds=10.0, chunk=0):
    """The stream at the paper's sequence length (1024); prints tokens_per_s=<filtered tokens/s> last."""
    speed = measure_throughput(cfg, device, seq_len=1024, seconds=seconds, chunk=chunk)
    print(f"raw (unfiltered) {speed['raw']:,.0f} tokens/s; filtered: acceptance {speed['acceptance']:.2f} "
          f"({speed['rules_tried']:,} rules tried), device {device}, {speed['chunk']} rules per chunk, "
          f"{torch.get_num_threads()} threads")
    print(f"gzip filter alone: {speed['gzip_rules']:,.0f} rules/s on the CPU, a ceiling of "
          f"{speed['gzip_ceiling']:,.0f} filtered tokens/s (more threads: OMP_NUM_THREADS)")
    print(f"tokens_per_s={speed['filtered']:.0f}")


# -----------------------------------------------------------------------------
# the training loop: stage 1 at the given flags

def peak_flops(device, peak_tflops=0.0):
    """FLOP/s of one device at 100% utilisation, or None where unknown (CPUs, GPUs not in PEAK_TFLOPS)."""
    if peak_tflops > 0:
        return peak_tflops * 1e12
    if torch.device(device).type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, tflops in PEAK_TFLOPS:
            if re.search(pattern, name):
                return tflops * 1e12
    return None


def bench_train(cfg, model_cfg, nca_cfg, peak_tflops=0.0):
    """NCA tokens/s (raw and filtered), then stage-1 training tokens/s, data wait, MFU and peak memory, measured over
    the steps after the first WARMUP_STEPS (no evaluation or saving in between)."""
    if cfg.prepretrain_iters <= WARMUP_STEPS:
        raise ValueError(f"the benchmark measures stage 1 after {WARMUP_STEPS} warm-up steps; --prepretrain_iters "
                         f"{cfg.prepretrain_iters} leaves none, use e.g. --prepretrain_iters 50")
    ddp = setup_distributed(cfg)
    speed = measure_throughput(nca_cfg, cfg.device, batch_size=ddp.batch_size, seq_len=model_cfg.block_size,
                               chunk=cfg.nca_chunk)
    with tempfile.TemporaryDirectory() as tmp:
        bench_cfg = dataclasses.replace(cfg, out_dir=tmp, eval_interval=10 ** 9, resume=False, init_from="")
        _, stats = train.train_stage("prepretrain", bench_cfg, model_cfg, nca_cfg, "", ddp)
    if torch.device(cfg.device).type == "cuda":
        peak_memory = torch.cuda.max_memory_allocated(cfg.device) / 2 ** 30
    else:
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    estimate = safety.estimate_memory(dataclasses.replace(model_cfg, vocab_size=nca_cfg.vocab_size), ddp.batch_size,
                                      cfg.dtype, ddp.micro_steps)["total"] / 2 ** 30
    steady = stats["steps"][WARMUP_STEPS:]
    seconds, tokens, data = (sum(s[i] for s in steady) for i in range(3))
    tokens_per_s, peak = tokens / seconds, peak_flops(cfg.device, peak_tflops)
    mfu = f"{stats['flops_per_token'] * tokens_per_s / (peak * ddp.world):.1%}" if peak else \
        "n/a (no peak known for this device: --peak_tflops)"
    print(f"bench: nca_raw_tokens_per_s={speed['raw']:.0f} nca_filtered_tokens_per_s={speed['filtered']:.0f} "
          f"train_tokens_per_s={tokens_per_s:.0f} data_wait={data / seconds:.1%} mfu={mfu} "
          f"peak_memory_gib={peak_memory:.2f} estimated_memory_gib={estimate:.2f} device={cfg.device} "
          f"world={ddp.world} (training numbers: the last {len(steady)} steps, without the {WARMUP_STEPS} "
          f"warm-up steps, evaluation and saving)")
    return {"tokens_per_s": tokens_per_s, "data_wait": data / seconds, "steps": len(steady)}



# -----------------------------------------------------------------------------
# the GPU self-check: every GPU path, small and fast, for the first run on a new machine

class Checks:
    """Runs commands of this repository in their own processes and keeps PASS / FAIL / SKIP per item."""

    def __init__(self):
        self.results = []

    def record(self, name, ok, note):
        self.results.append((name, ok, note))
        print(f"check: {'PASS' if ok else 'FAIL' if ok is not None else 'SKIP'} {name} ({note})", flush=True)

    def run(self, name, command, expect=()):
        t0 = time.time()
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
        missing = [e for e in expect if e not in proc.stdout]
        ok = proc.returncode == 0 and not missing
        note = f"{time.time() - t0:.0f}s"
        if proc.returncode:
            note += ": " + (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1][:300]
        elif missing:
            note += f": the output lacks {missing}"
        self.record(name, ok, note)
        return proc


def gpu_check(device, out_dir, data_dir):
    """Run what a GPU user relies on, at a small size, and print PASS/FAIL per item and the benchmark line.
    `python bench.py check --device cpu` runs the same items on the CPU (the test suite does)."""
    gpu = torch.device(device).type == "cuda"
    out, py, checks = os.path.join(out_dir, "check"), sys.executable, Checks()
    shutil.rmtree(out, ignore_errors=True)
    # the paths matter here, not the scale: a small model, and on the CPU a tiny one with a tiny NCA
    small = ["--device", device, "--eval_iters", "2", "--log_interval", "10", "--data_dir", data_dir] + (
        ["--n_layer", "2", "--n_head", "4", "--n_embd", "512", "--block_size", "128", "--batch_size", "8"] if gpu else
        ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "48", "--batch_size", "4",
         "--grid", "6", "--num_colors", "4", "--band", "0.0", "1.0", "--nca_chunk", "64"])
    dtype = "bfloat16" if not gpu or torch.cuda.is_bf16_supported(including_emulation=False) else "float32"
    small += ["--dtype", dtype]
    stages = ["--prepretrain_iters", "20", "--pretrain_iters", "20", "--finetune_iters", "10", "--eval_interval", "10"]
    run = os.path.join(out, "run")
    three = checks.run(f"three stages ({dtype}, fused AdamW {gpu}, NCA prefetch)",
                       [py, "-c", TRAIN_REPORTING_MEMORY, *small, *stages, "--out_dir", run],
                       expect=["== finetune done", f"fused={gpu}"])
    check_stage_memory(checks, three.stdout, gpu)
    checks.run("torch.compile", [py, "train.py", *small, "--stage", "pretrain", "--pretrain_iters", "20", "--compile",
                                 "--out_dir", os.path.join(out, "compiled")], expect=["== pretrain done"])
    check_resume_after_kill(checks, [py, "train.py", *small, "--stage", "pretrain", "--pretrain_iters", "200",
                                     "--eval_interval", "20", "--dropout", "0.1"], out, exact=not gpu)
    if (torch.cuda.device_count() if gpu else 2) >= 2:  # on a CPU: 2 gloo processes
        checks.run("torchrun, 2 processes, --stage all",
                   [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *small,
                    *stages, "--grad_accum", "2", "--out_dir", os.path.join(out, "ddp")], expect=["== finetune done"])
    else:
        checks.record("torchrun, 2 processes", None, "needs 2 GPUs")
    checks.run("eval.py icl", [py, "eval.py", "icl", "--ckpt", f"{run}/prepretrain/ckpt.pt", "--device", device,
                               "--num_rules", "8", "--out", os.path.join(out, "icl.png")], expect=["cell accuracy"])
    checks.run("eval.py passk (generation with the KV cache)",
               [py, "eval.py", "passk", "--ckpt", f"{run}/finetune/ckpt.pt", "--device", device, "--n", "4",
                "--k", "1", "2", "--max_problems", "4"], expect=["pass@1"])
    check_nca_on_device(checks, device)
    check_cached_generation(checks, f"{run}/finetune/ckpt.pt", device)
    checks.run("eval.py export", [py, "eval.py", "export", "--ckpt", f"{run}/pretrain/ckpt.pt", "--out_dir",
                                  os.path.join(out, "hf")],
               expect=["model.safetensors" if importlib.util.find_spec("safetensors") else "pytorch_model.bin"])
    bench_model = ["--device", device, "--data_dir", data_dir] if gpu else small  # the default model on a GPU
    bench = checks.run("bench.py train", [py, "bench.py", "train", *bench_model, "--prepretrain_iters", "30"],
                       expect=["bench:"])
    print("\n".join(line for line in bench.stdout.splitlines() if line.startswith("bench:")))
    failed = [name for name, ok, _ in checks.results if ok is False]
    print(f"check on {torch.cuda.get_device_name(device) if gpu else 'the cpu'}: "
          + (f"FAILED: {'; '.join(failed)}" if failed else f"all {len(checks.results)} items passed or skipped"))
    if failed:
        raise SystemExit(1)


def check_resume_after_kill(checks, command, out, exact):
    """A run killed with SIGKILL after its first checkpoints and then resumed must log what a straight run logs:
    bit for bit on a CPU; on a GPU within 1e-2 (some kernels, e.g. attention's backward, sum in varying order)."""
    straight, killed = os.path.join(out, "straight"), os.path.join(out, "killed")
    checks.run("resume: a straight run", command + ["--out_dir", straight])
    proc = subprocess.Popen(command + ["--out_dir", killed], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log_path, deadline = os.path.join(killed, "pretrain", "log.jsonl"), time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if os.path.exists(log_path) and open(log_path).read().count("\n") >= 3:  # iterations 0, 20, 40 logged
            break
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    checks.run("resume: kill -9 mid-run, then --resume (dropout 0.1)", command + ["--out_dir", killed, "--resume"],
               expect=["resuming"])
    logs = [read_jsonl(os.path.join(run, "pretrain", "log.jsonl")) for run in (straight, killed)]
    worst = max((abs(a["val_loss"] - b["val_loss"]) for a, b in zip(*logs)), default=math.inf)
    same = [r["iter"] for r in logs[0]] == [r["iter"] for r in logs[1]]
    limit = 0.0 if exact else 1e-2
    checks.record("resume: the resumed log equals the straight one", same and worst <= limit,
                  f"largest val-loss difference {worst:.1e}, allowed {limit:.0e}")



def check_nca_on_device(checks, device):
    """The NCA batches made on the device must be the CPU's bit for bit (the rules run in float64, the GPU samples by
    inverse CDF where the CPU takes a faster path), with TF32 on as train.py turns it on. On the CPU it compares the
    CPU with itself."""
    cfg, name = nca.NCAConfig(), "NCA data: the device's batch equals the CPU's, bit for bit"
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py runs on a GPU
    here = nca.NCAStream(cfg, 16, 256, seed=0, device=device, chunk=256).next_batch()
    cpu = nca.NCAStream(cfg, 16, 256, seed=0, device="cpu", chunk=256).next_batch()
    same = all(torch.equal(a.cpu(), b) for a, b in zip(here, cpu))
    differ = int((here[0].cpu() != cpu[0]).sum())
    checks.record(name, same, f"16 sequences of 256 tokens at the paper's settings, {differ} tokens differ")


def check_cached_generation(checks, ckpt_path, device):
    """Greedy generation with the KV cache must give the tokens of generation without it, under bf16 autocast too
    (the cached path computes one query at a time, so its bf16 rounding differs). A flip where the two best logits are
    within bf16's rounding (a near tie) is reported, not failed."""
    name = "generation: greedy with the KV cache equals without, under bf16"
    ckpt = safety.load_checkpoint(ckpt_path, "bench check: ")
    model = GPT(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    prompt = torch.randint(model.config.vocab_size, (4, 8), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        cached, plain = (model.generate(prompt, 24, temperature=0, use_cache=c) for c in (True, False))
        if torch.equal(cached, plain):
            return checks.record(name, True, "4 prompts, 24 tokens each")
        row, step = (cached != plain).nonzero()[0].tolist()
        logits = model(plain[row:row + 1, :step])[0][0, -1].float()
    gap = float(logits.topk(2).values.diff().abs())
    checks.record(name, gap < 0.05, f"row {row} differs from token {step - 8} on, where the two best logits are "
                                    f"{gap:.3f} apart" + (" (a near tie)" if gap < 0.05 else ""))


# train.py with a line per stage: the GPU memory still allocated as the stage starts (check_stage_memory reads them)
TRAIN_REPORTING_MEMORY = """
import sys, torch, train
setup_stage = train.setup_stage
def reporting(stage, cfg, *args):
    if torch.device(cfg.device).type == "cuda":
        print(f"gpu memory: {torch.cuda.memory_allocated(cfg.device) / 2 ** 20:.1f} MiB allocated as {stage} starts")
    return setup_stage(stage, cfg, *args)
train.setup_stage = reporting
train.main(sys.argv[1:])
"""


def check_stage_memory(checks, stdout, gpu):
    """Nothing of stage 1 (model, AdamW state, prefetched batches) may stay on the GPU into stage 2: the memory
    allocated as stage 2 starts (train.py prints it on a GPU) must be well below stage 1's weights and AdamW state."""
    allocated = {stage: float(mib) for mib, stage in re.findall(r"gpu memory: ([\d.]+) MiB allocated as (\w+) starts",
                                                                 stdout)}
    params = re.search(r"AdamW, ([\d,]+) decayed and ([\d,]+) non-decayed", stdout)
    if not gpu:
        return checks.record("memory: stage 1 is freed before stage 2", None, "GPU memory only; on the CPU the test "
                                                                               "suite checks it with weakref")
    if "pretrain" not in allocated or params is None:
        return checks.record("memory: stage 1 is freed before stage 2", False, "the three-stage run printed no "
                                                                                "memory lines")
    stage1_mib = 16 * sum(int(p.replace(",", "")) for p in params.groups()) / 2 ** 20  # weights, grads, AdamW
    checks.record("memory: stage 1 is freed before stage 2", allocated["pretrain"] < 0.5 * stage1_mib,
                  f"{allocated['pretrain']:.1f} MiB allocated as stage 2 starts; stage 1 held {stage1_mib:.1f} MiB")


# -----------------------------------------------------------------------------
# command line

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"nca": "NCA tokens/s, filtered and raw", "train": "stage-1 training speed (takes train.py's flags)",
                "check": "every GPU path at a small size, PASS/FAIL per item"}
    if not argv or argv[0] not in commands:
        usage = "\n".join(f"  python bench.py {name:6s} {text}" for name, text in commands.items())
        raise SystemExit(f"{__doc__}\nusage:\n{usage}" if not argv or argv[0] in ("-h", "--help") else
                         f"bench.py: choose one of {', '.join(commands)}, got {argv[0]!r} (see --help)")
    command, rest = argv[0], argv[1:]
    if command == "train":  # train.py's flags, plus the device's peak for MFU
        extra = argparse.ArgumentParser(add_help=False)
        extra.add_argument("--peak_tflops", type=float, default=0.0,
                           help="the device's peak for the MFU estimate; 0 = look the GPU up in PEAK_TFLOPS")
        known, rest = extra.parse_known_args(rest)
        cfg, model_cfg, nca_cfg = train.parse_args(rest, prog="bench.py train")
        return bench_train(cfg, model_cfg, nca_cfg, known.peak_tflops)
    parser = ArgumentParser(prog=f"bench.py {command}", description=commands[command])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    if command == "nca":
        safety.add_nca_flags(parser)
        parser.add_argument("--chunk", type=int, default=0,
                            help="rules simulated together (0: 512 on CPU, 4096 on GPU)")
        parser.add_argument("--seconds", type=float, default=10.0, help="how long to measure the filtered stream")
        args = parser.parse_args(rest)
        try:
            cfg = safety.nca_config(args)
            if args.chunk < 0 or not args.seconds > 0:
                raise ValueError(f"--chunk must be >= 0 (0 picks by device) and --seconds > 0, got {args.chunk} and "
                                 f"{args.seconds}")
        except ValueError as e:
            parser.error(str(e))
        return bench_nca(cfg, args.device, seconds=args.seconds, chunk=args.chunk)
    parser.add_argument("--out_dir", default="out", help="the check's runs go to out_dir/check (removed first)")
    parser.add_argument("--data_dir", default=train.DATA_DIR, help="where the datasets are (made offline)")
    args = parser.parse_args(rest)
    return gpu_check(args.device, args.out_dir, args.data_dir)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError, OSError) as e:
        sys.exit(f"bench.py: {e}")
