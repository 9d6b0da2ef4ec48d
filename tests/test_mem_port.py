"""Interface tests of the external-memory read-port signature (no simulation)."""

import pytest
from amaranth.hdl import Fragment, Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.lib.mem_port import ReadBeatLayout, ReadPortSignature, ReadRequestLayout


def test_members_and_directions():
    sig = ReadPortSignature(addr_width=32, data_bytes=16, max_burst=16)
    assert sig.members["req"].flow == Out
    assert sig.members["resp"].flow == In
    port = sig.create()
    assert port.req.payload.shape() == ReadRequestLayout(32, 16)
    assert port.resp.payload.shape() == ReadBeatLayout(16)
    assert len(port.req.payload.addr) == 32
    assert len(port.req.payload.beats) == 5      # 1..16 needs 5 bits
    assert len(port.resp.payload.data) == 128


def test_equality_and_repr():
    a = ReadPortSignature(addr_width=32, data_bytes=16, max_burst=16)
    assert a == ReadPortSignature(addr_width=32, data_bytes=16, max_burst=16)
    assert a != ReadPortSignature(addr_width=32, data_bytes=8, max_burst=16)
    assert a != ReadPortSignature(addr_width=40, data_bytes=16, max_burst=16)
    assert a != ReadPortSignature(addr_width=32, data_bytes=16, max_burst=8)
    assert a.flip().flip() == a
    assert repr(a) == "ReadPortSignature(addr_width=32, data_bytes=16, max_burst=16)"


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(addr_width=0), ValueError, "addr_width must be in [1, 64], not 0"),
    (dict(addr_width=65), ValueError, "addr_width"),
    (dict(addr_width=3.0), TypeError, "addr_width must be an integer"),
    (dict(data_bytes=12), ValueError, "data_bytes must be a power of two in [1, 128], not 12"),
    (dict(data_bytes=256), ValueError, "data_bytes"),
    (dict(max_burst=0), ValueError, "max_burst must be in [1, 256], not 0"),
    (dict(max_burst=257, data_bytes=1), ValueError, "max_burst"),
    (dict(max_burst=256, data_bytes=32), ValueError, "4 KiB"),
    (dict(addr_width=2, data_bytes=8), ValueError, "addr_width"),
])
def test_bad_parameters(kwargs, exc, words):
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        ReadPortSignature(**kwargs)
    with pytest.raises(exc):
        ReadPortSignature.check_parameters(**kwargs)


def test_master_connects_to_memory_side():
    sig = ReadPortSignature(addr_width=20, data_bytes=4, max_burst=8)
    m = Module()
    master = sig.create(path=("master",))
    memory = sig.flip().create(path=("memory",))
    wiring.connect(m, master, memory)   # raises if the two sides do not fit
    Fragment.get(m, None)
