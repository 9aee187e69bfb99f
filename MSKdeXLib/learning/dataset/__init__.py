"""Training sets in the ``mskdex-dataset/1`` format (docs/CONTRACTS.md, "Training data set").

* :mod:`.format`  - the format, owned in one place: ``FORMAT``, the quantities, record tensors, ``dataset.json``
  (writing and reading);
* :mod:`.builder` - case folders (virtual subjects or registered real cases) -> a dataset folder;
* :mod:`.records` - records for torch: loading, the joint augmentation, radiograph normalisation, a ``Dataset``.
"""

__all__ = ["format", "builder", "records"]
