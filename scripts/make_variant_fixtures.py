"""Tiny random checkpoints of each supported architecture variant, with transformers' logits.

    bench/.venv/bin/python scripts/make_variant_fixtures.py

Writes testdata/variants/<name>/ (config.json, safetensors) and reference.safetensors
(`input_ids`, `logits`). Weights are scaled up from the HF init so that errors are visible.
"""
import json
import pathlib

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

root = pathlib.Path(__file__).resolve().parent.parent / "testdata" / "variants"
torch.manual_seed(0)
common = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
variants = {
    "qwen2_bias_untied": dict(model_type="qwen2", tie_word_embeddings=False,
                              rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}),
    "mistral_sliding_window": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=8,
                                   rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
    "llama3_rope_bias_headdim": dict(model_type="llama", tie_word_embeddings=False, attention_bias=True,
                                     mlp_bias=True, head_dim=16,
                                     rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0,
                                                      "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 16}),
    "llama_linear_rope_bf16_sharded": dict(model_type="llama", tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "linear", "rope_theta": 10_000.0,
                                                            "factor": 4.0}),
    # Layers of different kinds (transformers' layer_types): full attention in layer 0, a
    # sliding window of 8 in layer 1; training must use each layer's own mask.
    "qwen2_mixed_layer_types": dict(model_type="qwen2", tie_word_embeddings=True,
                                    use_sliding_window=True, sliding_window=8,
                                    layer_types=["full_attention", "sliding_attention"],
                                    rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}),
}
ids = torch.randint(3, 128, (2, 24))
for name, extra in variants.items():
    kw = dict(common)
    kw.update(extra)
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0 if p.dim() > 1 else 1.0).add_(0.05 * torch.randn_like(p) if p.dim() == 1 else 0)
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    if "bf16" in name:
        model = model.to(torch.bfloat16)
        model.save_pretrained(out, max_shard_size="20KB")
    else:
        model.save_pretrained(out)
    # Reload as a user would: f32 compute from the saved weights (buffers such as RoPE's
    # inverse frequencies are recomputed in f32, not round-tripped through bf16).
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(ids).logits
    save_file({"input_ids": ids.to(torch.int64), "logits": logits.contiguous()},
              str(out / "reference.safetensors"))
    print(name, sorted(p.name for p in out.iterdir()))
(root / "README.md").write_text(
    "Tiny random checkpoints made by scripts/make_variant_fixtures.py with torch "
    f"{torch.__version__} and transformers {__import__('transformers').__version__}; "
    "reference.safetensors holds transformers' logits (eager attention) for input_ids.\n")
