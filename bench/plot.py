"""Plot bench/results.json (the figures quoted in bench/README.md) as bench/figures.png: each figure vs its goal.

Usage: ``.venv/bin/python bench/plot.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main() -> None:
    rows = json.loads((HERE / "results.json").read_text())["figures"]
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(rows) + 1.2))
    labels = [r["label"] for r in rows]
    # each figure as a fraction of its goal (>= 1 = goal holds); latency is inverted (lower is better)
    scores = [(r["goal"] / r["value"]) if r.get("lower_is_better") else (r["value"] / r["goal"]) for r in rows]
    scores = [min(s, 3.0) for s in scores]  # clipped: past 3x the goal the bar length says nothing more
    colors = ["#2a9d8f" if s >= 1 else "#e76f51" for s in scores]
    ax.barh(range(len(rows)), scores, color=colors)
    ax.axvline(1.0, color="black", lw=1, ls="--")
    for i, (r, s) in enumerate(zip(rows, scores, strict=True)):
        ax.text(s + 0.02, i, f"{r['value']}{r.get('unit', '')} (goal {r['goal_text']})", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("figure / goal (>= 1: goal holds; latency: goal / figure)")
    ax.set_xlim(0, 4.2)
    ax.set_title("crowd benchmarks, 2 shared cores (bench/README.md)")
    fig.tight_layout()
    fig.savefig(HERE / "figures.png", dpi=110)


if __name__ == "__main__":
    main()
