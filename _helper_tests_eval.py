"""
Tests of eval.py: CPU only, tiny configs, files only in tmp_path. Run: python -m pytest -q _helper_tests_eval.py
"""
import json
import math
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval as evaluate
import nca
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


class AnswerLookup(nn.Module):
    """A 'perfect predictor' given the answers: its logits put all weight on the true next token of each row."""

    def __init__(self, sequences, vocab_size):
        super().__init__()
        self.sequences, self.vocab_size = sequences, vocab_size

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        # it only ever sees true prefixes: icl_accuracy must feed it the right context, and its own (true) outputs
        assert torch.equal(idx, self.sequences[:, :T])
        return F.one_hot(self.sequences[:, T], self.vocab_size).float()[:, None, :], None


class Constant(nn.Module):
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
    stream = evaluate.HeldOutStream(TINY_NCA, 4, 20, seed=3)
    assert (stream.draw_seeds(1000) >= 2 ** 31).all()  # training streams draw from [0, 2^31)


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
# comparing runs


def test_speedup_on_synthetic_curves():
    tokens = np.array([0, 100, 200, 300, 400], dtype=float)
    losses = np.array([5.0, 3.0, 2.0, 1.5, 1.2])
    assert evaluate.speedup((tokens, losses), (tokens, losses)) == pytest.approx(1.0)
    assert evaluate.speedup((tokens, losses), (tokens / 2, losses)) == pytest.approx(2.0)
    assert evaluate.speedup((tokens, losses), (tokens * 1.25, losses)) == pytest.approx(0.8)
    assert evaluate.speedup((tokens, losses), (tokens, losses + 0.5)) is None  # never reaches 1.2
    # the crossing is interpolated between eval points: 1.2 is reached halfway from 300 (1.4) to 400 (1.0)
    assert evaluate.speedup((tokens, losses), (tokens, np.array([5, 3, 2, 1.4, 1.0]))) == pytest.approx(400 / 350)


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
    table = evaluate.main(["compare", "--runs", str(tmp_path / "*"), "--out", out])
    assert os.path.getsize(out) > 0
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["nca"][1:4] == ["1.0000", f"{math.exp(1.0):.3f}", "-16.7%"]     # final loss 1.0 vs 1.2
    assert rows["nca"][4] == f"{100 * (math.exp(-0.2) - 1):.1f}%"
    assert rows["nca"][5] == "1.50x"   # scratch needs 300 tokens to reach 1.2, nca 200
    assert rows["nca"][6] == "1.00x"   # counting the 100 stage-1 tokens, 300 vs 300
    assert rows["scratch"][1:6] == ["1.2000", f"{math.exp(1.2):.3f}", "0.0%", "0.0%", "1.00x"]
    assert table in capsys.readouterr().out


def test_compare_groups_seeds_into_arms(tmp_path):
    tokens = [0, 100, 200]
    write_log(tmp_path / "scratch_seed0", "pretrain", tokens, [5.0, 2.0, 1.2])
    write_log(tmp_path / "scratch_seed1", "pretrain", tokens, [5.0, 2.2, 1.4])       # baseline mean: 1.3 at 200
    write_log(tmp_path / "nca_seed0", "pretrain", tokens, [5.0, 1.3, 1.0])            # reaches 1.3 at 100
    write_log(tmp_path / "nca_seed1", "pretrain", tokens, [5.0, 1.6, 1.4])            # never reaches 1.3
    arms, rows, baseline = evaluate.compare_runs(sorted(str(p) for p in tmp_path.iterdir()))
    assert baseline == "scratch" and set(arms) == {"scratch", "nca"}
    row = {r["arm"]: r for r in rows}["nca"]
    assert row["runs"] == 2 and row["final_loss"] == [1.0, 1.4]
    assert row["speedup"] == [pytest.approx(2.0), None]
    assert evaluate.format_speedups(row["speedup"], row["speedup_bound"]) == "2.00x (1/2 reached)"
    table = evaluate.markdown_table(rows, baseline)
    assert f"1.2000 ± {np.std([1.0, 1.4], ddof=1):.4f}" in table
    evaluate.plot_compare(arms, str(tmp_path / "seeds.png"), "pretrain")
    assert os.path.getsize(tmp_path / "seeds.png") > 0


def test_compare_names_a_missing_log_and_an_unknown_baseline(tmp_path):
    write_log(tmp_path / "scratch", "pretrain", [0, 10], [2.0, 1.0])
    with pytest.raises(FileNotFoundError, match="did the run finish stage finetune"):
        evaluate.compare_runs([str(tmp_path / "scratch")], stage="finetune")
    with pytest.raises(ValueError, match="--baseline 'nope'"):
        evaluate.compare_runs([str(tmp_path / "scratch")], baseline="nope")

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
    assert "ppl=" in capsys.readouterr().out
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


def test_perplexity_refuses_another_tokenizer(tmp_path):
    save_token_dataset(str(tmp_path / "tiny"), get_tokenizer("bytes"), np.arange(100), np.arange(100))
    path = str(tmp_path / "run/pretrain/ckpt.pt")
    tiny_checkpoint(path, vocab_size=300, data={"name": "x", "tokenizer": "gpt2", "vocab_size": 50257,
                                                "eot_token": 50256})
    with pytest.raises(SystemExit, match="tokenised with bytes .* trained with gpt2"):
        evaluate.main(["perplexity", "--ckpt", path, "--data_dir", str(tmp_path / "tiny"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        evaluate.main(["perplexity", "--ckpt", str(tmp_path / "missing.pt"), "--device", "cpu"])

# -----------------------------------------------------------------------------
# export to Hugging Face


def export_tiny(tmp_path):
    path = str(tmp_path / "run/pretrain/ckpt.pt")
    model = tiny_checkpoint(path)
    evaluate.main(["export", "--ckpt", path, "--out_dir", str(tmp_path / "hf")])
    return model, tmp_path / "hf"


def test_export_names_map_back_to_the_same_state_dict(tmp_path):
    model, out_dir = export_tiny(tmp_path)
    hf_state = torch.load(out_dir / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in hf_state and "model.embed_tokens.weight" in hf_state
    assert all(k == "lm_head.weight" or k.startswith("model.") for k in hf_state)
    ours = model.state_dict()
    back = evaluate.from_hf_names(hf_state)
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["intermediate_size"] == model.config.hidden_dim and config["rope_theta"] == 500.0
    assert config["num_key_value_heads"] == config["num_attention_heads"] == 2
    assert config["tie_word_embeddings"] is False and config["architectures"] == ["LlamaForCausalLM"]


def test_export_round_trip_through_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, out_dir = export_tiny(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out_dir)).eval()
    idx = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
