"""evaluate_transfer / `attnpatch evaluate`: one patch on several victims, the same draws for all."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import attnpatch as ap
from attnpatch.cli import main
from attnpatch.data import ShapesConfig, shapes_dataset, write_image_folder
from attnpatch.errors import ConfigError, DataError, InputError, ModelError
from attnpatch.models import load_classifier
from attnpatch.training import TransferTable, evaluate_transfer
from attnpatch.training.config import TrainConfig, config_to_dict
from attnpatch.training.transfer_table import COLUMNS

TINIES = ["tiny", "tiny-b", "tiny-c"]


@pytest.fixture(scope="module")
def held():
    """40 held-out shapes (seed 1: not the classifiers' training images)."""
    return shapes_dataset(ShapesConfig(seed=1, train_per_class=0, heldout_per_class=8), "heldout")


def make_patch(seed=3):
    g = torch.Generator().manual_seed(seed)
    return ap.AdversarialPatch(12, init="random", scale=(0.35, 0.5), eot=ap.EOT(), generator=g)


class Foreign(nn.Module):
    """A seeded random 7-way classifier: its classes are not the shapes'."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, 2), nn.ReLU(), nn.Flatten(), nn.Linear(196, 7))

    def forward(self, x):
        return self.net(F.interpolate(x, size=(16, 16)))


class Permuted(nn.Module):
    """tiny's logits in another order, behind an extra class that never wins."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny
        self.order = torch.arange(len(tiny.classes)).flip(0)

    def forward(self, x):
        logits = self.tiny(x)[:, self.order]
        return torch.cat([torch.full_like(logits[:, :1], -1e4), logits], 1)


def fields(r):
    return r.clean_accuracy, r.success_rate, r.control_success_rate, r.eligible


def test_every_row_equals_evaluate_patch_on_its_victim(held):
    """The same draws for every victim: each tiny row is evaluate_patch on that classifier with
    the same seed, untargeted and targeted; only the surrogate's row is marked."""
    patch = make_patch()
    state = torch.get_rng_state()
    table = evaluate_transfer(
        patch, TINIES, held.images, held.labels, surrogate="tiny", class_names=held.classes,
        seed=3, eot_samples=3, batch_size=16,
    )  # fmt: skip
    assert torch.equal(torch.get_rng_state(), state)  # torch's global RNG is not touched
    assert [r.victim for r in table.rows] == TINIES
    assert [r.surrogate for r in table.rows] == [True, False, False]
    for name in TINIES:
        ref = ap.evaluate_patch(
            load_classifier(name), patch, held.images, held.labels, seed=3, eot_samples=3,
            batch_size=16,
        )  # fmt: skip
        row = table.row(name)
        assert fields(row) == (ref.clean_accuracy, ref.success_rate, ref.control_success_rate,
                               ref.eligible), name  # fmt: skip
        assert row.label_rule == "label" and row.images == 40 and row.eot_samples == 3
    star = held.classes.index("star")
    targeted = evaluate_transfer(
        patch, ["tiny", "tiny-c"], held.images, held.labels, surrogate="tiny", target="star",
        class_names=held.classes, seed=4,
    )  # fmt: skip
    for name in ("tiny", "tiny-c"):
        ref = ap.evaluate_patch(
            load_classifier(name), patch, held.images, held.labels, target=star, seed=4
        )
        assert fields(targeted.row(name)) == (
            ref.clean_accuracy, ref.success_rate, ref.control_success_rate, ref.eligible
        )  # fmt: skip
        assert (
            targeted.row(name).target == "star"
            and "'star'" in targeted.row(name).success_definition
        )


def test_label_rules_against_an_independent_loop(held):
    """A foreign 7-way victim (scored by 'changed', at its own input size 16) and tiny behind
    permuted, renamed outputs (scored by label through the names), against a plain loop over
    the same generator: the control is drawn first, then one placement per image and draw."""
    tiny = load_classifier("tiny")
    foreign = load_classifier(Foreign(), input_size=16)
    names = ["extra", *reversed(held.classes)]
    permuted = load_classifier(Permuted(tiny), classes=names)
    patch, seed, eot, bs = make_patch(7), 11, 2, 16
    table = evaluate_transfer(
        patch, ["tiny", foreign, permuted], held.images, held.labels, surrogate="tiny",
        class_names=held.classes, seed=seed, eot_samples=eot, batch_size=bs,
    )  # fmt: skip
    f_row, p_row = table.rows[1], table.rows[2]
    assert f_row.victim == "Foreign" and f_row.label_rule == "changed"
    assert f_row.clean_accuracy is None and f_row.eligible == 40 and f_row.num_classes == 7
    assert f_row.input_size == "16x16" and "clean prediction" in f_row.success_definition
    assert p_row.label_rule == "label" and fields(p_row) == fields(table.rows[0])

    def small(x):
        return F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)

    g = torch.Generator().manual_seed(seed)
    control = patch.random_like(generator=g)
    with torch.no_grad():
        clean = foreign.model(small(held.images)).argmax(1)
        hits = [0, 0]
        for _ in range(eot):
            for i in range(0, 40, bs):
                x = held.images[i : i + bs]
                params = patch.sample_params(len(x), (32, 32), eot=True, generator=g)
                for k, p in enumerate((patch, control)):
                    pred = foreign.model(small(p(x, params=params)[0])).argmax(1)
                    hits[k] += int((pred != clean[i : i + bs]).sum())
    assert (f_row.success_rate, f_row.control_success_rate) == (hits[0] / 80, hits[1] / 80)
    assert 0 < f_row.success_rate < 1
    # a control identical to the patch scores exactly the patch's rate on every row
    twin = make_patch(7)
    same = evaluate_transfer(
        patch, ["tiny", foreign], held.images, held.labels, class_names=held.classes,
        control=twin, seed=2,
    )  # fmt: skip
    assert all(r.success_rate == r.control_success_rate for r in same.rows)
    assert same.surrogate is None and not any(r.surrogate for r in same.rows)


def test_files_round_trip_and_describe_themselves(held, tmp_path):
    foreign = load_classifier(Foreign(), input_size=16)
    table = evaluate_transfer(
        make_patch(), ["tiny", foreign], held.images, held.labels, surrogate="tiny",
        class_names=held.classes, eot_samples=1,
    )  # fmt: skip
    paths = table.write(tmp_path / "out")
    assert [p.name for p in paths] == ["transfer.csv", "transfer.json", "transfer.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)
    with open(paths[0], newline="") as f:
        reader = csv.DictReader(f)
        raw = list(reader)
    assert reader.fieldnames == list(COLUMNS) and len(raw) == 2
    assert raw[1]["clean_accuracy"] == "" and raw[1]["label_rule"] == "changed"
    assert float(raw[0]["success_rate"]) == table.rows[0].success_rate
    data = json.loads(paths[1].read_text())
    assert set(data["columns"]) == set(COLUMNS) == set(data["rows"][0])
    assert data["surrogate"] == "tiny" and data["classes"] == held.classes
    assert data["rows"][1]["clean_accuracy"] is None
    back = TransferTable.from_json(paths[1])
    assert back.rows == table.rows and back.classes == held.classes and back.surrogate == "tiny"
    from_csv = TransferTable.from_csv(paths[0])
    assert from_csv.rows == table.rows and from_csv.surrogate == "tiny"
    with Image.open(paths[2]) as im:
        assert im.format == "PNG" and im.width > 200
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a transfer.json"):
        TransferTable.from_json(tmp_path / "bad.json")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="not a transfer.csv"):
        TransferTable.from_csv(tmp_path / "bad.csv")


def test_text_table_and_figure(held):
    table = evaluate_transfer(
        make_patch(), TINIES, held.images, held.labels, surrogate="tiny-b",
        class_names=held.classes, eot_samples=1,
    )  # fmt: skip
    lines = str(table).splitlines()
    body = lines[2:5]
    assert [line.split()[:2] for line in body] == [
        ["tiny", "transfer"], ["tiny-b", "surrogate"], ["tiny-c", "transfer"]
    ]  # fmt: skip
    for line, r in zip(body, table.rows):
        assert f"{r.success_rate:.1%}" in line and f"{r.control_success_rate:.1%}" in line
    assert len({len(line) for line in lines[1:5]}) == 1  # aligned columns
    fig = table.figure()
    ax = fig.axes[0]
    bars = [c for c in ax.containers if len(c) == 3]
    assert len(bars) == 2  # patch and control: one bar of each per victim
    heights = [[b.get_height() for b in c] for c in bars]
    assert heights[0] == pytest.approx([100 * r.success_rate for r in table.rows])
    assert heights[1] == pytest.approx([100 * r.control_success_rate for r in table.rows])
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) == 3 and "surrogate" in ticks[1] and "surrogate" not in ticks[0]


def test_bad_inputs(held):
    x, y, names = held.images, held.labels, held.classes
    patch = make_patch()
    with pytest.raises(ConfigError, match="non-empty list"):
        evaluate_transfer(patch, "tiny", x, y, class_names=names)
    with pytest.raises(ConfigError, match="twice"):
        evaluate_transfer(patch, ["tiny", "tiny"], x, y, class_names=names)
    with pytest.raises(ModelError, match="unknown classifier 'tiny-z'"):
        evaluate_transfer(patch, ["tiny", "tiny-z"], x, y, class_names=names)
    with pytest.raises(InputError, match="N >= 1"):
        evaluate_transfer(patch, ["tiny"], x[:0], y[:0], class_names=names)
    with pytest.raises(InputError, match="eot_samples must be >= 1"):
        evaluate_transfer(patch, ["tiny"], x, y, class_names=names, eot_samples=0)
    with pytest.raises(InputError, match="target 'dog' is not among"):
        evaluate_transfer(patch, ["tiny"], x, y, class_names=names, target="dog")
    foreign = load_classifier(Foreign())
    with pytest.raises(ConfigError, match="targeted patch cannot be scored"):
        evaluate_transfer(patch, ["tiny", foreign], x, y, class_names=names, target="star")
    with pytest.raises(DataError, match="not the surrogate 'Foreign'"):
        evaluate_transfer(patch, ["tiny", foreign], x, y, class_names=names, surrogate="Foreign")


# --------------------------------------------------------------------------- the CLI

FAST = [
    "--quiet",
    "--train.iterations", "4",
    "--train.accumulate", "2",
    "--attention.num_steps", "1",
    "--attention.num_inference_steps", "4",
    "--data.synthetic_per_class", "2",
    "--data.synthetic_eval_per_class", "4",
    "--eval.eot_samples", "2",
]  # fmt: skip


@pytest.mark.slow
def test_cli_train_then_evaluate_on_the_tiny_default(tmp_path, capsys):
    """`attnpatch evaluate` on a short run: the surrogate's row is the run's summary.json."""
    run = tmp_path / "run"
    assert main(["train", "--train.out_dir", str(run), *FAST]) == 0
    capsys.readouterr()
    out = tmp_path / "eval"
    argv = ["evaluate", "--patch", str(run / "patch.safetensors"), "--out", str(out)]
    assert main([*argv, "--classifiers", ",".join(TINIES)]) == 0
    printed = capsys.readouterr().out
    for name in ("transfer.csv", "transfer.json", "transfer.png"):
        assert (out / name).is_file() and str(out / name) in printed
    table = TransferTable.from_json(out / "transfer.json")
    assert [r.victim for r in table.rows] == TINIES and table.surrogate == "tiny"
    assert all(r.victim in printed for r in table.rows) and "surrogate" in printed
    summary = json.loads((run / "summary.json").read_text())
    assert fields(table.row("tiny")) == (
        summary["clean_accuracy"], summary["success_rate"], summary["control_success_rate"],
        summary["eligible"],
    )  # fmt: skip
    assert table.rows[0].images == summary["images"] == 20 and table.rows[0].eot_samples == 2
    assert table.meta["run_config"] is True and table.meta["data"] == "synthetic"
    # flags override the run's settings
    assert main([*argv, "--classifiers", "tiny-c,tiny", "--eot-samples", "1", "--seed", "5",
                 "--surrogate", "tiny-c"]) == 0  # fmt: skip
    again = TransferTable.from_json(out / "transfer.json")
    assert [r.victim for r in again.rows] == ["tiny-c", "tiny"] and again.surrogate == "tiny-c"
    assert again.rows[0].surrogate and again.rows[0].eot_samples == 1 and again.rows[0].seed == 5


def _patch_file(path, config: TrainConfig | None = None):
    extra = None if config is None else {"config": json.dumps(config_to_dict(config))}
    return make_patch().save(path, extra=extra)


def test_cli_bad_inputs_fail_before_any_output(tmp_path, capsys, held):
    out = tmp_path / "eval"
    good = _patch_file(tmp_path / "run_patch.safetensors", TrainConfig())

    def fails(*args, match):
        capsys.readouterr()
        assert main(["evaluate", "--out", str(out), *args]) == 2
        err = capsys.readouterr().err
        assert match in err, err
        assert not (out / "transfer.csv").exists()

    fails("--patch", str(good), "--classifiers", "tiny,tiny-z", match="unknown classifier 'tiny-z'")
    fails("--patch", str(good), "--classifiers", "tiny,", match="names separated by commas")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a patch")
    fails("--patch", str(tmp_path / "garbage.safetensors"), "--classifiers", "tiny",
          match="not a readable safetensors file")  # fmt: skip
    fails("--patch", str(tmp_path / "missing.safetensors"), "--classifiers", "tiny",
          match="no patch file")  # fmt: skip
    two = ShapesConfig(classes=("circle", "square"), train_per_class=0, heldout_per_class=2)
    folder = write_image_folder(shapes_dataset(two, "heldout"), tmp_path / "two")
    fails("--patch", str(good), "--classifiers", "tiny", "--data", str(folder),
          match="do not match the shapes")  # fmt: skip
    (tmp_path / "file").write_text("x")
    assert main(["evaluate", "--patch", str(good), "--classifiers", "tiny",
                 "--out", str(tmp_path / "file" / "sub")]) == 2  # fmt: skip
    assert "cannot create --out" in capsys.readouterr().err
    # a patch without a run config: synthetic data, no surrogate row
    plain = _patch_file(tmp_path / "plain.safetensors")
    assert main(["evaluate", "--patch", str(plain), "--classifiers", "tiny,tiny-b"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    assert [r.split()[:2] for r in rows] == [["tiny", "transfer"], ["tiny-b", "transfer"]]
