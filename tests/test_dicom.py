"""DICOM scans: decoded like the same pixels as PNG, frames as scans, attributes stored, non-images skipped.

Every DICOM file here is built with pydicom from a real example scan, and compared with the same
8-bit pixels saved as PNG (not with the JPEG: JPEGs decode at reduced scale for the model).
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (HTJ2K, BasicTextSRStorage, ExplicitVRLittleEndian, JPEGLossless, JPEGLosslessSV1,
                         JPEGLSLossless, MPEG2MPML, MRImageStorage, RLELossless, generate_uid)

from jobs.labels import UID_KEY, LabelError
from jobs.scanning import list_scans
from jobs.sources import scan_sha256
from tests.conftest import EXAMPLES
from vision.decode import decode, sniff
from vision.dicom import HIGH_PERCENTILE, LOW_PERCENTILE, describe
from vision.errors import ScanError
from vision.preprocess import DEFAULTS, prepare_bytes

PARAMS = dict(DEFAULTS, size=64)  # the tiny model's preprocessing
# An exact mapping (x / 255, a window that maps the stored range onto [0, 1]) differs from the
# PNG's x / 255 by float rounding only.
EXACT = 1e-6
# Without a window, 12/16-bit data is stretched between its 0.5 and 99.5 percentiles: only the
# brightest 0.5 % of pixels differ from the PNG (measured: max 0.040, mean 0.006 on prepared arrays).
PERCENTILE_MAX, PERCENTILE_MEAN = 0.06, 0.01
# Probabilities of the same prepared array agree to rounding; of the percentile-stretched one within 0.02.
PROB_EXACT, PROB_TOL = 1e-4, 0.02
STUDY = "1.2.826.0.1.3680043.8.498.1"
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def pixels(name: str) -> np.ndarray:
    with Image.open(next(EXAMPLES.glob(f"*/{name}.jpg"))) as im:
        return np.asarray(im.convert("L"))


def png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray, "L").save(buf, format="PNG")
    return buf.getvalue()


def dicom(arr: np.ndarray, bits: int = 8, *, photometric: str = "MONOCHROME2", compress=None,
          sop_class=MRImageStorage, series: str = "1.2.826.0.1.3680043.8.498.2", **attrs) -> bytes:
    """A DICOM file of arr (rows x cols, or frames x rows x cols) with the given attributes."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.Modality, ds.SeriesDescription = "MR", "T1 AX"
    if arr is not None:
        ds.set_pixel_data(arr, photometric, bits)  # also sets a fresh SOPInstanceUID
    else:
        ds.SOPInstanceUID = generate_uid()
    for key, value in attrs.items():
        setattr(ds, key, value)
    if compress:
        ds.compress(compress)
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def transcoded(data: bytes, syntax: str) -> bytes:
    """The DICOM file re-encoded by GDCM in a syntax pydicom cannot encode (JPEG Lossless, JPEG-LS)."""
    import tempfile

    import gdcm

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        src.write_bytes(data)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        assert reader.Read()
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
        change.SetInput(reader.GetImage())
        assert change.Change()
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        assert writer.Write()
        return dst.read_bytes()


def windowed12(x: np.ndarray, **attrs) -> bytes:
    """12-bit stored values v = 16x + 8, rescaled to 4x - 98, with the window mapping that back onto x / 255."""
    return dicom(x.astype(np.uint16) * 16 + 8, 12, RescaleSlope=0.25, RescaleIntercept=-100,
                 WindowCenter=412.5, WindowWidth=1021, **attrs)


# name: (example scan, DICOM bytes from its pixels, relpath of the DICOM file, exact mapping?)
CASES = {
    "8-bit": ("Tr-gl_0207", lambda x: dicom(x), "glioma/gl_0207.dcm", True),
    "no extension": ("Tr-me_1104", lambda x: dicom(x), "meningioma/IM000002", True),
    "12-bit window": ("Tr-no_0932", windowed12, "notumor/no_0932.dcm", True),
    "16-bit percentiles": ("Tr-pi_0956", lambda x: dicom(x.astype(np.uint16) * 257, 16, RescaleSlope=2,
                                                          RescaleIntercept=-1000), "pituitary/pi_0956.dcm", False),
    "MONOCHROME1": ("Tr-no_1015", lambda x: dicom(255 - x, photometric="MONOCHROME1"), "notumor/no_1015.dcm", True),
    "RLE Lossless": ("Tr-pi_0975", lambda x: windowed12(x, compress=RLELossless), "pituitary/pi_0975.dcm", True),
    "JPEG Lossless": ("Tr-me_0185", lambda x: transcoded(windowed12(x), "JPEGLosslessProcess14_1"),
                      "meningioma/me_0185.dcm", True),
    "JPEG-LS Lossless": ("Tr-pi_0995", lambda x: transcoded(windowed12(x), "JPEGLSLossless"),
                         "pituitary/pi_0995.dcm", True),
}
MULTI_FRAME = ("Tr-gl_0553", "Tr-gl_0560", "Tr-gl_0830")  # same size: frames of one object


@pytest.mark.parametrize("case", CASES)
def test_each_dicom_encoding_prepares_like_the_same_pixels_as_png(case):
    name, build, _, exact = CASES[case]
    x = pixels(name)
    got = prepare_bytes(build(x), PARAMS)
    want = prepare_bytes(png(x), PARAMS)

    diff = np.abs(got.array - want.array)
    if exact:
        assert (got.box, got.width, got.height) == (want.box, want.width, want.height)
        assert diff.max() <= EXACT
    else:
        assert diff.max() <= PERCENTILE_MAX and diff.mean() <= PERCENTILE_MEAN


def test_without_a_window_16_bit_data_is_stretched_between_its_robust_percentiles():
    x = pixels("Tr-pi_0956")
    values = (x.astype(np.uint16) * 257) * 2.0 - 1000  # the modality LUT: stored * slope + intercept
    low, high = np.percentile(values, [LOW_PERCENTILE, HIGH_PERCENTILE])

    got = decode(CASES["16-bit percentiles"][1](x))
    np.testing.assert_allclose(got, np.clip((values - low) / (high - low), 0, 1), atol=EXACT)


def test_a_multi_frame_object_decodes_exactly_the_frame_asked_for():
    frames = np.stack([pixels(n) for n in MULTI_FRAME])
    data = windowed12(frames, compress=RLELossless)

    for n, x in enumerate(frames, start=1):
        np.testing.assert_allclose(decode(data, frame=n), x / 255.0, atol=EXACT)
        np.testing.assert_allclose(prepare_bytes(data, PARAMS, frame=n).array,
                                   prepare_bytes(png(x), PARAMS).array, atol=EXACT)
    with pytest.raises(ScanError, match="^DICOM frame 4 does not exist: the object has 3 frame"):
        decode(data, frame=4)
    with pytest.raises(ScanError, match="only DICOM objects have frames"):
        decode(png(frames[0]), frame=1)


def test_enhanced_objects_take_rescale_and_window_from_their_functional_groups():
    frames = np.stack([pixels(n) for n in MULTI_FRAME[:2]]).astype(np.uint16) * 16 + 8

    def group(**values):
        item = Dataset()
        for key, value in values.items():
            setattr(item, key, value)
        return item

    shared = group(PixelValueTransformationSequence=Sequence([group(RescaleSlope=0.25, RescaleIntercept=-100)]),
                   FrameVOILUTSequence=Sequence([group(WindowCenter=412.5, WindowWidth=1021)]))
    # Frame 2 has its own window: the lower half of frame 1's, so it saturates above x = 127.5.
    per_frame = [group(), group(FrameVOILUTSequence=Sequence([group(WindowCenter=157.5, WindowWidth=511)]))]
    data = dicom(frames, 12, SharedFunctionalGroupsSequence=Sequence([shared]),
                 PerFrameFunctionalGroupsSequence=Sequence(per_frame))

    x1, x2 = (frames.astype(np.float64) - 8) / 16
    np.testing.assert_allclose(decode(data, frame=1), x1 / 255, atol=EXACT)
    np.testing.assert_allclose(decode(data, frame=2), np.clip(x2 / 127.5, 0, 1), atol=1e-3)


def _relabelled(data: bytes, syntax: str) -> bytes:
    """The same object claiming another transfer syntax, with a stand-in encapsulated frame."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3" + bytes(64) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_transfer_syntax_pydicom_has_no_decoder_for_fails_naming_it():
    with pytest.raises(ScanError) as caught:
        decode(_relabelled(dicom(pixels("Tr-gl_0207")), MPEG2MPML))
    assert str(caught.value) == f"DICOM transfer syntax MPEG2 Main Profile / Main Level ({MPEG2MPML}) is not supported"


def test_a_compressed_syntax_without_a_permissive_handler_fails_naming_it(monkeypatch):
    monkeypatch.setattr("vision.dicom.PLUGINS", ("pillow",))  # as on an install without GDCM

    with pytest.raises(ScanError) as caught:
        decode(_relabelled(dicom(pixels("Tr-gl_0207")), JPEGLossless))
    assert str(caught.value).startswith("DICOM transfer syntax JPEG Lossless")
    assert JPEGLossless in str(caught.value) and "no permissively licensed handler" in str(caught.value)


@pytest.mark.parametrize("syntax, plugin", [(RLELossless, "pydicom"), (JPEGLosslessSV1, "gdcm"),
                                            (JPEGLSLossless, "gdcm"), (HTJ2K, "pylibjpeg")])
def test_each_compressed_syntax_decodes_with_its_permissively_licensed_plugin(syntax, plugin):
    from pydicom import dcmread

    from vision.dicom import _plugin

    ds = dcmread(io.BytesIO(_relabelled(dicom(pixels("Tr-gl_0207")), syntax)))
    assert _plugin(ds) == plugin


def test_objects_without_pixel_data_and_broken_files_fail_or_are_refused_with_a_reason():
    sr = dicom(None, sop_class=BasicTextSRStorage, Modality="SR")
    with pytest.raises(ScanError, match="^DICOM object without pixel data \\(SR\\)"):
        decode(sr)
    broken = dicom(pixels("Tr-gl_0207"))
    with pytest.raises(ScanError, match="^corrupt DICOM"):
        decode(broken[: len(broken) // 2])
    before_pixels = broken[: broken.index(b"\xe0\x7f\x10\x00")]  # cut at the Pixel Data tag
    with pytest.raises(ScanError, match="without pixel data \\(MR\\); it declares an image: truncated"):
        decode(before_pixels)
    assert describe(io.BytesIO(before_pixels)).frames == 1  # a scan that fails, not an object to skip
    assert describe(io.BytesIO(sr)).frames == 0
    assert sniff(sr[:132]) == "DICOM" and sniff(sr[:131]) is None


def dicom_folder(root: Path) -> tuple[Path, dict[str, str]]:
    """PNG and DICOM twins in class folders: {DICOM scan relpath: PNG twin relpath}."""
    twins = {}
    for case, (name, build, relpath, _) in CASES.items():
        x = pixels(name)
        for rel, data in ((f"dicom/{relpath}", build(x)), (f"png/{relpath.split('/')[0]}/{name}.png", png(x))):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        twins[f"dicom/{relpath}"] = f"png/{relpath.split('/')[0]}/{name}.png"
    frames = np.stack([pixels(n) for n in MULTI_FRAME])
    (root / "dicom/glioma/series3.dcm").write_bytes(
        windowed12(frames, series="1.2.826.0.1.3680043.8.498.3", SeriesDescription="T2 multi-frame"))
    for n, name in enumerate(MULTI_FRAME, start=1):
        (root / f"png/glioma/{name}.png").write_bytes(png(frames[n - 1]))
        twins[f"dicom/glioma/series3.dcm#frame={n}"] = f"png/glioma/{name}.png"
    (root / "dicom/glioma/report.dcm").write_bytes(dicom(None, sop_class=BasicTextSRStorage, Modality="SR"))
    return root, twins


def test_listing_names_frames_stores_attributes_and_counts_objects_without_pixels(tmp_path):
    folder, twins = dicom_folder(tmp_path / "in")
    listing = list_scans(folder)
    found = {s.relpath: s for s in listing.scans}

    assert listing.skipped == 1 and "dicom/glioma/report.dcm" not in found
    assert set(found) == set(twins) | set(twins.values())
    file_sha = hashlib.sha256((folder / "dicom/glioma/series3.dcm").read_bytes()).hexdigest()
    frames = [found[f"dicom/glioma/series3.dcm#frame={n}"] for n in (1, 2, 3)]
    assert [f.sha256 for f in frames] == [scan_sha256(file_sha, n) for n in (1, 2, 3)]
    assert len({f.sha256 for f in frames} | {file_sha}) == 4  # each frame is its own cached result
    info = frames[0].dicom
    assert (info.modality, info.series_description, info.study_instance_uid, info.frames) == \
        ("MR", "T2 multi-frame", STUDY, 3)
    assert found["dicom/meningioma/IM000002"].dicom.sop_instance_uid  # no extension: found by its preamble
    assert found["png/glioma/Tr-gl_0553.png"].dicom is None
    assert [s.relpath for s in listing.scans] == sorted(s.relpath for s in listing.scans)


@pytest.fixture
def fake_model(tmp_path) -> Path:
    """A model file with a valid card: enough to record jobs without loading TensorFlow."""
    model = tmp_path / "fake.keras"
    model.write_bytes(b"not a real model")
    card = {"classes": CLASSES, "input_size": 64, "preprocessing": PARAMS, "gradcam_layer": "x",
            "sha256": hashlib.sha256(model.read_bytes()).hexdigest()}
    model.with_suffix(".json").write_text(json.dumps(card))
    return model


def test_a_labels_file_may_name_dicom_objects_by_sop_instance_uid(tmp_path, fake_model):
    from sqlalchemy import select

    from db.models import Job, Scan
    from db.session import session_scope, upgrade
    from jobs.submission import create_job

    folder, _ = dicom_folder(tmp_path / "in")
    from pydicom import dcmread

    multi_uid = dcmread(folder / "dicom/glioma/series3.dcm", stop_before_pixels=True).SOPInstanceUID
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,sop_instance_uid,label\n,{multi_uid},meningioma\ndicom/notumor/no_0932.dcm,,pituitary\n")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with session_scope(url) as session:
        job = create_job(session, folder, fake_model, 8, labels_csv=labels)
        session.flush()
        rows = {s.path: s for s in session.scalars(select(Scan).where(Scan.job_id == job.id))}
        skipped = session.get(Job, job.id).skipped

    assert skipped == 1
    assert [rows[f"dicom/glioma/series3.dcm#frame={n}"].true_label for n in (1, 2, 3)] == ["meningioma"] * 3
    assert rows["dicom/notumor/no_0932.dcm"].true_label == "pituitary"
    assert rows["dicom/glioma/gl_0207.dcm"].true_label is None  # a labels file replaces folder names
    frame = rows["dicom/glioma/series3.dcm#frame=2"]
    assert (frame.sop_instance_uid, frame.modality, frame.series_description) == (multi_uid, "MR", "T2 multi-frame")

    labels.write_text("sop_instance_uid,label\n1.2.3.999,glioma\n")
    with pytest.raises(LabelError, match=f"1 path\\(s\\) are not scans of .*'{UID_KEY}1.2.3.999'"):
        with session_scope(url) as session:
            create_job(session, folder, fake_model, 8, labels_csv=labels)


def test_migrations_match_the_models_and_downgrade(tmp_path):
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.models import Base
    from db.session import alembic_config, get_engine, upgrade

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    with get_engine(url).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    for revision in ("0002", "0001"):
        command.downgrade(alembic_config(url), revision)
    command.upgrade(alembic_config(url), "head")


@pytest.mark.slow
def test_dicom_scans_classify_like_the_same_scans_as_png(tmp_path, tiny_model, env_for):
    from click.testing import CliRunner
    from sqlalchemy import select

    from cli import cli
    from db.models import Result, Scan
    from db.session import session_scope
    from jobs.lifecycle import new_job, run_job
    from jobs.report import format_table, job_report

    settings, _ = env_for(tiny_model)
    folder, twins = dicom_folder(tmp_path / "in")
    job_id = new_job(settings, folder)
    progress = run_job(settings, job_id, workers=1)
    with session_scope(settings.database_url) as session:
        rows = {scan.path: (scan, result) for scan, result in session.execute(
            select(Scan, Result).join(Result, Scan.result_id == Result.id).where(Scan.job_id == job_id))}
        report = job_report(session, job_id)

    assert (progress.done, progress.failed) == (2 * len(twins), 0)
    exact_cases = {f"dicom/{relpath}": exact for _, _, relpath, exact in CASES.values()}
    for dcm, twin in twins.items():
        exact = exact_cases.get(dcm, True)  # the multi-frame object is windowed exactly
        (scan, got), (_, want) = rows[dcm], rows[twin]
        np.testing.assert_allclose(got.probabilities, want.probabilities, atol=PROB_EXACT if exact else PROB_TOL)
        # The one-epoch model is unsure: a class can only be required equal where the margin exceeds the tolerance.
        if exact or max(want.probabilities) - sorted(want.probabilities)[-2] > 2 * PROB_TOL:
            assert got.predicted_label == want.predicted_label, dcm
        assert scan.true_label == rows[twin][0].true_label  # class folders label DICOM scans too
        assert got.geometry == want.geometry
    assert report["modalities"] == {"MR": len(twins)} and report["skipped"] == 1
    assert f"DICOM scans by modality: MR {len(twins)}; 1 object(s) without pixel data skipped" in format_table(report)

    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["export", str(job_id), "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with open(out / "results.csv", newline="") as fh:
        exported = {r["path"]: r for r in csv.DictReader(fh)}
    assert list(next(iter(exported.values())))[-7:] == ["model_sha256", "served_in", "study_instance_uid", "series_instance_uid",
                                                         "sop_instance_uid", "modality", "series_description"]
    frame2 = exported["dicom/glioma/series3.dcm#frame=2"]
    assert (frame2["study_instance_uid"], frame2["modality"], frame2["series_description"]) == \
        (STUDY, "MR", "T2 multi-frame")
    assert exported["png/glioma/Tr-gl_0553.png"]["modality"] == ""
    with Image.open(out / "heatmaps" / "dicom/glioma/series3.dcm#frame=2.png") as hm:
        assert hm.size == (512, 512)


DICOM_REASONS = ("corrupt DICOM", "DICOM ", "decompression bomb: ", "not an image: ")


def _fuzz_seeds() -> list[bytes]:
    x = pixels("Tr-no_1379")  # small: 173 x 201
    return [dicom(x), windowed12(x), windowed12(np.stack([x, x[::-1]]), compress=RLELossless),
            transcoded(windowed12(x), "JPEGLosslessProcess14_1"), transcoded(dicom(x), "JPEGLSLossless"),
            dicom(255 - x, photometric="MONOCHROME1"), dicom(None, sop_class=BasicTextSRStorage, Modality="SR")]


@settings(max_examples=150, deadline=None)
@given(seed=st.sampled_from(range(7)), edits=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)),
                                                      max_size=8),
       cut=st.one_of(st.none(), st.integers(132, 1 << 20)), frame=st.sampled_from([None, 1, 2]))
def test_mutated_dicom_files_decode_sanely_or_fail_with_a_scan_error(seed, edits, cut, frame):
    data = bytearray(FUZZ_SEEDS[seed])
    for at, value in edits:
        data[132 + at % (len(data) - 132)] = value  # past the magic: these stay DICOM files
    data = bytes(data[:cut] if cut else data)
    try:
        gray = decode(data, frame=frame)
    except ScanError as exc:
        assert str(exc).startswith(DICOM_REASONS), str(exc)
    else:
        assert gray.ndim == 2 and gray.dtype == np.float32
        assert np.isfinite(gray).all() and gray.min() >= 0 and gray.max() <= 1
    try:
        describe(io.BytesIO(data))
    except ScanError as exc:
        assert str(exc).startswith("corrupt DICOM"), str(exc)


FUZZ_SEEDS = _fuzz_seeds()
