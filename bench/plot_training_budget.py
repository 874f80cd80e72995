"""The chart of ``bench/training_budget.py`` results: memory at the end of forward (filled)
and at peak (hollow) against step time, both as ratios to the plain model, one panel per
model, batch and dtype, eager and compiled in two colours.

    python bench/plot_training_budget.py OUT/*.json -o docs/training-budget.png
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"eager": "tab:blue", "compiled": "tab:orange"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    panels: dict[str, list[dict]] = defaultdict(list)
    for path in args.results:
        result = json.loads(path.read_text())
        dtype = "bf16 CL" if result["dtype"].startswith("bfloat16") else "fp32"
        panels[f"{result['model']} b{result['batch_size']} {dtype}"].append(result)
    columns = min(4, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), squeeze=False)
    for ax, (title, results) in zip(axes.flat, sorted(panels.items()), strict=False):
        for result in results:
            colour = COLOURS[result["mode"]]
            for name, s in result["summary"].items():
                if "after_forward_ratio" not in s:
                    continue
                ax.scatter(s["ratio"], s["after_forward_ratio"], color=colour)
                ax.scatter(s["ratio"], s["peak_ratio"], facecolors="none", edgecolors=colour)
                ax.annotate(name.replace("budget=", "b="), (s["ratio"], s["after_forward_ratio"]),
                            fontsize=7, xytext=(3, 3), textcoords="offset points")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step time / plain")
        ax.set_ylabel("memory / plain")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles = [
        plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in COLOURS.items()
    ] + [plt.Line2D([], [], marker="o", ls="", mfc="none", color="grey", label="peak")]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)


if __name__ == "__main__":
    main()
