"""LoRA / QLoRA SFT steps in PyTorch + PEFT (+ bitsandbytes NF4), the same shapes as
engine/examples/bench_train.rs: random ids, second half of each row trained, r, alpha = 2r,
all seven projections, AdamW, gradient clipping at 1.0; prints one JSON line.

    bench/.venv/bin/python bench/train_step.py HF_MODEL_DIR [BATCH] [SEQ] [RANK] [STEPS] [lora|qlora|dora][-gc]

`-gc`: gradient checkpointing (transformers' non-reentrant checkpointing of each decoder layer).
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
import transformers
import peft
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

path = sys.argv[1]
batch, seq, rank, steps = (int(sys.argv[i]) if len(sys.argv) > i else d
                           for i, d in [(2, 4), (3, 256), (4, 16), (5, 4)])
mode = sys.argv[6] if len(sys.argv) > 6 else "lora"
qlora = mode.startswith("qlora")
dora = mode.startswith("dora")
gc = mode.endswith("-gc")
# lora-bf16: TRL's bf16=True on a CPU, f32 weights under torch.autocast("cpu", bfloat16).
bf16 = mode.endswith("-bf16")
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
kwargs = {"dtype": torch.float32}
if qlora:
    import bitsandbytes  # noqa: F401
    from transformers import BitsAndBytesConfig
    kwargs["quantization_config"] = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
if qlora:
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, task_type="CAUSAL_LM", use_dora=dora,
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
model = get_peft_model(model, cfg)
if gc:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.0)
g = torch.Generator().manual_seed(0)
rates = []
for step in range(steps):
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    t = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    rates.append(batch * seq / (time.perf_counter() - t))
rest = rates[1:] or rates
print(json.dumps({
    "impl": ("peft+bnb " if qlora else "peft ") + mode + f" (torch {torch.__version__}, transformers "
            f"{transformers.__version__}, peft {peft.__version__})",
    "batch": batch, "seq": seq, "rank": rank, "steps": len(rest),
    "tokens_per_s": round(statistics.median(rest), 1),
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
}))
