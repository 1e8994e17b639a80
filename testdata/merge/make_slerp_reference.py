"""SLERP reference from mergekit 0.1.5 itself (`mergekit-yaml`), on the tiny Llama.

Model A is testdata/tiny-llama/model; model B is A with every tensor rolled by one along its
last axis and multiplied by 0.75 (exact operations, so fedtune's test rebuilds B bit for bit).
The YAML below (written next to this script as slerp.yml, with the model paths as
placeholders) merges them with per-filter t gradients (mergekit interpolates each tensor as
one vector; the embedding, norms and head take t at layer fraction 0). Stored, per output tensor: its first
two rows and its last row, and the f64 sum of all its values (the merged model is 12 MB; these
are enough to check every tensor). Also mergekit's own `evaluate_setting` for the gradients at
several layer fractions.

    bench/.venv/bin/python testdata/merge/make_slerp_reference.py   # needs mergekit==0.1.5
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
TINY = os.path.join(HERE, "..", "tiny-llama", "model")
YAML = """merge_method: slerp
base_model: MODEL_A
slices:
  - sources:
      - model: MODEL_A
        layer_range: [0, 2]
      - model: MODEL_B
        layer_range: [0, 2]
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.9]
    - filter: mlp
      value: [0.8, 0.3]
    - value: 0.4
dtype: float32
"""


def main():
    import importlib.metadata
    from mergekit.config import evaluate_setting
    version = importlib.metadata.version("mergekit")
    with open(os.path.join(HERE, "slerp.yml"), "w") as f:
        f.write(YAML)
    with tempfile.TemporaryDirectory() as tmp:
        a, b, out = (os.path.join(tmp, n) for n in ("a", "b", "out"))
        shutil.copytree(TINY, a)
        shutil.copytree(TINY, b)
        tensors = load_file(os.path.join(TINY, "model.safetensors"))
        save_file({k: (torch.roll(v, 1, dims=-1) * 0.75).contiguous() for k, v in tensors.items()},
                  os.path.join(b, "model.safetensors"), metadata={"format": "pt"})
        cfg = os.path.join(tmp, "slerp.yml")
        with open(cfg, "w") as f:
            f.write(YAML.replace("MODEL_A", a).replace("MODEL_B", b))
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"), cfg, out, "--no-cuda"],
                       check=True)
        merged = {}
        for name in sorted(os.listdir(out)):
            if name.endswith(".safetensors"):
                merged.update(load_file(os.path.join(out, name)))
    ref, sums = {}, {}
    for k, v in merged.items():
        v2 = v.float().reshape(v.shape[0], -1) if v.dim() > 1 else v.float().reshape(1, -1)
        ref[k] = torch.cat([v2[:2], v2[-1:]]).contiguous()
        sums[k] = v.double().sum().item()
    save_file(ref, os.path.join(HERE, "slerp_reference.safetensors"))
    grads = {str(t): [evaluate_setting("model.layers.0.self_attn.q_proj.weight", [0.0, 0.5, 0.3, 0.7, 1.0], t,
                                        validate=float)] for t in (0.0, 0.1, 0.25, 0.6, 0.99, 1.0)}
    with open(os.path.join(HERE, "slerp_reference.json"), "w") as f:
        json.dump({"made_with": f"mergekit {version} (mergekit-yaml --no-cuda) on slerp.yml",
                   "model_b": "every tensor of A rolled by one along its last axis, times 0.75",
                   "sums": sums, "gradient_0_.5_.3_.7_1": grads}, f, indent=1)
    print(len(merged), "tensors")


if __name__ == "__main__":
    main()
