"""
Export a checkpoint of train.py to Hugging Face's Llama format: config.json and model.safetensors (or
pytorch_model.bin where the safetensors package is missing), which transformers.LlamaForCausalLM.from_pretrained reads
as it is. model.py's parameter names are LlamaForCausalLM's without the "model." prefix.

  python eval.py export --ckpt out/pretrain/ckpt.pt --out_dir hf_model
"""
import json
import os

import torch

import safety
from model import ModelConfig

def to_hf_names(state_dict):
    """Our names are LlamaForCausalLM's without the "model." prefix, which only the output head lacks there too."""
    return {(name if name == "lm_head.weight" else "model." + name): t for name, t in state_dict.items()}


def hf_config(model_args, data):
    cfg = ModelConfig(**model_args)
    eot = (data or {}).get("eot_token")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": "float32", "initializer_range": 0.02,
        "bos_token_id": eot, "eos_token_id": eot,  # our sequences have no BOS; documents end with end-of-text
    }


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def save_weights(state, out_dir):
    """The weights as transformers prefers them: model.safetensors (no pickle: loading it runs no code), where the
    safetensors package is installed (transformers depends on it, so wherever transformers is); else
    pytorch_model.bin, which every transformers reads. The other file, from an earlier export, is removed, so the
    folder holds one model. -> the file's name"""
    try:  # transformers reads a safetensors file whose metadata says format "pt"
        from safetensors.torch import save_file
        name, save = WEIGHT_FILES[0], lambda path: save_file(state, path, metadata={"format": "pt"})
    except ImportError:
        name, save = WEIGHT_FILES[1], lambda path: torch.save(state, path)
    for old in WEIGHT_FILES:
        if old != name and os.path.exists(os.path.join(out_dir, old)):
            os.remove(os.path.join(out_dir, old))
    save(os.path.join(out_dir, name))
    return name


def run_export(args):
    safety.check_out_dir(args.out_dir, "config.json and the weights")
    ckpt = safety.load_checkpoint(args.ckpt, "--ckpt ")  # checked: its weights fit its model_args
    out_dir = args.out_dir
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(ckpt["model_args"], ckpt.get("data")), f, indent=2)
    state = {name: t.contiguous() for name, t in ckpt["model"].items()}
    weights = save_weights(to_hf_names(state), out_dir)
    tokenizer = (ckpt.get("data") or {}).get("tokenizer")
    print(f"wrote {out_dir}/config.json and {weights}; load with "
          f"transformers.LlamaForCausalLM.from_pretrained({out_dir!r}); tokenizer: "
          f"{tokenizer or 'NCA patch tokens'} (data.common.get_tokenizer)")
