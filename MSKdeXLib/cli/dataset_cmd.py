"""``mskdex build-dataset``: case folders -> a training-set folder (mskdex-dataset/1)."""

from __future__ import annotations

import argparse
from contextlib import closing

from ..errors import UserError
from ..io.outputs import resumable_folder
from .common import (LazyChoices, Progress, add_force, add_kind, add_pixel_spacing, add_progress, settings_options,
                     settings_values, spacing_rc, split_names)

#: option dest -> DatasetSettings field (defaults come from there)
SETTINGS_FIELDS = {"image_size": "image_size", "kind": "kinds", "quantities": "quantities",
                   "bone_quantities": "bone_quantities", "normalisation": "normalisation_method", "split": "split",
                   "val_fraction": "val_fraction", "test_fraction": "test_fraction"}


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n (e.g. 0/4), got '{text}'") from None
    return i, n


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="build a training set from virtual subjects and/or registered real cases",
                       description="Build records (normalised radiograph, channel targets at the data-set "
                       "grid with sums kept, paired flags, CT-derived truth) from case folders: virtual "
                       "subjects of `mskdex cohort` or real cases (CT, labels, radiograph, "
                       "registration.json). Records already built from the same inputs are skipped.")
    p.add_argument("--cases", nargs="+", default=[],
                   help="case folders, or folders of case folders (e.g. a cohort)")
    p.add_argument("--out", required=True, help="data-set folder")
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), help="record size in pixels")
    add_pixel_spacing(p, None, "record pixel spacing at the detector, mm (default: that of the first case's "
                      "radiograph)")
    p.add_argument("--structures", default=None, help="comma-separated structure names (default: by --kind)")
    add_kind(p, "structures of this kind (repeatable)")
    p.add_argument("--quantities", help="channels per muscle/other structure")
    p.add_argument("--bone-quantities", help="channels per bone")
    p.add_argument("--normalisation", choices=LazyChoices("MSKdeXLib.learning.dataset.format:NORMALISATION_METHODS"),
                   metavar="METHOD", help="radiograph intensity scaling: %(choices)s")
    p.add_argument("--split", choices=LazyChoices("MSKdeXLib.learning.dataset.builder:SPLIT_CHOICES"),
                   metavar="SPLIT", help="split of these records: %(choices)s (auto: from a hash of the record id)")
    p.add_argument("--val-fraction", type=float, help="share of the records in the validation split (auto)")
    p.add_argument("--test-fraction", type=float, help="share of the records in the test split (auto)")
    settings_options(p, "MSKdeXLib.learning.dataset.builder:DatasetSettings", SETTINGS_FIELDS)
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                   help="build only records whose index %% N == I (run N of these, in parallel)")
    p.add_argument("--include-doubtful", action="store_true",
                   help="use real cases whose registration is doubtful (refused by default); their doubtful "
                        "bodies' bones are unpaired. Each record states its registration status")
    p.add_argument("--merge", action="store_true",
                   help="only rewrite dataset.json listing every record built (after sharded runs)")
    add_force(p)
    add_progress(p)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from ..learning.dataset.builder import (DatasetSettings, build_dataset, case_spacing,  # lazy: scipy, torch
                                            discover_cases, merge)  # (keeps `mskdex --help` instant)

    if args.merge:
        doc = merge(args.out)
        print(f"dataset.json lists {len(doc['records'])} records")
        return 0
    if not args.cases:
        raise UserError("give the case folders with --cases (or --merge)")
    spacing = spacing_rc(args.pixel_spacing)
    cases = discover_cases(args.cases)
    given = settings_values(args, SETTINGS_FIELDS)
    for key in ("image_size", "kinds"):
        if key in given:
            given[key] = tuple(given[key])
    for key in ("quantities", "bone_quantities"):
        if key in given:
            given[key] = tuple(split_names(given[key]) or ())
    settings = DatasetSettings(pixel_spacing_mm=spacing or case_spacing(cases[0]),
                               structures=split_names(args.structures), **given)
    i, n = args.shard
    todo = sum(1 for k in range(len(cases)) if k % n == i) if n >= 1 else 0
    bar = Progress(args.progress, todo, "build-dataset")
    # records are built one by one and reused by a rerun; a folder without any record is removed
    with resumable_folder(args.out, lambda p: any(p.glob("records/*.safetensors"))), closing(bar):
        summary = build_dataset(args.cases, args.out, settings, shard=args.shard, force=args.force,
                                on_record=lambda e: bar.update(1, record=e["id"], cached=e["cached"]),
                                include_doubtful=args.include_doubtful)
    bar.event("done", **summary)
    if args.progress != "json":
        print(f"{summary['built']} records built, {summary['cached']} cached; dataset.json lists "
              f"{summary['records']} records with {summary['channels']} channels ({args.out})")
    return 0
