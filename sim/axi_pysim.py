"""Amaranth-simulator models for the AXI top: an AXI4 memory and an AXI4-Lite CPU (no cocotb needed).

A second, independent pair of bus models next to cocotbext-axi's: quick to start (no Verilator build),
used by the fast unit tests of the top and for debugging with access to every internal signal.

* :func:`axi_memory` returns a background testbench serving one AXI4 slave port from a shared
  ``bytearray``-like dict memory, one burst at a time, with random pauses on ``arready``, ``rvalid``,
  ``awready``, ``wready`` and ``bvalid``;
* :class:`AxiLiteCpu` performs register reads and writes on the ``s_axi`` port.
"""

import random

__all__ = ["SparseBytes", "axi_memory", "AxiLiteCpu"]


class SparseBytes:
    """Byte-addressed memory (a dict; unwritten bytes read as 0)."""

    def __init__(self):
        self.d = {}

    def write(self, addr, data):
        for i, b in enumerate(bytes(data)):
            self.d[addr + i] = b

    def read(self, addr, n):
        return bytes(self.d.get(addr + i, 0) for i in range(n))


def axi_memory(port, mem, *, data_bytes, pause=0.0, seed=0):
    """A background testbench serving AXI4 port ``port`` (the top's ``m_axi[k]``) from ``mem``."""
    rng = random.Random(seed)

    async def process(ctx):
        reads = []          # pending bursts: [addr, beats left]
        writes = []         # AW accepted: [addr, beats]
        wbeat = 0
        bpend = 0
        rbeat = None
        while True:
            # Outputs for this cycle (decided before the edge; the DUT's valids are sampled at it).
            arready = rng.random() >= pause
            awready = rng.random() >= pause
            wready = bool(writes) and rng.random() >= pause
            if rbeat is None and reads:
                addr, left = reads[0]
                rbeat = (mem.read(addr, data_bytes), left == 1)
            rvalid = rbeat is not None and rng.random() >= pause
            bvalid = bpend > 0 and rng.random() >= pause
            ctx.set(port.arready, arready)
            ctx.set(port.awready, awready)
            ctx.set(port.wready, wready)
            ctx.set(port.rvalid, rvalid)
            if rbeat is not None:
                ctx.set(port.rdata, int.from_bytes(rbeat[0], "little"))
                ctx.set(port.rlast, rbeat[1])
            ctx.set(port.rresp, 0)
            ctx.set(port.bvalid, bvalid)
            ctx.set(port.bresp, 0)
            (_, _, arv, araddr, arlen, awv, awaddr, awlen, wv, wdata, wstrb, wlast, rready,
             bready) = await ctx.tick().sample(
                port.arvalid, port.araddr, port.arlen, port.awvalid, port.awaddr, port.awlen,
                port.wvalid, port.wdata, port.wstrb, port.wlast, port.rready, port.bready)
            if arv and arready:
                reads.append([araddr, arlen + 1])
            if awv and awready:
                writes.append([awaddr, awlen + 1])
            if rvalid and rready:
                reads[0][0] += data_bytes
                reads[0][1] -= 1
                if reads[0][1] == 0:
                    reads.pop(0)
                rbeat = None
            if wv and wready:
                addr, beats = writes[0]
                data = wdata.to_bytes(data_bytes, "little")
                for i in range(data_bytes):
                    if wstrb >> i & 1:
                        mem.write(addr + wbeat * data_bytes + i, data[i:i + 1])
                assert bool(wlast) == (wbeat == beats - 1), "axi_memory: wlast on the wrong beat"
                wbeat += 1
                if wbeat == beats:
                    writes.pop(0)
                    wbeat = 0
                    bpend += 1
            if bvalid and bready:
                bpend -= 1
    return process


class AxiLiteCpu:
    """Register access on an AXI4-Lite slave port from a testbench (one transaction at a time)."""

    def __init__(self, bus):
        self.bus = bus

    async def write(self, ctx, addr, value, strb=0xF):
        b = self.bus
        ctx.set(b.awaddr, addr)
        ctx.set(b.awvalid, 1)
        ctx.set(b.wdata, value)
        ctx.set(b.wstrb, strb)
        ctx.set(b.wvalid, 1)
        ctx.set(b.bready, 1)
        aw = w = False
        while not (aw and w):
            _, _, awr, wr = await ctx.tick().sample(b.awready, b.wready)
            aw |= bool(awr)
            w |= bool(wr)
            if aw:
                ctx.set(b.awvalid, 0)
            if w:
                ctx.set(b.wvalid, 0)
        while True:
            _, _, bv = await ctx.tick().sample(b.bvalid)
            if bv:
                break
        ctx.set(b.bready, 0)

    async def read(self, ctx, addr):
        b = self.bus
        ctx.set(b.araddr, addr)
        ctx.set(b.arvalid, 1)
        ctx.set(b.rready, 1)
        while True:
            _, _, arr = await ctx.tick().sample(b.arready)
            if arr:
                break
        ctx.set(b.arvalid, 0)
        while True:
            _, _, rv, rd = await ctx.tick().sample(b.rvalid, b.rdata)
            if rv:
                break
        ctx.set(b.rready, 0)
        return rd
