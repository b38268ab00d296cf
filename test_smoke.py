"""
Smoke tests: CPU only, tiny configs, seconds each. Run: python -m pytest -q test_smoke.py
Sections: nca.py, model.py, data/, train.py.
"""
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

# =============================================================================
# nca.py: the NCA data engine

import gzip as gzip_module

import bench
import nca
import safety
import study
from nca import NCAConfig, NCAStream


def test_token_ids_of_a_hand_built_grid_match_the_formula():
    cfg = NCAConfig(grid=4, num_colors=10, patch=2)
    grid = torch.tensor([[1, 2, 3, 4],
                         [5, 6, 7, 8],
                         [9, 0, 1, 2],
                         [3, 4, 5, 6]])
    ids = nca.encode(grid.view(1, 1, 4, 4), cfg)[0].tolist()
    # patches row-major; within a patch: top-left * C^0 + top-right * C^1 + bottom-left * C^2 + bottom-right * C^3
    assert ids == [10000, 1 + 2 * 10 + 5 * 100 + 6 * 1000, 3 + 4 * 10 + 7 * 100 + 8 * 1000,
                   9 + 0 * 10 + 3 * 100 + 4 * 1000, 1 + 2 * 10 + 5 * 100 + 6 * 1000, 10001]
    assert cfg.vocab_size == 10002 and NCAConfig().frame_len == 38


def test_rollout_shapes_id_bounds_and_round_trip():
    cfg = NCAConfig(grid=6, num_colors=3, patch=3)
    seeds = torch.arange(5)
    frames, grid, t = nca.rollout(nca.initial_grids(seeds, cfg), nca.sample_rules(seeds, cfg.num_colors), seeds,
                                  0, 7, cfg, burn_in=cfg.burn_in)
    assert frames.shape == (5, 7, 6, 6) and t == cfg.burn_in + 6
    assert torch.equal(grid, frames[:, -1])
    tokens = nca.encode(frames, cfg)
    assert tokens.shape == (5, 7 * cfg.frame_len)
    assert tokens.min() >= 0 and tokens.max() < cfg.vocab_size
    assert torch.equal(nca.decode(tokens, cfg), frames)
    random_frames = torch.randint(0, 3, (4, 2, 6, 6))
    assert torch.equal(nca.decode(nca.encode(random_frames, cfg), cfg), random_frames)


def test_engine_rollouts_equal_the_plain_rule():
    """nca.rollout (table lookup, bmm, sample_step or sample_categorical, thousands of rules at once) must give
    nca.plain_rollout's states (conv2d, matmuls, softmax, one rule at a time) exactly, state for state: 256 rules at
    10 and at 4 colours, and 64 with an identity bias, dT=2 and at temperature 0. Tolerance none: the conv3x3 sums
    are exact in both, and the rest is float64, whose rounding moves a sample only for a u within ~1e-11 of a bound."""
    for cfg, n in ((NCAConfig(), 256), (NCAConfig(num_colors=4), 256),
                   (NCAConfig(grid=8, identity_bias=0.3, dT=2), 64), (NCAConfig(grid=8, temperature=0.0), 64)):
        seeds = torch.arange(n) + 1000
        rules, grids = nca.sample_rules(seeds, cfg.num_colors), nca.initial_grids(seeds, cfg)
        frames = nca.rollout(grids, rules, seeds, 0, 10, cfg, burn_in=cfg.burn_in)[0]      # (R, 10, H, W)
        for r in range(n):
            rule = {k: v[r] for k, v in rules.items()}
            assert torch.equal(nca.plain_rollout(grids[r], rule, seeds[r], 10, cfg), frames[r]), (cfg, r)
    n_params = sum(rules[k][0].numel() for k in ("w1", "w2", "w3")) + 4 + 16 + 10  # + the zero biases
    assert n_params == 614


def test_rule_weights_are_lecun_normal():
    """Untruncated normals with std 1/sqrt(fan_in), as sample_rules' docstring states (Flax's lecun_normal, which
    the authors' code used, truncates at 2 sigma: none of its weights would lie beyond)."""
    rules = nca.sample_rules(torch.arange(2000), 10)
    for name, fan_in in (("table", 90), ("w2", 4), ("w3", 16)):
        w = rules[name].double() * math.sqrt(fan_in)
        assert abs(w.mean().item()) < 0.01 * math.sqrt(fan_in)
        assert abs(w.std().item() - 1) < 0.02, name
        assert (w.abs() > 2).double().mean().item() == pytest.approx(0.0455, abs=0.005), name  # P(|z| > 2)


def test_same_seed_same_rule_and_rollout_whatever_the_batch():
    cfg = NCAConfig(grid=6, num_colors=4)
    alone = nca.sample_rules(torch.tensor([42]), 4)
    in_batch = nca.sample_rules(torch.tensor([7, 42, 9]), 4)
    for k in alone:
        assert torch.equal(alone[k][0], in_batch[k][1])
    other = nca.sample_rules(torch.tensor([43]), 4)
    assert not torch.equal(alone["table"], other["table"])
    a = NCAStream(cfg, batch_size=4, seq_len=64, seed=5, chunk=16).next_batch()
    b = NCAStream(cfg, batch_size=4, seq_len=64, seed=5, chunk=16).next_batch()
    c = NCAStream(cfg, batch_size=4, seq_len=64, seed=6, chunk=16).next_batch()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_temperature_zero_is_argmax_and_tiny_temperature_is_nearly():
    cfg0, cfg = NCAConfig(grid=8, temperature=0.0), NCAConfig(grid=8)
    seeds = torch.arange(64)
    rules, grid = nca.sample_rules(seeds, 10), nca.initial_grids(seeds, cfg)
    argmax = nca.rule_logits(grid, rules, 10).argmax(dim=1).view_as(grid)
    assert torch.equal(nca.step(grid, rules, seeds, 0, cfg0), argmax)
    assert (nca.step(grid, rules, seeds, 0, cfg) == argmax).float().mean() > 0.99
    hot = NCAConfig(grid=8, temperature=100.0)  # nearly uniform: the noise must show
    assert (nca.step(grid, rules, seeds, 0, hot) == argmax).float().mean() < 0.5


def test_gzip_ratio_is_the_gzip_module_definition():
    ids = torch.randint(0, 10000, (3, 10, 36))
    ids[1] = 7  # a dead rule: compresses to almost nothing
    ratios = nca.gzip_ratio(ids)
    for r in range(3):
        raw = ids[r].numpy().astype("<i4").tobytes()
        assert len(raw) == 1440
        assert ratios[r] == len(gzip_module.compress(raw, compresslevel=9)) / len(raw)
    assert ratios[1] < 0.05 < ratios[0]
    many = torch.randint(0, 10000, (37, 10, 36)) % (torch.arange(37) * 300 + 1).view(37, 1, 1)  # ratios rise by row
    assert (nca.gzip_ratio(many, threads=1) == nca.gzip_ratio(many, threads=4)).all()  # threads split rows, in order


def test_throughput_measure_reports_every_number():
    cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)
    speed = bench.measure_throughput(cfg, "cpu", batch_size=4, seq_len=64, seconds=0.4, chunk=32)
    assert speed["raw"] > 0 and speed["filtered"] > 0 and speed["gzip_rules"] > 0
    assert 0 < speed["acceptance"] <= 1 and speed["rules_tried"] >= 4
    assert speed["gzip_ceiling"] == pytest.approx(speed["gzip_rules"] * speed["acceptance"] * 64)


def test_stream_batches_mask_the_first_frame_and_respect_the_band():
    cfg = NCAConfig(grid=12, num_colors=10)
    stream = NCAStream(cfg, batch_size=6, seq_len=400, seed=0, chunk=32)
    x, y = stream.next_batch()
    n = cfg.frame_len
    assert x.shape == y.shape == (6, 400)
    assert torch.equal(x[:, n:], y[:, n - 1:-1])                  # y is x shifted by one ...
    assert (y[:, :n - 1] == -1).all()                             # ... but the first frame's targets are masked
    assert (y[:, n - 1:] >= 0).all()                              # everything after, delimiters too, is predicted
    assert (y[:, n - 1] == cfg.start_token).all()                 # the second frame's START is the first target
    assert (x[:, 0] == cfg.start_token).all() and (x[:, n - 1] == cfg.end_token).all()
    # the sequence's first frames are the very frames the rule was scored on: re-score them from the tokens
    tokens = torch.cat([x, y[:, -1:]], dim=1)[:, :cfg.score_frames * n]
    ratios = nca.gzip_ratio(nca.patch_ids(nca.decode(tokens, cfg), cfg))
    assert ((ratios > cfg.band_lo) & (ratios < cfg.band_hi)).all()
    assert 0 < stream.accepted < stream.tried


def test_stream_pool_reuses_its_rules_with_fresh_grids():
    cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)
    stream = NCAStream(cfg, batch_size=8, seq_len=40, seed=0, num_rules=3, chunk=16)
    assert len(stream.pool) == 3
    first = nca.sample_rules(stream.pool, 4)
    seen = set(stream.pool.tolist())
    x, _ = stream.next_batch()
    assert x.shape == (8, 40) and stream.tried == 16  # no new rules were drawn after the pool
    assert len(seen) == 3 and torch.equal(nca.sample_rules(stream.pool, 4)["table"], first["table"])


BAND_TEST = NCAConfig(grid=6, num_colors=4, band_lo=0.2, band_hi=0.9)  # accepts about half of these rules
TINY_NCA_TEST = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)


def take(stream, n=4):
    return [stream.next_batch() for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_stream_is_the_same_whatever_the_chunk():
    """Rule i has seeds stream_seeds(seed, ., i): chunk 64 on a laptop and 4096 on a GPU give the same batches."""
    for num_rules in (0, 5):  # fresh rules; a pool of 5 (batches of 8 span epochs, each in its own order)
        runs = [take(NCAStream(BAND_TEST, batch_size=8, seq_len=60, seed=3, num_rules=num_rules, chunk=chunk))
                for chunk in (64, 512, 4096)]
        assert same_batches(runs[0], runs[1]) and same_batches(runs[0], runs[2])
    stream = NCAStream(BAND_TEST, batch_size=8, seq_len=60, seed=3, chunk=64)
    take(stream)
    assert 0 < stream.accepted < stream.tried  # the band rejected some: accepted rules kept their order


def tf32(x):
    """x as a GPU matmul with TF32 reads it: float32 with the low 13 of 23 mantissa bits cleared; others as they are."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32) if x.dtype == torch.float32 else x


def test_rule_rollouts_are_unchanged_by_tf32_and_autocast(monkeypatch):
    """At temperature 1e-4 a tiny change of a logit flips the sampled state, so every product is float64 (and the
    lookup sums are exact in float32; embedding_bag is not a matmul, so TF32 never touches it)."""
    cfg, seeds = NCAConfig(), torch.arange(300)

    def rollouts():
        grid = nca.initial_grids(seeds, cfg)
        return nca.rollout(grid, nca.sample_rules(seeds, cfg.num_colors), seeds, 0, 10, cfg, burn_in=cfg.burn_in)[0]

    exact = rollouts()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would run a float32 bmm in bf16
        assert torch.equal(rollouts(), exact)
    bmm, matmul = torch.bmm, torch.matmul
    monkeypatch.setattr(torch, "bmm", lambda a, b, **kw: bmm(tf32(a), tf32(b), **kw))
    monkeypatch.setattr(torch, "matmul", lambda a, b, **kw: matmul(tf32(a), tf32(b), **kw))
    assert torch.equal(rollouts(), exact)


def test_stream_state_is_plain_numbers_and_resumes_exactly():
    for num_rules in (0, 5):
        stream = NCAStream(BAND_TEST, batch_size=6, seq_len=60, seed=2, num_rules=num_rules, chunk=64)
        stream.next_batch()
        assert stream.buffer  # the chunk made more sequences than the batch took: they wait in the buffer
        state = stream.state_dict()
        assert all(type(v) in (int, float, bool) for v in state.values())
        state = json.loads(json.dumps(state))  # plain numbers: saved anywhere, loaded on any device
        expected = take(stream, 3)
        restored = NCAStream(BAND_TEST, batch_size=6, seq_len=60, seed=2, num_rules=num_rules, chunk=16)
        restored.load_state_dict(state)
        assert same_batches(take(restored, 3), expected)
    with pytest.raises(ValueError, match="seed"):
        NCAStream(BAND_TEST, batch_size=6, seq_len=60, seed=9).load_state_dict(state)


def test_held_out_seeds_are_disjoint_from_training_seeds():
    index = torch.arange(100_000)
    for stream in (nca.RULE_SEEDS, nca.GRID_SEEDS):
        train, held_out = nca.stream_seeds(7, stream, index), nca.stream_seeds(7, stream, index, held_out=True)
        assert train.min() >= 0 and train.max() < 2 ** 31 <= held_out.min() and held_out.max() < 2 ** 32
        assert len(train.unique()) > 0.99 * len(index)  # 31 random bits: few repeats
    a = NCAStream(TINY_NCA_TEST, batch_size=4, seq_len=40, seed=7, chunk=16)
    b = NCAStream(TINY_NCA_TEST, batch_size=4, seq_len=40, seed=7, chunk=16, held_out=True)
    assert (b.seeds(nca.RULE_SEEDS, index) >= 2 ** 31).all() and (a.seeds(nca.RULE_SEEDS, index) < 2 ** 31).all()
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_bad_arguments_fail_fast_with_a_message():
    cases = [(dict(grid=10, patch=3), "--patch"), (dict(band_lo=0.6, band_hi=0.5), "--band"),
             (dict(band_hi=1.5), "--band"), (dict(num_colors=1), "--num_colors"),
             (dict(num_colors=10, patch=3), "--num_colors"), (dict(temperature=-1.0), "--temperature")]
    for kwargs, flag in cases:
        with pytest.raises(ValueError, match=flag):
            safety.check_nca_config(NCAConfig(**kwargs))
    with pytest.raises(ValueError, match="--block_size"):
        NCAStream(NCAConfig(), batch_size=2, seq_len=20)
    narrow = NCAConfig(grid=6, num_colors=4, band_lo=0.999, band_hi=1.0)
    with pytest.raises(RuntimeError, match="accepted none"):
        NCAStream(narrow, batch_size=2, seq_len=64, chunk=64, max_rejected=256).next_batch()


def test_command_line_stats_prints_deciles_and_acceptance(capsys):
    study.main(["stats", "--device", "cpu", "--rules", "64", "--grid", "6", "--num_colors", "4", "--band", "0.2",
                "0.9"])
    out = capsys.readouterr().out
    deciles = [float(v) for v in out.split("gzip_deciles:")[1].split("\n")[0].split()]
    assert len(deciles) == 11 and deciles == sorted(deciles)
    assert 0 <= float(out.split("accept_rate:")[1].split()[0]) <= 1
    with pytest.raises(SystemExit, match="--patch"):
        study.main(["stats", "--device", "cpu", "--grid", "7"])  # the patch does not divide the grid


def test_stats_quantiles_print_bands_ready_to_paste(capsys):
    study.main(["stats", "--device", "cpu", "--rules", "64", "--grid", "6", "--num_colors", "4", "--quantiles", "0.3",
                "0.6", "0.8",
                "1.0"])
    out = capsys.readouterr().out
    assert len(out.split("gzip_quantiles:")[1].split("\n")[0].split()) == 4
    for name in ("low", "middle", "high"):
        lo, hi = map(float, out.split(f"{name}: --band ")[1].split()[:2])
        safety.check_nca_config(NCAConfig(grid=6, num_colors=4, band_lo=lo, band_hi=hi))  # a valid --band
    # 30 tied dead ratios, then 70 spread ones: a band whose lower quantile is the tie leaves the tied rules out
    ratios = np.array([0.02] * 30 + list(np.linspace(0.1, 0.4, 70)))
    values, bands = study.quantile_bands(ratios, [0.0, 0.1, 0.2, 0.6, 1.0])
    assert values[1] == values[2] == 0.02
    assert bands[0][2:4] == (0.0, 0.02) and bands[-1][3] == 1.0  # quantiles 0 and 1 open the band to the limits
    assert bands[1][2] >= bands[1][3]  # quantiles 0.1 and 0.2 are equal: no band between them
    assert bands[2][2:] == (0.02, 0.227, 0.30)  # ratios 0.02 < r < 0.227: the 30 spread ones below quantile 0.6
    for bad in (["--quantiles", "0.5", "0.2"], ["--quantiles", "1.5"], ["--rules", "0"]):  # descending, out of [0, 1]
        with pytest.raises(SystemExit, match="--quantiles|--rules"):
            study.main(["stats", "--device", "cpu", *bad])



def test_fast_sampler_is_the_inverse_cdf_bit_for_bit():
    """nca.sample_step must return sample_categorical's states for every cell: decided cells (best state alone within
    31T), exact ties, near-ties around the 30T clamp, T=0 and a hot T where almost no cell is decided, C of 3, 10,
    100 (the int16 code wraps in undecided cells) and 300 (the int64 code)."""
    gen = torch.Generator().manual_seed(0)
    for C, T in ((10, 1e-4), (10, 0.0), (10, 1.0), (3, 1e-4), (100, 1.0), (300, 1e-4), (300, 0.0)):
        logits = torch.randn(8, C, 50, generator=gen, dtype=torch.float64)
        logits[:, :, :5] = 0.0                                                   # all C states tied
        logits[:, 1, 5:25] = logits[:, 0, 5:25] + T * torch.linspace(-33, 3, 20, dtype=torch.float64)  # near-ties
        logits[:, 2, 25:30] = logits[:, 0, 25:30]                                 # two tied best states
        seeds = torch.arange(8) * 7 + 3
        u = nca.random_uniform(seeds[:, None], nca.UPDATE_NOISE, 5, torch.arange(50))
        expected = nca.sample_categorical(logits, u, T)
        assert torch.equal(nca.sample_step(logits.clone(), seeds, 5, T), expected), (C, T)


def test_nca_and_model_each_stand_alone(tmp_path):
    """nca.py and model.py import only torch, numpy and the standard library: each, copied alone into an empty
    folder, imports there."""
    for name in ("nca", "model"):
        (tmp_path / name).mkdir()
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py"), tmp_path / name)
        subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path / name, check=True,
                       env={**os.environ, "PYTHONPATH": ""})

# =============================================================================
# model.py

import time

from model import GPT, GROUPS, KVCache, ModelConfig, param_group, transfer
from safety import estimate_memory

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**TINY, **overrides}))


def random_batch(vocab_size=64, B=2, T=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (B, T), generator=g)
    targets = torch.randint(0, vocab_size, (B, T), generator=g)
    return idx, targets


def test_shapes_and_initial_loss():
    model = tiny_model(vocab_size=257)
    idx, targets = random_batch(vocab_size=257)
    logits, loss = model(idx, targets)
    assert logits.shape == (2, 16, 257)
    assert abs(loss.item() - math.log(257)) < 0.3
    logits, loss = model(idx)
    assert logits.shape == (2, 1, 257) and loss is None
    full, _ = model(idx, targets)
    torch.testing.assert_close(logits[:, 0], full[:, -1])


def test_sequence_longer_than_block_size_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_hf_names_no_biases_and_residual_init():
    model = tiny_model(n_layer=4, n_embd=64, n_head=4)
    names = set(dict(model.named_parameters()))
    assert {"embed_tokens.weight", "norm.weight", "lm_head.weight", "layers.0.input_layernorm.weight",
            "layers.0.post_attention_layernorm.weight", "layers.0.mlp.gate_proj.weight",
            "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"} <= names
    assert {f"layers.3.self_attn.{p}_proj.weight" for p in "qkvo"} <= names
    assert not any("bias" in n for n in names)
    assert model.lm_head.weight.data_ptr() != model.embed_tokens.weight.data_ptr()
    assert model.layers[0].mlp.gate_proj.weight.shape == (192, 64)  # 2/3*4*64 = 170 -> 192 (multiple of 32)
    assert not any("rope" in k for k in model.state_dict())  # rotary tables are not saved
    residual_std = 0.02 / math.sqrt(2 * 4)
    assert abs(model.layers[0].self_attn.o_proj.weight.std().item() - residual_std) < 0.1 * residual_std
    assert abs(model.layers[1].mlp.down_proj.weight.std().item() - residual_std) < 0.1 * residual_std
    assert abs(model.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002


def test_num_params_and_flops():
    model = tiny_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == total - 64 * 32
    assert model.flops_per_token() == 6 * (total - 64 * 32) + 12 * 2 * 32 * 32


def test_loss_falls_on_fixed_batch():
    model = tiny_model()
    idx, targets = random_batch()
    optimizer = model.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    _, first = model(idx, targets)
    for _ in range(20):
        _, loss = model(idx, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert loss.item() < first.item() - 1.0


def test_causal():
    model = tiny_model()
    idx, targets = random_batch()
    before, _ = model(idx, targets)
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    after, _ = model(changed, targets)
    torch.testing.assert_close(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_ignore_index_positions_do_not_count():
    model = tiny_model()
    idx, targets = random_batch()
    targets[:, :5] = -1
    logits, loss = model(idx, targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 64), targets[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)
    other = targets.clone()
    other[0, 6] = -1
    _, loss_other = model(idx, other)
    assert not torch.allclose(loss, loss_other)


def test_transfer_carries_all_but_embedding_and_head():
    source = tiny_model(seed=0, vocab_size=10002)
    logged = []
    model = transfer(source.state_dict(), ModelConfig(**{**TINY, "vocab_size": 257, "block_size": 64}),
                     log=logged.append)
    old = source.state_dict()
    for name, tensor in model.state_dict().items():
        if param_group(name) in ("embedding", "head"):
            assert tensor.shape[0] == 257
        else:
            assert torch.equal(tensor, old[name]), name
    assert len(logged) == 1 and "carried attention (8 tensors" in logged[0]
    assert "re-initialised embedding" in logged[0] and "head" in logged[0]
    assert all(p.requires_grad for p in model.parameters())


def test_transfer_reinit_attention_and_same_vocab_embedding_is_fresh():
    source = tiny_model(seed=0)
    torch.manual_seed(123)  # a different init stream from the source
    model = transfer(source.state_dict(), source.config, reinit=("embedding", "head", "attention"), log=lambda s: None)
    old = source.state_dict()
    for name, tensor in model.state_dict().items():
        if param_group(name) in ("embedding", "head", "attention"):
            assert not torch.equal(tensor, old[name]), name
        else:
            assert torch.equal(tensor, old[name]), name


def test_transfer_freeze():
    source = tiny_model()
    model = transfer(source.state_dict(), source.config, freeze=("attention", "norm"), log=lambda s: None)
    for name, p in model.named_parameters():
        assert p.requires_grad == (param_group(name) not in ("attention", "norm")), name
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(g["weight_decay"] == 0.1 and p.dim() >= 2 or g["weight_decay"] == 0.0 and p.dim() < 2
               for g in optimizer.param_groups for p in g["params"])


def test_transfer_errors():
    source = tiny_model()
    with pytest.raises(ValueError, match=r"(?s)n_embd differs.*32.*64"):
        transfer(source.state_dict(), ModelConfig(**{**TINY, "n_embd": 64}), log=lambda s: None)
    with pytest.raises(ValueError, match="n_layer differs"):
        transfer(source.state_dict(), ModelConfig(**{**TINY, "n_layer": 3}), log=lambda s: None)
    with pytest.raises(ValueError, match="n_layer differs"):  # unexpected extra layer in the checkpoint
        transfer(source.state_dict(), ModelConfig(**{**TINY, "n_layer": 1}), log=lambda s: None)
    with pytest.raises(ValueError, match="vocab_size differs"):
        transfer(source.state_dict(), ModelConfig(**{**TINY, "vocab_size": 257}), reinit=(), log=lambda s: None)
    with pytest.raises(ValueError, match=r"valid groups are embedding, head, attention, mlp, norm"):
        transfer(source.state_dict(), source.config, reinit=("attn",), log=lambda s: None)
    with pytest.raises(ValueError, match="freeze"):
        transfer(source.state_dict(), source.config, freeze=("mlps",), log=lambda s: None)


def test_param_group_covers_every_parameter():
    model = tiny_model()
    groups = {param_group(n) for n, _ in model.named_parameters()}
    assert groups == set(GROUPS)
    assert param_group("model.layers.0.self_attn.q_proj.weight") == "attention"
    with pytest.raises(ValueError):
        param_group("layers.0.something.weight")


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"--n_embd=30 is not divisible by --n_head=4"):
        safety.check_model_config(ModelConfig(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match=r"(?s)12/4 = 3 is odd.*multiple of 2\*n_head = 8"):
        safety.check_model_config(ModelConfig(**{**TINY, "n_embd": 12, "n_head": 4}))
    with pytest.raises(ValueError, match=r"n_embd=12 must be a multiple of 2 \* n_head = 8"):  # GPT's own check
        GPT(ModelConfig(**{**TINY, "n_embd": 12, "n_head": 4}))
    with pytest.raises(ValueError, match=r"--n_layer=0 must be positive"):
        safety.check_model_config(ModelConfig(n_layer=0))
    with pytest.raises(ValueError, match=r"--dropout=1.0"):
        safety.check_model_config(ModelConfig(dropout=1.0))
    safety.check_model_config(ModelConfig())


def test_generate():
    model = tiny_model().eval()
    idx, _ = random_batch(B=3, T=5)
    out = model.generate(idx, 7, temperature=0)
    assert out.shape == (3, 12) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, model.generate(idx, 7, temperature=0))
    nucleus = model.generate(idx, 7, temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(nucleus, out)
    sample = lambda seed: model.generate(idx, 7, top_p=0.9, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(1), sample(1))
    long = model.generate(idx, 40, temperature=0)  # longer than block_size: context is cropped
    assert long.shape == (3, 45)


def test_generate_stops_when_every_row_has_stop_token():
    model = tiny_model().eval()
    idx, _ = random_batch(B=1, T=5)
    first = model.generate(idx, 1, temperature=0)[0, -1].item()
    out = model.generate(idx, 10, temperature=0, stop_token=first)
    assert out.shape == (1, 6)
    idx2, _ = random_batch(B=2, T=5)
    greedy = model.generate(idx2, 10, temperature=0)
    stop = greedy[0, 5].item()
    out = model.generate(idx2, 10, temperature=0, stop_token=stop)
    if stop in greedy[1, 5:].tolist():  # stops once row 1 produces it too; row 0 is padded with stop
        assert (out[0, 6:] == stop).all()
    else:
        assert out.shape == (2, 15)


def test_kv_cache_logits_equal_the_full_forward():
    model = tiny_model().eval()
    idx, targets = random_batch(B=3, T=20)
    full, _ = model(idx, targets)  # (B, T, V): the logits at every position
    caches = [KVCache(max_len=20) for _ in model.layers]
    with torch.no_grad():
        logits, _ = model(idx[:, :7], kv_caches=caches)  # prefill 7 positions, then one token at a time
        steps = [logits] + [model(idx[:, t:t + 1], kv_caches=caches)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 6:], rtol=1e-5, atol=1e-5)
    assert caches[0].length == 20 and caches[1].keys.shape == (3, 2, 20, 16)
    with torch.no_grad(), pytest.raises(ValueError, match="one token at a time"):
        model(idx[:, :2], kv_caches=caches)
    with torch.no_grad(), pytest.raises(ValueError, match="KV cache full"):
        model(idx[:, :1], kv_caches=caches)


def test_kv_cache_generate_equals_the_plain_loop():
    """Same tokens with and without the cache: greedy, seeded sampling, prompts up to and past block_size (32),
    where the context slides and the cache gives way to the plain path, and stop_token."""
    model = tiny_model().eval()
    for T in (1, 5, 20, 31, 32, 40):
        idx, _ = random_batch(B=3, T=T, seed=T)
        greedy = model.generate(idx, 25, temperature=0, use_cache=False)
        assert torch.equal(model.generate(idx, 25, temperature=0), greedy), T
        for top_p in (1.0, 0.9):
            sample = [model.generate(idx, 25, temperature=0.8, top_p=top_p, use_cache=use_cache,
                                     generator=torch.Generator().manual_seed(T)) for use_cache in (True, False)]
            assert torch.equal(sample[0], sample[1]), (T, top_p)
        stop = greedy[1, T + 2].item()  # row 1 stops after 3 tokens; the loop ends when every row has stopped
        outs = [model.generate(idx, 25, temperature=0, stop_token=stop, use_cache=use_cache)
                for use_cache in (True, False)]
        assert torch.equal(outs[0], outs[1]) and (outs[0][1, T + 2:] == stop).all(), T


def test_kv_cache_timing():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=257, block_size=256, n_layer=2, n_head=4, n_embd=64)).eval()
    idx, _ = random_batch(vocab_size=257, B=2, T=16)
    seconds, outs = {}, {}
    for use_cache in (True, False):
        t0 = time.time()
        outs[use_cache] = model.generate(idx, 200, temperature=0, use_cache=use_cache)
        seconds[use_cache] = time.time() - t0
    assert torch.equal(outs[True], outs[False]) and outs[True].shape == (2, 216)
    print(f"generate 200 tokens: {seconds[True]:.2f} s with the KV cache, {seconds[False]:.2f} s without "
          f"({seconds[False] / seconds[True]:.1f}x)")


def saved_for_backward_bytes(model, idx, targets, autocast):
    """Bytes of the distinct tensors one forward keeps for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(idx, targets)
    return sum(storages.values())


def test_estimate_memory_activations_match_what_autograd_saves():
    for overrides in (dict(block_size=64, n_layer=3, n_head=2, n_embd=96, ffn_dim=200, vocab_size=300),
                      dict(block_size=128, n_layer=2, n_head=4, n_embd=128, vocab_size=512)):
        model = tiny_model(**overrides)
        cfg = model.config
        idx, targets = random_batch(vocab_size=cfg.vocab_size, B=3, T=cfg.block_size)
        for dtype in ("float32", "bfloat16"):
            memory = estimate_memory(cfg, 3, dtype)
            assert memory["weights"] == 4 * model.num_params()
            # saved: the activations, autocast's weight copies and the float32 log-probabilities (B*T*V)
            expected = memory["activations"] + memory["autocast_weights"] + 4 * 3 * cfg.block_size * cfg.vocab_size
            measured = saved_for_backward_bytes(model, idx, targets, autocast=dtype != "float32")
            assert abs(expected / measured - 1) < 0.01, (overrides, dtype, expected, measured)
    # the paper's width: 34C + 8H + 4nh + 8 bytes per token and layer in bf16; 132.6 KiB was measured on a GPU
    paper = ModelConfig(n_layer=24, n_embd=2048, n_head=16, ffn_dim=8192, block_size=1024)
    per_token_layer = estimate_memory(paper, 8)["per_token_layer"]
    assert per_token_layer == 34 * 2048 + 8 * 8192 + 4 * 16 + 8
    assert abs(per_token_layer / (132.6 * 1024) - 1) < 0.01
    assert estimate_memory(paper, 8, grad_accum=2)["total"] > estimate_memory(paper, 8)["total"]
    with pytest.raises(ValueError, match="dtype 'bf16'"):
        estimate_memory(paper, 8, "bf16")


MEASURE_PEAK = """
import json, sys, torch
from model import GPT, ModelConfig
torch.set_num_threads(1)

def peak_resident_bytes():
    # VmHWM: ru_maxrss of this process's own memory (ru_maxrss also counts the parent's, inherited at fork + exec)
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

cfg, batch_size = ModelConfig(**json.loads(sys.argv[1])), int(sys.argv[2])
x, y = (torch.randint(0, cfg.vocab_size, (batch_size, cfg.block_size)) for _ in range(2))

def train_steps(model, x, y, steps):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

warm_up = ModelConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)
train_steps(GPT(warm_up), x[:1, :4] % 8, y[:1, :4] % 8, 1)
before = peak_resident_bytes()  # after torch's one-off costs (lazy imports, buffers)
train_steps(GPT(cfg), x, y, 2)  # the second step runs with the AdamW state allocated, as every later one
print(peak_resident_bytes() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from Linux's /proc")
def test_estimate_memory_total_is_near_the_measured_peak():
    """A training step's peak resident memory, measured in a fresh process, against the estimate (float32).
    glibc's malloc would keep freed tensors below its (self-raising) mmap threshold in the heap, so resident memory
    would overstate what torch holds by 10-30%; a fixed threshold hands every big tensor back when it is freed."""
    overrides = dict(vocab_size=2048, block_size=256, n_layer=2, n_head=4, n_embd=64)
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    result = subprocess.run([sys.executable, "-c", MEASURE_PEAK, json.dumps(overrides), "32"], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, check=True)
    measured = int(result.stdout.split()[-1])
    estimate = estimate_memory(ModelConfig(**overrides), 32, "float32")["total"]
    print(f"training step peak: estimate {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB")
    assert 0.85 < estimate / measured < 1.15


def test_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config)}, path)
    checkpoint = torch.load(path, weights_only=True)
    rebuilt = GPT(ModelConfig(**checkpoint["model_args"]))
    rebuilt.load_state_dict(checkpoint["model"])
    idx, targets = random_batch()
    torch.testing.assert_close(model(idx, targets)[0], rebuilt(idx, targets)[0], rtol=0, atol=0)


def test_matches_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    model = tiny_model(n_embd=64, n_head=4, rope_theta=500.0).eval()  # non-default theta is passed on
    cfg = model.config
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.hidden_dim,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False, hidden_act="silu")
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    state = {(k if k.startswith("lm_head") else "model." + k): v for k, v in model.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    idx, targets = random_batch()
    ours, _ = model(idx, targets)
    with torch.no_grad():
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# =============================================================================
# data/

from data import common
from data.common import (DATA_DIR, check_prepared, extract_answer, get_tokenizer, load_meta, load_pairs,
                         prepare_command, tokenize_documents, write_split)

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
TRICKY_TEXT = "héllo wörld 世界 🎉\r\n\ttabs\x00nul  <|endoftext|> not special\n\n  trailing "


def read_documents(data_dir, split):
    """The documents of a split, decoded: split the ids at every end-of-text token."""
    ids = np.fromfile(os.path.join(data_dir, f"{split}.bin"), dtype=np.uint16)
    meta = load_meta(data_dir)
    enc = get_tokenizer(meta["tokenizer"])
    assert ids[-1] == meta["eot_token"], "every document, the last included, ends with end-of-text"
    cuts = np.flatnonzero(ids == meta["eot_token"])
    return [enc.decode(ids[start + 1:end].tolist()) for start, end in zip(np.r_[-1, cuts[:-1]], cuts)]


def assert_split_of(data_dir, documents):
    """train and val together hold exactly the given documents, each once, and both are non-empty."""
    train, val = read_documents(data_dir, "train"), read_documents(data_dir, "val")
    assert train and val
    assert sorted(train + val) == sorted(documents)


# -----------------------------------------------------------------------------
# common


def test_byte_tokenizer_round_trip():
    enc = get_tokenizer("bytes")
    assert enc.n_vocab == 257 and enc.eot_token == 256
    ids = enc.encode_ordinary(TRICKY_TEXT)
    assert ids == list(TRICKY_TEXT.encode("utf-8")), "one token per UTF-8 byte, the eot text included"
    assert enc.decode(ids) == TRICKY_TEXT
    assert enc.decode(ids + [enc.eot_token]) == TRICKY_TEXT + "<|endoftext|>"


def test_get_tokenizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="bytes, gpt2"):
        get_tokenizer("sentencepiece")


def test_tokenize_documents_splits_whole_documents_by_seed():
    enc = get_tokenizer("bytes")
    documents = [f"document {i} " + "x" * i for i in range(40)]
    train, val = tokenize_documents(documents, enc, val_fraction=0.1, seed=0)
    assert train.dtype == np.uint16 and val.dtype == np.uint16
    assert (val == enc.eot_token).sum() == 4 and (train == enc.eot_token).sum() == 36
    again_train, again_val = tokenize_documents(documents, enc, val_fraction=0.1, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(val, again_val)
    _, other_val = tokenize_documents(documents, enc, val_fraction=0.1, seed=1)
    assert not np.array_equal(val, other_val)
    with pytest.raises(ValueError, match="at least 2 documents"):
        tokenize_documents(["only one"], enc, val_fraction=0.1, seed=0)


def test_write_split_refuses_ids_beyond_uint16_and_writes_nothing(tmp_path):
    path = str(tmp_path / "train.bin")
    with pytest.raises(ValueError, match="65536"):
        write_split(path, np.array([1, 2, 65536, 3]))
    assert os.listdir(tmp_path) == []
    write_split(path, [0, 65535, 7])
    assert np.fromfile(path, dtype=np.uint16).tolist() == [0, 65535, 7]


def test_check_prepared_names_the_command(tmp_path):
    data_dir = tmp_path / "stdlib"
    data_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="run: python -m data.stdlib.prepare --out_dir"):
        check_prepared(str(data_dir))
    (data_dir / "train.bin").write_bytes(b"\x01\x00\x02")  # odd size: cut mid-token
    (data_dir / "val.bin").write_bytes(b"\x01\x00")
    with pytest.raises(ValueError, match="truncated.*run: python -m data.stdlib.prepare"):
        check_prepared(str(data_dir))
    (data_dir / "train.bin").write_bytes(b"\x01\x00")
    with pytest.raises(FileNotFoundError, match="meta.json is missing; run: python -m data.stdlib.prepare"):
        check_prepared(str(data_dir))
    (data_dir / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable.*run: python -m data.stdlib.prepare"):
        check_prepared(str(data_dir))
    (data_dir / "meta.json").write_text(json.dumps({"vocab_size": 257, "tokenizer": "bytes", "eot_token": 256}))
    assert check_prepared(str(data_dir))["vocab_size"] == 257
    # the web corpora share one script, and the default folder needs no --out_dir
    assert prepare_command(os.path.join(DATA_DIR, "openwebtext")) == "python -m data.hf.prepare --dataset openwebtext"
    with pytest.raises(FileNotFoundError, match="run: python -m data.arith.prepare --out_dir"):
        load_pairs(str(tmp_path / "arith"), "train")
    # a folder name with no prepare script of its own: the command for a local file
    assert "data.hf.prepare --from_file" in prepare_command(str(tmp_path / "owt"))


class RunsCode:
    """What a malicious meta.pkl can hold: unpickling it calls os.system."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_metadata_cannot_run_code_and_an_old_plain_meta_pkl_is_converted(tmp_path):
    evil, plain = tmp_path / "evil", tmp_path / "plain"
    for folder in (evil, plain):
        folder.mkdir()
        for split in ("train", "val"):
            (folder / f"{split}.bin").write_bytes(b"\x01\x00\x02\x00")
    (evil / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 257, "x": RunsCode(tmp_path / "pwned")}))
    with pytest.raises(ValueError, match=r"meta.pkl is not plain metadata .*posix.system.*remake the folder"):
        check_prepared(str(evil))
    assert not (tmp_path / "pwned").exists() and not (evil / "meta.json").exists()
    (plain / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 257, "tokenizer": "bytes", "eot_token": 256}))
    assert check_prepared(str(plain))["eot_token"] == 256
    assert json.loads((plain / "meta.json").read_text())["vocab_size"] == 257  # converted once, JSON from now on


# -----------------------------------------------------------------------------
# token datasets


def test_two_writers_of_one_data_file_side_by_side_both_finish_whole(tmp_path):
    # two prepare runs at once (two study.sh started together) write the same files; each has its own temp file
    path = str(tmp_path / "train.bin")
    first, second = np.arange(1000), np.arange(1000, 3000)

    def write_first_while_second_writes(f):
        f.write(first[:500].astype(np.uint16).tobytes())
        write_split(path, second)  # the other run starts and finishes in the middle of this one's write
        f.write(first[500:].astype(np.uint16).tobytes())

    common._atomic_write(path, write_first_while_second_writes)
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), first)  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["train.bin"] and oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_stdlib_prepare_writes_the_source_files(tmp_path):
    from data.stdlib.prepare import main, source_files
    import sysconfig

    main(["--max_bytes", "300000", "--out_dir", str(tmp_path)])
    stdlib_dir = sysconfig.get_paths()["stdlib"]
    paths = source_files(stdlib_dir, 300000)
    assert len(paths) > 5 and sum(os.path.getsize(p) for p in paths) <= 300000
    for path in source_files(stdlib_dir, max_bytes=10**12):  # all of it, not only the first files
        parts = os.path.relpath(path, stdlib_dir).split(os.sep)
        assert path.endswith(".py") and not {"site-packages", "test", "tests"} & set(parts)
    documents = [open(p, encoding="utf-8").read() for p in paths]
    assert_split_of(str(tmp_path), documents)
    meta = check_prepared(str(tmp_path))
    assert meta["num_files"] == len(paths) and meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257


def test_hf_prepare_from_jsonl_file(tmp_path):
    from data.hf.prepare import main

    documents = [TRICKY_TEXT, "def f(x):\n    return x\n", "ünïcode ✓", "a", "last one\n"]
    path = tmp_path / "slice.jsonl"
    # codeparrot keeps its text in "content", the others in "text"
    rows = [{"content": d, "text": d.upper()} for d in documents]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    for dataset, expected in (("codeparrot", documents), ("openwebmath", [d.upper() for d in documents])):
        out_dir = tmp_path / dataset
        main(["--dataset", dataset, "--from_file", str(path), "--tokenizer", "bytes", "--val_fraction", "0.2",
              "--out_dir", str(out_dir)])
        assert_split_of(str(out_dir), expected)
        assert load_meta(str(out_dir))["dataset"] == dataset


def test_hf_prepare_from_text_file_with_limits(tmp_path):
    from data.hf.prepare import main

    documents = [f"doc {i}: ünïcode text\n" for i in range(10)]
    path = tmp_path / "slice.txt"
    path.write_text("<|endoftext|>".join(documents), encoding="utf-8")
    main(["--dataset", "openwebtext", "--from_file", str(path), "--tokenizer", "bytes", "--out_dir",
          str(tmp_path / "all")])
    assert_split_of(str(tmp_path / "all"), documents)
    main(["--dataset", "openwebtext", "--from_file", str(path), "--tokenizer", "bytes", "--max_docs", "4",
          "--out_dir", str(tmp_path / "four")])
    assert_split_of(str(tmp_path / "four"), documents[:4])
    tokens_per_doc = len(documents[0].encode()) + 1  # the documents are the same length in bytes
    main(["--dataset", "openwebtext", "--from_file", str(path), "--tokenizer", "bytes", "--max_tokens",
          str(3 * tokens_per_doc - 1), "--out_dir", str(tmp_path / "three")])
    assert_split_of(str(tmp_path / "three"), documents[:3])


def is_balanced(text, pairs):
    closer_of = dict(pairs)
    stack, deepest = [], 0
    for char in text:
        if char in closer_of:
            stack.append(closer_of[char])
            deepest = max(deepest, len(stack))
        elif not stack or stack.pop() != char:
            return False, deepest
    return not stack, deepest


def test_dyck_sequences_are_balanced(tmp_path):
    # run as a module from the repository root, as the README says
    subprocess.run([sys.executable, "-m", "data.dyck.prepare", "--num_tokens", "30000", "--num_types", "3",
                    "--max_depth", "5", "--max_length", "64", "--out_dir", str(tmp_path)], cwd=REPO_ROOT, check=True)
    sequences = read_documents(str(tmp_path), "train") + read_documents(str(tmp_path), "val")
    assert len(sequences) > 100
    assert sum(map(len, sequences)) + len(sequences) >= 30000
    depths = []
    for sequence in sequences:
        assert 2 <= len(sequence) <= 64 and set(sequence) <= set("()[]{}")
        balanced, deepest = is_balanced(sequence, ["()", "[]", "{}"])
        assert balanced, sequence
        depths.append(deepest)
    assert max(depths) == 5 and min(depths) == 1
    assert len(set(sequences)) > 0.9 * len(sequences), "sequences should differ"


def test_random_control_is_uniform_bytes_in_whole_documents(tmp_path):
    from data.random.prepare import main

    main(["--num_tokens", "65000", "--doc_length", "128", "--out_dir", str(tmp_path)])
    meta = check_prepared(str(tmp_path))
    eot = meta["eot_token"]
    splits = [np.fromfile(tmp_path / f"{split}.bin", dtype=np.uint16) for split in ("train", "val")]
    assert len(splits[1]) > 0 and sum(map(len, splits)) >= 65000
    for ids in splits:
        docs = ids.reshape(-1, 129)  # whole documents: 128 bytes, then end-of-text
        assert (docs[:, -1] == eot).all() and (docs[:, :-1] < 256).all()
    counts = np.bincount(splits[0][splits[0] != eot], minlength=256)
    expected = counts.sum() / 256
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 400, f"bytes should be uniform (chi2 {chi2:.0f} on 255 degrees of freedom)"


# -----------------------------------------------------------------------------
# fine-tuning datasets


def test_arith_problems_are_correct_and_disjoint(tmp_path):
    from data.arith.prepare import main

    main(["--max_operand", "30", "--num_train", "300", "--num_val", "50", "--num_test", "100",
          "--out_dir", str(tmp_path)])
    meta = load_meta(str(tmp_path))
    assert meta["task"] == "arith" and meta["stop"] == "\n"
    splits = {split: load_pairs(str(tmp_path), split) for split in ("train", "val", "test")}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [300, 50, 100]
    problems = {}
    for split, records in splits.items():
        for record in records:
            assert record["prompt"].startswith("assert ") and record["prompt"].endswith(" == ")
            a, b = map(int, record["prompt"][len("assert "):-len(" == ")].split(" + "))
            assert 0 <= a <= 30 and 0 <= b <= 30
            assert record["answer"] == str(a + b) and record["completion"] == f"{a + b}\n"
            assert extract_answer(record["completion"], meta["stop"]) == record["answer"]
            problems.setdefault(frozenset((a, b)), []).append(split)
    assert all(len(splits_seen) == 1 for splits_seen in problems.values()), "a problem (up to order) in two places"
    with pytest.raises(SystemExit):  # 31 * 32 / 2 = 496 distinct problems
        main(["--max_operand", "30", "--num_train", "500", "--out_dir", str(tmp_path)])


def test_gsm8k_from_local_files(tmp_path):
    from data.gsm8k.prepare import main

    rows = [{"question": f"Tom has {i} apples and buys 1,000 more. How many? ",
             "answer": f"He has {i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000} apples.\n#### {i + 1000:,}"}
            for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[10:]))
    out_dir = str(tmp_path / "gsm8k")
    main(["--from_file", str(tmp_path / "train.jsonl"), "--test_file", str(tmp_path / "test.jsonl"),
          "--num_val", "3", "--out_dir", out_dir])
    meta = load_meta(out_dir)
    assert meta["task"] == "gsm8k" and (meta["num_train"], meta["num_val"], meta["num_test"]) == (7, 3, 2)
    train, val, test = (load_pairs(out_dir, split) for split in ("train", "val", "test"))
    assert test[0]["prompt"] == "Question: Tom has 10 apples and buys 1,000 more. How many?\nAnswer:"
    assert test[0]["completion"] == " He has 10 + 1000 = <<10+1000=1010>>1010 apples.\n#### 1,010\n\n"
    assert test[0]["answer"] == "1010"
    assert sorted(r["answer"] for r in train + val) == [str(i + 1000) for i in range(10)]
    for record in train + val + test:
        assert extract_answer(record["completion"], meta["stop"]) == record["answer"]
    with pytest.raises(ValueError, match="--test_file"):
        main(["--from_file", str(tmp_path / "train.jsonl"), "--out_dir", out_dir])


# -----------------------------------------------------------------------------
# bad input to the prepare scripts: one line naming the flag, before any work

# each script with the flags it needs; hf and gsm8k read the Hub by default, which the test below forbids
PREPARE_SCRIPTS = {"arith": [], "dyck": [], "random": [], "stdlib": [], "gsm8k": [], "hf": ["--dataset", "c4"],
                   "nca": []}


def no_download(*args, **kwargs):
    raise AssertionError("a download was started before the flags were checked")


def run_prepare(name, argv, capsys):
    """Run data/<name>/prepare.py's main(argv), expecting a refusal: (exit code, stdout, stderr, seconds)."""
    main = __import__(f"data.{name}.prepare", fromlist=["main"]).main
    start = time.time()
    with pytest.raises(SystemExit) as refused:
        main(argv)
    seconds = time.time() - start
    out, err = capsys.readouterr()
    return refused.value.code, out, err, seconds


def assert_one_line_refusal(code, out, err, seconds, message):
    assert code not in (0, None), "a refusal exits non-zero"
    assert out == "" and err.count("\n") == 1, f"one line, and no work done first: {out + err!r}"
    assert message in err and err.endswith("(see --help)\n") and "Traceback" not in err and "usage:" not in err, err
    assert seconds < 5


def test_prepare_scripts_refuse_a_bad_out_dir_in_one_line(tmp_path, monkeypatch, capsys):
    import data.gsm8k.prepare
    import data.hf.prepare

    monkeypatch.setattr(data.hf.prepare, "stream_documents", no_download)
    monkeypatch.setattr(data.hf.prepare, "get_tokenizer", no_download)  # gpt2, the default, downloads its BPE
    monkeypatch.setattr(data.gsm8k.prepare, "load_rows", no_download)
    a_file = tmp_path / "notes.md"
    a_file.write_text("not a folder\n")
    cases = {str(a_file): "that is a file, not a folder", str(a_file / "sub"): f"{a_file} is a file, not a folder",
             "": "give a folder"}
    if os.path.isdir("/proc"):  # a folder no one can write in, root included
        cases["/proc/x"] = "cannot write in /proc"
    for name, flags in PREPARE_SCRIPTS.items():
        for out_dir, reason in cases.items():
            code, out, err, seconds = run_prepare(name, flags + ["--out_dir", out_dir], capsys)
            assert_one_line_refusal(code, out, err, seconds, "--out_dir")
            assert reason in err and err.startswith(f"python -m data.{name}.prepare: error: --out_dir "), err
            assert ("train.bin" if name in ("dyck", "random", "stdlib", "hf", "nca") else "train.jsonl") in err, err
            assert a_file.read_text() == "not a folder\n" and os.listdir(tmp_path) == ["notes.md"]
    assert not os.path.exists("/proc/x")


def test_prepare_scripts_refuse_bad_flag_values_in_one_line(tmp_path, capsys):
    (tmp_path / "one.jsonl").write_text('{"text": "only one document"}\n')
    (tmp_path / "no_text.jsonl").write_text('{"text": "a"}\n{"content": "b"}\n')
    local = f"--dataset c4 --tokenizer bytes --from_file {tmp_path}"
    # script and flags | what the one line says
    cases = f"""
        arith --num_train -1                | --num_train: must be at least 1, got -1
        arith --max_operand -3              | --max_operand: must be at least 0
        arith --num_val many                | --num_val: 'many' is not a whole number
        dyck --num_tokens 0                 | --num_tokens: must be at least 1
        dyck --val_fraction 1.5             | --val_fraction: must be between 0 and 1
        dyck --seed -1                      | --seed: must be at least 0
        random --num_tokens -5              | --num_tokens: must be at least 1
        random --doc_length 0               | --doc_length: must be at least 1
        random --num_tokens 10              | need at least 2 documents to split into train and val, got 1 (--num_tok
        stdlib --max_bytes 10               | --max_bytes 10: only 0 source file(s) fit
        stdlib --val_fraction 0             | --val_fraction: must be between 0 and 1
        gsm8k --num_val 0                   | --num_val: must be at least 1
        gsm8k --from_file {tmp_path}/no.jsonl | --from_file: {tmp_path}/no.jsonl: no such file
        hf --dataset c4 --max_docs -1       | --max_docs: must be at least 1
        hf --dataset c4 --max_tokens 0      | --max_tokens: must be at least 1
        hf {local}                          | --from_file: {tmp_path}: a folder, not a file
        hf {local}/no_text.jsonl            | record 2: no 'text' field
        hf {local}/one.jsonl                | got 1; give more of them (--from_file
        nca --tokens 0                      | --tokens: must be at least 1
        nca --seq_len 20                    | --seq_len 20: a row shorter than one frame (38 tokens)
        nca --band 0.9 0.1                  | --band: need 0 <= lo < hi <= 1
        nca --grid 10 --num_colors 3 --patch 3 | --patch: the grid (10) must be divisible by the patch size (3)
    """
    for case in cases.strip().splitlines():
        command, message = (part.strip() for part in case.split("|"))
        name, *flags = command.split()
        code, out, err, seconds = run_prepare(name, flags + ["--out_dir", str(tmp_path / "out")], capsys)
        out = "".join(line + "\n" for line in out.splitlines() if not line.startswith("tokenized "))  # hf's count
        assert_one_line_refusal(code, out, err, seconds, message)
        assert not (tmp_path / "out").exists()


# =============================================================================
# train.py

import dataclasses
import signal
import threading
import time
import weakref

import runtime
import train
from data.common import save_token_dataset

TINY_RUN = ["--device", "cpu", "--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "48", "--batch_size", "4",
            "--eval_iters", "2", "--log_interval", "5", "--grid", "6", "--num_colors", "4", "--band", "0.0", "1.0"]


@pytest.fixture
def tiny_data(tmp_path):
    """A data_dir with a small byte-level corpus 'tiny' (this repo's own source) and a small arith task."""
    data_dir = tmp_path / "data"
    sources = [open(os.path.join(REPO_ROOT, f), encoding="utf-8").read() for f in ("nca.py", "model.py")]
    enc = get_tokenizer("bytes")
    train_ids, val_ids = tokenize_documents(sources * 3, enc, val_fraction=0.3, seed=0)
    save_token_dataset(str(data_dir / "tiny"), enc, train_ids, val_ids)
    __import__("data.arith.prepare", fromlist=["main"]).main(
        ["--out_dir", str(data_dir / "arith"), "--num_train", "200", "--num_val", "20", "--num_test", "20"])
    return str(data_dir)


def run_flags(tmp_path, data_dir, *extra):
    return TINY_RUN + ["--data_dir", data_dir, "--out_dir", str(tmp_path / "out"), "--pretrain_data", "tiny", *extra]


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_get_lr_warms_up_then_decays_to_the_floor():
    lrs = [train.get_lr(it, 100, 1.0, 0.1, 0.1) for it in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[100] == pytest.approx(0.1)


def test_three_stages_chain_and_carry_the_transformer(tmp_path, tiny_data, capsys):
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "6", "--pretrain_iters", "6",
                      "--finetune_iters", "4", "--eval_interval", "3", "--freeze", "attention,mlp,norm")
    train.main(flags)
    out = capsys.readouterr().out
    assert "re-initialised embedding" in out and "carried attention" in out
    ckpts = {s: torch.load(tmp_path / "out" / s / "ckpt.pt", weights_only=True) for s in train.STAGES}
    nca_sd, text_sd = ckpts["prepretrain"]["model"], ckpts["pretrain"]["model"]
    assert nca_sd["embed_tokens.weight"].shape[0] == 258 and text_sd["embed_tokens.weight"].shape[0] == 257
    for name, tensor in text_sd.items():  # frozen after the transfer, so still exactly stage 1's
        if name.split(".")[0] not in ("embed_tokens", "lm_head"):
            assert torch.equal(tensor, nca_sd[name]), name
    assert ckpts["pretrain"]["prior_tokens"] == ckpts["prepretrain"]["tokens_seen"] == 6 * 4 * 48
    log = read_log(tmp_path / "out" / "pretrain" / "log.jsonl")
    assert [r["iter"] for r in log] == [0, 3, 6]
    assert ckpts["finetune"]["data"]["name"] == "arith" and ckpts["finetune"]["iter_num"] == 4
    for stage in train.STAGES:  # every evaluation of every stage logs the in-context probe
        assert all("icl_score" in r and "induction_score" in r for r in read_log(tmp_path / "out" / stage / "log.jsonl"))
    for stage in train.STAGES:  # the settings beside every log, the same as the checkpoint's
        with open(tmp_path / "out" / stage / "config.json") as f:
            settings = json.load(f)
        assert settings["model_args"] == ckpts[stage]["model_args"] and settings["config"] == ckpts[stage]["config"]
        assert (settings["nca_config"] is None) == (stage != "prepretrain")
        assert settings["torch"] == ckpts[stage]["torch"] == torch.__version__  # what made the numbers
    width, params, dtype = study.run_size(str(tmp_path / "out"))
    assert (width, params, dtype) == (ckpts["pretrain"]["model_args"]["n_embd"],
                                      sum(t.numel() for t in ckpts["pretrain"]["model"].values()), "float32")


def test_tokens_seen_counts_every_micro_batch(tmp_path, tiny_data, monkeypatch):
    counted = []  # fine-tuning batches are padded to their longest pair, so micro-batches differ in length
    get_batch = train.PairData.get_batch
    monkeypatch.setattr(train.PairData, "get_batch", lambda self, split: counted.append(
        get_batch(self, split)) or counted[-1])
    train.main(run_flags(tmp_path, tiny_data, "--stage", "finetune", "--finetune_iters", "3", "--grad_accum", "3",
                         "--batch_size", "3"))
    ckpt = torch.load(tmp_path / "out" / "finetune" / "ckpt.pt", weights_only=True)
    assert len(counted) == 9 and len({x.shape[1] for x, _ in counted}) > 1
    # the positions of each pair (prompt and completion, less the last token), not the padding after it
    unpadded = sum(int((row != -1).nonzero().max()) + 1 for _, y in counted for row in y)
    assert ckpt["tokens_seen"] == unpadded < sum(x.numel() for x, _ in counted)


def test_a_step_weighs_every_target_token_alike_across_its_micro_batches(tmp_path, tiny_data, monkeypatch):
    """Three micro-batches of padded pairs with different numbers of targets: the step's loss and gradient are those
    of one cross-entropy over all their target tokens, not a mean of the three means."""
    cfg, model_cfg, nca_cfg = train.parse_args(run_flags(tmp_path, tiny_data, "--stage", "finetune", "--batch_size",
                                                         "1", "--grad_accum", "3"))
    os.makedirs(tmp_path / "out" / "finetune")
    run = train.setup_stage("finetune", cfg, model_cfg, nca_cfg, "", train.Dist(batch_size=1, micro_steps=3))
    batches, get_batch = [], run.data.get_batch
    monkeypatch.setattr(run.data, "get_batch", lambda split: batches.append(get_batch(split)) or batches[-1])
    run.train_model = run.model
    expected_model = GPT(run.model.config)
    expected_model.load_state_dict(run.model.state_dict())
    loss, tokens, _ = train.forward_backward(run, train.Dist(batch_size=1, micro_steps=3))
    counts = [int((y != -1).sum()) for _, y in batches]
    assert len(set(counts)) > 1  # the micro-batches do hold different numbers of targets
    total = sum(F.cross_entropy(expected_model(x, y)[0].flatten(0, 1), y.flatten(), ignore_index=-1,
                                reduction="sum") for x, y in batches)
    (total / sum(counts)).backward()
    assert loss == pytest.approx(total.item() / sum(counts), rel=1e-6)
    for (name, p), q in zip(run.model.named_parameters(), expected_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-8), name
    assert tokens == sum(int((row != -1).nonzero().max()) + 1 for _, y in batches for row in y)


def test_transfer_flags_shape_stage_two_and_stage_three_carries_everything(tmp_path, tiny_data, capsys):
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "2", "--finetune_iters",
                      "2", "--eval_interval", "2", "--reinit", "embedding,head,attention", "--freeze", "mlp")
    train.main(flags)
    out = capsys.readouterr().out
    transfers = re.findall(r"transfer: .*", out)
    assert len(transfers) == 2 and "re-initialised embedding" in transfers[0] and "attention" in transfers[0]
    assert transfers[1].endswith("re-initialised nothing"), transfers[1]  # stage 3 starts from stage 2 as it ended
    ckpts = {s: torch.load(tmp_path / "out" / s / "ckpt.pt", weights_only=True) for s in train.STAGES}
    names = list(ckpts["pretrain"]["model"])
    assert ckpts["pretrain"]["trainable"] == [n for n in names if param_group(n) != "mlp"]
    assert ckpts["finetune"]["trainable"] == names  # nothing frozen in stage 3
    for name, tensor in ckpts["pretrain"]["model"].items():
        if param_group(name) == "mlp":  # frozen: still stage 1's
            assert torch.equal(tensor, ckpts["prepretrain"]["model"][name]), name


def test_freeze_freezes_a_model_built_from_scratch(tmp_path, tiny_data, capsys):
    """The frozen random control: --freeze acts on stage 2 from scratch as it does on stage 2 from a checkpoint."""
    train.main(run_flags(tmp_path, tiny_data, "--prepretrain_iters", "0", "--pretrain_iters", "2", "--finetune_iters",
                         "0", "--eval_interval", "2", "--freeze", "attention,mlp"))
    assert "frozen: attention, mlp; trainable: embedding, head, norm" in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "out" / "pretrain" / "ckpt.pt", weights_only=True)
    assert {param_group(n) for n in ckpt["trainable"]} == {"embedding", "head", "norm"}
    torch.manual_seed(0)  # the seed of the run: the fresh model it started from
    fresh = GPT(ModelConfig(**ckpt["model_args"])).state_dict()
    for name, tensor in ckpt["model"].items():
        assert torch.equal(tensor, fresh[name]) == (param_group(name) in ("attention", "mlp")), name


def test_float16_resume_restores_the_loss_scale(tmp_path, tiny_data, monkeypatch):
    """GradScaler's state (the loss scale and its growth counter) is in the checkpoint, so a float16 run stopped and
    resumed ends as the straight run does."""
    common = ["--stage", "pretrain", "--eval_interval", "4", "--dtype", "float16", "--pretrain_iters", "12"]
    train.main(run_flags(tmp_path / "straight", tiny_data, *common))
    steps, step = [], runtime.Meter.step

    def crash_at_step_9(meter, *args):  # after the checkpoint of iteration 8
        steps.append(1)
        if len(steps) == 9:
            raise RuntimeError("killed")
        return step(meter, *args)
    monkeypatch.setattr(runtime.Meter, "step", crash_at_step_9)
    flags = run_flags(tmp_path / "resumed", tiny_data, *common)
    with pytest.raises(RuntimeError, match="killed"):
        train.main(flags)
    monkeypatch.setattr(runtime.Meter, "step", step)
    train.main(flags + ["--resume"])
    straight, resumed = (torch.load(tmp_path / run / "out" / "pretrain" / "ckpt.pt", weights_only=True)
                         for run in ("straight", "resumed"))
    assert straight["scaler"]["_growth_tracker"] == 12  # 12 steps without an overflow, counted towards a growth
    assert resumed["scaler"] == straight["scaler"]
    assert all(torch.equal(resumed["model"][k], v) for k, v in straight["model"].items())


def test_training_lowers_the_loss_and_checkpoint_rebuilds_from_model_args(tmp_path, tiny_data):
    train.main(run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "60",
                         "--eval_interval", "20", "--pretrain_lr", "1e-2"))
    log = read_log(tmp_path / "out" / "pretrain" / "log.jsonl")
    assert log[0]["val_loss"] == pytest.approx(math.log(257), abs=0.3)  # a fresh model knows nothing
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0
    ckpt = torch.load(tmp_path / "out" / "pretrain" / "ckpt.pt", weights_only=True)
    model = GPT(ModelConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])  # strict
    cfg = train.TrainConfig(**{**ckpt["config"], "eval_iters": 2, "device": "cpu"})
    data = train.TokenData("tiny", cfg, cfg.batch_size, ckpt["model_args"]["block_size"])
    assert train.estimate_loss(model, data, torch.autocast("cpu", enabled=False)) == pytest.approx(log[-1]["val_loss"], abs=1e-5)


def remade_behind_the_run(folder):
    """What a prepare into a folder a run reads does: new train.bin and val.bin (here all id 7, twice as long)
    written beside the old ones and renamed into place."""
    for split in ("train", "val"):
        path = os.path.join(folder, f"{split}.bin")
        np.full(os.path.getsize(path), 7, dtype=np.uint16).tofile(path + ".new")
        os.replace(path + ".new", path)


def test_a_run_reads_the_data_it_checked_when_a_prepare_remakes_the_folder_meanwhile(tmp_path, tiny_data):
    cfg = train.TrainConfig(data_dir=tiny_data, batch_size=3, device="cpu", eval_iters=2)
    data = train.TokenData("tiny", cfg, cfg.batch_size, block_size=32)
    state = data.state_dict()
    before = data.get_batch("train")
    remade_behind_the_run(os.path.join(tiny_data, "tiny"))
    data.load_state_dict(state)
    after = data.get_batch("train")
    assert torch.equal(before[0], after[0]) and (after[0] != 7).any()  # the same windows of the same files
    prepare_nca_rows(tmp_path / "data" / "rows", *NCA_ROW_FLAGS)
    cfg = train.TrainConfig(data_dir=str(tmp_path / "data"), batch_size=4, device="cpu", eval_iters=2)
    rows = train.NCARowData("rows", cfg, batch_size=4, block_size=48)
    first_rows = read_rows(tmp_path / "data" / "rows", "train", 49)[:4, :-1]
    remade_behind_the_run(tmp_path / "data" / "rows")
    assert torch.equal(rows.get_batch("train")[0], first_rows)
    rows.close()
    assert all(file.closed for file in rows.files.values())


def test_finetune_loss_ignores_prompt_tokens(tiny_data):
    cfg = train.TrainConfig(data_dir=tiny_data, batch_size=3, device="cpu")
    data = train.PairData("arith", cfg, cfg.batch_size, block_size=48, tokenizer="bytes")
    pairs = data.pairs["train"][:3]
    x, y = data.collate(pairs)
    for row, (prompt, completion) in enumerate(pairs):
        targets = y[row][y[row] != -1].tolist()
        assert targets == completion                                   # exactly the completion is scored
        assert (y[row, :len(prompt) - 1] == -1).all()                  # no prompt token is a target
        assert x[row, :len(prompt)].tolist() == prompt
    model = GPT(ModelConfig(vocab_size=257, n_layer=1, n_head=2, n_embd=16, block_size=48))
    logits, loss = model(x, y)
    scored = y != -1
    assert loss.item() == pytest.approx(F.cross_entropy(logits[scored], y[scored]).item(), abs=1e-6)
    assert model(x, x.roll(-1, dims=1))[1] != loss                       # scoring the prompt would change it


def interrupt_when_logged(flags, log_path, sig, at_iter):
    """Start train.py with flags, send sig once the log shows at_iter, wait; -> (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # generous: a loaded machine starts slowly
    while not (log_path.exists() and any(r["iter"] >= at_iter for r in read_log(log_path))):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"train.py did not log iteration {at_iter} (exit code {proc.wait()}): "
                                 f"{proc.communicate()[1][-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.wait(), proc.communicate()[1]


def test_resume_after_sigkill_or_sigterm_equals_the_uninterrupted_run(tmp_path, tiny_data):
    common = ["--stage", "pretrain", "--pretrain_iters", "300", "--eval_interval", "10"]
    train.main(run_flags(tmp_path / "a", tiny_data, *common))
    expected = read_log(tmp_path / "a" / "out" / "pretrain" / "log.jsonl")
    for sig in (signal.SIGKILL, signal.SIGTERM):
        flags = run_flags(tmp_path / sig.name, tiny_data, *common)
        log_path = tmp_path / sig.name / "out" / "pretrain" / "log.jsonl"
        returncode, stderr = interrupt_when_logged(flags, log_path, sig, at_iter=50)
        stopped_at = torch.load(log_path.parent / "ckpt.pt", weights_only=True)["iter_num"]
        assert 0 < stopped_at < 300, "the run finished before it could be stopped"
        if sig == signal.SIGKILL:
            assert returncode == -signal.SIGKILL
        else:  # SIGTERM: a checkpoint at the iteration it stopped at, and how to continue
            assert returncode == 1 and "continue with the same command and --resume" in stderr
            assert stopped_at % 10 != 0 or stopped_at == max(r["iter"] for r in read_log(log_path))
        train.main(flags + ["--resume"])
        assert not list(log_path.parent.glob("*.tmp"))  # a kill mid-save leaves one; the next run removes it
        resumed = read_log(log_path)
        assert [r["iter"] for r in resumed] == [r["iter"] for r in expected], sig.name
        for a, b in zip(resumed, expected):
            assert a["val_loss"] == b["val_loss"] and a["train_loss"] == b["train_loss"], (sig.name, a["iter"])


def start_and_wait_for(flags, text, env=None):
    """Start train.py with flags; return the process once its stdout has printed a line holding text."""
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    for line in proc.stdout:
        if text in line:
            return proc
    raise AssertionError(f"train.py ended without printing {text!r}: {proc.stderr.read()[-2000:]}")


def test_a_stop_during_a_long_evaluation_is_honoured_in_seconds_and_resumed(tmp_path, tiny_data, monkeypatch, capsys):
    """SIGTERM 0.2 s into an evaluation of 3,000 batches: the evaluation is dropped, a checkpoint is saved at once, and
    --resume makes the evaluation again."""
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "20", "--eval_interval", "10")
    sent, estimate_loss = [], train.estimate_loss

    def signalled(*args):  # the signal comes from another thread, as from another process, while this one evaluates
        if not sent:
            threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
            sent.append(time.time())
        return estimate_loss(*args)
    monkeypatch.setattr(train, "estimate_loss", signalled)
    with pytest.raises(SystemExit, match="SIGTERM: stopped at iteration 0 of pretrain and saved"):
        train.main(flags + ["--eval_iters", "3000"])
    assert time.time() - sent[0] < 5
    assert "SIGTERM: stopping at the next safe point" in capsys.readouterr().err
    log_path = tmp_path / "out" / "pretrain" / "log.jsonl"
    assert read_log(log_path) == []  # the evaluation was dropped ...
    train.main(flags + ["--resume"])  # ... and is made on --resume (--eval_iters may change)
    assert [r["iter"] for r in read_log(log_path)] == [0, 10, 20]


def test_a_stop_while_the_nca_stream_searches_a_narrow_band_is_honoured_in_seconds(tmp_path, tiny_data):
    flags = run_flags(tmp_path, tiny_data, "--stage", "prepretrain", "--prepretrain_iters", "20")
    flags[flags.index("--band") + 1:flags.index("--band") + 3] = ["0.3", "0.3001"]  # rules that pass are rare
    proc = start_and_wait_for(flags, "== prepretrain")
    time.sleep(1.0)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.time() - t0 < 5 and proc.returncode == 1, stderr
    assert "SIGTERM: stopping at the next safe point" in stderr and "Traceback" not in stderr


STOP_TWICE = """
import os, signal, time, safety
stop = safety.StopSignal(enabled=True)
os.kill(os.getpid(), signal.SIGINT)
print("first: requested", stop.requested, flush=True)
os.kill(os.getpid(), signal.SIGINT)
time.sleep(5)
print("not stopped")
"""


def test_ctrl_c_ends_a_prepare_in_one_line(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "data.nca.prepare", "--tokens", "50000000", "--out_dir",
                             str(tmp_path / "rows")], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and stderr.strip().splitlines() == [
        "interrupted (Ctrl-C); a folder half-written is marked unfinished: run the command again"], stderr


def test_a_second_stop_request_ends_the_process_at_once_without_a_traceback():
    result = subprocess.run([sys.executable, "-c", STOP_TWICE], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout == "first: requested SIGINT\n" and result.returncode == 128 + signal.SIGINT
    assert result.stderr.splitlines() == [
        "SIGINT: stopping at the next safe point, with a checkpoint (send it again to stop at once)",
        "SIGINT again: stopping now; the last checkpoint is kept"]


# the first 20 iterations of a tiny run (bytes-level Dyck corpus, arith task): [iteration, train loss, val loss] at
# every evaluation. The fine-tuning validation losses are per target token over all batches (padded batches hold
# different numbers of targets), no longer a mean of batch means
RECORDED_LOSSES = {
    "pretrain": [[0, None, 5.54236626625061], [5, 5.390239715576172, 5.352854251861572],
                 [10, 5.152772426605225, 5.113101243972778], [15, 5.011145114898682, 4.9841578006744385],
                 [20, 4.9601263999938965, 4.937348127365112]],
    "finetune": [[0, None, 5.549040756225586], [5, 5.551428318023682, 5.508196468353272],
                 [10, 5.488786697387695, 5.458527355194092], [15, 5.447140693664551, 5.427412700653076],
                 [20, 5.432712078094482, 5.415045928955078]]}


def test_losses_of_a_tiny_run_are_the_recorded_ones(tmp_path):
    data_dir = tmp_path / "data"
    __import__("data.dyck.prepare", fromlist=["main"]).main(["--out_dir", str(data_dir / "dyck"),
                                                             "--num_tokens", "200000"])
    __import__("data.arith.prepare", fromlist=["main"]).main(
        ["--out_dir", str(data_dir / "arith"), "--num_train", "200", "--num_val", "20", "--num_test", "20"])
    flags = TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--pretrain_data", "dyck",
                        "--eval_interval", "5", "--prepretrain_iters", "0", "--pretrain_iters", "20",
                        "--finetune_iters", "20"]
    train.main(flags)
    for stage, recorded in RECORDED_LOSSES.items():
        log = [[r["iter"], r["train_loss"], r["val_loss"]] for r in read_log(tmp_path / "out" / stage / "log.jsonl")]
        assert [[v is None for v in r] for r in log] == [[v is None for v in r] for r in recorded]
        # bit for bit on the machine that recorded them; other CPUs may round differently in the last digits
        values = [[v for v in r if v is not None] for r in (sum(log, []), sum(recorded, []))]
        assert values[0] == pytest.approx(values[1], rel=1e-5), stage


# =============================================================================
# the GPU path, with CPU stand-ins: "meta" for a device that is not the CPU, gloo processes for torchrun

def tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else []
    return [t for item in items for t in tensors_in(item)]


def track_checkpoint_tensors(monkeypatch):
    """Weak references to every tensor of every checkpoint train.py loads: they die when nothing holds them."""
    refs, load = [], safety.load_checkpoint

    def tracked(*args, **kwargs):
        checkpoint = load(*args, **kwargs)
        # AdamW's step counts are 0-dim CPU tensors that torch keeps as they are (non-fused AdamW): not counted
        refs.extend(weakref.ref(t) for t in tensors_in(checkpoint) if t.dim())
        return checkpoint
    monkeypatch.setattr(safety, "load_checkpoint", tracked)
    return refs


def test_resume_onto_another_device_restores_rng_and_keeps_no_checkpoint_tensor(tmp_path, tiny_data, monkeypatch):
    """A CUDA run loads its checkpoint to the CPU and moves only what runs. 'meta' stands in for the GPU: RNG states
    loaded there would be unusable by the CPU generators, as CUDA tensors are (TypeError: RNG state must be a
    torch.ByteTensor)."""
    train.main(run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "8", "--eval_interval", "4"))
    ckpt_path = tmp_path / "out" / "pretrain" / "ckpt.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    cfg, model_cfg, nca_cfg = train.parse_args(run_flags(tmp_path, tiny_data, "--stage", "pretrain",
                                                         "--pretrain_iters", "16", "--eval_interval", "4"))
    cfg.device, cfg.resume = "meta", True
    refs = track_checkpoint_tensors(monkeypatch)
    run = train.setup_stage("pretrain", cfg, model_cfg, nca_cfg, "", train.Dist())
    assert run.iter_num == 8 and refs
    assert all(p.device.type == "meta" for p in run.model.parameters())
    assert all(t.device.type == "meta" for s in run.optimizer.state.values() for t in s.values() if t.dim())
    assert torch.equal(torch.get_rng_state(), ckpt["rank_state"][0]["rng"])
    assert torch.equal(run.data.generator.get_state(), ckpt["rank_state"][0]["data"]["generator"])
    assert [r for r in refs if r() is not None] == []


def test_no_tensor_of_the_previous_stage_stays_alive_in_the_next(tmp_path, tiny_data, monkeypatch):
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "2", "--eval_interval", "2",
                      "--stage", "prepretrain")
    train.main(flags)
    refs, alive, step = track_checkpoint_tensors(monkeypatch), [], runtime.Meter.step

    def counting_step(meter, *args):
        alive.append(sum(r() is not None for r in refs))
        return step(meter, *args)
    monkeypatch.setattr(runtime.Meter, "step", counting_step)
    train.main(flags[:-1] + ["pretrain", "--init_from", str(tmp_path / "out" / "prepretrain" / "ckpt.pt")])
    assert refs and alive == [0, 0]


def test_gpu_check_on_the_cpu(tmp_path):
    """The CPU twin of `python bench.py check` (which a GPU user runs first): every item passes."""
    result = subprocess.run([sys.executable, "bench.py", "check", "--device", "cpu", "--out_dir", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    for item in ("three stages", "torch.compile", "resume: the resumed log equals the straight one", "torchrun",
                 "eval.py icl", "eval.py passk", "NCA data: the device's batch equals the CPU's",
                 "generation: greedy with the KV cache equals without, under bf16", "eval.py export",
                 "bench.py train"):
        assert f"check: PASS {item}" in result.stdout, item
    assert "check: FAIL" not in result.stdout and "bench: nca_raw_tokens_per_s=" in result.stdout


# =============================================================================
# nothing lost, nobody in

def test_a_second_run_on_the_same_out_dir_is_refused_and_the_first_is_intact(tmp_path, tiny_data):
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "200", "--eval_interval", "20")
    log_path = tmp_path / "out" / "pretrain" / "log.jsonl"
    first = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (log_path.exists() and log_path.stat().st_size > 0):
        time.sleep(0.02)
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"in use by another run \(pid \d+: .*train.py"):
        train.main(flags)
    assert time.time() - t0 < 5
    assert first.wait(timeout=120) == 0, first.stderr.read()
    assert [r["iter"] for r in read_log(log_path)] == list(range(0, 201, 20))
    assert torch.load(log_path.parent / "ckpt.pt", weights_only=True)["iter_num"] == 200


def test_a_finished_run_is_not_replaced_by_the_same_command(tmp_path, tiny_data):
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "2", "--finetune_iters", "2",
                      "--eval_interval", "2")
    train.main(flags)
    saved = {s: (tmp_path / "out" / s / "ckpt.pt").read_bytes() for s in train.STAGES}
    logs = {s: (tmp_path / "out" / s / "log.jsonl").read_bytes() for s in train.STAGES}
    t0 = time.time()
    result = subprocess.run([sys.executable, "train.py", *flags], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 1 and time.time() - t0 < 5 * 3  # three python startups at most on a busy machine
    assert "exists, and a run without --resume would replace it" in result.stderr and len(
        result.stderr.strip().splitlines()) == 1, result.stderr
    with pytest.raises(RuntimeError, match="--resume"):  # one stage of it too
        train.main(flags + ["--stage", "pretrain"])
    assert saved == {s: (tmp_path / "out" / s / "ckpt.pt").read_bytes() for s in train.STAGES}
    assert logs == {s: (tmp_path / "out" / s / "log.jsonl").read_bytes() for s in train.STAGES}
    train.main(flags + ["--resume"])  # what the message says to do: every stage is complete
    assert saved == {s: (tmp_path / "out" / s / "ckpt.pt").read_bytes() for s in train.STAGES}


def test_the_lock_holds_the_whole_out_dir_for_every_stage_of_a_run(tmp_path, tiny_data):
    """A run of all stages, and a second one on the same out_dir for stage 2 alone: refused while the first is still
    in stage 1, so it cannot finish stage 2 before the first reaches it and overwrites it."""
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "300", "--pretrain_iters", "2", "--finetune_iters",
                      "0", "--eval_interval", "100")
    first = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "out" / "prepretrain" / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (log_path.exists() and log_path.stat().st_size > 0):
        time.sleep(0.02)
    with pytest.raises(RuntimeError, match=r"in use by another run \(pid \d+: .*train.py"):
        train.main(flags + ["--stage", "pretrain"])
    first.kill()
    first.wait()


def test_resume_refuses_a_checkpoint_of_another_stage(tmp_path, tiny_data, capsys):
    """A stage-1 checkpoint copied into the stage-2 folder is not taken for a complete stage 2."""
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "4", "--finetune_iters", "0",
                      "--eval_interval", "2")
    train.main(flags + ["--stage", "prepretrain"])
    os.makedirs(tmp_path / "out" / "pretrain")
    shutil.copy(tmp_path / "out" / "prepretrain" / "ckpt.pt", tmp_path / "out" / "pretrain" / "ckpt.pt")
    with pytest.raises(SystemExit):
        train.main(flags + ["--resume"])
    assert "is a checkpoint of the 'prepretrain' stage, not of 'pretrain'" in capsys.readouterr().err


def test_a_kill_between_log_and_checkpoint_and_a_torn_log_line_resume_to_the_full_log(tmp_path, tiny_data,
                                                                                       monkeypatch):
    common = ["--stage", "pretrain", "--pretrain_iters", "30", "--eval_interval", "10"]
    train.main(run_flags(tmp_path / "a", tiny_data, *common))
    expected = read_log(tmp_path / "a" / "out" / "pretrain" / "log.jsonl")
    flags = run_flags(tmp_path / "b", tiny_data, *common)
    log_path = tmp_path / "b" / "out" / "pretrain" / "log.jsonl"
    saves, save = [], safety.save_checkpoint

    def killed_at_second_save(path, checkpoint):  # the process dies after logging iteration 20, before saving it
        saves.append(checkpoint["iter_num"])
        if len(saves) == 2:
            raise KeyboardInterrupt
        save(path, checkpoint)
    monkeypatch.setattr(safety, "save_checkpoint", killed_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags)
    monkeypatch.setattr(safety, "save_checkpoint", save)
    assert [r["iter"] for r in read_log(log_path)] == [0, 10, 20]  # logged 20, saved 10
    with open(log_path, "a") as f:
        f.write('{"iter": 30, "val_lo')  # and a line torn by a kill mid-write
    train.main(flags + ["--resume"])
    resumed = read_log(log_path)
    assert [(r["iter"], r["val_loss"]) for r in resumed] == [(r["iter"], r["val_loss"]) for r in expected]


def test_resume_refuses_changed_model_or_schedule_flags_and_says_when_it_starts_fresh(tmp_path, tiny_data, capsys):
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "4", "--eval_interval", "2")
    train.main(flags + ["--resume"])
    assert "there is no" in capsys.readouterr().out  # nothing to resume: it says so and starts fresh
    chain = run_flags(tmp_path / "chain", tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "2",
                      "--finetune_iters", "0", "--eval_interval", "2", "--resume")
    train.main(chain)  # --resume from an empty folder still chains: stage 2 starts from stage 1's checkpoint
    assert "pretrain starts from the prepretrain checkpoint" in capsys.readouterr().out
    for changed, message in ((["--n_embd", "32"], "--n_embd 32 (checkpoint: 16)"),
                             (["--pretrain_iters", "8"], "--pretrain_iters 8 (checkpoint: 4)")):
        with pytest.raises(SystemExit):
            train.main(flags + changed + ["--resume"])
        assert message in capsys.readouterr().err


def test_bad_data_stops_at_load_naming_the_file_and_line(tmp_path, tiny_data, capsys):
    enc = get_tokenizer("bytes")
    ids = np.arange(1000) % 256
    save_token_dataset(os.path.join(tiny_data, "wide"), enc, np.append(ids, 300), ids)  # 300 >= vocab 257
    with pytest.raises(ValueError, match=r"wide/train.bin holds token id 300, but its meta.json says vocab_size 257"):
        train.main(run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_data", "wide"))
    arith = os.path.join(tiny_data, "arith")
    good = open(os.path.join(arith, "train.jsonl")).read()
    for bad, message in (('{"prompt": "", "completion": "4"}\n', "record 201: prompt missing or empty"),
                         ('{"prompt": "1+1=", "completion": \n', "line 201: not valid JSON")):
        with open(os.path.join(arith, "train.jsonl"), "w") as f:
            f.write(good + bad)
        with pytest.raises(ValueError, match=f"arith/train.jsonl, {message}"):
            train.main(run_flags(tmp_path, tiny_data, "--stage", "finetune"))


def test_a_failed_save_leaves_no_temporary_file_and_says_when_the_disk_is_full(tmp_path, monkeypatch):
    full_disk = RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")
    path = save_then_fail_the_next_save(tmp_path, monkeypatch, full_disk)
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda p: shutil_usage(0))
    with pytest.raises(RuntimeError, match="the disk is full"):
        safety.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_args": {}, "stage": "pretrain"})
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))


def shutil_usage(free):
    import collections
    return collections.namedtuple("usage", "total used free")(10 ** 9, 10 ** 9 - free, free)


def test_study_controls_shuffled_nca_ramp_schedule_and_torch_init(tmp_path, tiny_data):
    nca_cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)
    cfg = train.TrainConfig(batch_size=3, eval_iters=1, nca_prefetch=False, device="cpu")
    plain, shuffled = (train.NCAData(nca_cfg, cfg, cfg.batch_size, 47, shuffle=s).get_batch("train") for s in (False, True))
    (x, y), (xs, ys) = plain, shuffled
    full, full_s = (torch.cat([a, b[:, -1:]], dim=1) for a, b in ((x, y), (xs, ys)))
    assert torch.equal(full.sort(dim=1).values, full_s.sort(dim=1).values)  # the same tokens in every row ...
    assert torch.equal(full >= nca_cfg.start_token, full_s >= nca_cfg.start_token)  # ... frames where they were
    assert (full != full_s).float().mean() > 0.5 and torch.equal(ys == -1, y == -1)  # ... patches moved
    run = train.Stage("prepretrain", None, None, None, 100, 1e-3, "", "")
    ramp = train.TrainConfig(prepretrain_schedule="ramp", device="cpu")
    lrs = [train.lr_at(dataclasses.replace(run, iter_num=i), ramp) for i in range(100)]
    assert lrs == sorted(lrs) and lrs[-1] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-5)
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "2", "--pretrain_iters", "2", "--finetune_iters",
                      "0", "--eval_interval", "2", "--embed_init", "torch")
    train.main(flags)
    nca, text = (torch.load(tmp_path / "out" / s / "ckpt.pt", weights_only=True)["model"] for s in train.STAGES[:2])
    assert 0.9 < text["embed_tokens.weight"].std() < 1.1  # PyTorch's N(0, 1), not 0.02
    assert nca["embed_tokens.weight"].std() < 0.1  # stage 1 starts small either way
    train.main(flags + ["--prepretrain_iters", "0", "--out_dir", str(tmp_path / "scratch")])  # the scratch twin
    scratch = torch.load(tmp_path / "scratch" / "pretrain" / "ckpt.pt", weights_only=True)["model"]
    assert 0.9 < scratch["embed_tokens.weight"].std() < 1.1


def test_the_training_benchmark_leaves_out_the_warm_up_steps(tmp_path, tiny_data, capsys):
    bench.main(["train", *run_flags(tmp_path, tiny_data, "--prepretrain_iters", "9", "--grad_accum", "2",
                                    "--nca_chunk", "32"), "--peak_tflops", "0.001"])
    line = capsys.readouterr().out.split("bench: ")[1]
    numbers = dict(item.split("=", 1) for item in line.split(" (")[0].split())
    assert f"the last {9 - bench.WARMUP_STEPS} steps" in line
    assert float(numbers["train_tokens_per_s"]) > 0 and float(numbers["nca_filtered_tokens_per_s"]) > 0
    assert 0 < float(numbers["mfu"].rstrip("%")) and float(numbers["peak_memory_gib"]) > 0
    assert bench.peak_flops("cpu") is None  # a CPU has no peak in the table: no MFU rather than a made-up one
    with pytest.raises(ValueError, match="--prepretrain_iters 3 leaves none"):
        bench.main(["train", *run_flags(tmp_path, tiny_data, "--prepretrain_iters", "3")])  # no step after warm-up


def test_bad_flags_fail_before_any_work(tmp_path, tiny_data, capsys):
    not_a_checkpoint = tmp_path / "junk.pt"
    not_a_checkpoint.write_bytes(b"not a checkpoint")
    cases = [(["--stage", "bogus"], "--stage"), (["--pretrain_lr", "5"], "--pretrain_lr"),
             (["--n_embd", "30"], "--n_embd"), (["--pretrain_data", "nope"], "--pretrain_data"),
             (["--block_size", "8"], "--block_size"), (["--reinit", "attn"], "--reinit"),
             (["--init_from", str(not_a_checkpoint)], "not a"), (["--batch_size", "0"], "--batch_size"),
             (["--band", "0.7", "0.2"], "--band"), (["--nca_chunk", "-1"], "--nca_chunk"),
             (["--beta1", "1.5"], "--beta1"),
             (["--beta2", "-0.1"], "--beta2"), (["--weight_decay", "nan"], "--weight_decay"),
             (["--grad_clip", "nan"], "--grad_clip"), (["--identity_bias", "inf"], "--identity_bias"),
             (["--nca_num_rules", "-3"], "--nca_num_rules"), (["--device", "bogus"], "--device 'bogus'"),
             (["--device", "cuda:7"] if torch.cuda.is_available() else ["--device", "cuda"], "--device cuda"),
             (["--freeze", "embedding,head,attention,mlp,norm"], "nothing to train"),
             (["--out_dir", str(not_a_checkpoint)], "is a file"),
             (["--data_dir", str(tmp_path / "typo")], "--data_dir"), (["--eval_interval", "0"], "--eval_interval")]
    for flags, message in cases:
        t0 = time.time()
        with pytest.raises(SystemExit):
            train.main(run_flags(tmp_path, tiny_data, *flags))
        assert message in capsys.readouterr().err, flags
        assert time.time() - t0 < 5, flags
    assert not (tmp_path / "out").exists() and not (tmp_path / "typo").exists()


def test_a_size_that_cannot_fit_is_refused_in_seconds_with_the_memory_it_needs(tmp_path, tiny_data, capsys):
    for flag, value in (("--block_size", "100000000"), ("--batch_size", "10000000")):
        t0 = time.time()
        with pytest.raises(SystemExit):
            train.main(run_flags(tmp_path, tiny_data, flag, value))
        err = capsys.readouterr().err
        assert time.time() - t0 < 10 and flag in err and "GiB (estimate_memory)" in err and "available" in err, err
        assert len(err.strip().splitlines()) == 1  # one line, not argparse's usage first
    assert not (tmp_path / "out").exists()


def test_resume_of_a_complete_stage_still_trims_its_log(tmp_path, tiny_data):
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "4", "--eval_interval", "2")
    train.main(flags)
    log_path = tmp_path / "out" / "pretrain" / "log.jsonl"
    clean = log_path.read_text()
    with open(log_path, "a") as f:  # what a kill after the last checkpoint, or a stray writer, leaves
        f.write('{"iter": 6, "val_loss": 1.0}\nnot json\n{"iter": 2')
    train.main(flags + ["--resume"])
    assert log_path.read_text() == clean


def test_bad_out_dirs_are_refused_in_one_line(tmp_path, tiny_data, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    for out_dir, message in (("", '--out_dir ""'), (str(a_file), "is a file"), (str(a_file / "sub"), "is a file"),
                             ("/proc/x", "cannot write")):
        with pytest.raises(SystemExit):
            train.main(TINY_RUN + ["--data_dir", tiny_data, "--pretrain_data", "tiny", "--out_dir", out_dir])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert a_file.read_text() == "keep me" and not os.path.exists("pretrain")


# =============================================================================
# eval.py

from types import SimpleNamespace

import torch.nn as nn

import eval as evaluate
import probes
from data.common import get_tokenizer, save_pairs_dataset, save_token_dataset
from model import GPT, ModelConfig

TINY_NCA = nca.NCAConfig(grid=6, num_colors=4, patch=2, band_lo=0.0, band_hi=1.0)


def tiny_checkpoint(path, vocab_size=257, data=None, nca_config=None, stage="pretrain", block_size=64, seed=0):
    """Save a train.py-style checkpoint dict of a tiny random GPT; returns the model."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32,
                            rope_theta=500.0))
    data = data or {"name": "tiny", "tokenizer": "bytes", "vocab_size": 257, "eot_token": 256}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), "stage": stage, "data": data,
                "nca_config": nca_config, "iter_num": 1, "tokens_seen": 10, "prior_tokens": 0,
                "best_val_loss": 1.0, "config": {}}, path)
    return model.eval()

# -----------------------------------------------------------------------------
# pass@k


def test_eval_refuses_bad_numbers_and_non_checkpoints_before_loading(tmp_path, capsys):
    path = str(tmp_path / "ckpt.pt")
    tiny_checkpoint(path)
    cases = [(["icl", "--ckpt", path, "--num_rules", "0"], "--num_rules must be >= 1"),
             (["icl", "--ckpt", path, "--max_k", "-1"], "--max_k must be >= 1"),
             (["passk", "--ckpt", path, "--max_problems", "0"], "--max_problems must be >= 1"),
             (["passk", "--ckpt", path, "--temperature", "nan"], "--temperature must be a finite number"),
             (["perplexity", "--ckpt", path, "--block_size", "-5"], "--block_size must be >= 1"),
             (["perplexity", "--ckpt", path, "--batch_size", "0"], "--batch_size must be >= 1"),
             (["icl", "--ckpt", str(tmp_path)], "no checkpoint file at"),
             (["icl", "--ckpt", os.path.join(REPO_ROOT, "README.md")], "is not a checkpoint torch can load safely")]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            evaluate.main(argv + ["--device", "cpu"])


BROKEN_CHECKPOINTS = {  # what is changed in a good checkpoint -> what the one-line refusal says
    "unknown model_args key": (lambda c: c["model_args"].update(foo=1), "model_args holds ['foo']"),
    "n_layer unlike the weights": (lambda c: c["model_args"].update(n_layer=3), "do not fit its model_args"),
    "a block of 10**9": (lambda c: c["model_args"].update(block_size=10 ** 9), "of rotary tables"),
    "no data record": (lambda c: c.pop("data"), "data record"),
    "n_head 3": (lambda c: c["model_args"].update(n_head=3), "model_args.n_embd=32 is not divisible by model_args"),
    "vocab_size 0": (lambda c: c["model_args"].update(vocab_size=0), "model_args.vocab_size=0 must be positive"),
    "vocab_size '257'": (lambda c: c["model_args"].update(vocab_size="257"), "model_args.vocab_size is '257'"),
    "another stage": (lambda c: c.update(stage="warmup"), "its stage 'warmup'"),
}


@pytest.mark.parametrize("case", BROKEN_CHECKPOINTS)
def test_a_checkpoint_is_checked_for_what_it_claims_before_use(tmp_path, tiny_data, capsys, case):
    path = str(tmp_path / "run" / "pretrain" / "ckpt.pt")
    tiny_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    change, message = BROKEN_CHECKPOINTS[case]
    change(checkpoint)
    torch.save(checkpoint, path)
    with pytest.raises(SystemExit) as stop:
        evaluate.main(["perplexity", "--ckpt", path, "--device", "cpu"])
    assert message in str(stop.value) and len(str(stop.value).splitlines()) == 1, str(stop.value)
    with pytest.raises(SystemExit):  # --init_from: refused with the flags, before any stage trains
        train.parse_args(run_flags(tmp_path, tiny_data, "--stage", "finetune", "--init_from", path))
    assert message in capsys.readouterr().err


def test_eval_refuses_a_device_that_is_not_there(tmp_path, monkeypatch):
    path = str(tmp_path / "run" / "pretrain" / "ckpt.pt")
    tiny_checkpoint(path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without a GPU, even on one with
    with pytest.raises(SystemExit, match="--device cuda: torch sees no GPU here"):
        evaluate.main(["perplexity", "--ckpt", path, "--device", "cuda"])


def test_a_pair_longer_than_the_block_is_refused_before_any_stage_trains(tmp_path, tiny_data, capsys):
    records = [{"prompt": "1+1=", "completion": "2\n", "answer": "2"}] * 3
    splits = {"train": records[:2] + [dict(records[0], prompt="x" * 10 ** 6)], "val": records, "test": records}
    save_pairs_dataset(str(tmp_path / "data" / "long"), splits, "long", "\n")
    with pytest.raises(SystemExit):
        train.parse_args(run_flags(tmp_path, tiny_data, "--finetune_data", "long"))
    err = capsys.readouterr().err
    assert "long/train.jsonl, record 3: its prompt + completion is 1000002 tokens" in err, err


def test_passk_says_when_it_crops_a_prompt(tmp_path, capsys):
    records = [{"prompt": "1+1=", "completion": "2\n", "answer": "2"}, {"prompt": "9" * 60 + "=", "completion": "1\n",
                                                                      "answer": "1"}]
    save_pairs_dataset(str(tmp_path / "task"), {"train": records, "val": records, "test": records}, "task", "\n")
    path = str(tmp_path / "run" / "finetune" / "ckpt.pt")
    tiny_checkpoint(path, stage="finetune", data={"name": "task", "tokenizer": "bytes", "vocab_size": 257,
                                                  "eot_token": 256})
    evaluate.main(["passk", "--ckpt", path, "--data_dir", str(tmp_path / "task"), "--n", "2", "--k", "1",
                   "--max_new_tokens", "8", "--device", "cpu"])
    assert "passk: 1 of 2 prompts and their completion of up to 8 tokens exceed the model's block of 64" in \
        capsys.readouterr().out


def test_pass_at_k_matches_hand_computed_values():
    assert evaluate.pass_at_k(5, 1, 1) == pytest.approx(0.2)
    assert evaluate.pass_at_k(5, 2, 2) == pytest.approx(0.7)         # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert evaluate.pass_at_k(10, 3, 4) == pytest.approx(1 - math.comb(7, 4) / math.comb(10, 4))
    assert evaluate.pass_at_k(4, 0, 1) == 0.0 and evaluate.pass_at_k(4, 0, 4) == 0.0
    assert evaluate.pass_at_k(4, 4, 1) == 1.0 and evaluate.pass_at_k(4, 3, 2) == 1.0  # n - c < k
    assert evaluate.pass_at_k(200, 1, 1) == pytest.approx(1 / 200)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(4, 1, 5)


def test_passk_command_on_a_tiny_task(tmp_path, capsys):
    records = [{"prompt": f"assert {a} + 1 == ", "completion": f"{a + 1}\n", "answer": str(a + 1)} for a in range(3)]
    save_pairs_dataset(str(tmp_path / "task"), {"test": records}, task="task", stop="\n")
    tiny_checkpoint(str(tmp_path / "run/finetune/ckpt.pt"), stage="finetune",
                    data={"name": "task", "tokenizer": "bytes", "vocab_size": 257, "eot_token": 256})
    results = evaluate.main(["passk", "--ckpt", str(tmp_path / "run/finetune/ckpt.pt"), "--data_dir",
                             str(tmp_path / "task"), "--n", "4", "--k", "1", "2", "--max_new_tokens", "4",
                             "--device", "cpu"])
    assert set(results) == {"pass@1", "pass@2", "greedy"}
    assert all(0 <= v <= 1 for v in results.values())  # a random model: the numbers exist and are probabilities
    assert "pass@1=" in capsys.readouterr().out


def test_decode_completions_cuts_at_end_of_text():
    enc = get_tokenizer("bytes")
    rows = torch.tensor([list(b"12\nxy"), list(b"7") + [256, 65, 66, 67]])
    assert evaluate.decode_completions(enc, rows) == ["12\nxy", "7"]
    assert evaluate.stop_token_of(enc, "\n") == 10 and evaluate.stop_token_of(enc, "\n\n") == 256

# -----------------------------------------------------------------------------
# NCA in-context accuracy


class GreedyFake(nn.Module):
    """A stand-in for GPT whose forward gives the last position's logits: generate feeds its argmax back in."""

    def generate(self, idx, max_new_tokens, temperature=1.0):
        assert temperature == 0  # icl_accuracy decodes greedily
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, self(idx)[0][:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        return idx


class AnswerLookup(GreedyFake):
    """A 'perfect predictor' given the answers: its logits put all weight on the true next token of each row."""

    def __init__(self, sequences, vocab_size):
        super().__init__()
        self.sequences, self.vocab_size = sequences, vocab_size

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        # it only ever sees true prefixes: icl_accuracy must feed it the right context, and its own (true) outputs
        assert torch.equal(idx, self.sequences[:, :T])
        return F.one_hot(self.sequences[:, T], self.vocab_size).float()[:, None, :], None


class Constant(GreedyFake):
    def __init__(self, token, vocab_size):
        super().__init__()
        self.token, self.vocab_size = token, vocab_size

    def forward(self, idx, targets=None):
        return F.one_hot(torch.full((idx.shape[0], 1), self.token), self.vocab_size).float(), None


def test_icl_accuracy_perfect_and_constant_predictors():
    cfg, max_k = TINY_NCA, 3
    sequences = evaluate.held_out_sequences(cfg, 16, max_k + 1, seed=7)
    assert sequences.shape == (16, (max_k + 1) * cfg.frame_len)
    frames = nca.decode(sequences, cfg)  # whole frames, so the sequences are well formed
    assert frames.shape == (16, max_k + 1, 6, 6)
    perfect = evaluate.icl_accuracy(AnswerLookup(sequences, cfg.vocab_size), sequences, cfg, max_k, log=lambda m: 0)
    assert perfect["k"] == [1, 2, 3]
    assert perfect["cell_accuracy"] == [1.0] * max_k and perfect["frame_accuracy"] == [1.0] * max_k
    constant = evaluate.icl_accuracy(Constant(0, cfg.vocab_size), sequences, cfg, max_k, log=lambda m: 0)
    assert max(constant["cell_accuracy"]) < 0.5 and max(constant["frame_accuracy"]) < 0.5
    # a model that writes START where patches belong gets those cells wrong, whatever they are
    delimiters = evaluate.icl_accuracy(Constant(cfg.start_token, cfg.vocab_size), sequences, cfg, 1, log=print)
    assert delimiters["cell_accuracy"] == [0.0]
    assert perfect["copy_accuracy"] == constant["copy_accuracy"]  # the copy baseline depends on the data only


def test_held_out_rules_are_disjoint_from_training_and_deterministic():
    a = evaluate.held_out_sequences(TINY_NCA, 4, 2, seed=3)
    assert torch.equal(a, evaluate.held_out_sequences(TINY_NCA, 4, 2, seed=3))
    stream = nca.NCAStream(TINY_NCA, 4, 20, seed=3, held_out=True)
    assert (stream.seeds(nca.RULE_SEEDS, torch.arange(1000)) >= 2 ** 31).all()  # training seeds are < 2^31


def test_icl_command_writes_a_plot_and_rejects_text_checkpoints(tmp_path, capsys):
    cfg = TINY_NCA
    data = {"name": "nca", "tokenizer": None, "vocab_size": cfg.vocab_size, "eot_token": None}
    path = str(tmp_path / "run/prepretrain/ckpt.pt")
    tiny_checkpoint(path, vocab_size=cfg.vocab_size, data=data, nca_config=asdict(cfg), stage="prepretrain")
    results = evaluate.main(["icl", "--ckpt", path, "--num_rules", "4", "--max_k", "2", "--device", "cpu"])
    assert len(results["cell_accuracy"]) == 2
    assert os.path.getsize(tmp_path / "run/prepretrain/icl.png") > 0
    assert "| 2 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--max_k 5"):  # 6 frames of 20 tokens do not fit block_size 64
        evaluate.icl_accuracy(evaluate.load_model(path, "cpu")[0], torch.zeros(1, 200, dtype=torch.long), cfg, 5)
    text = str(tmp_path / "text/pretrain/ckpt.pt")
    tiny_checkpoint(text)
    with pytest.raises(SystemExit, match="not NCA"):
        evaluate.main(["icl", "--ckpt", text, "--device", "cpu"])

# -----------------------------------------------------------------------------
# in-context learning probe


class ContextBlind(nn.Module):
    """Logits from the current token alone (an embedding, then a linear map): context cannot help it."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)
        self.embed, self.head = nn.Embedding(vocab_size, 16), nn.Linear(16, vocab_size)

    def forward(self, idx, targets=None):
        logits = self.head(self.embed(idx))
        return logits, None if targets is None else F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                                      ignore_index=-1)


class Copier(nn.Module):
    """A perfect induction head for two copies of block_size // 2 = L tokens: uniform logits before position L; from
    position L on, a logit of 100 on the token L positions back from the target (L - 1 back from the input)."""

    def __init__(self, vocab_size, block_size):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab_size, block_size=block_size)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        L, V = self.config.block_size // 2, self.config.vocab_size
        logits = torch.zeros(B, T, V)
        logits[:, L:] = 100.0 * F.one_hot(idx[:, 1:T - L + 1], V)
        return logits, None


def test_probe_scores_a_context_blind_model_near_zero():
    V, T, B = 64, 128, 64
    model = ContextBlind(V, T)
    tokens = torch.randint(V, (B, T + 1), generator=torch.Generator().manual_seed(1))
    batches = [(tokens[:32, :-1], tokens[:32, 1:]), (tokens[32:, :-1], tokens[32:, 1:])]
    losses = probes.loss_by_position(model, batches)
    with torch.no_grad():
        per_token = F.cross_entropy(model(tokens[:, :-1])[0].flatten(0, 1), tokens[:, 1:].flatten(),
                                    reduction="none").view(B, T)
    assert losses.dtype == np.float64 and np.allclose(losses, per_token.mean(dim=0).numpy(), atol=1e-5)
    icl = probes.in_context_score(losses)
    assert icl["early"] == (6, 19) and icl["late"] == (108, 128)  # [5%, 15%) and [85%, 100%) of 128 positions
    # i.i.d. tokens: every position's loss is an independent draw of one distribution, so the difference of the two
    # window means is 0 within 5 standard errors (13 and 20 positions of 64 rows)
    standard_error = per_token.std().item() * math.sqrt(1 / (B * 13) + 1 / (B * 20))
    assert abs(icl["icl_score"]) < 5 * standard_error
    # the two copies hold the same (input, target) pairs, so a context-blind model scores 0 up to rounding
    induction = probes.induction_score(model, V, T, "cpu")
    assert induction["induction_score"] == pytest.approx(0.0, abs=1e-5)
    assert induction["loss_first_copy"] > math.log(V) - 0.5  # random tokens: nothing to predict them from


def test_in_context_score_windows_whole_frames_after_the_masked_first():
    L, T = 10, 100
    place = (np.arange(T) + 1) % L  # the target of position t is token t + 1; place 0 is a frame's START
    frame = (np.arange(T) + 1) // L
    periodic = np.where(place == 0, 0.0, 1.0)  # START is free to predict, every other token costs 1
    periodic[:L - 1] = np.nan  # the first frame is masked, as NCAStream does
    by_frames = probes.in_context_score(periodic, frame_len=L)
    assert by_frames["icl_score"] == 0.0  # whole frames: START counts the same in both windows
    assert by_frames["early"] == (9, 19) and by_frames["late"] == (79, 99)  # frames 1, and 8-9 of 1..9
    assert np.isnan(by_frames["loss_by_frame"][[0, 10]]).all()  # masked frame 0, frame 10 cut by the block
    assert probes.in_context_score(periodic)["icl_score"] != 0.0  # positions: START's share differs by window
    falling = np.where(frame > 0, periodic * 2.0 / np.maximum(frame, 1), np.nan)
    result = probes.in_context_score(falling, frame_len=L)
    assert result["loss_early"] == pytest.approx(1.8) and result["loss_late"] == pytest.approx((1.8 / 8 + 1.8 / 9) / 2)
    assert result["icl_score"] < 0
    assert probes.in_context_score(falling, first_scored=29, frame_len=L)["early"] == (29, 39)  # from frame 3


def test_induction_score_of_a_perfect_copier_is_minus_log_v():
    V, T = 50, 64
    result = probes.induction_score(Copier(V, T), V, T, "cpu", exclude=(0, V - 1))
    assert result["copy_accuracy"] == 1.0 and result["loss_second_copy"] < 1e-6
    assert result["loss_first_copy"] == pytest.approx(math.log(V), rel=1e-6)  # uniform logits
    assert result["induction_score"] == pytest.approx(-math.log(V), rel=1e-5)
    tokens = probes.repeated_random_tokens(V, 32, 8, seed=0, exclude=(0, V - 1, None))
    assert torch.equal(tokens[:, :32], tokens[:, 32:]) and tokens.min() >= 1 and tokens.max() <= V - 2
    assert torch.equal(tokens, probes.repeated_random_tokens(V, 32, 8, seed=0, exclude=(0, V - 1)))


def test_probe_on_a_tiny_gpt_and_the_probe_command(tmp_path, capsys):
    cfg = TINY_NCA
    data = {"name": "nca", "tokenizer": None, "vocab_size": cfg.vocab_size, "eot_token": None}
    path = str(tmp_path / "run/prepretrain/ckpt.pt")
    model = tiny_checkpoint(path, vocab_size=cfg.vocab_size, data=data, nca_config=asdict(cfg), stage="prepretrain")
    model.train()
    val = [nca.NCAStream(cfg, 4, 64, seed=0, held_out=True).next_batch()]
    keys = {"icl_score", "loss_early", "loss_late", "loss_first_copy", "loss_second_copy", "induction_score",
            "copy_accuracy"}
    for autocast in (None, torch.autocast("cpu", dtype=torch.bfloat16)):
        result = probes.probe(model, val, cfg.vocab_size, 64, "cpu", autocast, frame_len=cfg.frame_len,
                                exclude=(cfg.start_token, cfg.end_token))
        assert set(result) == keys and all(type(v) is float and math.isfinite(v) for v in result.values())
    assert model.training  # put back in the mode it was in
    assert set(evaluate.main(["probe", "--ckpt", path, "--batch_size", "4", "--num_batches", "2",
                              "--device", "cpu"])) == keys
    assert "loss by frame: 1:" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "run/prepretrain/probe.png") > 0
    save_token_dataset(str(tmp_path / "tiny"), get_tokenizer("bytes"), np.arange(500) % 257, np.arange(300) % 257)
    text = str(tmp_path / "text/pretrain/ckpt.pt")
    tiny_checkpoint(text)
    evaluate.main(["probe", "--ckpt", text, "--data_dir", str(tmp_path / "tiny"), "--out", str(tmp_path / "t.png"),
                   "--device", "cpu"])
    assert "loss by position: 0-7:" in capsys.readouterr().out and os.path.getsize(tmp_path / "t.png") > 0

# -----------------------------------------------------------------------------
# comparing runs


def test_speedup_on_synthetic_curves():
    tokens = np.array([0, 100, 200, 300, 400], dtype=float)
    losses = np.array([5.0, 3.0, 2.0, 1.5, 1.2])
    assert study.speedup((tokens, losses), (tokens, losses)) == pytest.approx(1.0)
    assert study.speedup((tokens, losses), (tokens / 2, losses)) == pytest.approx(2.0)
    assert study.speedup((tokens, losses), (tokens * 1.25, losses)) == pytest.approx(0.8)
    assert study.speedup((tokens, losses), (tokens, losses + 0.5)) is None  # never reaches 1.2
    # the crossing is interpolated between eval points: 1.2 is reached halfway from 300 (1.4) to 400 (1.0)
    assert study.speedup((tokens, losses), (tokens, np.array([5, 3, 2, 1.4, 1.0]))) == pytest.approx(400 / 350)


def write_log(run_dir, stage, tokens, losses, prior=0):
    os.makedirs(os.path.join(run_dir, stage))
    with open(os.path.join(run_dir, stage, "log.jsonl"), "w") as f:
        for i, (t, loss) in enumerate(zip(tokens, losses)):
            f.write(json.dumps({"iter": i * 10, "tokens": t, "prior_tokens": prior, "lr": 1e-3,
                                "train_loss": None, "val_loss": loss, "elapsed": 1.0}) + "\n")


def test_compare_two_runs_table_and_plot(tmp_path, capsys):
    tokens = [0, 100, 200, 300]
    write_log(tmp_path / "scratch", "pretrain", tokens, [5.0, 2.0, 1.5, 1.2])
    write_log(tmp_path / "nca", "pretrain", tokens, [5.0, 1.6, 1.2, 1.0], prior=100)
    out = str(tmp_path / "compare.png")
    table = study.main(["compare", "--runs", str(tmp_path / "*"), "--out", out])
    assert os.path.getsize(out) > 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["nca"][1:4] == ["1.0000", f"{math.exp(1.0):.3f}", "-16.7%"]     # final loss 1.0 vs 1.2
    assert rows["nca"][4] == f"{100 * (math.exp(-0.2) - 1):.1f}%"
    assert rows["nca"][5] == "1.50x"   # scratch needs 300 tokens to reach 1.2, nca 200
    assert rows["nca"][6] == "1.00x"   # counting the 100 stage-1 tokens, 300 vs 300
    assert rows["scratch"][1:6] == ["1.2000", f"{math.exp(1.2):.3f}", "0.0%", "0.0%", "1.00x"]
    assert table in capsys.readouterr().out


def test_compare_and_probes_leave_out_a_run_still_running(tmp_path, capsys):
    tokens = [0, 100, 200, 300]
    for arm in ("scratch", "nca"):
        write_log(tmp_path / f"{arm}_seed0", "pretrain", tokens, [5.0, 2.0, 1.5, 1.2])
    write_log(tmp_path / "nca_seed1", "pretrain", tokens[:2], [5.0, 1.1])  # evaluated at 10 of its planned 30 iters
    ckpt_path = tmp_path / "nca_seed1" / "pretrain" / "ckpt.pt"
    tiny_checkpoint(str(ckpt_path))
    torch.save({**torch.load(ckpt_path, weights_only=True), "config": {"pretrain_iters": 30}}, ckpt_path)
    table = study.main(["compare", "--runs", str(tmp_path / "*"), "--out", str(tmp_path / "c.png")])
    assert "left out" in capsys.readouterr().out and "| nca | 1 |" in table  # its 1.1 would have won
    rows = study.main(["probes", "--runs", str(tmp_path / "*"), "--out", str(tmp_path / "p.png")])
    assert [(r["arm"], r["seed"]) for r in rows] == [("nca", 0), ("scratch", 0)]
    assert "nca_seed1: pretrain is at iteration 10 of 30" in capsys.readouterr().out
    os.remove(tmp_path / "nca_seed1" / "pretrain" / "ckpt.pt")  # a stopped run's log kept with its settings only
    with open(tmp_path / "nca_seed1" / "pretrain" / "config.json", "w") as f:
        json.dump({"model_args": {}, "config": {"pretrain_iters": 30}, "nca_config": None}, f)
    table = study.main(["compare", "--runs", str(tmp_path / "*"), "--out", str(tmp_path / "c.png")])
    assert "nca_seed1: pretrain is at iteration 10 of 30" in capsys.readouterr().out and "| nca | 1 |" in table


def test_compare_groups_seeds_into_arms(tmp_path):
    tokens = [0, 100, 200]
    write_log(tmp_path / "scratch_seed0", "pretrain", tokens, [5.0, 2.0, 1.2])
    write_log(tmp_path / "scratch_seed1", "pretrain", tokens, [5.0, 2.2, 1.4])       # baseline mean: 1.3 at 200
    write_log(tmp_path / "nca_seed0", "pretrain", tokens, [5.0, 1.3, 1.0])            # reaches 1.3 at 100
    write_log(tmp_path / "nca_seed1", "pretrain", tokens, [5.0, 1.6, 1.4])            # never reaches 1.3
    arms, rows, baseline = study.compare_runs(sorted(str(p) for p in tmp_path.iterdir()))
    assert baseline == "scratch" and set(arms) == {"scratch", "nca"}
    row = {r["arm"]: r for r in rows}["nca"]
    assert row["runs"] == 2 and row["final_loss"] == [1.0, 1.4]
    assert row["speedup"] == [pytest.approx(2.0), None]
    assert study.format_speedups(row["speedup"], row["speedup_bound"]) == "2.00x (1/2 reached)"
    table = study.markdown_table(rows, baseline)
    assert f"1.2000 ± {np.std([1.0, 1.4], ddof=1):.4f}" in table
    # paired with the scratch run of the same seed: 1.0 - 1.2 and 1.4 - 1.4; one of the two seeds lower
    assert row["paired"] == [pytest.approx(-0.2), pytest.approx(0.0)]
    assert f"-0.1000 ± {np.std([-0.2, 0.0], ddof=1):.4f} (1/2)" in table
    tokens, mean, std = study.difference_curve(arms["nca"], arms["scratch"])
    np.testing.assert_allclose(mean, [0.0, (-0.7 - 0.6) / 2, -0.1])
    study.plot_compare(arms, str(tmp_path / "seeds.png"), "pretrain", baseline)
    assert os.path.getsize(tmp_path / "seeds.png") > 0


def test_probes_pair_runs_by_seed_and_plot_the_scatter(tmp_path, capsys):
    def write(run, stage, val_loss, icl):
        os.makedirs(tmp_path / run / stage, exist_ok=True)
        with open(tmp_path / run / stage / "log.jsonl", "w") as f:
            for loss in (val_loss + 1, val_loss):
                f.write(json.dumps({"iter": 0, "tokens": 0, "prior_tokens": 0, "val_loss": loss, "icl_score": icl,
                                    "induction_score": 2 * icl}) + "\n")
    for seed, base in ((0, 1.50), (1, 1.60)):
        write(f"scratch_seed{seed}", "pretrain", base, -0.01)
        write(f"nca_seed{seed}", "prepretrain", 3.0, -0.2 - seed / 10)
        write(f"nca_seed{seed}", "pretrain", base - 0.02 + seed / 100, -0.05)
    out = str(tmp_path / "scatter.png")
    rows = study.main(["probes", "--runs", str(tmp_path / "*"), "--out", out])
    nca_rows = sorted((r for r in rows if r["arm"] == "nca"), key=lambda r: r["seed"])
    assert [r["gain"] for r in nca_rows] == pytest.approx([-0.02, -0.01])  # paired with scratch of the same seed
    assert [r["icl_score_1"] for r in nca_rows] == pytest.approx([-0.2, -0.3])
    table = capsys.readouterr().out
    assert "| nca | 2 | -0.0150 ± 0.0071 (2/2) | -0.2500 ± 0.0707 |" in table and os.path.exists(out)


def test_two_sided_p_of_student_t():
    assert study.two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-6)         # Cauchy: 1 - 2 atan(t) / pi
    assert study.two_sided_p(3.0, 1) == pytest.approx(1 - 2 * math.atan(3.0) / math.pi, abs=1e-6)
    assert study.two_sided_p(2.776445, 4) == pytest.approx(0.05, abs=1e-5)    # the tables' 97.5% point
    assert study.two_sided_p(0.0, 3) == pytest.approx(1.0) and study.two_sided_p(math.inf, 2) == 0.0
    assert study.paired_t([0.1]) is None
    t, p = study.paired_t([-0.01, -0.02, -0.03])
    assert t == pytest.approx(-0.02 / (0.01 / math.sqrt(3))) and p == pytest.approx(study.two_sided_p(t, 2))


def write_sized_run(run_dir, width, final_loss, dtype="float32"):
    write_log(run_dir, "pretrain", [0, 100], [5.0, final_loss])
    args = {**asdict(ModelConfig()), "vocab_size": 257, "n_embd": width}
    with open(os.path.join(run_dir, "pretrain", "config.json"), "w") as f:
        json.dump({"model_args": args, "config": {"dtype": dtype}, "nca_config": None}, f)


def test_size_pairs_each_run_with_scratch_of_its_width_and_seed(tmp_path, capsys):
    for seed, base in ((0, 1.50), (1, 1.60), (2, 1.55)):  # width 32: nca lower on 2 of 3 seeds
        write_sized_run(str(tmp_path / f"scratch_seed{seed}"), 32, base)
        write_sized_run(str(tmp_path / f"nca_seed{seed}"), 32, base + (-0.02, -0.04, 0.03)[seed])
        write_sized_run(str(tmp_path / f"scratch-w64_seed{seed}"), 64, base - 0.1)
        write_sized_run(str(tmp_path / f"nca-w64_seed{seed}"), 64, base - 0.1 - 0.01 * (seed + 1))
    write_sized_run(str(tmp_path / "dyck-w64_seed5"), 64, 1.0)  # no scratch twin: left out, named
    out = str(tmp_path / "size.png")
    table = study.main(["size", "--runs", str(tmp_path / "*_seed*"), "--out", out])
    assert "left out" in capsys.readouterr().out and os.path.getsize(out) > 0
    rows = {(line.split("|")[1].strip(), line.split("|")[2].strip()): [c.strip() for c in line.split("|")[3:-1]]
            for line in table.splitlines()[2:]}
    assert set(rows) == {("nca", "32"), ("nca", "64")}
    small, big = rows["nca", "32"], rows["nca", "64"]
    gains = [-0.02, -0.04, 0.03]
    assert small[1:4] == ["3", f"{np.mean(gains):.4f} ± {np.std(gains, ddof=1):.4f} (2/3)", "-0.020 -0.040 +0.030"]
    assert study.mean_std([0.01, 0.03], 4, signed=True) == "+0.0200 ± 0.0141"  # a difference keeps its sign
    t, p = study.paired_t(gains)
    assert small[4:] == [f"{t:+.2f}", f"{p:.2f}"]
    assert big[2:4] == ["-0.0200 ± 0.0100 (3/3)", "-0.010 -0.020 -0.030"] and big[4] == "-3.46"
    with torch.device("meta"):
        assert int(big[0].replace(",", "")) == GPT(ModelConfig(vocab_size=257, n_embd=64)).num_params()


def test_carried_pairs_each_component_arm_with_scratch_by_width_and_seed(tmp_path):
    offsets = {"nca": (-0.02, -0.01, -0.03), "nca-attention-only": (-0.03, -0.02, -0.04),
               "nca-mlp-only": (0.01, 0.02, 0)}
    for width, suffix, dtype, shift in ((32, "", "float32", 0), (64, "-w64", "float32", 0),
                                        (64, "-w64-bf16", "bfloat16", 0.5)):  # bf16 pairs with bf16 only
        for seed, base in ((0, 1.50), (1, 1.60), (2, 1.55)):
            write_sized_run(str(tmp_path / f"scratch{suffix}_seed{seed}"), width, base + shift, dtype)
            for arm, offset in offsets.items():
                write_sized_run(str(tmp_path / f"{arm}{suffix}_seed{seed}"), width, base + shift + offset[seed], dtype)
    out = str(tmp_path / "carried.png")
    table = study.main(["carried", "--runs", str(tmp_path / "*_seed*"), "--out", out])
    assert os.path.getsize(out) > 0 and table.count("Width ") == 3
    assert "Width 64 bfloat16 (" in table and "final loss 2.0500 ± 0.0500 over 3 seeds" in table
    assert "scratch (nothing carried): final loss 1.5500 ± 0.0500 over 3 seeds" in table
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines()
            if line.startswith("| attention |")]
    gains = offsets["nca-attention-only"]
    losses = [base + gain for base, gain in zip((1.50, 1.60, 1.55), gains)]
    assert rows[0][:6] == ["attention", "nca-attention-only", "3", study.mean_std(losses, 4),
                           f"{np.mean(gains):+.4f} ± {np.std(gains, ddof=1):.4f} (3/3)", "-0.030 -0.020 -0.040"]
    assert [r[1] for r in rows] == ["nca-attention-only", "nca-attention-only-w64", "nca-attention-only-w64-bf16"]
    assert [r[4] for r in rows] == [rows[0][4]] * 3  # each paired with scratch of its own width and precision
    assert "| MLP | nca-mlp-only | 3 |" in table and "| attention + MLP | nca | 3 |" in table
    again = study.main(["carried", "--runs", str(tmp_path / "*_seed*"), str(tmp_path / "nca*_seed*"), "--out", out])
    assert again == table  # a run two patterns match counts once


def test_size_names_a_run_without_settings(tmp_path):
    write_log(tmp_path / "nca_seed0", "pretrain", [0, 10], [2.0, 1.0])
    with pytest.raises(SystemExit, match="no .*config.json; train.py writes it"):
        study.main(["size", "--runs", str(tmp_path / "nca_seed0"), "--out", str(tmp_path / "s.png")])
    (tmp_path / "nca_seed0" / "pretrain" / "config.json").write_text('["not", "settings"]')
    with pytest.raises(SystemExit, match="config.json is not the settings train.py writes"):
        study.main(["size", "--runs", str(tmp_path / "nca_seed0"), "--out", str(tmp_path / "s.png")])


def test_eval_export_refuses_a_file_as_out_dir(tmp_path, capsys):
    a_file = tmp_path / "hf"
    a_file.write_text("keep me")
    with pytest.raises(SystemExit, match="--out_dir .*is a file"):
        evaluate.main(["export", "--ckpt", str(tmp_path / "missing.pt"), "--out_dir", str(a_file)])
    assert a_file.read_text() == "keep me"


def test_compare_refuses_runs_that_match_nothing_and_names_a_bad_log_line(tmp_path):
    with pytest.raises(SystemExit, match="--runs: .*matches no folder"):
        study.main(["compare", "--runs", str(tmp_path / "nothing_here")])
    with pytest.raises(SystemExit, match="--runs: none of the 1 run"):
        os.makedirs(tmp_path / "empty_run")
        study.main(["compare", "--runs", str(tmp_path / "empty_run")])
    write_log(tmp_path / "scratch", "pretrain", [0, 10], [2.0, 1.0])
    with open(tmp_path / "scratch" / "pretrain" / "log.jsonl", "a") as f:
        f.write("garbage\n")
    with pytest.raises(SystemExit, match=r"log.jsonl, line 3: not valid JSON"):
        study.main(["compare", "--runs", str(tmp_path / "scratch"), "--out", str(tmp_path / "c.png")])


def test_compare_names_a_missing_log_and_an_unknown_baseline(tmp_path):
    write_log(tmp_path / "scratch", "pretrain", [0, 10], [2.0, 1.0])
    with pytest.raises(FileNotFoundError, match="did the run finish stage finetune"):
        study.compare_runs([str(tmp_path / "scratch")], stage="finetune")
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        study.compare_runs([str(tmp_path / "scratch")], baseline="nope")

# -----------------------------------------------------------------------------
# perplexity


def test_perplexity_scores_every_token_once(tmp_path, capsys):
    enc = get_tokenizer("bytes")
    rng = np.random.default_rng(0)
    train, val = rng.integers(0, 257, 500), rng.integers(0, 257, 203)
    save_token_dataset(str(tmp_path / "tiny"), enc, train, val)
    path = str(tmp_path / "run/pretrain/ckpt.pt")
    model = tiny_checkpoint(path)
    loss = evaluate.main(["perplexity", "--ckpt", path, "--data_dir", str(tmp_path / "tiny"), "--block_size", "16",
                          "--batch_size", "4", "--device", "cpu"])
    assert "ppl=" in capsys.readouterr().out.split("in float32\n")[1]  # it says which precision it ran in
    # the same number by hand: 202 targets in windows of 16 (12 full windows and a tail of 10)
    tokens = torch.from_numpy(val.astype(np.int64))
    with torch.no_grad():
        windows = [(tokens[s:min(s + 16, 202)], tokens[s + 1:s + 17]) for s in range(0, 202, 16)]
        losses = [F.cross_entropy(model(x[None], y[None])[0][0], y, reduction="sum") for x, y in windows]
    assert loss == pytest.approx(sum(losses).item() / 202, rel=1e-5)
    assert loss == pytest.approx(math.log(257), abs=0.2)  # an untrained model is near uniform
    short = evaluate.main(["perplexity", "--ckpt", path, "--data_dir", str(tmp_path / "tiny"), "--block_size", "16",
                           "--max_tokens", "32", "--device", "cpu"])
    assert short == pytest.approx(sum(losses[:2]).item() / 32, rel=1e-5)
    half = evaluate.main(["perplexity", "--ckpt", path, "--data_dir", str(tmp_path / "tiny"), "--block_size", "16",
                          "--device", "cpu", "--dtype", "bfloat16"])  # autocast, as a bf16 training run logs it
    assert "in bfloat16 (autocast)" in capsys.readouterr().out and half != loss
    assert half == pytest.approx(loss, abs=0.05)


def test_perplexity_refuses_another_tokenizer(tmp_path):
    save_token_dataset(str(tmp_path / "tiny"), get_tokenizer("bytes"), np.arange(100), np.arange(100))
    path = str(tmp_path / "run/pretrain/ckpt.pt")
    tiny_checkpoint(path, vocab_size=300, data={"name": "x", "tokenizer": "gpt2", "vocab_size": 50257,
                                                "eot_token": 50256})
    with pytest.raises(SystemExit, match="tokenised with bytes .* trained with gpt2"):
        evaluate.main(["perplexity", "--ckpt", path, "--data_dir", str(tmp_path / "tiny"), "--device", "cpu"])
    nca_ckpt = str(tmp_path / "run/prepretrain/ckpt.pt")
    tiny_checkpoint(nca_ckpt, vocab_size=TINY_NCA.vocab_size, nca_config=asdict(TINY_NCA), stage="prepretrain",
                    data={"name": "nca", "tokenizer": None, "vocab_size": TINY_NCA.vocab_size, "eot_token": None})
    with pytest.raises(SystemExit, match="trained on nca tokens, not text"):
        evaluate.main(["perplexity", "--ckpt", nca_ckpt, "--device", "cpu"])
    with pytest.raises(SystemExit, match="no checkpoint file at"):
        evaluate.main(["perplexity", "--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"])

# -----------------------------------------------------------------------------
# export to Hugging Face


def from_hf_names(hf_state_dict):
    """The inverse of export.to_hf_names."""
    state_dict = {}
    for name, tensor in hf_state_dict.items():
        if name != "lm_head.weight" and not name.startswith("model."):
            raise ValueError(f"{name!r} is not a LlamaForCausalLM parameter name")
        state_dict[name if name == "lm_head.weight" else name[len("model."):]] = tensor
    return state_dict


def export_tiny(tmp_path):
    path = str(tmp_path / "run/pretrain/ckpt.pt")
    model = tiny_checkpoint(path)
    evaluate.main(["export", "--ckpt", path, "--out_dir", str(tmp_path / "hf")])
    return model, tmp_path / "hf"


def exported_weights(out_dir):
    """The state dict eval.py export wrote: model.safetensors where safetensors is installed, else pytorch_model.bin."""
    if (out_dir / "model.safetensors").exists():
        assert not (out_dir / "pytorch_model.bin").exists()
        return pytest.importorskip("safetensors.torch").load_file(str(out_dir / "model.safetensors"))
    return torch.load(out_dir / "pytorch_model.bin", weights_only=True)


def test_export_names_map_back_to_the_same_state_dict(tmp_path):
    model, out_dir = export_tiny(tmp_path)
    hf_state = exported_weights(out_dir)
    assert "lm_head.weight" in hf_state and "model.embed_tokens.weight" in hf_state
    assert all(k == "lm_head.weight" or k.startswith("model.") for k in hf_state)
    ours = model.state_dict()
    back = from_hf_names(hf_state)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["intermediate_size"] == model.config.hidden_dim and config["rope_theta"] == 500.0
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 2
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["LlamaForCausalLM"]


def test_export_round_trip_through_transformers(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model, out_dir = export_tiny(tmp_path)
    assert "config.json and model.safetensors" in capsys.readouterr().out  # transformers brings safetensors
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_export_without_safetensors_writes_pytorch_model_bin_and_says_so(tmp_path, monkeypatch, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "model.safetensors").write_text("an earlier export")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import safetensors.torch raises ImportError
    model, out_dir = export_tiny(tmp_path)
    assert "config.json and pytorch_model.bin" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == ["config.json", "pytorch_model.bin"]  # one model in the folder
    back = from_hf_names(exported_weights(out_dir))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


# =============================================================================
# robustness: nothing lost

def save_then_fail_the_next_save(tmp_path, monkeypatch, error):
    """A checkpoint of ones at tmp_path/ckpt.pt; then torch.save writes part of a file and raises error."""
    path = str(tmp_path / "ckpt.pt")
    safety.save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}, "stage": "pretrain"})

    def fail_mid_write(obj, f):
        with open(f, "wb") as handle:
            handle.write(b"part of a checkpoint")
        raise error
    monkeypatch.setattr(torch, "save", fail_mid_write)
    return path


def test_interrupted_save_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = save_then_fail_the_next_save(tmp_path, monkeypatch, KeyboardInterrupt)  # the process dies mid-write
    with pytest.raises(KeyboardInterrupt):
        safety.save_checkpoint(path, {"model": {"w": torch.zeros(3)}, "model_args": {}, "stage": "pretrain"})
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))


def test_sigkill_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    """A real process killed while torch.save is writing a big checkpoint: the old file must survive intact."""
    path = tmp_path / "ckpt.pt"
    safety.save_checkpoint(str(path), {"model": {"w": torch.ones(3)}, "model_args": {}, "stage": "pretrain"})
    script = ("import sys, torch, safety; safety.save_checkpoint(sys.argv[1], {'model': {'w': torch.zeros(200_000_000)}, "
              "'model_args': {}, 'stage': 'pretrain'})")
    proc = subprocess.Popen([sys.executable, "-c", script, str(path)], cwd=REPO_ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None and not any(
            tmp.stat().st_size > 0 for tmp in tmp_path.glob("ckpt.pt.*.tmp")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the save finished before it could be killed"
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_data):
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "4", "--eval_interval", "2")
    train.main(flags)
    ckpt_path = tmp_path / "out" / "pretrain" / "ckpt.pt"
    good = torch.load(ckpt_path, weights_only=True)
    poisoned = dict(good, model={k: v.clone() for k, v in good["model"].items()})
    poisoned["model"]["layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    torch.save(poisoned, tmp_path / "poisoned.pt")
    with pytest.raises(RuntimeError, match="validation loss is nan at iteration 0.*No checkpoint of this stage"):
        train.main(flags + ["--init_from", str(tmp_path / "poisoned.pt"), "--out_dir", str(tmp_path / "poisoned")])
    assert not (tmp_path / "poisoned" / "pretrain" / "ckpt.pt").exists()
    after = torch.load(ckpt_path, weights_only=True)
    assert after["iter_num"] == 4 and torch.equal(after["model"]["norm.weight"], good["model"]["norm.weight"])


# =============================================================================
# several processes: torchrun + gloo on CPU

def test_ranks_draw_different_data(tmp_path, tiny_data):
    cfg = train.TrainConfig(data_dir=tiny_data, batch_size=4, eval_iters=1, device="cpu")
    nca_cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)
    for stage in ("prepretrain", "pretrain"):
        cfg.pretrain_data = "tiny"
        first = [train.make_data(stage, cfg, nca_cfg, 48, "bytes", train.Dist(rank=rank, world=2, batch_size=4))
                 .get_batch("train")[0] for rank in (0, 1)]
        assert not torch.equal(first[0], first[1]), stage


def test_prefetched_nca_batches_and_their_resume_state_match_the_plain_stream():
    nca_cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)

    def data(prefetch):
        return train.NCAData(nca_cfg, train.TrainConfig(eval_iters=1, nca_prefetch=prefetch, device="cpu"), 3, 48)

    plain, ahead = data(False), data(True)
    for _ in range(3):
        assert torch.equal(plain.get_batch("train")[0], ahead.get_batch("train")[0])
    ahead.prefetch.wait()  # the 4th batch is made ahead (as during a training step) ...
    state = ahead.state_dict()  # ... but the state taken now must be the one after 3 batches
    expected = [plain.get_batch("train")[0] for _ in range(2)]
    assert [torch.equal(ahead.get_batch("train")[0], e) for e in expected] == [True, True]
    resumed = data(True)
    resumed.get_batch("train")  # its thread is now making a batch ahead, which the rewind must discard
    resumed.load_state_dict(state)
    assert [torch.equal(resumed.get_batch("train")[0], e) for e in expected] == [True, True]


def torchrun(*args, env=None):
    """`torchrun --standalone --nproc_per_node 2 ARGS`: 2 gloo processes, one thread each. A rank that crashes prints
    every thread's Python stack (faulthandler)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True)


def ranks_stderr(result):
    """What the ranks wrote to stderr, without the launcher's traceback that follows it (which fills a short tail)."""
    return result.stderr.split('Traceback (most recent call last):\n  File "<frozen runpy>"')[0][-3000:]


def test_two_process_gloo_run_of_all_stages_from_an_empty_out_dir(tmp_path, tiny_data):
    """Only rank 0 saves a stage's checkpoint; the other ranks must wait for it before the next stage loads it."""
    # the command as users type it: no --grad_accum, so the 2 processes share each micro-batch of --batch_size 4
    flags = run_flags(tmp_path, tiny_data, "--prepretrain_iters", "4", "--pretrain_iters", "4", "--finetune_iters", "4",
                      "--eval_interval", "2")
    result = torchrun("train.py", *flags)
    assert result.returncode == 0, ranks_stderr(result)
    assert "2 processes share each step's 4 x 1 sequences: 1 micro-step(s) of 2 per process" in result.stdout
    assert "FutureWarning" not in result.stderr  # DDP's deprecated broadcast_buffers is not used
    for stage in train.STAGES:
        ckpt = torch.load(tmp_path / "out" / stage / "ckpt.pt", weights_only=True)
        assert ckpt["iter_num"] == 4
    assert ckpt["tokens_seen"] > 0 and torch.load(tmp_path / "out" / "pretrain" / "ckpt.pt", weights_only=True)[
        "tokens_seen"] == 4 * 4 * 48  # 4 steps of the global batch of 4 sequences, as one process would


GLOO_EXIT_SCRIPT = """
import os, sys
import train
train.main(sys.argv[1:])
threads = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
print(f"\\nthreads after train.main: {threads}", file=sys.stderr, flush=True)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through Linux's /proc")
def test_a_two_process_run_ends_its_gloo_threads_before_the_interpreter_exits(tmp_path, tiny_data):
    """A process group still alive at exit keeps its gloo threads running while the interpreter shuts down, which
    aborted a rank now and then (SIGABRT, 'terminate called without an active exception'). What kept it alive: the
    default arguments of torch.distributed.nn, imported by DistributedDataParallel after the group was made, and the
    compiled graphs of --compile."""
    script = tmp_path / "gloo_exit.py"
    script.write_text(GLOO_EXIT_SCRIPT)
    flags = run_flags(tmp_path, tiny_data, "--stage", "pretrain", "--pretrain_iters", "2", "--eval_interval", "2",
                      "--compile")
    result = torchrun(str(script), *flags, env={"PYTHONPATH": REPO_ROOT})
    assert result.returncode == 0, ranks_stderr(result)
    lines = re.findall(r"threads after train.main: .*", result.stderr)
    assert len(lines) == 2 and not any("gloo" in line for line in lines), lines


def test_two_process_gloo_run_matches_one_process(tmp_path, tiny_data):
    flags = ["--stage", "pretrain", "--pretrain_iters", "40", "--eval_interval", "20", "--grad_accum", "2",
             "--pretrain_lr", "1e-2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = run_flags(tmp_path / "one", tiny_data, *flags)
    two = run_flags(tmp_path / "two", tiny_data, *flags)
    subprocess.run([sys.executable, "train.py", *one], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    result = torchrun("train.py", *two)
    assert result.returncode == 0, ranks_stderr(result)
    logs = [read_log(tmp_path / run / "out" / "pretrain" / "log.jsonl") for run in ("one", "two")]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]  # the same global batch
    assert logs[1][-1]["val_loss"] < logs[1][0]["val_loss"] - 1.0               # it trains
    assert abs(logs[0][-1]["val_loss"] - logs[1][-1]["val_loss"]) < 1e-4        # one process's run, up to rounding
    assert result.stdout.count("iter 0: val loss") == 1                         # rank 0 alone logs
    ckpt = torch.load(tmp_path / "two" / "out" / "pretrain" / "ckpt.pt", weights_only=True)
    assert len(ckpt["rank_state"]) == 2


def test_ranks_share_one_nca_stream_and_one_pool():
    """Process r of 2 takes every other rule (fresh rules) or pool sequence of the stream `seed`: every rank holds the
    same pool, and the two ranks' batches interleave into one process's batch of twice the rows."""
    cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)  # every rule accepted: fresh rules line up too
    for num_rules in (0, 6):
        one = NCAStream(cfg, 4, 48, seed=3, num_rules=num_rules, chunk=5)
        ranks = [NCAStream(cfg, 2, 48, seed=3, num_rules=num_rules, chunk=5, rank=r, world=2) for r in (0, 1)]
        if num_rules:
            assert all(torch.equal(r.pool, one.pool) for r in ranks)
        for _ in range(4):  # the pool's epochs end in mid-batch (6 rules, 4 sequences a step)
            x = one.next_batch()[0]
            assert torch.equal(ranks[0].next_batch()[0], x[0::2]) and torch.equal(ranks[1].next_batch()[0], x[1::2])


def test_validation_batches_are_the_same_sequences_for_any_number_of_processes(tiny_data):
    cfg = train.TrainConfig(data_dir=tiny_data, batch_size=4, eval_iters=3, device="cpu", pretrain_data="tiny")
    nca_cfg = NCAConfig(grid=6, num_colors=4, band_lo=0.0, band_hi=1.0)

    def targets(batches):  # each row's targets: the padding of a fine-tuning batch depends on its longest row
        return [[row[row != -1].tolist() for row in y] for _, y in batches]
    for stage in train.STAGES:
        one = targets(train.make_data(stage, cfg, nca_cfg, 48, "bytes", train.Dist(batch_size=4)).val)
        two = [targets(train.make_data(stage, cfg, nca_cfg, 48, "bytes", train.Dist(rank=r, world=2, batch_size=2)).val)
               for r in (0, 1)]
        assert len(one) == 3 and [[*a, *b] for a, b in zip(*two)] == [rows[0::2] + rows[1::2] for rows in one], stage


def test_one_and_two_processes_give_the_same_numbers(tmp_path, tiny_data):
    """--batch_size 4 shared by 2 gloo processes (2 rows each): the ranks share one data stream and the validation
    sequences, losses are summed over the ranks, so every stage's curve is one process's (up to rounding). A pool of
    rules: every rank holds the same pool."""
    flags = ["--prepretrain_iters", "4", "--nca_num_rules", "8", "--pretrain_iters", "4", "--finetune_iters", "4",
             "--eval_interval", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "train.py", *run_flags(tmp_path / "one", tiny_data, *flags)], cwd=REPO_ROOT,
                   env=env, check=True, capture_output=True)
    result = torchrun("train.py", *run_flags(tmp_path / "two", tiny_data, *flags))
    assert result.returncode == 0, ranks_stderr(result)
    for stage in train.STAGES:
        one, two = (read_log(tmp_path / run / "out" / stage / "log.jsonl") for run in ("one", "two"))
        assert [(r["iter"], r["tokens"]) for r in one] == [(r["iter"], r["tokens"]) for r in two], stage
        for key in ("val_loss", "train_loss"):
            a, b = [r[key] for r in one[1:]], [r[key] for r in two[1:]]
            assert b == pytest.approx(a, abs=1e-5), (stage, key)
        assert two[0]["val_loss"] == pytest.approx(one[0]["val_loss"], abs=1e-5), stage


def test_split_batch_keeps_the_global_batch_for_any_number_of_processes():
    for batch, accum in ((16, 1), (16, 4), (6, 3)):
        cfg = train.TrainConfig(batch_size=batch, grad_accum=accum, device="cpu")
        for world in (1, 2, 4, 8):
            if (batch * accum) % world or (accum % world and batch % world):
                with pytest.raises(ValueError, match="multiple of"):
                    safety.split_batch(cfg, world)
                continue
            per_rank, micro_steps = safety.split_batch(cfg, world)
            assert per_rank * micro_steps * world == batch * accum, (batch, accum, world)


def test_cuda_rng_state_round_trips_through_a_checkpoint(tmp_path, monkeypatch):
    """The GPU generator (dropout masks on a GPU) is saved and restored with the CPU's. A fake CUDA generator stands
    in for the real one: its state is a byte tensor, as torch.cuda.get_rng_state returns."""
    fake = {"state": torch.arange(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": fake.update(state=state.clone()))
    torch.manual_seed(5)
    state = runtime.rng_state("cuda:1")
    torch.save({"rank_state": [state]}, tmp_path / "ckpt.pt")
    expected_cpu = torch.rand(3)
    fake["state"] = torch.zeros(16, dtype=torch.uint8)  # the run goes on and the generators move
    torch.rand(7)
    runtime.set_rng_state(torch.load(tmp_path / "ckpt.pt", weights_only=True)["rank_state"][0], "cuda:1")
    assert torch.equal(fake["state"], torch.arange(16, dtype=torch.uint8))
    assert torch.equal(torch.rand(3), expected_cpu)
    assert runtime.rng_state("cpu")["cuda_rng"] is None  # a CPU run has no GPU state to save


def test_a_single_process_on_a_second_gpu_makes_it_the_current_one(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv("RANK", raising=False)
    ddp = runtime.setup_distributed(train.TrainConfig(device="cuda:1", batch_size=8, grad_accum=2, dtype="float32"))
    assert chosen == ["cuda:1"] and (ddp.world, ddp.batch_size, ddp.micro_steps) == (1, 8, 2)


def collective_worker(rank, port, lock_dir, results):
    """One of 2 gloo ranks: a NaN on rank 1 alone must reach both, and rank 0's lock refusal must stop both."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    ddp = runtime.Dist(rank=rank, world=2)
    mean = ddp.sum(float("nan") if rank == 1 else 1.0)
    try:
        with safety.run_lock(lock_dir, ddp.master, share=ddp.share):
            refused = None
    except RuntimeError as e:
        refused = str(e)
    results.put((rank, math.isnan(mean), refused))
    torch.distributed.destroy_process_group()


def test_a_nan_or_a_lock_refusal_on_one_rank_stops_every_rank(tmp_path):
    import fcntl
    import socket
    import torch.multiprocessing as mp
    lock_dir = str(tmp_path / "pretrain")
    os.makedirs(lock_dir)
    with open(os.path.join(lock_dir, "lock"), "a+") as held, socket.socket() as s:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        procs = [ctx.Process(target=collective_worker, args=(rank, port, lock_dir, results)) for rank in (0, 1)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=120) for _ in procs)
        for p in procs:
            p.join(timeout=60)
    assert [r[1] for r in got] == [True, True]  # both ranks see the NaN of rank 1
    assert all(r[2] and "in use by another run" in r[2] for r in got)  # both ranks are refused


def test_stage_one_is_unreachable_once_stage_two_runs(tmp_path, tiny_data, monkeypatch):
    """Nothing of stage 1 (model, optimizer, data stream and its prefetch thread) outlives it: on a GPU that memory
    would stay allocated through stage 2."""
    import gc
    stage1, checked, setup = [], [], train.setup_stage

    def tracked_setup(stage, *args):
        run = setup(stage, *args)
        if stage == "prepretrain":
            stage1.extend(weakref.ref(o) for o in (run, run.model, run.optimizer, run.data))
        else:
            gc.collect()
            checked.append([r() is None for r in stage1])
        return run
    monkeypatch.setattr(train, "setup_stage", tracked_setup)
    train.main(run_flags(tmp_path, tiny_data, "--prepretrain_iters", "3", "--pretrain_iters", "2", "--finetune_iters",
                         "0", "--eval_interval", "2", "--nca_chunk", "32"))
    assert checked == [[True] * 4]
    assert not [t for t in threading.enumerate() if t.name.startswith("nca-prefetch")]  # the prefetch thread is gone


def documented_commands():
    """Every command line that README.md and STUDY.md show in a code block or in backticks, with $MODEL-style
    variables of the same block expanded: (file, the command as a list of words)."""
    import shlex
    found = []
    for doc in ("README.md", "STUDY.md"):
        text = open(os.path.join(REPO_ROOT, doc), encoding="utf-8").read()
        text = re.sub(r"```python\n.*?```", "", text, flags=re.S)  # Python code, not command lines
        blocks = re.findall(r"```\n(.*?)```", text, re.S)
        inline = [m.replace("\n", " ") for m in re.findall(r"`((?:python|torchrun|bash|[A-Z]+=)[^`]*)`", text)]
        for block in blocks + inline:
            variables = dict(re.findall(r'^([A-Z]+)="([^"]*)"', block, re.M))
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"^\$ ", "", line.split("  #")[0].split(" | ")[0].split(" && ")[0]).strip()
                for name, value in variables.items():
                    line = line.replace(f"${name}", value)
                words = shlex.split(line) if line else []
                if words[:1] in (["python"], ["torchrun"]):
                    found.append((doc, words))
    return found


def test_every_command_in_the_docs_parses(monkeypatch):
    """The README's and STUDY.md's commands run as written: each one's flags parse with the script it names (the work
    itself is replaced by a recorder, so nothing trains)."""
    calls = []
    monkeypatch.setattr(safety, "validate", lambda *args: None)  # data and checkpoints need not exist here
    for name in ("run_compare", "run_probes", "run_size_command", "run_carried", "demo", "print_stats"):
        monkeypatch.setattr(study, name, lambda *args, **kw: calls.append("study"))
    for name in ("bench_nca", "bench_train", "gpu_check"):
        monkeypatch.setattr(bench, name, lambda *args, **kw: calls.append("bench"))
    commands = documented_commands()
    scripts = set()
    for doc, words in commands:
        if words[0] == "torchrun":  # torchrun [its flags] train.py [train.py's flags]
            words = ["python"] + words[next(i for i, w in enumerate(words) if w.endswith(".py")):]
        script, args = words[1], words[2:]
        scripts.add(script if script != "-m" else args[0])
        if "--help" in args:
            continue
        if script == "train.py":
            train.parse_args(args)
        elif script == "eval.py":
            evaluate.build_parser().parse_args(args)
        elif script == "study.py":
            study.main(args)
        elif script == "bench.py":
            bench.main(args)
        elif script == "-m" and args[0] == "pytest":
            assert args[1:] == ["-q", "test_smoke.py"]  # the test command .ci/run runs
        elif script == "-m":
            assert os.path.exists(os.path.join(REPO_ROOT, *args[0].split(".")) + ".py"), (doc, words)
        else:
            raise AssertionError(f"{doc}: a command of an unknown script: {' '.join(words)}")
    assert {"train.py", "eval.py", "study.py", "bench.py"} <= scripts and len(commands) > 30


def test_study_sh_documents_exactly_the_arms_it_runs():
    # study.sh's header lists the arms a user can put in ARMS; run_arm's case statement is what runs them
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "study.sh")).read()
    header = text[text.index("# Every arm then"):text.index("# Then study.py compare")]
    documented = {arm for line in re.findall(r"^#   ([a-z][a-z0-9.-]*(?:, [a-z][a-z0-9.-]*)*)(?:\s|$)", header, re.M)
                  for arm in line.split(", ")}
    body = text[text.index("run_arm() {"):text.index("esac")]
    runnable = {arm for labels in re.findall(r"^    ([a-z][a-z0-9.|-]*)\)", body, re.M) for arm in labels.split("|")}
    assert documented == runnable, (documented - runnable, runnable - documented)
    assert {"scratch", "nca", "nca-band-mid", "dyck-w256"} <= runnable


# --- prepared data: all or nothing (issue "nothing mixed")

KILLED_PREPARE = """
import os, signal, sys
import data.common as common
write_split, name, kill_at, when = common.write_split, *sys.argv[1:4]

def write_split_then_die(path, ids):  # SIGKILL: no except or finally block runs, as when the power goes
    if os.path.basename(path) != kill_at:
        return write_split(path, ids)
    if when == "mid-write":  # while the file is still a temporary one
        common._atomic_write(path, lambda f: (f.write(b"ab"), f.flush(), os.kill(os.getpid(), signal.SIGKILL)))
    os.kill(os.getpid(), signal.SIGKILL)

common.write_split = write_split_then_die
__import__(f"data.{name}.prepare", fromlist=["main"]).main(sys.argv[4:])
"""


def run_killed_prepare(name, kill_at, when, flags):
    """Run python -m data.<name>.prepare with flags, SIGKILLed before (or in the middle of) writing kill_at."""
    killed = subprocess.run([sys.executable, "-c", KILLED_PREPARE, name, kill_at, when, *flags], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return killed


def refusal(argv, capsys):
    """train.py's one-line refusal (stderr) of argv, given before any stage runs."""
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_prepare_killed_after_train_bin_is_in_place_leaves_a_folder_train_py_refuses(tmp_path, capsys):
    from data.stdlib.prepare import main

    data_dir, folder = tmp_path / "data", tmp_path / "data" / "source"  # not an offline name: refused, not remade
    main(["--max_bytes", "200000", "--seed", "1", "--out_dir", str(folder)])
    old_train = (folder / "train.bin").read_bytes()
    flags = ["--max_bytes", "200000", "--seed", "2", "--out_dir", str(folder)]
    run_killed_prepare("stdlib", "val.bin", "before", flags)
    assert (folder / "train.bin").read_bytes() != old_train  # the new train.bin beside the old val.bin
    remake = f"run: python -m data.stdlib.prepare --max_bytes 200000 --seed 2 --out_dir {folder}"
    with pytest.raises(ValueError, match=f"has not finished.*{re.escape(remake)}$"):
        check_prepared(str(folder))
    err = refusal(TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--stage", "pretrain",
                              "--pretrain_data", "source"], capsys)
    assert "source/meta.json" in err and remake in err
    # an offline dataset stopped the same way is made again on first use, once
    run_killed_prepare("random", "val.bin", "before", ["--num_tokens", "20000", "--out_dir", str(data_dir / "random")])
    meta = common.prepared(str(data_dir), "random", "tokens")[1]
    assert capsys.readouterr().out.count("preparing ") == 1 and meta["prepare"] == "python -m data.random.prepare"


def test_two_prepares_into_one_folder_at_once_take_turns_and_never_mix(tmp_path, monkeypatch):
    from data.stdlib.prepare import main

    def flags(seed, out_dir):
        return ["--max_bytes", "200000", "--seed", str(seed), "--out_dir", str(out_dir)]

    for seed in (1, 2):  # what each makes alone
        main(flags(seed, tmp_path / f"alone{seed}"))
    folder, write_split, second = tmp_path / "source", common.write_split, []

    def start_the_second_once_train_bin_is_written(path, ids):
        write_split(path, ids)
        if path.endswith("train.bin") and not second:
            second.append(subprocess.Popen([sys.executable, "-m", "data.stdlib.prepare", *flags(2, folder)],
                                           cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True))
            for line in second[0].stdout:  # until it has finished, or says it waits for this one
                if line.startswith("waiting for another prepare"):
                    break

    monkeypatch.setattr(common, "write_split", start_the_second_once_train_bin_is_written)
    main(flags(1, folder))
    second[0].communicate(timeout=300)
    assert second[0].returncode == 0
    meta = check_prepared(str(folder))  # one run's files, whole, and its meta.json: the second's, which ended last
    assert meta["seed"] == 2 and meta == check_prepared(str(tmp_path / "alone2"))
    for name in ("train.bin", "val.bin"):
        assert (folder / name).read_bytes() == (tmp_path / "alone2" / name).read_bytes()
    assert not list(folder.glob("*.tmp"))


def test_a_killed_dyck_prepare_names_its_own_command_and_leaves_no_temporary_file(tmp_path):
    folder = tmp_path / "brackets"  # a name no prepare script has
    flags = ["--num_tokens", "30000", "--max_depth", "5", "--out_dir", str(folder)]
    run_killed_prepare("dyck", "train.bin", "mid-write", flags)
    assert list(folder.glob("train.bin.*.tmp"))
    with pytest.raises((FileNotFoundError, ValueError),
                       match=f"run: python -m data.dyck.prepare --num_tokens 30000 --max_depth 5 --out_dir {folder}$"):
        check_prepared(str(folder))
    subprocess.run([sys.executable, "-m", "data.dyck.prepare", *flags], cwd=REPO_ROOT, check=True, capture_output=True)
    assert sorted(os.listdir(folder)) == [".prepare.lock", "meta.json", "train.bin", "val.bin"]
    assert check_prepared(str(folder))["prepare"] == "python -m data.dyck.prepare --num_tokens 30000 --max_depth 5"
    # the command is printed for a user to paste, so one that is not a prepare script's, quoted, is not used
    for planted in ("rm -rf ~", "python -m data.dyck.prepare $(touch x)", "python -m data.dyck.prepare; touch x"):
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "prepare": planted}))
        assert prepare_command(str(folder)).startswith("python -m data.hf.prepare --from_file YOUR_FILE.jsonl")


def test_meta_json_fields_of_the_wrong_type_or_range_are_refused_naming_the_file(tmp_path, capsys):
    data_dir = tmp_path / "data"
    save_token_dataset(str(data_dir / "corpus"), get_tokenizer("bytes"), np.arange(2000) % 257, np.arange(500) % 257)
    common.save_pairs_dataset(str(data_dir / "task"), {s: [{"prompt": "1+1=", "completion": "2\n"}] * 4
                                                       for s in ("train", "val")}, task="task", stop="\n")
    flags = TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--pretrain_data", "corpus"]
    train.parse_args(flags + ["--stage", "pretrain"])
    train.parse_args(flags + ["--stage", "finetune", "--finetune_data", "task"])
    capsys.readouterr()
    path = data_dir / "corpus" / "meta.json"
    good = json.loads(path.read_text())
    for key, value in (("vocab_size", "257"), ("vocab_size", 257.5), ("vocab_size", 10**10), ("vocab_size", True),
                       ("eot_token", 99999), ("eot_token", "x"), ("eot_token", -1), ("eot_token", 256.0),
                       ("tokenizer", "nope"),
                       ("vocab_size", 300), ("eot_token", 3)):  # these two: in range, but not the tokenizer's
        path.write_text(json.dumps({**good, key: value}))
        err = refusal(flags + ["--stage", "pretrain"], capsys)
        assert f"corpus/meta.json: {key} must be " in err and "python -m data.hf.prepare" in err, err
    path.write_text(json.dumps({**good, "tokenizer": "gpt2"}))  # ids of the byte tokenizer, named gpt2
    assert "vocab_size must be 50257, the vocabulary of tokenizer gpt2, got 257" in refusal(flags, capsys)
    path.write_text(json.dumps(good))
    task_meta = data_dir / "task" / "meta.json"
    task_meta.write_text(json.dumps({k: v for k, v in json.loads(task_meta.read_text()).items() if k != "stop"}))
    err = refusal(flags + ["--stage", "finetune", "--finetune_data", "task"], capsys)
    assert "task/meta.json lacks 'stop'" in err, err
    with pytest.raises(ValueError, match="task/meta.json: stop must be a non-empty string"):
        task_meta.write_text(json.dumps({"task": "task", "stop": ""}))
        common.check_task(str(data_dir / "task"))


def test_a_pairs_file_that_is_not_utf8_is_refused_naming_the_file_and_line(tmp_path, capsys):
    data_dir = tmp_path / "data"
    save_token_dataset(str(data_dir / "corpus"), get_tokenizer("bytes"), np.arange(2000) % 257, np.arange(500) % 257)
    common.save_pairs_dataset(str(data_dir / "task"), {s: [{"prompt": "1+1=", "completion": "2\n"}] * 4
                                                       for s in ("train", "val")}, task="task", stop="\n")
    with open(data_dir / "task" / "train.jsonl", "ab") as f:
        f.write(b'{"prompt": "caf\xe9 = ", "completion": "1\\n"}\n')  # Latin-1, not UTF-8
    err = refusal(TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--pretrain_data",
                              "corpus", "--stage", "finetune", "--finetune_data", "task"], capsys)
    assert "task/train.jsonl, line 5: not UTF-8 text (byte 0xe9 at column 16)" in err, err


# --- NCA rows for any trainer: python -m data.nca.prepare, and train.py on its folder

NCA_ROW_FLAGS = ["--grid", "6", "--num_colors", "4", "--band", "0.0", "1.0"]  # TINY_RUN's NCA, TINY_NCA


def prepare_nca_rows(folder, *flags):
    """A small folder of NCA rows (rows of 49 tokens, 8 val rows; flags override), -> its meta.json."""
    from data.nca.prepare import main
    main(["--tokens", "1000", "--seq_len", "48", "--val_rows", "8", *flags, "--out_dir", str(folder)])
    return json.loads((folder / "meta.json").read_text())


def read_rows(folder, split, row_len):
    return torch.from_numpy(np.fromfile(folder / f"{split}.bin", dtype=np.uint16).astype(np.int64)).view(-1, row_len)


def test_nca_rows_are_the_streams_rows_in_order_with_their_rules_and_a_card_that_remakes_them(tmp_path, capsys):
    import csv
    import shlex
    from data.nca.prepare import main
    meta = prepare_nca_rows(tmp_path / "rows", "--seed", "3", "--grid", "6", "--num_colors", "4", "--band", "0.2",
                            "0.9")  # BAND_TEST: it rejects some rules
    cfg = NCAConfig(**meta["nca_config"])
    assert cfg == BAND_TEST and meta["kind"] == "nca-rows" and meta["seed"] == 3 and meta["row_len"] == 49
    assert (meta["vocab_size"], meta["start_token"], meta["end_token"], meta["masked_targets"]) == (258, 256, 257, 10)
    table, rule_seeds = list(csv.DictReader(open(tmp_path / "rows" / "rules.csv"))), {}
    for split, held_out in (("train", False), ("val", True)):
        rows = read_rows(tmp_path / "rows", split, 49)
        assert len(rows) == meta[f"num_{split}_rows"] == (21 if split == "train" else 8)  # ceil(1000 / 49) rows
        stream = NCAStream(cfg, batch_size=4, seq_len=48, seed=3, held_out=held_out)
        for b in range(len(rows) // 4):  # row i of batch b is row 4b + i
            x, y = stream.next_batch()
            scored = y != -1
            batch = rows[4 * b:4 * b + 4]
            assert torch.equal(batch[:, :-1], x) and torch.equal(batch[:, 1:][scored], y[scored])
            assert not scored[:, :meta["masked_targets"]].any() and scored[:, meta["masked_targets"]:].all()
        lines = [line for line in table if line["split"] == split]
        index = torch.tensor([int(line["rule_index"]) for line in lines])
        seeds = [torch.tensor([int(line[key]) for line in lines]) for key in ("rule_seed", "grid_seed")]
        assert [int(line["row"]) for line in lines] == list(range(len(rows))) and (index.diff() > 0).all()
        assert torch.equal(seeds[0], nca.stream_seeds(3, nca.RULE_SEEDS, index, held_out))
        assert torch.equal(seeds[1], nca.stream_seeds(3, nca.GRID_SEEDS, index, held_out))
        ratios = nca.score_rules(*seeds, cfg)[0]  # what the stream's filter computed, to the last digit
        assert [float(line["gzip_ratio"]) for line in lines] == ratios.tolist() and nca.in_band(ratios, cfg).all()
        rule_seeds[split] = seeds[0]
    assert (rule_seeds["val"] >= 2 ** 31).all() and (rule_seeds["train"] < 2 ** 31).all()  # no val rule trains
    assert meta["acceptance"] == 21 / meta["rules_tried"] < 0.8  # the band rejected some: rule indices skip
    card = (tmp_path / "rows" / "README.md").read_text()
    command = re.search(r"^    (python -m data.nca.prepare .*)$", card, re.M)[1]
    assert command == (f"python -m data.nca.prepare --tokens 1000 --seed 3 --grid 6 --num_colors 4 --band 0.2 0.9 "
                       f"--seq_len 48 --val_rows 8 --out_dir {tmp_path / 'rows'}")
    assert "![gzip ratios of the accepted rules](gzip_ratios.png)" in card and "21 " in card
    assert (tmp_path / "rows" / "gzip_ratios.png").read_bytes()[:4] == b"\x89PNG"
    main(shlex.split(command)[3:-1] + [str(tmp_path / "again")])  # the card's command, into another folder
    for name in ("train.bin", "val.bin", "rules.csv"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "rows" / name).read_bytes(), name


def test_nca_prepare_refuses_a_vocabulary_beyond_uint16_naming_the_flags(tmp_path, capsys):
    for flags, vocab in ((["--num_colors", "16"], "65,538"), (["--num_colors", "4", "--patch", "3"], "262,146")):
        code, out, err, seconds = run_prepare("nca", flags + ["--out_dir", str(tmp_path / "out")], capsys)
        words = " ".join(flags if "--patch" in flags else flags + ["--patch", "2"])
        assert_one_line_refusal(code, out, err, seconds, f"{words}: the vocabulary, num_colors**(patch*patch) + 2 = "
                                                         f"{vocab} token ids, does not fit uint16 rows")
        assert not (tmp_path / "out").exists()


def test_a_killed_nca_prepare_leaves_a_folder_train_py_refuses(tmp_path, capsys):
    import shlex
    data_dir, folder = tmp_path / "data", tmp_path / "data" / "rows"
    prepare_nca_rows(folder, *NCA_ROW_FLAGS)  # a whole folder, then a prepare into it killed before val.bin
    flags = ["--tokens", "1000", "--seed", "1", *NCA_ROW_FLAGS, "--seq_len", "48", "--val_rows", "8"]
    run_killed_prepare("nca", "val.bin", "before", flags + ["--out_dir", str(folder)])
    remake = f"run: {shlex.join(['python', '-m', 'data.nca.prepare', *flags, '--out_dir', str(folder)])}"
    with pytest.raises(ValueError, match=f"has not finished.*{re.escape(remake)}$"):
        check_prepared(str(folder))
    assert not common.nca_rows(str(folder))
    err = refusal(TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--stage",
                              "prepretrain", "--prepretrain_data", "rows"], capsys)
    assert "rows/meta.json" in err and remake in err, err


def test_training_on_nca_rows_gives_the_streamed_runs_losses(tmp_path):
    prepare_nca_rows(tmp_path / "data" / "rows", "--tokens", "2000", "--seq_len", "64", *NCA_ROW_FLAGS)  # > block
    flags = TINY_RUN + ["--stage", "prepretrain", "--prepretrain_iters", "6", "--eval_interval", "3"]
    train.main(flags + ["--out_dir", str(tmp_path / "stream")])  # the stream, made ahead in the prefetch thread
    train.main(flags + ["--out_dir", str(tmp_path / "rows"), "--data_dir", str(tmp_path / "data"),
                        "--prepretrain_data", "rows"])
    streamed, from_rows = (read_log(tmp_path / run / "prepretrain" / "log.jsonl") for run in ("stream", "rows"))
    assert [r["iter"] for r in from_rows] == [0, 3, 6] and all(r["train_loss"] or r["iter"] == 0 for r in from_rows)
    for a, b in zip(streamed, from_rows):
        assert {**a, "elapsed": 0} == {**b, "elapsed": 0}  # losses, tokens, the probe: all of it
    ckpt = torch.load(tmp_path / "rows" / "prepretrain" / "ckpt.pt", weights_only=True)
    assert ckpt["nca_config"] == asdict(TINY_NCA) and ckpt["data"]["vocab_size"] == 258
    assert ckpt["rank_state"][0]["data"] == {"next_row": 24}  # what --resume continues from


def test_nca_row_data_resumes_at_its_next_row_shares_rows_among_ranks_and_wraps(tmp_path):
    prepare_nca_rows(tmp_path / "data" / "rows", *NCA_ROW_FLAGS)  # 21 training rows
    cfg = train.parse_args(TINY_RUN + ["--data_dir", str(tmp_path / "data"), "--out_dir", str(tmp_path / "out"),
                                       "--prepretrain_data", "rows"])[0]
    rows = read_rows(tmp_path / "data" / "rows", "train", 49)
    data = train.NCARowData("rows", cfg, batch_size=4, block_size=48)
    batches = [data.get_batch("train") for _ in range(6)]
    assert torch.equal(batches[5][0], rows[[20, 0, 1, 2], :-1])  # past the last row, the first again
    resumed = train.NCARowData("rows", cfg, batch_size=4, block_size=48)
    resumed.load_state_dict({"next_row": 8})
    assert all(torch.equal(resumed.get_batch("train")[1], batches[i][1]) for i in (2, 3, 4, 5))
    ranks = [train.NCARowData("rows", cfg, batch_size=2, block_size=48, rank=r, world=2) for r in (0, 1)]
    for b in range(3):  # two ranks of 2 rows: together the rows of one process's batch of 4
        x = torch.cat([rank.get_batch("train")[0] for rank in ranks])
        assert torch.equal(x, batches[b][0])
    assert torch.equal(torch.cat([ranks[0].val[0][0], ranks[1].val[0][0]]), data.val[0][0][[0, 2, 1, 3]])


def test_an_nca_rows_folder_is_checked_before_any_work(tmp_path, capsys):
    data_dir = tmp_path / "data"
    prepare_nca_rows(data_dir / "rows", *NCA_ROW_FLAGS)
    flags = TINY_RUN + ["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out"), "--prepretrain_data", "rows"]
    train.parse_args(flags)
    assert "note:" not in capsys.readouterr().out
    train.parse_args(flags[:-2] + ["--num_colors", "5", "--prepretrain_data", "rows"])
    assert "its NCA config is used, not the NCA flags of this command" in capsys.readouterr().out
    path = data_dir / "rows" / "meta.json"
    for extra, message in ((["--block_size", "64"], f"--block_size 64: the rows of {path} serve a block of 11"),
                           (["--eval_iters", "3"], f"{path}: 8 val rows, fewer than --eval_iters x --batch_size = 12"),
                           (["--stage", "pretrain", "--pretrain_data", "rows"], "says it holds NCA rows")):
        assert message in refusal(flags + extra, capsys)
    good = json.loads(path.read_text())
    for key, value, message in (("masked_targets", 5, "masked_targets is 5, but its nca_config makes it 10"),
                                ("nca_config", {**good["nca_config"], "grid": 7}, "nca_config is not a valid NCA"),
                                ("nca_config", {"colours": 4}, "nca_config is not a valid NCA"),
                                ("num_val_rows", 9, "num_val_rows must be the number of rows val.bin holds (8)"),
                                ("row_len", 50, "row_len must be seq_len + 1 = 49")):
        path.write_text(json.dumps({**good, key: value}))
        err = refusal(flags, capsys)
        assert f"{path}: {key}" in err or f"{path}: {message}" in err, err
        assert message in err and "python -m data.nca.prepare" in err, err


def test_the_readme_loads_nca_rows_in_plain_pytorch(tmp_path, monkeypatch):
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Use it in your own stack"):text.index("## The study")]
    snippet = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    monkeypatch.chdir(tmp_path)
    meta = prepare_nca_rows(tmp_path / "data" / "nca-rows", "--tokens", "2000", *NCA_ROW_FLAGS)
    names = {}
    exec(snippet, names)  # as written: data/nca-rows of the working directory
    assert names["b"] == meta["num_train_rows"] // 16 - 1 and math.isfinite(names["loss"].item())
    assert torch.equal(names["x"], read_rows(tmp_path / "data" / "nca-rows", "train", 49)[16 * names["b"]:][:16, :-1])
    assert (names["y"][:, :10] == -1).all() and (names["y"][:, 10:] >= 0).all()


def test_the_readme_takes_a_stage_one_model_to_transformers(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    text = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Use it in your own stack"):text.index("## The study")]
    snippet = re.findall(r"```python\n(.*?)```", section, re.S)[1]
    assert "python eval.py export --ckpt out/prepretrain/ckpt.pt --out_dir hf_nca" in section
    monkeypatch.chdir(tmp_path)
    tiny_checkpoint("out/prepretrain/ckpt.pt", vocab_size=258, nca_config=asdict(TINY_NCA), stage="prepretrain")
    evaluate.main(["export", "--ckpt", "out/prepretrain/ckpt.pt", "--out_dir", "hf_nca"])
    names = {}
    exec(snippet, names)
    model = names["model"]
    assert isinstance(model, transformers.LlamaForCausalLM) and model.get_output_embeddings().weight.shape[0] == 50257
    assert model(torch.tensor([[1, 2, 50256]])).logits.shape == (1, 3, 50257)
