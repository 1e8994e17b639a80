"""Privacy accountant reference values from Opacus itself.

    bench/.venv/bin/python scripts/make_dp_fixtures.py   (pip install opacus==1.6.0)

Writes testdata/dp/opacus_rdp.json: for each configuration, the RDP of the sampled Gaussian
mechanism at every default order and the (epsilon, best order) Opacus reports.
The first configuration is Abadi et al. 2016's MNIST setting (q = 0.01, sigma = 4,
10 000 steps, delta = 1e-5), for which the paper reports epsilon ~ 1.26 with the moments
accountant; RDP with Opacus's conversion gives a slightly tighter value.
"""
import json
import pathlib

import opacus
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

orders = RDPAccountant.DEFAULT_ALPHAS
configs = [
    {"q": 0.01, "sigma": 4.0, "steps": 10000, "delta": 1e-5},
    {"q": 256 / 60000, "sigma": 1.1, "steps": 60 * 60000 // 256, "delta": 1e-5},
    {"q": 0.1, "sigma": 1.0, "steps": 100, "delta": 1e-5},
    {"q": 1.0, "sigma": 2.0, "steps": 10, "delta": 1e-6},
    {"q": 0.3, "sigma": 0.7, "steps": 20, "delta": 1e-5},
]
out = []
for c in configs:
    rdp = compute_rdp(q=c["q"], noise_multiplier=c["sigma"], steps=c["steps"], orders=orders)
    eps, best = get_privacy_spent(orders=orders, rdp=rdp, delta=c["delta"])
    out.append({**c, "orders": list(map(float, orders)), "rdp": [float(v) for v in rdp],
                "epsilon": float(eps), "best_order": float(best)})
path = pathlib.Path(__file__).resolve().parent.parent / "testdata" / "dp" / "opacus_rdp.json"
path.write_text(json.dumps({"made_with": f"opacus {opacus.__version__}", "configs": out}, indent=1))
for c in out:
    print(c["q"], c["sigma"], c["steps"], c["delta"], "->", c["epsilon"], c["best_order"])
