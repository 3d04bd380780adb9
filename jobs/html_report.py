"""`report --html`: one self-contained HTML file of a job, every image a base64 PNG data URI.

The numbers are job_report's (the same as `report --format json`); the figures come from jobs/plots.py;
the Grad-CAM gallery is drawn from the stored maps on each scan's own pixel grid (jobs/heatmaps.py).
The page loads nothing: its Content-Security-Policy allows only inline styles and data: images, and it
has no script. Memory stays bounded on big jobs: only ids, labels and probabilities of all scans are read,
heatmaps and files only for the few scans of the gallery.
"""
from __future__ import annotations

import base64
import hashlib
import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from string import Template

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Job, Model, Result, Scan
from jobs import plots, sources
from jobs.heatmaps import scan_heatmap
from jobs.report import job_report, seen_hashes, served_in_text
from vision.decode import decode
from vision.errors import ScanError

MAX_CORRECT = 3  # correct scans shown per class
MAX_MISCLASSIFIED = 24  # misclassified scans shown, most confident first
MAX_UNLABELLED = 3  # scans per predicted class when the job has no labels
MAX_FAILED = 50  # failed scans listed by path
NEEDS_LABELS = ("No labelled scans: metrics need labels. Put the scans in class folders "
                "(glioma/, meningioma/, notumor/, pituitary/) or pass --labels FILE.csv.")
NOTHING_DONE = "No scan has a result yet (every scan failed or is pending), so there are no metrics or heatmaps."


@dataclass
class Done:
    """Every done scan of a job: ids, labels and probabilities as arrays, in scan id order."""

    ids: np.ndarray
    sha256: list[str]
    true: list[str | None]
    predicted: np.ndarray  # class index
    probs: np.ndarray  # (n, classes)

    @property
    def confidence(self) -> np.ndarray:
        return self.probs[np.arange(len(self.ids)), self.predicted] if len(self.ids) else np.zeros(0)

    @property
    def labelled(self) -> np.ndarray:
        return np.array([t is not None for t in self.true], dtype=bool)


@dataclass
class Pick:
    """One scan of the gallery."""

    scan_id: int
    true: str | None
    predicted: str
    probability: float
    seen: bool


def done_scans(session: Session, job_id: int, classes: list[str]) -> Done:
    rows = session.execute(
        select(Scan.id, Scan.sha256, Scan.true_label, Result.predicted_label, Result.probabilities)
        .join(Result, Scan.result_id == Result.id)
        .where(Scan.job_id == job_id, Scan.status == "done")
        .order_by(Scan.id)
    ).all()
    index = {c: i for i, c in enumerate(classes)}
    return Done(
        ids=np.array([r.id for r in rows], dtype=np.int64),
        sha256=[r.sha256 for r in rows],
        true=[r.true_label for r in rows],
        predicted=np.array([index[r.predicted_label] for r in rows], dtype=np.int64),
        probs=np.array([r.probabilities for r in rows], dtype=np.float64).reshape(len(rows), len(classes)),
    )


def pick_gallery(done: Done, classes: list[str], seen: set[str]) -> tuple[dict[str, list[Pick]], int]:
    """Gallery groups: per class its most confident correct scans, then the most confident misclassified.

    Without labelled scans: per predicted class its most confident scans. Returns ({group title: picks},
    number of misclassified scans left out).
    """
    conf = done.confidence
    order = np.lexsort((done.ids, -conf))  # most confident first, ties by scan id
    groups: dict[str, list[Pick]] = {}
    more = 0

    def pick(i: int) -> Pick:
        return Pick(int(done.ids[i]), done.true[i], classes[done.predicted[i]], float(conf[i]),
                    done.sha256[i] in seen)

    if done.labelled.any():
        correct = {c: [] for c in classes}
        wrong = []
        for i in order:
            t = done.true[i]
            if t is None:
                continue
            if t == classes[done.predicted[i]]:
                if len(correct[t]) < MAX_CORRECT:
                    correct[t].append(pick(i))
            else:
                wrong.append(i)
        for c in classes:
            groups[f"{c}: correct"] = correct[c]
        groups["misclassified"] = [pick(i) for i in wrong[:MAX_MISCLASSIFIED]]
        more = max(0, len(wrong) - MAX_MISCLASSIFIED)
    else:
        by_class = {c: [] for c in classes}
        for i in order:
            c = classes[done.predicted[i]]
            if len(by_class[c]) < MAX_UNLABELLED:
                by_class[c].append(pick(i))
        for c in classes:
            groups[f"predicted {c}"] = by_class[c]
    return groups, more


def _read_original(folder: str, path: str, sha256: str) -> tuple[np.ndarray | None, str | None]:
    """The scan (a file, an archive member or a DICOM frame) as decoded grayscale, or None and why not."""
    try:
        data, frame = sources.load(folder, path)
    except ScanError:
        return None, "original not readable any more"
    if sources.scan_sha256(hashlib.sha256(data).hexdigest(), frame) != sha256:
        return None, "original changed since the job"
    try:
        return decode(data, frame=frame), None
    except ScanError as exc:
        return None, f"original not decodable: {exc}"


def render_picks(session: Session, job: Job, picks: list[Pick]) -> dict[int, dict]:
    """Thumbnails and path of each picked scan, read one at a time."""
    out: dict[int, dict] = {}
    for pick in picks:
        scan, result = session.execute(
            select(Scan, Result).join(Result, Scan.result_id == Result.id).where(Scan.id == pick.scan_id)).one()
        cam = scan_heatmap(result.heatmap, result.heatmap_height, result.heatmap_width, result.geometry)
        gray, note = _read_original(job.folder, scan.path, scan.sha256)
        if gray is not None and gray.shape != cam.shape:
            gray, note = None, "original's size differs from the stored geometry"
        out[pick.scan_id] = {"path": scan.path, "note": note, **plots.scan_panels(gray, cam)}
        session.expunge(scan)
        session.expunge(result)
    return out


# --- HTML ---------------------------------------------------------------------------------------

e = html.escape

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; margin: 0;
       background: #f6f6f8; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 30px 0 10px; border-bottom: 1px solid #ddd;
padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 8px; }
.sub { color: #555; margin: 0 0 14px; word-break: break-all; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { background: #fff; border: 1px solid #e2e2e6; border-radius: 8px; padding: 10px 14px; min-width: 120px; }
.card .k { color: #666; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 20px; font-weight: 600; }
.card .s { color: #666; font-size: 12px; }
table { border-collapse: collapse; background: #fff; margin: 6px 0 12px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #eee; text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f3; font-weight: 600; } td.l, th.l { text-align: left; }
tr.avg td { background: #fafafa; font-style: italic; }
.chip { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; vertical-align: 0; }
.figs { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.figs figure { margin: 0; background: #fff; border: 1px solid #e2e2e6; border-radius: 8px; padding: 8px; }
.figs figcaption { color: #555; font-size: 12px; max-width: 370px; }
.row { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: 8px 12px; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.scan { margin: 0; background: #fff; border: 1px solid #e2e2e6; border-radius: 8px; padding: 8px; width: 502px; }
.scan .panels { display: flex; gap: 4px; align-items: flex-start; }
.scan .panels img, .scan .panels .missing { width: 160px; }
.scan .missing { height: 160px; display: flex; align-items: center; justify-content: center; background: #eee;
                 color: #777; font-size: 12px; text-align: center; }
.scan figcaption { font-size: 12px; margin-top: 6px; word-break: break-all; }
.wrong { color: #b00020; font-weight: 600; }
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; background: #333; color: #fff; font-size: 11px; }
.panelnames { display: flex; gap: 4px; color: #888; font-size: 11px; }
.panelnames span { width: 160px; text-align: center; }
footer { color: #777; font-size: 12px; margin-top: 36px; }
</style>
</head>
<body>
<main>
$body
</main>
</body>
</html>
""")


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _data(value) -> str:
    """The exact number for machines (data-value), '' when undefined."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, float) else str(value)


def _cell(value, cls: str, metric: str, digits: int = 3) -> str:
    return (f'<td data-class="{e(cls)}" data-metric="{metric}" data-value="{_data(value)}">'
            f"{_num(value, digits) if not isinstance(value, int) else value}</td>")


def _img(png: bytes, alt: str, **attrs) -> str:
    extra = "".join(f' {k}="{e(str(v))}"' for k, v in attrs.items())
    return f'<img src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}" alt="{e(alt)}"{extra}>'


def _chip(cls: str) -> str:
    return f'<span class="chip" style="background:{plots.colour(cls)}"></span>{e(cls)}'


def _card(key: str, value: str, sub: str = "", field: str = "", data=None) -> str:
    attr = f' data-field="{field}" data-value="{_data(data)}"' if field else ""
    return (f'<div class="card"><div class="k">{e(key)}</div><div class="v"{attr}>{value}</div>'
            + (f'<div class="s">{sub}</div>' if sub else "") + "</div>")


def _aware(ts: datetime | None) -> datetime | None:
    return ts if ts is None or ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _summary(report: dict, job: Job, model: Model) -> str:
    card = model.card
    validation = card.get("validation") or {}
    val_f1 = (validation.get("macro_avg") or {}).get("f1")
    started, finished = _aware(job.created_at), _aware(job.finished_at)
    seconds = (finished - started).total_seconds() if finished else None
    processed = report["scans"] - report["pending"]
    rate = processed / seconds if seconds else None
    val_n = len(card.get("validation_sha256", []))
    served = served_in_text(report)
    cards = [
        _card("scans", str(report["scans"]), field="scans", data=report["scans"]),
        _card("labelled", str(report["labelled"]), f"{report['unlabelled']} unlabelled (not in metrics)",
              field="labelled", data=report["labelled"]),
        _card("failed", str(report["failed"]), f"{report['pending']} pending", field="failed", data=report["failed"]),
        _card("accuracy", _num(report["accuracy"], 4), field="accuracy", data=report["accuracy"]),
        _card("macro F1", _num(report["macro_avg"]["f1"], 4), field="macro_f1", data=report["macro_avg"]["f1"]),
        _card("duration", _duration(seconds) if seconds is not None else "running",
              f"{started:%Y-%m-%d %H:%M:%S} UTC → " + (f"{finished:%H:%M:%S} UTC" if finished else "…"),
              field="duration_seconds", data=seconds),
        _card("throughput", f"{rate:.2f} scans/s" if rate is not None else "n/a", field="scans_per_second",
              data=rate),
        _card("model", e(model.name), f"{model.sha256[:12]} · validation accuracy "
              f"{_num(validation.get('accuracy'), 4)}, macro F1 {_num(val_f1, 4)}"
              f" on {val_n} scans", field="model", data=None),
        _card("served in", e(served) or "no results yet", "the precision the model computed each result in",
              field="served_in", data=served),
    ]
    return (f"<h1>brainscan report · job {report['job']}</h1>"
            f'<p class="sub">{e(report["status"])} · {e(report["folder"])}</p>'
            f'<section id="summary"><div class="cards">{"".join(cards)}</div></section>')


def _class_table(report: dict) -> str:
    head = ("<tr><th class=l>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th>"
            "<th>ROC-AUC</th></tr>")
    rows = []
    for cls, m in report["per_class"].items():
        rows.append(f"<tr><td class=l>{_chip(cls)}</td>" + _cell(m["precision"], cls, "precision")
                    + _cell(m["recall"], cls, "recall") + _cell(m["f1"], cls, "f1")
                    + _cell(m["support"], cls, "support") + _cell(m["auc"], cls, "auc") + "</tr>")
    for name, label in (("macro_avg", "macro average"), ("weighted_avg", "weighted average")):
        m = report[name]
        rows.append(f'<tr class="avg"><td class=l>{label}</td>' + _cell(m["precision"], name, "precision")
                    + _cell(m["recall"], name, "recall") + _cell(m["f1"], name, "f1")
                    + _cell(report["labelled"], name, "support") + "<td></td></tr>")
    rows.append('<tr class="avg"><td class=l>accuracy</td><td colspan=2></td>'
                + _cell(report["accuracy"], "accuracy", "accuracy") + _cell(report["labelled"], "accuracy", "support")
                + "<td></td></tr>")
    return f'<table id="per-class">{head}{"".join(rows)}</table>'


def _confusion_table(cm: dict) -> str:
    labels = cm["labels"]
    head = "<tr><th class=l>true \\ predicted</th>" + "".join(f"<th>{e(c)}</th>" for c in labels) + "</tr>"
    rows = "".join(
        f"<tr><td class=l>{_chip(t)}</td>"
        + "".join(f'<td data-true="{e(t)}" data-pred="{e(p)}" data-value="{v}">{v}</td>' for p, v in zip(labels, row))
        + "</tr>"
        for t, row in zip(labels, cm["matrix"]))
    return f'<table id="confusion">{head}{rows}</table>'


def _seen_table(report: dict) -> str:
    u = report["unseen"]
    rows = []
    for scope, label, block, n in (("all", "all labelled scans", report, report["labelled"]),
                                   ("unseen", "unseen by the model", u, u["labelled"])):
        rows.append(f"<tr><td class=l>{label}</td>" + _cell(n, scope, "labelled")
                    + _cell(block["accuracy"], scope, "accuracy", 4) + _cell(block["macro_avg"]["precision"], scope,
                                                                              "macro_precision")
                    + _cell(block["macro_avg"]["recall"], scope, "macro_recall")
                    + _cell(block["macro_avg"]["f1"], scope, "macro_f1")
                    + _cell(block["weighted_avg"]["f1"], scope, "weighted_f1") + "</tr>")
    seen = report["seen_in_training"]
    if seen:
        note = (f'<p class="note"><span data-field="seen_in_training" data-value="{seen}">{seen}</span> of the '
                f"{report['labelled']} labelled scans were in the model's training or validation set, so the "
                "overall figures are optimistic; the unseen row is the honest estimate.</p>")
    else:
        note = ('<p><span data-field="seen_in_training" data-value="0">None</span> of the labelled scans was in '
                "the model's training or validation set.</p>")
    head = ("<tr><th class=l>scope</th><th>labelled</th><th>accuracy</th><th>macro precision</th>"
            "<th>macro recall</th><th>macro F1</th><th>weighted F1</th></tr>")
    return f'{note}<table id="seen">{head}{"".join(rows)}</table>'


def _figure(png: bytes, alt: str, caption: str, fig_id: str) -> str:
    return f'<figure id="{fig_id}">{_img(png, alt)}<figcaption>{caption}</figcaption></figure>'


def _metrics_section(report: dict, done: Done, classes: list[str]) -> str:
    mask = done.labelled
    y_true = [t for t, m in zip(done.true, mask) if m]
    probs = done.probs[mask]
    correct = np.array([t == classes[p] for t, p in zip(y_true, done.predicted[mask])], dtype=bool)
    calibration = plots.reliability_bins(done.confidence[mask], correct, 10)
    aucs = {c: m["auc"] for c, m in report["per_class"].items()}
    figs = [
        _figure(plots.confusion_png(report["confusion_matrix"]["matrix"], report["confusion_matrix"]["labels"]),
                "confusion matrix", "Confusion matrix: counts, shaded by the share of each true class.",
                "fig-confusion"),
        _figure(plots.roc_png(y_true, probs, classes, aucs), "ROC curves",
                "One-vs-rest ROC curves of each class with their area under the curve.", "fig-roc"),
        _figure(plots.reliability_png(calibration), "reliability diagram",
                "Reliability: accuracy of the scans in each of 10 confidence bins against their mean confidence. "
                f'Expected calibration error <b data-metric="ece" data-value="{_data(calibration["ece"])}">'
                f'{_num(calibration["ece"])}</b> (bin-size-weighted mean gap).', "fig-reliability"),
    ]
    return ('<section id="metrics"><h2>Metrics</h2><div class="row"><div><h3>Per class</h3>' + _class_table(report)
            + "</div><div><h3>Confusion matrix (rows = true, columns = predicted)</h3>"
            + _confusion_table(report["confusion_matrix"]) + "</div></div>" + _seen_table(report)
            + f'<div class="figs">{"".join(figs)}</div></section>')


def _predictions_section(done: Done, classes: list[str]) -> str:
    counts = {c: int((done.predicted == i).sum()) for i, c in enumerate(classes)}
    rows = "".join(f'<tr><td class=l>{_chip(c)}</td><td data-class="{e(c)}" data-metric="predicted" '
                   f'data-value="{n}">{n}</td></tr>' for c, n in counts.items())
    figs = (_figure(plots.prediction_counts_png(counts), "predictions per class",
                    "Scans predicted as each class (all done scans, labelled or not).", "fig-predictions")
            + _figure(plots.confidence_hist_png(done.confidence, done.predicted, classes), "confidence histogram",
                      "Probability of the predicted class, stacked by predicted class.", "fig-confidence"))
    return (f'<section id="predictions"><h2>Predictions</h2><div class="figs"><table id="predicted"><tr>'
            f'<th class=l>predicted</th><th>scans</th></tr>{rows}</table>{figs}</div></section>')


def _scan_card(pick: Pick, art: dict) -> str:
    def panel(name: str) -> str:
        png = art[name]
        if png is None:
            return f'<div class="missing">{e(art["note"] or "not available")}</div>'
        return _img(png, f"{name} of {art['path']}")

    truth = (f"true <b>{e(pick.true)}</b> · " if pick.true else "unlabelled · ")
    wrong = pick.true is not None and pick.true != pick.predicted
    predicted = f'<span class="{"wrong" if wrong else ""}">predicted <b>{e(pick.predicted)}</b></span>'
    seen = ' <span class="badge">seen in training</span>' if pick.seen else ""
    return (f'<figure class="scan" data-scan="{pick.scan_id}"><div class="panelnames"><span>original</span>'
            f"<span>Grad-CAM</span><span>overlay</span></div><div class=panels>"
            f'{panel("original")}{panel("heatmap")}{panel("overlay")}</div>'
            f"<figcaption>{e(art['path'])}<br>{truth}{predicted} · p = {pick.probability:.3f}{seen}</figcaption>"
            "</figure>")


def _gallery_section(session: Session, job: Job, groups: dict[str, list[Pick]], more: int) -> str:
    art = render_picks(session, job, [p for picks in groups.values() for p in picks])
    parts = ['<section id="gallery"><h2>Grad-CAM gallery</h2><p>Each scan as original | Grad-CAM of the predicted '
             "class (inferno: dark = no evidence, bright = most evidence) | overlay, on the scan's own pixel grid.</p>"]
    for title, picks in groups.items():
        parts.append(f"<h3>{e(title)} ({len(picks)})</h3>")
        if not picks:
            parts.append("<p>none</p>")
            continue
        parts.append('<div class="gallery">' + "".join(_scan_card(p, art[p.scan_id]) for p in picks) + "</div>")
    if more:
        parts.append(f'<p data-field="misclassified_not_shown" data-value="{more}">… and {more} more misclassified '
                     f"scans not shown; <code>python cli.py export {job.id} --out DIR</code> writes every heatmap.</p>")
    return "".join(parts) + "</section>"


def _failed_section(session: Session, job_id: int, report: dict) -> str:
    if not report["failed"]:
        return ""
    rows = session.execute(select(Scan.path, Scan.error).where(Scan.job_id == job_id, Scan.status == "failed")
                           .order_by(Scan.path).limit(MAX_FAILED)).all()
    reasons = "".join(f"<tr><td>{n}</td><td class=l>{e(reason or '')}</td></tr>"
                      for reason, n in report["failures"].items())
    listed = "".join(f"<tr><td class=l>{e(r.path)}</td><td class=l>{e(r.error or '')}</td></tr>" for r in rows)
    rest = report["failed"] - len(rows)
    tail = (f'<p data-field="failed_not_listed" data-value="{rest}">… and {rest} more failed scans.</p>'
            if rest > 0 else "")
    return (f'<section id="failed"><h2>Failed scans ({report["failed"]})</h2><h3>By reason</h3>'
            f'<table id="failure-reasons"><tr><th>scans</th><th class=l>reason</th></tr>{reasons}</table>'
            f'<h3>Scans</h3><table id="failed-scans"><tr><th class=l>path</th><th class=l>reason</th></tr>{listed}'
            f"</table>{tail}</section>")


def build_html(session: Session, job_id: int) -> str:
    """The whole report page of a job as one string."""
    report = job_report(session, job_id)
    job = session.get(Job, job_id)
    model = session.get(Model, job.model_sha256)
    classes = list(model.card["classes"])
    done = done_scans(session, job_id, classes)
    body = [_summary(report, job, model)]
    if report["labelled"]:
        body.append(_metrics_section(report, done, classes))
    elif len(done.ids):
        body.append(f'<p class="note" id="needs-labels">{e(NEEDS_LABELS)}</p>')
    else:
        body.append(f'<p class="note" id="nothing-done">{e(NOTHING_DONE)}</p>')
    if len(done.ids):
        body.append(_predictions_section(done, classes))
        body.append(_gallery_section(session, job, *pick_gallery(done, classes, seen_hashes(model.card))))
    body.append(_failed_section(session, job_id, report))
    body.append(f"<footer>Generated by brainscan on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from job "
                f"{job.id}. Self-contained: this file loads nothing from anywhere.</footer>")
    return PAGE.substitute(title=e(f"brainscan job {job.id}"), body="\n".join(body))


def write_html(session: Session, job_id: int, path: Path) -> int:
    """Write the report page to `path`; returns its size in bytes."""
    text = build_html(session, job_id)
    data = text.encode("utf-8")
    Path(path).write_bytes(data)
    return len(data)
