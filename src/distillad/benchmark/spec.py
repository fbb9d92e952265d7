"""The benchmark spec: a YAML file (or the equivalent flags) parsed and validated into a `BenchmarkSpec`.

Its own module so that a bad spec fails here, naming the file and the key, before any cell is planned or trained::

    out: benchmarks/runs/issue2            # cells, results.csv, results.md go here
    categories:                            # name -> MVTec-layout category folder (or a list of folders)
      bottle: ../shared/data/mvtec_ad/bottle
    seeds: [0, 1, 2]
    defaults: {image_size: 256}            # TrainConfig settings for every variant (optional)
    speed: true                            # or false, or {threads: 2, warmup: 5, repeats: 30}
    variants:                              # name -> TrainConfig settings, merged like a `train --config` file
      dskd: {method: dskd}
      dskd_se_only: {method: dskd, options: {students: encoder}}
      stfpm: {}                            # method defaults to the variant's name when that is a method
      dskd_max: {evaluate_run_of: dskd, options: {student_fusion: max}}   # no training: dskd's runs, another map

Relative paths (out, categories) are taken relative to the *current working directory*, like every other path
the CLI takes; the shipped specs in benchmarks/ are written to be run from the repository root.

A variant with `evaluate_run_of: OTHER` trains nothing: it evaluates OTHER's runs (an earlier variant of the
spec) with other map options (fusion rules, blur: MAP_OPTIONS), so map choices are compared on the same models.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillad.benchmark.measure import DEFAULT_REPEATS, DEFAULT_THREADS, DEFAULT_WARMUP
from distillad.engine.config import TrainConfig, load_yaml, resolve_config
from distillad.errors import ConfigError
from distillad.methods import METHODS
from distillad.methods.base import MAP_OPTIONS

SPEC_KEYS = ("out", "categories", "seeds", "defaults", "speed", "variants")
SPEED_SETTINGS = {"threads": DEFAULT_THREADS, "warmup": DEFAULT_WARMUP, "repeats": DEFAULT_REPEATS}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass
class BenchmarkSpec:
    """A validated spec: every variant resolves to a TrainConfig and every name is a safe folder name."""

    out: Path
    categories: dict[str, Path]
    seeds: list[int]
    variants: dict[str, dict[str, Any]]        # name -> TrainConfig settings (defaults already merged in)
    speed: dict[str, int] | None               # None: no speed measurement
    source: str = "command line"
    evaluated_runs_of: dict[str, str] = field(default_factory=dict)   # variant -> variant whose runs it evaluates
    # When flags narrowed the spec file (--variants, --categories, --seeds, --methods): the file's variants,
    # categories and seeds joined with the flags'. results.csv lists the finished cells of this wider spec, so a
    # narrowed run, or several side by side, never drops the other cells' rows from the table.
    reported: BenchmarkSpec | None = None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _check_name(what: str, name: Any, source: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{source}: {what} name {name!r} must be a non-empty folder name of letters, digits, "
                          "'_', '.', '+' or '-'")
    return name


def _parse_categories(value: Any, source: str) -> dict[str, Path]:
    if isinstance(value, (str, Path)):
        value = [value]
    if isinstance(value, dict):
        pairs = [(_check_name("category", name, source), path) for name, path in value.items()]
    elif isinstance(value, list):
        pairs = [(Path(str(path)).name, path) for path in value]
        names = [name for name, _ in pairs]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ConfigError(f"{source}: categories: two folders named {', '.join(duplicates)}; give them names "
                              "with the mapping form, e.g. {a_bottle: path/a/bottle, b_bottle: path/b/bottle}")
        for name, _ in pairs:
            _check_name("category", name, source)
    else:
        raise ConfigError(f"{source}: categories must be a mapping name -> folder or a list of folders")
    categories: dict[str, Path] = {}
    for name, path in pairs:
        if not isinstance(path, (str, Path)) or not str(path):
            raise ConfigError(f"{source}: categories: {name!r} needs a folder path, got {path!r}")
        categories[name] = Path(str(path)).expanduser()
    if not categories:
        raise ConfigError(f"{source}: no categories given")
    return categories


def _parse_seeds(value: Any, source: str) -> list[int]:
    if not isinstance(value, list) or not value or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           and s >= 0 for s in value):
        raise ConfigError(f"{source}: seeds must be a non-empty list of non-negative integers, e.g. [0, 1, 2]; "
                          f"got {value!r}")
    if len(set(value)) != len(value):
        raise ConfigError(f"{source}: seeds {value} repeat a seed")
    return list(value)


def _parse_speed(value: Any, source: str) -> dict[str, int] | None:
    if value is None or value is True:
        return dict(SPEED_SETTINGS)
    if value is False:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: speed must be true, false or a mapping of {', '.join(SPEED_SETTINGS)}")
    unknown = sorted(set(value) - set(SPEED_SETTINGS))
    if unknown:
        raise ConfigError(f"{source}: speed: unknown setting(s) {', '.join(map(repr, unknown))}; "
                          f"known: {', '.join(SPEED_SETTINGS)}")
    settings = {**SPEED_SETTINGS, **value}
    for key, number in settings.items():
        if not isinstance(number, int) or isinstance(number, bool) or number < (0 if key == "warmup" else 1):
            raise ConfigError(f"{source}: speed: {key} must be a positive integer, got {number!r}")
    return settings


def _evaluation_variant(name: str, settings: dict[str, Any], variants: dict[str, dict[str, Any]],
                        sources: dict[str, str], source: str) -> dict[str, Any]:
    """The settings of a variant that re-evaluates an earlier variant's runs with other map options."""
    other = settings["evaluate_run_of"]
    if other not in variants or other in sources:
        raise ConfigError(f"{source}: variant {name!r}: evaluate_run_of must name an earlier variant that trains, "
                          f"got {other!r}")
    extra = sorted(set(settings) - {"evaluate_run_of", "options"})
    options = settings.get("options") or {}
    not_map = sorted(set(options) - set(MAP_OPTIONS)) if isinstance(options, dict) else ["options"]
    if extra or not_map or not options:
        raise ConfigError(f"{source}: variant {name!r} evaluates {other!r}'s runs: it may only set map options "
                          f"({', '.join(MAP_OPTIONS)}) under options:, not {', '.join(extra + not_map) or 'nothing'}")
    return _deep_merge(variants[other], {"options": options})


def resolve_variant(variant: str, settings: dict[str, Any], source: str,
                    overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of a variant's settings (and flag `overrides`); an error names the spec and the variant."""
    try:
        return resolve_config(settings["method"], file_values=settings, overrides=overrides)
    except ValueError as error:
        raise ConfigError(f"{source}: variant {variant!r}: {error}") from None


def _parse_variants(value: Any, defaults: dict[str, Any], source: str
                    ) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: variants must be a non-empty mapping name -> settings")
    variants: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for name, settings in value.items():
        _check_name("variant", name, source)
        settings = {} if settings is None else settings
        if not isinstance(settings, dict):
            raise ConfigError(f"{source}: variant {name!r} must be a mapping of settings, "
                              f"got {type(settings).__name__}")
        if "evaluate_run_of" in settings:
            variants[name] = _evaluation_variant(name, settings, variants, sources, source)
            sources[name] = settings["evaluate_run_of"]
            continue
        merged = _deep_merge(defaults, settings)
        if "seed" in merged:
            raise ConfigError(f"{source}: variant {name!r} sets 'seed'; seeds are set once, at the top level (seeds:)")
        if "method" not in merged:
            if name not in METHODS:
                raise ConfigError(f"{source}: variant {name!r} needs a method (one of {', '.join(METHODS)})")
            merged["method"] = name
        resolve_variant(name, merged, source)
        variants[name] = merged
    return variants, sources


def build_spec(values: dict[str, Any] | None = None, *, source: str = "command line", out: str | Path | None = None,
               methods: list[str] | None = None, categories: list[str | Path] | None = None,
               seeds: list[int] | None = None, variants: list[str] | None = None,
               speed: bool | None = None) -> BenchmarkSpec:
    """Validate a spec mapping; the keyword arguments (the CLI flags) replace the mapping's entries.

    `methods` replaces the variants by one default variant per method; `variants` keeps a subset, in that order."""
    values = dict(values or {})
    as_written = dict(values)
    unknown = sorted(set(values) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; known: {', '.join(SPEC_KEYS)}")
    if out is not None:
        values["out"] = str(out)
    if categories:
        values["categories"] = [str(c) for c in categories]
    if seeds:
        values["seeds"] = list(seeds)
    if methods:
        values["variants"] = {m: {"method": m} for m in methods}
    if speed is False:
        values["speed"] = False
    elif speed is True and values.get("speed") is False:
        values["speed"] = True
    if not values.get("out"):
        raise ConfigError(f"{source}: no output folder: set out: in the spec or pass --out")
    if not isinstance(values["out"], (str, Path)):
        raise ConfigError(f"{source}: out must be a folder path, got {values['out']!r}")
    if "categories" not in values:
        raise ConfigError(f"{source}: no categories: set categories: in the spec or pass --categories")
    if "variants" not in values:
        raise ConfigError(f"{source}: no variants: set variants: in the spec or pass --methods")
    defaults = values.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults must be a mapping of TrainConfig settings")
    parsed_variants, sources = _parse_variants(values["variants"], defaults, source)
    if variants:
        missing = [v for v in variants if v not in parsed_variants]
        if missing:
            raise ConfigError(f"{source}: unknown variant(s) {', '.join(missing)}; the spec has "
                              f"{', '.join(parsed_variants)}")
        parsed_variants = {v: parsed_variants[v] for v in variants}
    spec = BenchmarkSpec(out=Path(str(values["out"])).expanduser(),
                         categories=_parse_categories(values["categories"], source),
                         seeds=_parse_seeds(values.get("seeds", [0]), source),
                         variants=parsed_variants, speed=_parse_speed(values.get("speed", True), source),
                         source=source, evaluated_runs_of={v: o for v, o in sources.items() if v in parsed_variants})
    if (categories or seeds or variants or methods) and "categories" in as_written and "variants" in as_written:
        spec.reported = _joined(build_spec(as_written, source=source, out=out, speed=speed), spec)
    return spec


def _joined(written: BenchmarkSpec, narrowed: BenchmarkSpec) -> BenchmarkSpec:
    """The spec file as written, with the variants, categories and seeds the flags added (the flags' win a clash)."""
    return dataclasses.replace(
        written, variants={**written.variants, **narrowed.variants},
        categories={**written.categories, **narrowed.categories},
        seeds=written.seeds + [s for s in narrowed.seeds if s not in written.seeds],
        evaluated_runs_of={**{v: o for v, o in written.evaluated_runs_of.items() if v not in narrowed.variants},
                           **narrowed.evaluated_runs_of}, speed=narrowed.speed)


def load_spec(path: str | Path, **flags: Any) -> BenchmarkSpec:
    """Read and validate a YAML spec; errors name the file and the key."""
    return build_spec(load_yaml(path), source=str(path), **flags)
