"""Nightly incremental runs: the second run over a grown archive computes only the new scans.

Builds an archive of N files (hard links of the real Training scans), runs it with `run`'s local
workers, adds M new scans (mirrored copies: new bytes), runs the grown archive again on the same
database, and prints one JSON line: scans and computed results of each night, and their wall times.

Usage: python bench/nightly.py [--scans 20000] [--new 200]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.pipeline import link_folder  # noqa: E402


def add_new_scans(folder: Path, n: int) -> None:
    """n scans whose bytes the archive has never held: mirrored copies of existing ones, as PNG."""
    from PIL import Image, ImageOps

    sources = sorted(folder.rglob("*.jpg"))[:n]
    for i, src in enumerate(sources):
        with Image.open(src) as im:
            ImageOps.mirror(im).save(src.parent / f"new-{i:04d}-{src.stem}.png")


def night(settings, folder: Path) -> dict:
    from sqlalchemy import func, select

    from db.models import Scan
    from db.session import session_scope
    from jobs.lifecycle import new_job, run_job

    t0 = time.perf_counter()
    job = new_job(settings, folder)
    p = run_job(settings, job)
    wall = time.perf_counter() - t0
    with session_scope(settings.database_url) as s:
        computed = s.scalar(select(func.count()).where(Scan.job_id == job, Scan.status == "done",
                                                       Scan.from_cache.is_(False)))
    return {"job": job, "scans": p.total, "done": p.done, "failed": p.failed, "computed": computed,
            "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scans", type=int, default=20000)
    parser.add_argument("--new", type=int, default=200)
    parser.add_argument("--model", default=str(ROOT / "models" / "brainscan-v1.keras"))
    args = parser.parse_args()

    from config import load_settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.update(BRAINSCAN_VAR=str(tmp / "var"), BRAINSCAN_MODEL=args.model)
        os.environ.pop("DATABASE_URL", None), os.environ.pop("BROKER_URL", None)
        settings = load_settings()
        folder = link_folder(tmp / "archive", args.scans, repeat=True)
        first = night(settings, folder)
        add_new_scans(folder, args.new)
        second = night(settings, folder)
    print(json.dumps({"first_night": first, "second_night": second,
                      "second_vs_first_wall": round(second["wall_s"] / first["wall_s"], 3)}))


if __name__ == "__main__":
    main()
