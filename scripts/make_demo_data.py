#!/usr/bin/env python3
"""Generates the project's own demo datasets (deterministic, no downloads).

Three "sites" with different private text, as in a federation of a hospital, a bank and a
SaaS help desk: each example asks for fields extracted from a note as JSON.

    testdata/demo/{hospital,bank,helpdesk}.jsonl   OpenAI `messages` SFT examples
    testdata/demo/prefs.jsonl                      prompt/chosen/rejected pairs (all sites)

Run: python3 scripts/make_demo_data.py
"""
import json
import os
import random

OUT = os.path.join(os.path.dirname(__file__), "..", "testdata", "demo")

SYMPTOMS = ["chest pain", "headache", "fever", "cough", "back pain", "dizziness", "nausea"]
DRUGS = ["aspirin", "ibuprofen", "metformin", "lisinopril", "atorvastatin", "none"]
MERCHANTS = ["Grocer Co", "City Rail", "Book Barn", "Fuel Stop", "Cafe Nord", "Pharma Plus"]
CATEGORIES = {"Grocer Co": "food", "City Rail": "transport", "Book Barn": "leisure",
              "Fuel Stop": "transport", "Cafe Nord": "food", "Pharma Plus": "health"}
PRODUCTS = ["billing", "login", "export", "mobile app", "API", "dashboard"]
MOODS = ["angry", "neutral", "happy"]


def hospital(r):
    age, sex = r.randint(18, 90), r.choice("MF")
    s, d, days = r.choice(SYMPTOMS), r.choice(DRUGS), r.randint(1, 14)
    word = "male" if sex == "M" else "female"
    note = f"Note: {age}-year-old {word}, {s} for {days} days, takes {d}."
    ans = {"age": age, "sex": sex, "symptom": s, "medication": d, "days": days}
    return "You extract fields from clinical notes as JSON.", note, ans


def bank(r):
    m = r.choice(MERCHANTS)
    amount = round(r.uniform(2, 300), 2)
    day = r.randint(1, 28)
    note = f"Transaction: {m} charged EUR {amount:.2f} on day {day}."
    ans = {"merchant": m, "amount": amount, "currency": "EUR", "day": day,
           "category": CATEGORIES[m]}
    return "You extract fields from bank transactions as JSON.", note, ans


def helpdesk(r):
    p, mood = r.choice(PRODUCTS), r.choice(MOODS)
    prio = "high" if mood == "angry" else "normal"
    tone = {"angry": "This is unacceptable!", "neutral": "Please advise.",
            "happy": "Thanks a lot!"}[mood]
    note = f"Ticket: problem with {p}. {tone}"
    ans = {"product": p, "sentiment": mood, "priority": prio}
    return "You extract fields from support tickets as JSON.", note, ans


def corrupt(ans, r):
    bad = dict(ans)
    k = r.choice(sorted(bad))
    v = bad[k]
    bad[k] = (v + r.randint(1, 9)) if isinstance(v, (int, float)) else "unknown"
    return bad


def main():
    os.makedirs(OUT, exist_ok=True)
    prefs = []
    for name, gen, seed in [("hospital", hospital, 1), ("bank", bank, 2), ("helpdesk", helpdesk, 3)]:
        r = random.Random(seed)
        with open(os.path.join(OUT, f"{name}.jsonl"), "w") as f:
            for i in range(40):
                system, note, ans = gen(r)
                rec = {"messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": note},
                                    {"role": "assistant", "content": json.dumps(ans)}]}
                f.write(json.dumps(rec) + "\n")
                if i < 8:
                    prefs.append({"prompt": f"{system}\n{note}", "chosen": json.dumps(ans),
                                  "rejected": json.dumps(corrupt(ans, r))})
    with open(os.path.join(OUT, "prefs.jsonl"), "w") as f:
        for p in prefs:
            f.write(json.dumps(p) + "\n")


if __name__ == "__main__":
    main()
