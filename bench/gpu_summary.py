"""Ratios, model FLOP utilisation and the time per kernel from bench/gpu_step.sh's results.

    python3 bench/gpu_summary.py RESULTS.jsonl [SUMMARY.md]

Reads the JSON lines of engine/examples/gpu_step.rs ("impl": "fedtune") and bench/gpu_step.py
("impl": "peer"), pairs the runs of the same benchmark (bench, mode, model, batch, seq), takes
the median over rounds of each side's throughput and the largest peak memory, and prints (and
writes to SUMMARY.md) one markdown table: throughput ratio, peak memory of each side and their
ratio, fedtune's model FLOP utilisation against the faster of the two measured bf16 GEMM peaks,
and whether issue #18's targets are met. A profiled fedtune run ("profile" field) adds a table
of the kernels that take the most device time. Exits 1 when the file holds no pair to compare.
"""
import json
import os
import statistics
import sys

# (bench, mode) -> (throughput ratio at least, memory ratio at most, fedtune peak GiB at most)
TARGETS = {
    ("sft", "lora"): (2.0, 0.6, None),
    ("dpo", "lora"): (2.0, None, None),
    ("sft", "qlora-gc"): (1.0, None, 20.0),
}


def rate(r):
    return r["pairs_per_s"] if r["bench"] == "dpo" else r["tokens_per_s"]


def key(r):
    return (r["bench"], r["mode"], os.path.basename(str(r.get("model", "")).rstrip("/")), r["batch"], r["seq"])


def summarise(lines):
    runs = [json.loads(line) for line in lines if line.strip().startswith("{")]
    peaks = [r["tflops"] for r in runs if r.get("bench") == "peak"]
    peak = max(peaks) if peaks else None
    groups = {}
    for r in runs:
        if r.get("bench") in ("sft", "dpo"):
            groups.setdefault(key(r), {}).setdefault(r["impl"], []).append(r)
    rows, profiles = [], []
    for k, sides in sorted(groups.items()):
        ours, peer = sides.get("fedtune", []), sides.get("peer", [])
        profiled = [r for r in ours if "profile" in r]
        profiles += [(k, r) for r in profiled]
        timed = [r for r in ours if "profile" not in r] or ours
        if not timed or not peer:
            continue
        a = statistics.median(rate(r) for r in timed)
        b = statistics.median(rate(r) for r in peer)
        ma, mb = max(r["peak_gib"] for r in timed), max(r["peak_gib"] for r in peer)
        secs = statistics.median(r["seconds_per_step"] for r in timed)
        flops = timed[0].get("model_flops_per_step")
        achieved = flops / secs / 1e12 if flops else None
        mfu = achieved / peak if achieved and peak else None
        want = TARGETS.get((k[0], k[1]))
        verdict = ""
        if want:
            ok = a / b >= want[0]
            if want[1] is not None:
                ok &= ma / mb <= want[1]
            if want[2] is not None:
                ok &= ma <= want[2]
            verdict = "met" if ok else "not met"
        rows.append(dict(bench=k[0], mode=k[1], model=k[2], shape=f"{k[3]} x {k[4]}", ours=a, peer=b,
                         ratio=a / b, mem_ours=ma, mem_peer=mb, mem_ratio=ma / mb, tflops=achieved, mfu=mfu,
                         rounds=(len(timed), len(peer)), peer_name=peer[0].get("peer", ""), target=verdict))
    out = []
    if rows:
        dev = next((r.get("device") for r in runs if r.get("impl") == "fedtune"), "?")
        out.append(f"Device: {dev}; bf16 GEMM peak {peak if peak else '?'} TFLOP/s (the faster of fedtune's and torch's).\n")
        out.append("| benchmark | model | batch x seq | fedtune | peer | ratio | peak GiB fedtune / peer (ratio) | TFLOP/s (MFU) | target |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            unit = "pairs/s" if r["bench"] == "dpo" else "tok/s"
            mfu = f"{r['tflops']:.0f} ({100 * r['mfu']:.0f} %)" if r["mfu"] is not None else (
                f"{r['tflops']:.1f}" if r["tflops"] else "")
            out.append(f"| {r['bench']} {r['mode']} | {r['model']} | {r['shape']} | {r['ours']:.1f} {unit} | "
                       f"{r['peer']:.1f} {unit} | **{r['ratio']:.2f}x** | {r['mem_ours']:.2f} / {r['mem_peer']:.2f} "
                       f"({r['mem_ratio']:.2f}x) | {mfu} | {r['target']} |")
        out.append("")
        out.append("Peers: " + "; ".join(sorted({f"{r['bench']} {r['mode']}: {r['peer_name']}" for r in rows})))
    for k, r in profiles:
        out.append("")
        out.append(f"Device time per kernel, fedtune {k[0]} {k[1]} {k[2]} {k[3]} x {k[4]} (profiled steps):\n")
        out.append("| kernel | calls | ms | share |")
        out.append("|---|---|---|---|")
        for p in r["profile"][:15]:
            out.append(f"| `{p['name']}` | {p['calls']} | {p['ms']:.2f} | {100 * p['share']:.1f} % |")
    return rows, "\n".join(out)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        rows, text = summarise(f.readlines())
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(text + "\n")
    if not rows:
        sys.exit("no benchmark with both fedtune's and the peer's results")


if __name__ == "__main__":
    main()
