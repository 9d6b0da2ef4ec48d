"""AXI4 and AXI4-Lite signatures, and the AXI4 master that bridges the accelerator's memory ports.

Amaranth has no AXI in its standard library and amaranth-soc has none either, so the project keeps its
own small signatures here. Member names are the AXI signal names in lower case (``awaddr``, ``rvalid``,
...), so that a top level that flattens ``<prefix>`` + ``_`` + member (see
:func:`m3vit_hw.soc.top.xilinx_ports`) produces exactly the names Vivado's interface inference expects
(``m_axi0_araddr``, ``s_axi_wdata``, ...).

Only the signals the accelerator needs are present: IDs are ``id_width`` bits (default 1) and always 0
(every transaction of a port uses one ID, so AXI keeps them in order; the ID ports exist because many
AXI models and interconnects expect them), no LOCK/QOS/REGION/USER. ``*cache`` and ``*prot`` are driven
with constants.

:class:`AxiMaster` turns the project's stream ports into one AXI4 master:

* a :class:`~m3vit_hw.lib.mem_port.ReadPortSignature` (its contract already forbids 4 KiB crossings and
  bursts over 256 beats) maps 1:1 onto AR/R: one INCR burst per request, any number outstanding (the
  slave throttles with ``arready``), data in order because every burst has ID 0;
* an optional :class:`WritePortSignature` (request, data beats with strobes, one response per request)
  maps onto AW/W/B. A small FIFO of burst lengths lets AW run ahead of W, and ``wlast`` is generated
  from it, so the data stream carries no ``last``.

A non-OKAY ``rresp`` or ``bresp`` sets the sticky ``error`` output (cleared by ``clear_error``); the
transfer still completes normally, so the protocol stays clean and the controller decides what to do.
"""

from amaranth.hdl import Assert, Cat, Module, Mux, Signal
from amaranth.lib import fifo, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int as _check_int
from ..lib.mem_port import (MAX_BURST_LIMIT, ReadPortSignature, WriteBeatLayout, WritePortSignature,
                             WriteRequestLayout)

__all__ = [
    "AXI_BURST_INCR", "AXI_RESP_OKAY", "AXI_CACHE_DEFAULT",
    "AXI4Signature", "AXI4LiteSignature", "WriteRequestLayout", "WriteBeatLayout", "WritePortSignature",
    "AxiMaster",
]

#: ``*burst`` code of an incrementing burst.
AXI_BURST_INCR = 0b01
#: ``*resp`` code OKAY (EXOKAY is never requested: no exclusive accesses).
AXI_RESP_OKAY = 0b00
#: ``*cache``: normal non-cacheable bufferable, what Xilinx's own masters use for HP ports.
AXI_CACHE_DEFAULT = 0b0011

_MASTER_CHANNELS = {
    "aw": (("id", "I"), ("addr", "A"), ("len", 8), ("size", 3), ("burst", 2), ("cache", 4), ("prot", 3)),
    "w": (("data", "D"), ("strb", "S"), ("last", 1)),
    "ar": (("id", "I"), ("addr", "A"), ("len", 8), ("size", 3), ("burst", 2), ("cache", 4), ("prot", 3)),
}


def _check_axi_widths(addr_width, data_width, lite=False):
    _check_int("addr_width", addr_width, 1, 64)
    allowed = (32, 64) if lite else (8, 16, 32, 64, 128, 256, 512, 1024)
    if not isinstance(data_width, int) or isinstance(data_width, bool):
        raise TypeError(f"data_width must be an integer, not {data_width!r}")
    if data_width not in allowed:
        raise ValueError(f"data_width must be one of {allowed}, not {data_width}")


class AXI4Signature(wiring.Signature):
    """An AXI4 memory-mapped interface, seen from the master.

    Parameters
    ----------
    addr_width : int
        Byte-address width, 1..64.
    data_width : int
        Data bits, a power of two in 8..1024.
    id_width : int
        Transaction ID bits, 1..16 (the accelerator always sends ID 0).

    Interface attributes
    --------------------
    awid, arid : Out; bid, rid : In
    awaddr, awlen, awsize, awburst, awcache, awprot, awvalid : Out; awready : In
    wdata, wstrb, wlast, wvalid : Out; wready : In
    bresp, bvalid : In; bready : Out
    araddr, arlen, arsize, arburst, arcache, arprot, arvalid : Out; arready : In
    rdata, rresp, rlast, rvalid : In; rready : Out
    """

    def __init__(self, *, addr_width=32, data_width=128, id_width=1):
        _check_axi_widths(addr_width, data_width)
        _check_int("id_width", id_width, 1, 16)
        self._aw = addr_width
        self._dw = data_width
        self._iw = id_width
        width = {"A": addr_width, "D": data_width, "S": data_width // 8, "I": id_width}
        members = {}
        for ch, fields in _MASTER_CHANNELS.items():
            for name, w in fields:
                members[ch + name] = Out(width.get(w, w))
            members[ch + "valid"] = Out(1)
            members[ch + "ready"] = In(1)
        members.update({"bid": In(id_width), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
                        "rid": In(id_width), "rdata": In(data_width), "rresp": In(2), "rlast": In(1), "rvalid": In(1),
                        "rready": Out(1)})
        super().__init__(members)

    @property
    def addr_width(self):
        return self._aw

    @property
    def data_width(self):
        return self._dw

    def __eq__(self, other):
        return (type(other) is type(self) and
                (self._aw, self._dw, self._iw) == (other._aw, other._dw, other._iw))

    def __repr__(self):
        return f"AXI4Signature(addr_width={self._aw}, data_width={self._dw}, id_width={self._iw})"


class AXI4LiteSignature(wiring.Signature):
    """An AXI4-Lite interface, seen from the master (the CPU); a slave declares ``In(...)``.

    Parameters
    ----------
    addr_width : int
        Byte-address width, 1..64.
    data_width : int
        32 or 64.

    Interface attributes
    --------------------
    awaddr, awprot, awvalid : Out; awready : In
    wdata, wstrb, wvalid : Out; wready : In
    bresp, bvalid : In; bready : Out
    araddr, arprot, arvalid : Out; arready : In
    rdata, rresp, rvalid : In; rready : Out
    """

    def __init__(self, *, addr_width=12, data_width=32):
        _check_axi_widths(addr_width, data_width, lite=True)
        self._aw = addr_width
        self._dw = data_width
        super().__init__({
            "awaddr": Out(addr_width), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(data_width), "wstrb": Out(data_width // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(addr_width), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(data_width), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })

    @property
    def addr_width(self):
        return self._aw

    @property
    def data_width(self):
        return self._dw

    def __eq__(self, other):
        return type(other) is type(self) and (self._aw, self._dw) == (other._aw, other._dw)

    def __repr__(self):
        return f"AXI4LiteSignature(addr_width={self._aw}, data_width={self._dw})"


class AxiMaster(wiring.Component):
    """One AXI4 master: a read port onto AR/R and, optionally, a write port onto AW/W/B.

    Parameters
    ----------
    addr_width, data_bytes, max_burst : int
        The ports' parameters (:class:`~m3vit_hw.lib.mem_port.ReadPortSignature`); the AXI data width
        is ``8 * data_bytes``.
    write : bool
        Whether the master has a write port. Without one, AW/W stay idle and ``bready`` is high.
    write_depth : int
        Write bursts whose data may still be pending behind their AW (1..64), not counting the two
        the W side holds in registers (the burst being sent and the next one): up to
        ``write_depth + 2`` in all.

    Interface attributes
    --------------------
    rd : ``In(ReadPortSignature(...))``
        The read port (connect a read master's ``Out`` port here).
    wr : ``In(WritePortSignature(...))``
        The write port (only if ``write``).
    axi : ``Out(AXI4Signature(addr_width, 8 * data_bytes))``
    error : ``Out(1)``
        Sticky: some ``rresp``/``bresp`` was not OKAY.
    clear_error : ``In(1)``
        Clears ``error``.
    """

    def __init__(self, *, addr_width=32, data_bytes=16, max_burst=16, write=True, write_depth=8):
        ReadPortSignature.check_parameters(addr_width=addr_width, data_bytes=data_bytes,
                                           max_burst=max_burst)
        _check_int("write_depth", write_depth, 1, 64)
        self._p = dict(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        self._write = bool(write)
        self._write_depth = write_depth
        members = {
            "rd": In(ReadPortSignature(**self._p)),
            "axi": Out(AXI4Signature(addr_width=addr_width, data_width=8 * data_bytes)),
            "error": Out(1),
            "clear_error": In(1),
        }
        if self._write:
            members["wr"] = In(WritePortSignature(**self._p))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        axi, rd = self.axi, self.rd
        size = (self._p["data_bytes"]).bit_length() - 1
        err = Signal()

        # ---- reads: one INCR burst per request, passed straight through -------------------------
        m.d.comb += [
            axi.araddr.eq(rd.req.p.addr), axi.arlen.eq(rd.req.p.beats - 1), axi.arsize.eq(size),
            axi.arburst.eq(AXI_BURST_INCR), axi.arcache.eq(AXI_CACHE_DEFAULT), axi.arprot.eq(0),
            axi.arvalid.eq(rd.req.valid), rd.req.ready.eq(axi.arready),
            rd.resp.valid.eq(axi.rvalid), rd.resp.p.data.eq(axi.rdata), rd.resp.p.last.eq(axi.rlast),
            axi.rready.eq(rd.resp.ready),
        ]
        with m.If(axi.rvalid & axi.rready & (axi.rresp != AXI_RESP_OKAY)):
            m.d.sync += err.eq(1)

        # ---- writes: AW runs ahead of W by up to write_depth + 2 bursts --------------------------
        if self._write:
            wr = self.wr
            m.submodules.lens = lens = fifo.SyncFIFOBuffered(
                width=(self._p["max_burst"]).bit_length() + 1, depth=self._write_depth)
            # Each entry holds AWLEN (beats - 1) and whether it is 0 (a one-beat burst).
            len_bits = (self._p["max_burst"]).bit_length()
            m.d.comb += [
                axi.awaddr.eq(wr.req.p.addr), axi.awlen.eq(wr.req.p.beats - 1), axi.awsize.eq(size),
                axi.awburst.eq(AXI_BURST_INCR), axi.awcache.eq(AXI_CACHE_DEFAULT), axi.awprot.eq(0),
                axi.awvalid.eq(wr.req.valid & lens.w_rdy),
                wr.req.ready.eq(axi.awready & lens.w_rdy),
                lens.w_en.eq(axi.awvalid & axi.awready),
                lens.w_data.eq(Cat((wr.req.p.beats - 1)[:len_bits], wr.req.p.beats == 1)),
            ]
            # The W side takes burst lengths from the FIFO into two registers: ``cur`` (the burst
            # being sent) and ``nxt`` (the one after it). The FIFO is read whenever ``nxt`` is empty,
            # a decision of flip-flops only, so the W handshake never reaches the FIFO's read enable
            # and level logic (in the accelerator top that path, from the write data's valid through
            # wlast into the FIFO, missed 300 MHz). A finished burst is replaced from ``nxt``, or
            # straight from the FIFO's output register when ``nxt`` is empty.
            cur_v, nxt_v = Signal(name="cur_v"), Signal(name="nxt_v")
            cur_len, nxt_len = Signal(len_bits, name="cur_len"), Signal(len_bits, name="nxt_len")
            cur_one, nxt_one = Signal(name="cur_one"), Signal(name="nxt_one")
            take = lens.r_rdy & ~nxt_v
            m.d.comb += lens.r_en.eq(take)
            # wlast gates the W handshake and the burst hand-over, so it is one LUT of registers: on
            # a burst's first beat the stored "one beat" flag, later a flag registered at the
            # previous beat (beat + 1 == AWLEN, with beat + 1 kept in a register of its own).
            beat = Signal(range(MAX_BURST_LIMIT + 1))
            beat_p1 = Signal(range(MAX_BURST_LIMIT + 2), init=1)
            first = Signal(init=1)
            last_r = Signal()
            head_len, head_one = lens.r_data[:len_bits], lens.r_data[len_bits]
            last = Mux(first, cur_one, last_r)
            m.d.comb += Assert(~cur_v | (last == (beat == cur_len)),
                               "AxiMaster: the registered wlast disagrees with the beat count")
            with m.If(axi.wvalid & axi.wready):
                m.d.sync += [beat_p1.eq(beat_p1 + 1), first.eq(0), last_r.eq(beat_p1 == cur_len)]
                with m.If(last):
                    m.d.sync += [beat_p1.eq(1), first.eq(1)]
            m.d.comb += [
                axi.wdata.eq(wr.data.p.data), axi.wstrb.eq(wr.data.p.strb), axi.wlast.eq(last),
                axi.wvalid.eq(wr.data.valid & cur_v),
                wr.data.ready.eq(axi.wready & cur_v),
            ]
            with m.If(~cur_v | (axi.wvalid & axi.wready & last)):
                with m.If(nxt_v):
                    m.d.sync += [cur_v.eq(1), cur_len.eq(nxt_len), cur_one.eq(nxt_one), nxt_v.eq(0)]
                with m.Elif(take):
                    m.d.sync += [cur_v.eq(1), cur_len.eq(head_len), cur_one.eq(head_one)]
                with m.Else():
                    m.d.sync += cur_v.eq(0)
            with m.Elif(take):
                m.d.sync += [nxt_v.eq(1), nxt_len.eq(head_len), nxt_one.eq(head_one)]
            with m.If(axi.wvalid & axi.wready):
                m.d.sync += beat.eq(beat + 1)
                with m.If(last):
                    m.d.sync += beat.eq(0)
            m.d.comb += [
                wr.resp.valid.eq(axi.bvalid), wr.resp.payload.eq(axi.bresp != AXI_RESP_OKAY),
                axi.bready.eq(wr.resp.ready),
            ]
            with m.If(axi.bvalid & axi.bready & (axi.bresp != AXI_RESP_OKAY)):
                m.d.sync += err.eq(1)
        else:
            m.d.comb += axi.bready.eq(1)

        with m.If(self.clear_error):
            m.d.sync += err.eq(0)
        m.d.comb += self.error.eq(err)
        return m

