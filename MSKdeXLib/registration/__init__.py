"""Rigid 2D-3D registration of CT bones to a radiograph (DRR vs radiograph).

* :mod:`.settings`   - the settings: shared ones and one group per body kind;
* :mod:`.bodies`     - rigid bodies (structures that move together), joint centres, groups;
* :mod:`.kinds`      - the body kinds (first, free, joint, part), one class each;
* :mod:`.views`      - pyramid levels, the bodies' small volumes and DRRs, detector windows;
* :mod:`.pipeline`   - :func:`~.pipeline.register`: the stages every body goes through;
* :mod:`.run`        - ``mskdex register`` as one call (inputs, registration.json, channels, QA);
* :mod:`.documents`  - a registration.json as another command's input (its pose and camera, checked);
* :mod:`.similarity` - NCC, gradient correlation, patch-wise gradient NCC, multi-scale, masks;
* :mod:`.optimize`   - pose parameters, CMA-ES global search, gradient refinement;
* :mod:`.initialise` - default view, landmarks (PnP), in-plane rotation + shift search;
* :mod:`.bodyvolume` - cropped, block-averaged volumes per body and of the other tissue;
* :mod:`.metrics`    - mTRE and projection distance against a known pose;
* :mod:`.qa`         - the QA picture;
* :mod:`.articulated` - simulated radiographs with bodies at their own poses (hip rotations), for
  tests and benchmarks.
"""
