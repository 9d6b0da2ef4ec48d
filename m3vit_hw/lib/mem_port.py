"""The external-memory read and write ports used inside the accelerator.

:class:`WritePortSignature` (the store DMA's port; the SoC's AXI master maps it onto AW/W/B) follows
the same parameter rules as the read port.

Every unit that reads external memory (the weight streamer, later the program and image loaders) is a
*master* of a :class:`ReadPortSignature`: it sends read requests (byte address, length in beats) on a
request stream and receives data beats on a response stream. At the top level one arbiter/bridge maps
the port 1:1 onto an AXI4 read channel pair (AR/R), which is why the rules below copy AXI4's.

Contract
--------
* Both ``req`` and ``resp`` are :mod:`amaranth.lib.stream` streams: ``valid`` never waits on ``ready``,
  the payload holds until the transfer, a transfer happens in a cycle where ``valid & ready``.
* A request ``{addr, beats}`` reads ``beats * data_bytes`` bytes starting at byte address ``addr``.
  ``addr`` is a multiple of ``data_bytes``; ``1 <= beats <= max_burst``; the burst does not cross a
  :data:`BOUNDARY_BYTES` (4 KiB) boundary (AXI4 forbids it, so the bridge can pass bursts through
  unsplit).
* Responses come back **in request order**, exactly ``beats`` beats per request, the final beat of
  each request with ``last = 1``. There is no error response: a bad address is a bug upstream.
* Byte order is little-endian: byte ``addr + i`` of a beat is ``data[8*i : 8*i + 8]``.
* The master may keep several requests outstanding; the memory decides how many it accepts (by holding
  ``req.ready`` low). A master must not make ``resp.ready`` depend on ``req.ready``.
"""

from amaranth.hdl import unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..checks import check_int

__all__ = [
    "BOUNDARY_BYTES", "MAX_BURST_LIMIT",
    "DEFAULT_ADDR_WIDTH", "DEFAULT_DATA_BYTES", "DEFAULT_MAX_BURST",
    "ReadRequestLayout", "ReadBeatLayout", "ReadPortSignature",
    "WriteRequestLayout", "WriteBeatLayout", "WritePortSignature",
]

#: Bursts never cross an address boundary of this many bytes (the AXI4 4 KiB rule).
BOUNDARY_BYTES = 4096
#: AXI4 INCR bursts are at most 256 beats long.
MAX_BURST_LIMIT = 256
#: Defaults used when an :class:`AcceleratorConfig` does not name the port's parameters: the ZCU104's
#: PL-to-DDR HP ports are 128 bits wide with 32-bit (4 GiB) addresses, and 16-beat bursts are what the
#: Zynq UltraScale+ HP ports are tuned for.
DEFAULT_ADDR_WIDTH = 32
DEFAULT_DATA_BYTES = 16
DEFAULT_MAX_BURST = 16


def _check_params(addr_width, data_bytes, max_burst):
    check_int("addr_width", addr_width, 1, 64)
    check_int("data_bytes", data_bytes, 1)
    check_int("max_burst", max_burst, 1, MAX_BURST_LIMIT)
    if data_bytes > 128 or data_bytes & (data_bytes - 1):
        raise ValueError(f"data_bytes must be a power of two in [1, 128], not {data_bytes}")
    if (1 << addr_width) < data_bytes:
        raise ValueError(f"addr_width must address at least one beat of data_bytes={data_bytes}, "
                         f"not {addr_width}")
    if max_burst * data_bytes > BOUNDARY_BYTES:
        raise ValueError(f"max_burst * data_bytes must be at most {BOUNDARY_BYTES} (a burst may not "
                         f"cross a 4 KiB boundary), not {max_burst} * {data_bytes}")


class ReadRequestLayout(data.StructLayout):
    """Payload of a read request.

    Fields
    ------
    addr : unsigned(addr_width)
        Byte address of the first beat; a multiple of ``data_bytes``.
    beats : unsigned, shape range(max_burst + 1)
        Number of beats, ``1 .. max_burst`` (a count, not AXI's count minus one).
    """

    def __init__(self, addr_width, max_burst):
        super().__init__({
            "addr": unsigned(addr_width),
            "beats": range(max_burst + 1),
        })


class ReadBeatLayout(data.StructLayout):
    """Payload of a response beat.

    Fields
    ------
    data : unsigned(8 * data_bytes)
        Little-endian bytes.
    last : unsigned(1)
        Set on the final beat of each request.
    """

    def __init__(self, data_bytes):
        super().__init__({
            "data": unsigned(8 * data_bytes),
            "last": unsigned(1),
        })


class ReadPortSignature(wiring.Signature):
    """External-memory read port, seen from the master (the unit that reads).

    Parameters
    ----------
    addr_width : int
        Byte-address width, 1..64.
    data_bytes : int
        Bytes per beat, a power of two in 1..128 (AXI4 data widths).
    max_burst : int
        Longest request in beats, 1..256, with ``max_burst * data_bytes <= 4096``.

    Interface attributes
    --------------------
    req : ``Out(stream.Signature(ReadRequestLayout(addr_width, max_burst)))``
        Read requests, master to memory.
    resp : ``In(stream.Signature(ReadBeatLayout(data_bytes)))``
        Data beats, memory to master, in request order.

    A master declares ``"mem": Out(ReadPortSignature(...))``; a memory, arbiter or bus bridge declares
    ``In(...)`` (the flipped signature). See the module docstring for the full contract.

    Raises
    ------
    TypeError
        If a parameter is not an integer.
    ValueError
        If a parameter is out of range.
    """

    def __init__(self, *, addr_width=DEFAULT_ADDR_WIDTH, data_bytes=DEFAULT_DATA_BYTES,
                 max_burst=DEFAULT_MAX_BURST):
        _check_params(addr_width, data_bytes, max_burst)
        self._addr_width = addr_width
        self._data_bytes = data_bytes
        self._max_burst = max_burst
        super().__init__({
            "req": Out(stream.Signature(ReadRequestLayout(addr_width, max_burst))),
            "resp": In(stream.Signature(ReadBeatLayout(data_bytes))),
        })

    @classmethod
    def check_parameters(cls, *, addr_width=DEFAULT_ADDR_WIDTH, data_bytes=DEFAULT_DATA_BYTES,
                         max_burst=DEFAULT_MAX_BURST):
        """Validate the parameters without building a signature (raises like the constructor)."""
        _check_params(addr_width, data_bytes, max_burst)

    @property
    def addr_width(self):
        return self._addr_width

    @property
    def data_bytes(self):
        return self._data_bytes

    @property
    def max_burst(self):
        return self._max_burst

    def __eq__(self, other):
        """Two read-port signatures are equal if all three parameters are."""
        return (type(other) is type(self) and
                self.addr_width == other.addr_width and
                self.data_bytes == other.data_bytes and
                self.max_burst == other.max_burst)

    def __repr__(self):
        return (f"ReadPortSignature(addr_width={self.addr_width}, data_bytes={self.data_bytes}, "
                f"max_burst={self.max_burst})")


class WriteRequestLayout(data.StructLayout):
    """A write request: ``addr`` (byte address, beat-aligned) and ``beats`` (1..max_burst)."""

    def __init__(self, addr_width, max_burst):
        super().__init__({"addr": unsigned(addr_width), "beats": range(max_burst + 1)})


class WriteBeatLayout(data.StructLayout):
    """A write data beat: ``data`` (little-endian bytes) and ``strb`` (one enable bit per byte)."""

    def __init__(self, data_bytes):
        super().__init__({"data": unsigned(8 * data_bytes), "strb": unsigned(data_bytes)})


class WritePortSignature(wiring.Signature):
    """External-memory write port, seen from the master (the unit that writes).

    The write twin of :class:`~m3vit_hw.lib.mem_port.ReadPortSignature`, with the same parameter rules
    (beat-aligned addresses, ``1 <= beats <= max_burst``, no 4 KiB crossing).

    Interface attributes
    --------------------
    req : ``Out(stream.Signature(WriteRequestLayout))``
        One request per burst.
    data : ``Out(stream.Signature(WriteBeatLayout))``
        Exactly ``beats`` beats per request, in request order (no ``last``: the memory counts).
    resp : ``In(stream.Signature(1))``
        One beat per completed request, in order; the payload is 1 if the memory reported an error.
    """

    def __init__(self, *, addr_width=DEFAULT_ADDR_WIDTH, data_bytes=DEFAULT_DATA_BYTES,
                 max_burst=DEFAULT_MAX_BURST):
        _check_params(addr_width, data_bytes, max_burst)
        self._params = (addr_width, data_bytes, max_burst)
        super().__init__({
            "req": Out(stream.Signature(WriteRequestLayout(addr_width, max_burst))),
            "data": Out(stream.Signature(WriteBeatLayout(data_bytes))),
            "resp": In(stream.Signature(1)),
        })

    @property
    def addr_width(self):
        return self._params[0]

    @property
    def data_bytes(self):
        return self._params[1]

    @property
    def max_burst(self):
        return self._params[2]

    def __eq__(self, other):
        return type(other) is type(self) and self._params == other._params

    def __repr__(self):
        a, d, b = self._params
        return f"WritePortSignature(addr_width={a}, data_bytes={d}, max_burst={b})"
