"""``mskdex drr``: attenuation DRR and per-structure mass / volume channels of a CT.

Writes into ``--out``: ``summary.json`` (geometry, pose, per-channel sums vs CT metrics,
settings), ``drr.nrrd`` (attenuation line integrals, unitless, 2D with detector spacing),
``channels.nrrd`` (stack (C, rows, cols), channel c as listed in summary.json; g or cm^3 per
pixel) and ``preview.png`` (DRR beside a colour composite of the channels).
"""

from __future__ import annotations

from contextlib import closing

from .common import (Progress, add_ct_args, add_density_args, add_device, add_force, add_progress,
                     add_structure_args, density_from_args, load_case, resolve_device, split_names)

OUTPUT_FILES = ("summary.json", "drr.nrrd", "channels.nrrd", "preview.png")


def add_parser(sub, name: str):
    p = sub.add_parser(name, help="render a DRR and exact per-structure mass/volume channels",
                       description="Render the attenuation DRR of a CT and, per structure, a mass "
                       "(g per pixel) and/or volume (cm^3 per pixel) channel whose sum equals the "
                       "structure's CT mass/volume. Default view: AP, centred on the labelled bones.")
    add_ct_args(p)
    add_structure_args(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--channels", default="mass,volume",
                   help="comma-separated quantities: mass, volume, or 'none' (default: mass,volume)")
    g = p.add_argument_group("geometry (see docs/frames.md)")
    g.add_argument("--rows", type=int, default=256, help="detector rows (default 256)")
    g.add_argument("--cols", type=int, default=256, help="detector columns (default 256)")
    g.add_argument("--spacing", type=float, default=1.6, metavar="MM",
                   help="detector pixel spacing in mm (default 1.6)")
    g.add_argument("--sid", type=float, default=1000.0, metavar="MM",
                   help="source-to-image distance in mm (default 1000)")
    g.add_argument("--rotation", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("RX", "RY", "RZ"),
                   help="extra rotation in degrees about the patient L, P, S axes through the isocentre")
    g.add_argument("--translation", type=float, nargs=3, default=(0.0, 0.0, 0.0),
                   metavar=("TX", "TY", "TZ"), help="extra translation in mm along L, P, S")
    g.add_argument("--step", type=float, default=None, metavar="MM",
                   help="attenuation sample spacing along the dominant CT axis (default: one per slice)")
    g.add_argument("--mu-water", type=float, default=0.02, metavar="PER_MM",
                   help="linear attenuation of water in 1/mm (default 0.02, about 70 keV)")
    add_density_args(p)
    add_device(p)
    add_progress(p)
    add_force(p)
    p.set_defaults(func=run)
    return p


def _quantities(text: str) -> tuple[str, ...]:
    from ..errors import UserError
    from ..projection.rendering import QUANTITIES

    names = split_names(text) or []
    if names == ["none"]:
        return ()
    bad = [n for n in names if n not in QUANTITIES]
    if bad or not names:
        raise UserError(f"--channels: unknown quantity {bad or text!r}; use mass, volume or none")
    return tuple(dict.fromkeys(names))


def _write_image(path, array, spacing_xy, force: bool, meta: dict | None = None):
    """Write a 2D (rows, cols) or stacked 3D (C, rows, cols) float32 image with pixel spacing."""
    import numpy as np
    import SimpleITK as sitk

    from ..io.outputs import atomic_path

    img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    img.SetSpacing(tuple(spacing_xy) + ((1.0,) if array.ndim == 3 else ()))
    for k, v in (meta or {}).items():
        img.SetMetaData(k, str(v))
    with atomic_path(path, force) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def run(args) -> int:
    import numpy as np

    from ..errors import UserError
    from ..projection.geometry import Camera, perturbed_pose
    from ..io.outputs import output_folder, write_json
    from ..anatomy.ct_metrics import structure_metrics
    from ..projection.rendering import QUANTITY_NAMES, DRRRenderer, isocentre_of
    from ..projection.geometry import ap_pose
    from ..visualize import drr_preview

    quantities = _quantities(args.channels)
    progress = Progress(args.progress, total=4, desc="drr")
    # built in a staging folder renamed into place at the end: an error or Ctrl-C leaves nothing
    with output_folder(args.out, args.force, OUTPUT_FILES) as out, closing(progress):
        ct, labels = load_case(args)
        density = density_from_args(args)
        kinds = args.kind or (None if args.structures else ["muscle", "bone"])
        structures = labels.select(split_names(args.structures), kinds) if labels is not None else []
        if quantities and labels is None:
            raise UserError("--channels needs --labels (or pass --channels none)")
        if quantities and not structures:
            raise UserError("no structure selected (check --structures / --kind)", args.labels)
        camera = Camera(args.rows, args.cols, args.spacing, args.spacing, args.sid)
        device = resolve_device(args.device)
        iso = isocentre_of(ct, labels)
        pose = perturbed_pose(ap_pose(iso, camera), args.rotation, args.translation, iso)
        renderer = DRRRenderer(ct, camera, labels, structures, density, device, args.step,
                               args.mu_water)
        progress.update(1, stage="loaded")
        import torch

        with torch.no_grad():
            drr = renderer.attenuation(pose)[0].cpu().numpy()
            progress.update(1, stage="attenuation")
            result = renderer.render_channels(pose, quantities) if quantities else None
        progress.update(1, stage="channels")
        metrics = {m.structure.name: m for m in structure_metrics(ct, labels, structures, density)} \
            if quantities else {}
        entries, stack = [], []
        for q in quantities:
            images = result.images[q][0].cpu().numpy()
            for k, s in enumerate(structures):
                stack.append(images[k])
                entries.append({"structure": s.name, "kind": s.kind, "quantity": QUANTITY_NAMES[q],
                                "sum": float(images[k].astype(np.float64).sum()),
                                "inside_detector": bool(result.inside[0, k]),
                                "ct_metric": float(getattr(metrics[s.name], QUANTITY_NAMES[q]))})
        spacing_xy = (camera.spacing_col_mm, camera.spacing_row_mm)
        summary = {
            "format": "mskdex-drr/1",
            "geometry": camera.to_dict(),
            "ct_to_camera": np.asarray(pose).tolist(),
            "channels": entries,
            "files": {"drr": "drr.nrrd", "channels": "channels.nrrd" if entries else None,
                      "preview": "preview.png"},
            "settings": {
                "rotation_deg": list(args.rotation), "translation_mm": list(args.translation),
                "isocentre_lps_mm": iso.tolist(), "mu_water_per_mm": args.mu_water,
                "attenuation": {"method": "plane-sampled trilinear ray marching",
                                "dominant_axis": renderer.dominant_axis(pose),
                                "samples_per_ray": renderer._samples(renderer.dominant_axis(pose)),
                                "step_mm": args.step},
                "channels_method": "voxel splatting (separable box footprint, exact pixel overlaps)",
                "footprint_taps": list(result.footprint_taps) if result else None,
                "density": density.to_dict(),
                "table": labels.table.name if labels is not None else None,
                "device": str(device), "ct": ct.grid_description(),
            },
        }
        _write_image(out / "drr.nrrd", drr, spacing_xy, args.force,
                     {"quantity": "attenuation line integral (unitless)"})
        names = [s.name for s in structures]
        if entries:
            _write_image(out / "channels.nrrd", np.stack(stack), spacing_xy, args.force,
                         {f"channel_{i}": f"{e['structure']}:{e['quantity']}" for i, e in enumerate(entries)})
        comp_q = "mass" if "mass" in quantities else (quantities[0] if quantities else None)
        comp = result.images[comp_q][0].cpu().numpy() if comp_q else None
        title = f"{ct.source.split('/')[-1]}  rot {tuple(args.rotation)} deg  trans {tuple(args.translation)} mm"
        drr_preview(out / "preview.png", drr, comp, names, [s.color for s in structures], title,
                    args.force, (camera.spacing_row_mm, camera.spacing_col_mm))
        write_json(out / "summary.json", summary, args.force)
        progress.update(1, stage="written")
        progress.event("done", out=str(args.out))
    bad = [e for e in entries if not e["inside_detector"]]
    print(f"wrote {args.out} ({len(entries)} channels" + (f"; {len(bad)} not fully inside the detector" if bad else "")
          + ")")
    return 0
