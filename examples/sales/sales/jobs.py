"""Entry points of the sales example, one per step of `pipelines/sales.yml`.

Each is called as `function(client, **params)` on its stage's Dask cluster and returns a small
JSON result, which later steps receive through `{{ steps.<step>.<field> }}`. The data itself
never travels through results: it is written as JSON-lines files, one per partition, in a
folder per run. That works here because the example runs on the `local` backend, whose workers
share this machine's disk. Code for a cloud backend would write to `s3://` paths instead
(dask's `read_text` and `to_textfiles` take them), not to a local folder.

The rows are synthetic and seeded, so the same params give the same rows, bad rows included.
Amounts are integer cents: totals added up in any order, on any number of workers, agree to the
cent, which is what `publish` checks.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from datetime import date, timedelta
from pathlib import Path

import dask
import dask.bag as db

PRODUCTS = {"widget": 1250, "gadget": 4999, "gizmo": 899, "doohickey": 15000}  # price, cents
BAD_ROW_RATE = 0.02


def run_folder(folder: str, run: str) -> Path:
    """The run's own folder: `folder` (default: `<temp dir>/dagfactory-sales`) / run id.

    Airflow's run ids hold ':' and '+' (`manual__2026-11-24T01:46:57+00:00`): only letters,
    digits, '_', '.' and '-' are kept, so the id is one safe folder name.
    """
    root = Path(folder) if folder else Path(tempfile.gettempdir()) / "dagfactory-sales"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", run).strip("._") or "run"
    return root / name


def _orders(day: str, regions: list[str], rows_per_day: int, seed: int) -> list[str]:
    """One day's orders in every region, as JSON lines; about 2 % of them are broken the way
    real feeds break (a truncated line, no region, a negative amount)."""
    lines = []
    for region in regions:
        rng = random.Random(f"{seed}/{day}/{region}")
        for number in range(rows_per_day):
            product = rng.choice(sorted(PRODUCTS))
            units = rng.randint(1, 5)
            row = {
                "order": f"{day}-{region}-{number}",
                "day": day,
                "region": region,
                "product": product,
                "units": units,
                "amount_cents": units * PRODUCTS[product],
            }
            if rng.random() < BAD_ROW_RATE:
                damage = rng.choice(("truncated", "no_region", "negative"))
                if damage == "no_region":
                    row["region"] = ""
                elif damage == "negative":
                    row["amount_cents"] = -row["amount_cents"]
                else:
                    lines.append(json.dumps(row)[:30])
                    continue
            lines.append(json.dumps(row))
    return lines


def _day_orders(days: list[str], regions: list[str], rows_per_day: int, seed: int) -> list[str]:
    return [line for day in days for line in _orders(day, regions, rows_per_day, seed)]


def extract(
    client,
    days: int = 30,
    regions: list[str] | None = None,
    rows_per_day: int = 500,
    seed: int = 7,
    end: str = "",
    folder: str = "",
    run: str = "manual",
) -> dict:
    """Generate `days` days of orders up to `end` (a YYYY-MM-DD date; default today), one file
    per day, on the cluster's workers. A retry starts the run's folder over."""
    regions = list(regions or ["north", "south", "east", "west"])
    last = date.fromisoformat(end[:10]) if end else date.today()
    dates = [(last - timedelta(days=back)).isoformat() for back in reversed(range(int(days)))]
    out = run_folder(folder, run)
    shutil.rmtree(out, ignore_errors=True)
    raw = out / "raw"
    raw.mkdir(parents=True)
    lines = db.from_sequence(dates, npartitions=len(dates)).map_partitions(
        _day_orders, regions=regions, rows_per_day=int(rows_per_day), seed=int(seed)
    )
    writes = lines.to_textfiles(
        str(raw / "*.jsonl"), name_function=dates.__getitem__, compute=False
    )
    _, rows = dask.compute(writes, lines.count())
    print(f"{rows} rows for {len(dates)} days x {len(regions)} regions in {raw}")
    return {
        "folder": str(out),
        "path": str(raw),
        "rows": rows,
        "first": dates[0],
        "last": dates[-1],
    }


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _valid(row: dict | None) -> bool:
    return bool(row) and bool(row.get("region")) and row.get("amount_cents", 0) > 0


def clean(client, path: str) -> dict:
    """Drop the rows that cannot be counted; write the others beside the raw files."""
    raw = db.read_text(str(Path(path) / "*.jsonl"))
    good = raw.map(_parse).filter(_valid)
    out = Path(path).parent / "clean"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    writes = good.map(json.dumps).to_textfiles(str(out / "*.jsonl"), compute=False)
    _, read, kept = dask.compute(writes, raw.count(), good.count())
    print(f"kept {kept} of {read} rows ({read - kept} dropped) in {out}")
    return {"path": str(out), "rows": kept, "dropped": read - kept}


def _add(total: tuple[int, int], row: dict) -> tuple[int, int]:
    return total[0] + 1, total[1] + row["amount_cents"]


def _combine(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


def _totals(client, path: str, key: str) -> dict[str, tuple[int, int]]:
    """(rows, cents) per value of `key`, folded on the workers: only the totals come back."""
    rows = db.read_text(str(Path(path) / "*.jsonl")).map(json.loads)
    folded = rows.foldby(key, _add, (0, 0), _combine, (0, 0)).compute()
    print(f"{len(folded)} totals by {key} on {len(client.nthreads())} worker(s)")
    return dict(sorted(folded))


def by_region(client, path: str) -> dict:
    """Orders and revenue per region."""
    totals = _totals(client, path, "region")
    return {
        "regions": {r: {"rows": n, "amount_cents": c} for r, (n, c) in totals.items()},
        "rows": sum(n for n, _ in totals.values()),
        "amount_cents": sum(c for _, c in totals.values()),
    }


def by_day(client, path: str) -> dict:
    """Orders and revenue per day, and the best and worst day."""
    totals = _totals(client, path, "day")
    ranked = sorted(totals.items(), key=lambda item: (item[1][1], item[0]))
    return {
        "days": len(totals),
        "rows": sum(n for n, _ in totals.values()),
        "amount_cents": sum(c for _, c in totals.values()),
        "best_day": {"day": ranked[-1][0], "amount_cents": ranked[-1][1][1]},
        "worst_day": {"day": ranked[0][0], "amount_cents": ranked[0][1][1]},
    }


def publish(client, regions: dict, daily: dict, rows: int, folder: str) -> dict:
    """Check that the totals agree, write the report, replace `latest.json` beside the run
    folders with it, and remove the run's row files (the report is what a run keeps)."""
    by_region_rows = sum(r["rows"] for r in regions.values())
    by_region_cents = sum(r["amount_cents"] for r in regions.values())
    if not by_region_rows == daily["rows"] == rows or by_region_cents != daily["amount_cents"]:
        raise ValueError(
            f"totals disagree: {by_region_rows} rows and {by_region_cents} cents by region, "
            f"{daily['rows']} rows and {daily['amount_cents']} cents by day, {rows} clean rows"
        )
    out = Path(folder)
    top = max(regions, key=lambda r: regions[r]["amount_cents"])
    report = {
        "run": out.name,
        "rows": rows,
        "revenue": f"{by_region_cents / 100:.2f}",
        "regions": {r: f"{v['amount_cents'] / 100:.2f}" for r, v in regions.items()},
        "top_region": top,
        "best_day": daily["best_day"],
        "worst_day": daily["worst_day"],
    }
    text = json.dumps(report, indent=2) + "\n"
    (out / "report.json").write_text(text)
    latest = out.parent / "latest.json"
    # Readers of latest.json see the old report or the new one, never half of one.
    fd, partial = tempfile.mkstemp(dir=out.parent, prefix=".latest-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(partial, latest)
    for part in ("raw", "clean"):
        shutil.rmtree(out / part, ignore_errors=True)
    print(f"report: {out / 'report.json'} (and {latest})")
    return {
        "report": str(out / "report.json"),
        "rows": rows,
        "revenue": report["revenue"],
        "top_region": top,
    }
