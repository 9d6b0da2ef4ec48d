"""The weight path of a datapath: external-memory read arbiter, two weight streamers and the weight and
parameter ping-pong buffers, wired once.

Every standalone sub-layer wrapper (and the encoder's shared datapath) owns the same five pieces wired
the same way: the weight streamer and the parameter streamer are the arbiter's masters 0 and 1, any
further reader of external memory (LayerNorm records, GELU tables, the patch loader) takes masters
``2 ..``, the arbiter drives the one external read port, and each streamer writes its buffer.
:class:`WeightPath` builds the pieces and :meth:`WeightPath.add_to` adds and wires them inside the
caller's module (under the names ``arbiter``, ``wbuf``, ``pbuf``, ``wstream``, ``pstream``, so the
hierarchy of a wrapper that uses it is the one it had before). The engine side of the buffers (read
ports, tile handshakes) stays with the caller: :func:`~m3vit_hw.weights.client.connect_weight_reads` and
:func:`~m3vit_hw.weights.client.connect_client` wire the common case.
"""

from amaranth.hdl import Mux
from amaranth.lib import wiring

from ..config import AcceleratorConfig
from ..checks import check_int
from ..lib.mem_arbiter import ReadArbiter
from .weight_buffer import WeightBuffer
from .weight_streamer import WeightStreamer

__all__ = ["WeightPath"]


class WeightPath:
    """Arbiter + weight/parameter streamers + weight/parameter ping-pong buffers.

    Parameters
    ----------
    config : AcceleratorConfig
        The external-memory port (``mem_addr_width``, ``mem_data_bytes``, ``mem_max_burst``),
        ``arbiter_depth``, ``tile_tag_width`` and the weight word (``act_word_bytes``).
    weight_half_bytes, param_half_bytes : int
        Bytes per half of the weight and of the parameter buffer (a layout's ``weight_half_bytes`` and
        ``param_half_bytes``).
    param_word_bytes : int
        Bytes of one parameter-buffer word.
    readers : int
        Further external-memory readers (arbiter masters ``2 .. 2 + readers - 1``), default 0.

    Attributes
    ----------
    arbiter, wbuf, pbuf, wstream, pstream
        The pieces (wrappers expose them under the same names).
    readers : list
        The arbiter's master ports for the further readers, in order (connect a reader's
        ``ReadPortSignature`` port to one with ``wiring.connect``).

    Raises
    ------
    TypeError, ValueError
        On a bad parameter (named, with the allowed range).
    """

    def __init__(self, config, *, weight_half_bytes, param_half_bytes, param_word_bytes, readers=0):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        check_int("readers", readers, 0, 14)
        self._db = config.mem_data_bytes
        port = dict(addr_width=config.mem_addr_width, data_bytes=config.mem_data_bytes,
                    max_burst=config.mem_max_burst)
        tags = dict(tag_width=config.tile_tag_width)
        self.arbiter = ReadArbiter(2 + readers, **port, depth=config.arbiter_depth)
        self.wbuf = WeightBuffer(weight_half_bytes, config.act_word_bytes, write_bytes=self._db, **tags)
        self.pbuf = WeightBuffer(param_half_bytes, param_word_bytes, write_bytes=self._db, **tags)
        self.wstream = WeightStreamer(weight_half_bytes, **port, **tags)
        self.pstream = WeightStreamer(param_half_bytes, **port, **tags)

    @property
    def readers(self):
        return list(self.arbiter.masters)[2:]

    def add_to(self, m, mem):
        """Add the five pieces to module ``m`` and wire them; ``mem`` is the caller's external read
        port (its ``Out(ReadPortSignature)`` member, connected flipped)."""
        for name in ("wbuf", "pbuf", "wstream", "pstream", "arbiter"):
            m.submodules[name] = getattr(self, name)
        wiring.connect(m, self.wstream.mem, self.arbiter.masters[0])
        wiring.connect(m, self.pstream.mem, self.arbiter.masters[1])
        wiring.connect(m, self.arbiter.mem, wiring.flipped(mem))
        wiring.connect(m, self.wstream.buf, self.wbuf.write)
        wiring.connect(m, self.pstream.buf, self.pbuf.write)

    def written_bytes(self):
        """Bytes the two streamers write into the buffers this cycle (an expression, for counters)."""
        return Mux(self.wstream.buf.en, self._db, 0) + Mux(self.pstream.buf.en, self._db, 0)
