"""Projection of a CT onto a detector: camera and pose, per-structure DRR channels, radiograph simulation.

* :mod:`.geometry`  - cone-beam camera, rigid poses, the default AP view (frames in docs/frames.md);
* :mod:`.rendering` - attenuation DRRs and exact per-structure mass / volume channels (PyTorch);
* :mod:`.simulate`  - X-ray physics on top of the renderer (spectrum, scatter, blur, noise, detector);
* :mod:`.filters`   - image filters shared by the simulation and the registration (separable Gaussian);
* :mod:`.drr_outputs` - the ``mskdex drr`` product: DRR + channels + a summary checked against CT metrics.

Units: mm on the detector and in the CT's LPS frame; channel sums in g and cm^3.
"""

__all__ = ["geometry", "rendering", "simulate", "filters", "drr_outputs"]
