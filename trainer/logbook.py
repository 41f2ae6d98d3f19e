"""Scalars of a run: TensorBoard when it is installed, a CSV file otherwise (or as well).

The CSV is long-form (step, name, value) so that losses switching on mid-run (the adversarial
warm-up) need no change of columns; it loads with one line of pandas or a spreadsheet pivot.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

__all__ = ["Logbook"]


class Logbook:
    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self._csv = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out_dir / "tensorboard"))
        new = not (out_dir / "log.csv").exists()
        self._csv = open(out_dir / "log.csv", "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
        self._rows = csv.writer(self._csv)
        if new:
            self._rows.writerow(["step", "name", "value"])

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for name, value in values.items():
            self._rows.writerow([step, name, f"{value:.6g}"])
            if self.writer is not None:
                self.writer.add_scalar(name, value, step)
        self._csv.flush()

    def close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self.writer is not None:
            self.writer.close()
