"""Which instance goes on which volume: studies stay whole unless one alone exceeds a volume.

What counts against a volume's capacity: every instance's file plus its directory record and
sector padding; the fixed part of every volume (ISO system area, DICOMDIR header, README.TXT,
INDEX.HTM); the viewer bundle, on every volume (``reserved_bytes``); the web content, i.e. one
thumbnail per series present on the volume and a second copy of every report PDF.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tasks.manifest import Manifest

FIXED_OVERHEAD_BYTES = 2 * 1024 * 1024
"""ISO system area, DICOMDIR header, README/INDEX."""
PER_INSTANCE_OVERHEAD_BYTES = 4096
"""Directory record, ISO directory entry and sector padding, rounded up."""
PER_SERIES_WEB_BYTES = 256 * 1024
"""A series thumbnail (a 256-pixel PNG is 30-150 KB) and its share of INDEX.HTM, rounded up."""
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"


class CapacityError(Exception):
    pass


@dataclass
class Output:
    """The file an instance will have on the media."""
    index: int
    path: str
    transfer_syntax: str
    sop_instance_uid: str
    size: int


class _Costs:
    """Bytes each instance and unit takes on a volume."""

    def __init__(self, manifest: Manifest, outputs: dict[int, Output]) -> None:
        self.manifest = manifest
        self.outputs = outputs

    def instance(self, index: int) -> int:
        size = self.outputs[index].size + PER_INSTANCE_OVERHEAD_BYTES
        if self.manifest.instances[index].sop_class_uid == ENCAPSULATED_PDF:
            size += self.outputs[index].size  # its PDF is copied to the web content too
        return size

    def unit(self, unit: list[int], series_on_volume: set[int]) -> int:
        new_series = {self.manifest.instances[i].series for i in unit} - series_on_volume
        return sum(self.instance(i) for i in unit) + PER_SERIES_WEB_BYTES * len(new_series)


def _units(manifest: Manifest, costs: _Costs, capacity: int) -> list[list[int]]:
    """Studies as units; a study that alone exceeds a volume becomes its series, then instances."""
    by_study: dict[int, list[int]] = defaultdict(list)
    for instance in manifest.instances:
        if instance.index in costs.outputs:
            by_study[instance.study].append(instance.index)
    units: list[list[int]] = []
    for indices in by_study.values():
        if costs.unit(indices, set()) <= capacity:
            units.append(indices)
            continue
        by_series: dict[int, list[int]] = defaultdict(list)
        for i in indices:
            by_series[manifest.instances[i].series].append(i)
        for series in by_series.values():
            units.extend([series] if costs.unit(series, set()) <= capacity else [[i] for i in series])
    return units


def plan_volumes(manifest: Manifest, outputs: dict[int, Output], capacity_bytes: int | None,
                 reserved_bytes: int = 0) -> list[list[int]]:
    """Fill volumes in scan order, one unit (study, else series, else instance) at a time.

    ``capacity_bytes`` None means one volume of any size (a USB folder); ``reserved_bytes`` is
    taken on every volume (the viewer bundle)."""
    if capacity_bytes is None:
        return [[i.index for i in manifest.instances if i.index in outputs]]
    capacity = capacity_bytes - FIXED_OVERHEAD_BYTES - reserved_bytes
    if capacity <= 0:
        raise CapacityError(f"a volume of {capacity_bytes} bytes has no room left after the disc's fixed content "
                            f"({FIXED_OVERHEAD_BYTES + reserved_bytes} bytes, viewer included)")
    costs = _Costs(manifest, outputs)
    volumes: list[list[int]] = [[]]
    series_on_volume: set[int] = set()
    used = 0
    for unit in _units(manifest, costs, capacity):
        cost = costs.unit(unit, series_on_volume)
        if used + cost > capacity and volumes[-1]:
            volumes.append([])
            series_on_volume, used = set(), 0
            cost = costs.unit(unit, series_on_volume)
        if cost > capacity:
            raise CapacityError(f"one instance of {cost} bytes exceeds the volume capacity of {capacity_bytes} bytes")
        volumes[-1].extend(unit)
        series_on_volume |= {manifest.instances[i].series for i in unit}
        used += cost
    return [v for v in volumes if v]
