"""The comparison table of a run folder: one row per cell, one column per metric."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from qcompare.recipe import PluginChoice
from qcompare.store import RunStore


def _fmt(value, stderr=None) -> str:
    if value is None:
        return "—"
    text = f"{value:.3f}" if abs(value) < 1000 else f"{value:.4g}"
    return f"{text} ± {stderr:.3f}" if stderr else text


def print_report(store: RunStore, console: Console) -> None:
    rows = list(store.records())
    if not rows:
        console.print(f"no cells stored in {store.root}")
        return
    metrics = sorted({k for r in rows for k in r.get("metrics", {})})
    table = Table(title=f"{store.root}", title_justify="left")
    table.add_column("cell", no_wrap=True)
    for col in ("quantizer", "distiller", "seed", "status"):
        table.add_column(col)
    for col in (*metrics, "bits/w", "MB", "time s"):
        table.add_column(col, justify="right")
    for r in rows:
        s = r["settings"]
        q = s["quantizer"]
        d = s["distiller"]
        size = r.get("size", {})
        cost = r.get("cost", {})
        status = {"done": "[green]done[/]", "failed": "[red]failed[/]"}.get(r["status"], f"[yellow]{r['status']}[/]")
        table.add_row(
            r["id"],
            "teacher" if q is None else PluginChoice(**q).label(),
            "—" if d is None else PluginChoice(**d).label(),
            "—" if s["seed"] is None else str(s["seed"]),
            status,
            *(_fmt(r.get("metrics", {}).get(m), r.get("stderr", {}).get(m)) for m in metrics),
            _fmt(size.get("bits_per_weight")) if size else "—",
            f"{size['storage_bytes'] / 1e6:.2f}" if size.get("storage_bytes") else "—",
            f"{cost['total_seconds']:.1f}" if "total_seconds" in cost else "—",
        )
    console.print(table)

