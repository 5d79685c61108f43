"""Labels are matched to the classifier's outputs by class name, never by sorted position;
evaluation refuses labels the classifier cannot output (docs/training.md, "Bad inputs")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnpatch import AdversarialPatch
from attnpatch.cli import main
from attnpatch.data import ShapesConfig, TensorImageDataset, shapes_dataset, write_image_folder
from attnpatch.errors import ConfigError, DataError, InputError
from attnpatch.training import evaluate_patch


class Named(nn.Module):
    """Zero logits for classes it names (only the names matter here)."""

    def __init__(self, classes):
        super().__init__()
        self.classes = list(classes)

    def forward(self, x):
        return torch.zeros(x.shape[0], len(self.classes))


def test_classes_are_matched_by_name_not_position():
    from attnpatch.training.labels import class_indices

    clf = Named(["dog", "cat", "bird"])
    assert class_indices(clf, ["bird", "cat", "dog"], 8).tolist() == [2, 1, 0]  # sorted folders
    assert class_indices(clf, ["cat", "kitty"], 8, {"kitty": "bird"}).tolist() == [1, 2]


@pytest.mark.parametrize(
    "classes, class_map, error, words",
    [
        (["Dog", "cat", "bird"], {}, DataError, ["'Dog'", "closest", "'dog'", "class_map"]),
        (["a", "b", "c"], {}, DataError, ["['a', 'b', 'c']", "by name, not by position"]),
        (["dog", "cat"], {"cow": "bird"}, ConfigError, ["class_map", "'cow'"]),
        (["dog", "cat"], {"cat": "dog"}, ConfigError, ["'dog'", "class_map"]),
    ],
)
def test_unknown_names_are_errors(raises, classes, class_map, error, words):
    from attnpatch.training.labels import class_indices

    with raises(error, *words):
        class_indices(Named(["dog", "cat", "bird"]), classes, 8, class_map)


def test_a_classifier_without_names_is_matched_by_count(raises):
    from attnpatch.training.labels import class_indices

    plain = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))
    assert class_indices(plain, ["x", "y", "z"], 8).tolist() == [0, 1, 2]
    with raises(DataError, "3 outputs", "2 classes"):
        class_indices(plain, ["x", "y"], 8)
    with raises(ConfigError, "class_map", ".classes"):
        class_indices(plain, ["x", "y", "z"], 8, {"x": "y"})


def _renamed(tmp_path, names):
    ds = shapes_dataset(ShapesConfig(train_per_class=2, heldout_per_class=1))
    renamed = TensorImageDataset(ds.images, ds.labels, names)
    return write_image_folder(renamed, tmp_path / "data")


FAST = ["--train.iterations", "2", "--train.accumulate", "1", "--eval.eot_samples", "1",
        "--eval.examples", "1", "--quiet"]  # fmt: skip


def test_folders_named_otherwise_are_an_error_or_mapped(tmp_path, capsys):
    # was: mapped by sorted position when the counts agree (clean accuracy 20 %, no warning)
    names = ["c1", "c2", "c3", "c4", "c5"]  # the shapes, under other names, same count
    root = _renamed(tmp_path, names)
    argv = ["train", "--data.train", str(root), "--data.eval", str(root), *FAST]
    assert main([*argv, "--train.out_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "['c1', 'c2', 'c3', 'c4', 'c5']" in err and "--data.class_map" in err
    shapes = ShapesConfig().classes
    mapping = [f"{n}={s}" for n, s in zip(names, shapes)]
    assert main([*argv, "--train.out_dir", str(tmp_path / "b"), "--data.class_map", *mapping]) == 0


def test_evaluate_refuses_labels_outside_the_outputs(raises):
    # was: a rate (labels the classifier can never output count as misclassified: "success")
    clf = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    patch = AdversarialPatch(4, scale=0.3)
    images = torch.rand(4, 3, 8, 8)
    with raises(InputError, "labels lie in [0, 5]", "3 outputs"):
        evaluate_patch(clf, patch, images, torch.tensor([0, 1, 2, 5]), eot_samples=1)
    with raises(InputError, "target 7", "3 outputs"):
        evaluate_patch(clf, patch, images, torch.tensor([0, 1, 2, 0]), target=7, eot_samples=1)
    with raises(InputError, "labels must be (N,)"):
        evaluate_patch(clf, patch, images, torch.tensor([0.0, 1, 2, 0]), eot_samples=1)
    result = evaluate_patch(clf, patch, images, torch.tensor([0, 1, 2, 0]), eot_samples=1)
    assert result.images == 4
