"""brainscan: classify brain MRI scan archives with a CNN and Grad-CAM.

Each command opens the settings, calls one library function and turns a domain error
into a ClickException that says what to do next.
"""
from __future__ import annotations

import functools
import json
import os
import shlex
import sys
from pathlib import Path

import click

from config import load_settings
from training import defaults as train_defaults


def parse_counts(value: str | None) -> tuple | None:
    """`1,2,2,3` as (1, 2, 2, 3); None stays None."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not comma-separated whole numbers such as 1,1,2,2")


def domain_errors(fn):
    """Turn the library's user-actionable errors into one-line messages and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import OperationalError

        from config import SettingsError
        from db.session import DatabaseUnavailable, safe_url
        from jobs.export import ExportError
        from jobs.labels import LabelError
        from jobs.progress import JobNotFound
        from jobs.queue import BrokerUnavailable
        from jobs.scanning import FolderError
        from training.data import DataError
        from vision.errors import ModelError

        try:
            return fn(*args, **kwargs)
        except (FolderError, LabelError, ModelError, JobNotFound, DatabaseUnavailable, BrokerUnavailable,
                ExportError, DataError, SettingsError) as exc:
            raise click.ClickException(str(exc)) from None
        except OperationalError as exc:
            url = safe_url(load_settings().database_url)
            raise click.ClickException(f"database {url} unreachable ({type(exc.orig).__name__}); "
                                       "check DATABASE_URL and that the server is up") from None

    return wrapper


def job_option(fn):
    return click.argument("job", type=int, required=False)(fn)


def _report_out(job_id: int | None, fmt: str) -> None:
    from db.session import session_scope
    from jobs.progress import resolve_job
    from jobs.report import job_report
    from jobs.report_formats import render

    settings = load_settings()
    with session_scope(settings.database_url) as session:
        report = job_report(session, resolve_job(session, job_id).id)
    click.echo(render(report, fmt))


def _run_folder(folder, labels, batch_size, workers, follow_links, quiet=False) -> int:
    from jobs.lifecycle import new_job, run_job
    from vision.runtime import check_servable

    settings = load_settings()
    check_servable(settings.model_path, settings.precision)  # before a job is recorded that nothing could run
    job_id = new_job(settings, folder, labels, batch_size, follow_links)
    with click.progressbar(length=_total(settings, job_id), label=f"job {job_id}", file=sys.stderr,
                           show_pos=True, show_eta=True, hidden=quiet) as bar:
        run_job(settings, job_id, workers=workers, on_batch=lambda c: bar.update(c["n"]))
    return job_id


def _total(settings, job_id: int) -> int:
    from db.models import Job
    from db.session import session_scope

    with session_scope(settings.database_url) as session:
        return session.get_one(Job, job_id).total


def _skipped(settings, job_id: int) -> int:
    from db.models import Job
    from db.session import session_scope

    with session_scope(settings.database_url) as session:
        return session.get_one(Job, job_id).skipped or 0


# FOLDER may also be a .zip archive: its scans are read in place, paths are member names.
folder_arg = click.argument("folder", type=click.Path(path_type=Path))
labels_opt = click.option("--labels", type=click.Path(path_type=Path), help="CSV with path,label columns.")
batch_opt = click.option("--batch-size", type=int, help="Scans per task (default BRAINSCAN_BATCH_SIZE, 32).")
links_opt = click.option("--follow-links", is_flag=True, help="Follow symlinks that leave FOLDER.")
format_opt = click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
                          show_default=True)
report_format_opt = click.option("--format", "fmt", type=click.Choice(["table", "json", "csv", "markdown"]),
                                 default="table", show_default=True)


@click.group()
def cli():
    """Classify brain MRI scans (glioma, meningioma, pituitary, notumor) with Grad-CAM heatmaps."""


@cli.command()
@folder_arg
@labels_opt
@batch_opt
@links_opt
@click.option("--wait", is_flag=True, help="Show progress until done, re-enqueueing lost work.")
@domain_errors
def submit(folder, labels, batch_size, follow_links, wait):
    """Record the scans of FOLDER (or a .zip archive) as a job and enqueue it for the workers.

    Example: python cli.py submit /archive/2026-11-28 --wait
    """
    from jobs.lifecycle import enqueue_job, new_job
    from jobs.lifecycle import wait as wait_job

    settings = load_settings()
    if settings.embedded:
        raise click.ClickException("BROKER_URL is not set: use `python cli.py run FOLDER` to process locally")
    job_id = new_job(settings, folder, labels, batch_size, follow_links)
    from jobs.queue import BrokerUnavailable

    try:
        tasks = enqueue_job(settings, job_id)
    except BrokerUnavailable as exc:
        # The job and its scans are committed: nothing is lost, it only waits to be enqueued.
        raise click.ClickException(f"{exc}; job {job_id} is recorded: run `python cli.py resume {job_id}` "
                                   "once the broker is up") from None
    skipped = _skipped(settings, job_id)
    click.echo(f"job {job_id}: {_total(settings, job_id)} scans in {tasks} batches enqueued"
               + (f"; {skipped} DICOM object(s) without pixel data skipped" if skipped else ""))
    if wait:
        with click.progressbar(length=_total(settings, job_id), label=f"job {job_id}", file=sys.stderr,
                               show_pos=True, show_eta=True) as bar:
            def on_progress(p):
                bar.update(p.finished - bar.pos)
            p = wait_job(settings, job_id, on_progress=on_progress)
        click.echo(f"job {job_id} complete: {p.done} done, {p.failed} failed")


@cli.command()
@folder_arg
@labels_opt
@batch_opt
@links_opt
@click.option("--workers", type=int, help="Local worker processes (default BRAINSCAN_LOCAL_WORKERS, 1).")
@report_format_opt
@domain_errors
def run(folder, labels, batch_size, follow_links, workers, fmt):
    """Process FOLDER (or a .zip archive) on this machine with local worker processes, no broker, then print
    the report.

    Example: python cli.py run examples/scans
    """
    _report_out(_run_folder(folder, labels, batch_size, workers, follow_links, quiet=fmt != "table"), fmt)


@cli.command()
@folder_arg
@labels_opt
@click.option("--model", type=click.Path(path_type=Path), help="Model file (default BRAINSCAN_MODEL).")
@click.option("--workers", type=int)
@report_format_opt
@domain_errors
def evaluate(folder, labels, model, workers, fmt):
    """Run a labelled FOLDER (or .zip archive) through the production pipeline and print the full report.

    Example: python cli.py evaluate ../Testing --model models/brainscan-v1.keras --format json
    """
    if model:
        os.environ["BRAINSCAN_MODEL"] = str(model)
    _report_out(_run_folder(folder, labels, None, workers, False, quiet=fmt != "table"), fmt)


@cli.command()
@click.option("--concurrency", type=int, help="Pool processes (default: one per GPU, else 1).")
@click.option("--loglevel", default="INFO", show_default=True)
@domain_errors
def worker(concurrency, loglevel):
    """Start a Celery worker that serves jobs (uses the GPU when one is present).

    Example: BROKER_URL=redis://localhost:6379/0 DATABASE_URL=postgresql://... python cli.py worker
    """
    from worker.app import start_worker

    start_worker(concurrency, loglevel)


@cli.command()
@click.option("--loglevel", default="INFO", show_default=True)
def beat(loglevel):
    """Run the nightly scheduler: submit each BRAINSCAN_ARCHIVES root on BRAINSCAN_SCHEDULE_CRON.

    Example: BRAINSCAN_ARCHIVES=/archive BRAINSCAN_SCHEDULE_CRON="0 1 * * *" python cli.py beat
    """
    from worker.beat import start_beat

    try:
        start_beat(loglevel)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@job_option
@format_opt
@domain_errors
def status(job, fmt):
    """Show done / failed / pending / total, rate and ETA of JOB (default: the latest).

    Example: python cli.py status 12
    """
    from db.session import session_scope
    from jobs.progress import progress, resolve_job

    with session_scope(load_settings().database_url) as session:
        p = progress(session, resolve_job(session, job).id).as_dict()
    if fmt == "json":
        click.echo(json.dumps(p))
        return
    eta = "-" if p["eta_seconds"] is None else f"{p['eta_seconds']}s"
    click.echo(f"job {p['job']} {p['status']}: {p['done']} done, {p['failed']} failed, {p['pending']} pending "
               f"({p['in_progress']} in progress) of {p['total']}; {p['scans_per_second']} scans/s, ETA {eta}")


@cli.command()
@job_option
@report_format_opt
@click.option("--html", "html_out", type=click.Path(path_type=Path),
              help="Write one self-contained HTML page (figures, Grad-CAM gallery) instead of printing.")
@click.option("--compare", "other", type=int, metavar="OTHER",
              help="Print JOB's metric deltas from job OTHER and the scans whose prediction changed.")
@domain_errors
def report(job, fmt, html_out, other):
    """Per-class precision, recall, F1, support and ROC-AUC, accuracy and confusion matrix of JOB.

    Example: python cli.py report 12 --html night-12.html
    """
    if html_out is None and other is None:
        _report_out(job, fmt)
        return
    if html_out is not None and other is not None:
        raise click.UsageError("--html and --compare are separate reports: give one of them")
    from db.session import session_scope
    from jobs.progress import resolve_job

    with session_scope(load_settings().database_url) as session:
        job_id = resolve_job(session, job).id
        if other is not None:
            from jobs.compare import compare_jobs, render_comparison

            click.echo(render_comparison(compare_jobs(session, other, job_id), fmt))
            return
        from jobs.html_report import write_html

        try:
            size = write_html(session, job_id, html_out)
        except OSError as exc:
            raise click.ClickException(f"cannot write {html_out}: {exc.strerror or exc}") from None
    click.echo(f"wrote {html_out} ({size / 1e6:.1f} MB): report of job {job_id}")


@cli.command("jobs")
@click.option("--limit", type=int, default=20, show_default=True, help="Newest jobs shown; 0 for all.")
@format_opt
@domain_errors
def jobs_command(limit, fmt):
    """List jobs newest first: id, started, folder, scans, failed, accuracy, status, model.

    Example: python cli.py jobs --limit 5
    """
    from db.session import session_scope
    from jobs.listing import format_jobs, list_jobs

    with session_scope(load_settings().database_url) as session:
        rows = list_jobs(session, limit or None)
    click.echo(json.dumps(rows, indent=1) if fmt == "json" else format_jobs(rows))


@cli.command()
@job_option
@domain_errors
def resume(job):
    """Re-enqueue every scan of JOB that has no result and no live lease (after lost messages).

    Example: python cli.py resume 12
    """
    from db.session import session_scope
    from jobs.progress import resolve_job
    from jobs.progress import resume as resume_job

    settings = load_settings()
    with session_scope(settings.database_url) as session:
        job_row = resolve_job(session, job)
        sent = resume_job(settings, session, job_row.id)
    click.echo(f"job {job_row.id}: {sent} scans re-enqueued")


@cli.command()
@click.argument("job", type=int)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write into.")
@domain_errors
def export(job, out):
    """Write results.csv, heatmaps/ and overlays/ of JOB into OUT.

    Example: python cli.py export 12 --out night-12
    """
    from db.session import session_scope
    from jobs.export import export_job

    with session_scope(load_settings().database_url) as session:
        counts = export_job(session, job, out)
    click.echo(f"wrote {out}/results.csv ({counts['rows']} rows) and {counts['images']} heatmap/overlay pairs")


@cli.command()
@domain_errors
def migrate():
    """Create or upgrade the database schema with Alembic.

    Example: DATABASE_URL=postgresql://brainscan@db/brainscan python cli.py migrate
    """
    from db.session import safe_url
    from jobs.lifecycle import open_database

    settings = load_settings()
    open_database(settings)
    click.echo(f"schema of {safe_url(settings.database_url)} is up to date")


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("models/brainscan-v1"), show_default=True,
              help="Output stem: writes OUT.keras, OUT.json, OUT-curves.png, OUT-confusion.png.")
@click.option("--epochs", default=train_defaults.EPOCHS, show_default=True)
@click.option("--batch-size", default=train_defaults.BATCH_SIZE, show_default=True)
@click.option("--size", default=160, show_default=True, help="Input side in pixels.")
@click.option("--width", default=train_defaults.WIDTH, show_default=True,
              help="Filters of the first conv stage; each later stage doubles them.")
@click.option("--dilate", is_flag=True,
              help="Dilate the last stage's convs (2 and 3): its units see 110 of 160 px instead of 62, "
                   "at the same weights and FLOPs.")
@click.option("--convs", callback=lambda ctx, param, value: parse_counts(value),
              help="Conv blocks in each of the 4 stages, comma-separated (default 1,1,2,2).")
@click.option("--pool", type=click.Choice(["avg", "max", "cells"]), default=train_defaults.POOL, show_default=True,
              help="Global pooling before the head: max makes each class point at its strongest cell; cells "
                   "scores every cell and takes each class's best (its loss: --cell-loss).")
@click.option("--cell-loss", type=click.Choice(["logistic", "softmax", "both"]), default="logistic", show_default=True,
              help="With --pool cells: one logistic loss per class (a class must be absent from every cell of "
                   "other classes' scans), softmax cross-entropy, or the two summed.")
@click.option("--towers", default=1, show_default=True,
              help="Networks trained one after another (seeds SEED, SEED+1, ...) and served as one model "
                   "whose logits are their mean.")
@click.option("--mirror/--no-mirror", default=True, show_default=True,
              help="Serve the model (and score it on validation) as the mean of each scan and its left-right "
                   "mirror: probabilities and Grad-CAM maps, at twice the compute.")
@click.option("--seed", default=train_defaults.SEED, show_default=True,
              help="Seed of the weights' init and the augmentation.")
@click.option("--split-seed", type=int,
              help="Seed of the validation split (default: --seed): other --seed values on one split compare fairly.")
@click.option("--val-fraction", default=train_defaults.VAL_FRACTION, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_bfloat16", "mixed_float16"]),
              default="auto", show_default=True,
              help="auto: mixed float16 on a GPU, mixed bfloat16 on a CPU with AVX512-BF16 or AMX, float32 "
                   "elsewhere (bfloat16 without those instructions is ~20x slower). The saved model is float32 "
                   "either way.")
@click.option("--equalise", is_flag=True,
              help="Preprocess with head histogram equalisation instead of the 99.5th-percentile scale "
                   "(recorded in the card, so the worker does the same).")
@click.option("--gamma", default=0.0, show_default=True,
              help="Intensity gamma augmentation: each training scan to a power in [e^-gamma, e^gamma].")
@click.option("--invert", default=0.0, show_default=True,
              help="Share of training scans shown as the negative of the head (T1-like fluid turns T2-like).")
@click.option("--gin", default=0.0, show_default=True,
              help="Share of training scans passed through a random shallow conv net and blended with "
                   "themselves (GIN): new contrasts, so no class is tied to its sources' sequence.")
@click.option("--rim-erase", default=0.0, show_default=True,
              help="Share of training scans whose head's outer rim (skull, scalp, outer cortex) is blacked out, "
                   "so no class rests on how they look.")
@click.option("--cutmix", default=0.0, show_default=True,
              help="Share of training scans with a box of another training scan pasted in, labels mixed by how "
                   "much of each head shows (CutMix): a class must be shown where it is. Not with --teacher.")
@click.option("--clean-epochs", default=0, show_default=True,
              help="The last N epochs augment with left-right flips only, so training ends on scans as served.")
@click.option("--downsize", default=0.0, show_default=True,
              help="Share of the training scans of 300 px or more shown as a 200-300 px JPEG copy of themselves, "
                   "as the small sources (mostly notumor) look.")
@click.option("--oversample", default=1, show_default=True,
              help="Show the scans of a class's rare size group (short side under 300 px or not, under a quarter "
                   "of the class: the trace of a rare source) this many times per epoch.")
@click.option("--balance", default=1, show_default=True,
              help="Cluster the training scans by head intensity histogram (a proxy for T1, T2, FLAIR, CT) and "
                   "repeat each class's rare clusters up to this many times per epoch.")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Start from this trained model's weights (fine-tuning; same --size and --width, one tower).")
@click.option("--erase-lesions", default=0, show_default=True,
              help="With --init: add up to this many figshare meningioma and pituitary training scans with the "
                   "lesion erased where --init's map puts it, labelled notumor (and as many scans with a region "
                   "erased elsewhere, labels kept), so no tumour class rests on the contrast-enhanced look alone.")
@click.option("--teacher", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also learn from this trained model's logits (distillation; same split and preprocessing), "
                   "e.g. a multi-tower model distilled into one network.")
@click.option("--distil-temperature", default=train_defaults.DISTIL_TEMPERATURE, show_default=True,
              help="With --teacher: temperature that softens the teacher's and the network's class scores.")
@click.option("--distil-weight", default=train_defaults.DISTIL_WEIGHT, show_default=True,
              help="With --teacher: share of the loss that follows the teacher rather than the labels.")
@click.option("--learning-rate", default=train_defaults.LEARNING_RATE, show_default=True,
              help="Peak of the warm-up + cosine schedule.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch checkpoint.")
@domain_errors
def train(data, out, epochs, batch_size, size, width, dilate, convs, pool, cell_loss, towers, mirror, seed, split_seed,
          val_fraction, precision, equalise, gamma, invert, gin, rim_erase, cutmix, clean_epochs, downsize, oversample,
          balance, init, erase_lesions, teacher, distil_temperature, distil_weight, learning_rate, resume):
    """Train the CNN on the class folders of DATA (a folder or .zip archive); write the model, card and plots.

    Example: python cli.py train ../shared/data/brain-tumor-mri/Training --out models/brainscan-v1
    """
    from training.train import TrainConfig
    from training.train import train as run_training

    if cutmix and teacher:
        raise click.UsageError("--cutmix mixes labels, not the teacher's logits: use one or the other")
    if erase_lesions and not init:
        raise click.UsageError("--erase-lesions finds each lesion with a trained model's map: give it as --init")
    if erase_lesions and teacher:
        raise click.UsageError("--erase-lesions scans have no teacher logits: use one or the other")

    cfg = TrainConfig(data, out, epochs=epochs, batch_size=batch_size, size=size, width=width, dilate=dilate, convs=convs,
                      pool=pool, cell_loss=cell_loss, towers=towers, mirror=mirror, seed=seed, split_seed=split_seed,
                      val_fraction=val_fraction, precision=precision, equalise=equalise, gamma=gamma,
                      invert=invert, gin=gin, rim_erase=rim_erase, cutmix=cutmix, clean_epochs=clean_epochs,
                      downsize=downsize, oversample=oversample, balance=balance, init=init,
                      erase_lesions=erase_lesions, teacher=teacher,
                      distil_temperature=distil_temperature, distil_weight=distil_weight, learning_rate=learning_rate,
                      resume=resume,
                      command="python " + shlex.join(["cli.py", *sys.argv[1:]]))
    try:
        card = run_training(cfg)
    except KeyboardInterrupt:
        raise click.ClickException("training interrupted; run the same command with --resume to continue")
    v = card["validation"]
    click.echo(f"wrote {Path(out).with_suffix('.keras')}: validation accuracy {v['accuracy']:.4f}, "
               f"macro-F1 {v['macro_avg']['f1']:.4f}, {card['wall_time_seconds'] / 60:.1f} min")


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="Output stem: writes OUT.keras, OUT.json, OUT-curves.png, OUT-confusion.png.")
@click.option("--data", type=click.Path(path_type=Path),
              help="Training data holding the models' validation scans (default: the folder in their card).")
@domain_errors
def merge(models, out, data):
    """Serve models trained on the same split as one: towers side by side, logits averaged, one Grad-CAM layer.

    A model that already has towers joins with each of them, so every network weighs the same. Towers may
    differ in width, conv blocks and dilation; the split, preprocessing and input size must match.

    Example: python cli.py merge models/a.keras models/b.keras --out models/brainscan-v1
    """
    from training.merge import merge as merge_models

    args = [*map(str, models), "--out", str(out), *(["--data", str(data)] if data else [])]
    card = merge_models(list(models), out, data, command="python " + shlex.join(["cli.py", "merge", *args]))
    v = card["validation"]
    click.echo(f"wrote {Path(out).with_suffix('.keras')}: {card['towers']} towers, validation accuracy "
               f"{v['accuracy']:.4f}, macro-F1 {v['macro_avg']['f1']:.4f}")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--mirror/--no-mirror", default=True, show_default=True,
              help="Serve the model as the mean of each scan and its left-right mirror, or the scan alone.")
@click.option("--out", type=click.Path(path_type=Path),
              help="Output stem: writes OUT.keras, OUT.json, OUT-confusion.png (default: MODEL's own).")
@click.option("--data", type=click.Path(path_type=Path),
              help="Training data holding the model's validation scans (default: the folder in its card).")
@domain_errors
def rescore(model, mirror, out, data):
    """Score MODEL's validation split again as it will be served, with or without its mirror, into its card.

    The weights stay as trained; the file is saved anew, so results and the int8 file of the model it was are
    not mixed with its own (run quantize again). The card records the change, the accuracy before and this command.

    Example: python cli.py rescore models/brainscan-v1.keras --mirror
    """
    from training.rescore import rescore as rescore_model

    args = [str(model), "--mirror" if mirror else "--no-mirror", *(["--out", str(out)] if out else []),
            *(["--data", str(data)] if data else [])]
    card = rescore_model(model, mirror, out, data, command="python " + shlex.join(["cli.py", "rescore", *args]))
    v, before = card["validation"], card["rescored"][-1]
    click.echo(f"wrote {Path(out).with_suffix('.keras') if out else model} ({card['sha256'][:12]}, was "
               f"{before['sha256'][:12]}), {'with' if mirror else 'without'} its mirror: validation accuracy "
               f"{v['accuracy']:.4f} (was {before['validation_accuracy_before']:.4f}), macro-F1 "
               f"{v['macro_avg']['f1']:.4f}")


@cli.command()
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), help="Model file (default BRAINSCAN_MODEL).")
@click.option("--scans", default=256, show_default=True, help="Training scans that calibrate the int8 ranges.")
@click.option("--seed", default=0, show_default=True, help="Seed that draws the calibration scans.")
@domain_errors
def quantize(data, model, scans, seed):
    """Write MODEL.int8.tflite, the model in int8 for BRAINSCAN_PRECISION=int8, calibrated on DATA's training scans.

    Only scans of the model's training split calibrate (never validation scans); MODEL.int8.json records them.

    Example: python cli.py quantize ../shared/data/brain-tumor-mri/Training --model models/brainscan-v1.keras
    """
    from training.quantize import quantize_model
    from vision.int8 import int8_path

    model = model or load_settings().model_path
    made = quantize_model(model, data, scans, seed)
    click.echo(f"wrote {int8_path(model)}: {len(made['calibration_sha256'])} calibration scans, {made['seconds']:.1f} s")


if __name__ == "__main__":
    cli()
