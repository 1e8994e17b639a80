"""Breadcrumbs and Model Stock references from mergekit 0.1.5 itself (`mergekit-yaml`).

Three micro Llama checkpoints (hidden 16, 2 layers, vocab 64; every tensor random, norms
included, so that no two task-vector magnitudes tie) are written under micro/ (base, b, c),
with one mergekit YAML per case under micro/*.yml (model paths relative to the file, as
fedtune reads them; mergekit-yaml gets a copy with absolute paths). Each case's merged
tensors are stored whole in methods_reference.safetensors as `<case>/<tensor name>`.

    bench/.venv/bin/python testdata/merge/make_methods_reference.py   # needs mergekit==0.1.5
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
MICRO = os.path.join(HERE, "micro")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "num_hidden_layers": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

CASES = {
    # mergekit's defaults for breadcrumbs: normalize false, gamma 0.01 (here 0.05 and 0.1,
    # so that outliers are dropped even from the 16-element norms).
    "breadcrumbs": """merge_method: breadcrumbs
base_model: base
models:
  - model: b
    parameters: {weight: 0.6, density: 0.5, gamma: 0.05}
  - model: c
    parameters: {weight: 0.4, density: 0.5, gamma: 0.05}
dtype: float32
""",
    "breadcrumbs_ties": """merge_method: breadcrumbs_ties
base_model: base
models:
  - model: b
    parameters: {weight: 0.7}
  - model: c
    parameters: {weight: 0.5}
parameters:
  density: 0.6
  gamma: 0.1
  normalize: true
  lambda: 0.9
dtype: float32
""",
    "model_stock": """merge_method: model_stock
base_model: base
models:
  - model: base
  - model: b
  - model: c
dtype: float32
""",
    "model_stock_filter_wise": """merge_method: model_stock
base_model: base
models:
  - model: b
  - model: c
parameters:
  filter_wise: true
dtype: float32
""",
}


def micro_models():
    g = torch.Generator().manual_seed(20261205)
    h, i, v, layers, kv = 16, 32, 64, 2, 8
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for l in range(layers):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
    base = {k: torch.randn(s, generator=g) for k, s in sorted(shapes.items())}
    # Fine-tuned variants: the base plus task vectors of different scales; c's is partly
    # aligned with b's, so the model-stock angles are neither 0 nor 90 degrees.
    tb = {k: 0.1 * torch.randn(t.shape, generator=g) for k, t in base.items()}
    tc = {k: 0.5 * tb[k] + 0.08 * torch.randn(t.shape, generator=g) for k, t in base.items()}
    return base, {k: base[k] + tb[k] for k in base}, {k: base[k] + tc[k] for k in base}


def main():
    import importlib.metadata
    version = importlib.metadata.version("mergekit")
    shutil.rmtree(MICRO, ignore_errors=True)
    for name, tensors in zip(("base", "b", "c"), micro_models()):
        d = os.path.join(MICRO, name)
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(CONFIG, f, indent=1)
        save_file({k: t.contiguous() for k, t in tensors.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
    out = {}
    for case, yaml in CASES.items():
        path = os.path.join(MICRO, f"{case}.yml")
        with open(path, "w") as f:
            f.write(yaml)
        with tempfile.TemporaryDirectory() as tmp:
            absolute = os.path.join(tmp, "merge.yml")
            with open(absolute, "w") as f:
                for name in ("base", "b", "c"):
                    yaml = yaml.replace(f" {name}\n", f" {os.path.join(MICRO, name)}\n")
                f.write(yaml)
            subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), absolute,
                            os.path.join(tmp, "out"), "--no-cuda"], check=True)
            merged = load_file(os.path.join(tmp, "out", "model.safetensors"))
        for k, t in merged.items():
            out[f"{case}/{k}"] = t.float().contiguous()
    save_file(out, os.path.join(HERE, "methods_reference.safetensors"),
              metadata={"made_with": f"mergekit {version} (mergekit-yaml --no-cuda)"})
    print(len(out), "tensors")


if __name__ == "__main__":
    main()
