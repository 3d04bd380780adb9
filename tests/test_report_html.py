"""`report JOB --html`: one self-contained page, opened in headless Chromium, whose numbers are the database's.

Real jobs: a tiny model trained by the project's own code on the 16 example scans, run through the local
pipeline on a labelled folder (with a truncated JPEG that fails) and on an unlabelled folder. A copy of
each page gets a script that records errors and every image's decoded size into the DOM; Chromium dumps
the DOM, and the test reads it back.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select

from cli import cli
from db.models import Job, Model, Result, Scan
from db.session import session_scope
from jobs.report import job_report, seen_hashes
from tests.conftest import report_tiny_model

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "scans"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr",
                  "--v=0", "--virtual-time-budget=10000"]
# Runs before the page's Content-Security-Policy (a meta policy governs only what follows it).
CHECKS = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push("error: " + (e.message || (e.target && e.target.outerHTML
  ? e.target.outerHTML.slice(0, 120) : "?"))), true);
document.addEventListener("securitypolicyviolation",
  e => __errors.push("csp: " + e.violatedDirective + " " + e.blockedURI));
for (const level of ["error", "warn"]) {
  const original = console[level];
  console[level] = (...args) => { __errors.push(level + ": " + args.join(" ")); original.apply(console, args); };
}
window.addEventListener("load", () => {
  const images = [...document.images].map(i => ({alt: i.alt, complete: i.complete, width: i.naturalWidth,
                                                 height: i.naturalHeight}));
  const out = document.createElement("pre");
  out.id = "__checks";
  out.textContent = JSON.stringify({errors: __errors, images: images});
  document.body.appendChild(out);
});
</script>"""


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children, self.parts = tag, attrs, [], []

    def text(self) -> str:
        return "".join(p if isinstance(p, str) else p.text() for p in self.parts)

    def iter(self):
        yield self
        for child in self.children:
            yield from child.iter()

    def find_all(self, tag: str | None = None, **attrs) -> list["Node"]:
        return [n for n in self.iter() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def has_class(self, name: str) -> bool:
        return name in (self.attrs.get("class") or "").split()


class Tree(HTMLParser):
    VOID = {"img", "meta", "br", "link", "input", "hr", "source", "area", "base", "col", "wbr"}

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v if v is not None else "") for k, v in attrs})
        self.stack[-1].children.append(node)
        self.stack[-1].parts.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        self.stack[-1].parts.append(data)


def parse(text: str) -> Node:
    return Tree(text).root




def open_in_chromium(page: Path, work: Path) -> tuple[Node, dict, list[str]]:
    """Load a copy of the page with CHECKS in headless Chromium: (dumped DOM, checks, console lines)."""
    chromium = shutil.which("chromium")
    assert chromium, "headless Chromium is needed: apt-get install -y chromium"
    copy = work / f"checked-{page.name}"
    text = page.read_text(encoding="utf-8")
    assert text.count("<head>") == 1
    copy.write_text(text.replace("<head>", "<head>\n" + CHECKS, 1), encoding="utf-8")
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={work / 'chromium-profile'}", "--dump-dom",
                           copy.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = parse(done.stdout)
    checks = dom.find_all("pre", id="__checks")
    assert len(checks) == 1, "the load handler never ran: " + done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return dom, json.loads(checks[0].text()), console


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Two real jobs (labelled with one failure; unlabelled), their pages and what Chromium made of them."""
    from config import load_settings
    from jobs.lifecycle import new_job, run_job

    work = tmp_path_factory.mktemp("report-html")
    model = report_tiny_model(tmp_path_factory)
    labelled = shutil.copytree(EXAMPLES, work / "archive")
    data = (EXAMPLES / "glioma" / "Tr-gl_0207.jpg").read_bytes()
    (labelled / "glioma" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    unlabelled = work / "unsorted"
    unlabelled.mkdir()
    for i, src in enumerate(sorted(EXAMPLES.glob("*/*.jpg"))[::3]):
        shutil.copy(src, unlabelled / f"scan-{i}.jpg")
    broken = work / "broken"
    (broken / "glioma").mkdir(parents=True)
    (broken / "glioma" / "truncated.jpg").write_bytes(data[: len(data) // 3])
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DATABASE_URL", raising=False)
        mp.delenv("BROKER_URL", raising=False)
        mp.setenv("BRAINSCAN_VAR", str(work / "var"))
        mp.setenv("BRAINSCAN_MODEL", str(model))
        settings = load_settings()
        jobs = {}
        for name, folder in (("labelled", labelled), ("unlabelled", unlabelled), ("broken", broken)):
            jobs[name] = new_job(settings, folder)
            run_job(settings, jobs[name], workers=1)
        pages, outputs = {}, {}
        for name, job_id in jobs.items():
            pages[name] = work / f"job-{job_id}.html"
            result = CliRunner().invoke(cli, ["report", str(job_id), "--html", str(pages[name])],
                                        catch_exceptions=False)
            assert result.exit_code == 0, result.output
            outputs[name] = result.output
        browsed = {name: open_in_chromium(page, work) for name, page in pages.items()}
        yield {"settings": settings, "jobs": jobs, "pages": pages, "outputs": outputs, "browsed": browsed,
               "folders": {"labelled": labelled, "unlabelled": unlabelled, "broken": broken}}


def _value(text: str):
    return None if text == "" else float(text)


def test_cli_writes_the_page_and_says_where(site):
    job = site["jobs"]["labelled"]
    page = site["pages"]["labelled"]
    assert site["outputs"]["labelled"] == (f"wrote {page} ({page.stat().st_size / 1e6:.1f} MB): "
                                           f"report of job {job}\n")


@pytest.mark.parametrize("name", ["labelled", "unlabelled", "broken"])
def test_chromium_shows_no_console_message_and_no_error(site, name):
    _, checks, console = site["browsed"][name]
    assert checks["errors"] == []
    assert console == []


@pytest.mark.parametrize("name", ["labelled", "unlabelled", "broken"])
def test_every_image_decodes_in_chromium(site, name):
    dom, checks, _ = site["browsed"][name]
    images = checks["images"]
    source = parse(site["pages"][name].read_text(encoding="utf-8"))
    assert len(images) == len(source.find_all("img"))
    assert [i for i in images if not (i["complete"] and i["width"] > 0 and i["height"] > 0)] == []


@pytest.mark.parametrize("name", ["labelled", "unlabelled"])
def test_page_loads_nothing_from_outside(site, name):
    text = site["pages"][name].read_text(encoding="utf-8")
    tree = parse(text)
    assert tree.find_all("script") == [] and tree.find_all("link") == [] and tree.find_all("iframe") == []
    urls = [v for n in tree.iter() for k, v in n.attrs.items() if k in ("src", "href", "srcset", "poster", "data")]
    assert urls and all(u.startswith("data:image/png;base64,") for u in urls)
    assert "url(" not in text and "@import" not in text
    csp = [m.attrs["content"] for m in tree.find_all("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert csp == ["default-src 'none'; img-src data:; style-src 'unsafe-inline'"]


def test_per_class_table_equals_the_database(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        report = job_report(s, site["jobs"]["labelled"])
    table = dom.find_all("table", id="per-class")[0]
    shown = {(c.attrs["data-class"], c.attrs["data-metric"]): _value(c.attrs["data-value"])
             for c in table.find_all("td") if "data-metric" in c.attrs}
    expected = {(cls, k): m[k] for cls, m in report["per_class"].items() for k in ("precision", "recall", "f1",
                                                                                  "support", "auc")}
    for avg in ("macro_avg", "weighted_avg"):
        expected.update({(avg, k): report[avg][k] for k in ("precision", "recall", "f1")})
        expected[(avg, "support")] = report["labelled"]
    expected.update({("accuracy", "accuracy"): report["accuracy"], ("accuracy", "support"): report["labelled"]})
    assert shown == expected


def test_confusion_matrix_and_summary_equal_the_database(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        report = job_report(s, site["jobs"]["labelled"])
    cells = dom.find_all("table", id="confusion")[0].find_all("td")
    shown = [[None] * 4 for _ in range(4)]
    for c in cells:
        if "data-value" in c.attrs:
            shown[CLASSES.index(c.attrs["data-true"])][CLASSES.index(c.attrs["data-pred"])] = int(c.attrs["data-value"])
    assert shown == report["confusion_matrix"]["matrix"]
    summary = {n.attrs["data-field"]: n.attrs["data-value"] for n in dom.find_all() if "data-field" in n.attrs}
    assert (summary["scans"], summary["labelled"], summary["failed"]) == ("17", "16", "1")
    assert (_value(summary["accuracy"]), _value(summary["macro_f1"])) == (report["accuracy"], report["macro_avg"]["f1"])
    assert summary["seen_in_training"] == str(report["seen_in_training"]) == "16"


def test_summary_counts_the_done_scans_by_the_precision_they_were_served_in(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        report = job_report(s, site["jobs"]["labelled"])
        precisions = s.execute(select(Result.served_in).distinct()).scalars().all()
    summary = {n.attrs["data-field"]: n.attrs["data-value"] for n in dom.find_all() if "data-field" in n.attrs}
    assert len(precisions) == 1 and precisions[0] in ("float32", "mixed_bfloat16")  # `auto` picks by CPU
    assert summary["served_in"] == f"{precisions[0]} 16"


def test_seen_in_training_table_shows_overall_and_unseen_figures(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        report = job_report(s, site["jobs"]["labelled"])
    table = dom.find_all("table", id="seen")[0]
    shown = {(c.attrs["data-class"], c.attrs["data-metric"]): _value(c.attrs["data-value"])
             for c in table.find_all("td") if "data-metric" in c.attrs}
    for scope, block in (("all", report), ("unseen", report["unseen"])):
        assert shown[(scope, "labelled")] == block["labelled"]
        assert shown[(scope, "accuracy")] == block["accuracy"]
        assert shown[(scope, "macro_f1")] == block["macro_avg"]["f1"]
        assert shown[(scope, "weighted_f1")] == block["weighted_avg"]["f1"]


def test_figures_are_there_with_an_expected_calibration_error(site):
    dom = site["browsed"]["labelled"][0]
    for fig_id in ("fig-confusion", "fig-roc", "fig-reliability", "fig-predictions", "fig-confidence"):
        assert len(dom.find_all("figure", id=fig_id)[0].find_all("img")) == 1, fig_id
    ece = dom.find_all("b", data_metric="ece")[0]
    assert 0.0 <= float(ece.attrs["data-value"]) <= 1.0


def _cards(dom: Node) -> list[dict]:
    cards = []
    for fig in dom.find_all("figure"):
        if fig.has_class("scan"):
            imgs = fig.find_all("img")
            cards.append({"id": int(fig.attrs["data-scan"]), "caption": fig.find_all("figcaption")[0].text(),
                          "images": [i.attrs["alt"] for i in imgs]})
    return cards


def test_gallery_has_three_correct_per_class_and_every_misclassified_scan(site):
    dom = site["browsed"]["labelled"][0]
    job = site["jobs"]["labelled"]
    with session_scope(site["settings"].database_url) as s:
        rows = s.execute(select(Scan.id, Scan.path, Scan.true_label, Result.predicted_label)
                         .join(Result, Scan.result_id == Result.id).where(Scan.job_id == job)).all()
    shown = {c["id"]: c for c in _cards(dom)}
    wrong = {r.id for r in rows if r.true_label != r.predicted_label}
    assert wrong <= set(shown)  # fewer than the cap of 24: all of them
    for cls in CLASSES:
        correct = [r.id for r in rows if r.true_label == cls == r.predicted_label]
        assert len(set(correct) & set(shown)) == min(3, len(correct)), cls
    assert len(shown) == len(wrong) + sum(min(3, sum(r.true_label == c == r.predicted_label for r in rows))
                                          for c in CLASSES)
    for r in rows:
        if r.id in shown:
            caption = shown[r.id]["caption"]
            assert caption.startswith(r.path)
            assert f"true {r.true_label}" in caption and f"predicted {r.predicted_label}" in caption
            assert "seen in training" in caption  # every example scan trained or validated the tiny model
            assert shown[r.id]["images"] == [f"{p} of {r.path}" for p in ("original", "heatmap", "overlay")]


def test_gallery_probability_is_the_stored_one(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        stored = dict(s.execute(select(Scan.id, Result.probabilities).join(Result, Scan.result_id == Result.id)
                                .where(Scan.job_id == site["jobs"]["labelled"])).all())
    for card in _cards(dom):
        assert f"p = {max(stored[card['id']]):.3f}" in card["caption"]


def test_gallery_panels_are_on_each_scans_own_pixel_grid(site):
    """Original, heatmap and overlay share the scan's aspect: a 173 x 201 scan is drawn 138 x 160."""
    from PIL import Image

    dom, checks, _ = site["browsed"]["labelled"]
    sizes = {i["alt"]: (i["width"], i["height"]) for i in checks["images"]}
    with session_scope(site["settings"].database_url) as s:
        paths = dict(s.execute(select(Scan.id, Scan.path).where(Scan.job_id == site["jobs"]["labelled"])).all())
    for card in _cards(dom):
        path = paths[card["id"]]
        with Image.open(site["folders"]["labelled"] / path) as im:
            w, h = im.size
        scale = min(1.0, 160 / max(w, h))
        expected = (max(1, round(w * scale)), max(1, round(h * scale)))
        assert [sizes[alt] for alt in card["images"]] == [expected] * 3, path


def test_failed_scan_is_listed_with_its_reason(site):
    dom = site["browsed"]["labelled"][0]
    with session_scope(site["settings"].database_url) as s:
        failed = s.execute(select(Scan.path, Scan.error).where(Scan.job_id == site["jobs"]["labelled"],
                                                                Scan.status == "failed")).all()
    table = dom.find_all("table", id="failed-scans")[0]
    rows = [[td.text() for td in tr.find_all("td")] for tr in table.find_all("tr")]
    assert rows[1:] == [[p, e] for p, e in failed] and [p for p, _ in failed] == ["glioma/truncated.jpg"]


def test_unlabelled_job_says_metrics_need_labels_and_shows_predictions(site):
    dom = site["browsed"]["unlabelled"][0]
    job = site["jobs"]["unlabelled"]
    assert dom.find_all("section", id="metrics") == []
    note = dom.find_all("p", id="needs-labels")[0].text()
    assert note.startswith("No labelled scans: metrics need labels.")
    with session_scope(site["settings"].database_url) as s:
        counts = dict(s.execute(select(Result.predicted_label, func.count()).join(Scan, Scan.result_id == Result.id)
                                .where(Scan.job_id == job).group_by(Result.predicted_label)).all())
        total = s.get(Job, job).total
    shown = {c.attrs["data-class"]: int(c.attrs["data-value"])
             for c in dom.find_all("td", data_metric="predicted")}
    assert shown == {c: counts.get(c, 0) for c in CLASSES} and sum(shown.values()) == total == 6
    assert len(dom.find_all("figure", id="fig-confidence")) == 1
    titles = [h.text() for h in dom.find_all("section", id="gallery")[0].find_all("h3")]
    assert titles == [f"predicted {c} ({min(3, counts.get(c, 0))})" for c in CLASSES]
    assert all(c["caption"].count("unlabelled") == 1 for c in _cards(dom))


def test_seen_badge_marks_exactly_the_models_training_hashes(site):
    dom = site["browsed"]["unlabelled"][0]
    with session_scope(site["settings"].database_url) as s:
        job = s.get(Job, site["jobs"]["unlabelled"])
        seen = seen_hashes(s.get(Model, job.model_sha256).card)
        shas = dict(s.execute(select(Scan.id, Scan.sha256).where(Scan.job_id == job.id)).all())
    cards = _cards(dom)
    assert cards and all(("seen in training" in c["caption"]) == (shas[c["id"]] in seen) for c in cards)


def test_the_checks_catch_a_broken_image_and_a_blocked_request(site, tmp_path):
    """The harness itself: the same page with an undecodable and a remote image fails the checks."""
    text = site["pages"]["labelled"].read_text(encoding="utf-8")
    bad = tmp_path / "bad.html"
    broken = '<img src="data:image/png;base64,AAAA" alt="broken"><img src="https://example.invalid/x.png" alt="remote">'
    bad.write_text(text.replace("<main>", "<main>" + broken, 1), encoding="utf-8")
    _, checks, console = open_in_chromium(bad, tmp_path)
    assert [(i["alt"], i["width"]) for i in checks["images"] if i["width"] == 0] == [("broken", 0), ("remote", 0)]
    assert "csp: img-src https://example.invalid/x.png" in checks["errors"]
    assert any("violates the following Content Security Policy" in line for line in console)


def test_job_without_any_result_says_so_and_lists_its_failures(site):
    dom, checks, _ = site["browsed"]["broken"]
    assert dom.find_all("p", id="nothing-done")[0].text() == (
        "No scan has a result yet (every scan failed or is pending), so there are no metrics or heatmaps.")
    assert [s.attrs["id"] for s in dom.find_all("section")] == ["summary", "failed"]
    assert checks["images"] == []
    table = dom.find_all("table", id="failed-scans")[0]
    assert [td.text() for td in table.find_all("td")][0] == "glioma/truncated.jpg"
