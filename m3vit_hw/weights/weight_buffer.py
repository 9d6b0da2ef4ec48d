"""The double-buffered (ping-pong) weight buffer between the weight streamer and the GEMM engine.

Its size is a configuration parameter independent of the number of experts: the reordering controller
streams one active expert (or one tile of a larger expert) into a half while the engine computes from
the other half, so on-chip weight memory stays fixed as E grows.

Handshake protocol (the contract)
---------------------------------
The two halves are handed back and forth as *tokens*; both sides visit them in the same fixed order
0, 1, 0, 1, ... so neither side ever names a half, it only waits for its turn.

Each half is either FREE (owned by the writer) or FULL (owned by the reader). After reset both are FREE.

Writer (the weight streamer), through :class:`WriterSignature`:

1. Wait until ``free`` is high: the writer's current half is FREE. (``free`` only falls because of the
   writer's own commit, so once seen high it stays high until the writer commits.)
2. Write words with ``en``/``addr``/``data``; ``addr`` is a write-word index *within* the half. Writes
   while ``free`` is low, or past the end of the half, are dropped, so they can never corrupt a tile the
   reader owns. A write is accepted (or dropped) in the cycle it is presented and reaches the memory
   one cycle later (it is registered with its bank enables, see the Timing section of
   :class:`WeightBuffer`).
3. Commit with one transfer on the ``commit`` stream, whose payload (:class:`TileInfoLayout`) describes
   the tile, at least one cycle after the tile's last write (a write in the commit's own cycle would
   land after the reader may have read its address; simulation asserts it). ``commit.ready`` equals
   ``free``. The half becomes FULL the next cycle and the writer's turn moves to the other half.

Reader (the GEMM engine), through :class:`ReaderSignature`:

1. ``tile.valid`` high means the reader's current half is FULL; ``tile.payload`` is the descriptor the
   writer committed. Both hold until the reader releases the half (stream rules: valid never waits on
   ready, payload holds until the transfer).
2. Read with ``en``/``addr`` (a read-word index within the half): ``data`` is valid the cycle after
   ``en`` & ``addr`` (synchronous read port, one cycle latency) and holds while ``en`` is low. Reads are
   only meaningful while ``tile.valid`` is high. A read issued in the same cycle as the release still
   returns the released half's word.
3. Release with one transfer on ``tile`` (assert ``ready``). The half becomes FREE the next cycle and
   the reader's turn moves to the other half.

Latencies: a commit in cycle c makes ``tile.valid`` high in cycle c+1 (if it was the reader's turn); a
release in cycle c makes ``free`` high in c+1 (if it was the writer's turn). With both sides busy the
writer fills half h^1 while the reader computes on half h, i.e. weight loading overlaps compute.

Word sizes: the writer writes ``write_bytes`` per beat (the memory port's beat), the reader reads
``word_bytes`` (what the engine consumes per cycle); the larger must be a power-of-two multiple of the
smaller.
Byte order is little-endian: write-word w of a half holds bytes ``[w*write_bytes, (w+1)*write_bytes)``,
read-word r holds bytes ``[r*word_bytes, (r+1)*word_bytes)``, byte i of a word at bits ``[8i, 8i+8)``.
"""

from amaranth.hdl import Array, Assert, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .. import numerics
from ..checks import check_int as _check_int
from ..config import AcceleratorConfig

__all__ = ["WeightBuffer", "TileInfoLayout", "WriterSignature", "ReaderSignature",
           "DEFAULT_TAG_WIDTH"]

#: Default width of the opaque tile tag (expert id, matrix, tile index: the controller's choice); the
#: config's ``tile_tag_width`` default is the one definition.
DEFAULT_TAG_WIDTH = AcceleratorConfig.tile_tag_width

#: Stacked rows up to which half 1 may start at a power-of-two row (no address adder) although
#: ``half_rows`` is not a power of two: one block RAM's depth at its widest (512 x 72) aspect, so the
#: padding costs no memory.
_STACK_FREE_ROWS = 512


def _check_sizes(half_bytes, word_bytes, tag_width, word_name="word_bytes"):
    _check_int("half_bytes", half_bytes, 1)
    _check_int(word_name, word_bytes, 1)
    _check_int("tag_width", tag_width, 0)
    if half_bytes % word_bytes:
        raise ValueError(f"half_bytes must be a multiple of {word_name}={word_bytes}, not {half_bytes}")


class TileInfoLayout(data.StructLayout):
    """Descriptor of the tile in a FULL half.

    Fields
    ------
    length : unsigned, shape range(half_bytes + 1)
        Valid bytes in the half, from byte 0; bytes past it are undefined.
    tag : unsigned(tag_width)
        Opaque to the buffer; passed from the writer's command to the reader.
    first, last : unsigned(1)
        This is the first / last tile of one streamer command (one expert's weights, say).
    """

    def __init__(self, half_bytes, tag_width=DEFAULT_TAG_WIDTH):
        super().__init__({
            "length": range(half_bytes + 1),
            "tag": unsigned(tag_width),
            "first": unsigned(1),
            "last": unsigned(1),
        })


class WriterSignature(wiring.Signature):
    """Write side of a :class:`WeightBuffer`, seen from the writer (declare it ``Out`` there).

    Parameters
    ----------
    half_bytes : int
        Bytes per half.
    write_bytes : int
        Bytes per write; divides ``half_bytes``.
    tag_width : int
        Width of :class:`TileInfoLayout`'s ``tag``.

    Interface attributes
    --------------------
    en : Out(1)
        Write strobe.
    addr : Out(range(half_bytes // write_bytes))
        Write-word index within the writer's current half.
    data : Out(8 * write_bytes)
        Little-endian bytes.
    commit : Out(stream.Signature(TileInfoLayout(half_bytes, tag_width)))
        Marks the current half FULL with this descriptor.
    free : In(1)
        The writer's current half is FREE (writable).
    half : In(1)
        Index of the writer's current half (informational).
    """

    def __init__(self, *, half_bytes, write_bytes, tag_width=DEFAULT_TAG_WIDTH):
        _check_sizes(half_bytes, write_bytes, tag_width, "write_bytes")
        self._params = (half_bytes, write_bytes, tag_width)
        super().__init__({
            "en": Out(1),
            "addr": Out(range(half_bytes // write_bytes)),
            "data": Out(8 * write_bytes),
            "commit": Out(stream.Signature(TileInfoLayout(half_bytes, tag_width))),
            "free": In(1),
            "half": In(1),
        })

    half_bytes = property(lambda self: self._params[0])
    write_bytes = property(lambda self: self._params[1])
    tag_width = property(lambda self: self._params[2])

    def __eq__(self, other):
        return type(other) is type(self) and self._params == other._params

    def __repr__(self):
        return (f"WriterSignature(half_bytes={self.half_bytes}, write_bytes={self.write_bytes}, "
                f"tag_width={self.tag_width})")


class ReaderSignature(wiring.Signature):
    """Read side of a :class:`WeightBuffer`, seen from the reader (declare it ``Out`` there).

    Parameters
    ----------
    half_bytes : int
        Bytes per half.
    word_bytes : int
        Bytes per read; divides ``half_bytes``.
    tag_width : int
        Width of :class:`TileInfoLayout`'s ``tag``.

    Interface attributes
    --------------------
    en : Out(1, init=1)
        Read enable; ``data`` holds while low.
    addr : Out(range(half_bytes // word_bytes))
        Read-word index within the reader's current half.
    data : In(8 * word_bytes)
        The word addressed in the previous enabled cycle.
    tile : In(stream.Signature(TileInfoLayout(half_bytes, tag_width)))
        Valid while the reader's current half is FULL; transferring it releases the half.
    half : In(1)
        Index of the reader's current half (informational).
    """

    def __init__(self, *, half_bytes, word_bytes, tag_width=DEFAULT_TAG_WIDTH):
        _check_sizes(half_bytes, word_bytes, tag_width)
        self._params = (half_bytes, word_bytes, tag_width)
        super().__init__({
            "en": Out(1, init=1),
            "addr": Out(range(half_bytes // word_bytes)),
            "data": In(8 * word_bytes),
            "tile": In(stream.Signature(TileInfoLayout(half_bytes, tag_width))),
            "half": In(1),
        })

    half_bytes = property(lambda self: self._params[0])
    word_bytes = property(lambda self: self._params[1])
    tag_width = property(lambda self: self._params[2])

    def __eq__(self, other):
        return type(other) is type(self) and self._params == other._params

    def __repr__(self):
        return (f"ReaderSignature(half_bytes={self.half_bytes}, word_bytes={self.word_bytes}, "
                f"tag_width={self.tag_width})")


class WeightBuffer(wiring.Component):
    """Ping-pong weight buffer: two halves of ``half_bytes``, one written while the other is read.

    See the module docstring for the handshake contract.

    Parameters
    ----------
    half_bytes : int
        Bytes per half (the buffer holds ``2 * half_bytes``); a multiple of ``word_bytes`` and of
        ``write_bytes``. Independent of the number of experts: larger experts stream as several tiles.
    word_bytes : int
        Bytes per read (the engine's weight word: ``pe_cols`` int8 weights).
    write_bytes : int, optional
        Bytes per write (the memory port's beat); defaults to ``word_bytes``. The larger of the two must
        be a power-of-two multiple of the smaller: the buffer is built as that many banks of the smaller
        width, so the narrow side addresses one bank and the wide side all of them.
    tag_width : int
        Width of the tile descriptor's ``tag``.

    Interface attributes
    --------------------
    write : ``In(WriterSignature(half_bytes=, write_bytes=, tag_width=))``
    read : ``In(ReaderSignature(half_bytes=, word_bytes=, tag_width=))``

    Timing
    ------
    One write and one read per cycle, read latency one cycle; a commit takes effect the next cycle, a
    release (tile transfer) the cycle after (it is registered first; the tile is not offered meanwhile).
    A write is decided in the cycle it is presented (``free``, the range check, the bank decode) and
    its per-bank enables, row and data are registered: the memories' write enables then start at
    flip-flops, not behind the half state, the address compare and the bank decode (with 32 banks that
    decode and its fanout missed 300 MHz). Storage is ``2 * half_bytes`` in ``max(word, write) /
    min(word, write)`` simple dual-port memories (BRAM/URAM).
    """

    def __init__(self, half_bytes, word_bytes, *, write_bytes=None, tag_width=DEFAULT_TAG_WIDTH):
        _check_sizes(half_bytes, word_bytes, tag_width)
        if write_bytes is None:
            write_bytes = word_bytes
        _check_sizes(half_bytes, write_bytes, tag_width, "write_bytes")
        wide, narrow = max(word_bytes, write_bytes), min(word_bytes, write_bytes)
        ratio = wide // narrow
        if wide % narrow or ratio & (ratio - 1):
            raise ValueError(f"write_bytes must be a power-of-two multiple or fraction of "
                             f"word_bytes={word_bytes}, not {write_bytes}")
        self._half_bytes = half_bytes
        self._word_bytes = word_bytes
        self._write_bytes = write_bytes
        self._tag_width = tag_width
        super().__init__({
            "write": In(WriterSignature(half_bytes=half_bytes, write_bytes=write_bytes,
                                        tag_width=tag_width)),
            "read": In(ReaderSignature(half_bytes=half_bytes, word_bytes=word_bytes,
                                       tag_width=tag_width)),
        })

    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from an ``AcceleratorConfig``.

        ``config.weight_buffer_bytes`` is the whole buffer (both halves); a read word is one
        ``pe_cols``-wide row of int8 weights; ``write_bytes`` is ``config.mem_data_bytes`` and
        ``tag_width`` is ``config.tile_tag_width``. Keyword arguments override.
        """
        kwargs.setdefault("write_bytes", config.mem_data_bytes)
        kwargs.setdefault("tag_width", config.tile_tag_width)
        word_bytes = kwargs.pop("word_bytes", config.pe_cols * numerics.WEIGHT_BITS // 8)
        return cls(config.weight_buffer_half_bytes, word_bytes, **kwargs)

    @property
    def half_bytes(self):
        return self._half_bytes

    @property
    def word_bytes(self):
        return self._word_bytes

    @property
    def write_bytes(self):
        return self._write_bytes

    def elaborate(self, platform):
        m = Module()
        wb, rb = self._write_bytes, self._word_bytes
        row_bytes = max(wb, rb)
        banks = row_bytes // min(wb, rb)
        bank_bits = banks.bit_length() - 1
        half_rows = self._half_bytes // row_bytes
        half_writes = self._half_bytes // wb

        full = Signal(2)
        info = [Signal(TileInfoLayout(self._half_bytes, self._tag_width), name=f"info{h}")
                for h in range(2)]
        w_half = Signal()
        r_half = Signal()

        w, r = self.write, self.read
        # ``free`` (the writer's half is not FULL) in a register of its own, computed a cycle ahead
        # from the commit and the registered release: the writer's commit logic (and every register
        # it enables) then starts at this flip-flop, not at a multiplexer of the half state.
        w_free = Signal(init=1)
        # The release (a tile transfer) is registered before it frees the half and moves the reader:
        # the reader's release logic then ends at this flip-flop, not at the buffer's half state and
        # address offset. The tile is not offered while its release is pending.
        released = Signal()
        m.d.sync += released.eq(r.tile.valid & r.tile.ready)
        m.d.comb += [
            w.free.eq(w_free), w.half.eq(w_half), w.commit.ready.eq(w_free),
            r.tile.valid.eq(full.bit_select(r_half, 1) & ~released),
            r.tile.payload.eq(Mux(r_half, info[1], info[0])),
            r.half.eq(r_half),
        ]
        with m.If(w.commit.valid & w.commit.ready):
            m.d.sync += [full.bit_select(w_half, 1).eq(1), w_half.eq(~w_half)]
            with m.If(w_half):
                m.d.sync += info[1].eq(w.commit.payload)
            with m.Else():
                m.d.sync += info[0].eq(w.commit.payload)
        with m.If(released):
            m.d.sync += [full.bit_select(r_half, 1).eq(0), r_half.eq(~r_half)]
        # The writer's half after this cycle is the other one after a commit; it is FULL then unless
        # this cycle's release empties it (a release and a commit are never on the same half).
        commit = w.commit.valid & w_free
        other_full = full.bit_select(~w_half, 1) & ~(released & (r_half != w_half))
        same_full = full.bit_select(w_half, 1) & ~(released & (r_half == w_half))
        m.d.sync += w_free.eq(~Mux(commit, other_full, same_full))
        m.d.comb += Assert(w_free == ~full.bit_select(w_half, 1),
                           "WeightBuffer: the registered free flag is out of step with the halves")

        # Rows of max(word, write) bytes; the narrow side's low address bits pick a bank. Half 1 starts
        # at row ``base``: the half index above the row bits (no adder behind either side's address)
        # when half_rows is a power of two, or when rounding it up to one costs no extra block RAM
        # (the stacked depth stays within 512 rows, one block RAM's depth at its widest aspect: the
        # column-parameter buffer's 15-row halves); else right after half 0 (``half_bytes`` need not
        # be a power of two: Edge-MoE uses 288 KiB halves, the W1 weight buffer 2304-row halves).
        narrow_writes = wb < rb
        narrow_reads = rb < wb
        w_row = w.addr >> bank_bits if narrow_writes else w.addr
        r_row = r.addr >> bank_bits if narrow_reads else r.addr
        hb = (half_rows - 1).bit_length()
        pow2 = half_rows == 1 << hb or (1 << hb) + half_rows <= _STACK_FREE_ROWS
        base = 1 << hb if pow2 else half_rows
        w_phys = Signal(range(base + half_rows))
        r_phys = Signal(range(base + half_rows))
        if pow2:
            m.d.comb += [
                w_phys.eq(Cat(w_row[:hb] if hb else Const(0, 0), w_half)),
                r_phys.eq(Cat(r_row[:hb] if hb else Const(0, 0), r_half)),
            ]
        else:
            m.d.comb += [
                w_phys.eq(w_row + Mux(w_half, half_rows, 0)),
                r_phys.eq(r_row + Mux(r_half, half_rows, 0)),
            ]
        # Dropping writes while the half is not FREE protects the reader's tile; the range check
        # matters when half_writes is not a power of two (the address would reach the other half).
        w_ok = w.en & w_free & (w.addr < half_writes)
        # A write in the commit's own cycle would land after the reader may read it (see the module
        # docstring); the streamer commits the cycle after its last beat.
        with m.If(w.commit.valid & w.commit.ready):
            m.d.comb += Assert(~w_ok, "WeightBuffer: a write in the cycle of its half's commit")
        # The write, registered: per-bank enables (decoded here), the physical row and the data.
        lane_bits = 8 * min(wb, rb)
        wq_en = Signal(banks, name="wq_en")
        wq_row = Signal.like(w_phys, name="wq_row", reset_less=True)
        wq_data = Signal(8 * wb, name="wq_data", reset_less=True)
        m.d.sync += [wq_row.eq(w_phys), wq_data.eq(w.data)]
        for b in range(banks):
            m.d.sync += wq_en[b].eq(w_ok & (w.addr[:bank_bits] == b) if narrow_writes else w_ok)
        # Bank select of a narrow read, delayed to line up with the one-cycle read latency.
        r_lane = Signal(max(bank_bits, 1))
        if narrow_reads:
            with m.If(r.en):
                m.d.sync += r_lane.eq(r.addr[:bank_bits])
        bank_data = []
        for b in range(banks):
            mem = Memory(shape=unsigned(lane_bits), depth=base + half_rows, init=[])
            m.submodules[f"bank{b}"] = mem
            wp = mem.write_port()
            rp = mem.read_port()
            m.d.comb += [
                wp.addr.eq(wq_row),
                wp.data.eq(wq_data[b * lane_bits:(b + 1) * lane_bits] if narrow_reads else wq_data),
                wp.en.eq(wq_en[b]),
                rp.addr.eq(r_phys), rp.en.eq(r.en),
            ]
            bank_data.append(rp.data)
        if narrow_reads:
            m.d.comb += r.data.eq(Array(bank_data)[r_lane])
        else:
            m.d.comb += r.data.eq(Cat(*bank_data))
        return m
