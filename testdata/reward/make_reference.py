"""Reward-model reference numbers from TRL's own RewardTrainer (trl 1.16) on the tiny Llama.

The model is transformers' AutoModelForSequenceClassification (num_labels=1: the `score` head
on the last non-padding token) of testdata/tiny-llama/model, with a PEFT LoRA adapter (r 8,
alpha 16, all seven projections, task SEQ_CLS, so `score` is trained in full as a module to
save). lora_B is moved from zero by 0.05·sin(index) so that every factor has a gradient; that
starting adapter, the score head included, is saved as testdata/reward/start_adapter. For each
data file and batch (sequential order): the token ids TRL scores (chosen rows, then rejected),
the rewards, the loss with and without center_rewards_coefficient, TRL's logged metrics, and
the first gradients of the score head and of two LoRA factors.

    bench/.venv/bin/python testdata/reward/make_reference.py     # writes testdata/reward/reference.json
"""
import json
import os
import shutil
import tempfile

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tiny-llama", "model")
GRADS = ["base_model.model.score.modules_to_save.default.weight",
         "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
         "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
CASES = [
    # file, batch size (pairs), center_rewards_coefficient
    ("text.jsonl", 3, None),
    ("chat.jsonl", 2, 0.01),
]


def model_and_tokenizer():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(TINY)
    base = AutoModelForSequenceClassification.from_pretrained(TINY, num_labels=1, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                     "down_proj"])
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).reshape(p.shape))
    return model, tok


def run(name, batch, center):
    model, tok = model_and_tokenizer()
    data = load_dataset("json", data_files=os.path.join(HERE, name), split="train")
    with tempfile.TemporaryDirectory() as out:
        cfg = RewardConfig(output_dir=out, per_device_train_batch_size=batch, report_to="none", use_cpu=True,
                           center_rewards_coefficient=center, disable_dropout=True, max_length=1024)
        trainer = RewardTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        trainer.model.train()
        batches = []
        loader = torch.utils.data.DataLoader(trainer.train_dataset, batch_size=batch, shuffle=False,
                                             collate_fn=trainer.data_collator)
        for b in loader:
            trainer.model.zero_grad()
            trainer._metrics["train"].clear()
            loss = trainer.compute_loss(trainer.model, dict(b))
            loss.backward()
            with torch.no_grad():
                rewards = trainer.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            params = dict(trainer.model.named_parameters())
            batches.append({
                "input_ids": [ids[: int(am.sum())].tolist() for ids, am in zip(b["input_ids"], b["attention_mask"])],
                "rewards": rewards.squeeze(-1).tolist(),
                "loss": loss.item(),
                "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()
                            if v and k in ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")},
                "grads": {g.split("base_model.model.")[1].replace(".modules_to_save", "").replace(".default", ""):
                          params[g].grad.flatten()[:32].tolist() for g in GRADS},
            })
    return {"file": name, "batch_size": batch, "center_rewards_coefficient": center, "batches": batches}


def main():
    import peft
    import transformers
    import trl
    model, _ = model_and_tokenizer()
    start = os.path.join(HERE, "start_adapter")
    shutil.rmtree(start, ignore_errors=True)
    model.save_pretrained(start)
    card = os.path.join(start, "README.md")
    if os.path.exists(card):
        os.remove(card)
    out = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"peft {peft.__version__}, trl {trl.__version__}",
           "pad_token_id": model.config.pad_token_id,
           "cases": [run(*c) for c in CASES]}
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
    for c in out["cases"]:
        print(c["file"], [round(b["loss"], 6) for b in c["batches"]])


if __name__ == "__main__":
    main()
