"""Tables of ``bench/test_training.py`` results, in Markdown, for docs/training.md.

python bench/training_report.py OUT/training-memory.json OUT/training-frozen-bn.json
"""

from __future__ import annotations

import json
import sys


def table(info: dict) -> str:
    rows = [
        f"**ResNet18, BN {info['bn']}, {info['dtype']}, batch {info['batch_size']}, "
        f"{info['image_size']} px** ({info['device']}, torch {info['torch']})",
        "",
        "| variant | ms/step | ratio (range) | MiB at end of forward | peak MiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, s in info["summary"].items():
        rows.append(
            f"| {name} | {s['median_s'] * 1e3:.2f} | {s['ratio']:.2f} "
            f"({s['ratio_min']:.2f}-{s['ratio_max']:.2f}) | {s['after_forward_mib']:.0f} | "
            f"{s['peak_mib']:.0f} |"
        )
    return "\n".join(rows)


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            for bench in json.load(f)["benchmarks"]:
                print(table(bench["extra_info"]), end="\n\n")


if __name__ == "__main__":
    main(sys.argv[1:])
