"""``mskdex evaluate``: agreement of estimates with CT-derived truth (PCC, ICC, MAE, MAPE)."""

from __future__ import annotations

from .common import add_force


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="compare estimates with CT-derived truth per structure",
                       description="Per structure and quantity: Pearson r, ICC(2,1) (two-way random, absolute "
                       "agreement), MAE, MAPE, Bland-Altman bias and limits, and the empirical coverage of the "
                       "estimates' intervals (when they carry low/high) against their nominal level; scatter and "
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

    ev = evaluate(read_rows(args.pred), read_rows(args.truth))
    write_report(ev, args.out, args.force)
    print(ev.to_markdown())
    for n in ev.notes:
        print(f"note: {n}")
    head = ev.headline()
    text = ", ".join(f"{q} {v:.3f}" for q, v in head.items()) or "undefined (fewer than 2 cases)"
    print(f"mean PCC over structures: {text}")
    if ev.coverage():
        print(ev.coverage_text())
    print(f"wrote {args.out}")
    return 0
