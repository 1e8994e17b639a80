"""Writes bench/.data/dpo_bench.jsonl: N preference pairs of plain text with about P prompt
and C completion words (common one-token words), seeded; both fedtune and TRL read it.

    python3 bench/make_dpo_bench_data.py [N] [P] [C]
"""
import json
import os
import random
import sys

n, p, c = (int(sys.argv[i]) if len(sys.argv) > i else d for i, d in [(1, 32), (2, 128), (3, 128)])
words = ("the a of to and in is it you that he was for on are with as his they be at one have this "
         "from or had by word but what some we can out other were all there when up use your how "
         "said an each she which do their time if will way about many then them write would like so "
         "these her long make thing see him two has look more day could go come did number sound no "
         "most people my over know water than call first who may down side been now find").split()
r = random.Random(0)
os.makedirs(os.path.join(os.path.dirname(__file__), ".data"), exist_ok=True)
with open(os.path.join(os.path.dirname(__file__), ".data", "dpo_bench.jsonl"), "w") as f:
    for _ in range(n):
        say = lambda k: " ".join(r.choice(words) for _ in range(k))
        f.write(json.dumps({"prompt": say(p), "chosen": " " + say(c), "rejected": " " + say(c)}) + "\n")
