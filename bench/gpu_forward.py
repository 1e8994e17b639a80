"""transformers' side of the GPU forward benchmark (scripts/gpu_check.sh).

  python3 bench/gpu_forward.py make DIR SHAPE      # random-weight Llama of SHAPE (1b, 8b) in bf16
      (with the repo's SmolLM2 tokenizer.json beside it: the ids are random, the loader wants one)
  python3 bench/gpu_forward.py gen DIR PROMPT NEW
      greedy decoding speed (model.generate, KV cache, bf16, SDPA): new tokens/s, one JSON line.
  python3 bench/gpu_forward.py bf16 MODEL OUT.json
      transformers' own bf16 and f16 logits against its f32 logits on MODEL (the ids of
      engine/tests/cuda_device.rs): the tolerance fedtune's 16-bit paths are held to
  python3 bench/gpu_forward.py bench DIR BATCH SEQ ITERS
      tokens/s of model(ids) + log_softmax + gather at every position (what fedtune eval
      computes), bf16, SDPA attention, no gradients; one JSON line.
"""
import json
import os
import shutil
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # Llama-3.2-1B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    # Llama-3.1-8B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}


def make(out, shape):
    cfg = LlamaConfig(vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                      rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                      **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(repo, "testdata/tiny-llama/model/tokenizer.json"), out)


def half_tolerance(path, out):
    ids = torch.tensor([(i * 7919) % 49152 for i in range(64)]).reshape(2, 32).cuda()
    ref = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        want = ref(ids).logits.float()
    res = {"model": path, "torch": torch.__version__}
    for name, dt in [("BF16", torch.bfloat16), ("F16", torch.float16)]:
        m = LlamaForCausalLM.from_pretrained(path, dtype=dt).cuda().eval()
        with torch.no_grad():
            got = m(ids).logits.float()
        d = (got - want).abs()
        res[name] = {"max_abs": d.max().item(), "mean_abs": d.mean().item()}
    print(json.dumps(res))
    with open(out, "w") as f:
        json.dump(res, f)


def bench(path, b, t, iters):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (b, t), generator=g).cuda()

    def run():
        with torch.no_grad():
            logits = model(ids).logits[:, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])
        return lp

    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(iters):
        run()
    torch.cuda.synchronize()
    secs = (time.perf_counter() - t0) / iters
    print(json.dumps({"impl": "transformers", "torch": torch.__version__, "batch": b, "seq": t,
                      "seconds": round(secs, 4), "tokens_per_s": round(b * t / secs, 1),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}))


def gen(path, prompt, new):
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=g).cuda()
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    n = out.shape[1] - prompt
    print(json.dumps({"impl": "transformers", "generate": "greedy", "prompt": prompt, "new_tokens": n,
                      "seconds": round(secs, 3), "tokens_per_s": round(n / secs, 1)}))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "gen":
        gen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "bf16":
        half_tolerance(sys.argv[2], sys.argv[3])
    else:
        bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
