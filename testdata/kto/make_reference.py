"""KTO reference numbers from TRL's own KTOTrainer (trl 1.16) on the tiny Llama. Given a PEFT
model with a trained adapter, TRL's reference is a frozen copy of that adapter (its "ref"
adapter); the policy here is that adapter (testdata/tiny-llama/adapter) with lora_B moved by
0.05·sin(index), saved as testdata/kto/policy_adapter, so policy and reference differ. For
each data file and batch (sequential sampling, as KTO requires): the token ids TRL trains on,
the loss, TRL's logged metrics and the first gradients of two LoRA factors.

    bench/.venv/bin/python testdata/kto/make_reference.py      # writes testdata/kto/reference.json
"""
import json
import os
import tempfile

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import KTOConfig, KTOTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tiny-llama")
GRADS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
         "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]
CASES = [
    # file, batch size, beta, desirable and undesirable weights, loss type, max_length
    ("chat.jsonl", 3, 0.1, 1.0, 1.5, "kto", 1024),
    ("text.jsonl", 4, 0.3, 1.2, 1.0, "kto", 1024),
    ("text.jsonl", 4, 0.1, 1.0, 1.0, "apo_zero_unpaired", 24),
]


def run(name, batch, beta, dw, uw, loss_type, max_length):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(os.path.join(TINY, "model"))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(TINY, "adapter"), is_trainable=True)
    data = load_dataset("json", data_files=os.path.join(HERE, name), split="train")
    with tempfile.TemporaryDirectory() as out:
        cfg = KTOConfig(output_dir=out, per_device_train_batch_size=batch, beta=beta, desirable_weight=dw,
                        undesirable_weight=uw, loss_type=loss_type, max_length=max_length,
                        train_sampling_strategy="sequential", report_to="none", use_cpu=True,
                        disable_dropout=True)
        trainer = KTOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok)
        assert "ref" in trainer.model.peft_config, "TRL keeps the initial adapter as the reference"
        with torch.no_grad():
            for n, p in trainer.model.named_parameters():
                if "lora_B.default" in n:
                    p.add_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32)).reshape(p.shape))
        trainer.model.save_pretrained(os.path.join(HERE, "policy_adapter"), selected_adapters=["default"])
        card = os.path.join(HERE, "policy_adapter", "README.md")
        if os.path.exists(card):
            os.remove(card)
        trainer.model.train()
        batches = []
        for b in trainer.get_train_dataloader():
            trainer.model.zero_grad()
            trainer._metrics["train"].clear()
            loss = trainer._compute_loss(trainer.model, b, False)
            loss.backward()
            params = dict(trainer.model.named_parameters())
            batches.append({
                "input_ids": [ids[: int(am.sum())].tolist() for ids, am in zip(b["input_ids"], b["attention_mask"])],
                "completion_mask": [cm[: int(am.sum())].tolist() for cm, am in zip(b["completion_mask"], b["attention_mask"])],
                "kl_input_ids": [ids[: int(am.sum())].tolist() for ids, am in zip(b["KL_input_ids"], b["KL_attention_mask"])]
                if "KL_input_ids" in b else None,
                "label": b["label"].tolist(),
                "loss": loss.item(),
                "metrics": {k: v[-1] for k, v in trainer._metrics["train"].items()
                            if v and k in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins",
                                           "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected")},
                "grads": {g.split("base_model.model.")[1].replace(".default", ""): params[g].grad.flatten()[:32].tolist()
                          for g in GRADS},
            })
    return {"file": name, "batch_size": batch, "beta": beta, "desirable_weight": dw, "undesirable_weight": uw,
            "loss_type": loss_type, "max_length": max_length, "batches": batches}


def main():
    import peft
    import transformers
    import trl
    out = {"versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
                       f"peft {peft.__version__}, trl {trl.__version__}",
           "cases": [run(*c) for c in CASES]}
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(out, f, indent=1)
    for c in out["cases"]:
        print(c["file"], c["loss_type"], [round(b["loss"], 6) for b in c["batches"]])


if __name__ == "__main__":
    main()
