"""Benchmark: `report --html` and `report --format json` of a 20,000-scan job, in seconds and peak RSS.

Builds everything under a temporary folder with SQLite: trains a tiny model on examples/scans (the
project's own `train`), runs those 16 scans through the real pipeline, then makes a big job by copying
that job's rows: every bench scan is a real file (an example JPEG with a unique tail, so its SHA-256 is
its own) with a result copied from its example (stored Grad-CAM and geometry) and varied, seeded
probabilities, labels, some unlabelled and some failed scans. Each report runs as its own
`python cli.py` process; its wall time and peak RSS (os.wait4's rusage) are measured.

Prints one JSON line; exits 1 when a report takes longer than --limit seconds.

    python bench/report.py                 # 20,000 scans
    python bench/report.py --scans 2000 --keep /tmp/bench-report
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLES = ROOT / "examples" / "scans"
FAILURES = ("corrupt JPEG: image file is truncated", "file not found: deleted or moved after submit",
            "not an image: content is not JPEG, PNG, BMP or TIFF")


def cli(env: dict, *args: str, stdout=subprocess.DEVNULL) -> tuple[float, float]:
    """Run `python cli.py ARGS`; (wall seconds, peak RSS in MiB) of that process alone."""
    start = time.perf_counter()
    # Run from the work folder: training's var/cache lands there, not in the checkout.
    proc = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=env["BRAINSCAN_VAR"], env=env,
                            stdout=stdout, stderr=subprocess.PIPE)
    # Read stderr while waiting so a chatty child cannot block on a full pipe.
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.stderr.write(err.decode(errors="replace")[-4000:])
        raise SystemExit(f"cli.py {' '.join(args)} exited {proc.returncode}")
    return seconds, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def make_real_job(env: dict, work: Path) -> int:
    """Tiny model and one job of the 16 examples through the real pipeline; returns the job id."""
    cli(env, "train", str(EXAMPLES), "--out", str(work / "model" / "tiny"), "--epochs", "1", "--size", "64",
        "--batch-size", "8")
    out = work / "real-job.json"
    with open(out, "w") as fh:
        cli(env, "run", str(EXAMPLES), "--format", "json", stdout=fh)
    return json.loads(out.read_text())["job"]


def make_big_job(url: str, source_job: int, archive: Path, n: int, seed: int = 7) -> int:
    """Insert a job of n scans copied from source_job's rows; returns its id."""
    import numpy as np
    from sqlalchemy import func, insert, select

    from db.models import Job, Model, Result, Scan
    from db.session import session_scope
    from jobs.report import store_report

    rng = np.random.default_rng(seed)
    with session_scope(url) as s:
        job = s.get(Job, source_job)
        classes = list(s.get(Model, job.model_sha256).card["classes"])
        sources = s.execute(select(Scan, Result).join(Result, Scan.result_id == Result.id)
                            .where(Scan.job_id == source_job).order_by(Scan.path)).all()
        folder = Path(job.folder)
        blobs = [(folder / scan.path).read_bytes() for scan, _ in sources]
        now = datetime.now(timezone.utc)
        big = Job(folder=str(archive), model_sha256=job.model_sha256, batch_size=32, status="complete", total=n,
                  created_at=now - timedelta(seconds=n / 25), finished_at=now)
        s.add(big)
        s.flush()
        next_result = (s.scalar(select(func.max(Result.id))) or 0) + 1
        results, scans = [], []
        for i in range(n):
            scan, result = sources[i % len(sources)]
            status = "failed" if rng.random() < 0.01 else "done"
            true = None if rng.random() < 0.02 else scan.true_label
            rel = f"{scan.true_label or 'unsorted'}/{i:05d}-{Path(scan.path).name}"
            data = blobs[i % len(sources)] + f"bench {i}".encode()  # bytes after the JPEG's end are ignored
            (archive / rel).parent.mkdir(parents=True, exist_ok=True)
            (archive / rel).write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            row = {"job_id": big.id, "path": rel, "sha256": sha, "size": len(data), "true_label": true,
                   "status": status, "attempts": 1, "from_cache": False, "finished_at": now,
                   "error": FAILURES[i % len(FAILURES)] if status == "failed" else None, "result_id": None}
            if status == "done":
                target = classes.index(scan.true_label) if rng.random() < 0.85 else int(rng.integers(len(classes)))
                logits = rng.normal(0.0, 1.0, len(classes))
                logits[target] += rng.uniform(0.3, 5.0)
                probs = np.exp(logits - logits.max())
                probs /= probs.sum()
                results.append({"id": next_result, "sha256": sha, "model_sha256": job.model_sha256,
                                "predicted_label": classes[int(np.argmax(probs))],
                                "probabilities": [round(float(p), 6) for p in probs], "heatmap": result.heatmap,
                                "heatmap_height": result.heatmap_height, "heatmap_width": result.heatmap_width,
                                "geometry": result.geometry, "created_at": now})
                row["result_id"] = next_result
                next_result += 1
            scans.append(row)
        for start in range(0, n, 5000):
            if results[start : start + 5000]:
                s.execute(insert(Result), results[start : start + 5000])
        for start in range(0, n, 5000):
            s.execute(insert(Scan), scans[start : start + 5000])
        big_id = big.id
    with session_scope(url) as s:
        store_report(s, big_id)
    return big_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=20_000)
    parser.add_argument("--limit", type=float, default=10.0, help="Seconds a report may take (default 10).")
    parser.add_argument("--keep", type=Path, help="Work in this folder and keep it (default: a temporary one).")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench-report-"))
    (work / "var").mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "BRAINSCAN_VAR": str(work / "var"), "BRAINSCAN_MODEL": str(work / "model" / "tiny.keras"),
           "PYTHONPATH": str(ROOT)}
    for key in ("DATABASE_URL", "BROKER_URL"):
        env.pop(key, None)
    os.environ.update({k: env[k] for k in ("BRAINSCAN_VAR", "BRAINSCAN_MODEL")})
    try:
        from config import load_settings

        url = load_settings().database_url
        t0 = time.perf_counter()
        real = make_real_job(env, work)
        archive = work / "archive"
        big = make_big_job(url, real, archive, args.scans)
        setup = time.perf_counter() - t0
        html_s, html_rss = cli(env, "report", str(big), "--html", str(work / "report.html"))
        with open(work / "report.json", "w") as fh:
            json_s, json_rss = cli(env, "report", str(big), "--format", "json", stdout=fh)
        report = json.loads((work / "report.json").read_text())
        line = {
            "scans": args.scans, "labelled": report["labelled"], "failed": report["failed"],
            "html_seconds": round(html_s, 2), "html_peak_rss_mib": round(html_rss, 1),
            "html_bytes": (work / "report.html").stat().st_size,
            "json_seconds": round(json_s, 2), "json_peak_rss_mib": round(json_rss, 1),
            "limit_seconds": args.limit, "setup_seconds": round(setup, 1),
            "ok": html_s <= args.limit and json_s <= args.limit,
        }
        print(json.dumps(line))
        raise SystemExit(0 if line["ok"] else 1)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
