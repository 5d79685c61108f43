"""The transfer table: one row per victim classifier, printed, saved as CSV / JSON, drawn.

:class:`TransferTable` (made by :func:`attnpatch.training.evaluate_transfer`) holds one
:class:`TransferRow` per victim; the columns and what they mean are :data:`COLUMNS`, and the
JSON carries them, so both files describe themselves. :meth:`TransferTable.from_json` /
:meth:`TransferTable.from_csv` read the files back.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._util import atomic_write
from ..errors import DataError, InputError

__all__ = ["TransferTable", "TransferRow", "COLUMNS"]

FORMAT = "attnpatch-transfer"

#: Every column of the table (CSV header order) and what it means (written into the JSON).
COLUMNS: dict[str, str] = {
    "victim": "the classifier scored (a registered name, torchvision:/timm: spec, or class)",
    "surrogate": "true for the classifier the patch was trained against (the white-box row)",
    "label_rule": "'label': scored against the data labels; 'changed': scored against the "
    "victim's own clean prediction (its classes are not the data's)",
    "success_definition": "what counts as a success on this row, and which images count",
    "clean_accuracy": "fraction of images the victim classifies right without a patch (empty "
    "under 'changed')",
    "success_rate": "fraction of eligible (image, EOT draw) pairs on which the patch succeeds",
    "control_success_rate": "the same for a uniform-noise patch of the same shape, on the same "
    "placements and EOT draws",
    "eligible": "images counted (each with eot_samples draws)",
    "images": "images evaluated",
    "eot_samples": "EOT draws per image",
    "num_classes": "the victim's number of outputs",
    "input_size": "HxW the victim classifies at (patched images are resized to it)",
    "target": "the target class name for a targeted attack, empty if untargeted",
    "seed": "seed of the placement / EOT / control generator",
}


@dataclass
class TransferRow:
    """One victim's numbers (rates in [0, 1]); the fields are :data:`COLUMNS`."""

    victim: str
    surrogate: bool
    label_rule: str
    success_definition: str
    clean_accuracy: float | None
    success_rate: float
    control_success_rate: float
    eligible: int
    images: int
    eot_samples: int
    num_classes: int
    input_size: str
    target: str | None
    seed: int


@dataclass
class TransferTable:
    """The transfer evaluation: one :class:`TransferRow` per victim, in the order given."""

    rows: list[TransferRow]
    surrogate: str | None = None  #: the surrogate's name (it may not be among the victims)
    classes: list[str] | None = None  #: the data's class names, when known
    meta: dict[str, Any] = field(default_factory=dict)  #: where it came from (patch, data)

    def row(self, victim: str) -> TransferRow:
        for r in self.rows:
            if r.victim == victim:
                return r
        raise InputError(f"no row for {victim!r}; victims: {[r.victim for r in self.rows]}")

    def __str__(self) -> str:
        r0 = self.rows[0]
        kind = f"targeted -> {r0.target!r}" if r0.target else "untargeted"
        head = ["victim", "role", "rule", "clean acc", "patch", "control", "eligible"]
        body = [
            [
                r.victim,
                "surrogate" if r.surrogate else "transfer",
                r.label_rule,
                "-" if r.clean_accuracy is None else f"{r.clean_accuracy:.1%}",
                f"{r.success_rate:.1%}",
                f"{r.control_success_rate:.1%}",
                str(r.eligible),
            ]
            for r in self.rows
        ]
        widths = [max(len(c) for c in col) for col in zip(head, *body)]

        def align(cells: list[str]) -> str:  # names left, numbers right
            return "  ".join(
                c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )

        text = [
            f"transfer ({kind}): {r0.images} images x {r0.eot_samples} EOT draws, seed {r0.seed},"
            f" the same placements for every victim and the random-noise control",
            *(align(cells) for cells in [head, *body]),
        ]
        for rule in dict.fromkeys(r.label_rule for r in self.rows):
            text.append(
                f"{rule}: " + next(r for r in self.rows if r.label_rule == rule).success_definition
            )
        if self.surrogate and all(not r.surrogate for r in self.rows):
            text.append(f"(the surrogate {self.surrogate!r} is not among the victims)")
        return "\n".join(text)

    # -- files --------------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> Path:
        """One row per victim under the :data:`COLUMNS` header (empty cell = none); atomic."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        writer.writeheader()
        for r in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in asdict(r).items()})
        with atomic_write(path) as tmp:
            tmp.write_text(buf.getvalue())
        return Path(path)

    def to_json(self, path: str | os.PathLike) -> Path:
        """The rows, the column descriptions, the surrogate, classes and ``meta``; atomic."""
        data = {
            "format": FORMAT,
            "version": 1,
            "columns": COLUMNS,
            "surrogate": self.surrogate,
            "classes": self.classes,
            "meta": self.meta,
            "rows": [asdict(r) for r in self.rows],
        }
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(data, indent=2))
        return Path(path)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> TransferTable:
        """Read a table written by :meth:`to_json`."""
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{str(path)!r} is not a transfer.json written by attnpatch")
        rows = [TransferRow(**r) for r in data["rows"]]
        return cls(rows, data.get("surrogate"), data.get("classes"), data.get("meta") or {})

    @classmethod
    def from_csv(cls, path: str | os.PathLike) -> TransferTable:
        """Read a table written by :meth:`to_csv` (``classes`` and ``meta`` are not in it)."""
        types = {f.name: f.type for f in fields(TransferRow)}
        rows = []
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                if set(raw) != set(COLUMNS):
                    raise DataError(f"{str(path)!r} is not a transfer.csv written by attnpatch")
                rows.append(TransferRow(**{k: _parse(v, types[k]) for k, v in raw.items()}))
        surrogate = next((r.victim for r in rows if r.surrogate), None)
        return cls(rows, surrogate)

    def figure(self):
        """Grouped bars, patch vs control per victim, the surrogate marked (a matplotlib
        ``Figure``: :func:`attnpatch.viz.transfer_bars`)."""
        from ..viz import transfer_bars

        names = [r.victim for r in self.rows]
        surrogate = self.surrogate if self.surrogate in names else None
        return transfer_bars(
            names,
            [r.success_rate for r in self.rows],
            [r.control_success_rate for r in self.rows],
            surrogate,
        )

    def write(self, out_dir: str | os.PathLike) -> list[Path]:
        """``transfer.csv``, ``transfer.json`` and ``transfer.png`` in ``out_dir`` (created)."""
        from ..viz import save

        out = Path(out_dir)
        paths = [self.to_csv(out / "transfer.csv"), self.to_json(out / "transfer.json")]
        save(self.figure(), out / "transfer.png")
        return [*paths, out / "transfer.png"]


def _parse(text: str, typ: str) -> Any:
    if text == "":
        return None
    if typ == "bool":
        return text == "True"
    if typ == "int":
        return int(text)
    if typ.startswith("float"):
        return float(text)
    return text
