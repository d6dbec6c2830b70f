"""Where a compiled step's work goes: each op's bytes and estimated cost, by model part.

XLA's cost analysis gives one total per program. This reads the compiled
program's text instead. Every op of the entry computation is one kernel (a
fusion is one op), and for each it takes: the bytes it reads and writes, and
which of them are in HBM rather than in on-chip memory (`S(n)` layouts); the
TPU compiler's own estimate for it (`estimated_cycles`); and the Flax module
path and pass in its `op_name` metadata. Summed by part (`PARTS`), that shows
which part of the model the step's time goes to.

Loop bodies and called computations count once, as in XLA's cost analysis. A
Pallas kernel (a custom call) counts its bytes; the compiler gives no estimate
for it. Programs compiled for other backends have no estimates; their bytes
still count.
"""

import collections
import math
import re
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

# (substring of an op's scope, the part it is reported as): the first match wins.
PARTS = (
    ("image_encoder", "image encoder"),
    ("prompt_encoder", "prompt encoder"),
    ("/transformer/", "decoder: two-way transformer"),
    ("output_upscaling", "decoder: upscaling"),
    ("output_hypernetworks", "decoder: mask heads (hypernetworks, product)"),
    ("mask_product", "decoder: mask heads (hypernetworks, product)"),
    ("iou_prediction_head", "decoder: IoU head"),
    ("mask_decoder", "decoder: other"),
    ("losses", "losses"),
    ("prompt_simulation", "prompt simulation"),
    ("optimizer", "optimizer update"),
)
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast",
               "copy-done", "after-all", "partition-id", "replica-id", "opt-barrier"}
_CALLS = {"while", "call", "conditional", "async-start"}
_DTYPE_BITS = {"pred": 8, "bf16": 16, "c64": 64, "c128": 128}
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\](\{[^}]*\})?")


class Op(NamedTuple):
  name: str
  opcode: str
  scope: str  # the op_name metadata, "" where it has none
  bytes: int  # operands read and result written, wherever they are placed
  hbm_bytes: int  # of those, the ones placed in HBM
  cycles: int  # the TPU compiler's estimate for the op ("estimated_cycles"), 0 where none
  largest_result: int  # bytes of the result's largest array (a collective's payload)


def arrays(type_text: str) -> Iterator[Tuple[int, List[int], bool]]:
  """(bits, dims, in HBM) of each array in an HLO type (one array, or a tuple)."""
  for dt, dims, layout in _ARRAY.findall(type_text):
    bits = _DTYPE_BITS.get(dt) or int(re.sub(r"\D", "", dt)[:3] or 8)
    space = re.search(r"S\((\d+)\)", layout or "")
    yield bits, [int(d) for d in dims.split(",") if d], not space or space.group(1) == "0"


def _array_bytes(type_text: str, hbm_only: bool = False) -> List[int]:
  return [math.prod(d) * b // 8 for b, d, hbm in arrays(type_text) if hbm or not hbm_only]


def _bytes(type_text: str, hbm_only: bool = False) -> int:
  return sum(_array_bytes(type_text, hbm_only))


def _balanced(s: str, i: int) -> int:
  """The index just past the bracket group that opens at s[i]."""
  pairs = {"(": ")", "{": "}", "[": "]"}
  depth = []
  for j in range(i, len(s)):
    if s[j] in pairs:
      depth.append(pairs[s[j]])
    elif depth and s[j] == depth[-1]:
      depth.pop()
      if not depth:
        return j + 1
  return len(s)


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def instruction(line: str) -> Optional[Tuple[str, str, str, List[str], str]]:
  """(name, type, opcode, operand names, attributes) of one HLO instruction line."""
  m = _INSTR.match(line)
  if not m:
    return None
  i = m.end()
  if line[i] == "(":
    j = _balanced(line, i)
  else:
    j = i
    while j < len(line) and line[j] != " ":
      j = _balanced(line, j) if line[j] in "{[(" else j + 1
  type_text = line[i:j]
  rest = line[j:].lstrip()
  op = re.match(r"([\w\-]+)\(", rest)
  if not op:
    return None
  k = _balanced(rest, op.end() - 1)
  operands = re.findall(r"%([\w.\-]+)", rest[op.end():k - 1])
  return m.group(1), type_text, op.group(1), operands, rest[k:]


def computations(hlo_text: str) -> Tuple[Dict[str, List[str]], str]:
  """({computation name: its instruction lines}, the entry computation's name)."""
  comps: Dict[str, List[str]] = {}
  entry, name = "", None
  for line in hlo_text.splitlines():
    if name is None:
      head = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
      if head:
        name = head.group(2)
        comps[name] = []
        entry = name if head.group(1) else entry
    elif line == "}":
      name = None
    elif line.startswith((" ", "\t")) or not comps[name]:
      comps[name].append(line)
    else:  # a Pallas call's attributes run over several lines
      comps[name][-1] += line
  return comps, entry


def ops(hlo_text: str) -> List[Op]:
  """Every op that moves data or computes, in the entry computation and the loops,
  calls and async starts it runs (each counted once)."""
  comps, entry = computations(hlo_text)
  out: List[Op] = []

  def walk(comp: str, visited: set):
    if comp in visited or comp not in comps:
      return
    visited.add(comp)
    types = {}
    for line in comps[comp]:
      parsed = instruction(line)
      if not parsed:
        continue
      name, type_text, opcode, operands, attrs = parsed
      types[name] = type_text
      if opcode in _CALLS:
        for called in re.findall(r"(?:calls|body|to_apply|branch_computations)=\{?%?([\w.\-]+)",
                                 attrs):
          walk(called, visited)
        continue
      if opcode in _NO_TRAFFIC:
        continue
      scope = re.search(r'op_name="([^"]*)"', attrs)
      result = type_text
      if opcode == "copy-start":  # (destination, source, context): the destination is written
        result = _ARRAY.search(type_text).group(0)
      read = [types.get(o, "") for o in set(operands)]
      cycles = re.search(r'"estimated_cycles":"(\d+)"', attrs)
      out.append(Op(name, opcode, scope.group(1) if scope else "",
                    _bytes(result) + sum(_bytes(t) for t in read),
                    _bytes(result, hbm_only=True) + sum(_bytes(t, hbm_only=True) for t in read),
                    int(cycles.group(1)) if cycles else 0,
                    max(_array_bytes(result), default=0)))

  walk(entry, set())
  return out


def part(scope: str) -> str:
  """The model part an op's scope belongs to (PARTS), or "other"."""
  for key, name in PARTS:
    if key in scope:
      return name
  return "other"


def phase(scope: str) -> str:
  """forward, backward (the transposed pass) or other, from an op's scope."""
  if "transpose(" in scope:
    return "backward"
  return "forward" if "jvp(" in scope else "other"


def breakdown(hlo_text: str) -> Dict[str, Dict[str, float]]:
  """{part: ops, cycles, hbm_bytes, bytes, backward_hbm_bytes, and the part's shares of
  the program's cycles and HBM bytes}, the largest share of cycles first."""
  rows: Dict[str, Dict[str, float]] = collections.defaultdict(
      lambda: dict(ops=0, cycles=0, hbm_bytes=0, bytes=0, backward_hbm_bytes=0))
  for op in ops(hlo_text):
    r = rows[part(op.scope)]
    r["ops"] += 1
    r["cycles"] += op.cycles
    r["hbm_bytes"] += op.hbm_bytes
    r["bytes"] += op.bytes
    r["backward_hbm_bytes"] += op.hbm_bytes if phase(op.scope) == "backward" else 0
  cycles = sum(r["cycles"] for r in rows.values()) or 1
  hbm = sum(r["hbm_bytes"] for r in rows.values()) or 1
  for r in rows.values():
    r["share_of_cycles"] = r["cycles"] / cycles
    r["share_of_hbm_bytes"] = r["hbm_bytes"] / hbm
  return dict(sorted(rows.items(), key=lambda kv: -kv[1]["cycles"]))
