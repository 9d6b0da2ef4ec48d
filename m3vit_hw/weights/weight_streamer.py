"""Streams expert weights from external memory into the free half of the :class:`WeightBuffer`.

The reordering controller sends one command per active expert (or per weight matrix); idle experts get
no command and are never fetched. A command longer than a buffer half is cut into successive tiles of
``half_bytes`` (the last one shorter), each one fill of a half, so the buffer size is independent of the
expert size and of E. The compiler lays weights out so that each half-sized chunk is a self-contained
tile for the engine, or issues one command per tile.
"""

from amaranth.hdl import Assert, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..lib.mem_port import (BOUNDARY_BYTES, DEFAULT_ADDR_WIDTH, DEFAULT_DATA_BYTES,
                               DEFAULT_MAX_BURST, ReadPortSignature)
from ..checks import check_int as _check_int
from .weight_buffer import DEFAULT_TAG_WIDTH, WriterSignature

__all__ = ["WeightStreamer", "StreamerCommandLayout"]


class StreamerCommandLayout(data.StructLayout):
    """One weight-load command.

    Fields
    ------
    addr : unsigned(addr_width)
        External byte address of the first weight byte; a multiple of the port's ``data_bytes``.
    length : unsigned(length_width)
        Bytes to load, >= 0 (0 commits one empty tile without fetching).
    tag : unsigned(tag_width)
        Opaque descriptor (expert id, matrix, ...) copied into every tile's :class:`TileInfoLayout`.
    """

    def __init__(self, addr_width, length_width, tag_width):
        super().__init__({
            "addr": unsigned(addr_width),
            "length": unsigned(length_width),
            "tag": unsigned(tag_width),
        })


class WeightStreamer(wiring.Component):
    """Command-driven DMA from a memory read port into the write side of a :class:`WeightBuffer`.

    For every command the streamer cuts ``length`` bytes into tiles of at most ``half_bytes``. For each
    tile it waits for the buffer's ``free``, issues read bursts covering the tile (at most ``max_burst``
    beats, never crossing a 4 KiB boundary, as many outstanding as the memory accepts so the memory's
    latency is paid once per tile), writes every returned beat straight into the half (beat n to
    write-word n), and after the tile's last beat commits the half with ``{length, tag, first, last}``.
    A tile whose length is not a multiple of ``data_bytes`` fetches its final beat whole; the bytes past
    ``length`` land in the half but are outside the descriptor.

    Parameters
    ----------
    half_bytes : int
        Bytes per buffer half; a multiple of ``data_bytes``.
    addr_width, data_bytes, max_burst : int
        The memory port's parameters (see :class:`~m3vit_hw.lib.mem_port.ReadPortSignature`).
    tag_width : int
        Width of the command's tag.
    length_width : int, optional
        Width of the command's length; defaults to ``addr_width``.
    counter_width : int
        Width of the ``bytes_fetched`` counter (it wraps).

    Interface attributes
    --------------------
    cmd : ``In(stream.Signature(StreamerCommandLayout(addr_width, length_width, tag_width)))``
        Accepted only when the previous command's last tile has been committed.
    mem : ``Out(ReadPortSignature(addr_width=, data_bytes=, max_burst=))``
    buf : ``Out(WriterSignature(half_bytes=, write_bytes=data_bytes, tag_width=))``
    bytes_fetched : ``Out(counter_width)``
        Bytes received from memory since reset (``data_bytes`` per beat).
    busy : ``Out(1)``
        A command is in progress.

    Timing
    ------
    Per tile: the wait for ``free``, one cycle of setup, the memory's latency, ``ceil(length /
    data_bytes)`` beats at the memory's rate (the streamer always accepts beats), and one commit cycle.
    Fill bandwidth therefore approaches the memory's bandwidth for tiles much longer than its latency.
    """

    def __init__(self, half_bytes, *, addr_width=DEFAULT_ADDR_WIDTH, data_bytes=DEFAULT_DATA_BYTES,
                 max_burst=DEFAULT_MAX_BURST, tag_width=DEFAULT_TAG_WIDTH, length_width=None,
                 counter_width=32):
        mem_sig = ReadPortSignature(addr_width=addr_width, data_bytes=data_bytes, max_burst=max_burst)
        buf_sig = WriterSignature(half_bytes=half_bytes, write_bytes=data_bytes, tag_width=tag_width)
        if length_width is None:
            length_width = addr_width
        _check_int("length_width", length_width, 1)
        _check_int("counter_width", counter_width, 1)
        self._half_bytes = half_bytes
        self._addr_width = addr_width
        self._data_bytes = data_bytes
        self._max_burst = max_burst
        self._tag_width = tag_width
        self._length_width = length_width
        super().__init__({
            "cmd": In(stream.Signature(StreamerCommandLayout(addr_width, length_width, tag_width))),
            "mem": Out(mem_sig),
            "buf": Out(buf_sig),
            "bytes_fetched": Out(counter_width),
            "busy": Out(1),
        })

    def check_command(self, addr, length, tag=0):
        """Check one command before it is sent: every field fits, ``addr`` is a multiple of the memory
        beat and ``addr + length`` stays inside the address space (the streamer would otherwise read a
        misaligned or wrapped range without complaint).

        Raises
        ------
        ValueError
            Naming the field, the value and the allowed range.
        """
        _check_int("addr", addr, 0, (1 << self._addr_width) - 1)
        _check_int("length", length, 0, (1 << self._length_width) - 1)
        _check_int("tag", tag, 0, (1 << self._tag_width) - 1)
        if addr % self._data_bytes:
            raise ValueError(f"addr must be a multiple of data_bytes={self._data_bytes}, not {addr}")
        if addr + length > 1 << self._addr_width:
            raise ValueError(f"addr + length must be at most 2**addr_width = {1 << self._addr_width}, "
                             f"not {addr} + {length}")

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from an ``AcceleratorConfig``.

        ``half_bytes = config.weight_buffer_bytes // 2``; the port parameters, the tag width and the
        counter width come from ``config.mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``,
        ``tile_tag_width`` and ``counter_width``; keyword arguments override.
        """
        kwargs.setdefault("addr_width", config.mem_addr_width)
        kwargs.setdefault("data_bytes", config.mem_data_bytes)
        kwargs.setdefault("max_burst", config.mem_max_burst)
        kwargs.setdefault("tag_width", config.tile_tag_width)
        kwargs.setdefault("counter_width", config.counter_width)
        half_bytes = kwargs.pop("half_bytes", config.weight_buffer_half_bytes)
        return cls(half_bytes, **kwargs)

    @property
    def half_bytes(self):
        return self._half_bytes

    def elaborate(self, platform):
        m = Module()
        db = self._data_bytes
        lb = db.bit_length() - 1            # log2(data_bytes)
        half = self._half_bytes
        half_beats = half // db
        aw = self._addr_width

        if lb:
            # In simulation a misaligned command trips here instead of fetching the wrong bytes
            # (check_command refuses it where it is built).
            with m.If(self.cmd.valid):
                m.d.comb += Assert(self.cmd.payload.addr[:lb] == 0,
                                   "WeightStreamer: command addr not a multiple of data_bytes")

        c_addr = Signal(aw)                 # next tile's external address
        c_rem = Signal(self._length_width)  # bytes of the command not yet committed
        c_tag = Signal(self._tag_width)
        c_first = Signal()
        tile_len = Signal(range(half + 1))
        tile_beats = Signal(range(half_beats + 1))
        req_addr = Signal(aw)
        req_left = Signal(range(half_beats + 1))   # beats of this tile not yet requested
        # req_left != 0 in a register of its own: it gates the request valid, which runs into the
        # read arbiter's skid buffer and back into req_left's own enable.
        req_any = Signal()
        rx_left = Signal(range(half_beats + 1))    # beats of this tile not yet received
        rx_addr = Signal(range(half_beats))
        fetched = Signal(len(self.bytes_fetched))
        m.d.comb += self.bytes_fetched.eq(fetched)

        # The command's remaining length is also kept in beats (c_beats), so no rounding add sits
        # in front of the tile plan.
        c_beats = Signal(range(-(-((1 << self._length_width) - 1) // db) + 1))
        next_len = Signal(range(half + 1))
        m.d.comb += next_len.eq(Mux(c_rem > half, half, c_rem))

        # Burst length: what is left, capped by max_burst and by the beats left in this 4 KiB page.
        page_beats = BOUNDARY_BYTES // db
        page_bits = BOUNDARY_BYTES.bit_length() - 1
        beat_in_page = req_addr[lb:page_bits] if aw > lb else 0
        room = Signal(range(page_beats + 1))
        burst = Signal(range(self._max_burst + 1))
        m.d.comb += room.eq(page_beats - beat_in_page)
        # The burst length is a register, computed in two registered steps after req_addr/req_left
        # change (min with max_burst and the page room; then the smaller of the two), so no compare
        # feeds the address adder in the same cycle. A tile's first burst is computed during WAIT, so
        # the first request is not delayed; later ones leave at least three cycles apart, which costs
        # nothing while a burst is longer than that (each request covers a whole burst).
        capped_r = Signal(range(self._max_burst + 1))
        room_r = Signal(range(page_beats + 1))
        m.d.sync += [capped_r.eq(Mux(req_left > self._max_burst, self._max_burst, req_left)),
                     room_r.eq(room)]
        bwait = Signal(range(3))
        burst_ok = bwait == 0
        # The next tile's plan, in registers when WAIT starts: its beats (nb), those capped by
        # max_burst (nbc) and the beats left in c_addr's page (room0). They are computed from the
        # registered command in PLAN, and from a two-stage precomputation during FILL (c_beats,
        # c_addr and the tile are constant then) when a tile is committed.
        cap_beats = min(half_beats, self._max_burst)
        # The command's beat count against those two caps, compared on its byte length when it is
        # accepted (ceil(length / db) > k exactly when length > k * db) and kept in registers, so
        # PLAN's minimum is a multiplexer and no wide compare sits in front of nb/nbc.
        c_big = Signal()                                 # c_beats > half_beats
        c_bigcap = Signal()                              # c_beats > cap_beats
        nb = Signal(range(half_beats + 1))
        nbc = Signal(range(cap_beats + 1))
        room0 = Signal(range(page_beats + 1))
        first_burst = Mux(nbc > room0, room0, nbc)

        def in_page(addr_beats):
            return addr_beats[:page_bits - lb] if page_bits > lb else 0

        pre_beats = Signal.like(c_beats)                 # c_beats after this tile
        pre_page = Signal(range(page_beats))             # beat-in-page of c_addr after this tile
        m.d.sync += [pre_beats.eq(c_beats - tile_beats),
                     pre_page.eq(in_page(c_addr[lb:] + tile_beats) if aw > lb else 0)]
        pre_nb = Signal.like(nb)
        pre_nbc = Signal.like(nbc)
        pre_room = Signal.like(room0)
        # pre_beats against the two caps, from c_beats alone: a tile is min(c_beats, half_beats)
        # beats, so c_beats - tile_beats > k exactly when c_beats > half_beats + k. These compares
        # with constants run a cycle ahead of pre_beats (c_beats is settled from WAIT on), so the
        # wide compare is not in series with the subtraction.
        pre_big = Signal()
        pre_bigcap = Signal()
        m.d.sync += [pre_big.eq(c_beats > 2 * half_beats),
                     pre_bigcap.eq(c_beats > half_beats + cap_beats)]
        m.d.sync += [pre_nb.eq(Mux(pre_big, half_beats, pre_beats)),
                     pre_nbc.eq(Mux(pre_bigcap, cap_beats, pre_beats)),
                     pre_room.eq(page_beats - pre_page)]

        req, resp, buf = self.mem.req, self.mem.resp, self.buf
        m.d.comb += [
            req.p.addr.eq(req_addr),
            req.p.beats.eq(burst),
            buf.addr.eq(rx_addr),
            buf.data.eq(resp.p.data),
            buf.commit.p.length.eq(tile_len),
            buf.commit.p.tag.eq(c_tag),
            buf.commit.p.first.eq(c_first),
            buf.commit.p.last.eq(c_rem == tile_len),
        ]

        # FILL as a flag register of its own (set and cleared with the state's transitions): the
        # memory response ready and the request valid, which run into the read arbiter's skid
        # buffers and round-robin, start at one flip-flop instead of a decode of the state.
        in_fill = Signal()
        m.d.comb += [resp.ready.eq(in_fill)]
        with m.FSM(name="state") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    cmd_beats = (self.cmd.p.length + db - 1) >> lb
                    m.d.sync += [
                        c_addr.eq(self.cmd.p.addr), c_rem.eq(self.cmd.p.length),
                        c_beats.eq(cmd_beats),
                        c_tag.eq(self.cmd.p.tag), c_first.eq(1),
                        c_big.eq(self.cmd.p.length > half_beats * db),
                        c_bigcap.eq(self.cmd.p.length > cap_beats * db),
                    ]
                    m.next = "PLAN"

            with m.State("PLAN"):
                # The first tile's plan from the registered command (one cycle per command), so the
                # beat count's round-up adder and these compares do not share a cycle.
                m.d.comb += self.busy.eq(1)
                m.d.sync += [
                    nb.eq(Mux(c_big, half_beats, c_beats)),
                    nbc.eq(Mux(c_bigcap, cap_beats, c_beats)),
                    room0.eq(page_beats - (in_page(c_addr[lb:]) if aw > lb else 0)),
                ]
                m.next = "WAIT"

            with m.State("WAIT"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += burst.eq(first_burst)
                with m.If(buf.free):
                    m.d.sync += [
                        tile_len.eq(next_len), tile_beats.eq(nb), req_addr.eq(c_addr),
                        req_left.eq(nb), rx_left.eq(nb), rx_addr.eq(0),
                    ]
                    with m.If(c_beats == 0):
                        m.next = "COMMIT"
                    with m.Else():
                        # nb >= 1 here (c_beats != 0), so the tile has a request to issue.
                        m.d.sync += [in_fill.eq(1), req_any.eq(1)]
                        m.next = "FILL"

            with m.State("FILL"):
                m.d.comb += self.busy.eq(1)
                with m.If(req.valid & req.ready):
                    # req_left - burst == 0 exactly when req_left == burst (burst <= req_left).
                    m.d.sync += [req_addr.eq(req_addr + (burst << lb)), req_left.eq(req_left - burst),
                                 req_any.eq(req_left != burst), bwait.eq(2)]
                with m.Elif(~burst_ok):
                    m.d.sync += bwait.eq(bwait - 1)
                with m.If(bwait == 1):
                    m.d.sync += burst.eq(Mux(capped_r > room_r, room_r, capped_r))
                with m.If(resp.valid):
                    m.d.sync += [rx_addr.eq(rx_addr + 1), rx_left.eq(rx_left - 1),
                                 fetched.eq(fetched + db)]
                    with m.If(rx_left == 1):
                        m.d.sync += in_fill.eq(0)
                        m.next = "COMMIT"

            with m.State("COMMIT"):
                m.d.comb += [self.busy.eq(1), buf.commit.valid.eq(1)]
                with m.If(buf.commit.ready):
                    m.d.sync += [c_addr.eq(c_addr + tile_len), c_rem.eq(c_rem - tile_len),
                                 c_beats.eq(pre_beats), nb.eq(pre_nb), nbc.eq(pre_nbc),
                                 room0.eq(pre_room), c_first.eq(0)]
                    with m.If(c_rem == tile_len):
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "WAIT"
        m.d.comb += [
            req.valid.eq(in_fill & burst_ok & req_any),
            Assert(~in_fill | (req_any == (req_left != 0)),
                   "WeightStreamer: the request flag is out of step with req_left"),
            # The buffer write enable from the flag too (it runs on into the buffer's bank enables).
            buf.en.eq(resp.valid & in_fill),
            Assert(in_fill == (fsm.state == fsm.encoding["FILL"]),
                   "WeightStreamer: the FILL flag is out of step with the state"),
        ]
        return m
