"""GKD reference numbers from TRL 1.16's own GKDTrainer (trl.experimental.gkd) and its
`generalized_jsd_loss`.

1. `generalized_jsd_loss` on fixed random logits, for several `beta` and `temperature`: the
   loss and its gradient with respect to the student's logits.
2. The trainer's loss on the tiny Llama, off-policy (`lmbda=0`, `seq_kd=False`: the data's own
   completions): student = the tiny model with testdata/tiny-llama/adapter (trained), teacher =
   the tiny model alone. Per batch (sequential order): the ids and labels of TRL's ChatML
   collator, the loss, and the first gradients of two LoRA factors.

    bench/.venv/bin/python testdata/gkd/make_reference.py      # writes testdata/gkd/reference.json
"""
import json
import os
import tempfile

import torch
from datasets import load_dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(HERE, "..", "tiny-llama")
GRADS = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",
         "base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"]


def loss_function_cases():
    torch.manual_seed(0)
    student = torch.randn(2, 3, 7, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 7, dtype=torch.float64) * 2
    labels = torch.tensor([[5, -100, 2], [1, 3, -100]])
    out = []
    for beta, temperature in [(0.5, 1.0), (0.3, 0.7), (0.0, 1.0), (1.0, 2.0), (0.9, 1.5)]:
        s = student.clone().requires_grad_(True)
        loss = GKDTrainer.generalized_jsd_loss(s, teacher, labels=labels, beta=beta, temperature=temperature)
        loss.backward()
        out.append({"beta": beta, "temperature": temperature, "loss": loss.item(),
                    "grad": s.grad.tolist()})
    return {"student": student.tolist(), "teacher": teacher.tolist(), "labels": labels.tolist(), "cases": out}


def trainer_case(beta, batch):
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(os.path.join(TINY, "model"))
    base = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "model"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(TINY, "adapter"), is_trainable=True)
    teacher = AutoModelForCausalLM.from_pretrained(os.path.join(TINY, "model"), dtype=torch.float32)
    data = load_dataset("json", data_files=os.path.join(HERE, "chat.jsonl"), split="train")
    with tempfile.TemporaryDirectory() as out:
        cfg = GKDConfig(output_dir=out, per_device_train_batch_size=batch, beta=beta, lmbda=0.0, seq_kd=False,
                        max_length=1024, report_to="none", use_cpu=True, bf16=False)
        trainer = GKDTrainer(model=model, teacher_model=teacher, args=cfg, train_dataset=data,
                             processing_class=tok)
        trainer.model.train()
        batches = []
        dl = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False,
                                         collate_fn=trainer.data_collator)
        for b in dl:
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, b)
            loss.backward()
            params = dict(trainer.model.named_parameters())
            batches.append({
                # The collator pads on the left: the real tokens are where the attention mask is 1.
                "input_ids": [ids[am.bool()].tolist() for ids, am in zip(b["input_ids"], b["attention_mask"])],
                "labels": [(lab[am.bool()] != -100).int().tolist() for lab, am in zip(b["labels"], b["attention_mask"])],
                "loss": loss.item(),
                "grads": {g.split("base_model.model.")[1].replace(".default", ""): params[g].grad.flatten()[:32].tolist()
                          for g in GRADS},
            })
    return {"beta": beta, "batch_size": batch, "batches": batches}


def main():
    import peft
    import transformers
    import trl
    ref = {
        "versions": {"trl": trl.__version__, "peft": peft.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "loss_function": loss_function_cases(),
        "trainer": [trainer_case(0.5, 2), trainer_case(0.0, 3), trainer_case(1.0, 2)],
    }
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(ref, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
