"""Loads a reward model written by `fedtune train reward` with PEFT as a user would
(AutoModelForSequenceClassification, num_labels=1, then PeftModel.from_pretrained) and prints
the rewards of both sides of every pair, and TRL's metrics over them, to compare with
`fedtune eval --reward-model --json` on the same data.

    bench/.venv/bin/python testdata/reward/check_peft.py MODEL ADAPTER DATA.jsonl
"""
import json
import sys
import warnings

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(model_dir, adapter_dir, data):
    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    base.config.pad_token_id = tok.pad_token_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    peft_warnings = [str(w.message) for w in caught if "peft" in str(w.filename)]
    rewards = []
    for line in open(data):
        ex = json.loads(line)
        pair = []
        for side in ("chosen", "rejected"):
            if isinstance(ex["prompt"], list):
                ids = tok.apply_chat_template(ex["prompt"] + ex[side], tokenize=True, return_dict=True)["input_ids"]
            else:
                ids = tok(text=ex["prompt"] + ex[side] + tok.eos_token)["input_ids"]
            with torch.no_grad():
                pair.append(model(input_ids=torch.tensor([ids])).logits.item())
        rewards.append(pair)
    margins = [c - r for c, r in rewards]
    flat = [x for p in rewards for x in p]
    print(json.dumps({
        "peft_warnings": peft_warnings,
        "rewards": rewards,
        "loss": sum(torch.nn.functional.softplus(torch.tensor(-m)).item() for m in margins) / len(margins),
        "accuracy": sum(m > 0 for m in margins) / len(margins),
        "margin": sum(margins) / len(margins),
        "min_reward": min(flat), "mean_reward": sum(flat) / len(flat), "max_reward": max(flat),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
