"""The netlist timing walk of sim/timing.py on hand-built netlists (fast: no synthesis)."""

import math

import pytest

from sim.timing import DelayModel, analyze, format_result

M = DelayModel()


class Net:
    """A tiny yosys-JSON netlist builder: FFs, LUTs, CARRY8s, DSP48E2s on integer net bits."""

    def __init__(self):
        self.cells, self.netnames, self.next = {}, {}, 2

    def bits(self, name, n=1):
        b = list(range(self.next, self.next + n))
        self.next += n
        self.netnames[name] = {"hide_name": 0, "bits": b, "attributes": {"src": f"x.py:{len(self.netnames) + 1}"}}
        return b

    def cell(self, type_, ins, outs, params=None):
        name = f"c{len(self.cells)}"
        conn = {**ins, **outs}
        dirs = {**{p: "input" for p in ins}, **{p: "output" for p in outs}}
        self.cells[name] = {"type": type_, "connections": conn, "port_directions": dirs,
                            "parameters": params or {}, "attributes": {}}
        return name

    def ff(self, d, q):
        self.cell("FDRE", {"D": [d], "C": [1], "CE": ["1"], "R": ["0"]}, {"Q": [q]})

    def lut(self, ins, o):
        self.cell(f"LUT{len(ins)}", {f"I{i}": [b] for i, b in enumerate(ins)}, {"O": [o]})

    def json(self):
        return {"modules": {"top": {"attributes": {"top": 1}, "ports": {}, "cells": self.cells,
                                    "netnames": self.netnames}}}


def test_lut_chain_counts_levels_and_names_the_path():
    n = Net()
    q0, = n.bits("start_reg")
    mids = [n.bits(f"m{i}")[0] for i in range(5)]
    d, = n.bits("end_d")
    q1, = n.bits("end_reg")
    other, = n.bits("side_reg")
    n.ff(d, q1)
    n.ff(q1, other)              # a second, short path: 0 levels
    prev = q0
    for b in mids + [d]:
        n.lut([prev], b)
        prev = b
    n.ff(q1, q0)
    res = analyze(n.json())
    w = res.worst
    assert (w.lut_levels, w.carry4, w.dsp_stages) == (6, 0, 0)
    assert w.start == "start_reg" and w.end == "end_reg"
    assert w.start_src == "x.py:1"
    # Each LUT input net has fanout 1 on the chain.
    expected = M.ff_clk_to_q + 6 * (M.net + M.lut) + M.net + M.ff_setup + M.clock_margin
    assert w.delay_ns == pytest.approx(expected)
    print(f"6-level LUT chain: {w.delay_ns:.2f} ns, {w.fmax_mhz:.0f} MHz")


def test_cascaded_carry8_counts_elements():
    n = Net()
    a = n.bits("a", 16)
    s = n.bits("s", 16)
    co = n.bits("co", 16)
    o = n.bits("sum", 16)
    q = n.bits("q", 16)
    for i in range(16):
        n.lut([a[i]], s[i])
        n.ff(o[i], q[i])
        n.ff(q[i], a[i])
    for k in range(2):
        ci = ["0"] if k == 0 else [co[7]]
        n.cell("CARRY8", {"CI": ci, "CI_TOP": ["0"], "DI": a[8 * k:8 * k + 8], "S": s[8 * k:8 * k + 8]},
               {"O": o[8 * k:8 * k + 8], "CO": co[8 * k:8 * k + 8]})
    w = analyze(n.json()).worst
    assert (w.lut_levels, w.carry4) == (1, 4)   # two CARRY8 = four 4-bit elements
    assert w.end == "q[15]"


def _dsp_netlist(in_from_ff, out_to_ff):
    n = Net()
    a = n.bits("a", 8)
    b = n.bits("b", 8)
    p = n.bits("p", 16)
    y = n.bits("y", 16)
    qa = n.bits("qa", 8)
    for i in range(8):
        n.ff(y[i], qa[i])
        n.ff(qa[i], b[i])
        if in_from_ff:
            n.ff(qa[i], a[i])
        else:
            n.lut([qa[i], b[i]], a[i])
    for i in range(16):
        if out_to_ff:
            n.ff(p[i], y[i])
        else:
            t, = n.bits(f"t{i}")
            n.lut([p[i]], t)
            n.ff(t, y[i])
    n.cell("DSP48E2", {"A": a, "B": b, "CLK": [1]}, {"P": p})
    return n.json()


@pytest.mark.parametrize("in_ff,out_ff", [(True, True), (False, True), (True, False), (False, False)])
def test_dsp_register_absorption(in_ff, out_ff):
    res = analyze(_dsp_netlist(in_ff, out_ff))
    assert (res.dsp_total, res.dsp_in_reg, res.dsp_out_reg) == (1, int(in_ff), int(out_ff))
    w = res.worst
    assert w.dsp_stages == 1
    assert w.dsps[0]["in_reg"] == in_ff and w.dsps[0]["out_reg"] == out_ff
    if in_ff and out_ff:
        # Register inside the DSP to register inside the DSP: the multiplier stage alone.
        assert w.delay_ns == pytest.approx(M.ff_clk_to_q + M.dsp_mult + M.dsp_setup + M.clock_margin)
        assert w.fmax_mhz >= 300
    else:
        assert w.fmax_mhz < 300


def test_fanout_costs_routing():
    n = Net()
    q, = n.bits("q")
    outs = n.bits("o", 64)
    n.ff(outs[0], q)
    for b in outs:
        n.ff(q, b)
    w = analyze(n.json()).worst
    assert w.delay_ns == pytest.approx(M.ff_clk_to_q + M.net + M.net_fanout * math.log2(64)
                                       + M.ff_setup + M.clock_margin)


def test_top_n_lists_distinct_endpoints_worst_first():
    # Three registers behind LUT chains of 3, 1 and 2 levels; a 4-bit register behind 2 levels
    # counts as one endpoint (its bits are one signal).
    n = Net()
    q0, = n.bits("src")
    n.ff(q0, q0)
    chains = {"r3": 3, "r1": 1, "r2": 2}
    for name, levels in chains.items():
        q, = n.bits(name)
        mids = [n.bits(f"{name}_m{i}")[0] for i in range(levels)]
        prev = q0
        for b in mids:
            n.lut([prev], b)
            prev = b
        n.ff(prev, q)
    wide = n.bits("wide", 4)
    for i, q in enumerate(wide):
        a, b = n.bits(f"w{i}_a")[0], n.bits(f"w{i}_b")[0]
        n.lut([q0], a)
        n.lut([a], b)
        n.ff(b, q)
    res = analyze(n.json(), top_n=3)
    assert [p.end for p in res.paths][0] == "r3"
    assert [p.lut_levels for p in res.paths] == [3, 2, 2]
    assert {p.end.split("[")[0] for p in res.paths[1:]} == {"r2", "wide"}
    assert res.paths[0].delay_ns == res.worst.delay_ns
    assert len(analyze(n.json(), top_n=10).paths) == 5       # src, r3, r1, r2, wide
    assert analyze(n.json(), top_n=0).paths == []
    with pytest.raises(ValueError, match="top_n"):
        analyze(n.json(), top_n=-1)


def test_endpoints_over_budget_are_counted_once_per_signal():
    # Registers behind 9, 4 and 8 LUT levels and a 4-bit register behind 9: at 300 MHz (3.33 ns,
    # about 6 levels) r9, r8 and the wide register miss the budget (the wide one counts once).
    n = Net()
    q0, = n.bits("src")
    n.ff(q0, q0)

    def chain(name, levels, q):
        prev = q0
        for i in range(levels):
            b, = n.bits(f"{name}_m{i}")
            n.lut([prev], b)
            prev = b
        n.ff(prev, q)
    for name, levels in (("r9", 9), ("r4", 4), ("r8", 8)):
        chain(name, levels, n.bits(name)[0])
    for i, q in enumerate(n.bits("wide", 4)):
        chain(f"w{i}", 9, q)
    res = analyze(n.json())
    slow = {p.end.split("[")[0] for p in res.paths if p.fmax_mhz < 300}
    assert slow == {"r9", "r8", "wide"}, slow
    assert res.over_budget == 3 and res.budget_mhz == 300
    assert res.to_json()["endpoints_over_budget"] == 3
    assert "3 endpoints above the 300 MHz budget" in format_result(res)
    assert analyze(n.json(), budget_mhz=100).over_budget == 0
    with pytest.raises(ValueError, match="budget_mhz"):
        analyze(n.json(), budget_mhz=0)
