"""Cells: one (variant, category, seed) of a spec, its folder, and whether its finished work can be reused.

Its own module because resuming is the benchmark's contract: this is where "done", "trained" (a complete run of
the same config, only to be evaluated) and "changed" (finished with another config) are decided, by reading
cell.json and the run's meta.json, without training or evaluating anything.

Each cell trains into OUT/cells/<variant>/<category>/seed<k>/run and is finished when its cell.json exists.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillad.benchmark.spec import BenchmarkSpec, resolve_variant
from distillad.engine.checkpoint import META_FILE, read_meta, with_legacy_defaults
from distillad.engine.config import TrainConfig
from distillad.errors import RunError
from distillad.methods.base import MAP_OPTIONS

CELL_FILE = "cell.json"
TEST_FILE = "test.json"
CELLS_FOLDER = "cells"
# Settings that may differ between the run that made a cell and this one without changing its results: the device,
# and the threshold settings, which change neither the trained model nor any metric in results.csv (test.json's
# threshold report names the rule its run was calibrated with).
_IGNORED_CONFIG_KEYS = ("device", "threshold_rule", "false_alarm_rate", "threshold_k")


@dataclass
class Cell:
    variant: str
    category: str
    seed: int
    data_dir: Path
    config: TrainConfig
    folder: Path
    runs_of: Path | None = None                 # an evaluation-only cell: the cell folder whose run it evaluates
    map_options: dict[str, Any] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return (self.runs_of or self.folder) / "run"

    @property
    def cell_file(self) -> Path:
        return self.folder / CELL_FILE

    @property
    def label(self) -> str:
        return f"{self.variant} / {self.category} / seed {self.seed}"


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _IGNORED_CONFIG_KEYS}


def config_difference(saved: dict[str, Any], wanted: TrainConfig) -> list[str]:
    """The settings (other than the device and the threshold's) in which a saved config differs from the wanted one,
    sorted. A saved config lacking an option added since is compared with the value its run was built with."""
    saved, current = _comparable(with_legacy_defaults(saved)), _comparable(wanted.to_dict())
    return sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))


def plan_cells(spec: BenchmarkSpec, overrides: dict[str, Any] | None = None) -> list[Cell]:
    """Every (variant, category, seed) with its resolved config; `overrides` (flags) win over every variant."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cells: list[Cell] = []
    for variant, settings in spec.variants.items():
        for category, data_dir in spec.categories.items():
            for seed in spec.seeds:
                config = resolve_variant(variant, settings, spec.source, {**overrides, "seed": seed})
                folder = spec.out / CELLS_FOLDER / variant / category / f"seed{seed}"
                other = spec.evaluated_runs_of.get(variant)
                if other is None:
                    cells.append(Cell(variant, category, seed, data_dir, config, folder))
                    continue
                map_options = {k: v for k, v in config.options.items() if k in MAP_OPTIONS}
                cells.append(Cell(variant, category, seed, data_dir, config, folder,
                                  runs_of=spec.out / CELLS_FOLDER / other / category / f"seed{seed}",
                                  map_options=map_options))
    return cells


def read_cell(cell: Cell) -> dict[str, Any] | None:
    """The finished cell's record, or None when it has none (or an unreadable one, which is then redone)."""
    try:
        return json.loads(cell.cell_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def finished_record(cell: Cell) -> dict[str, Any] | None:
    """The cell's record when it is finished with the cell's current config; else None."""
    record = read_cell(cell)
    if record is None or config_difference(record.get("config", {}), cell.config):
        return None
    return record


def cell_status(cell: Cell) -> str:
    """done | changed (finished with another config) | trained (run complete, not evaluated) | partial | pending."""
    record = read_cell(cell)
    if record is not None:
        return "changed" if config_difference(record.get("config", {}), cell.config) else "done"
    if reusable_run(cell):
        return "trained"
    return "partial" if cell.folder.exists() else "pending"


def _trained_config(cell: Cell) -> TrainConfig:
    """The config the cell's run must have been trained with (an evaluation-only cell: without its map options)."""
    if cell.runs_of is None:
        return cell.config
    return dataclasses.replace(cell.config, options={k: v for k, v in cell.config.options.items()
                                                     if k not in cell.map_options})


def run_differences(cell: Cell) -> list[str] | None:
    """None when the cell's run folder is not a finished run; else how its config differs from the wanted one."""
    if not (cell.run_dir / META_FILE).is_file():
        return None
    try:
        meta = read_meta(cell.run_dir)
    except RunError:
        return None
    saved = dict(meta.get("config", {}))
    if cell.runs_of is not None:     # map options may have been saved explicitly at their default values
        saved["options"] = {k: v for k, v in saved.get("options", {}).items() if k not in cell.map_options}
    return config_difference(saved, _trained_config(cell))


def reusable_run(cell: Cell) -> bool:
    """Whether the cell's run folder holds a finished run of the config the cell needs (then it is only evaluated)."""
    return run_differences(cell) == []
