# amaranth: UnusedElaboratable=no
"""``mux_interfaces``: the one-hot client select of the shared datapath. The owner's driven members
reach the shared port, no other source's do, and only the owner sees the one-bit members it receives
(``ready``); wide received members are broadcast."""

import random

import pytest
from amaranth.hdl import Module, Signal
from amaranth.lib import stream
from amaranth.sim import Simulator

from m3vit_hw.encoder import mux_interfaces

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


def _sig():
    return stream.Signature(8)


@pytest.mark.parametrize("wide", [False, True])
def test_owner_drives_and_only_owner_sees_ready(wide):
    """With ``wide_owns``, the payload follows that select and the one-bit members ``owns`` (the
    test drives the two apart to tell them apart; the encoder top keeps them equal)."""
    n = 3
    m = Module()
    owns = [Signal(name=f"own{i}") for i in range(n)]
    wide_owns = [Signal(name=f"wown{i}") for i in range(n)] if wide else None
    srcs = [_sig().create(path=(f"s{i}",)) for i in range(n)]    # as each source sees it
    port = mux_interfaces(m, owns, srcs, name="port", wide_owns=wide_owns)
    rng = random.Random(5)

    async def bench(ctx):
        for step in range(200):
            owner = rng.randrange(n + 1)                 # n: nobody owns the port
            powner = rng.randrange(n + 1) if wide else owner
            for i in range(n):
                ctx.set(owns[i], int(i == owner))
                if wide:
                    ctx.set(wide_owns[i], int(i == powner))
                ctx.set(srcs[i].valid, rng.randrange(2))
                ctx.set(srcs[i].payload, rng.randrange(256))
            ready = rng.randrange(2)
            ctx.set(port.ready, ready)
            await ctx.delay(1e-9)
            exp_valid = ctx.get(srcs[owner].valid) if owner < n else 0
            exp_payload = ctx.get(srcs[powner].payload) if powner < n else 0
            got = (ctx.get(port.valid), ctx.get(port.payload))
            assert got == (exp_valid, exp_payload), \
                f"mux step {step}, owner {owner}: port (valid, payload) expected {(exp_valid, exp_payload)}, got {got}"
            for i in range(n):
                exp = ready if i == owner else 0
                assert ctx.get(srcs[i].ready) == exp, \
                    f"mux step {step}, owner {owner}: source {i} ready expected {exp}, got {ctx.get(srcs[i].ready)}"

    sim = Simulator(m)
    sim.add_testbench(bench)
    sim.run()


def test_refuses_bad_select():
    m = Module()
    srcs = [_sig().create(path=(f"s{i}",)) for i in range(2)]
    with pytest.raises(ValueError, match="owns must be 2 one-bit values"):
        mux_interfaces(m, [Signal()], srcs)
    with pytest.raises(ValueError, match="owns must be 2 one-bit values"):
        mux_interfaces(m, [Signal(2), Signal()], srcs)
    with pytest.raises(ValueError, match="wide_owns must be 2 one-bit values"):
        mux_interfaces(m, [Signal(), Signal()], srcs, wide_owns=[Signal()])
    with pytest.raises(ValueError, match="at least one source"):
        mux_interfaces(m, [], [])
