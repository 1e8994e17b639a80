"""Builds the GGUF test fixtures in testdata/gguf from testdata/tiny-llama.

Run with the benchmark venv (torch, transformers, gguf):
    bench/.venv/bin/python scripts/make_gguf_fixtures.py

- quant_blocks.safetensors: for each GGML type, raw block bytes (u8) and the values gguf-py's
  reference dequantiser (a port of ggml-quants.c) produces from them.
- tiny.gguf: the tiny reference Llama converted the way llama.cpp's convert_hf_to_gguf does
  (q/k rows permuted, vocabulary and merges embedded, chat template), with mixed tensor types.
- tiny_gguf_reference.safetensors: logits computed by transformers' own GGUF loader on it.
"""
import json
import pathlib

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize
from safetensors.numpy import save_file, load_file

root = pathlib.Path(__file__).resolve().parent.parent
out = root / "testdata" / "gguf"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# ---- quantisation blocks -------------------------------------------------------------------
blocks = {}
for name, qtype in [("Q8_0", T.Q8_0), ("Q4_0", T.Q4_0), ("Q4_1", T.Q4_1), ("F16", T.F16), ("BF16", T.BF16)]:
    x = rng.standard_normal((4, 256)).astype(np.float32)
    q = quantize(x, qtype)
    blocks[f"{name}.bytes"] = np.ascontiguousarray(q).reshape(-1).view(np.uint8)
    blocks[f"{name}.values"] = dequantize(q, qtype).reshape(-1).astype(np.float32)
for name, qtype, size in [("Q4_K", T.Q4_K, 144), ("Q6_K", T.Q6_K, 210)]:
    raw = rng.integers(0, 256, size=(4, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(4, 2)).astype(np.float16).view(np.uint8).reshape(4, 4)
    if name == "Q4_K":
        raw[:, 0:4] = scales  # d, dmin
    else:
        raw[:, 208:210] = scales[:, 0:2]  # d
    blocks[f"{name}.bytes"] = raw.reshape(-1)
    blocks[f"{name}.values"] = dequantize(raw, qtype).reshape(-1).astype(np.float32)
save_file(blocks, str(out / "quant_blocks.safetensors"))

# ---- tiny model as GGUF ----------------------------------------------------------------------
src = root / "testdata" / "tiny-llama" / "model"
cfg = json.loads((src / "config.json").read_text())
tok = json.loads((src / "tokenizer.json").read_text())
tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
w = load_file(str(src / "model.safetensors"))
n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]


def permute(x, heads):
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


writer = gguf.GGUFWriter(str(out / "tiny.gguf"), "llama")
writer.add_block_count(cfg["num_hidden_layers"])
writer.add_context_length(cfg["max_position_embeddings"])
writer.add_embedding_length(cfg["hidden_size"])
writer.add_feed_forward_length(cfg["intermediate_size"])
writer.add_head_count(n_head)
writer.add_head_count_kv(n_kv)
writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
writer.add_rope_dimension_count(cfg["head_dim"])
writer.add_vocab_size(cfg["vocab_size"])
writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
added = {t["id"]: t for t in tok["added_tokens"]}
writer.add_tokenizer_model("gpt2")
writer.add_tokenizer_pre("smollm")
writer.add_token_list([t for t, _ in vocab])
writer.add_token_types([3 if i in added else 1 for _, i in vocab])
writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
writer.add_bos_token_id(cfg["bos_token_id"])
writer.add_eos_token_id(cfg["eos_token_id"])
writer.add_pad_token_id(cfg["pad_token_id"])
writer.add_add_bos_token(False)
writer.add_chat_template(tok_cfg["chat_template"])

types = {"attn_q": T.Q4_0, "attn_k": T.Q8_0, "attn_v": T.F16, "attn_output": T.BF16,
         "ffn_gate": T.Q4_1, "ffn_up": T.Q4_0, "ffn_down": T.Q8_0}
names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down"}


def add(name, x, qtype):
    x = np.ascontiguousarray(x.astype(np.float32))
    if qtype == T.F32:
        writer.add_tensor(name, x)
    else:
        writer.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)


add("token_embd.weight", w["model.embed_tokens.weight"], T.Q8_0)
add("output_norm.weight", w["model.norm.weight"], T.F32)
for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    add(f"blk.{i}.attn_norm.weight", w[p + "input_layernorm.weight"], T.F32)
    add(f"blk.{i}.ffn_norm.weight", w[p + "post_attention_layernorm.weight"], T.F32)
    for hf, g in names.items():
        x = w[p + hf + ".weight"]
        if g == "attn_q":
            x = permute(x, n_head)
        elif g == "attn_k":
            x = permute(x, n_kv)
        add(f"blk.{i}.{g}.weight", x, types[g])
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()

# ---- transformers' own GGUF loader gives the expected logits ---------------------------------
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file="tiny.gguf", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(str(out), gguf_file="tiny.gguf")
text = "<|im_start|>user\nNote: 54-year-old male, chest pain.<|im_end|>\n<|im_start|>assistant\n"
ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0]
save_file({"input_ids": ids[0].numpy().astype(np.int64),
           "logits_first256": logits[:, :256].contiguous().numpy()},
          str(out / "tiny_gguf_reference.safetensors"))
(out / "tiny_gguf_reference.json").write_text(json.dumps({
    "made_with": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                  "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0"},
    "text": text}, indent=1))
print("ok", ids.shape, logits.shape)
