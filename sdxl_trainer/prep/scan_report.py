"""What a scan skipped or flagged, by file: the first few in the summary table, all in scan_report.json.

Nobody should have to open manifest.parquet to find the bad file. ``listing(rows)`` adds to the scan
summary (which prep/scan.py writes atomically as WORK/scan_report.json):

- ``problems``: every skipped, duplicate or flagged file as ``{path, status, reason}``, in path order;
  status is skipped | duplicate | flagged (one entry per flag)
  (a flagged file — e.g. ``caption_missing`` — is kept for training; its reason is ``flag: <name>``);
- ``problems_by_reason``: their count per reason code (the part before ``:``).

``print_problems`` prints the first :data:`SHOWN` of them with their reasons.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from sdxl_trainer import console

SHOWN = 10


def _entries(row: dict, paths_by_id: dict[str, str]) -> list[dict[str, str]]:
    path, status = str(row["path"]), row["status"]
    found = []
    if status == "skipped":
        found.append({"path": path, "status": status, "reason": row["reason"] or "skipped"})
    elif status == "duplicate":
        kept = paths_by_id.get(row.get("duplicate_of") or "", row.get("duplicate_of"))
        found.append({"path": path, "status": status, "reason": f"duplicate: the same image as {kept}"})
    found += [{"path": path, "status": "flagged", "reason": f"flag: {f}"} for f in row.get("flags") or []]
    return found


def listing(rows: list[dict]) -> dict[str, Any]:
    """The summary keys naming every skipped, duplicate or flagged file, and the count per reason."""
    paths_by_id = {r["id"]: str(r["path"]) for r in rows if r.get("id") and r["status"] == "ok"}
    problems = [e for r in sorted(rows, key=lambda r: str(r["path"])) for e in _entries(r, paths_by_id)]
    by_reason = Counter(e["reason"].split(":")[0] if not e["reason"].startswith("flag: ") else e["reason"]
                        for e in problems)  # fmt: skip
    return {"problems_by_reason": dict(sorted(by_reason.items())), "problems": problems}


def print_problems(summary: dict[str, Any], out: Path) -> None:
    """The first :data:`SHOWN` skipped or flagged files with their reasons; where the rest are."""
    problems = summary.get("problems") or []
    if not problems:
        return
    more = f"first {SHOWN} of {len(problems)}; " if len(problems) > SHOWN else ""
    title = f"skipped or flagged files ({more}all in {out / 'scan_report.json'})"
    console.table(title, [(e["path"], e["reason"]) for e in problems[:SHOWN]], columns=("file", "reason"))
