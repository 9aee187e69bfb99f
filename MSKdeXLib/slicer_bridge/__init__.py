"""MRML <-> core conversions (the only place where Slicer's RAS frame meets the core's LPS), one
module per kind of node: volumes, labels (label maps, segmentations, colour tables), transforms
(poses), landmarks (point lists), radiographs, channels (decomposed channels, predictions),
registration (``mskdex register`` results), followup (``mskdex followup`` results), tables (tables, charts), display (slice views).

Imports ``slicer`` MRML classes and ``vtk`` only: never ``qt``, ``ctk`` or ``slicer.app``, so it
runs inside the Slicer application and, for tests, with the PyPI package ``slicer-core``.

Frames and conventions
----------------------
* Core volumes are LPS (mm); Slicer volume nodes store ``IJKToRAS``. ``RAS = diag(-1,-1,1) LPS``:
  converted here, once (:func:`ijk_to_ras_matrix`, :func:`volume_from_node`).
* A pose (``ct_to_camera``, CT LPS mm -> camera mm) lives in a linear transform node whose
  matrix-to-parent is ``geometry.pose_to_slicer_ras(pose)``: it maps CT *RAS* points to camera mm.
* A radiograph is a single-slice scalar volume whose axes are the default AP camera axes:
  column i -> patient left (RAS -x), row j -> inferior (RAS -z), k -> posterior (RAS -y), so
  Slicer's Coronal view shows it radiologically (patient right on the left, head up).
  Spacing (col_mm, row_mm, 1); the pixel centre of (row 0, col 0) sits at the RAS origin.
* Channel layers: per-channel scalar volumes (g or cm^3 per pixel) on the radiograph's grid, and
  one label map (value k+1 = channel k where it dominates) with a colour table of structures.
"""

from __future__ import annotations

import vtk  # noqa: F401  (sb.vtk: what callers use for matrices of these nodes)

from ..errors import UserError  # noqa: F401
from .channels import (ESTIMATE_COLUMNS, ChannelLayers, channels_from_prediction, channels_to_nodes,
                       estimates_table_node, model_grid_ijk_to_ras, prediction_input_spacing, read_estimates)
from .common import ATTR, LPS_RAS, _node_array, ensure_default_colors, numpy_matrix, vtk_matrix
from .display import checkerboard, set_overlay, slice_logic, slice_rgba
from .followup import (FOLLOWUP_COLUMNS, FollowupNodes, followup_rows, followup_to_nodes, followup_warnings,
                       image_to_vector_node, read_followup, write_registration_json)
from .labels import (color_table_node, labelmap_from_node, labelmap_from_segmentation, labelmap_to_node,
                     labelmap_to_segmentation, segment_names, set_structure_visible, structure_rows)
from .landmarks import (landmark_pairs, landmarks_from_markups, landmarks_to_markups,
                        radiograph_points_from_markups, write_landmarks_csv)
from .radiographs import (RADIOGRAPH_DIRECTIONS_RAS, radiograph_from_node, radiograph_ijk_to_ras,
                          radiograph_to_node, write_radiograph_file)
from .registration import RegistrationNodes, registration_for, registration_mismatch, registration_to_nodes
from .tables import METRIC_COLUMNS, bar_chart, metrics_table_node, rows_from_table_node, table_node_from_rows
from .transforms import pose_from_transform_node, pose_to_transform_node
from .volumes import ijk_to_ras_matrix, volume_from_node, volume_to_node

__all__ = [
    "ATTR", "ChannelLayers", "ESTIMATE_COLUMNS", "FOLLOWUP_COLUMNS", "FollowupNodes", "LPS_RAS", "METRIC_COLUMNS", "RADIOGRAPH_DIRECTIONS_RAS",
    "RegistrationNodes", "UserError", "bar_chart", "channels_from_prediction", "channels_to_nodes", "checkerboard",
    "color_table_node", "ensure_default_colors", "estimates_table_node", "followup_rows", "followup_to_nodes",
    "followup_warnings", "image_to_vector_node", "read_followup", "ijk_to_ras_matrix", "labelmap_from_node",
    "labelmap_from_segmentation", "labelmap_to_node", "labelmap_to_segmentation", "landmark_pairs",
    "landmarks_from_markups", "landmarks_to_markups", "metrics_table_node", "model_grid_ijk_to_ras", "numpy_matrix",
    "pose_from_transform_node", "pose_to_transform_node", "prediction_input_spacing", "radiograph_from_node",
    "radiograph_ijk_to_ras", "radiograph_points_from_markups", "radiograph_to_node", "read_estimates",
    "registration_for", "registration_mismatch", "registration_to_nodes", "rows_from_table_node", "segment_names", "set_overlay", "set_structure_visible",
    "slice_logic", "slice_rgba", "structure_rows", "table_node_from_rows", "volume_from_node", "volume_to_node",
    "vtk_matrix", "write_landmarks_csv", "write_radiograph_file", "write_registration_json",
]
