"""`report JOB --compare OTHER`: JOB's metric deltas from the baseline OTHER, and the scans whose prediction changed.

compare_jobs(session, a, b) reports b - a; the CLI passes a = OTHER, b = JOB.

Scans are matched by content (Scan.sha256), so a scan that moved or was renamed still matches and two
copies of one file count once. A prediction can only change between jobs run with different models:
results are cached per (content, model).
"""
from __future__ import annotations

import csv
import io
import json

from sqlalchemy import distinct, func, select
from sqlalchemy.orm import Session, aliased

from db.models import Job, Model, Result, Scan
from jobs.progress import JobNotFound
from jobs.report import job_report

MAX_LISTED = 50  # changed scans printed by the text and Markdown renderers; JSON and CSV list all


def _delta(a, b):
    return None if a is None or b is None else b - a


def _triple(a, b) -> dict:
    return {"a": a, "b": b, "delta": _delta(a, b)}


def _done_hashes(job_id: int):
    return select(distinct(Scan.sha256).label("sha")).where(Scan.job_id == job_id, Scan.status == "done")


def changed_predictions(session: Session, job_a: int, job_b: int) -> list[dict]:
    """Contents done in both jobs whose predicted label differs, ordered by path in job A."""
    sa, sb, ra, rb = aliased(Scan), aliased(Scan), aliased(Result), aliased(Result)
    classes = {}
    for job_id in (job_a, job_b):
        classes[job_id] = list(session.execute(
            select(Model.card).join(Job, Job.model_sha256 == Model.sha256).where(Job.id == job_id)).scalar_one()
            ["classes"])
    rows = session.execute(
        select(sa.sha256, sa.path, sb.path.label("path_b"), sa.true_label, sb.true_label.label("true_b"),
               ra.predicted_label, rb.predicted_label.label("predicted_b"), ra.probabilities,
               rb.probabilities.label("probabilities_b"))
        .join(ra, sa.result_id == ra.id)
        .join(sb, (sb.sha256 == sa.sha256) & (sb.job_id == job_b) & (sb.status == "done"))
        .join(rb, sb.result_id == rb.id)
        .where(sa.job_id == job_a, sa.status == "done", ra.predicted_label != rb.predicted_label)
        .order_by(sa.path, sb.path)
    ).all()
    changed, seen = [], set()
    for r in rows:
        if r.sha256 in seen:  # the same content at several paths: listed once, at its first path
            continue
        seen.add(r.sha256)
        truth = r.true_label or r.true_b
        changed.append({
            "sha256": r.sha256, "path_a": r.path, "path_b": r.path_b, "true_label": truth,
            "predicted_a": r.predicted_label, "predicted_b": r.predicted_b,
            "probability_a": r.probabilities[classes[job_a].index(r.predicted_label)],
            "probability_b": r.probabilities_b[classes[job_b].index(r.predicted_b)],
            "verdict": None if truth is None else
            "fixed" if r.predicted_b == truth else "broken" if r.predicted_label == truth else "still wrong",
        })
    return changed


def compare_jobs(session: Session, job_a: int, job_b: int) -> dict:
    """Accuracy, macro-F1 and per-class F1 of both jobs with deltas (b - a), match counts, changed scans."""
    for job_id in (job_a, job_b):
        if session.get(Job, job_id) is None:
            raise JobNotFound(f"job {job_id} not found")
    a, b = job_report(session, job_a), job_report(session, job_b)
    hashes_a, hashes_b = _done_hashes(job_a).subquery(), _done_hashes(job_b).subquery()
    count = lambda q: int(session.scalar(select(func.count()).select_from(q)) or 0)  # noqa: E731
    n_a, n_b = count(hashes_a), count(hashes_b)
    matched = count(select(hashes_a.c.sha).join(hashes_b, hashes_a.c.sha == hashes_b.c.sha).subquery())
    classes = list(a["per_class"]) + [c for c in b["per_class"] if c not in a["per_class"]]
    return {
        "a": {k: a[k] for k in ("job", "model", "model_sha256", "folder", "scans", "labelled")},
        "b": {k: b[k] for k in ("job", "model", "model_sha256", "folder", "scans", "labelled")},
        "accuracy": _triple(a["accuracy"], b["accuracy"]),
        "macro_f1": _triple(a["macro_avg"]["f1"], b["macro_avg"]["f1"]),
        "per_class_f1": {c: _triple(a["per_class"].get(c, {}).get("f1"), b["per_class"].get(c, {}).get("f1"))
                         for c in classes},
        "matched": matched,
        "only_in_a": n_a - matched,
        "only_in_b": n_b - matched,
        "changed": changed_predictions(session, job_a, job_b),
    }


def _f(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def _metric_rows(cmp: dict) -> list[tuple[str, dict]]:
    return [("accuracy", cmp["accuracy"]), ("macro F1", cmp["macro_f1"]),
            *((f"F1 {c}", t) for c, t in cmp["per_class_f1"].items())]


def format_comparison(cmp: dict) -> str:
    """Aligned text: metrics of both jobs with deltas, then the changed scans (at most MAX_LISTED)."""
    a, b = cmp["a"], cmp["b"]
    ja, jb = f"job {a['job']}", f"job {b['job']}"
    lines = [f"{ja} (model {a['model']} {a['model_sha256'][:12]}) -> {jb} (model {b['model']} "
             f"{b['model_sha256'][:12]})", "",
             f"{'':<20}{ja:>10}{jb:>10}{'delta':>10}"]
    lines += [f"{name:<20}{_f(t['a']):>10}{_f(t['b']):>10}{_f(t['delta'], True):>10}" for name, t in _metric_rows(cmp)]
    changed = cmp["changed"]
    lines += ["", f"{cmp['matched']} scans matched by content; {cmp['only_in_a']} only in {ja}, "
                  f"{cmp['only_in_b']} only in {jb}",
              f"{len(changed)} prediction{'s' if len(changed) != 1 else ''} changed" + (":" if changed else "")]
    for c in changed[:MAX_LISTED]:
        verdict = f" ({c['verdict']})" if c["verdict"] else ""
        lines.append(f"  {c['path_a']}  true {c['true_label'] or '-'}: {c['predicted_a']} {c['probability_a']:.3f} "
                     f"-> {c['predicted_b']} {c['probability_b']:.3f}{verdict}")
    if len(changed) > MAX_LISTED:
        lines.append(f"  … and {len(changed) - MAX_LISTED} more (--format json or csv lists all)")
    return "\n".join(lines)


def comparison_markdown(cmp: dict) -> str:
    a, b = cmp["a"], cmp["b"]
    lines = [f"# brainscan: job {a['job']} vs job {b['job']}", "",
             f"- job {a['job']}: model {a['model']} (`{a['model_sha256'][:12]}`)",
             f"- job {b['job']}: model {b['model']} (`{b['model_sha256'][:12]}`)",
             f"- {cmp['matched']} scans matched by content; {cmp['only_in_a']} only in job {a['job']}, "
             f"{cmp['only_in_b']} only in job {b['job']}", "",
             f"| metric | job {a['job']} | job {b['job']} | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {_f(t['a'])} | {_f(t['b'])} | {_f(t['delta'], True)} |" for name, t in _metric_rows(cmp)]
    changed = cmp["changed"]
    lines += ["", f"## {len(changed)} changed prediction{'s' if len(changed) != 1 else ''}", ""]
    if changed:
        lines += [f"| path | true | job {a['job']} | job {b['job']} | verdict |", "|---|---|---|---|---|"]
        lines += [f"| `{c['path_a']}` | {c['true_label'] or '-'} | {c['predicted_a']} ({c['probability_a']:.3f}) | "
                  f"{c['predicted_b']} ({c['probability_b']:.3f}) | {c['verdict'] or ''} |"
                  for c in changed[:MAX_LISTED]]
        if len(changed) > MAX_LISTED:
            lines.append(f"\n… and {len(changed) - MAX_LISTED} more (--format json or csv lists all)")
    return "\n".join(lines)


CHANGED_COLUMNS = ("sha256", "path_a", "path_b", "true_label", "predicted_a", "predicted_b", "probability_a",
                   "probability_b", "verdict")


def comparison_csv(cmp: dict) -> str:
    """One row per changed scan."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CHANGED_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for c in cmp["changed"]:
        writer.writerow({k: "" if c[k] is None else c[k] for k in CHANGED_COLUMNS})
    return buf.getvalue().rstrip("\n")


RENDERERS = {"table": format_comparison, "json": lambda c: json.dumps(c, indent=1), "csv": comparison_csv,
             "markdown": comparison_markdown}


def render_comparison(cmp: dict, fmt: str) -> str:
    return RENDERERS[fmt](cmp)
