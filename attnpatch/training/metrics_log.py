"""``metrics.jsonl`` and the progress bar: one line per iteration, every loss term separately.

In a data-parallel run the lines wait until the next optimizer step (or checkpoint, or the end)
and are then written by process 0 as global means, with one collective for all of them, so the
K - 1 iterations between steps communicate nothing. A tracker (``train.log``:
:class:`~attnpatch.training.tracking.RunTracking`) gets the same records from the same place, so
TensorBoard or W&B and ``metrics.jsonl`` never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .distributed import Dist, global_means
from .terms import terms

__all__ = ["MetricsLog"]


class MetricsLog:
    """Pending metric records of ``dist``'s process; :meth:`flush` writes them.

    Args:
        out_dir: the run folder (``None``: write no file).
        dist: the process; only process 0 writes and shows the bar.
        total, initial: the bar's range (iterations) and where it starts.
        progress: show a tqdm bar.
        tracker: also gets each flushed batch of records (``tracker.log_records(records)``),
            on process 0; ``None``: none.
    """

    def __init__(
        self,
        out_dir: Path | None,
        dist: Dist,
        total: int,
        initial: int,
        progress: bool,
        tracker: Any = None,
    ):
        self.out_dir, self.dist = out_dir, dist
        self.tracker = tracker if dist.is_main else None
        self.pending: list[dict[str, Any]] = []
        self.bar = None
        if progress and dist.is_main:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="patch", unit="it", leave=True)

    def add(self, record: dict[str, Any]) -> None:
        self.pending.append(record)

    def flush(self) -> None:
        """Write the pending records: the global means over processes (one sum for all), to
        ``metrics.jsonl`` and the tracker."""
        records, self.pending = self.pending, []
        if not records:
            return
        if self.dist.world > 1:
            records = global_means(records, self.dist)
        if self.out_dir is not None and self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
        if self.tracker is not None:
            self.tracker.log_records(records)
        if self.bar is not None:
            self.bar.update(len(records))
            self.bar.set_postfix_str(short(records[-1]))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def short(record: dict[str, Any]) -> str:
    """The losses, each separately, for the progress bar."""
    parts = [
        f"{t.label}={record[t.name]:.3g}"
        for t in terms()
        if t.label and record.get(t.name) is not None
    ]
    return " ".join(parts + [f"success={record['success']:.2f}"])
