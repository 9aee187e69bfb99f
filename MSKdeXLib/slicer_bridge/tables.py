"""Table nodes (metrics, estimates, registration bodies) and bar charts."""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import slicer
import vtk

from ..anatomy.ct_metrics import METRIC_COLUMNS  # the metrics table's columns, named once (re-exported)
from .common import _add


def table_node_from_rows(rows: Sequence[dict], scene, name: str = "MSKdeX table",
                         columns: Sequence[str] | None = None, node=None):
    """A table node: one column per key (numbers -> double columns, others -> strings)."""
    rows = list(rows)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    table = vtk.vtkTable()
    for c in cols:
        vals = [r.get(c) for r in rows]
        numeric = all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                      for v in vals if v is not None) and any(v is not None for v in vals)
        arr = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        arr.SetName(c)
        for v in vals:
            if numeric:
                arr.InsertNextValue(float("nan") if v is None else float(v))
            else:
                arr.InsertNextValue("" if v is None else "; ".join(map(str, v)) if isinstance(v, list) else str(v))
        table.AddColumn(arr)
    if node is None:
        node = _add(scene, slicer.vtkMRMLTableNode(), name)
    node.SetAndObserveTable(table)
    for c in cols:
        unit = c.rsplit("_", 1)[-1] if "_" in c else ""
        if unit in ("g", "cm3", "mm", "hu", "HU", "s"):
            node.SetColumnUnitLabel(c, {"cm3": "cm^3", "hu": "HU"}.get(unit, unit))
    node.SetLocked(True)
    return node


def rows_from_table_node(node) -> list[dict]:
    """The rows of a table node as dicts (numbers as float, text as str)."""
    table = node.GetTable()
    cols = [table.GetColumn(c) for c in range(table.GetNumberOfColumns())]
    out = []
    for r in range(table.GetNumberOfRows()):
        row = {}
        for col in cols:
            v = col.GetValue(r)
            row[col.GetName()] = float(v) if isinstance(col, vtk.vtkDataArray) else str(v)
        out.append(row)
    return out


def metrics_table_node(rows: Sequence[dict], scene, name: str = "MSKdeX CT metrics", node=None):
    """Table node of ``metrics.StructureMetrics.to_dict()`` rows."""
    cols = [c for c in METRIC_COLUMNS if any(c in r for r in rows)]
    return table_node_from_rows(rows, scene, name, cols, node)


def bar_chart(table_node, scene, x_column: str = "name", y_columns: Iterable[str] = ("mass_g",),
              name: str = "MSKdeX chart", chart=None):
    """A bar chart (plot chart node) of columns of a table node, one series per column."""
    if chart is None:
        chart = _add(scene, slicer.vtkMRMLPlotChartNode(), name)
    chart.RemoveAllPlotSeriesNodeIDs()
    for col in y_columns:
        series = _add(scene, slicer.vtkMRMLPlotSeriesNode(), f"{name} {col}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(x_column)
        series.SetLabelColumnName(x_column)
        series.SetYColumnName(col)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeBar)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_column)
    chart.SetYAxisTitle(", ".join(y_columns))
    return chart

