"""Forward throughput of transformers on the same model and inputs shape as bench_forward.rs.

    bench/.venv/bin/python bench/forward.py GGUF_FILE [BATCH] [SEQ] [ITERS]
"""
import json
import os
import pathlib
import sys
import time

import torch
from transformers import AutoModelForCausalLM

path = pathlib.Path(sys.argv[1])
batch, seq, iters = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in [(2, 4), (3, 256), (4, 3)])
torch.set_num_threads(os.cpu_count())
model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
with torch.no_grad():
    model(ids)
    t = time.perf_counter()
    for _ in range(iters):
        model(ids).logits[0, 0, 0].item()
    secs = (time.perf_counter() - t) / iters
print(json.dumps({"impl": "transformers " + __import__("transformers").__version__ + " / torch " + torch.__version__,
                  "batch": batch, "seq": seq, "seconds": round(secs, 4), "tokens_per_s": round(batch * seq / secs, 1)}))
