"""GRPO steps with TRL's GRPOTrainer + PEFT LoRA: G = 4 completions per prompt, up to 64 new
tokens, 8 completions per step, r=16 on all projections, β 0, `dapo` loss, and the reward of
fedtune's `length:20:200` (0 for 20 to 200 characters, else minus the distance over 200, down
to −1); the same prompts and shapes as engine/examples/bench_grpo.rs. Prints one JSON line
(median over steps 2..N, mean completion length).

    bench/.venv/bin/python bench/grpo_step.py HF_MODEL_DIR PROMPTS.jsonl [STEPS]
"""
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

path, data = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
torch.set_num_threads(os.cpu_count())
rows = [json.loads(line) for line in open(data)]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
times, lengths = [], []


def length_reward(completions, **kw):
    out = []
    for c in completions:
        text = c[-1]["content"] if isinstance(c, list) else c
        n = len(text)
        d = 20 - n if n < 20 else (n - 200 if n > 200 else 0)
        out.append(-min(d / 200, 1.0))
    return out


class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "completions/mean_length" in logs:
            lengths.append(logs["completions/mean_length"])


with tempfile.TemporaryDirectory() as out:
    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=8, num_generations=4, max_completion_length=64,
                     max_steps=steps, learning_rate=1e-6, logging_steps=1, report_to=[], save_strategy="no",
                     use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = GRPOTrainer(model=model, reward_funcs=[length_reward], args=cfg, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
rest = times[1:] or times
secs = statistics.median(rest)
print(json.dumps({"impl": f"trl {trl.__version__} GRPOTrainer + peft (torch {torch.__version__}, transformers "
                          f"{transformers.__version__})",
                  "completions_per_step": 8, "steps": len(rest), "seconds_per_step": round(secs, 3),
                  "completions_per_s": round(8 / secs, 3),
                  "mean_completion_length": sum(lengths) / max(len(lengths), 1),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
