"""brainscan: classify brain MRI scan archives with a CNN and Grad-CAM.

Every command is a thin layer over a library function; domain errors become
ClickExceptions that say what to do next.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click


@click.group()
def cli():
    """Classify brain MRI scans (glioma, meningioma, pituitary, notumor) with Grad-CAM."""


@cli.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("models/brainscan-v1"), show_default=True,
              help="Output stem: writes OUT.keras, OUT.json, OUT-curves.png, OUT-confusion.png.")
@click.option("--epochs", default=40, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--size", default=128, show_default=True, help="Input side in pixels.")
@click.option("--seed", default=1337, show_default=True)
@click.option("--val-fraction", default=0.15, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last epoch checkpoint.")
def train(data, out, epochs, batch_size, size, seed, val_fraction, resume):
    """Train the CNN on class folders of DATA and write the model, its card and plots.

    Example: python cli.py train ../shared/data/brain-tumor-mri/Training --out models/brainscan-v1
    """
    from training.data import DataError
    from training.train import TrainConfig
    from training.train import train as run_training
    from jobs.scanning import FolderError

    cfg = TrainConfig(data, out, epochs=epochs, batch_size=batch_size, size=size, seed=seed,
                      val_fraction=val_fraction, resume=resume,
                      command="python " + shlex.join(["cli.py", *sys.argv[1:]]))
    try:
        card = run_training(cfg)
    except (DataError, FolderError) as exc:
        raise click.ClickException(str(exc)) from exc
    except KeyboardInterrupt:
        raise click.ClickException("training interrupted; run the same command with --resume to continue")
    v = card["validation"]
    click.echo(f"wrote {Path(out).with_suffix('.keras')}: validation accuracy {v['accuracy']:.4f}, "
               f"macro-F1 {v['macro_avg']['f1']:.4f}, {card['wall_time_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    cli()
