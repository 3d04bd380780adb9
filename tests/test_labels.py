"""True labels: the nearest class-named folder (with aliases), or a labels CSV."""
import pytest

from jobs.labels import LabelError, canonical, label_from_path, read_labels_csv


@pytest.mark.parametrize("name,cls", [
    ("glioma", "glioma"), ("Glioma_Tumor", "glioma"), ("meningioma_tumor", "meningioma"),
    ("no_tumor", "notumor"), ("No Tumor", "notumor"), ("notumour", "notumor"), ("NOTUMOR", "notumor"),
    ("pituitary_tumor", "pituitary"), ("pituitary-tumour", "pituitary"),
])
def test_folder_names_and_aliases_map_to_classes(name, cls):
    assert canonical(name) == cls


def test_the_nearest_enclosing_class_folder_wins():
    assert label_from_path("glioma/second-opinion/meningioma/x.jpg") == "meningioma"
    assert label_from_path("glioma/2026/x.jpg") == "glioma"
    assert label_from_path("unsorted/x.jpg") is None
    assert label_from_path("glioma.jpg") is None


def test_a_labels_csv_maps_paths_to_classes(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label\na/x.jpg,Glioma_Tumor\nb/y.png,no tumor\n")

    assert read_labels_csv(f) == {"a/x.jpg": "glioma", "b/y.png": "notumor"}


def test_an_unknown_label_names_its_row(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label\na/x.jpg,glioma\nb/y.png,astrocytoma\n")

    with pytest.raises(LabelError) as err:
        read_labels_csv(f)
    assert str(err.value) == (f"{f}:3: unknown label 'astrocytoma'; expected one of "
                              "glioma, meningioma, notumor, pituitary")
