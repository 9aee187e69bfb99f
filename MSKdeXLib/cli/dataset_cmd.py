"""``mskdex build-dataset``: case folders -> a training-set folder (mskdex-dataset/1)."""

from __future__ import annotations

from contextlib import closing

from .common import add_force, add_progress, split_names


def _shard(text: str) -> tuple[int, int]:
    import argparse

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
    p.add_argument("--image-size", nargs=2, type=int, metavar=("H", "W"), default=(256, 256),
                   help="record size in pixels (default 256 256)")
    p.add_argument("--spacing", nargs="+", type=float, metavar="MM", default=None,
                   help="record pixel spacing at the detector, mm (one value or row col; "
                        "default: that of the first case's radiograph)")
    p.add_argument("--structures", default=None, help="comma-separated structure names (default: by --kind)")
    p.add_argument("--kind", action="append", choices=("muscle", "bone", "other"),
                   help="structures of this kind (repeatable; default muscle and bone)")
    p.add_argument("--quantities", default="mass_g,volume_cm3",
                   help="channels per muscle/other structure (default mass_g,volume_cm3)")
    p.add_argument("--bone-quantities", default="mass_g", help="channels per bone (default mass_g)")
    p.add_argument("--normalisation", default="zscore", choices=("zscore", "percentile", "minmax"),
                   help="radiograph intensity scaling (default zscore)")
    p.add_argument("--split", default="auto", choices=("auto", "train", "val", "test"),
                   help="split of these records (auto: from a hash of the record id)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
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


def _default_spacing(cases) -> tuple[float, float]:
    from ..errors import UserError
    from ..io.documents import read_json
    from ..learning.dataset.builder import read_registration

    c = cases[0]
    if c.kind == "virtual":
        path = c.folder / "subject.json"
        try:
            cam = read_json(path, "subject description")["camera"]
            return (float(cam["spacing_row_mm"]), float(cam["spacing_col_mm"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"subject description lacks a valid 'camera' ({type(exc).__name__}: {exc})",
                            path) from None
    camera, _ = read_registration(c.folder / "registration.json")  # the radiograph's detector
    return (camera.spacing_row_mm, camera.spacing_col_mm)


def run(args) -> int:
    from ..learning.dataset.builder import DatasetSettings, build_dataset, discover_cases, merge
    from ..errors import UserError
    from ..io.outputs import resumable_folder
    from .common import Progress

    if args.merge:
        doc = merge(args.out)
        print(f"dataset.json lists {len(doc['records'])} records")
        return 0
    if not args.cases:
        raise UserError("give the case folders with --cases (or --merge)")
    cases = discover_cases(args.cases)
    if args.spacing is None:
        spacing = _default_spacing(cases)
    elif len(args.spacing) in (1, 2):
        spacing = tuple(args.spacing) * (2 if len(args.spacing) == 1 else 1)
    else:
        raise UserError("--spacing takes one value or two (row col)")
    settings = DatasetSettings(image_size=tuple(args.image_size), pixel_spacing_mm=tuple(spacing),
                               structures=split_names(args.structures),
                               kinds=tuple(args.kind or ("muscle", "bone")),
                               quantities=tuple(split_names(args.quantities) or ()),
                               bone_quantities=tuple(split_names(args.bone_quantities) or ()),
                               normalisation_method=args.normalisation, split=args.split,
                               val_fraction=args.val_fraction, test_fraction=args.test_fraction)
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
