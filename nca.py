"""The NCA data engine: random neural cellular automata -> token sequences for pre-pre-training.

Every training sequence is rolled out from its own randomly drawn rule, so predicting the next token means
inferring that hidden rule in context. Read this file top to bottom:

  1. NCAConfig         the knobs (grid, alphabet, patch size, temperature, gzip band ...)
  2. the rule          one rule and its rollout as the paper writes them: conv3x3, conv1x1, ReLU, conv1x1, sampling
  3. tokens            2x2 patches -> one id each, every frame wrapped in START ... END
  4. gzip filter       keep rules whose rollouts compress neither too well (dead) nor too badly (noise)
  5. random numbers    counter-based: a rule is a pure function of its seed, whatever batch it is drawn in
  6. the engine        the rule of section 2 for thousands of rules in one tensor program, the same states
  7. NCAStream         (x, y) training batches for train.py, with rejection sampling until the batch is full;
                       a pure function of (seed, config) whatever the chunk or device, its state a few integers

Used by train.py (NCAStream) and eval.py; safety.py makes NCAConfig's flags and checks them. The tools beside it:
`python study.py demo` draws rollouts by gzip band, `python study.py stats` prints gzip statistics, `python bench.py
nca` measures the stream's speed. Needs only torch and numpy: copy it anywhere.

  stream = NCAStream(NCAConfig(), batch_size=16, seq_len=1024, seed=0)
  x, y = stream.next_batch()        # (16, 1024) token ids each; y is x shifted by one, the first frame masked (-1)
"""
import functools
import math
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


def arg(default, help):
    return field(default=default, metadata={"help": help})  # a config field with its --help text


# -----------------------------------------------------------------------------
# 1. Configuration

@dataclass
class NCAConfig:
    grid: int = arg(12, "the grid is grid x grid cells on a torus")
    num_colors: int = arg(10, "alphabet size C: every cell holds one of C states")
    patch: int = arg(2, "frames are cut into patch x patch tiles, one token each")
    temperature: float = arg(1e-4, "sampling temperature of the update (1e-4: practically argmax; 0: exactly argmax)")
    identity_bias: float = arg(0.0, "added to the logit of a cell's current state (a bias towards staying put)")
    burn_in: int = arg(10, "updates run and discarded before the first recorded frame")
    dT: int = arg(1, "updates between two recorded frames")
    band_lo: float = arg(0.5, "keep a rule when band_lo < gzip ratio < band_hi")
    band_hi: float = arg(1.0, "see band_lo")
    score_frames: int = arg(10, "frames used to compute a rule's gzip ratio")

    patches_per_frame = property(lambda self: (self.grid // self.patch) ** 2)
    frame_len = property(lambda self: self.patches_per_frame + 2)  # tokens per frame: START, the patches, END
    start_token = property(lambda self: self.num_colors ** (self.patch * self.patch))
    end_token = property(lambda self: self.start_token + 1)
    vocab_size = property(lambda self: self.start_token + 2)


# -----------------------------------------------------------------------------
# 2. The rule, as the paper writes it
# A rule is a per-cell network on the one-hot grid of C states: a 3x3 convolution C -> 4 with circular padding (the
# grid is a torus), a 1x1 convolution 4 -> 16, ReLU, a 1x1 convolution 16 -> C: the logits of the cell's next state.
# Its weights are LeCun-normal (std 1/sqrt(fan_in)), 614 of them for C=10; biases start at zero and rules are never
# trained, so they are left out. Every cell samples its next state from softmax(logits / T), all cells at once. A
# rollout runs burn_in updates, then records a frame every dT updates. This is the reference: the engine (section 6)
# computes the same states for thousands of rules at once, and a test holds them equal.

HIDDEN1, HIDDEN2, W1_QUANTUM = 4, 16, 2 ** -20


def sample_rules(rule_seeds, num_colors):
    """Rule weights for a batch of seeds (R,), float64: w1 (R, 4, C, 3, 3) in conv layout (out, in, ky, kx), w2
    (R, 16, 4) and w3 (R, C, 16) (out, in); and table, w1 as the engine's float32 lookup table (R, 9*C, 4). Every
    weight is an untruncated normal with std 1/sqrt(fan_in), fan_in = 9C, 4 and 16; w1 rounded to a multiple of
    W1_QUANTUM, so that its sums are exact (README.md, "Design notes"). The authors' code differs twice (STUDY.md, "The
    NCA data against the authors' code"): Flax's lecun_normal truncates at 2 sigma, its first convolution sees C + 2
    channels."""
    C, R = num_colors, len(rule_seeds)
    n1, n2, n3 = HIDDEN1 * C * 9, HIDDEN2 * HIDDEN1, C * HIDDEN2
    z = random_normal(rule_seeds, RULE_WEIGHTS, n1 + n2 + n3)                   # float64
    w1 = z[:, :n1].view(R, HIDDEN1, C, 3, 3) / math.sqrt(C * 9)                 # (out, in, ky, kx)
    w1 = torch.round(w1 / W1_QUANTUM) * W1_QUANTUM                               # 21 bits at most
    w2 = z[:, n1:n1 + n2].view(R, HIDDEN2, HIDDEN1) / math.sqrt(HIDDEN1)         # (out, in)
    w3 = z[:, n1 + n2:].view(R, C, HIDDEN2) / math.sqrt(HIDDEN2)
    table = w1.permute(0, 3, 4, 2, 1).reshape(R, 9 * C, HIDDEN1).float()        # row (ky*3 + kx)*C + state; exact
    return {"w1": w1, "w2": w2, "w3": w3, "table": table}


def plain_step(state, rule, noise_seed, t, cfg):
    """Update t of one grid (H, W) by one rule (w1, w2, w3 of sample_rules for that rule) -> the next grid (H, W).
    Cell n samples by inverse CDF with the uniform random_uniform(noise_seed, UPDATE_NOISE, t, n) (section 5)."""
    (H, W), C = state.shape, cfg.num_colors
    x = F.one_hot(state, C).permute(2, 0, 1).double()                            # (C, H, W) one-hot
    h = F.conv2d(F.pad(x[None], (1, 1, 1, 1), mode="circular"), rule["w1"])[0]  # (4, H, W): 3x3 conv on the torus
    h = torch.relu(rule["w2"] @ h.view(HIDDEN1, H * W))                          # (16, H*W): 1x1 conv 4 -> 16, ReLU
    logits = rule["w3"] @ h + cfg.identity_bias * x.view(C, H * W)              # (C, H*W): 1x1 conv 16 -> C
    if cfg.temperature > 0:
        p = torch.softmax(logits / cfg.temperature, dim=0)                       # (C, H*W)
    else:  # the limit T -> 0: uniform over the best states
        p = (logits == logits.amax(dim=0)).double()
        p = p / p.sum(dim=0)
    u = random_uniform(noise_seed, UPDATE_NOISE, t, torch.arange(H * W))        # (H*W,) in (0, 1)
    return (p.cumsum(dim=0) < u).sum(dim=0).view(H, W)                           # the first state whose CDF >= u


def plain_rollout(state, rule, noise_seed, num_frames, cfg):
    """cfg.burn_in updates of one grid (H, W), then num_frames frames cfg.dT updates apart -> (num_frames, H, W)."""
    frames, t = [], 0
    for i in range(num_frames):
        for _ in range(cfg.burn_in if i == 0 else cfg.dT):
            state, t = plain_step(state, rule, noise_seed, t, cfg), t + 1
        frames.append(state)
    return torch.stack(frames)


# -----------------------------------------------------------------------------
# 3. Tokens
# A frame is cut into p x p patches in row-major order; a patch's cells, read row-major, are the digits of its id
# in base C (top-left is the least significant). Every frame becomes [START, patch ids..., END].

def patch_ids(frames, cfg):
    """Frames (..., H, W) -> patch ids (..., patches_per_frame), no delimiters. Digit i*p + j of a patch is its cell
    (i, j): frames[..., i::p, j::p] holds that cell of every patch."""
    p = cfg.patch
    return sum(frames[..., i::p, j::p] * cfg.num_colors ** (i * p + j) for i in range(p) for j in range(p)).flatten(-2)


def encode(frames, cfg):
    """Frames (R, F, H, W) -> token ids (R, F * frame_len): every frame is [START, patches, END]."""
    ids = patch_ids(frames, cfg)                                                  # (R, F, P)
    start, end = (torch.full_like(ids[..., :1], token) for token in (cfg.start_token, cfg.end_token))
    return torch.cat([start, ids, end], dim=-1).flatten(1)


def decode(tokens, cfg):
    """The exact inverse of encode: token ids (R, F * frame_len) -> frames (R, F, H, W)."""
    framed, p = tokens.view(len(tokens), -1, cfg.frame_len), cfg.patch
    if not ((framed[..., 0] == cfg.start_token).all() and (framed[..., -1] == cfg.end_token).all()):
        raise ValueError("decode: tokens are not whole frames of [START, patches, END]")
    ids = framed[..., 1:-1].unflatten(-1, (cfg.grid // p, -1))                    # (R, F, n, n)
    frames = ids.new_empty(*ids.shape[:2], cfg.grid, cfg.grid)
    for i in range(p):
        for j in range(p):
            frames[..., i::p, j::p] = ids // cfg.num_colors ** (i * p + j) % cfg.num_colors
    return frames


def shuffle_patches(tokens, cfg):
    """The shuffled-NCA control: each row's patch tokens permuted among the row's own patch positions, START and
    END left in place. The same tokens and frame layout, so the same token statistics, but no dynamics to infer.
    The permutation is a pure function of the row (a hash of its tokens). tokens (R, T) -> (R, T)"""
    position = torch.arange(tokens.shape[1], device=tokens.device)
    row_key = hash32((tokens * (position + 1)).sum(dim=1))                        # (R,)
    patch = tokens < cfg.start_token        # every row starts with a frame, so the same positions in every row
    keys = random_bits(row_key[:, None], SHUFFLE, position).masked_fill(~patch, 2 ** 40)  # delimiters sort last
    order = keys.argsort(dim=1)[:, :int(patch[0].sum())]                         # patch positions, shuffled
    return tokens.masked_scatter(patch, tokens.gather(1, order))                 # row-major, like the mask


def inputs_and_targets(tokens, cfg):
    """Training pairs of token sequences (R, T + 1): x the first T tokens, y the last T, with the targets inside the
    first frame -1 (ignored by the loss): nothing to infer the rule from yet. -> x, y (R, T) each"""
    x, y = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    y[:, :cfg.frame_len - 1] = -1
    return x, y


# -----------------------------------------------------------------------------
# 4. The gzip complexity filter
# Score = gzip-compressed size / raw size of the scoring frames' patch ids (no delimiters) as little-endian int32, gzip
# level 9 with its 10-byte header and 8-byte trailer; zlib's output carries a 2-byte header and 4-byte trailer instead,
# so len(gzip) = len(zlib) + 12 exactly, and zlib.compress is cheaper than the gzip module. gzip runs on the CPU
# whatever the device (~48 us per rule), so rows are split over threads (zlib releases the GIL while it compresses),
# as many as torch uses (torch.get_num_threads(); OMP_NUM_THREADS sets both).

gzip_pool = functools.cache(lambda threads: ThreadPoolExecutor(max_workers=threads, thread_name_prefix="gzip"))


def gzip_ratio(ids, threads=None):
    """ids (R, ...) patch ids -> numpy array (R,) of gzip compression ratios, one per row."""
    rows = ids.reshape(len(ids), -1).cpu().numpy().astype("<i4")
    threads = threads or torch.get_num_threads()
    def compressed_sizes(part):
        return [len(zlib.compress(row.tobytes(), 9)) + 12 for row in part]
    parts = np.array_split(rows, max(1, min(threads, len(rows))))  # contiguous slices of rows, one per thread
    sizes = [n for part in (gzip_pool(threads).map if len(parts) > 1 else map)(compressed_sizes, parts) for n in part]
    return np.array(sizes) / rows.shape[1] / rows.itemsize


def score_rules(rule_seeds, grid_seeds, cfg):
    """Roll each rule out for its scoring frames. Returns (gzip ratios, frames, grid state, time, rule weights), so an
    accepted rule's rollout can continue where scoring stopped: a training sequence starts with its scored frames."""
    rules, grid = sample_rules(rule_seeds, cfg.num_colors), initial_grids(grid_seeds, cfg)
    frames, grid, t = rollout(grid, rules, grid_seeds, 0, cfg.score_frames, cfg, burn_in=cfg.burn_in)
    return gzip_ratio(patch_ids(frames, cfg)), frames, grid, t, rules


def in_band(ratios, cfg):
    return (ratios > cfg.band_lo) & (ratios < cfg.band_hi)


# -----------------------------------------------------------------------------
# 5. Counter-based random numbers
# The k-th random number of a rule is a hash of (rule seed, k). So a rule, or a rollout, is a pure function of its
# seeds: the same seed gives the same rule alone or in a batch of 4096, and a fixed pool of rules is just a list of
# integers. All arithmetic is on int64 tensors holding 32-bit values, so it runs batched on CPU and GPU alike.

MASK32 = 0xFFFFFFFF


def hash32(x):
    """The 'lowbias32' integer hash (C. Wellons): a bijection on 32-bit integers with strong avalanche."""
    x = x & MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & MASK32  # the product may wrap around int64; its low 32 bits are still exact
    x = ((x ^ (x >> 15)) * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def random_bits(seed, *counters):
    """32 random bits, a pure function of seed and counters (int64 tensors or ints, broadcast together)."""
    h = hash32(seed)
    for c in counters:
        h = hash32(h ^ c)
    return torch.as_tensor(h)


def random_uniform(seed, *counters):
    """float64 numbers in (0, 1), a pure function of seed and counters: the top 24 of the 32 bits, never 0 or 1."""
    return ((random_bits(seed, *counters) >> 8).double() + 0.5) / 2 ** 24


def random_normal(seed, stream, n):
    """n float64 standard normals per seed (Box-Muller), shape (len(seed), n)."""
    k = torch.arange(n, device=seed.device)
    u1, u2 = random_uniform(seed[:, None], stream, 2 * k), random_uniform(seed[:, None], stream, 2 * k + 1)
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


# Streams: independent sequences of random numbers drawn from one seed.
RULE_WEIGHTS, GRID_LOGITS, GRID_CELLS, UPDATE_NOISE = 1, 2, 3, 4
# ... and those drawn from the seed of an NCAStream: the seeds of its i-th rule and grid, its pool's order each epoch
RULE_SEEDS, GRID_SEEDS, POOL_ORDER, POOL_GRIDS = 5, 6, 7, 8
SHUFFLE = 9  # the stream of random numbers that permutes a row in shuffle_patches (seeded by a hash of the row)
HELD_OUT = 2 ** 31  # the top bit: set in every seed of a held-out stream, clear in every training seed


def stream_seeds(seed, stream, index, held_out=False):
    """Seeds (int64, like index) of the rules or grids number `index` of the data stream `seed`: the top 31 of 32 random
    bits of (seed, stream, index), in [0, 2^31); held_out adds 2^31. The i-th rule a stream tries is the same whatever
    the chunk it is simulated in, and no training rule is a held-out rule."""
    seeds = random_bits(seed, stream, index) >> 1
    return seeds + HELD_OUT if held_out else seeds


# -----------------------------------------------------------------------------
# 6. The engine: the rule of section 2 for thousands of rules at once
# The input is one-hot, so the 3x3 convolution is a table lookup: each of the 9 neighbours contributes the 4 numbers
# w1[:, state, ky, kx], one row of the rule's table, and embedding_bag sums 9 rows per cell. The 1x1 convolutions are
# batched matmuls, one matrix per rule. The sums of table rows are exact and the rest is float64, so that a rollout is
# the same on every device, with TF32 or autocast on (why: README.md, "Design notes").

@functools.lru_cache(maxsize=8)
def neighbour_index(grid, device):
    """(H*W, 9): the flat index of each cell's 9 neighbours on the torus, in the 3x3 kernel's (ky, kx) order.
    Neighbour (dy, dx) of cell (y, x) is cell (y+dy, x+dx): the cross-correlation order of conv2d."""
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    index = [((y + dy) % grid) * grid + (x + dx) % grid for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    return torch.stack(index, dim=-1).view(grid * grid, 9).to(device)


def rule_logits(grid, rules, num_colors):
    """Next-state logits of every cell: (R, H, W) states -> (R, C, H*W) float64. Channels first: the reductions over
    C below then run over contiguous rows of H*W cells, several times faster on CPU than over a last axis of 10.
    The table rows are looked up by int32 numbers, faster on CPU than int64."""
    R, H, W = grid.shape
    C = num_colors
    neighbours = grid.view(R, H * W).int()[:, neighbour_index(H, grid.device)]   # (R, H*W, 9) states
    table_row = torch.arange(9, device=grid.device) * C + torch.arange(R, device=grid.device).view(R, 1, 1) * 9 * C
    rows = (neighbours + table_row.int()).view(R * H * W, 9)                     # rows of the stacked tables
    h = F.embedding_bag(rows, rules["table"].view(R * 9 * C, HIDDEN1), mode="sum")  # (R*H*W, 4): the conv3x3, exact
    h = h.view(R, H * W, HIDDEN1).transpose(1, 2).to(torch.float64, memory_format=torch.contiguous_format)
    h = torch.bmm(rules["w2"], h).relu_()                                           # (R, 16, H*W)
    return torch.bmm(rules["w3"], h)                                                 # (R, C, H*W)


def sample_categorical(logits, u, temperature):
    """Sample from softmax(logits / temperature) along dim 1 by inverse CDF, one uniform u per cell.
    logits (R, C, N), u (R, N) -> states (R, N). temperature 0 is its limit: uniform over the maximal states."""
    best = logits.amax(dim=1, keepdim=True)
    if temperature == 0:
        weights = (logits == best).to(logits.dtype)
    else:
        # states more than 30 nats below the best get weight e^-30 ~ 1e-13, far below what a 24-bit u resolves;
        # the clamp only avoids exp's slow underflow path (at T=1e-4 most logit gaps are thousands of nats)
        weights = (logits - best).div_(temperature).clamp_min_(-30.0).exp_()    # in place: one (R, C, N) buffer
    cdf = weights.cumsum_(dim=1)                                                  # (R, C, N)
    return (cdf < u[:, None, :] * cdf[:, -1:, :]).sum(dim=1).clamp_max(logits.shape[1] - 1)


def initial_grids(grid_seeds, cfg):
    """One logit vector z ~ N(0, I_C) per rollout; every cell samples its state from softmax(z). -> (R, H, W)"""
    z = random_normal(grid_seeds, GRID_LOGITS, cfg.num_colors)                   # (R, C)
    cells = torch.arange(cfg.grid * cfg.grid, device=grid_seeds.device)
    u = random_uniform(grid_seeds[:, None], GRID_CELLS, cells)                   # (R, H*W)
    return sample_categorical(z[:, :, None].expand(-1, -1, len(cells)), u, 1.0).view(-1, cfg.grid, cfg.grid)


def sample_step(logits, noise_seeds, t, temperature):
    """sample_categorical(logits, u, temperature), u the uniforms of step t, bit for bit, ~30% faster (overwrites
    logits). A cell whose best state b is the only one with d = l - best >= -31T takes b whatever u: d is the float64
    sample_categorical computes, so every other d / T < -30 is clamped to -30, weight w = e^-30 < 1e-13 (T = 0:
    l == best, w = 0); the cumulative weights before b are <= C*w < 7e-9 (C < 2^16) < u * total (u >= 2^-25, total
    >= 1), from b on >= 1 > u * total (u <= 1 - 2^-25, total <= 1 + C*w): the inverse CDF counts exactly b states.
    Only the other cells (ties, e.g. all 16 ReLUs 0, and near-ties) draw their u and go through sample_categorical."""
    R, C, N = logits.shape
    bits = C.bit_length()  # code = (number of near states) + 2^bits * (sum of their indices), wrapping harmlessly
    dtype = torch.int16 if C << bits < 2 ** 15 else torch.int64
    d = logits.sub_(logits.amax(dim=1, keepdim=True))                             # (R, C, N), 0 at the best
    weights = (torch.arange(C, device=d.device) << bits | 1).to(dtype).view(C, 1)
    code = (d >= -31 * temperature).mul(weights).sum(dim=1, dtype=dtype)          # (R, N)
    states = (code >> bits).long()
    slow = ((code & (1 << bits) - 1) != 1).view(-1).nonzero()[:, 0]               # undecided cells r * N + n
    r, n = slow // N, slow % N
    cells = d.view(-1)[r * C * N + n + N * torch.arange(C, device=d.device).view(C, 1)]  # (C, cells)
    u = random_uniform(noise_seeds[r], UPDATE_NOISE, t, n)                       # the uniforms step() would draw
    states.view(-1)[slow] = sample_categorical(cells[None], u[None], temperature)[0]
    return states


def step(grid, rules, noise_seeds, t, cfg):
    """One synchronous update of every cell of every grid, plain_step's for each: sample (logits + bias *
    onehot(state)) / temperature, cell (r, n) with uniform random_uniform(noise_seeds[r], UPDATE_NOISE, t, n). On a
    CPU from 2^16 logits (the break-even) by sample_step, else by sample_categorical (a GPU: no host sync)."""
    R, H, W = grid.shape
    logits = rule_logits(grid, rules, cfg.num_colors)
    if cfg.identity_bias:
        logits = logits + cfg.identity_bias * F.one_hot(grid.view(R, H * W), cfg.num_colors).transpose(1, 2)
    if grid.device.type == "cpu" and logits.numel() >= 2 ** 16:
        return sample_step(logits, noise_seeds, t, cfg.temperature).view(R, H, W)
    u = random_uniform(noise_seeds[:, None], UPDATE_NOISE, t, torch.arange(H * W, device=grid.device))
    return sample_categorical(logits, u, cfg.temperature).view(R, H, W)


def rollout(grid, rules, noise_seeds, t, num_frames, cfg, burn_in=0):
    """plain_rollout for a batch of grids (R, H, W), from time t: burn_in updates, then num_frames frames cfg.dT
    updates apart. Returns frames (R, F, H, W), the grid after the last frame and the new time t (to continue later)."""
    frames = []
    for i in range(num_frames):
        for _ in range(burn_in if i == 0 else cfg.dT):
            grid, t = step(grid, rules, noise_seeds, t, cfg), t + 1
        frames.append(grid)
    return torch.stack(frames, dim=1), grid, t


# -----------------------------------------------------------------------------
# 7. Training batches
# A stream is a pure function of (seed, NCAConfig): its i-th rule and grid have the seeds stream_seeds(seed, ., i),
# rejection sampling keeps the accepted rules in index order, so the batches are the same whatever the chunk and the
# device. Its state is a few integers: the number of the first sequence not yet handed out; a restored stream
# simulates again from there, and the same rules are accepted again.

def default_chunk(device):
    """Rules simulated together. 512 measured fastest on a CPU (4096 ran slower per rule: cache). On a GPU a step of 512
    small grids is microseconds of work per kernel launch: 4096 amortises them (not yet measured: bench.py nca)."""
    return 4096 if torch.device(device).type == "cuda" else 512


class NCAStream:
    """An endless stream of (x, y) batches of shape (batch_size, seq_len) of NCA token sequences, each from its own rule
    and initial grid. With num_rules=0 (default) every sequence gets a fresh rule that passed the gzip band; with
    num_rules=N the pool is the first N rules that pass, reused with fresh initial grids epoch after epoch, in a new
    order each epoch (the paper reused 16,000 rules for 10 epochs). y is x shifted by one; the first frame's targets are
    -1 (ignored by the loss): nothing to infer a rule from yet. held_out=True sets the top bit 2^31 of every seed, which
    no training stream's seed has (for evaluation). shuffle=True permutes each sequence's patch tokens
    (shuffle_patches: the shuffled-NCA control).

    Several processes (torchrun) share one stream: process `rank` of `world` takes rule indices (or pool sequence
    numbers) rank, rank + world, rank + 2 world, ... of the stream `seed`. So the ranks never draw the same fresh rule,
    every rank's pool is the same N rules, and together the ranks use the rules one process would."""

    def __init__(self, cfg, batch_size, seq_len, seed=0, device="cpu", num_rules=0, chunk=0,
                 max_rejected=20_000, held_out=False, rank=0, world=1, shuffle=False):
        if seq_len < cfg.frame_len:
            raise ValueError(f"--block_size: a sequence of {seq_len} tokens is shorter than one frame ({cfg.frame_len} "
                             f"tokens), so every target would be masked; use at least {2 * cfg.frame_len}")
        self.cfg, self.batch_size, self.seq_len = cfg, batch_size, seq_len
        if chunk < 0:
            raise ValueError(f"--chunk must be >= 0 (0: {default_chunk('cpu')} on CPU, {default_chunk('cuda')} on "
                             f"a GPU), got {chunk}")
        self.device, self.chunk, self.max_rejected = torch.device(device), chunk or default_chunk(device), max_rejected
        self.num_frames = max(math.ceil((seq_len + 1) / cfg.frame_len), cfg.score_frames)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} processes: need 0 <= rank < world")
        self.seed, self.held_out, self.num_rules, self.shuffle = seed, held_out, num_rules, shuffle
        self.tried = self.accepted = self.next_rule = 0  # next_rule: this rank's number of the next rule to simulate
        self.buffer = []    # accepted sequences not yet handed out (device tensors), so no simulated rule is wasted
        self.buffer_ids = []  # host ints, one per buffered sequence: its rule number, or its pool sequence number
        self.share = (0, 1)  # (rank, world): the pool is the first N rules of the whole stream, the same on every rank
        self.pool = self.filter_rules(num_rules) if num_rules else None  # rule seeds (num_rules,) on the device
        self.share = (rank, world)
        self.next_sequence, self.pool_order = 0, (None, None)  # pool: next sequence number; (epoch, its order)

    def seeds(self, stream, index):
        """The seeds of rules or grids number `index` (an int64 tensor on the device) of this stream."""
        return stream_seeds(self.seed, stream, index, self.held_out)

    def filter_rules(self, n):
        """The seeds of the first n rules whose gzip ratio is in the band (a line every 10 s while it searches)."""
        kept, start, last = [], time.time(), time.time()
        while len(kept) < n:
            kept += self.fresh_rules()[0][:n - len(kept)]
            if time.time() - last > 10:
                last, rate = time.time(), len(kept) / (time.time() - start)
                print(f"NCA pool: {len(kept):,} of {n:,} rules, ETA {(n - len(kept)) / rate:.0f}s", flush=True)
        return self.seeds(RULE_SEEDS, torch.tensor(kept, device=self.device))

    def accept(self, ratios):
        """The rules in the band (a mask); counts them, and stops a band that accepts nothing."""
        keep = in_band(ratios, self.cfg)
        self.tried, self.accepted = self.tried + len(keep), self.accepted + int(keep.sum())
        if self.accepted == 0 and self.tried >= self.max_rejected:
            raise RuntimeError(
                f"--band ({self.cfg.band_lo}, {self.cfg.band_hi}) accepted none of {self.tried:,} random rules (ratios "
                f"ranged {ratios.min():.3f}..{ratios.max():.3f} in the last chunk); widen the band, or see the "
                f"distribution with: python study.py stats --num_colors {self.cfg.num_colors} --rules 2000")
        return keep

    def fresh_rules(self):
        """Score the next chunk of this rank's rules. Returns the numbers of the accepted ones (host ints, ascending),
        their rows in the chunk (a device index tensor), the chunk's grid seeds and score_rules' outputs. The decision
        is made on the host (gzip), so rows are picked by index_select, never a device mask (which waits for the GPU's
        row count). This rank's rule number j is rule index j * world + rank of the stream."""
        rank, world = self.share
        index = torch.arange(self.next_rule, self.next_rule + self.chunk, device=self.device) * world + rank
        grid_seeds = self.seeds(GRID_SEEDS, index)
        scored = score_rules(self.seeds(RULE_SEEDS, index), grid_seeds, self.cfg)
        keep = np.flatnonzero(self.accept(scored[0]))
        accepted = (self.next_rule + keep).tolist()
        self.next_rule += self.chunk
        return accepted, torch.from_numpy(keep).to(self.device), grid_seeds, scored

    def fresh_sequences(self):
        """The accepted rules of the next chunk, continued to full length. -> frames, their rule indices"""
        accepted, rows, grid_seeds, (_, frames, grid, t, rules) = self.fresh_rules()
        frames, frames_left = frames.index_select(0, rows), self.num_frames - self.cfg.score_frames
        if frames_left > 0 and accepted:
            grid, grid_seeds = grid.index_select(0, rows), grid_seeds.index_select(0, rows)
            rules = {k: v.index_select(0, rows) for k, v in rules.items()}
            continued, _, _ = rollout(grid, rules, grid_seeds, t, frames_left + 1, self.cfg)
            frames = torch.cat([frames, continued[:, 1:]], dim=1)  # continued[:, 0] repeats the last scoring frame
        return frames, accepted

    def epoch_order(self, epoch):
        """The order of the pool in an epoch: a permutation (on the host) sorted by random bits of (seed, epoch)."""
        if self.pool_order[0] != epoch:
            keys = random_bits(self.seed, POOL_ORDER, epoch, torch.arange(len(self.pool)))
            self.pool_order = (epoch, torch.argsort(keys, stable=True))
        return self.pool_order[1]

    def pool_sequences(self):
        """The next pool sequences of this rank, up to a chunk and never past the epoch's end. Sequence g of the stream
        is rule order(g // N)[g % N] of the pool with the initial grid of seed stream_seeds(seed, POOL_GRIDS, g); this
        rank's sequence number k is g = k * world + rank. -> frames, this rank's sequence numbers"""
        N, k = len(self.pool), self.next_sequence
        rank, world = self.share
        stream_numbers = torch.arange(k, k + self.chunk) * world + rank           # on the host
        epoch = int(stream_numbers[0]) // N
        stream_numbers = stream_numbers[stream_numbers // N == epoch]             # never past the epoch's end
        pool_index = self.epoch_order(epoch)[stream_numbers % N]
        self.next_sequence += len(pool_index)
        rules = sample_rules(self.pool.index_select(0, pool_index.to(self.device)), self.cfg.num_colors)
        grid_seeds = self.seeds(POOL_GRIDS, stream_numbers.to(self.device))
        frames = rollout(initial_grids(grid_seeds, self.cfg), rules, grid_seeds, 0, self.num_frames, self.cfg,
                         burn_in=self.cfg.burn_in)[0]
        return frames, list(range(k, k + len(pool_index)))

    def next_batch(self):
        """The next (x, y) batch: inputs_and_targets of the next sequences."""
        return inputs_and_targets(self.next_sequences(), self.cfg)

    def next_sequences(self):
        """The next batch_size token sequences of seq_len + 1 tokens (patch tokens permuted with shuffle)."""
        while len(self.buffer_ids) < self.batch_size:
            frames, ids = self.pool_sequences() if self.pool is not None else self.fresh_sequences()
            if ids:
                self.buffer.append(encode(frames, self.cfg)[:, :self.seq_len + 1])
                self.buffer_ids += ids
        sequences = torch.cat(self.buffer)
        batch, left_over = sequences[:self.batch_size], sequences[self.batch_size:]
        self.buffer = [left_over] if len(left_over) else []
        del self.buffer_ids[:self.batch_size]
        return shuffle_patches(batch, self.cfg) if self.shuffle else batch

    def state_dict(self):
        """Where the stream stands, in python ints (no tensors, no host copies): the first sequence not yet handed
        out, as a rule index (next_rule) or a pool place (pool_epoch, pool_pos), and the counters of the rules before
        it. The buffer is not saved: load_state_dict simulates it again."""
        if self.pool is not None:
            epoch, pos = divmod(self.buffer_ids[0] if self.buffer_ids else self.next_sequence, len(self.pool))
            next_rule, tried, accepted = self.next_rule, self.tried, self.accepted
        else:  # every accepted rule from the first buffered one on is in the buffer
            next_rule = self.buffer_ids[0] if self.buffer_ids else self.next_rule
            tried, accepted = self.tried - (self.next_rule - next_rule), self.accepted - len(self.buffer_ids)
            epoch = pos = 0
        return {"seed": self.seed, "held_out": self.held_out, "num_rules": self.num_rules, "next_rule": next_rule,
                "pool_epoch": epoch, "pool_pos": pos, "tried": tried, "accepted": accepted}

    def load_state_dict(self, state):
        """Continue from state_dict's position: the next batches are those the saved stream would have made."""
        for key in ("seed", "held_out", "num_rules"):
            if state[key] != getattr(self, key):
                raise ValueError(f"the saved NCA stream has {key}={state[key]}, this one {getattr(self, key)}: "
                                 f"resume with the same settings")
        self.tried, self.accepted, self.next_rule = state["tried"], state["accepted"], state["next_rule"]
        self.next_sequence = state["pool_epoch"] * self.num_rules + state["pool_pos"]
        self.buffer, self.buffer_ids = [], []

    def __iter__(self):
        return iter(self.next_batch, None)  # endless: next_batch never returns None
