"""Scalars of a run: TensorBoard when it is installed, a CSV file otherwise (or as well).

The CSV is long-form (step, name, value) so that losses switching on mid-run (the adversarial
warm-up) need no change of columns; it loads with one line of pandas or a spreadsheet pivot.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from .checkpoint import write_reported

__all__ = ["Logbook"]


class Logbook:
    """The run's scalars; a write that fails (a full disk) is a WriteFailed naming the file."""

    def __init__(self, out_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.writer = None
        self._csv = None
        self._csv_path, self._tb_path = out_dir / "log.csv", out_dir / "tensorboard"
        if not enabled:
            return
        with write_reported(out_dir, "the training log"):
            out_dir.mkdir(parents=True, exist_ok=True)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            with write_reported(self._tb_path, "the training log"):
                self.writer = SummaryWriter(str(self._tb_path))
        with write_reported(self._csv_path, "the training log"):
            new = not self._csv_path.exists()
            self._csv = open(self._csv_path, "a", newline="", encoding="utf-8")  # noqa: SIM115 (closed in close())
            self._rows = csv.writer(self._csv)
            if new:
                self._rows.writerow(["step", "name", "value"])

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with write_reported(self._csv_path, "the training log"):
            self._rows.writerows([step, name, f"{value:.6g}"] for name, value in values.items())
            self._csv.flush()
        if self.writer is not None:
            with write_reported(self._tb_path, "the training log"):
                for name, value in values.items():
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._csv is not None:
            with write_reported(self._csv_path, "the training log"):
                self._csv.close()
        if self.writer is not None:
            with write_reported(self._tb_path, "the training log"):
                self.writer.close()
