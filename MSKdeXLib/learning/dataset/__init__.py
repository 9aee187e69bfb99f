"""Training sets in the ``mskdex-dataset/1`` format (docs/CONTRACTS.md, "Training data set").

* :mod:`.builder` - case folders (virtual subjects or registered real cases) -> a dataset folder;
* :mod:`.records` - reading a dataset folder: info, records, augmentation, a torch ``Dataset``.
"""

__all__ = ["builder", "records"]
