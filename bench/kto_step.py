"""KTO steps with TRL's KTOTrainer + PEFT LoRA (reference = adapter disabled, KL term from
mismatched pairs, sequential sampling as KTO requires), the same data and shapes as
engine/examples/bench_kto.rs (preference pairs, unpaired by TRL); prints one JSON line (median
over steps 2..N).

    bench/.venv/bin/python bench/kto_step.py HF_MODEL_DIR DATA.jsonl [BATCH] [STEPS]
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
from trl import KTOConfig, KTOTrainer

path, data = sys.argv[1], sys.argv[2]
batch, steps = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in [(3, 4), (4, 4)])
torch.set_num_threads(os.cpu_count())
rows = [json.loads(line) for line in open(data)]
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
times = []


class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)


with tempfile.TemporaryDirectory() as out:
    cfg = KTOConfig(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-5,
                    beta=0.1, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=1024,
                    dataloader_num_workers=0, disable_tqdm=True, train_sampling_strategy="sequential")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = KTOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=lora, callbacks=[Timer()])
    trainer.train()
rest = times[1:] or times
secs = statistics.median(rest)
print(json.dumps({"impl": f"trl {trl.__version__} KTOTrainer + peft (torch {torch.__version__}, transformers "
                          f"{transformers.__version__})",
                  "batch_examples": batch, "steps": len(rest), "seconds_per_step": round(secs, 3),
                  "examples_per_s": round(batch / secs, 3),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}))
