"""DoRA reference numbers from PEFT 0.21's own DoRA layers (`use_dora=True`) on the tiny Llama.

The model is testdata/tiny-llama/model (f32) with a PEFT LoRA adapter r 8, alpha 16 on all seven
projections, use_dora=True. PEFT initialises each `lora_magnitude_vector` to the row norms of the
base weight and lora_B to zero; both are moved (lora_B by 0.05·sin(index), the magnitudes by the
factor 1 + 0.1·cos(index)) so that every part of the DoRA product matters and has a gradient. That
starting adapter is saved as testdata/dora/start_adapter (PEFT's own files).

For a fixed batch of 2 rows × 12 token ids (labels = inputs, so the loss is transformers' mean
next-token cross-entropy): the loss, every target token's log-probability, the logits over the
first 256 vocabulary entries, the gradient of the loss with respect to every lora_A, lora_B and
lora_magnitude_vector, and the weights `merge_and_unload()` writes for every projection.

    bench/.venv/bin/python testdata/dora/make_reference.py
        # writes testdata/dora/reference.safetensors and testdata/dora/reference.json
"""
import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tiny-llama", "model")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_dora=True, target_modules=TARGETS,
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            idx = torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape)
            if "lora_B.default" in n:
                p.add_(0.05 * torch.sin(idx))
            if "lora_magnitude_vector" in n:
                p.mul_(1.0 + 0.1 * torch.cos(idx))
    start = os.path.join(HERE, "start_adapter")
    shutil.rmtree(start, ignore_errors=True)
    model.save_pretrained(start)
    os.remove(os.path.join(start, "README.md"))  # PEFT's model-card template

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 49152, (2, 12), generator=g)
    model.train()
    out = model(input_ids=ids, labels=ids)
    loss = out.loss
    loss.backward()
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]

    tensors = {
        "logits": out.logits[:, :, :256].detach().contiguous(),
        "logps": logp.detach().contiguous(),
    }
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight
        #   -> grad.model.layers.0.self_attn.q_proj.lora_A
        module = n.removeprefix("base_model.model.")
        for part in ("lora_A", "lora_B", "lora_magnitude_vector"):
            key = f".{part}.default"
            if key in module:
                module = module.split(key)[0]
                tensors[f"grad.{module}.{part}"] = p.grad.detach().contiguous()
    merged = model.merge_and_unload()
    for n, p in merged.named_parameters():
        if any(n.endswith(f"{t}.weight") for t in TARGETS):
            tensors[f"merged.{n}"] = p.detach().contiguous()
    save_file(tensors, os.path.join(HERE, "reference.safetensors"))
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump({"input_ids": ids.tolist(), "loss": loss.item()}, f, indent=1)
    print("loss", loss.item(), "tensors", len(tensors))


if __name__ == "__main__":
    main()
