"""Evaluation report: metrics JSON, per-prompt CSVs, frequency charts, image grids, one HTML page.

``write_report(out_dir, {"base": records, "tuned": records})`` writes, atomically
(a temp folder renamed to ``out_dir`` once everything is written):

- ``report.json``: ``{"models": [...], "results": {model: metrics}, "delta":
  {model: metric - first model's}, "discrepancy", "bias", "recall",
  "intervals"}``; the top-level metric keys are the last model's (the tuned
  one when comparing base and tuned; the only one otherwise).
- ``per_prompt_<model>.csv`` (neutral prompts: counts per class, discrepancy,
  bias), ``recall_<model>.csv`` (identity prompts), and with several models
  ``per_prompt_delta.csv`` (each model's discrepancy/bias next to the first
  model's, with the difference).
- ``frequencies_<attribute>.png``: group frequencies, bars grouped by model,
  the uniform level dashed.
- ``grids/<model>/<n>.png``: the images of each prompt with their labels.
- ``index.html``: all of it on one page (files referenced relatively, so the
  folder is self-contained).

Records are :class:`fairjax.fairness.metrics.Record` (prompt, labels or None,
image path, identity for identity-specific prompts).
"""

from __future__ import annotations

import csv
import html
import json
import os
import re
from typing import Mapping, Sequence

import numpy as np

from fairjax.errors import UserError
from fairjax.fairness.metrics import DEFAULT_CLASSES, Record, evaluate, group_by_prompt
from fairjax.io.model_dir import atomic_output_dir

REPORT_FILE = "report.json"
HTML_FILE = "index.html"
METRIC_KEYS = ("discrepancy", "bias", "recall")


# ---------------------------------------------------------------- records on disk

def record_to_json(r: Record) -> dict:
    return {"prompt": r.prompt, "labels": None if r.labels is None else dict(r.labels), "image": r.image,
            "identity": None if r.identity is None else dict(r.identity), "reason": r.reason}


def write_records(path: str, records: Sequence[Record]) -> None:
    """Records as JSON lines (temp file, then rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(record_to_json(r)) + "\n")
    os.replace(tmp, path)


def read_records(path: str) -> list[Record]:
    """Records from JSON lines written by :func:`write_records`."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: records file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(Record(prompt=d["prompt"], labels=d.get("labels"), image=d.get("image"),
                                  identity=d.get("identity"), reason=d.get("reason")))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path} line {n}: not a record ({type(e).__name__}: {e}); "
                                "expected a JSON object with at least 'prompt' and 'labels'") from None
    return out


# ---------------------------------------------------------------- tables

def _fmt(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4f}"
    return str(x)


def write_csv(path: str, rows: Sequence[Mapping]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def delta_rows(models: Sequence[str], results: Mapping[str, dict]) -> list[dict]:
    """Per neutral prompt: each model's discrepancy/bias columns and their change from the first model."""
    base = models[0]
    tables = {m: {r["prompt"]: r for r in results[m]["tables"]["per_prompt"]} for m in models}
    prompts = list(dict.fromkeys(p for m in models for p in tables[m]))
    metric_cols = [c for c in (results[base]["tables"]["per_prompt"] or [{}])[0]
                   if c.startswith(("discrepancy:", "bias:")) or c == "n_faces"]
    rows = []
    for p in prompts:
        row = {"prompt": p}
        for col in metric_cols:
            ref = tables[base].get(p, {}).get(col)
            for m in models:
                val = tables[m].get(p, {}).get(col)
                row[f"{m}:{col}"] = val
                if m != base:
                    row[f"delta {m}-{base}:{col}"] = None if val is None or ref is None else val - ref
        rows.append(row)
    return rows


def metric_deltas(base: dict, other: dict) -> dict:
    """``other - base`` for every headline metric both have."""
    out = {}
    for key in METRIC_KEYS:
        if base.get(key) is None or other.get(key) is None:
            out[key] = None
            continue
        out[key] = {k: other[key][k] - base[key][k] for k in base[key] if k in other[key]}
    return out


# ---------------------------------------------------------------- figures

def frequency_chart(path: str, attr: str, classes: Sequence[str], freqs: Mapping[str, Mapping[str, float]]) -> None:
    """Grouped bars: one group per class, one bar per model; dashed line at 1/K."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = list(freqs)
    fig = Figure(figsize=(max(4.0, 1.1 * len(classes) * max(1, len(models)) * 0.6 + 2), 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(classes))
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, [freqs[m].get(c, 0.0) for c in classes], width, label=m)
    ax.axhline(1.0 / len(classes), color="k", linestyle="--", linewidth=1, label="uniform")
    ax.set_xticks(x)
    ax.set_xticklabels(classes, rotation=20 if len(classes) > 3 else 0, ha="right" if len(classes) > 3 else "center")
    ax.set_ylabel("frequency")
    ax.set_title(f"{attr} frequencies")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def image_grid(images: Sequence[np.ndarray | None], captions: Sequence[str], tile: int = 128, cols: int = 4):
    """A PIL image: tiles of ``tile`` px (aspect kept, padded) with a caption line under each."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    n = max(1, len(images))
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    cap_h = 14
    grid = Image.new("RGB", (cols * tile, rows * (tile + cap_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * tile, (i // cols) * (tile + cap_h)
        if img is None:
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=(200, 200, 200))
        else:
            t = ImageOps.contain(Image.fromarray(img), (tile, tile))
            grid.paste(t, (x + (tile - t.width) // 2, y + (tile - t.height) // 2))
        draw.text((x + 2, y + tile + 1), cap[: max(4, tile // 6)], fill=(0, 0, 0), font=font)
    return grid


def _caption(r: Record) -> str:
    if r.labels is None:
        return r.reason or "no face"
    return " ".join(str(v) for v in r.labels.values())


def write_grids(folder: str, records: Sequence[Record], max_images: int) -> dict[str, str]:
    """One grid PNG per prompt that has image files; ``{prompt: file name}``."""
    from fairjax.fairness.classifiers import load_image

    os.makedirs(folder, exist_ok=True)
    out = {}
    for n, (prompt, recs) in enumerate(group_by_prompt(records).items()):
        recs = [r for r in recs if r.image][:max_images]
        if not recs:
            continue
        images = [load_image(r.image)[0] for r in recs]
        name = f"{n:04d}.png"
        image_grid(images, [_caption(r) for r in recs]).save(os.path.join(folder, name))
        out[prompt] = name
    return out


# ---------------------------------------------------------------- html

def _interval(res: dict, key: str, sub: str) -> str:
    iv = (res.get("intervals") or {}).get(key) or {}
    if sub not in iv:
        return ""
    lo, hi = iv[sub]
    return f" [{lo:.3f}, {hi:.3f}]"


def _summary_table(models: Sequence[str], results: Mapping[str, dict], deltas: Mapping[str, dict]) -> str:
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    head += "".join(f"<th>&Delta; {html.escape(m)} &minus; {html.escape(models[0])}</th>" for m in models[1:])
    rows = []
    for key in METRIC_KEYS:
        subs = list(dict.fromkeys(s for m in models for s in (results[m].get(key) or {})))
        for sub in subs:
            cells = []
            for m in models:
                v = (results[m].get(key) or {}).get(sub)
                cells.append("<td></td>" if v is None else f"<td>{v:.3f}{_interval(results[m], key, sub)}</td>")
            for m in models[1:]:
                d = (deltas[m].get(key) or {}).get(sub)
                cells.append("<td></td>" if d is None else f"<td>{d:+.3f}</td>")
            rows.append(f"<tr><th>{key} ({html.escape(sub)})</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>metric</th>{head}</tr>{''.join(rows)}</table>"


def _html_table(rows: Sequence[Mapping]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0;"
        "font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}img{margin:4px;"
        "vertical-align:top}.grids{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}")


def render_html(title: str, models, results, deltas, charts, tables, grids, counts) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    level = next((r.get("level") for r in results.values() if r.get("level")), 0.95)
    parts.append(f"<h2>Summary</h2><p>Bootstrap {int(round(level * 100))}% intervals over prompts in brackets.</p>")
    parts.append(_summary_table(models, results, deltas))
    parts.append("<h2>Images</h2>" + _html_table([{"model": m, **counts[m]} for m in models]))
    parts.append("<h2>Group frequencies</h2>")
    parts.extend(f"<img src='{html.escape(c)}' alt='{html.escape(c)}'>" for c in charts)
    for name, (csv_name, rows) in tables.items():
        parts.append(f"<h2>{html.escape(name)}</h2><p><a href='{html.escape(csv_name)}'>{html.escape(csv_name)}</a></p>")
        parts.append(_html_table(rows))
    parts.append("<h2>Image grids</h2>")
    prompts = list(dict.fromkeys(p for m in models for p in grids[m]))
    for p in prompts:
        figs = "".join(f"<figure><figcaption>{html.escape(m)}</figcaption><img src='{html.escape(grids[m][p])}'></figure>"
                       for m in models if p in grids[m])
        parts.append(f"<h3>{html.escape(p)}</h3><div class='grids'>{figs}</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


# ---------------------------------------------------------------- entry point

def _slug(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._")
    if not s:
        raise UserError(f"model name {name!r} has no usable characters for a file name")
    return s


def _public(res: dict) -> dict:
    return {k: v for k, v in res.items() if k != "tables"}


def write_report(out_dir: str, runs: Mapping[str, Sequence[Record]] | Sequence[Record],
                 classes: Mapping[str, Sequence[str]] = DEFAULT_CLASSES, n_resamples: int = 1000,
                 level: float = 0.95, seed: int = 0, grid_images: int = 16, overwrite: bool = False,
                 title: str = "fairjax fairness report") -> dict:
    """Evaluate each model's records and write the report folder; returns the ``report.json`` dict.

    ``runs``: ``{model name: records}`` (in order: the first is the baseline of
    the deltas), or one model's records.
    """
    if not isinstance(runs, Mapping):
        runs = {"model": list(runs)}
    if not runs:
        raise UserError("write_report: no models given")
    models = list(runs)
    slugs = [_slug(m) for m in models]
    if len(set(slugs)) != len(slugs):
        raise UserError(f"model names {models} collide as file names {slugs}; rename them")
    results = {m: evaluate(runs[m], classes, n_resamples, level, seed) for m in models}
    deltas = {m: metric_deltas(results[models[0]], results[m]) for m in models[1:]}
    last = results[models[-1]]
    report = {"models": models, "results": {m: _public(results[m]) for m in models}, "delta": deltas,
              **{k: last[k] for k in METRIC_KEYS}, "intervals": last["intervals"], "classes": dict(classes)}
    if os.path.exists(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already exists; choose another folder or pass overwrite")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        report["files"] = _write_files(tmp, title, runs, models, slugs, results, deltas, report, classes, grid_images)
    return report


def _write_files(tmp, title, runs, models, slugs, results, deltas, report, classes, grid_images) -> list[str]:
    tables, charts, grids, counts = {}, [], {}, {}
    for m, s in zip(models, slugs):
        res = results[m]
        counts[m] = {"images": len(runs[m]), "faces": sum(r.labels is not None for r in runs[m]),
                     **{f"skipped {k}": v for k, v in res["skipped"].items()}}
        if res["tables"]["per_prompt"]:
            name = f"per_prompt_{s}.csv"
            write_csv(os.path.join(tmp, name), res["tables"]["per_prompt"])
            if len(models) == 1:
                tables[f"Per prompt: {m}"] = (name, res["tables"]["per_prompt"])
        if res["tables"]["recall"]:
            name = f"recall_{s}.csv"
            write_csv(os.path.join(tmp, name), res["tables"]["recall"])
            tables[f"Recall per identity prompt: {m}"] = (name, res["tables"]["recall"])
        grids[m] = {p: f"grids/{s}/{f}" for p, f in
                    write_grids(os.path.join(tmp, "grids", s), runs[m], grid_images).items()}
    with_neutral = [m for m in models if results[m]["tables"]["per_prompt"]]
    if len(with_neutral) > 1:
        rows = delta_rows(with_neutral, results)
        write_csv(os.path.join(tmp, "per_prompt_delta.csv"), rows)
        tables = {"Per prompt (all models, deltas from the first)": ("per_prompt_delta.csv", rows), **tables}
    for attr, cls in classes.items():
        freqs = {m: results[m]["frequencies"][attr] for m in with_neutral}
        if freqs:
            name = f"frequencies_{_slug(attr)}.png"
            frequency_chart(os.path.join(tmp, name), attr, list(cls), freqs)
            charts.append(name)
    files = sorted([HTML_FILE, REPORT_FILE, *charts, *(f"per_prompt_{s}.csv" for m, s in zip(models, slugs)
                                                         if results[m]["tables"]["per_prompt"]),
                    *(c for c, _ in tables.values()), *(f for g in grids.values() for f in g.values())])
    files = sorted(set(files))
    report["files"] = files
    with open(os.path.join(tmp, REPORT_FILE), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    with open(os.path.join(tmp, HTML_FILE), "w", encoding="utf-8") as f:
        f.write(render_html(title, models, results, deltas, charts, tables, grids, counts))
    return files
