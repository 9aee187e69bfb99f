"""``mskdex metrics``: per-structure volume (cm^3) and mass (g) from CT + labels."""

from __future__ import annotations

from ..anatomy.ct_metrics import metrics_csv, metrics_document
from ..io.outputs import check_new, write_json, write_text
from .common import (add_ct_args, add_density_args, add_force, add_structure_args, density_from_args,
                     load_case, split_names)


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="per-structure volume and (lean) mass from a CT and its labels",
                       description="Per-structure volume_cm3 (all voxels of the label) and mass_g "
                       "(muscles: lean mass, HU in the lean window; bones/other: total mass).")
    add_ct_args(p)
    add_structure_args(p)
    add_density_args(p)
    p.add_argument("--json", dest="json_out", default=None, help="write results as JSON to this file")
    p.add_argument("--csv", dest="csv_out", default=None, help="write results as CSV to this file")
    p.add_argument("--all", action="store_true",
                   help="include structures of kind 'other' (organs ...); default: muscles and bones")
    add_force(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    for out in (args.json_out, args.csv_out):
        if out:
            check_new(out, args.force)
    ct, labels = load_case(args)
    kinds = args.kind or (None if args.all or args.structures else ["muscle", "bone"])
    report = metrics_document(ct, labels, labels.select(split_names(args.structures), kinds), density_from_args(args))
    rows = report["structures"]
    if args.json_out:
        write_json(args.json_out, report, args.force)
    if args.csv_out:
        write_text(args.csv_out, metrics_csv(rows), args.force)
    if not args.json_out and not args.csv_out:
        print(f"structure table: {report['settings']['table']}")
        print(f"{'structure':<28}{'kind':<8}{'volume_cm3':>12}{'mass_g':>12}{'mean_HU':>10}")
        for r in rows:
            print(f"{r['name']:<28}{r['kind']:<8}{r['volume_cm3']:>12.2f}{r['mass_g']:>12.2f}{r['mean_hu']:>10.1f}")
    return 0
