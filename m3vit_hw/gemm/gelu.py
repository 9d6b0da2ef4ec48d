"""GELU epilogue stage: ``golden.gelu``, a 256-entry int8 -> int8 table, one lookup per lane per cycle.

The table is made at quantization time from the fc1 output scale and the GELU output scale
(``docs/numerics.md`` §3) and is written through the ``lut`` port before the GEMMs that use it (one
table per layer, shared by all experts of an MoE layer). Every lane has its own read port, so a
synthesizer builds one small distributed-RAM copy per lane.
"""

from amaranth.hdl import Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from .requantizer import check_lanes, check_meta

__all__ = ["GeluStage", "GeluInLayout", "GeluOutLayout", "LUT_ENTRIES"]

#: One entry per int8 input value.
LUT_ENTRIES = 1 << numerics.ACT_BITS


class GeluInLayout(data.StructLayout):
    """Input beat of :class:`GeluStage`.

    Fields
    ------
    data : ArrayLayout(signed(ACC_BITS), lanes)
        Values; must be int8 when ``enable`` is set (the requantizer saturates them to 8 bits).
    enable : 1
        Apply the table; otherwise pass ``data`` through.
    meta : meta
    """

    def __init__(self, lanes, meta):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "enable": 1,
            "meta": meta,
        })


class GeluOutLayout(data.StructLayout):
    """Output beat of :class:`GeluStage`: ``data`` and the input's ``meta``."""

    def __init__(self, lanes, meta):
        super().__init__({
            "data": data.ArrayLayout(signed(numerics.ACC_BITS), lanes),
            "meta": meta,
        })


class GeluStage(wiring.Component):
    """``lanes``-wide GELU table lookup (``golden.gelu``).

    Parameters
    ----------
    lanes : int
        Elements per beat, in ``[1, 256]``.
    meta : shape-like
        Side data carried with each beat (default: none).

    Interface attributes
    --------------------
    i : In(stream.Signature(GeluInLayout(lanes, meta)))
    o : Out(stream.Signature(GeluOutLayout(lanes, meta)))
        One output beat per input beat, in order; ``o.valid`` never waits on ``o.ready``.
    lut : Out(memory.WritePort.Signature(addr_width=8, shape=signed(8)))
        Table write port (a memory-like port: the loader drives ``addr``, ``data``, ``en``). Entry
        ``x + 128`` holds ``gelu(x)``. The table resets to the identity. Do not write it while beats
        with ``enable`` are in flight.
    busy : Out(1)

    Latency and throughput
    ----------------------
    1 cycle (the synchronous table read), one beat per cycle.
    """

    LATENCY = 1

    def __init__(self, lanes, meta=unsigned(0)):
        check_lanes(lanes)
        check_meta(meta)
        self._lanes = lanes
        self._meta = meta
        super().__init__({
            "i": In(stream.Signature(GeluInLayout(lanes, meta))),
            "o": Out(stream.Signature(GeluOutLayout(lanes, meta))),
            "lut": Out(memory.WritePort.Signature(addr_width=numerics.ACT_BITS, shape=signed(numerics.ACT_BITS))),
            "busy": Out(1),
        })

    @property
    def lanes(self):
        return self._lanes

    def elaborate(self, platform):
        m = Module()
        L = self._lanes
        lo, _ = numerics.int_range(numerics.ACT_BITS)
        # One table copy per lane, all written together: each copy is a single-read-port 256x8
        # distributed RAM, which maps directly (one many-ported memory would have to be replicated
        # by the synthesizer anyway).
        tables = []
        for j in range(L):
            table = memory.Memory(shape=signed(numerics.ACT_BITS), depth=LUT_ENTRIES,
                                  init=[i + lo for i in range(LUT_ENTRIES)])
            m.submodules[f"table{j}"] = table
            wp = table.write_port()
            m.d.comb += [wp.addr.eq(self.lut.addr), wp.data.eq(self.lut.data), wp.en.eq(self.lut.en)]
            tables.append(table)

        valid = Signal()
        enable = Signal()
        meta = Signal(self._meta)
        passthru = [Signal(signed(numerics.ACC_BITS), name=f"x{j}") for j in range(L)]

        adv = ~valid | self.o.ready
        m.d.comb += self.i.ready.eq(adv)
        with m.If(adv):
            m.d.sync += [valid.eq(self.i.valid), enable.eq(self.i.payload.enable),
                         meta.eq(self.i.payload.meta)]
            for j in range(L):
                m.d.sync += passthru[j].eq(self.i.payload.data[j])

        m.d.comb += [self.o.valid.eq(valid), self.o.payload.meta.eq(meta), self.busy.eq(valid)]
        for j in range(L):
            rp = tables[j].read_port()
            # x + 128 for int8 x is x's low byte with the sign bit inverted.
            m.d.comb += [
                rp.addr.eq(self.i.payload.data[j][:numerics.ACT_BITS] ^ (1 << (numerics.ACT_BITS - 1))),
                rp.en.eq(adv),
                self.o.payload.data[j].eq(Mux(enable, rp.data, passthru[j])),
            ]
        return m
