"""`distillad test --report DIR`: the evaluation as a folder a person reads, with no JSON to decode.

DIR gets `index.html` (one self-contained page: metrics, the calibrated threshold's behaviour, the plots, the worst
cases), `roc.png` (image and pixel ROC), `pro.png` (PRO curve up to FPR 0.3), `scores.png` (score histograms with
the threshold), one PNG per worst case (image | heatmap | ground truth), `result.json` (what `--json` writes) and
the marker `.distillad-report`. A non-empty folder without that marker is never written into; a previous report is
replaced. Plots need matplotlib (`pip install "distillad[report]"`), imported only here and drawn with Agg on
Figure objects, so pyplot's global state is never touched.

Why one module of this length: the plots, the worst-case panels and the page are one product read together; most
of the lines are the page's HTML and the plot styling, with little logic to separate.
"""

from __future__ import annotations

import dataclasses
import html
import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from distillad import metrics
from distillad.errors import ConfigError, RunError
from distillad.io import atomic_write_bytes, atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from distillad.api import DataInput, Run

MARKER = ".distillad-report"
FPR_LIMIT = 0.3
_GOOD, _BAD, _THR = "#2b83ba", "#d7191c", "#222222"


def check_report_dir(out_dir: str | os.PathLike) -> Path:
    """The report folder, if distillad may write there: new, empty, or holding a previous report (RunError if not)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunError(f"report folder {out} is a file; choose a new or empty folder for --report")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise RunError(f"report folder {out} is not empty and holds no distillad report (no {MARKER} file); "
                       "choose a new or empty folder for --report")
    return out


def require_matplotlib() -> Any:
    """matplotlib's Figure class, or a ConfigError saying how to install it."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401  (Agg: no display needed)
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError('the report needs matplotlib: pip install "distillad[report]" '
                          '(or pip install "matplotlib>=3.6")') from None
    return Figure


def _save(fig: Any, path: Path, ax: Any = None) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if ax is not None:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right" if ax.get_xlabel().startswith("false") else "best")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())


def _thin(x: np.ndarray, y: np.ndarray, n: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """At most ~n points of a monotone curve, evenly spaced along its length (first and last kept), for plotting."""
    if x.size <= n:
        return x, y
    length = np.concatenate(([0.0], np.cumsum(np.abs(np.diff(x)) + np.abs(np.diff(y)))))
    step = np.floor(length * (n / max(length[-1], 1e-12)))
    keep = np.flatnonzero(np.diff(step, prepend=-1.0) > 0)
    keep = np.union1d(keep, [0, x.size - 1])
    return x[keep], y[keep]


class _MapRecorder(torch.nn.Module):
    """A scorer that also keeps the maps it returns (CPU float32, model resolution), in call order."""

    def __init__(self, scorer: torch.nn.Module) -> None:
        super().__init__()
        self.scorer = scorer
        self.maps: list[np.ndarray] = []

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.scorer(images)
        self.maps.append(maps.detach().float().cpu().numpy())
        return maps, scores


def evaluate_with_maps(run: Run, data: DataInput, *, batch_size: int = 16, progress: bool = False
                       ) -> tuple[dict[str, Any], np.ndarray]:
    """`run.evaluate(data)` and, from the same single pass, the test images' maps (N,S,S) for the pixel curves."""
    from distillad.api import Run as _Run
    from distillad.engine.inference import maps_in_mask_frame

    recorder = _MapRecorder(run.scorer)
    result = _Run(dataclasses.replace(run.loaded, scorer=recorder), run.device).evaluate(
        data, batch_size=batch_size, progress=progress)
    size = run.image_size
    maps = np.concatenate(recorder.maps) if recorder.maps else np.zeros((0, size, size), np.float32)
    if "box" in (result["images"] or [{}])[0]:      # letterboxed inputs: the maps in the masks' frame
        maps = maps_in_mask_frame(maps, np.array([image["box"] for image in result["images"]]))
    return result, maps


def _pixel_curves(run: Run, data: DataInput, result: dict[str, Any], maps: np.ndarray | None, batch_size: int,
                  progress: bool) -> tuple[dict[str, Any], dict[Path, Path | None]]:
    """Pixel ROC and PRO curves (scoring the test split again when `maps` is None), and each image's mask file."""
    from distillad.data import CategorySplit, load_category
    from distillad.data.images import read_mask_array

    split = data if isinstance(data, CategorySplit) else load_category(
        Path(data), val_fraction=run.config.val_fraction, seed=run.config.seed)
    mask_of = {Path(s.path): s.mask_path for s in split.test}
    if [str(s.path) for s in split.test] != [item["path"] for item in result["images"]]:
        return {"error": "the data's test images are not the evaluated ones"}, mask_of
    if maps is None:
        maps = evaluate_with_maps(run, split, batch_size=batch_size, progress=progress)[1]
    assert len(maps) == len(split.test), "one map per test image"
    keep, masks = [], []
    for sample in split.test:  # the masks ImageDataset gives the evaluation; defects without a mask are left out
        keep.append(sample.mask_path is not None or sample.label == 0)
        if sample.mask_path is not None:
            masks.append(read_mask_array(sample.mask_path, run.image_size)[0])
        elif sample.label == 0:
            masks.append(np.zeros(maps.shape[1:], dtype=bool))
    curves: dict[str, Any] = {}
    try:
        selected, gt = maps[np.array(keep, dtype=bool)], np.stack(masks)
        fpr, tpr = metrics.roc_curve(selected, gt)
        curves["pixel_auroc"] = _area(fpr, tpr)
        curves["roc"] = _thin(fpr, tpr)
        fpr, pro = metrics.pro_curve(selected, gt, FPR_LIMIT)
        curves["aupro"] = _area(fpr, pro) / FPR_LIMIT
        curves["pro"] = _thin(fpr, pro)
    except ValueError as error:  # no defect pixel, or no normal pixel: the curve does not exist
        curves["error"] = str(error)
    return curves, mask_of


def _area(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) * 0.5)


def _plot_roc(Figure: Any, path: Path, scores: np.ndarray, labels: np.ndarray, curves: dict[str, Any]) -> str:
    ax = (fig := Figure(figsize=(5.2, 5.0))).add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", color="#999999", lw=1)
    note = "" if labels.min() != labels.max() else "image ROC undefined: the test set has one class only"
    if not note:
        ax.plot(*metrics.roc_curve(scores, labels), color=_BAD, lw=2.2,
                label=f"image AUROC {metrics.image_auroc(scores, labels):.3f}")
    if "roc" in curves:
        ax.plot(*curves["roc"], color=_GOOD, lw=1.5, label=f"pixel AUROC {curves['pixel_auroc']:.3f}")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title="ROC" + (f"\n{note}" if note else ""), aspect="equal")
    _save(fig, path, ax)
    return note


def _plot_pro(Figure: Any, path: Path, curves: dict[str, Any]) -> None:
    ax = (fig := Figure(figsize=(5.2, 5.0))).add_subplot()
    if "pro" in curves:
        ax.fill_between(*curves["pro"], color=_GOOD, alpha=0.15, lw=0)
        ax.plot(*curves["pro"], color=_GOOD, lw=2, label=f"AUPRO@{FPR_LIMIT:g} = {curves['aupro']:.3f}")
    else:
        ax.text(0.5, 0.5, "PRO curve undefined:\n" + curves["error"], ha="center", va="center",
                transform=ax.transAxes, wrap=True)
    ax.set(xlim=(0, FPR_LIMIT), ylim=(0, 1.02), xlabel="false positive rate (defect-free pixels)",
           ylabel="per-region overlap", title=f"PRO curve up to FPR {FPR_LIMIT:g}")
    _save(fig, path, ax)


def _rate(chosen: np.ndarray, threshold: float | None) -> str:
    """'rate (hits/total)' of scores strictly above the threshold (defective, as threshold_report decides)."""
    if threshold is None or not chosen.size:
        return "n/a"
    return f"{(chosen > threshold).mean():.1%} ({int((chosen > threshold).sum())}/{chosen.size})"


def _plot_scores(Figure: Any, path: Path, scores: np.ndarray, labels: np.ndarray, threshold: float | None,
                 counts: dict[str, str]) -> None:
    ax = (fig := Figure(figsize=(7.0, 4.2))).add_subplot()
    values = scores if threshold is None else np.append(scores, threshold)
    edges = np.histogram_bin_edges(values, bins=int(np.clip(np.sqrt(scores.size) * 2, 10, 50)))
    for label, color, name in ((0, _GOOD, "good"), (1, _BAD, "defective")):
        chosen = scores[labels == label]
        if chosen.size:
            ax.hist(chosen, bins=edges, color=color, alpha=0.4, label=f"{name} ({chosen.size})")
            ax.hist(chosen, bins=edges, color=color, histtype="step", lw=1.6)  # outlines show overlaps
    if threshold is None:
        title = "image scores (uncalibrated run: no threshold)"
    else:
        ax.axvline(threshold, color=_THR, ls="--", lw=1.5, label=f"threshold {threshold:.4g}")
        title = f"image scores: false alarms {counts['false alarms']}, detections {counts['detections']}"
    ax.set(xlabel="image score", ylabel="images", title=title)
    _save(fig, path, ax)


def worst_cases(result: dict[str, Any], worst: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The highest-scoring good images and the lowest-scoring defective ones, `worst` of each (ties: test order)."""
    items = list(enumerate(result["images"]))
    good = sorted((x for x in items if x[1]["label"] == 0), key=lambda x: (-x[1]["score"], x[0]))
    bad = sorted((x for x in items if x[1]["label"] == 1), key=lambda x: (x[1]["score"], x[0]))
    return [x[1] for x in good[:worst]], [x[1] for x in bad[:worst]]


def _fit(array: np.ndarray, side: int = 400) -> np.ndarray:
    """Shrink an image (H,W,3 uint8: Lanczos), map (H,W float: max-pooled, so peaks and the above-threshold outline
    survive) or mask (H,W bool: any) to at most `side` pixels, so 1-pixel outlines stay visible in the figure."""
    import torch.nn.functional as F
    from PIL import Image

    h, w = array.shape[:2]
    if max(h, w) <= side:
        return array
    size = (max(1, round(h * side / max(h, w))), max(1, round(w * side / max(h, w))))
    if array.ndim == 3:
        return np.asarray(Image.fromarray(array).resize(size[::-1], Image.Resampling.LANCZOS))
    pooled = F.adaptive_max_pool2d(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None], size)
    out = pooled[0, 0].numpy()
    return out > 0.5 if array.dtype == bool else out


def _plot_cases(Figure: Any, run: Run, out: Path, kind: str, cases: list[dict[str, Any]],
                mask_of: dict[Path, Path | None], threshold: float | None, scale_max: float | None,
                batch_size: int) -> list[str]:
    """One PNG per case: image | heatmap overlay | ground truth (when there is a mask). Maps are computed here,
    for these few images only, through Run.predict."""
    from distillad.data.images import decode_image, read_mask_array
    from distillad.heatmaps import overlay, to_rgb_u8

    names = []
    predictions = run.predict([Path(c["path"]) for c in cases], batch_size=batch_size)
    # The run's scale (0 to twice the threshold), or without a threshold these maps' own range, for contrast.
    low = 0.0 if scale_max else min(float(p.anomaly_map.min()) for p in predictions)  # type: ignore[union-attr]
    scale = scale_max or max(float(p.anomaly_map.max()) for p in predictions) - low  # type: ignore[union-attr]
    for rank, (case, prediction) in enumerate(zip(cases, predictions), 1):
        image = _fit(to_rgb_u8(decode_image(case["path"])))
        assert prediction.anomaly_map is not None
        heat = _fit(prediction.anomaly_map) - low
        panels = [("image", image),
                  (f"heatmap (score {case['score']:.4g})",
                   overlay(image, heat, np.inf if threshold is None else threshold - low, scale))]
        mask_path = mask_of.get(Path(case["path"]))
        if mask_path is not None:
            panels.append(("ground truth", _fit(read_mask_array(mask_path, None)[0])))
        fig = Figure(figsize=(3.6 * len(panels), 4.1))
        for i, (title, array) in enumerate(panels, 1):
            ax = fig.add_subplot(1, len(panels), i)
            if array.ndim == 2:  # the ground-truth mask: white = defect
                ax.imshow(array, cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(array)
            ax.set_title(title, fontsize=11)
            ax.axis("off")
        fig.suptitle(f"{case['defect_type']} / {Path(case['path']).name}", fontsize=12)
        name = f"{kind}_{rank}.png"
        _save(fig, out / name)
        names.append(name)
    return names


_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.plots{display:flex;flex-wrap:wrap;gap:1em}
.plots img{width:calc(50% - .5em);height:auto;border:1px solid #ddd;box-sizing:border-box}
.plots img.wide{width:auto;max-width:100%}
figure.case{margin:0 0 1.5em}figure.case img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.92em;color:#444}code{font-size:.9em}.above{color:#b00;font-weight:bold}.below{color:#060;font-weight:bold}"""


def _table(rows: list[tuple[str, Any]], td: str = "") -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(k)}</th><td{td}>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


def _html(result: dict[str, Any], counts: dict[str, str], notes: list[str], aupro_curve: float | None,
          sections: list[tuple[str, str, str, list[dict[str, Any]], list[str]]], threshold: float | None) -> str:
    e = html.escape
    names = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": f"AUPRO@{FPR_LIMIT:g}",
             "image_f1max": "image F1-max", "pixel_f1max": "pixel F1-max"}
    info = _table([("category", result.get("category")), ("method", result.get("method")),
                   ("backbone", result.get("backbone")), ("run", result.get("run")),
                   ("options", json.dumps(result.get("options") or {})),
                   ("test images", f"{result['n_images']} ({result['n_defective']} defective, "
                                   f"{result.get('n_images_without_mask', 0)} without mask)"),
                   ("evaluation time", f"{result.get('seconds', 0):.1f} s")])
    rows = _table([(names.get(k, k), f"{result[k]:.4f}") for k in metrics.METRIC_KEYS], " class=num")
    thr = result.get("threshold")
    thr_html = _table([(f"threshold ({thr.get('rule') or 'from defect-free validation scores'})", f"{thr['value']:.6g}"),
                       ("false alarms (good test images above it)", counts["false alarms"]),
                       ("detections (defective test images above it)", counts["detections"]),
                       ("accuracy", f"{thr['accuracy']:.1%}")], " class=num") if thr else (
        "<p>No calibrated threshold (the run is uncalibrated, or a map option was changed at test time).</p>")
    if aupro_curve is not None and abs(aupro_curve - result["aupro"]) > 1e-6:
        notes.append(f"the plotted PRO curve gives AUPRO {aupro_curve:.4f}, the evaluation {result['aupro']:.4f}")
    extra = "<ul>" + "".join(f"<li>{e(n)}</li>" for n in notes if n) + "</ul>" if any(notes) else ""
    scale = ("0 (blue) to twice the threshold (dark red)" if threshold is not None
             else "the lowest (blue) to the highest (dark red) value of the maps in the same section")
    body = [f"<h1>distillad test report: {e(str(result.get('category')))}</h1>",
            info, "<h2>Metrics</h2>", rows,
            "<h2>Calibrated threshold on the test images</h2>", thr_html, "<h2>Curves and scores</h2>", extra,
            '<div class=plots><img src="roc.png" alt="ROC curves"><img src="pro.png" alt="PRO curve">'
            '<img class=wide src="scores.png" alt="score histograms"></div>',
            f"<p>Heatmaps: colour scale from {scale}"
            + ("; the red outline marks pixels above the threshold.</p>" if threshold is not None else ".</p>")]
    for kind, heading, explain, cases, files in sections:
        body.append(f"<h2>{e(heading)}</h2><p>{e(explain)}</p>")
        if not cases:
            body.append("<p>None in the test set.</p>")
        for rank, (case, name) in enumerate(zip(cases, files), 1):
            side = "" if threshold is None else (
                " &middot; <span class=above>above threshold</span>" if case["score"] > threshold
                else " &middot; <span class=below>below threshold</span>")
            body.append(f'<figure class=case data-kind="{kind}" data-path="{e(case["path"])}">'
                        f'<img src="{e(name)}" alt="{e(kind)} {rank}"><figcaption>#{rank} &middot; score '
                        f'{case["score"]:.6g}{side} &middot; {e(case["defect_type"])} &middot; '
                        f'<code>{e(case["path"])}</code></figcaption></figure>')
    body.append('<p>All numbers: <a href="result.json">result.json</a> (what <code>distillad test --json</code> '
                "writes).</p>")
    title = e(f"distillad report: {result.get('category')}")
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{title}</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(run: Run, result: dict[str, Any], out_dir: str | os.PathLike, *, data: DataInput | None = None,
                 maps: np.ndarray | None = None, worst: int = 6, batch_size: int = 8, progress: bool = False) -> Path:
    """Write the report of `result` (from `run.evaluate`) into `out_dir`; returns the path of index.html.

    With `data` (what `run.evaluate` was given) the report has the pixel ROC and PRO curves and the worst cases
    show their ground-truth masks; the test split is scored again unless `maps` (from `evaluate_with_maps`) are
    given. Without `data` those parts are left out. Only the worst cases' full-resolution maps are computed."""
    Figure = require_matplotlib()
    out = check_report_dir(out_dir)
    if worst < 0:
        raise ConfigError(f"worst must be >= 0, got {worst}")
    marker = out / MARKER
    try:
        previous = [f for f in json.loads(marker.read_text()).get("files", []) if isinstance(f, str)]
    except (OSError, ValueError, AttributeError, TypeError):  # no marker yet, or not ours to trust
        previous = []
    atomic_write_json(marker, {"report": "distillad test --report", "files": previous})  # claims the folder first
    scores = np.array([item["score"] for item in result["images"]], dtype=np.float64)
    labels = np.array([item["label"] for item in result["images"]], dtype=np.int64)
    thr = result.get("threshold")
    threshold = None if not thr else float(thr["value"])
    curves: dict[str, Any] = {"error": "no data given to compute pixel curves"}
    mask_of: dict[Path, Path | None] = {}
    if data is not None:
        curves, mask_of = _pixel_curves(run, data, result, maps, batch_size, progress)
    notes = [f"pixel curves: {curves['error']}" if "error" in curves else ""]
    notes += [_plot_roc(Figure, out / "roc.png", scores, labels, curves)]
    _plot_pro(Figure, out / "pro.png", curves)
    counts = {"false alarms": _rate(scores[labels == 0], threshold),
              "detections": _rate(scores[labels == 1], threshold)}
    _plot_scores(Figure, out / "scores.png", scores, labels, threshold, counts)
    good, bad = worst_cases(result, worst)
    scale_max = None if threshold is None else 2.0 * threshold
    files, written = ["index.html", "roc.png", "pro.png", "scores.png", "result.json"], []
    for kind, heading, explain, cases in (
            ("false_alarm", "Worst false alarms", "The defect-free test images with the highest scores "
             "(false alarms where above the threshold).", good),
            ("missed_defect", "Worst missed defects", "The defective test images with the lowest scores "
             "(missed where below the threshold).", bad)):
        names = _plot_cases(Figure, run, out, kind, cases, mask_of, threshold, scale_max, batch_size) if cases else []
        files += names
        written.append((kind, heading, explain, cases, names))
    atomic_write_json(out / "result.json", result)
    index = out / "index.html"
    atomic_write_text(index, _html(result, counts, notes, curves.get("aupro"), written, threshold))
    for stale in set(previous) - set(files):  # only files an earlier report wrote, never anything else
        if "/" not in stale and os.sep not in stale and not stale.startswith("."):
            (out / stale).unlink(missing_ok=True)
    atomic_write_json(marker, {"report": "distillad test --report", "files": files})
    return index
