"""What a compiled XLA module needs and does, read from the module itself: its memory, its
collectives and the instructions that move the most bytes (the text of `Compiled.as_text()`)."""

from __future__ import annotations

import collections
import re

# Bytes per element of the HLO element types.
ELEMENT_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                 "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                 "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3b11fnuz": 1}
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
               "ragged-all-to-all", "collective-broadcast")

_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+) = (?P<shape>.+?) (?P<op>[a-z][\w\-]*)\((?P<rest>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+) \((?P<params>.*)\) -> .* \{$")
_IOTA_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\]"
                          r"(?:, device_ids=\S+)? \{(?P<used>[^}]*)\}")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[\d,]*)\}")
_IOTA_V2 = re.compile(r"replica_groups=\[(?P<groups>\d+),(?P<size>\d+)\]<=")


def compiled_memory_bytes(compiled) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled step, per device: arguments, outputs, temporaries,
  aliased (donated) bytes, the generated code, and their total (arguments + outputs +
  temporaries - aliased)."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  sizes = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0) or 0)
           for name in ("argument", "output", "temp", "alias", "generated_code")}
  sizes["total"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  return sizes


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string, a tuple's elements added: 'f32[2,3]{1,0}' -> 24."""
  total = 0
  for element, dims in _ARRAY.findall(shape):
    if element in ELEMENT_BYTES:
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total += size * ELEMENT_BYTES[element]
  return total


def group_size(attributes: str) -> int | None:
  """The number of devices in each replica group of a collective's attributes text, or None
  when it names none (a collective-permute)."""
  iota = _IOTA_GROUPS.search(attributes)
  if iota:
    sizes = dict((name.strip("'"), int(size)) for name, size in
                 (axis.split("=") for axis in iota.group("axes").split(",")))
    used = [name.strip(" '") for name in iota.group("used").split(",") if name.strip()]
    size = 1
    for name in used:
      size *= sizes[name]
    return size
  listed = _LIST_GROUPS.search(attributes)
  if listed:
    return len([d for d in listed.group("first").split(",") if d])
  v2 = _IOTA_V2.search(attributes)
  return int(v2.group("size")) if v2 else None


def collectives(hlo_text: str) -> list[dict]:
  """The collectives of a compiled module: [{'kind', 'group_size', 'count', 'bytes'}], one entry
  per (kind, devices per group), most bytes first. An asynchronous pair (-start / -done)
  counts once, with the bytes of its result (the -done's shape); bytes are per device and per
  appearance in the module text (an op inside a loop body counts once)."""
  found: dict[tuple[str, int | None], list[int]] = collections.defaultdict(lambda: [0, 0])
  groups_of_start: dict[str, int | None] = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    op = match.group("op")
    kind = op.removesuffix("-start").removesuffix("-done")
    if kind not in COLLECTIVES:
      continue
    if op.endswith("-start"):
      groups_of_start[match.group("name")] = group_size(match.group("rest"))
      continue
    if op.endswith("-done"):
      operand = match.group("rest").split(")")[0].strip().lstrip("%")
      size = groups_of_start.get(operand)
    else:
      size = group_size(match.group("rest"))
    entry = found[(kind, size)]
    entry[0] += 1
    entry[1] += shape_bytes(match.group("shape"))
  rows = [{"kind": kind, "group_size": size, "count": count, "bytes": nbytes}
          for (kind, size), (count, nbytes) in found.items()]
  return sorted(rows, key=lambda row: -row["bytes"])


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of an HLO module text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = computations.setdefault(header.group("name"), [line])
    elif current is not None and line.strip() not in ("", "}"):
      current.append(line)
  return computations


def largest_instructions(hlo_text: str, top: int = 5) -> list[dict]:
  """The `top` instructions that move the most bytes (output plus operands, per device) among
  those the device runs (fusions, convolutions, copies, ...; not the instructions inside a
  fusion): [{'name', 'op', 'bytes', 'shape', 'source'}], 'source' the jax op it comes from."""
  computations = _computations(hlo_text)
  fused = set(re.findall(r"kind=k\w+, (?:[^,]*, )*?calls=%?([\w.\-]+)", hlo_text))
  skip = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while",
          "conditional", "call", "after-all", "partition-id", "replica-id"}
  rows = []
  for name, lines in computations.items():
    if name in fused:
      continue
    shapes = dict(re.findall(r"%?([\w.\-]+): ([^,()]+(?:\([^)]*\))?[^,()]*)", lines[0]))
    for line in lines[1:]:
      match = _INSTRUCTION.match(line)
      if match is None:
        continue
      shapes[match.group("name")] = match.group("shape")
      if match.group("op") in skip or match.group("op").endswith("-done"):
        continue
      operands = re.findall(r"%([\w.\-]+)", match.group("rest").split("), ")[0])
      moved = shape_bytes(match.group("shape")) + sum(shape_bytes(shapes.get(o, ""))
                                                       for o in operands)
      source = re.search(r'op_name="([^"]*)"', line)
      rows.append({"name": match.group("name"), "op": match.group("op"), "bytes": moved,
                   "shape": re.sub(r"\{[^}]*\}", "", match.group("shape"))[:120],
                   "source": source.group(1) if source else ""})
  return sorted(rows, key=lambda row: -row["bytes"])[:top]
