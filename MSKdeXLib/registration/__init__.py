"""Rigid 2D-3D registration of CT bones to a radiograph (bone-only DRR vs radiograph).

* :mod:`.similarity` - NCC, gradient correlation, patch-wise gradient NCC, multi-scale, masks;
* :mod:`.optimize`   - pose parameters, CMA-ES global search, gradient refinement;
* :mod:`.initialise` - default view, landmarks (PnP), in-plane rotation + shift search;
* :mod:`.pipeline`   - bodies, pyramid, :func:`~.pipeline.register`, mTRE;
* :mod:`.qa`         - the QA picture;
* :mod:`.articulated` - simulated radiographs with bodies at their own poses (hip rotations), for
  tests and benchmarks.
"""
