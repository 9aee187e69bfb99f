"""``mskdex evaluate``: agreement of estimates with CT-derived truth (PCC, ICC, MAE, MAPE)."""

from __future__ import annotations

from .common import add_force


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="compare estimates with CT-derived truth per structure",
                       description="Per structure and quantity: Pearson r, ICC(2,1) (two-way random, absolute "
                       "agreement), MAE, MAPE, Bland-Altman bias and limits, and the empirical coverage of the "
                       "estimates' intervals (when they carry low/high) against their nominal level, with the number of "
                       "subjects and the effective sample size; per-muscle specificity (PCC of each muscle's share of "
                       "total muscle, of the left-right asymmetry index (L-R)/(L+R) per pair, and partial PCC given "
                       "the true total muscle mass); scatter and "
                       "Bland-Altman plots; "
                       "tables in Markdown and CSV. Files pair by case id: an explicit 'id' field/column, "
                       "else the file name, else (for generic names such as estimates.json, metrics.json) "
                       "the parent folder's name.")
    p.add_argument("--pred", required=True, help="estimates (estimates.json / .csv) or a folder of them")
    p.add_argument("--truth", required=True,
                   help="truth: mskdex metrics --json files, a CSV id,structure,mass_g,volume_cm3, or a folder")
    p.add_argument("--out", required=True, help="output folder")
    add_force(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..evaluation.agreement import evaluate, read_rows, write_report  # lazy: matplotlib; keeps --help instant

    from ..io.outputs import output_folder

    with output_folder(args.out, args.force) as stage:  # staged: an error or Ctrl-C leaves nothing
        skipped: list[str] = []
        ev = evaluate(read_rows(args.pred, skipped), read_rows(args.truth, skipped))
        ev.notes += [f"skipped file {s}" for s in skipped]
        write_report(ev, stage, True)
    print(ev.to_markdown())
    for n in ev.notes:
        print(f"note: {n}")
    for line in ev.dropped_lines():  # every case left out, and why
        print(f"dropped: {line}")
    seen = trained_on(args.pred, {i for vs in ev.pairs.values() for i, *_ in vs})
    for split, ids in seen.items():
        print(f"warning: {len(ids)} of the scored cases were in the model's {split} split "
              f"({', '.join(sorted(ids)[:5])}{' ...' if len(ids) > 5 else ''}): their agreement shows how well the "
              "model fits what it was trained or tuned on, not how well it does on new radiographs")
    head = ev.headline()
    text = ", ".join(f"{q} {v:.3f}" for q, v in head.items()) or "undefined (fewer than 2 cases)"
    print(f"mean PCC over structures: {text}")
    if ev.coverage():
        print(ev.coverage_text())
    print(f"wrote {args.out}")
    return 0


def trained_on(pred: str, case_ids: set[str]) -> dict[str, set[str]]:
    """{split: case ids} of the scored cases that the models behind the estimates under ``pred``
    saw in their data set's 'train' or 'val' split (matched by the record's source folder name, as
    evaluate pairs a cohort subject's prediction with its metrics). Estimates without a readable
    model or data set are not checked."""
    import json
    from pathlib import Path

    p = Path(pred)
    files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
    datasets: set[Path] = set()
    for f in files:
        try:
            model = json.loads(f.read_text()).get("model")
            cfg = json.loads((Path(model) / "config.json").read_text()) if model else {}
        except (OSError, ValueError, AttributeError, TypeError):
            continue
        ds = (cfg.get("data_summary") or {}).get("dataset")
        if ds:
            datasets.add(Path(ds))
    out: dict[str, set[str]] = {}
    for ds in datasets:
        try:
            records = json.loads((ds / "dataset.json").read_text())["records"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        for r in records:
            split = r.get("split", "train")
            for name in (Path(str(r.get("source", ""))).name, str(r.get("id", ""))):
                if split in ("train", "val") and name in case_ids:
                    out.setdefault(split, set()).add(name)
    return out
