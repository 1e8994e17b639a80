"""The peer's side of the training benchmark (bench/gpu_step.sh): the same steps as
engine/examples/gpu_step.rs in PyTorch + transformers + PEFT, one JSON line per run.

    python3 bench/gpu_step.py sft MODEL BATCH SEQ STEPS MODE   # MODE: lora | qlora, -gc suffix
    python3 bench/gpu_step.py dpo MODEL PAIRS SEQ STEPS
    python3 bench/gpu_step.py peak [N]                         # bf16 N x N x N torch.matmul, TFLOP/s

What runs is what TRL's trainers run with `bf16=True` and PEFT: the base model in bf16, the
LoRA factors in f32 (PEFT's autocast_adapter_dtype), forward and backward under bf16 autocast,
fused AdamW over the factors (transformers' default optimiser), gradients clipped at 1.0.
LoRA r = 16, alpha = 32, no dropout, all seven projections; random ids.
  sft: the loss over the second half of each row (labels -100 before), transformers'
       own causal-LM loss; `-gc` turns on non-reentrant gradient checkpointing of each layer.
       `qlora` loads the base as NF4 with double quantisation through bitsandbytes; without
       bitsandbytes it falls back to the bf16 base and says so in "peer".
  dpo: TRL DPOTrainer's computation, written out (TRL's trainer needs the datasets library,
       which the GPU machine lacks): chosen and rejected rows in one forward of the policy,
       the reference forward with the adapter disabled and no gradients, per-token
       log-probabilities through TRL's selective_log_softmax, the sigmoid loss with beta 0.1.
       Without the Trainer's data collation and callbacks the peer is, if anything, faster
       than TRL's trainer.
Figures: median step over steps 2..STEPS; peak memory torch.cuda.max_memory_allocated().
FEDTUNE_BENCH_DEVICE=cpu runs the same code on the CPU in f32, to check the script without a GPU.
"""
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

CUDA = os.environ.get("FEDTUNE_BENCH_DEVICE", "cuda") == "cuda"
DEV = "cuda" if CUDA else "cpu"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sync():
    if CUDA:
        torch.cuda.synchronize()


def selective_log_softmax(logits, index):
    """TRL's trl.trainer.utils.selective_log_softmax (the log-probability of `index` at every
    position without materialising the whole log-softmax in f32)."""
    if logits.dtype in (torch.float32, torch.float64):
        picked = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
        norms = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return picked - norms
    out = []
    for row_logits, row_labels in zip(logits, index):
        row = F.log_softmax(row_logits, dim=-1)
        out.append(row.gather(dim=-1, index=row_labels.unsqueeze(-1)).squeeze(-1))
    return torch.stack(out)


def load(path, qlora, gc):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    kwargs = {"dtype": torch.bfloat16 if CUDA else torch.float32}
    peer = "torch+transformers+peft"
    if qlora:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"])
            peer += "+bitsandbytes"
        except ImportError:
            peer += " (bf16 base: bitsandbytes not installed)"
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(DEV)
    cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)
    model = get_peft_model(model, cfg)
    if gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, fused=CUDA)
    return model, params, opt, peer


def step_timer(steps, body):
    times = []
    for s in range(steps):
        sync()
        t0 = time.perf_counter()
        body(s)
        sync()
        times.append(time.perf_counter() - t0)
    rest = times[1:] or times
    return statistics.median(rest), len(rest)


def autocast():
    return torch.autocast(DEV, dtype=torch.bfloat16, enabled=CUDA)


def peak_bytes():
    if CUDA:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sft(path, batch, seq, steps, mode):
    model, params, opt, peer = load(path, mode.startswith("qlora"), mode.endswith("-gc"))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(steps)]

    def body(s):
        ids = data[s].to(DEV)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        with autocast():
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs, n = step_timer(steps, body)
    return dict(bench="sft", mode=mode, peer=peer, batch=batch, seq=seq, steps=n,
                seconds_per_step=round(secs, 4), tokens_per_s=round(batch * seq / secs, 1))


def dpo(path, pairs, seq, steps):
    model, params, opt, peer = load(path, False, False)
    vocab = model.config.vocab_size
    half = seq // 2
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, vocab, (pairs, half), generator=g),
             torch.randint(0, vocab, (pairs, seq - half), generator=g),
             torch.randint(0, vocab, (pairs, seq - half), generator=g)) for _ in range(steps)]
    beta = 0.1

    def sums(logits, ids):
        # Position t predicts token t+1; only completion tokens count.
        lp = selective_log_softmax(logits[:, :-1], ids[:, 1:])
        return lp[:, half - 1:].float().sum(-1)

    def body(s):
        prompt, chosen, rejected = (t.to(DEV) for t in data[s])
        ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)], 0)
        with torch.no_grad(), model.disable_adapter(), autocast():
            ref = sums(model(input_ids=ids).logits, ids)
        with autocast():
            pol = sums(model(input_ids=ids).logits, ids)
        logits = beta * ((pol[:pairs] - pol[pairs:]) - (ref[:pairs] - ref[pairs:]))
        loss = -F.logsigmoid(logits).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    secs, n = step_timer(steps, body)
    return dict(bench="dpo", mode="lora", peer=peer + " (TRL DPOTrainer's computation)", batch=pairs,
                seq=seq, steps=n, seconds_per_step=round(secs, 4),
                pairs_per_s=round(pairs / secs, 3), tokens_per_s=round(2 * pairs * seq / secs, 1))


def peak(n):
    a = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b.T
    sync()
    iters = 20
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b.T
    sync()
    secs = (time.perf_counter() - t0) / iters
    return dict(bench="peak", n=n, tflops=round(2 * n ** 3 / secs / 1e12, 1))


def main():
    a = sys.argv[1:]
    if not a or a[0] not in ("sft", "dpo", "peak"):
        sys.exit(__doc__)
    torch.manual_seed(0)
    if a[0] == "peak":
        res = peak(int(a[1]) if len(a) > 1 else 8192)
    elif a[0] == "sft":
        res = sft(a[1], int(a[2]), int(a[3]), int(a[4]), a[5] if len(a) > 5 else "lora")
    else:
        res = dpo(a[1], int(a[2]), int(a[3]), int(a[4]))
    import peft
    import transformers
    res = {"impl": "peer", **res, "model": a[1] if len(a) > 1 and a[0] != "peak" else None,
           "device": torch.cuda.get_device_name() if CUDA else "cpu",
           "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"}
    if a[0] != "peak":
        res["peak_gib"] = round(peak_bytes() / 2 ** 30, 3)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
