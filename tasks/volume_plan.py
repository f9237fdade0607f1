"""Which instance goes on which volume: studies stay whole unless one alone exceeds a volume."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from tasks.manifest import Manifest

FIXED_OVERHEAD_BYTES = 2 * 1024 * 1024
"""ISO system area, DICOMDIR header, README/INDEX and web content."""
PER_INSTANCE_OVERHEAD_BYTES = 4096
"""Directory record, ISO directory entry and sector padding, rounded up."""


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


def _cost(output: Output) -> int:
    return output.size + PER_INSTANCE_OVERHEAD_BYTES


def _units(manifest: Manifest, outputs: dict[int, Output], capacity: int) -> list[list[int]]:
    """Studies as units; a study that alone exceeds a volume becomes its series, then instances."""
    by_study: dict[int, list[int]] = defaultdict(list)
    for instance in manifest.instances:
        if instance.index in outputs:
            by_study[instance.study].append(instance.index)
    units: list[list[int]] = []
    for indices in by_study.values():
        if sum(_cost(outputs[i]) for i in indices) <= capacity:
            units.append(indices)
            continue
        by_series: dict[int, list[int]] = defaultdict(list)
        for i in indices:
            by_series[manifest.instances[i].series].append(i)
        for series in by_series.values():
            units.extend([series] if sum(_cost(outputs[i]) for i in series) <= capacity else [[i] for i in series])
    return units


def plan_volumes(manifest: Manifest, outputs: dict[int, Output], capacity_bytes: int) -> list[list[int]]:
    """Fill volumes in scan order, one unit (study, else series, else instance) at a time."""
    capacity = capacity_bytes - FIXED_OVERHEAD_BYTES
    volumes: list[list[int]] = [[]]
    used = 0
    for unit in _units(manifest, outputs, capacity):
        cost = sum(_cost(outputs[i]) for i in unit)
        if cost > capacity:
            raise CapacityError(f"one instance of {cost} bytes exceeds the volume capacity of {capacity_bytes} bytes")
        if used + cost > capacity and volumes[-1]:
            volumes.append([])
            used = 0
        volumes[-1].extend(unit)
        used += cost
    return [v for v in volumes if v]
