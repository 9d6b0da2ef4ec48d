"""GELU epilogue stage: ``golden.gelu``, a 256-entry table of 8-bit entries, one lookup per lane per cycle.

The entries are the spec's *uint8* GELU codes (``numerics.GELU_CODE_BITS``; the zero point is in fc2's
bias). The stage handles them as 8-bit patterns (signed ports, the identity reset): the GELU8 epilogue
writes those 8 bits to the activation buffer and fc2 reads them with ``a_unsigned``, so the sign the
stage's wider ``data`` output gives them is never used.

The table is made at quantization time from the fc1 output scale and the GELU output scale
(``docs/numerics.md`` §3) and is written through the ``lut`` port before the GEMMs that use it (one
table per layer, shared by all experts of an MoE layer). Every lane has its own read port, so a
synthesizer builds one small distributed-RAM copy per lane.
"""

from amaranth.hdl import Module, Mux, signed, unsigned
from amaranth.lib import data, memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..lib.skid import SkidBuffer
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
    1 cycle, one beat per cycle: an asynchronous table read (distributed RAM) into a skid buffer,
    so ``i.ready`` is a register.
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

        # The lookup is an asynchronous (distributed-RAM) read in front of a skid buffer, so the stage
        # has no enable of its own: i.ready and o.valid come from the skid buffer's registers, and no
        # ready chain runs through the stage. The skid buffer holds both the table output and the
        # input, and the pass-through choice is made after it, so the register right after the
        # table sees only the table's own read mux.
        held = data.StructLayout({
            "x": data.ArrayLayout(signed(numerics.ACC_BITS), L),
            "y": data.ArrayLayout(signed(numerics.ACT_BITS), L),
            "enable": 1,
            "meta": self._meta,
        })
        m.submodules.out = out = SkidBuffer(held)
        m.d.comb += [
            out.i.valid.eq(self.i.valid),
            self.i.ready.eq(out.i.ready),
            out.i.payload.x.eq(self.i.payload.data),
            out.i.payload.enable.eq(self.i.payload.enable),
            out.i.payload.meta.eq(self.i.payload.meta),
            self.o.valid.eq(out.o.valid),
            out.o.ready.eq(self.o.ready),
            self.o.payload.meta.eq(out.o.payload.meta),
            self.busy.eq(out.o.valid),
        ]
        for j in range(L):
            rp = tables[j].read_port(domain="comb")
            # x + 128 for int8 x is x's low byte with the sign bit inverted.
            m.d.comb += [
                rp.addr.eq(self.i.payload.data[j][:numerics.ACT_BITS] ^ (1 << (numerics.ACT_BITS - 1))),
                out.i.payload.y[j].eq(rp.data),
                self.o.payload.data[j].eq(Mux(out.o.payload.enable, out.o.payload.y[j], out.o.payload.x[j])),
            ]
        return m
