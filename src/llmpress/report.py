"""Tables and plots of a sweep: `report.md`, PNG plots, rendered from `report.json` alone (so
`llmpress report DIR` can redraw them without re-running anything)."""
from __future__ import annotations

import json
import math
from pathlib import Path

FAMILY_COLOURS = {"dense": "black", "quantization": "tab:blue", "pruning": "tab:orange",
                  "low-rank": "tab:green", "composite": "tab:red", "mixed": "tab:purple"}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated in (size lower, perplexity lower), by increasing size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_tradeoff(runs: list[dict], key: str, ylabel: str, path: Path, log_y: bool, lower_is_better: bool) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    pts = [(r["bytes"] / 2**20, r[key]) for r in runs]
    for family in FAMILY_COLOURS:
        idx = [i for i, r in enumerate(runs) if r["family"] == family]
        if idx:
            ax.scatter([pts[i][0] for i in idx], [pts[i][1] for i in idx], c=FAMILY_COLOURS[family],
                       marker="*" if family == "dense" else "o", s=160 if family == "dense" else 50,
                       label=family, zorder=3)
    # runs of the same size (e.g. every 50 % pruning method) would print their labels on top of
    # each other: stack those labels downwards
    yv = [math.log10(max(p[1], 1e-30)) if log_y else p[1] for p in pts]
    span_x = max(p[0] for p in pts) - min(p[0] for p in pts) or 1.0
    span_y = max(yv) - min(yv) or 1.0
    placed: list[int] = []
    for i in sorted(range(len(runs)), key=lambda i: (pts[i][0], -pts[i][1])):
        stack = sum(abs(pts[j][0] - pts[i][0]) < 0.03 * span_x and abs(yv[j] - yv[i]) < 0.08 * span_y for j in placed)
        placed.append(i)
        ax.annotate(runs[i]["label"], pts[i], fontsize=7, xytext=(6, 4 - 10 * stack), textcoords="offset points")
    signed = [(x, y if lower_is_better else -y) for x, y in pts]
    front = pareto_front(signed)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", c="grey", lw=1, label="Pareto front", zorder=2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("size of the decoder's linear layers as stored (MiB)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_layers(run: dict, path: Path) -> None:
    """Per-layer relative output error and kept fraction of one run, in layer order."""
    plt = _plt()
    layers = run["layers"]
    names = list(layers)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    err = [layers[n].get("output_error", float("nan")) for n in names]
    kept = [layers[n].get("kept_params", float("nan")) for n in names]
    bits = [layers[n].get("bits_per_weight", float("nan")) for n in names]
    x = range(len(names))
    a1.semilogy(x, err, ".-", c=FAMILY_COLOURS.get(run["family"], "grey"), lw=0.8)
    a1.set_ylabel("relative output error\n||(W-W')X||² / ||WX||²")
    a1.grid(alpha=0.3)
    a2.plot(x, kept, ".-", c="tab:red", lw=0.8, label="kept parameters (fraction)")
    a2.plot(x, [b / 16 for b in bits], ".-", c="tab:grey", lw=0.8, label="bits per weight / 16")
    a2.set_ylabel("fraction")
    a2.set_ylim(0, 1.1)
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    ticks = [i for i, n in enumerate(names) if n.endswith("q_proj")]
    a2.set_xticks(ticks, [names[i].split(".")[2] for i in ticks], fontsize=7)
    a2.set_xlabel("decoder block (7 linear layers each: q, k, v, o, gate, up, down)")
    fig.suptitle(f"{run['label']}: per-layer error and kept fraction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def render(out: str | Path) -> Path:
    """Write report.md and the PNG plots from out/report.json."""
    out = Path(out)
    data = json.loads((out / "report.json").read_text())
    runs = data["runs"]
    tasks = data.get("tasks") or []
    for r in runs:
        if tasks:
            r["avg_acc"] = sum(r["tasks"][t]["acc"] for t in tasks) / len(tasks)
    plot_tradeoff(runs, "perplexity", f"WikiText-2 perplexity (seq {data['seq_len']}, {data['windows']} windows, log scale)",
                  out / "pareto_perplexity.png", log_y=True, lower_is_better=True)
    if tasks:
        plot_tradeoff(runs, "avg_acc", f"mean zero-shot accuracy ({', '.join(tasks)})", out / "pareto_accuracy.png",
                      log_y=False, lower_is_better=False)
    for r in runs:
        if r.get("layers"):
            plot_layers(r, out / f"layers_{_safe(r['label'])}.png")

    dense = next(r for r in runs if r["family"] == "dense")
    lines = [f"# llmpress sweep: {data['model']}", "",
             f"WikiText-2 perplexity: seq_len {data['seq_len']}, first {data['windows']} windows "
             f"(papers' protocol). Calibration: {data.get('calibration') or 'none'}.",
             "Size = the decoder blocks' linear layers as stored (packed integers + fp16 scales; fp16 "
             "values + 1-bit mask; fp16 factors).", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    head = "| run | family | MiB | bits/weight | perplexity | Δ vs dense |"
    sep = "|---|---|---|---|---|---|"
    if tasks:
        head += "".join(f" {t} acc |" for t in tasks) + " mean acc |"
        sep += "---|" * (len(tasks) + 1)
    head += " compress s |"
    sep += "---|"
    lines += [head, sep]
    for r in runs:
        row = (f"| {r['label']} | {r['family']} | {r['bytes'] / 2**20:.2f} | {r['bits_per_weight']:.3f} | "
               f"{r['perplexity']:.3f} | {r['perplexity'] - dense['perplexity']:+.3f} |")
        if tasks:
            row += "".join(f" {r['tasks'][t]['acc']:.4f} |" for t in tasks) + f" {r['avg_acc']:.4f} |"
        row += f" {r.get('compress_seconds', 0):.1f} |"
        lines.append(row)
    front = pareto_front([(r["bytes"], r["perplexity"]) for r in runs])
    lines += ["", "Pareto front (size, perplexity): " + ", ".join(runs[i]["label"] for i in front), "",
              "![perplexity vs size](pareto_perplexity.png)", ""]
    if tasks:
        lines += ["![accuracy vs size](pareto_accuracy.png)", ""]
    for r in runs:
        if r.get("layers"):
            lines += [f"![{r['label']} per layer](layers_{_safe(r['label'])}.png)", ""]
    lines += [f"Versions: {data.get('versions')}. Total sweep time {data.get('sweep_seconds', 0):.0f}s.", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"


def plot_allocation(table, choice: dict[str, int], path, title: str) -> None:
    """Per layer: the chosen option's kept parameters and bits per weight, coloured by family."""
    import numpy as np
    from llmpress.config import config_class
    plt = _plt()
    names = [n for n in table.layers if n in choice]      # model order (block 0 first)
    opts = [table.layers[n]["options"][choice[n]] for n in names]
    fam = [("dense" if o["config"] is None else config_class(o["config"]["method"]).family) for o in opts]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True)
    x = np.arange(len(names))
    kept = [o["params"] / table.layers[n]["params"] for n, o in zip(names, opts)]
    bits = [8 * o["bytes"] / table.layers[n]["params"] for n, o in zip(names, opts)]
    for f in sorted(set(fam)):
        idx = [k for k in range(len(names)) if fam[k] == f]
        a1.bar(x[idx], [kept[k] for k in idx], color=FAMILY_COLOURS.get(f, "grey"), label=f, width=0.9)
        a2.bar(x[idx], [bits[k] for k in idx], color=FAMILY_COLOURS.get(f, "grey"), width=0.9)
    a1.set_ylabel("parameters kept (fraction)")
    a1.legend(fontsize=8, ncol=4)
    a2.set_ylabel("bits per weight (as stored)")
    ticks = [k for k, n in enumerate(names) if n.endswith("q_proj")]
    a2.set_xticks(ticks, [names[k].split(".")[2] for k in ticks], fontsize=7)
    a2.set_xlabel("decoder block (q, k, v, o, gate, up, down in each)")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

