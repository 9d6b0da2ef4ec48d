"""Static timing estimate of a yosys ``synth_xilinx`` netlist (UltraScale+ -2, no placement).

No Vivado exists on this machine, so the clock a design reaches is estimated from the mapped netlist:
:func:`analyze` walks every register-to-register path of a flattened ``write_json`` netlist, counts the
LUT levels, CARRY8 elements and DSP48E2 stages on it, and adds up a small delay model
(:class:`DelayModel`, documented with its calibration in ``docs/timing.md``). It reports the longest
path with its start and end signals and their source lines (yosys ``src`` attributes), and an
estimated Fmax. Trust the ranking and the level counts; treat the nanoseconds as +-30 %.

DSP48E2 pipeline registers: ``xilinx_dsp`` in this yosys never packs A/B/M/P registers into a DSP48E2
(``-family xcup``), so every DSP in the netlist is combinational with fabric flip-flops around it.
The walk therefore decides per DSP what a packer (Vivado) can absorb: an input register when every
bit of A and B comes straight from a flip-flop, an output register when every used output bit drives
only flip-flop or shift-register (SRL) data inputs. Absorbed registers end or start a path inside the DSP.
"""

import math
import re
from dataclasses import dataclass, field, asdict

__all__ = ["DelayModel", "Path", "TimingResult", "analyze", "format_result", "format_path_line", "BUDGET_MHZ"]

#: The clock the design is pipelined for (issue 12: 300 MHz on a -2 UltraScale+); the report counts the
#: register-to-register endpoints whose estimate misses it.
BUDGET_MHZ = 300.0


@dataclass(frozen=True)
class DelayModel:
    """Delays in ns for an UltraScale+ -2 part (see ``docs/timing.md`` for sources and calibration).

    Attributes
    ----------
    ff_clk_to_q, ff_setup : float
        Fabric flip-flop clock-to-Q and setup.
    clock_margin : float
        Clock uncertainty, skew and jitter taken off every period.
    lut : float
        LUT logic delay (any input to O), also INV.
    net : float
        Routing delay of one net hop between cells (a fanout-1 net).
    net_fanout : float
        Extra routing delay per doubling of a net's fanout (Vivado replicates very high-fanout
        drivers; this charges them part of the cost).
    carry_entry : float
        CARRY8: from an S or DI input into the carry chain.
    carry_bit : float
        CARRY8: carry ripple per bit (8 per CARRY8); cascaded CARRY8s connect without a net hop.
    carry_sum : float
        CARRY8: carry (or S) to an O (sum) output.
    muxf : float
        MUXF7/MUXF8/MUXF9.
    dsp_mult : float
        DSP48E2: A/B/D (pin or absorbed input register) through the multiplier and ALU to P (pin or
        absorbed P register), no M register.
    dsp_alu : float
        DSP48E2: C, PCIN, CARRYIN, OPMODE, ALUMODE, INMODE to P (no multiplier).
    dsp_clk_to_p : float
        DSP48E2: absorbed P register clock to P output.
    dsp_setup : float
        DSP48E2: setup at an input pin that ends in an absorbed register.
    bram_clk_to_out, uram_clk_to_out : float
        Block RAM / UltraRAM clock to data out without their optional output register.
    ram_setup : float
        Setup of block RAM, UltraRAM, LUTRAM and SRL inputs (address, data, enables).
    lutram_clk_to_out : float
        LUTRAM/SRL write clock to output.
    """

    ff_clk_to_q: float = 0.10
    ff_setup: float = 0.05
    clock_margin: float = 0.15
    lut: float = 0.12
    net: float = 0.33
    net_fanout: float = 0.04
    carry_entry: float = 0.25
    carry_bit: float = 0.012
    carry_sum: float = 0.10
    muxf: float = 0.10
    dsp_mult: float = 2.40
    dsp_alu: float = 1.20
    dsp_clk_to_p: float = 0.35
    dsp_setup: float = 0.30
    bram_clk_to_out: float = 1.00
    uram_clk_to_out: float = 1.30
    ram_setup: float = 0.40
    lutram_clk_to_out: float = 0.90


@dataclass
class Path:
    """One timing path: ``delay_ns`` from ``start`` to ``end`` (signal names with ``[bit]``).

    ``carry4`` is the carry-chain length in 4-bit elements: this yosys maps adders onto CARRY4 cells
    even for ``-family xcup`` (Vivado packs two into one CARRY8), and a CARRY8 counts as two.
    """

    delay_ns: float
    lut_levels: int
    carry4: int
    dsp_stages: int
    muxf: int
    start: str
    end: str
    start_src: str = ""
    end_src: str = ""
    start_kind: str = "reg"
    end_kind: str = "reg"
    dsps: list = field(default_factory=list)   # [{"cell", "in_reg", "out_reg"}] along the path
    cells: list = field(default_factory=list)  # cell types along the path

    @property
    def fmax_mhz(self):
        return 1000.0 / self.delay_ns if self.delay_ns > 0 else float("inf")


@dataclass
class TimingResult:
    """The outcome of :func:`analyze`.

    ``worst`` is the longest register-to-register path (by delay), ``deepest`` the one with the most
    LUT levels; ``worst_io`` the longest path that starts at a top-level input or ends at a top-level
    output (these continue in the surrounding design, so they are reported but do not set Fmax).
    ``paths`` lists the longest register-to-register path into each of the ``top_n`` worst distinct
    endpoints (an endpoint is a signal: the bits of one register or memory port count once), worst
    first; ``paths[0]`` is ``worst``. ``over_budget`` counts the distinct register-to-register endpoints
    whose longest path misses ``budget_mhz`` (:data:`BUDGET_MHZ` unless :func:`analyze` is told otherwise).
    """

    model: DelayModel
    worst: Path | None
    deepest: Path | None
    worst_io: Path | None
    dsp_total: int
    dsp_in_reg: int
    dsp_out_reg: int
    unknown_cells: dict
    paths: list = field(default_factory=list)
    over_budget: int = 0
    budget_mhz: float = BUDGET_MHZ

    @property
    def fmax_mhz(self):
        return self.worst.fmax_mhz if self.worst else float("inf")

    def to_json(self):
        def p(path):
            if path is None:
                return None
            d = asdict(path)
            d["fmax_mhz"] = round(path.fmax_mhz, 1)
            d["delay_ns"] = round(path.delay_ns, 3)
            return d
        return {"model": asdict(self.model), "fmax_mhz": round(self.fmax_mhz, 1),
                "worst": p(self.worst), "deepest": p(self.deepest), "worst_io": p(self.worst_io),
                "dsp_total": self.dsp_total, "dsp_absorbable_input_regs": self.dsp_in_reg,
                "dsp_absorbable_output_regs": self.dsp_out_reg, "unknown_cells": self.unknown_cells,
                "paths": [p(x) for x in self.paths], "budget_mhz": self.budget_mhz,
                "endpoints_over_budget": self.over_budget}


_FF = {"FDRE", "FDSE", "FDCE", "FDPE"}
_LUT = {"LUT1", "LUT2", "LUT3", "LUT4", "LUT5", "LUT6", "INV"}
_MUXF = {"MUXF7", "MUXF8", "MUXF9"}
_BRAM = {"RAMB18E2", "RAMB36E2"}
# Memory ports the build cuts out of the netlist (m3vit_hw.build.memories): timed as block RAM ports.
_CUT_MEMORY = ("m3vit_bbrd_", "m3vit_bbwr_")
_URAM = {"URAM288", "URAM288_BASE"}
_CONST_CELLS = {"GND", "VCC"}
_IGNORED = {"$scopeinfo"}
_CLOCK_PORTS = {"C", "CLK", "WCLK", "CLKARDCLK", "CLKBWRCLK"}
# DSP48E2 inputs through the multiplier / straight to the ALU; the rest (clock enables, resets) only end paths.
_DSP_MULT_IN = {"A", "B", "D", "ACIN", "BCIN"}
_DSP_ALU_IN = {"C", "PCIN", "CARRYIN", "CARRYCASCIN", "MULTSIGNIN", "OPMODE", "ALUMODE", "INMODE", "CARRYINSEL"}


def _is_bit(b):
    return isinstance(b, int)


class _Walker:
    def __init__(self, module, model):
        self.m = model
        self.cells = module["cells"]
        self.ports = module.get("ports", {})
        self.names = {}          # bit -> (name, index, src), best public name
        for name, net in module.get("netnames", {}).items():
            hidden = net.get("hide_name", 0) or name.startswith("$")
            src = net.get("attributes", {}).get("src", "")
            for i, b in enumerate(net["bits"]):
                if not _is_bit(b):
                    continue
                old = self.names.get(b)
                rank = (hidden, name.count("."), len(name))
                if old is None or rank < old[3]:
                    label = name if len(net["bits"]) == 1 else f"{name}[{i}]"
                    self.names[b] = (label, i, src, rank)
        # bit -> number of sink pins
        self.fanout = {}
        for cell in self.cells.values():
            for port, bits in cell["connections"].items():
                if cell.get("port_directions", {}).get(port) == "input":
                    for b in bits:
                        if _is_bit(b):
                            self.fanout[b] = self.fanout.get(b, 0) + 1
        for port in self.ports.values():
            if port["direction"] == "output":
                for b in port["bits"]:
                    if _is_bit(b):
                        self.fanout[b] = self.fanout.get(b, 0) + 1
        self.unknown = {}

    def label(self, b):
        n = self.names.get(b)
        return (n[0], n[2]) if n else (f"<net {b}>", "")

    def net_delay(self, b):
        return self.m.net + self.m.net_fanout * math.log2(max(1, self.fanout.get(b, 1)))

    def build(self):
        """Nodes are net bits plus internal ("cell", name, k) nodes; arcs carry (delay, counters)."""
        m = self.m
        arcs = {}        # node -> list of (dst, delay, (lut, carry, dsp, muxf), tag)
        starts = {}      # node -> (arrival, kind)
        ends = {}        # node -> list of (setup, kind, label_bit)
        self.sink_ff_only = {}

        def arc(src, dst, delay, counts=(0, 0, 0, 0), tag=None):
            arcs.setdefault(src, []).append((dst, delay, counts, tag))

        def end(node, setup, kind, bit):
            ends.setdefault(node, []).append((setup, kind, bit))

        # Loads of each bit, to see whether a DSP output feeds only flip-flop D pins.
        loads = {}
        for cname, cell in self.cells.items():
            for port, bits in cell["connections"].items():
                if cell.get("port_directions", {}).get(port) == "input":
                    for b in bits:
                        if _is_bit(b):
                            loads.setdefault(b, []).append((cell["type"], port))
        ff_q = set()
        for cell in self.cells.values():
            if cell["type"] in _FF:
                ff_q.update(b for b in cell["connections"]["Q"] if _is_bit(b))

        self.dsp_total = self.dsp_in = self.dsp_out = 0
        self.dsp_info = {}
        for cname, cell in self.cells.items():
            t = cell["type"]
            conn = cell["connections"]
            dirs = cell.get("port_directions", {})
            ins = {p: [b for b in bits if _is_bit(b)] for p, bits in conn.items() if dirs.get(p) == "input"}
            outs = {p: [b for b in bits if _is_bit(b)] for p, bits in conn.items() if dirs.get(p) == "output"}
            if t in _IGNORED:
                continue
            if t in _FF:
                for p, bits in ins.items():
                    if p not in _CLOCK_PORTS:
                        for b in bits:
                            end(b, m.ff_setup, "reg", conn["Q"][0])
                for b in outs.get("Q", []):
                    starts[b] = (m.ff_clk_to_q, "reg")
            elif t in _LUT:
                o = outs["O"][0]
                for bits in ins.values():
                    for b in bits:
                        arc(b, o, self.net_delay(b) + m.lut, (1, 0, 0, 0), t)
            elif t in _MUXF:
                o = outs["O"][0]
                for p, bits in ins.items():
                    for b in bits:
                        # I0/I1 come from the slice's own LUTs or MUXFs: no routed net.
                        d = m.muxf + (self.net_delay(b) if p == "S" else 0.0)
                        arc(b, o, d, (0, 0, 0, 1), t)
            elif t in ("CARRY8", "CARRY4"):
                n = 8 if t == "CARRY8" else 4
                w = n // 4          # counted in 4-bit carry elements
                c = [("carry", cname, i) for i in range(n)]
                cin = conn.get("CI", ["0"])[0]
                s, di = conn["S"], conn["DI"]
                co, o = conn.get("CO", []), conn.get("O", [])
                prev = None
                if _is_bit(cin):
                    # A cascaded CARRY8 CO -> CI is a dedicated wire; anything else is routed.
                    drv_is_carry = cin in self.carry_outs
                    arc(cin, ("cin", cname), (0.0 if drv_is_carry else self.net_delay(cin)),
                        (0, w, 0, 0), t)
                    prev = ("cin", cname)
                for i in range(n):
                    for b in (s[i], di[i]):
                        if _is_bit(b):
                            arc(b, c[i], self.net_delay(b) + m.carry_entry, (0, w, 0, 0), t)
                    if prev is not None:
                        arc(prev, c[i], m.carry_bit)
                    if i < len(o) and _is_bit(o[i]):
                        if prev is not None:
                            arc(prev, o[i], m.carry_sum)
                        if _is_bit(s[i]):
                            arc(s[i], o[i], self.net_delay(s[i]) + m.carry_entry + m.carry_sum, (0, w, 0, 0), t)
                    if i < len(co) and _is_bit(co[i]):
                        arc(c[i], co[i], 0.0)
                    prev = c[i]
            elif t == "DSP48E2":
                self.dsp_total += 1
                p = cell.get("parameters", {})

                def reg(name):
                    v = p.get(name, "0")
                    try:
                        return int(str(v), 2) if set(str(v)) <= {"0", "1"} else int(v)
                    except ValueError:
                        return 0
                ab = [b for port in ("A", "B") for b in ins.get(port, [])]
                in_reg = bool(ab) and (all(b in ff_q for b in ab) or (reg("AREG") and reg("BREG")))
                used_out = [b for port in ("P",) for b in outs.get(port, []) if self.fanout.get(b)]
                out_reg = bool(used_out) and (reg("PREG") or all(
                    all(lp == "D" and (lt in _FF or lt.startswith("SRL")) for lt, lp in loads.get(b, [])) for b in used_out))
                self.dsp_in += in_reg
                self.dsp_out += out_reg
                info = {"cell": cname, "in_reg": in_reg, "out_reg": out_reg}
                inner_in = ("dsp_in", cname)
                inner_out = ("dsp_out", cname)
                # inputs -> inner_in (or end there when an input register is absorbed)
                for port, bits in ins.items():
                    if port in _CLOCK_PORTS:
                        continue
                    for b in bits:
                        from_ff = b in ff_q
                        if port in _DSP_MULT_IN:
                            if in_reg and from_ff:
                                continue   # the flip-flop moves into the DSP
                            arc(b, inner_in, self.net_delay(b), (0, 0, 0, 0), None)
                        elif port in _DSP_ALU_IN:
                            arc(b, ("dsp_alu", cname), self.net_delay(b), (0, 0, 0, 0), None)
                        else:
                            end(b, m.dsp_setup, "dsp", b)
                if in_reg:
                    starts[inner_in] = (m.ff_clk_to_q, "dsp_reg")
                arc(inner_in, inner_out, m.dsp_mult, (0, 0, 1, 0), info)
                arc(("dsp_alu", cname), inner_out, m.dsp_alu, (0, 0, 1, 0), info)
                if out_reg:
                    end(inner_out, m.dsp_setup, "dsp_reg", (used_out or [None])[0])
                    for port, bits in outs.items():
                        for b in bits:
                            starts[b] = (m.dsp_clk_to_p, "dsp_reg")
                else:
                    for port, bits in outs.items():
                        for b in bits:
                            arc(inner_out, b, 0.0)
            elif t in _BRAM or t in _URAM or t.startswith(_CUT_MEMORY):
                tco = m.bram_clk_to_out if t in _BRAM else m.uram_clk_to_out
                for port, bits in ins.items():
                    if port not in _CLOCK_PORTS:
                        for b in bits:
                            end(b, m.ram_setup, "ram", b)
                for bits in outs.values():
                    for b in bits:
                        starts[b] = (tco, "ram")
            elif t.startswith("RAM") or t.startswith("SRL"):
                # LUTRAM / SRL: asynchronous read from the address pins (a LUT delay); every input
                # is also a synchronous write-side endpoint.
                for port, bits in ins.items():
                    if port in _CLOCK_PORTS:
                        continue
                    for b in bits:
                        end(b, m.ram_setup, "ram", b)
                        if port.startswith(("A", "DPRA", "ADDR")):
                            for obits in outs.values():
                                for ob in obits:
                                    arc(b, ob, self.net_delay(b) + m.lut, (1, 0, 0, 0), t)
                for bits in outs.values():
                    for b in bits:
                        starts[b] = (m.lutram_clk_to_out, "ram")
            elif t in _CONST_CELLS or t in ("BUFG", "IBUF", "OBUF"):
                for po, bits in outs.items():
                    for b in bits:
                        for pi, ibits in ins.items():
                            for ib in ibits:
                                arc(ib, b, self.net_delay(ib))
            else:
                self.unknown[t] = self.unknown.get(t, 0) + 1
                for bits in ins.values():
                    for b in bits:
                        end(b, m.ff_setup, "unknown", b)
                for bits in outs.values():
                    for b in bits:
                        starts[b] = (m.ff_clk_to_q, "unknown")
        for name, port in self.ports.items():
            for b in port["bits"]:
                if not _is_bit(b):
                    continue
                if port["direction"] == "input":
                    starts.setdefault(b, (0.0, "input"))
                elif port["direction"] == "output":
                    end(b, 0.0, "output", b)
        return arcs, starts, ends

    def run(self, top_n=1, budget_ns=None):
        self.carry_outs = set()
        for cell in self.cells.values():
            if cell["type"] in ("CARRY8", "CARRY4"):
                self.carry_outs.update(b for b in cell["connections"].get("CO", []) if _is_bit(b))
        arcs, starts, ends = self.build()
        # Topological order over nodes reachable by arcs (the netlist is combinationally acyclic).
        indeg = {}
        for src, lst in arcs.items():
            indeg.setdefault(src, 0)
            for dst, *_ in lst:
                indeg[dst] = indeg.get(dst, 0) + 1
        order = [n for n, d in indeg.items() if d == 0]
        i = 0
        while i < len(order):
            for dst, *_ in arcs.get(order[i], ()):
                indeg[dst] -= 1
                if indeg[dst] == 0:
                    order.append(dst)
            i += 1
        loop = len(order) != len(indeg)
        # Two passes: by delay (origin reg/io) and by LUT levels. State per node:
        # (value, delay, counts, pred, start, start_io)
        best = {}
        depth = {}
        for n, (arr, kind) in starts.items():
            best[n] = (arr, (0, 0, 0, 0), None, n, kind)
            depth[n] = (0, arr, (0, 0, 0, 0), None, n, kind)
        for n in order:
            b = best.get(n)
            dp = depth.get(n)
            for dst, d, cnt, tag in arcs.get(n, ()):
                if b is not None:
                    a = b[0] + d
                    old = best.get(dst)
                    if old is None or a > old[0] or (dst in starts and old[2] is None and False):
                        if dst not in starts:
                            best[dst] = (a, tuple(x + y for x, y in zip(b[1], cnt)), (n, tag), b[3], b[4])
                if dp is not None and dst not in starts:
                    lv = dp[0] + cnt[0]
                    old = depth.get(dst)
                    if old is None or lv > old[0] or (lv == old[0] and dp[1] + d > old[1]):
                        depth[dst] = (lv, dp[1] + d, tuple(x + y for x, y in zip(dp[2], cnt)), (n, tag), dp[4], dp[5])
        self.best, self.depth = best, depth
        worst = worst_io = deepest = None
        by_end = {}     # endpoint signal (bit index dropped) -> its worst reg->reg candidate
        for n, lst in ends.items():
            b = best.get(n)
            dp = depth.get(n)
            for setup, kind, bit in lst:
                if b is not None:
                    total = b[0] + (0.0 if kind == "output" else self.net_delay(n) if _is_bit(n) else 0.0) \
                        + setup + (self.m.clock_margin if kind != "output" else 0.0)
                    io = kind == "output" or b[4] == "input"
                    cand = (total, n, kind, bit, b)
                    if io:
                        if worst_io is None or total > worst_io[0]:
                            worst_io = cand
                    else:
                        if worst is None or total > worst[0]:
                            worst = cand
                        key = self._signal(bit if bit is not None else n)
                        if key not in by_end or total > by_end[key][0]:
                            by_end[key] = cand
                if dp is not None and kind != "output" and dp[5] != "input":
                    key = (dp[0], dp[1])
                    if deepest is None or key > deepest[0]:
                        deepest = (key, n, kind, bit, dp)
        ranked = sorted(by_end.values(), key=lambda c: -c[0])[:max(0, top_n)]
        paths = [self._path(c, best, 1) for c in ranked]
        self.over_budget = 0 if budget_ns is None else sum(1 for c in by_end.values() if c[0] > budget_ns)
        return (self._path(worst, best, 1), self._path(deepest, depth, 2, levels=True),
                self._path(worst_io, best, 1), loop, paths)

    def _signal(self, node):
        # Group the bits of one signal: "x.y[3]" -> "x.y"; internal nodes stay distinct by cell.
        if _is_bit(node):
            return re.sub(r"\[\d+\]$", "", self.label(node)[0])
        return str(node)

    def _path(self, cand, table, pred_idx, levels=False):
        if cand is None:
            return None
        if levels:
            (lv, delay), node, kind, bit, st = cand
            delay += (self.net_delay(node) if _is_bit(node) else 0.0) + self.m.ff_setup + self.m.clock_margin
            counts, start, skind = st[2], st[4], st[5]
            pred_i = 3
        else:
            delay, node, kind, bit, st = cand
            counts, start, skind = st[1], st[3], st[4]
            pred_i = 2
        cells, dsps = [], []
        n = node
        while n is not None and n in table and table[n][pred_i] is not None:
            prev, tag = table[n][pred_i]
            if isinstance(tag, dict):
                dsps.append(tag)
                cells.append("DSP48E2")
            elif tag is not None:
                cells.append(tag)
            n = prev
        cells.reverse()
        dsps.reverse()
        # collapse consecutive duplicates of carry tags (one CARRY8 cell gives several arcs)
        sname, ssrc = self._node_label(start)
        ename, esrc = self._node_label(bit if bit is not None else node)
        return Path(delay_ns=delay, lut_levels=counts[0], carry4=counts[1], dsp_stages=counts[2],
                    muxf=counts[3], start=sname, end=ename, start_src=ssrc, end_src=esrc,
                    start_kind=skind, end_kind=kind, dsps=dsps, cells=cells)

    def _node_label(self, node):
        if _is_bit(node):
            return self.label(node)
        if isinstance(node, tuple) and len(node) >= 2:
            cell = self.cells.get(node[1], {})
            src = cell.get("attributes", {}).get("src", "")
            return f"{node[1]} ({cell.get('type', '?')} {node[0]})", src
        return str(node), ""


def analyze(netlist, top=None, model=None, top_n=10, budget_mhz=BUDGET_MHZ):
    """Estimate the register-to-register timing of a yosys ``write_json`` netlist.

    Parameters
    ----------
    netlist : dict
        Parsed JSON of a flattened, ``synth_xilinx``-mapped design.
    top : str, optional
        Module to analyse (default: the module with attribute ``top``, else the only one).
    model : DelayModel, optional
    top_n : int
        How many distinct endpoints to list in :attr:`TimingResult.paths` (worst first).
    budget_mhz : float
        Clock target: :attr:`TimingResult.over_budget` counts the distinct endpoints slower than it.

    Returns
    -------
    TimingResult
    """
    model = model or DelayModel()
    mods = netlist["modules"]
    if top is None:
        tops = [n for n, m in mods.items() if m.get("attributes", {}).get("top")]
        top = tops[0] if tops else next(n for n, m in mods.items() if m.get("cells"))
    w = _Walker(mods[top], model)
    if not isinstance(top_n, int) or top_n < 0:
        raise ValueError(f"top_n must be an int >= 0, not {top_n!r}")
    if isinstance(budget_mhz, bool) or not isinstance(budget_mhz, (int, float)) or not budget_mhz > 0:
        raise ValueError(f"budget_mhz must be a number > 0, not {budget_mhz!r}")
    worst, deepest, worst_io, loop, paths = w.run(top_n, budget_ns=1000.0 / budget_mhz)
    if loop:
        w.unknown["<combinational loop: some nodes not timed>"] = 1
    return TimingResult(model=model, worst=worst, deepest=deepest, worst_io=worst_io,
                        dsp_total=w.dsp_total, dsp_in_reg=w.dsp_in, dsp_out_reg=w.dsp_out,
                        unknown_cells=w.unknown, paths=paths, over_budget=w.over_budget,
                        budget_mhz=float(budget_mhz))


def _short_src(src):
    # yosys joins several origins with '|'; keep the first two, drop directories.
    parts = [s.rsplit("/", 1)[-1] for s in src.split("|") if s][:2]
    return ", ".join(parts)


def format_path_line(rank, p):
    """One line for a ranked path: delay, Fmax, levels, carry, DSP, start -> end with source lines."""
    return (f"  {rank:2d}. {p.delay_ns:5.2f} ns {p.fmax_mhz:4.0f} MHz  {p.lut_levels:2d} LUT {p.carry4:2d} CARRY4 "
            f"{p.dsp_stages} DSP  {p.start} ({_short_src(p.start_src)}) -> {p.end} ({_short_src(p.end_src)})")


def format_result(res, top_n=None):
    """Readable multi-line text for a :class:`TimingResult` (with the first ``top_n`` of its ranked
    paths; all of them when ``None``)."""
    lines = []

    def one(title, p):
        if p is None:
            lines.append(f"  {title}: none")
            return
        lines.append(f"  {title}: {p.delay_ns:.2f} ns ({p.fmax_mhz:.0f} MHz): {p.lut_levels} LUT levels, "
                     f"{p.carry4} CARRY4 ({p.carry4 * 4} carry bits), {p.dsp_stages} DSP48E2" + (f", {p.muxf} MUXF" if p.muxf else ""))
        lines.append(f"    from {p.start} [{p.start_kind}]  {_short_src(p.start_src)}")
        lines.append(f"    to   {p.end} [{p.end_kind}]  {_short_src(p.end_src)}")
        for d in p.dsps:
            lines.append(f"    DSP {d['cell']}: input regs {'absorbable' if d['in_reg'] else 'NO'}, "
                         f"output reg {'absorbable' if d['out_reg'] else 'NO'}")
    lines.append(f"timing estimate (UltraScale+ -2 model, no routing): Fmax ~ {res.fmax_mhz:.0f} MHz")
    one("longest reg->reg path", res.worst)
    if res.deepest is not None and (res.worst is None or res.deepest.lut_levels > res.worst.lut_levels):
        one("most LUT levels", res.deepest)
    one("longest path from an input / to an output (continues outside)", res.worst_io)
    if res.dsp_total:
        lines.append(f"  DSP48E2: {res.dsp_total}, absorbable input regs {res.dsp_in_reg}, "
                     f"absorbable output regs {res.dsp_out_reg}")
    if res.unknown_cells:
        lines.append(f"  cells not modelled (treated as registers): {res.unknown_cells}")
    lines.append(f"  {res.over_budget} endpoints above the {res.budget_mhz:.0f} MHz budget "
                 f"({1000.0 / res.budget_mhz:.2f} ns)")
    ranked = res.paths if top_n is None else res.paths[:top_n]
    if len(ranked) > 1:
        lines.append(f"  worst {len(ranked)} distinct endpoints (reg->reg):")
        lines.extend(format_path_line(i + 1, p) for i, p in enumerate(ranked))
    return "\n".join(lines)
