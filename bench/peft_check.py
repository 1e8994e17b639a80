"""Loads a fedtune adapter in PEFT unchanged and checks that PEFT gives the same
assistant-only loss as `fedtune eval --adapter`; optionally checks that the model written by
`fedtune export` gives in transformers the logits of PEFT's own `merge_and_unload`.

    bench/.venv/bin/python bench/peft_check.py MODEL_DIR ADAPTER_DIR DATA.jsonl [EXPORTED_DIR]

DATA holds OpenAI `messages` records. Trained tokens follow fedtune's (and transformers'
assistant-mask) convention: each assistant message's content and the end-of-turn token after it.
Exits non-zero when a difference exceeds 1e-4.
"""
import json
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir, adapter_dir, data = sys.argv[1:4]
exported = sys.argv[4] if len(sys.argv) > 4 else None
tok = AutoTokenizer.from_pretrained(model_dir)
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
model = PeftModel.from_pretrained(base, adapter_dir).eval()
special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}


def encode(messages):
    text = tok.apply_chat_template(messages, tokenize=False)
    spans, cursor = [], 0
    for m in messages:
        if m["role"] == "assistant":
            start = text.index(m["content"], cursor)
            spans.append((start, start + len(m["content"])))
            cursor = start + len(m["content"])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    mask = [0] * len(ids)
    t = 0
    for s, e in spans:
        while t < len(ids) and offsets[t][1] <= s:
            t += 1
        while t < len(ids) and offsets[t][0] < e:
            if offsets[t][1] > s:
                mask[t] = 1
            t += 1
        j = t
        while j < len(ids):
            if ids[j] in special:
                mask[j] = 1
                break
            if text[offsets[j][0]:offsets[j][1]].strip():
                break
            j += 1
    return ids, mask


total, count, first = 0.0, 0, None
with torch.no_grad():
    for line in open(data):
        if not line.strip():
            continue
        ids, mask = encode(json.loads(line)["messages"])
        x = torch.tensor([ids])
        logits = model(input_ids=x).logits[0].float()
        if first is None:
            first = (x, logits)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -logp.gather(1, x[0, 1:, None])[:, 0]
        m = torch.tensor(mask[1:], dtype=torch.bool)
        total += nll[m].sum().item()
        count += int(m.sum())
peft_loss = total / count
out = subprocess.run(["target/release/fedtune", "eval", "--model", model_dir, "--adapter", adapter_dir,
                      "--data", data, "--json"], capture_output=True, text=True, check=True)
ours = json.loads(out.stdout.strip().splitlines()[-1])
report = {"peft_loss": peft_loss, "fedtune_loss": ours["loss"], "tokens": count,
          "fedtune_tokens": ours["tokens"], "loss_diff": abs(peft_loss - ours["loss"])}
ok = report["loss_diff"] < 1e-4 and count == ours["tokens"]
if exported:
    merged = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    peft_merged = model.merge_and_unload().eval()
    with torch.no_grad():
        ours = merged(input_ids=first[0]).logits[0]
        theirs = peft_merged(input_ids=first[0]).logits[0]
    # Against PEFT's own merge_and_unload (the same f32 operation), and for information against
    # the unmerged base + adapter (merging itself rounds differently in f32).
    report["export_vs_peft_merge_max_logit_diff"] = (ours - theirs).abs().max().item()
    report["export_vs_unmerged_max_logit_diff"] = (ours - first[1]).abs().max().item()
    ok = ok and report["export_vs_peft_merge_max_logit_diff"] < 1e-4
print(json.dumps(report))
sys.exit(0 if ok else 1)
