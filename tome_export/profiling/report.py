"""Comparison across devices: a text table, JSON, and PNG plots (matplotlib).

Owns turning stored records into one row per configuration (the latest record, how many
repeats exist, whether the last two agree within their noise) and printing or plotting rows.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from tome_export.errors import UserError
from tome_export.profiling.stats import medians_consistent
from tome_export.profiling.store import KEY_FIELDS


def key_of(record: dict) -> tuple:
    return tuple(record[k] for k in KEY_FIELDS)


def summarize(records: list[dict]) -> list[dict]:
    """Latest record per configuration, with how many repeats exist and whether the last two
    agree within their stated noise (medians differ by at most the larger spread)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for rec in records:
        groups[key_of(rec)].append(rec)
    rows = []
    for key, recs in groups.items():
        recs = sorted(recs, key=lambda r: r["created"])
        latest = recs[-1]
        repeatable = None
        if len(recs) >= 2 and all("spread" in r["latency_ms"] for r in recs[-2:]):
            repeatable = medians_consistent(recs[-2]["latency_ms"], latest["latency_ms"])
        breakdown = latest.get("breakdown") or {}
        fidelity = latest.get("fidelity") or {}
        rows.append(
            {
                **dict(zip(KEY_FIELDS, key)),
                "r": latest.get("r"),
                "runs_stored": len(recs),
                "median_ms": latest["latency_ms"]["median"],
                "p90_ms": latest["latency_ms"].get("p90"),
                "spread_ms": latest["latency_ms"].get("spread"),
                "throughput_per_s": latest.get("throughput_per_s"),
                "merge_share": breakdown.get("merge_share"),
                "predicted_speedup": (latest.get("predicted") or {}).get("speedup_vs_r0"),
                "breakdown_coverage": breakdown.get("coverage"),
                "breakdown_consistent": breakdown.get("consistent"),
                "cosine": fidelity.get("cosine"),
                "top1_agreement": fidelity.get("top1_agreement"),
                "repeatable": repeatable,
                "source": latest.get("source", "measured"),
            }
        )
    rows.sort(
        key=lambda row: (
            row["model"],
            row["batch_size"],
            row["r"] if row["r"] is not None else 1 << 30,
            row["schedule"],
            row["device"],
        )
    )
    return rows


def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """One line per configuration and device; speed-up relative to r=0 on the same device."""
    if not rows:
        return "no results stored yet: run `tome-export profile BUNDLE` or `tome-export import-results FILE`"
    baseline = {
        (row["device"], row["model"], row["target"], row["batch_size"]): row["median_ms"]
        for row in rows
        if row["r"] == 0
    }
    header = [
        "model",
        "device",
        "target",
        "schedule",
        "bs",
        "median ms",
        "±spread",
        "p90 ms",
        "speed-up",
        "predicted",
        "per s",
        "merge %",
        "ops/run",
        "cosine",
        "top-1",
        "repeat",
    ]
    lines = [header]
    for row in rows:
        base = baseline.get((row["device"], row["model"], row["target"], row["batch_size"]))
        coverage = row["breakdown_coverage"]
        lines.append(
            [
                row["model"],
                row["device"],
                row["target"],
                row["schedule"],
                str(row["batch_size"]),
                _fmt(row["median_ms"], ".2f"),
                _fmt(row["spread_ms"], ".2f"),
                _fmt(row["p90_ms"], ".2f"),
                _fmt(base / row["median_ms"] if base else None, ".2f") + ("×" if base else ""),
                _fmt(row.get("predicted_speedup"), ".2f") + ("×" if row.get("predicted_speedup") else ""),
                _fmt(row["throughput_per_s"], ".1f"),
                _fmt(row["merge_share"] * 100 if row["merge_share"] is not None else None, ".1f"),
                _fmt(coverage * 100 if coverage is not None else None, ".0f")
                + ("%" if coverage is not None else "")
                + ("" if row["breakdown_consistent"] in (None, True) else "!"),
                _fmt(row["cosine"], ".4f"),
                _fmt(row["top1_agreement"] * 100 if row["top1_agreement"] is not None else None, ".1f"),
                {
                    None: f"{row['runs_stored']}×",
                    True: f"{row['runs_stored']}× ok",
                    False: f"{row['runs_stored']}× NOISY",
                }[row["repeatable"]],
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append(
        "spread = p90 − p10 of the timed runs; predicted = the cost model's speed-up vs r=0; per s = batch / median; repeat 'ok' = the last two runs' medians differ by at most "
        "the larger spread; ops/run = per-op profiler time / end-to-end time (! = off by more than 10%)"
    )
    return "\n".join(out)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:80]


def _natural(text: str) -> list:
    """blocks.2 before blocks.10; names in parentheses (top level, inserted) first."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def write_plots(records: list[dict], rows: list[dict], out_dir: str | Path) -> list[Path]:
    """latency_vs_ratio.png (one line per device/model/batch) and layers_<device>_<model>.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("--plots needs matplotlib: pip install matplotlib") from None
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create plot folder {out_dir}: {exc}") from None
    written = []
    lines: dict[tuple, list[tuple[int, float, float]]] = defaultdict(list)
    for row in rows:
        if row["r"] is not None:
            lines[(row["device"], row["model"], row["batch_size"])].append(
                (row["r"], row["median_ms"], row["spread_ms"] or 0.0)
            )
    if lines:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (device, model, batch), points in sorted(lines.items()):
            points.sort()
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=[p[2] / 2 for p in points],
                marker="o",
                capsize=3,
                label=f"{device} · {model.split(':')[-1]} · bs {batch}",
            )
        ax.set_xlabel("r (tokens merged per block)")
        ax.set_ylabel("median latency (ms)")
        ax.set_title("Latency vs merge ratio")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out_dir / "latency_vs_ratio.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    latest: dict[tuple, dict] = {}
    for rec in sorted(records, key=lambda r: r["created"]):
        if rec.get("breakdown", {}).get("by_layer"):
            latest[key_of(rec)] = rec
    per_plot: dict[tuple, list[dict]] = defaultdict(list)
    for rec in latest.values():
        per_plot[(rec["device"], rec["model"], rec["batch_size"])].append(rec)
    for (device, model, batch), recs in sorted(per_plot.items()):
        recs.sort(key=lambda r: (r.get("r") is None, r.get("r") or 0, r["schedule"]))
        layers = sorted({layer for rec in recs for layer in rec["breakdown"]["by_layer"]}, key=_natural)
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(layers) + 2), 4.5))
        width = 0.8 / len(recs)
        for i, rec in enumerate(recs):
            values = [rec["breakdown"]["by_layer"].get(layer, 0.0) for layer in layers]
            merge = [rec["breakdown"].get("merge_by_layer", {}).get(layer, 0.0) for layer in layers]
            xs = [x + i * width for x in range(len(layers))]
            ax.bar(xs, values, width, label=rec["schedule"])
            ax.bar(xs, merge, width, color="black", alpha=0.35, label="merge ops" if i == 0 else None)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(layers))], layers, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("ms per run (ONNX Runtime profiler)")
        ax.set_title(f"Per-layer time · {device} · {model} · bs {batch}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"layers_{_slug(device)}_{_slug(model)}_bs{batch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
