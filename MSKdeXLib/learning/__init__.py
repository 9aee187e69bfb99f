"""Learning the decomposition: virtual cohort -> training set -> networks + losses -> training -> inference.

* :mod:`.cohort`     - virtual subjects with known truth from one real CT + labels;
* :mod:`.dataset`    - the ``mskdex-dataset/1`` format: building it from cases and reading it for torch;
* :mod:`.networks`   - generator (radiograph -> channels) and multi-scale PatchGAN discriminator;
* :mod:`.losses`     - paired L1, gradient correlation, LSGAN, feature matching, intensity-sum (OWIS);
* :mod:`.training`   - the training loop (CPU, one or many GPUs);
* :mod:`.inference`  - a model folder + a radiograph -> per-structure estimates with intervals;
* :mod:`.checkpoint` - model and checkpoint files (safetensors + JSON, never pickle).

Add a loss in :mod:`.losses` and give it a weight in the training config's ``losses``.
These modules import torch: import them lazily from anything the Slicer module loads at start-up.
"""

__all__ = ["cohort", "dataset", "networks", "losses", "training", "inference", "checkpoint"]
