"""What a compiled step costs, read from the compiler: the collectives in its HLO, its memory, and a
roofline estimate of its time on a chip (`evit_jax.aot` reports them; tests check the collectives).

Collectives are parsed from ``compiled.as_text()`` (the optimised, partitioned per-device HLO):
every ``all-reduce``, ``all-gather``, ``reduce-scatter``, ``all-to-all`` and ``collective-permute``
(and their asynchronous ``-start`` forms; ``-done`` halves are not counted twice). One collective is
counted once however many times the text holds it: the TPU compiler clones a collective into many
"async collective fusion" computations that each move a piece of it, all with the collective's own
``channel_id`` (L1's classifier backward on v5e:2x2: one all-gather written 184 times), so
instructions that repeat a kind and channel id already seen are skipped. An op's bytes are
the larger of its operands' and its result's sizes per device: the full buffer of an all-gather (its
result), of a reduce-scatter (its operand) and of an all-reduce (either). An op inside a loop body
is counted once, as written.

The roofline: a step takes at least ``max(flops / peak FLOP/s, bytes accessed / HBM bandwidth)``
with the per-device ``flops`` and ``bytes accessed`` of ``compiled.cost_analysis()``. It ignores
collectives (reported apart, with their time at the ICI bandwidth where the chip table has it) and
any inefficiency of the compiled kernels: an optimistic bound, not a measurement.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
                "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str          # one of COLLECTIVES
    bytes: int         # per device (see the module docstring)
    shapes: str        # the result type without layouts, e.g. "f32[512,224,224,3]"
    name: str          # the instruction's name
    arrays: tuple[tuple[str, tuple[int, ...]], ...] = ()  # every (dtype, dims) of the result type


def _type_bytes(type_str: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_str):
        if dtype not in _DTYPE_BYTES:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _DTYPE_BYTES[dtype]
    return int(total)


def _split_type(rest: str) -> tuple[str, str]:
    """'(f32[2], s32[]) all-reduce(%a), ...' -> ('(f32[2], s32[])', 'all-reduce(%a), ...')."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return rest[:i + 1], rest[i + 1:].lstrip()
    head, _, tail = rest.partition(" ")
    return head, tail


_CHANNEL = re.compile(r"\bchannel_id=(\d+)")


def _instructions(hlo_text: str) -> Iterable[tuple[str, str, str, str, str]]:
    """(name, result type, opcode, operand text, attribute text) of every instruction of an HLO
    module's text."""
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if not m:
            continue
        type_str, rest = _split_type(line[m.end():])
        opcode, paren, args = rest.partition("(")
        if not paren:
            continue
        depth, end = 1, len(args)
        for i, c in enumerate(args):
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                end = i
                break
        yield m.group(1), type_str, opcode.strip(), args[:end], args[end + 1:]


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled module's text (see the module docstring)."""
    sizes: dict[str, int] = {}
    seen: set[tuple[str, str]] = set()
    found = []
    for name, type_str, opcode, args, attributes in _instructions(hlo_text):
        sizes[name] = _type_bytes(type_str)
        kind = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
        if kind not in COLLECTIVES:
            continue
        channel = _CHANNEL.search(attributes)
        if channel:
            if (kind, channel.group(1)) in seen:
                continue
            seen.add((kind, channel.group(1)))
        operand_bytes = sum(sizes.get(o, 0) for o in _OPERAND.findall(args))
        result = max((_type_bytes(t) for t in _top_level_types(type_str)), default=0)
        arrays = tuple((d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(type_str))
        found.append(Collective(kind, max(operand_bytes, result), _strip_layouts(type_str), name, arrays))
    return found


def _top_level_types(type_str: str) -> list[str]:
    """The element types of a tuple type (an async start's (operands..., results...)), or the type."""
    if not type_str.startswith("("):
        return [type_str]
    return [f"{d}[{s}]" for d, s in _ARRAY.findall(type_str)]


def _strip_layouts(type_str: str) -> str:
    """The array types without layouts; a long tuple (combined collectives) as its size and first ones."""
    arrays = [f"{d}[{s}]" for d, s in _ARRAY.findall(type_str)]
    if len(arrays) > 3:
        return f"({len(arrays)} arrays: {', '.join(arrays[:2])}, ...)"
    return ", ".join(arrays)


def summarize(found: list[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": total}} for every kind of COLLECTIVES."""
    out = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
    for c in found:
        out[c.kind]["count"] += 1
        out[c.kind]["bytes"] += c.bytes
    return out


def cost(compiled: Any) -> dict[str, float]:
    """flops, bytes accessed, transcendentals and the compiler's optimal_seconds of a compiled
    step, per device (``compiled.cost_analysis()``; keys missing from it are 0)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", 0.0)),
            "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
            "transcendentals": float(analysis.get("transcendentals", 0.0)),
            "optimal_seconds": float(analysis.get("optimal_seconds", float("nan")))}


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of a compiled step: arguments, outputs, temporaries, generated code, aliased
    (outputs written into donated arguments) and ``total`` = arguments + outputs - aliased +
    temporaries + code (what must fit in the chip's memory at once)."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "code": int(m.generated_code_size_in_bytes),
           "aliased": int(m.alias_size_in_bytes)}
    out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
    return out


def roofline_seconds(flops: float, bytes_accessed: float, peak_tflops: float, hbm_gb_per_s: float) -> dict[str, float]:
    """{"compute_s", "memory_s", "step_s" (the larger), "bound": "compute" | "memory"}."""
    compute = flops / (peak_tflops * 1e12)
    mem = bytes_accessed / (hbm_gb_per_s * 1e9)
    return {"compute_s": compute, "memory_s": mem, "step_s": max(compute, mem),
            "bound": "compute" if compute >= mem else "memory"}
