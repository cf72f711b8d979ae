"""What a compiled program exchanges between devices, read from its optimised HLO."""

from __future__ import annotations

import re

import numpy as np

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")

# "%name = <result type> <opcode>(" at the start of an HLO instruction.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(?P<type>.+?)\s+(?P<opcode>[a-z][a-z0-9-]*)\(")
# One array type such as "f32[4,8,32]{2,1,0}" or "pred[]".
_ARRAY = re.compile(r"\b(?P<dtype>pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[(?P<dims>[\d,]*)\]")
_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}
# The three ways HLO prints replica groups: explicit lists, mesh axes, and iota [groups, size]<=[devices].
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]\s*\{(?P<over>[^}]*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]<=")


def _array_bytes(type_text: str) -> int:
    total = 0
    for match in _ARRAY.finditer(type_text):
        dtype, dims = match["dtype"], match["dims"]
        if dtype in _ITEMSIZE:
            size = _ITEMSIZE[dtype]
        elif dtype.startswith("f8"):
            size = 1
        else:
            size = int(dtype[1:]) // 8
        total += size * int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64))
    return total


def _group_size(line: str) -> int | None:
    """Devices in each replica group of a collective instruction, or None if the text does not say."""
    if match := _EXPLICIT_GROUPS.search(line):
        return len([d for d in match["first"].split(",") if d])
    if match := _MESH_GROUPS.search(line):
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", match["axes"]))
        return int(np.prod([int(sizes[a]) for a in re.findall(r"'([^']+)'", match["over"])]))
    if match := _IOTA_GROUPS.search(line):
        return int(match["size"])
    return None


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes per device in the results of each kind of collective in an HLO module (`compiled.as_text()`).

    For all-to-all and all-reduce the result has the size of the buffer each device hands over; for
    all-gather it is the gathered result. Asynchronous pairs are counted once, at their "-done" half (whose
    result is the collective's); collectives wrapped in async computations are counted where they appear.
    Every instruction counts once: collectives inside loops are not multiplied by the trip count.
    Collectives over groups of one device (what a size-1 mesh axis leaves behind) move nothing and are
    left out.
    Returns {collective: bytes} for every kind in `COLLECTIVES` (0 where absent).
    """
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        opcode = match["opcode"].removesuffix("-done")
        if opcode in totals and _group_size(line) != 1:
            totals[opcode] += _array_bytes(match["type"])
    return totals
