"""Register one saved benchmark radiograph with whatever ``MSKdeXLib`` is first on the path, and
print one JSON line per body: the side-by-side timing of bench_registration.py runs the code of
another commit (a ``git worktree``) this way, on the same radiograph and start, under the same
load. Uses only the public API both versions share (parse_bodies, RegistrationSettings(seed),
register).

    PYTHONPATH=/path/to/old/worktree python benchmarks/register_once.py trial.npz
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from MSKdeXLib.io.volumes import load_ct, load_labels
from MSKdeXLib.projection.geometry import Camera
from MSKdeXLib.registration import pipeline


def main(path: str) -> None:
    d = np.load(path, allow_pickle=False)
    meta = json.loads(str(d["meta"]))
    torch.set_num_threads(int(meta.get("threads", 1)))  # the new code's thread count (fair timing)
    ct = load_ct(meta["ct"])
    labels = load_labels(meta["labels"], ct)
    bodies = pipeline.parse_bodies(meta["bodies"], labels)
    cam = Camera(**meta["camera"])
    truth = {k: np.asarray(v) for k, v in meta["true_poses"].items()}
    res = pipeline.register(ct, labels, d["pixels"], cam, bodies, d["start"],
                            pipeline.RegistrationSettings(seed=meta["seed"]), true_poses=truth)
    for r in res:
        print(json.dumps({"body": r.name, "kind": r.kind, "mtre_mm": r.mtre_mm, "mpd_px": r.mpd_px,
                          "similarity": r.final_similarity, "doubtful": r.doubtful, "seconds": r.runtime_s,
                          "ct_to_camera": np.asarray(r.ct_to_camera).tolist()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
