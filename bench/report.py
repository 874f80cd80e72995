"""Turn benchmark JSON (pytest-benchmark, from bench/test_resnet18.py) into tables and a chart.

    python bench/report.py bench/results/gpu-h100-2026-11-22/*.json [--doc docs/benchmarks.md]

Rewrites the part of ``--doc`` between the ``<!-- tables:start -->`` and
``<!-- tables:end -->`` markers (the rest of the page is prose, kept as it is) and writes the
chart next to it as a PNG. Every ratio is against plain ``torch.compile`` in the same run:
the median over rounds of (variant time / baseline time), with the lowest and highest round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any

START, END = "<!-- tables:start -->", "<!-- tables:end -->"
CHART_VARIANTS = [
    "plugin",
    "plugin-always",
    "freezing",
    "freezing+plugin",
    "offline",
    "offline+freezing",
]


def _load(paths: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    configs, compile_times = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        date = data.get("datetime", "")[:10]
        for bench in data["benchmarks"]:
            info = dict(bench["extra_info"], date=date, source=os.path.basename(path))
            if "summary" in info:
                configs.append(info)
            elif "compile_s" in info:
                compile_times.append(info)
    configs.sort(key=lambda c: (c["dtype"], c["channels_last"], c["batch_size"]))
    return configs, compile_times


def _config_name(c: dict[str, Any]) -> str:
    layout = ", channels_last" if c["channels_last"] else ""
    return f"{c['dtype']}{layout}, batch {c['batch_size']}"


def _environment(c: dict[str, Any]) -> str:
    env = c["environment"]
    cuda = f", CUDA {env['cuda']}" if "cuda" in env else ""
    return f"{env['device']}, torch {env['torch']}{cuda}, {c['date']}"


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def tables(configs: list[dict[str, Any]], compile_times: list[dict[str, Any]]) -> str:
    out: list[str] = []
    by_env: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        by_env.setdefault(_environment(c), []).append(c)
    for env, group in by_env.items():
        variants = list(dict.fromkeys(v for c in group for v in c["summary"]))
        out.append(f"### {env}\n")
        out.append("Median ratio to plain `torch.compile` (lower is faster); ms per call of plain")
        out.append("`torch.compile` in the first column.\n")
        out.append("| config | torch.compile ms per call | " + " | ".join(variants) + " |")
        out.append("| --- | --- | " + " | ".join("---" for _ in variants) + " |")
        for c in group:
            cells = []
            for v in variants:
                s = c["summary"].get(v)
                cells.append(f"{s['ratio']:.2f}" if s else "")
            base_ms = c["summary"]["compile"]["median_s"] * 1e3
            out.append(f"| {_config_name(c)} | {base_ms:.3f} | " + " | ".join(cells) + " |")
        shared = [v for v in variants if all(v in c["summary"] for c in group)]
        geo = [f"{_geomean([c['summary'][v]['ratio'] for c in group]):.3f}" for v in shared]
        out.append(
            "\nGeometric mean over these configs: "
            + ", ".join(f"{v} {g}" for v, g in zip(shared, geo, strict=True))
            + ".\n"
        )
        # markdown='1': mkdocs (md_in_html) renders the tables inside; GitHub ignores it.
        out.append(
            "<details markdown='1'><summary>Per-round spread, folds, compile time</summary>\n"
        )
        for c in group:
            out.append(f"\n{_config_name(c)} ({c['calls_per_round']} calls a round):\n")
            out.append("| variant | ms per call | ratio | rounds | first call s | folded | kept |")
            out.append("| --- | --- | --- | --- | --- | --- | --- |")
            for v, s in c["summary"].items():
                out.append(
                    f"| {v} | {s['median_s'] * 1e3:.3f} | {s['ratio']:.3f} | "
                    f"{s['ratio_min']:.2f}-{s['ratio_max']:.2f} | {c['compile_s'][v]:.1f} | "
                    f"{c['folded'][v]} | {c['kept'][v]} |"
                )
            for v, why in c.get("dropped", {}).items():
                out.append(f"\n{v} did not run: {why}")
        out.append("\n</details>\n")
    for ct in compile_times:
        env = ct["environment"]
        out.append(f"### Compile time, {env['device']}, torch {env['torch']}, {ct['date']}\n")
        out.append("First call of ResNet18 (batch 1, fp32), one fresh process and cache each,")
        out.append("the variants alternating; the plugin's pass time is its own share.\n")
        out.append("| variant | first call s (each run) | median | plugin pass s | tracing s |")
        out.append("| --- | --- | --- | --- | --- |")
        for v, times in ct["compile_s"].items():
            median = sorted(times)[len(times) // 2]
            passes = max(ct["pass_s"][v])
            tracing = max(ct["tracing_s"][v])
            runs = ", ".join(f"{t:.1f}" for t in times)
            out.append(f"| {v} | {runs} | {median:.1f} | {passes:.2f} | {tracing:.2f} |")
        out.append("")
    return "\n".join(out)


def chart(configs: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{_config_name(c)}\n{c['environment']['device'][:24]}" for c in configs]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(configs) * len(CHART_VARIANTS) / 2 + 1.5))
    height = 0.8 / len(CHART_VARIANTS)
    for i, v in enumerate(CHART_VARIANTS):
        ys, xs, lo, hi = [], [], [], []
        for j, c in enumerate(configs):
            s = c["summary"].get(v)
            if s is None:
                continue
            ys.append(j + i * height)
            xs.append(s["ratio"])
            lo.append(s["ratio"] - s["ratio_min"])
            hi.append(s["ratio_max"] - s["ratio"])
        ax.barh(ys, xs, height=height, xerr=[lo, hi], label=v, capsize=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(configs))], names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("time per call / plain torch.compile (median, bars: lowest-highest round)")
    ax.set_title("ResNet18 eval, no_grad")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("json", nargs="+")
    parser.add_argument("--doc", default=os.path.join("docs", "benchmarks.md"))
    args = parser.parse_args()
    configs, compile_times = _load(args.json)
    png = os.path.splitext(args.doc)[0] + ".png"
    body = tables(configs, compile_times) + f"\n![ResNet18 ratios]({os.path.basename(png)})\n"
    with open(args.doc) as f:
        doc = f.read()
    if START not in doc or END not in doc:
        raise SystemExit(f"{args.doc} has no {START} ... {END} markers")
    doc = re.sub(
        re.escape(START) + ".*?" + re.escape(END),
        lambda _: f"{START}\n{body}\n{END}",
        doc,
        flags=re.S,
    )
    with open(args.doc, "w") as f:
        f.write(doc)
    chart(configs, png)
    print(f"wrote {args.doc} and {png}")


if __name__ == "__main__":
    main()
