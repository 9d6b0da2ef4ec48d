"""Host access to on-chip buffers while a unit is idle: the standalone sub-layer wrappers (MoELayer,
AttentionLayer, DenseLayer, NormMlp, PatchEmbed) let a testbench or a host load ``h``/``x`` words and
read the residual buffer back. One place wires it, so every wrapper behaves the same way."""

from amaranth.hdl import Mux

__all__ = ["connect_read_back", "connect_host_writes"]


def connect_read_back(m, port, addr, data, *, idle):
    """``addr`` (stream of word addresses) -> ``port`` (a memory read port) -> ``data`` (stream of words),
    one registered read stage, accepted only while ``idle``. The read data holds while the port is
    disabled, so ``data.payload`` stays valid until taken."""
    take = addr.valid & addr.ready
    m.d.comb += [
        addr.ready.eq(idle & (~data.valid | data.ready)),
        port.addr.eq(addr.payload), port.en.eq(take),
        data.payload.eq(port.data),
    ]
    with m.If(take):
        m.d.sync += data.valid.eq(1)
    with m.Elif(data.ready):
        m.d.sync += data.valid.eq(0)


def connect_host_writes(m, act_w, res_w, act_src, res_src, load, *, busy, h, x, act_bits):
    """One write port per buffer, shared: ``act_src``/``res_src`` (the unit's write ports, e.g. the
    engine's ``act_wr``/``res_wr``) while ``busy``; the host's ``load`` stream while idle (``load.ready``
    is ``~busy``). A beat with ``target == h`` writes every lane of activation word ``addr`` (the low
    ``act_bits`` of each value), ``target == x`` residual word ``addr``; other targets are left to the
    caller (``load`` is taken whenever it is valid while idle). Returns the beat-taken signal."""
    lanes = len(load.payload.data)
    all_lanes = (1 << lanes) - 1
    go = load.valid & load.ready
    m.d.comb += load.ready.eq(~busy)
    with m.If(busy):
        m.d.comb += [
            act_w.addr.eq(act_src.addr), act_w.data.eq(act_src.data), act_w.en.eq(act_src.en),
            res_w.addr.eq(res_src.addr), res_w.data.eq(res_src.data), res_w.en.eq(res_src.en),
        ]
    with m.Else():
        m.d.comb += [
            act_w.addr.eq(load.payload.addr),
            act_w.en.eq(Mux(go & (load.payload.target == h), all_lanes, 0)),
            res_w.addr.eq(load.payload.addr), res_w.data.eq(load.payload.data),
            res_w.en.eq(Mux(go & (load.payload.target == x), all_lanes, 0)),
        ]
        for c in range(lanes):
            m.d.comb += act_w.data[c].eq(load.payload.data[c][:act_bits])
    return go
