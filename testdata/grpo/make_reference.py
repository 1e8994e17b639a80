"""GRPO loss reference numbers from TRL's own GRPOTrainer (trl 1.16) on the tiny Llama.

The policy is testdata/tiny-llama/model with the PEFT adapter testdata/kto/policy_adapter
(trainable), so the reference (the adapter disabled, as TRL does with PEFT) differs from it.
One fixed batch of 2 prompts × 2 completions (TRL's layout: prompts left-padded, completions
right-padded, the shorter completion masked) with given advantages, and "old" log-probabilities
that are the policy's own moved by 0.4·sin(3·index) so that ratios fall inside and outside the
clipping range. For each case (loss_type, beta, importance_sampling_level, epsilons, delta,
temperature): TRL's `_compute_loss` on that batch — the loss, TRL's logged metrics (`entropy`
included) and the first gradients of two LoRA factors. Also the policy's and the reference's
per-token log-probabilities (TRL computes them, and the entropy, from the logits divided by the
sampling temperature).

    bench/.venv/bin/python testdata/grpo/make_reference.py      # writes testdata/grpo/reference.json
"""
import json
import math
import os
import tempfile

import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import GRPOConfig, GRPOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tiny-llama")
GRADS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
         "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
PROMPTS = ["Clinical note: 71-year-old woman, fever.\nJSON:", "Note: 45-year-old man, cough.\nJSON:"]
COMPLETIONS = [' {"age": 71, "sex": "F"}', " I cannot help.", ' {"age": 45}', ' {"age": 45, "sex": "M", "symptom": "cough"}']
ADVANTAGES = [0.9, -0.9, 0.7, -0.7]
MAX_COMPLETION = 16
CASES = [
    # loss_type, beta, importance_sampling_level, epsilon, epsilon_high, delta, temperature
    ("dapo", 0.0, "token", 0.2, None, None, 1.0),
    ("grpo", 0.04, "token", 0.2, None, None, 1.0),
    ("bnpo", 0.04, "token", 0.2, 0.28, None, 1.0),
    ("dr_grpo", 0.0, "token", 0.2, None, 1.1, 1.0),
    ("cispo", 0.0, "token", 0.2, 1.1, None, 1.0),
    ("sapo", 0.04, "token", 0.2, None, None, 1.0),
    ("luspo", 0.0, "sequence", 0.2, None, None, 1.0),
    ("grpo", 0.0, "sequence", 0.05, None, None, 1.0),
    ("vespo", 0.04, "token", 0.2, None, None, 1.0),
    ("dapo", 0.04, "token", 0.2, None, None, 0.7),
    ("grpo", 0.0, "token", 0.2, 0.28, None, 1.6),
]


def batch(tok):
    prompt_ids = [tok(text=p)["input_ids"] for p in PROMPTS for _ in range(2)]
    completion_ids = [tok(text=c)["input_ids"] + [tok.eos_token_id] for c in COMPLETIONS]
    completion_ids = [c[:MAX_COMPLETION] for c in completion_ids]
    pl = max(len(p) for p in prompt_ids)
    cl = max(len(c) for c in completion_ids)
    pad = tok.pad_token_id
    return {
        "prompt_ids": torch.tensor([[pad] * (pl - len(p)) + p for p in prompt_ids]),
        "prompt_mask": torch.tensor([[0] * (pl - len(p)) + [1] * len(p) for p in prompt_ids]),
        "completion_ids": torch.tensor([c + [pad] * (cl - len(c)) for c in completion_ids]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (cl - len(c)) for c in completion_ids]),
        "advantages": torch.tensor(ADVANTAGES),
    }, prompt_ids, completion_ids


def run(case, tok):
    loss_type, beta, level, eps, eps_high, delta, temperature = case
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(HERE, "..", "kto", "policy_adapter"), is_trainable=True)
    data = Dataset.from_list([{"prompt": p} for p in PROMPTS])
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=4, num_generations=2, beta=beta,
                         loss_type=loss_type, importance_sampling_level=level, epsilon=eps, epsilon_high=eps_high,
                         delta=delta, temperature=temperature, max_completion_length=MAX_COMPLETION, use_cpu=True, report_to="none",
                         disable_dropout=True, bf16=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=cfg, train_dataset=data, processing_class=tok)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs, prompt_ids, completion_ids = batch(tok)
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
        keep = inputs["completion_ids"].size(1)
        with torch.no_grad():
            policy, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, keep)
            with trainer.model.disable_adapter():
                ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, keep)
        idx = torch.arange(policy.numel(), dtype=torch.float32).reshape(policy.shape)
        old = policy + 0.4 * torch.sin(3 * idx)
        inputs["old_per_token_logps"] = old
        if beta != 0.0:
            inputs["ref_per_token_logps"] = ref
        inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
        trainer.model.zero_grad()
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        params = dict(trainer.model.named_parameters())
        mask = inputs["completion_mask"]
        lens = [int(m.sum()) for m in mask]
        return {
            "loss_type": loss_type, "beta": beta, "importance_sampling_level": level, "epsilon": eps,
            "epsilon_high": eps_high, "delta": delta, "temperature": temperature,
            "max_completion_length": MAX_COMPLETION,
            "prompt_ids": prompt_ids, "completion_ids": completion_ids, "advantages": ADVANTAGES,
            "policy_logps": [policy[i, :n].tolist() for i, n in enumerate(lens)],
            "reference_logps": [ref[i, :n].tolist() for i, n in enumerate(lens)],
            "old_logps": [old[i, :n].tolist() for i, n in enumerate(lens)],
            "loss": loss.item(),
            "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()
                        if v and (k in ("kl", "entropy", "cispo_clip_ratio", "vespo/phi_seq_mean")
                                  or k.startswith("clip_ratio/"))
                        and not math.isnan(v[-1])},
            "grads": {g.split("base_model.model.")[1].replace(".default", ""): params[g].grad.flatten()[:32].tolist()
                      for g in GRADS},
        }


def main():
    import peft
    import transformers
    import trl
    tok = AutoTokenizer.from_pretrained(os.path.join(TINY, "model"))
    out = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"peft {peft.__version__}, trl {trl.__version__}",
           "cases": [run(c, tok) for c in CASES]}
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
    for c in out["cases"]:
        print(c["loss_type"], c["beta"], c["importance_sampling_level"], c["temperature"], round(c["loss"], 7),
              c["metrics"])


if __name__ == "__main__":
    main()
