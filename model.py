"""
A small Llama-style decoder-only transformer, in one file.

Architecture (pre-norm, no biases anywhere):
    tokens -> embed_tokens -> n_layer x Block -> norm -> lm_head -> logits
    Block:  x = x + o_proj(attention(rope(q), rope(k), v))   on input_layernorm(x)
            x = x + down_proj(silu(gate_proj(x)) * up_proj(x)) on post_attention_layernorm(x)
RMSNorm is computed in float32, rotary position embeddings (RoPE) use the "rotate_half" convention, the MLP is
SwiGLU with llama2.c's hidden size, and the output head is not tied to the embedding (the NCA -> text transfer
re-initialises both, see `transfer`).

Parameter names follow Hugging Face's LlamaForCausalLM, so a state dict maps onto it one to one by adding
"model." in front of every name except "lm_head.weight" (and setting intermediate_size = config.hidden_dim).

Usage:
    from model import GPT, ModelConfig, transfer
    model = GPT(ModelConfig(vocab_size=257, n_layer=4, n_embd=128))
    logits, loss = model(idx, targets)                # idx, targets: (B, T) int64, -1 in targets = no loss
    out = model.generate(idx, 100, temperature=0.4, top_p=0.95)   # with a KV cache; use_cache=False re-runs
    text_model = transfer(nca_state_dict, ModelConfig(vocab_size=257))   # carries attention, MLP, norms
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.nn import functional as F

GROUPS = ("embedding", "head", "attention", "mlp", "norm")  # component groups for the transfer study


def arg(default, help):
    return field(default=default, metadata={"help": help})  # a config field with its --help text


@dataclass
class ModelConfig:
    vocab_size: int = arg(10002, "set from the data")
    block_size: int = arg(256, "max sequence length (rotary table size); the paper: 1024")
    n_layer: int = arg(4, "transformer blocks")
    n_head: int = arg(4, "attention heads")
    n_embd: int = arg(128, "width of the residual stream")
    multiple_of: int = arg(32, "SwiGLU hidden = 2/3*4*n_embd rounded up to a multiple of this (llama2.c rule)")
    ffn_dim: int = arg(0, "SwiGLU hidden size set directly (the paper: 4*n_embd); 0 = the rule above")
    rope_theta: float = arg(10000.0, "rotary base frequency")
    norm_eps: float = arg(1e-5, "RMSNorm epsilon")
    dropout: float = arg(0.0, "0 for pre-training")

    @property
    def hidden_dim(self):
        if self.ffn_dim:
            return self.ffn_dim
        # SwiGLU has three matrices instead of two, so 2/3 of the usual 4*n_embd keeps the parameter count
        hidden = int(2 * 4 * self.n_embd / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # in float32: the mean of squares of bf16 activations loses too much precision
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)


def precompute_rope(head_dim, length, theta):
    """cos and sin tables, each (length, head_dim), for the rotate_half convention.

    Channel i and channel i + head_dim/2 form one rotating pair with frequency theta^(-2i/head_dim), hence the
    angles are concatenated with themselves (not interleaved as in Meta's original code)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # (hs/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); rotating the pair (a, b) by angle t gives (a cos t - b sin t, b cos t + a sin t)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class KVCache:
    """One layer's keys (already rotated) and values for the positions seen so far, so that generating a token
    computes attention for the new position only. Preallocated for max_len positions on the first update, with
    the dtype and device of the keys it gets (bf16 under autocast)."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0  # positions filled; the next token's position
        self.keys = self.values = None  # (B, nh, max_len, hs) each

    def update(self, k, v):
        """Store k, v (B, nh, T, hs) after the cached positions; return the keys and values of all positions."""
        start, end = self.length, self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache full: {start} cached + {k.size(2)} new positions > max_len {self.max_len}")
        if self.keys is None:
            B, nh, _, hs = k.shape
            self.keys = k.new_empty(B, nh, self.max_len, hs)
            self.values = v.new_empty(B, nh, self.max_len, hs)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.k_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.v_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.o_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.o_proj.residual_scale_init = True  # writes into the residual stream
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin, kv_cache=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, nh, cached + T, hs): the keys and values of every position so far
        dropout_p = self.dropout if self.training else 0.0
        # T queries at the positions of the last T keys. T > 1 happens only for an empty cache (GPT.forward checks),
        # so the keys are the queries' own positions and the usual causal mask is right; a single new query may
        # see every key, so it needs no mask (is_causal=True would align the mask top-left and hide all but key 0)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=False)
        self.down_proj.residual_scale_init = True  # writes into the residual stream
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.n_embd % (2 * config.n_head):  # train.py's flags are checked first, by safety.check_model_config
            raise ValueError(f"n_embd={config.n_embd} must be a multiple of 2 * n_head = {2 * config.n_head}: every "
                             f"head gets n_embd/n_head channels, and RoPE rotates them in pairs")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # non-persistent: derived from the config, so they stay out of checkpoints and block_size may change
        cos, sin = precompute_rope(config.n_embd // config.n_head, config.block_size, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = 0.02
            if getattr(module, "residual_scale_init", False):
                # 2 residual writes per layer: keeps the variance of the residual stream independent of depth
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_params(self, non_embedding=False):
        # non_embedding leaves out the token table (a lookup, no compute); the untied lm_head stays in
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self):
        # PaLM appendix B: 6N for the matmuls (2 forward + 4 backward per weight, N without the embedding table)
        # plus the attention scores, 6 * 2 * n_layer * n_embd * T (QK^T and AV, over a full block of T tokens)
        cfg = self.config
        return 6 * self.num_params(non_embedding=True) + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size

    def forward(self, idx, targets=None, kv_caches=None):
        """idx (B, T) -> logits, loss. kv_caches (generation only): one KVCache per layer; idx then holds the
        tokens after the cached ones, at positions cached .. cached + T - 1 (several tokens only into empty caches)."""
        B, T = idx.shape
        start = 0
        if kv_caches is not None:
            start = kv_caches[0].length
            if start > 0 and T > 1:
                raise ValueError(f"{T} tokens after {start} cached ones: a KV cache takes a prompt only while "
                                 f"empty, then one token at a time")
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}; crop the "
                             f"input or build the model with a larger --block_size")
        x = self.embed_tokens(idx)  # (B, T, C)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs) each
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if kv_caches is None else kv_caches[i])
        x = self.norm(x)
        if targets is None:
            # inference: only the last position is needed, skip the big (T, V) matmul for the others
            return self.lm_head(x[:, [-1], :]), None  # (B, 1, V)
        logits = self.lm_head(x)  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_p=1.0, stop_token=None, *, generator=None,
                 use_cache=True):
        """Extend idx (B, T) by up to max_new_tokens. temperature 0 is greedy; top_p < 1 is nucleus sampling.
        Rows that have produced stop_token are padded with it; the loop ends once every row has.

        With use_cache, a first pass over the prompt fills a KV cache (every layer's rotated keys and values), then
        each step runs the new token alone. Past block_size the context slides: every kept token moves to a new
        position, so the cached keys are stale and those steps re-run the cropped context as without the cache.
        use_cache=False always re-runs the (cropped) context: the reference the cache must match."""
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
        block_size = self.config.block_size
        kv_caches = None
        finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if not use_cache or idx.size(1) > block_size:
                logits, _ = self(idx[:, -block_size:])  # the whole (cropped) context
            elif kv_caches is None:  # prefill: the prompt, in one pass
                max_len = min(block_size, idx.size(1) + max_new_tokens)
                kv_caches = [KVCache(max_len) for _ in self.layers]
                logits, _ = self(idx, kv_caches=kv_caches)
            else:  # the last token only, at position kv_caches[0].length = idx.size(1) - 1
                logits, _ = self(idx[:, -1:], kv_caches=kv_caches)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:
                    sorted_probs, order = probs.sort(dim=-1, descending=True)
                    # drop a token when the tokens ranked above it already hold top_p of the mass
                    drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
                    drop[:, 0] = False  # the most likely token always stays
                    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
                next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            if stop_token is not None:
                next_token = next_token.masked_fill(finished[:, None], stop_token)
                finished |= next_token[:, 0] == stop_token
            idx = torch.cat([idx, next_token], dim=1)
            if stop_token is not None and finished.all():
                break
        return idx

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (linears, embedding) only; norm weights are gains, decaying them towards 0 hurts
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]  # everything of a kind may be frozen
        fused = device_type == "cuda"
        print(f"optimizer: AdamW, {sum(p.numel() for p in decay):,} decayed and "
              f"{sum(p.numel() for p in no_decay):,} non-decayed trainable parameters, fused={fused}")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)


def param_group(name: str) -> str:
    """The component a parameter belongs to, from its name (prefixes such as "model." are fine)."""
    parts = name.split(".")
    for group, module in ("embedding", "embed_tokens"), ("head", "lm_head"), ("attention", "self_attn"), ("mlp", "mlp"):
        if module in parts:
            return group
    if any(part == "norm" or part.endswith("_layernorm") for part in parts):
        return "norm"
    raise ValueError(f"parameter {name!r} belongs to none of the groups {GROUPS}")


def freeze_groups(model, groups):
    """requires_grad=False for every parameter of the named groups (the optimizer then leaves them as they are)."""
    for name, param in model.named_parameters():
        if param_group(name) in groups:
            param.requires_grad_(False)


def likely_cause(state_dict, config, reinit):
    """Why a checkpoint does not fit a model config, for transfer's messages: the shapes its tensors imply."""
    def size(name):
        return state_dict[name].shape[0] if name in state_dict else None
    old = {"n_layer": len({k.split(".")[1] for k in state_dict if k.startswith("layers.")}) or None,
           "n_embd": size("norm.weight"), "hidden_dim": size("layers.0.mlp.gate_proj.weight"),
           "vocab_size": None if {"embedding", "head"} <= set(reinit) else size("embed_tokens.weight")}  # new vocab
    new = {"n_layer": config.n_layer, "n_embd": config.n_embd, "hidden_dim": config.hidden_dim,
           "vocab_size": config.vocab_size}
    differ = [f"{k} differs between the checkpoint ({old[k]}) and the new config ({new[k]})"
              for k in old if old[k] is not None and old[k] != new[k]]
    if any(k.startswith("_orig_mod.") for k in state_dict):
        differ.append("the checkpoint was saved from a torch.compile'd model (\"_orig_mod.\" prefixes)")
    if old["hidden_dim"] not in (None, new["hidden_dim"]) and old["n_embd"] == new["n_embd"]:
        differ.append("the MLP width depends on --multiple_of too")
    return "; ".join(differ) or "the checkpoint does not come from this model.py"


def transfer(state_dict, new_config, reinit=("embedding", "head"), freeze=(), log=print) -> GPT:
    """Build GPT(new_config) and copy in every tensor of state_dict whose group is not in reinit.

    Strict: each carried parameter must be in state_dict with the same shape, and state_dict may hold nothing
    the new model lacks. Groups in freeze get requires_grad=False. Logs what was carried and what was not."""
    reinit, freeze = [tuple(g for g in x.split(",") if g) if isinstance(x, str) else tuple(x) for x in (reinit, freeze)]
    for what, names in (("reinit", reinit), ("freeze", freeze)):
        unknown = [g for g in names if g not in GROUPS]
        if unknown:
            raise ValueError(f"unknown group(s) {unknown} in {what}; valid groups are {', '.join(GROUPS)}")
    model = GPT(new_config)
    params = dict(model.named_parameters())
    kept = [name for name in params if param_group(name) not in reinit]
    misfits = [f"checkpoint tensor {n!r} has no place in the new model" for n in state_dict if n not in params] + \
        [f"parameter {n!r} is missing from the checkpoint" for n in kept if n not in state_dict] + \
        [f"parameter {n!r} has shape {tuple(state_dict[n].shape)} in the checkpoint but {tuple(params[n].shape)} in "
         f"the new model" for n in kept if n in state_dict and state_dict[n].shape != params[n].shape]
    if misfits:
        raise ValueError(f"{misfits[0]}; likely cause: {likely_cause(state_dict, new_config, reinit)}")
    counts = {g: [0, 0] for g in GROUPS}  # group -> [tensors, parameters]
    with torch.no_grad():
        for name, param in params.items():
            counts[param_group(name)][0] += 1
            counts[param_group(name)][1] += param.numel()
            if name in kept:
                param.copy_(state_dict[name])
    freeze_groups(model, freeze)

    def describe(groups):
        return ", ".join(f"{g} ({counts[g][0]} tensors, {counts[g][1]:,} params)" for g in groups if counts[g][0])
    carried = [g for g in GROUPS if g not in reinit]
    fresh = [g for g in GROUPS if g in reinit]
    summary = f"transfer: carried {describe(carried) or 'nothing'}; re-initialised {describe(fresh) or 'nothing'}"
    if freeze:
        summary += f"; frozen {', '.join(g for g in GROUPS if g in freeze)}"
    log(summary)
    return model
