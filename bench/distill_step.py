"""Distillation steps with TRL's GKDTrainer (trl.experimental.gkd) + PEFT LoRA: student = the
model with a fresh LoRA r=16 adapter on all projections, teacher = the same model loaded again,
β 0.5, the same conversations and shapes as engine/examples/bench_distill.rs; `lmbda` 0
(default) trains on the data's completions, above 0 the student samples (up to 64 new tokens).
Prints one JSON line (median over steps 2..N).

    bench/.venv/bin/python bench/distill_step.py HF_MODEL_DIR DATA.jsonl [BATCH] [STEPS] [LMBDA]
"""
import json
import os
import resource
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import torch
import transformers
import trl
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl.experimental.gkd import GKDConfig, GKDTrainer

path, data = sys.argv[1], sys.argv[2]
batch, steps = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in [(3, 4), (4, 4)])
lmbda = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
torch.set_num_threads(os.cpu_count())
rows = [json.loads(line) for line in open(data)]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
times = []


class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)


with tempfile.TemporaryDirectory() as out:
    cfg = GKDConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                    beta=0.5, lmbda=lmbda, max_new_tokens=64, logging_steps=1, report_to=[], save_strategy="no",
                    use_cpu=True, bf16=False, max_length=1024, dataloader_num_workers=0, disable_tqdm=True)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=cfg, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=lora, callbacks=[Timer()])
    trainer.train()
rest = times[1:] or times
secs = statistics.median(rest)
print(json.dumps({"impl": f"trl {trl.__version__} GKDTrainer + peft (torch {torch.__version__}, transformers "
                          f"{transformers.__version__})",
                  "lmbda": lmbda, "batch_examples": batch, "steps": len(rest), "seconds_per_step": round(secs, 3),
                  "examples_per_s": round(batch / secs, 3),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
