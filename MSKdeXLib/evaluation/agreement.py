"""Evaluation of estimates against CT-derived truth: per structure and quantity.

Statistics (n paired cases per structure/quantity):

* ``pcc``: Pearson correlation coefficient;
* ``icc``: ICC(2,1) of Shrout & Fleiss (two-way random effects, absolute agreement, single
  measurement), with the prediction and the truth as the two "raters";
* ``mae`` (units of the quantity), ``mape_percent`` (mean |pred - truth| / |truth| * 100);
* Bland-Altman: ``bias`` (mean of pred - truth) and 95 % limits of agreement
  ``bias +- 1.96 * SD`` (SD with ddof=1).

Interval coverage: when predictions carry an interval (``low``/``high``, as ``mskdex predict``
writes, with its nominal ``level``), ``coverage`` is the fraction of cases whose truth lies in
[low, high], per structure/quantity and overall (:meth:`Evaluation.coverage`), next to the
nominal level and the mean relative half-width of the intervals.

Rows are dicts ``{id, structure, quantity, value}`` (``quantity`` "mass_g" or "volume_cm3"),
optionally with ``low``, ``high`` and ``level``; pairs match on (id, structure name loosely
normalised, quantity). File readers accept
``mskdex predict`` outputs (estimates.json / estimates.csv), ``mskdex metrics --json`` files and
CSVs with ``id,structure,mass_g,volume_cm3`` (wide) or ``id,structure,quantity,value`` (long),
or folders of them (searched recursively). The id of a file without an explicit id is its name,
or its folder's name for generic names (estimates.json, metrics.json, xray.dcm ...), so a cohort
subject folder pairs its prediction with its metrics.json.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..anatomy.structures import get_table, normalize_name
from ..errors import UserError
from . import specificity as spec_metrics
from .statistics import QUANTITIES, icc_2_1, pearson  # noqa: F401  (re-exported)


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------
def agreement(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """All statistics of one structure/quantity."""
    p, t = np.asarray(pred, float), np.asarray(truth, float)
    d = p - t
    sd = float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ape = np.abs(d) / np.abs(t)
    return {"n": int(len(p)), "pcc": pearson(p, t), "icc": icc_2_1(p, t), "mae": float(np.abs(d).mean()),
            "mape_percent": float(np.nanmean(np.where(np.isfinite(ape), ape, np.nan)) * 100) if len(p) else float("nan"),
            "bias": float(d.mean()), "loa_low": float(d.mean() - 1.96 * sd), "loa_high": float(d.mean() + 1.96 * sd),
            "truth_mean": float(t.mean()), "pred_mean": float(p.mean())}


# ---------------------------------------------------------------------------------------------
# Pairing
# ---------------------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Paired values and per structure/quantity statistics."""

    pairs: dict[tuple[str, str], list[tuple[str, float, float]]]  # (structure, quantity) -> [(id, pred, truth)]
    stats: list[dict[str, Any]]
    unmatched_pred: int = 0
    unmatched_truth: int = 0
    notes: list[str] = field(default_factory=list)
    #: (structure, quantity) -> [(id, low, high, truth, level)] for predictions with an interval
    intervals: dict[tuple[str, str], list[tuple[str, float, float, float, float]]] = field(default_factory=dict)
    #: structure name -> kind ("muscle", "bone", ...) where the rows said it or a built-in table knows it
    kinds: dict[str, str] = field(default_factory=dict)
    #: every row left out of the statistics: {id, structure, quantity, reason} (issue 15: never silently)
    dropped: list[dict[str, str]] = field(default_factory=list)

    def dropped_lines(self) -> list[str]:
        """One line per (case, reason): 'case7: estimate is not a finite number (hip_left mass_g, ...)'."""
        from ..errors import listing

        groups: dict[tuple[str, str], list[str]] = {}
        for d in self.dropped:
            groups.setdefault((d["id"], d["reason"]), []).append(f"{d['structure']} {d['quantity']}".strip())
        return [f"{rid}: {reason}" + (f" ({listing(items)})" if any(items) else "")
                for (rid, reason), items in groups.items()]


    def muscles(self) -> list[str]:
        """The paired structures of kind "muscle" (table order of their first appearance)."""
        names = dict.fromkeys(s for s, _ in sorted(self.pairs))
        return [n for n in names if self.kinds.get(n) == "muscle"]

    def specificity(self) -> dict[str, Any]:
        """Share, asymmetry and partial PCCs of the muscles (:mod:`.specificity`); {} with < 2 muscles."""
        return spec_metrics.specificity(self.pairs, self.muscles())

    def coverage(self) -> dict[str, Any]:
        """Empirical coverage of the prediction intervals: overall, per quantity, with the
        nominal level(s) and counts; empty when no prediction carries an interval."""
        allv = [v for vs in self.intervals.values() for v in vs]
        if not allv:
            return {}

        def summary(vals) -> dict[str, Any]:
            hit = [lo <= t <= hi for _, lo, hi, t, _ in vals]
            levels = sorted({round(lv, 6) for *_, lv in vals if np.isfinite(lv)})
            by_subject: dict[str, list[bool]] = {}
            for (i, *_), h in zip(vals, hit):
                by_subject.setdefault(i, []).append(h)
            ess = spec_metrics.effective_sample_size(by_subject)
            cov = float(np.mean(hit))
            return {"coverage": cov, "n": len(hit),
                    "nominal": levels[0] if len(levels) == 1 else (levels or None),
                    "n_subjects": ess["n_subjects"], "n_effective": ess["n_effective"],
                    "ci95_effective": list(spec_metrics.wilson_interval(cov, ess["n_effective"]))}

        out = {"overall": summary(allv)}
        for q in QUANTITIES:
            vq = [v for (s, qq), vs in self.intervals.items() if qq == q for v in vs]
            if vq:
                out[q] = summary(vq)
        return out

    def coverage_text(self) -> str:
        """One line: overall and per-quantity coverage against the nominal level ('' if none)."""
        cov = self.coverage()
        if not cov:
            return ""
        nom = cov["overall"]["nominal"]
        nom_t = f"{nom:.0%}" if isinstance(nom, float) else str(nom)
        parts = [f"{q} {cov[q]['coverage']:.1%}" for q in QUANTITIES if q in cov]
        o = cov["overall"]
        lo, hi = o["ci95_effective"]
        return (f"interval coverage of the truth: {o['coverage']:.1%} overall "
                f"(n = {o['n']} values of {o['n_subjects']} subjects, effective n = {o['n_effective']:.0f}, "
                f"95 % CI {lo:.0%}-{hi:.0%}; {', '.join(parts)}); nominal {nom_t}")

    def headline(self) -> dict[str, float]:
        """Mean PCC over structures, per quantity (structures with a defined PCC)."""
        out = {}
        for q in QUANTITIES:
            v = [s["pcc"] for s in self.stats if s["quantity"] == q and np.isfinite(s["pcc"])]
            if v:
                out[q] = float(np.mean(v))
        return out

    def to_csv(self) -> str:
        cols = ["structure", "quantity", "n", "pcc", "icc", "mae", "mape_percent", "bias", "loa_low", "loa_high",
                "truth_mean", "pred_mean"]
        if self.intervals:
            cols += ["coverage", "n_interval", "nominal_level", "mean_half_width_percent"]
        buf = io.StringIO()
        w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for s in self.stats:
            w.writerow({c: (f"{s[c]:.6g}" if isinstance(s.get(c), float) else s.get(c, "")) for c in cols})
        return buf.getvalue()

    def to_markdown(self) -> str:
        cov = bool(self.intervals)
        lines = ["| structure | quantity | n | PCC | ICC(2,1) | MAE | MAPE % | bias | 95 % LoA |"
                 + (" coverage |" if cov else ""),
                 "|---|---|---:|---:|---:|---:|---:|---:|---|" + ("---:|" if cov else "")]
        for s in self.stats:
            c = ""
            if cov:
                c = f" {s['coverage']:.0%} |" if np.isfinite(s.get("coverage", float("nan"))) else " - |"
            lines.append(f"| {s['structure']} | {s['quantity']} | {s['n']} | {s['pcc']:.3f} | {s['icc']:.3f} | "
                         f"{s['mae']:.4g} | {s['mape_percent']:.2f} | {s['bias']:.4g} | "
                         f"{s['loa_low']:.4g} .. {s['loa_high']:.4g} |" + c)
        head = self.headline()
        lines.append("")
        for q, v in head.items():
            lines.append(f"Mean PCC over structures ({q}): **{v:.3f}**")
        if cov:
            text = self.coverage_text()
            lines += ["", text[0].upper() + text[1:] + "."]
        spec = spec_metrics.to_markdown(self.specificity())
        if spec:
            lines += ["", spec.rstrip("\n")]
        return "\n".join(lines) + "\n"


def evaluate(pred_rows: Iterable[dict[str, Any]], truth_rows: Iterable[dict[str, Any]]) -> Evaluation:
    """Pair rows {id, structure, quantity, value} on (id, structure, quantity) and compute the
    statistics of every structure/quantity with at least 2 pairs."""
    def key(r):
        q = str(r["quantity"])
        if q not in QUANTITIES:
            raise UserError(f"unknown quantity '{q}' (use {QUANTITIES})")
        return (str(r["id"]), normalize_name(str(r["structure"])), q)

    truth, names, kinds, dropped = {}, {}, {}, []
    pred_rows = list(pred_rows)

    def drop(r, reason):
        dropped.append({"id": str(r.get("id", "")), "structure": str(r.get("structure", "")),
                        "quantity": str(r.get("quantity", "")), "reason": reason})

    for r in truth_rows:
        k = key(r)
        if not np.isfinite(_number(r["value"])):
            drop(r, "truth is not a finite number (null/NaN)")
            continue
        truth[k] = float(r["value"])
        names.setdefault(k[1], str(r["structure"]))
        if r.get("kind"):
            kinds.setdefault(names[k[1]], str(r["kind"]))
    for r in pred_rows:
        n = names.get(normalize_name(str(r["structure"])))
        if n and r.get("kind"):
            kinds.setdefault(n, str(r["kind"]))
    pairs: dict[tuple[str, str], list[tuple[str, float, float]]] = {}
    intervals: dict[tuple[str, str], list[tuple[str, float, float, float, float]]] = {}
    unmatched = 0
    seen = set()
    pred_ids = set()
    for r in pred_rows:
        k = key(r)
        pred_ids.add(k[0])
        if not np.isfinite(_number(r["value"])):
            drop(r, "estimate is not a finite number (null/NaN)")
            continue
        if k not in truth:
            unmatched += 1
            drop(r, "no finite truth for this case, structure and quantity")
            continue
        seen.add(k)
        pairs.setdefault((names[k[1]], k[2]), []).append((k[0], float(r["value"]), truth[k]))
        lo, hi = _number(r.get("low")), _number(r.get("high"))
        if np.isfinite(lo) and np.isfinite(hi):
            intervals.setdefault((names[k[1]], k[2]), []).append(
                (k[0], lo, hi, truth[k], _number(r.get("level"))))
    stats, notes = [], []
    for (s, q), v in sorted(pairs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if len(v) < 2:
            notes.append(f"{s} {q}: only {len(v)} pair(s), no statistics")
            continue
        _, p, t = zip(*v)
        stats.append({"structure": s, "quantity": q, **agreement(np.array(p), np.array(t)),
                      **interval_stats(intervals.get((s, q), []))})
    if not pairs:
        raise UserError("no prediction matches a truth row (check the ids, structure names and quantities)")
    for rid in sorted({k[0] for k in truth} - pred_ids):
        dropped.append({"id": rid, "structure": "", "quantity": "", "reason": "truth without any estimate"})
    for n in names.values():
        kinds.setdefault(n, builtin_kind(n))
    return Evaluation(pairs, stats, unmatched, len(set(truth) - seen), notes, intervals, kinds=kinds, dropped=dropped)


def builtin_kind(name: str) -> str:
    """The kind of a structure name in the built-in tables (TotalSegmentator v1/v2, hip22), else "other"."""
    for table in ("totalseg_v1", "totalseg_v2", "hip22"):
        s = get_table(table).find(name)
        if s is not None:
            return s.kind
    return "other"


def _number(v: Any) -> float:
    try:
        return float(v) if v not in (None, "") else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def interval_stats(vals: list[tuple[str, float, float, float, float]]) -> dict[str, Any]:
    """coverage (fraction of truths in [low, high]), n_interval, nominal_level and the mean
    half-width in % of the truth; {} without intervals."""
    if not vals:
        return {}
    _, lo, hi, t, lv = map(np.array, zip(*vals))
    levels = np.unique(lv[np.isfinite(lv)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hw = np.where(t != 0, (hi - lo) / 2 / np.abs(t) * 100, np.nan)
    return {"coverage": float(np.mean((lo <= t) & (t <= hi))), "n_interval": int(len(t)),
            "nominal_level": float(levels[0]) if len(levels) == 1 else float("nan"),
            "mean_half_width_percent": float(np.nanmean(hw)) if np.isfinite(hw).any() else float("nan")}


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def _wide_to_long(rid: str, items: Iterable[dict[str, Any]], level: Any = None) -> list[dict[str, Any]]:
    out = []
    for it in items:
        name = it.get("structure", it.get("name"))
        rid_i = str(it.get("id") or rid)
        for q in QUANTITIES:
            v = it.get(q)
            if name is not None and q in it and v != "":  # null (a NaN written as strict JSON) is kept: evaluate reports it
                interval = {"low": it.get(f"{q}_low"), "high": it.get(f"{q}_high"), "level": it.get("level", level)}
                out.append({"id": rid_i, "structure": str(name), "quantity": q, "value": _number(v),
                            **({"kind": str(it["kind"])} if it.get("kind") else {}),
                            **_interval_fields(interval, level)})
    return out


def _interval_fields(r: dict[str, Any], level: Any) -> dict[str, float]:
    """low / high / level of a long-format row when it has an interval."""
    if r.get("low") in (None, "") or r.get("high") in (None, ""):
        return {}
    return {"low": float(r["low"]), "high": float(r["high"]), "level": _number(r.get("level", level))}


def read_rows(path: str | Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows {id, structure, quantity, value} from a file or a folder (recursively). Files of a
    folder that are not results are skipped; with a ``skipped`` list, each is named there with why."""
    from ..learning.inference import case_id_from_path

    path = Path(path)
    if not path.exists():
        raise UserError("file or folder not found", path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".csv") and p.is_file())
        # a folder from `mskdex predict` holds estimates.json and estimates.csv: read the JSON only
        files = [p for p in files if not (p.suffix.lower() == ".csv" and p.with_suffix(".json").exists())]
        rows = []
        for f in files:
            try:
                rows += read_rows(f)
            except UserError as exc:
                if skipped is not None:  # not a results file (e.g. a sidecar): skipped, and said so
                    skipped.append(str(exc))
                continue
        if not rows:
            raise UserError("folder holds no readable estimates / metrics files", path)
        return rows
    rid = case_id_from_path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read ({exc})", path) from None
    if path.suffix.lower() == ".json":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise UserError(f"not valid JSON ({exc})", path) from None
        if isinstance(d, dict) and isinstance(d.get("rows"), list):
            rid = str(d.get("id") or rid)
            level = d.get("interval")
            return [{"id": str(r.get("id") or rid), "structure": r["structure"], "quantity": r["quantity"],
                     "value": _number(r["value"]), **({"kind": str(r["kind"])} if r.get("kind") else {}),
                     **_interval_fields(r, level)} for r in d["rows"]]
        if isinstance(d, dict) and isinstance(d.get("structures"), list):
            rows = _wide_to_long(str(d.get("id") or rid), d["structures"], d.get("interval"))
            if rows:
                return rows
        raise UserError("JSON is neither estimates (mskdex predict) nor metrics (mskdex metrics --json)", path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        cols = {c.strip().lower() for c in (reader.fieldnames or [])}
        recs = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in reader]
        if {"structure", "quantity", "value"} <= cols:
            return [{"id": r.get("id") or rid, "structure": r["structure"], "quantity": r["quantity"],
                     "value": float(r["value"]), **_interval_fields(r, None)} for r in recs if r["value"] != ""]
        if ({"structure"} <= cols or {"name"} <= cols) and cols & set(QUANTITIES):
            try:
                return _wide_to_long(rid, recs)
            except ValueError as exc:
                raise UserError(f"non-numeric value ({exc})", path) from None
        raise UserError("CSV needs columns id,structure,mass_g,volume_cm3 or id,structure,quantity,value", path)
    raise UserError("expected a .json or .csv file (or a folder of them)", path)


# ---------------------------------------------------------------------------------------------
# Plots and outputs
# ---------------------------------------------------------------------------------------------
def _grid(n: int) -> tuple[int, int]:
    cols = int(np.ceil(np.sqrt(n)))
    return int(np.ceil(n / cols)), cols


def plot(ev: Evaluation, out_dir: Path, force: bool = False) -> list[Path]:
    """scatter_<quantity>.png and bland_altman_<quantity>.png (one panel per structure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.outputs import atomic_path

    written = []
    by_key = {(s["structure"], s["quantity"]): s for s in ev.stats}
    for q in QUANTITIES:
        keys = [k for k in sorted(ev.pairs) if k[1] == q and k in by_key]
        if not keys:
            continue
        unit = "g" if q == "mass_g" else "cm³"
        for kind in ("scatter", "bland_altman"):
            r, c = _grid(len(keys))
            fig, axes = plt.subplots(r, c, figsize=(3.2 * c, 3.0 * r), squeeze=False)
            for ax, k in zip(axes.ravel(), keys):
                _, p, t = map(np.array, zip(*ev.pairs[k]))
                s = by_key[k]
                if kind == "scatter":
                    lo, hi = min(p.min(), t.min()), max(p.max(), t.max())
                    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                    ax.scatter(t, p, s=10)
                    ax.set_xlabel(f"CT truth ({unit})", fontsize=7)
                    ax.set_ylabel(f"estimate ({unit})", fontsize=7)
                    ax.set_title(f"{k[0]}  r={s['pcc']:.2f}", fontsize=8)
                else:
                    ax.scatter((p + t) / 2, p - t, s=10)
                    for v, ls in ((s["bias"], "-"), (s["loa_low"], "--"), (s["loa_high"], "--")):
                        ax.axhline(v, color="k", ls=ls, lw=0.8)
                    ax.set_xlabel(f"mean ({unit})", fontsize=7)
                    ax.set_ylabel(f"estimate - truth ({unit})", fontsize=7)
                    ax.set_title(k[0], fontsize=8)
                ax.tick_params(labelsize=6)
            for ax in axes.ravel()[len(keys):]:
                ax.set_axis_off()
            fig.suptitle(f"{'Estimate vs truth' if kind == 'scatter' else 'Bland-Altman'}: {q}", fontsize=10)
            fig.tight_layout()
            path = out_dir / f"{kind}_{q}.png"
            with atomic_path(path, force=force) as tmp:
                fig.savefig(tmp, dpi=100)
            plt.close(fig)
            written.append(path)
    return written


def write_report(ev: Evaluation, out_dir: str | Path, force: bool = False) -> dict[str, Path]:
    """evaluation.csv, evaluation.md, evaluation.json, pairs.csv and the plots."""
    from ..io.outputs import prepare_out_dir, write_json, write_text

    names = ("evaluation.csv", "evaluation.md", "evaluation.json", "pairs.csv") + tuple(
        f"{k}_{q}.png" for k in ("scatter", "bland_altman") for q in QUANTITIES)
    out = prepare_out_dir(out_dir, force, expected=names)
    pair_lines = ["id,structure,quantity,predicted,truth"] + [
        f"{i},{s},{q},{p:.6g},{t:.6g}" for (s, q), v in sorted(ev.pairs.items()) for i, p, t in v]
    files = {"csv": write_text(out / "evaluation.csv", ev.to_csv(), force),
             "markdown": write_text(out / "evaluation.md", ev.to_markdown(), force),
             "json": write_json(out / "evaluation.json", {"statistics": ev.stats, "headline_mean_pcc": ev.headline(),
                                                          "interval_coverage": ev.coverage(),
                                                          "specificity": ev.specificity(),
                                                          "icc": "ICC(2,1), two-way random, absolute agreement",
                                                          "unmatched_predictions": ev.unmatched_pred,
                                                          "unmatched_truth": ev.unmatched_truth, "notes": ev.notes,
                                                          "dropped": ev.dropped},
                                 force),
             "pairs": write_text(out / "pairs.csv", "\n".join(pair_lines) + "\n", force)}
    for p in plot(ev, out, force):
        files[p.stem] = p
    return files
