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
    head = ev.headline()
    text = ", ".join(f"{q} {v:.3f}" for q, v in head.items()) or "undefined (fewer than 2 cases)"
    print(f"mean PCC over structures: {text}")
    if ev.coverage():
        print(ev.coverage_text())
    print(f"wrote {args.out}")
    return 0
