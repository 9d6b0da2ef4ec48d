"""The port through which a sub-layer's sequencer drives the shared GEMM engine and weight path.

A sequencer (:class:`~m3vit_hw.dense.dense_layer.DenseSequencer`,
:class:`~m3vit_hw.dense.patch_embed.EmbedSequencer`) owns no engine, buffer or streamer: it issues
GEMM commands and weight-streamer commands and watches the ping-pong weight/parameter buffers through a
:class:`GemmClientSignature`. Whoever owns the engine (today the standalone sub-layer wrappers, later the
encoder's shared datapath) connects it with :func:`connect_client`, so several sequencers can take turns
on one engine through a simple multiplexer of this one signature.
"""

from amaranth.hdl import signed
from amaranth.lib import memory, stream, wiring
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..gemm.gemm_engine import GemmCommand
from ..config import PARAM_LANE_BYTES
from .weight_streamer import StreamerCommandLayout

__all__ = ["GemmClientSignature", "connect_client", "connect_weight_reads"]


class GemmClientSignature(wiring.Signature):
    """Seen from the sequencer (declare it ``Out`` there).

    Members
    -------
    gemm : Out(stream.Signature(GemmCommand(config)))
        Commands for the engine.
    gemm_done : In(1)
        The engine's ``done`` (one pulse per command, in order).
    gemm_busy : In(1)
        The engine's ``busy``.
    pe_active : In(1)
        The engine's ``pe_active`` (for counters).
    wcmd, pcmd : Out(stream.Signature(StreamerCommandLayout(mem_addr_width, mem_addr_width, tile_tag_width)))
        Weight and parameter streamer commands (widths from ``config``).
    tile_valid : In(1)
        Both buffers' current halves are FULL (``wbuf.read.tile.valid & pbuf.read.tile.valid``).
    release : Out(1)
        Release both current halves (drives both ``tile.ready``).
    gelu_lut : Out(memory.WritePort.Signature(ACT_BITS, signed(ACT_BITS)))
        The engine's GELU table (a sequencer that never writes it leaves ``en`` low).
    """

    def __init__(self, config):
        addr_width, tag_width = config.mem_addr_width, config.tile_tag_width
        self._config, self._aw, self._tw = config, addr_width, tag_width
        scmd = stream.Signature(StreamerCommandLayout(addr_width, addr_width, tag_width))
        super().__init__({
            "gemm": Out(stream.Signature(GemmCommand(config))),
            "gemm_done": In(1),
            "gemm_busy": In(1),
            "pe_active": In(1),
            "wcmd": Out(scmd),
            "pcmd": Out(scmd),
            "tile_valid": In(1),
            "release": Out(1),
            "gelu_lut": Out(memory.WritePort.Signature(addr_width=numerics.ACT_BITS,
                                                       shape=signed(numerics.ACT_BITS))),
        })

    def __eq__(self, other):
        return (isinstance(other, GemmClientSignature) and self._config == other._config
                and self._aw == other._aw and self._tw == other._tw)

    def __repr__(self):
        return f"GemmClientSignature({self._config.model.name}, addr_width={self._aw})"


def connect_client(m, client, engine, wstream, pstream, wbuf, pbuf, *, gemm=None, wcmd=None, pcmd=None,
                   busy=None, done=None):
    """Wire a sequencer's client port to an engine, two streamers and two weight buffers (whose read
    data/address side the caller connects to the engine).

    ``gemm``, ``wcmd``, ``pcmd`` (optional) are the stream *sinks* the client's three command streams
    go to instead of ``engine.cmd`` / ``wstream.cmd`` / ``pstream.cmd`` (a register stage the caller
    put in front of them, e.g. a :class:`~m3vit_hw.lib.skid.SkidBuffer`'s ``i``); ``busy`` replaces
    ``engine.busy`` as the client's ``gemm_busy`` (it must then also cover a command held in such a
    stage); ``done`` likewise replaces ``engine.done`` (e.g. a registered copy)."""
    wiring.connect(m, client.gemm, gemm if gemm is not None else engine.cmd)
    wiring.connect(m, client.wcmd, wcmd if wcmd is not None else wstream.cmd)
    wiring.connect(m, client.pcmd, pcmd if pcmd is not None else pstream.cmd)
    m.d.comb += [
        client.gemm_done.eq(engine.done if done is None else done),
        client.gemm_busy.eq(engine.busy if busy is None else busy),
        client.pe_active.eq(engine.pe_active),
        client.tile_valid.eq(wbuf.read.tile.valid & pbuf.read.tile.valid),
        wbuf.read.tile.ready.eq(client.release),
        pbuf.read.tile.ready.eq(client.release),
        engine.gelu_lut.addr.eq(client.gelu_lut.addr),
        engine.gelu_lut.data.eq(client.gelu_lut.data),
        engine.gelu_lut.en.eq(client.gelu_lut.en),
    ]


def connect_weight_reads(m, engine, wbuf, pbuf, pe_cols):
    """The engine's B operand from the weight buffer's current half and its column parameters from the
    parameter buffer's (the parameter word's lanes unpacked: see :mod:`m3vit_hw.moe.expert_layout`)."""
    wr, pr = wbuf.read, pbuf.read
    m.d.comb += [
        wr.addr.eq(engine.b_rd.addr), wr.en.eq(engine.b_rd.en), engine.b_rd.data.eq(wr.data),
        pr.addr.eq(engine.colp_rd.addr), pr.en.eq(engine.colp_rd.en),
    ]
    lane = PARAM_LANE_BYTES * 8
    for c in range(pe_cols):
        m.d.comb += [
            engine.colp_rd.data[c].bias.eq(pr.data[c * lane:c * lane + numerics.BIAS_BITS]),
            engine.colp_rd.data[c].mult.eq(pr.data[c * lane + 32:c * lane + 32 + numerics.MULT_BITS]),
        ]
