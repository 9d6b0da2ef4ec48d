"""External-memory model for Amaranth's simulator: serves a :class:`~m3vit_hw.lib.mem_port.ReadPortSignature`
(and, with :meth:`ExternalMemory.serve_write`, a :class:`~m3vit_hw.lib.mem_port.WritePortSignature` on the
same bytes).

The model stands in for DDR behind an AXI4 read channel. It is a bus-functional testbench coroutine,
not RTL: it drives ``req.ready`` and the ``resp`` stream of the DUT's read port from a byte array and
checks the master's side of the contract as it goes.

Timing model
------------
* **Latency.** A request transferred in cycle ``c`` has its first beat valid in cycle ``c + latency`` at
  the earliest. Up to ``max_outstanding`` requests are accepted ahead, so back-to-back bursts pay the
  latency once (pipelined, like an AXI slave with a read acceptance capability > 1; responses stay in
  order).
* **Bandwidth.** A token bucket refills ``bytes_per_cycle`` (any positive float) every cycle; presenting
  a beat costs ``data_bytes``. The long-run delivered bandwidth with an always-ready master is therefore
  ``min(bytes_per_cycle, data_bytes)`` bytes/cycle, also when ``bytes_per_cycle`` is fractional or
  smaller than a beat. The bucket holds at most one beat of credit, so an idle or stalled memory does not
  bank bandwidth to burst with later.
* **Stalls.** With probability ``stall_prob`` per cycle (seeded) the memory neither accepts a request nor
  presents a new beat that cycle; a beat already presented stays valid (stream rules). Stalls come on top
  of the bandwidth limit.

Usage::

    mem = ExternalMemory(image_bytes, bytes_per_cycle=4.5, latency=20, stall_prob=0.1, seed=1)
    sim.add_testbench(mem.serve(dut.mem), background=True)
    ...
    print(mem.bytes_served, mem.request_count, mem.log[0].first_beat_cycle)

The coroutine waits with plain one-shot ``await ctx.tick()`` calls. Keep it that way (and do the same in
other background testbenches): under CPython 3.11.7 a background testbench left suspended inside
``async for ... in ctx.tick()``, ``.repeat()`` or ``.until()`` when the simulation ends corrupts the
interpreter's recursion bookkeeping, and pytest later dies with "AST constructor recursion depth
mismatch" (exit code 1) although every test passed.

Protocol checks (``AssertionError`` with the offending request): unaligned address, ``beats`` outside
``1..max_burst``, a burst crossing a 4 KiB boundary, an address outside the backing store, and a request
whose payload changed or whose ``valid`` dropped before it was accepted.
"""

import random
from collections import deque
from dataclasses import dataclass

import numpy as np
from amaranth.lib import wiring

from m3vit_hw.lib.mem_port import BOUNDARY_BYTES, ReadPortSignature, WritePortSignature

__all__ = ["ExternalMemory", "RequestRecord"]


@dataclass
class RequestRecord:
    """What happened to one read request (cycles are counted from the start of the simulation)."""

    addr: int
    beats: int
    accept_cycle: int
    first_beat_cycle: int = None
    last_beat_cycle: int = None


class ExternalMemory:
    """A byte-addressed external memory serving one read port.

    Parameters
    ----------
    data : bytes-like or numpy array
        Backing store; numpy arrays are taken as their raw little-endian bytes.
    bytes_per_cycle : float
        Sustained bandwidth, > 0. Values above ``data_bytes`` cap at one beat per cycle.
    latency : int
        Cycles from the request transfer to the first beat, >= 1.
    max_outstanding : int
        Requests accepted but not yet completed, >= 1.
    stall_prob : float
        Per-cycle stall probability in [0, 1).
    seed : int
        Seed of the stall RNG.
    base : int
        Byte address of ``data[0]``.

    Attributes
    ----------
    bytes_served, beats_served, request_count : int
        Counters, updated as transfers happen.
    log : list of RequestRecord
        Every accepted request in order, with its accept, first-beat and last-beat cycles.
    cycle : int
        Cycles elapsed since the coroutine started.
    """

    def __init__(self, data, *, bytes_per_cycle, latency=1, max_outstanding=4, stall_prob=0.0,
                 seed=0, base=0):
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).tobytes()
        # Mutable: serve_write() stores into the same bytes the read port serves.
        self.data = bytearray(data)
        if not isinstance(bytes_per_cycle, (int, float)) or not bytes_per_cycle > 0:
            raise ValueError(f"bytes_per_cycle must be a positive number, not {bytes_per_cycle!r}")
        if not isinstance(latency, int) or latency < 1:
            raise ValueError(f"latency must be an integer >= 1, not {latency!r}")
        if not isinstance(max_outstanding, int) or max_outstanding < 1:
            raise ValueError(f"max_outstanding must be an integer >= 1, not {max_outstanding!r}")
        if not 0.0 <= stall_prob < 1.0:
            raise ValueError(f"stall_prob must be in [0, 1), not {stall_prob!r}")
        if not isinstance(base, int) or base < 0:
            raise ValueError(f"base must be a non-negative integer, not {base!r}")
        self.bytes_per_cycle = float(bytes_per_cycle)
        self.latency = latency
        self.max_outstanding = max_outstanding
        self.stall_prob = stall_prob
        self.seed = seed
        self.base = base
        self.bytes_served = 0
        self.beats_served = 0
        self.request_count = 0
        self.log = []
        self.cycle = 0
        self.write_log = []
        self.bytes_written = 0

    def bandwidth(self, first=0, last=None):
        """Delivered bytes/cycle over requests ``log[first:last]``: bytes / (last beat - first beat + 1).

        Measures the data phase only (the latency of the first request is excluded).
        """
        recs = self.log[first:last]
        if not recs or recs[-1].last_beat_cycle is None:
            raise ValueError("no completed requests in that range")
        nbytes = sum(r.beats for r in recs) * self._data_bytes
        return nbytes / (recs[-1].last_beat_cycle - recs[0].first_beat_cycle + 1)

    def _check(self, addr, beats, sig):
        db = sig.data_bytes
        if addr % db:
            raise AssertionError(f"ext_memory: request addr {addr:#x} not aligned to {db} bytes")
        if not 1 <= beats <= sig.max_burst:
            raise AssertionError(f"ext_memory: request at {addr:#x} has beats={beats}, "
                                 f"allowed 1..{sig.max_burst}")
        end = addr + beats * db
        if addr // BOUNDARY_BYTES != (end - 1) // BOUNDARY_BYTES:
            raise AssertionError(f"ext_memory: burst {addr:#x}+{beats}x{db} crosses a "
                                 f"{BOUNDARY_BYTES}-byte boundary")
        if addr < self.base or end > self.base + len(self.data):
            raise AssertionError(f"ext_memory: burst {addr:#x}..{end:#x} outside backing store "
                                 f"{self.base:#x}..{self.base + len(self.data):#x}")

    def serve_write(self, port, *, latency=2):
        """Return an async testbench that serves the write port ``port`` forever (``background=True``).

        Requests are taken one at a time (``req.ready`` while no burst is open), their ``beats`` data
        beats stored with the byte strobes (stalls on ``data.ready`` with ``stall_prob``, the same RNG
        stream as a fresh :meth:`serve` with ``seed + 1``), and one response beat (payload 0) comes
        ``latency`` cycles after the last beat. The same protocol checks as the read side (alignment,
        burst length, 4 KiB boundary, backing store) raise AssertionError; ``write_log`` records
        ``(addr, beats)`` of every request and ``bytes_written`` the bytes whose strobe was set.
        """
        sig = port.signature
        if isinstance(sig, wiring.FlippedSignature):
            sig = sig.flip()
        if not isinstance(sig, WritePortSignature):
            raise TypeError(f"port must have a WritePortSignature, not {sig!r}")
        if not isinstance(latency, int) or latency < 1:
            raise ValueError(f"latency must be an integer >= 1, not {latency!r}")
        db = sig.data_bytes
        rng = random.Random(self.seed + 1)

        async def testbench(ctx):
            burst = None               # [addr, beats_left]
            resp_due = deque()
            ctx.set(port.req.ready, 1)
            ctx.set(port.data.ready, 0)
            ctx.set(port.resp.valid, 0)
            cycle = 0
            resp_valid = False
            while True:
                _, _, rv, rp, dvalid, dp, rready, dready, respready = await ctx.tick().sample(
                    port.req.valid, port.req.payload, port.data.valid, port.data.payload,
                    port.req.ready, port.data.ready, port.resp.ready)
                cycle += 1
                if resp_valid and respready:
                    resp_due.popleft()
                    resp_valid = False
                if rv and rready:
                    addr, beats = int(rp.addr), int(rp.beats)
                    self._check(addr, beats, sig)
                    self.write_log.append((addr, beats))
                    burst = [addr, beats]
                if dvalid and dready:
                    if burst is None:
                        raise AssertionError("ext_memory: write data beat without an open request")
                    off = burst[0] - self.base
                    word, strb = int(dp.data), int(dp.strb)
                    for i in range(db):
                        if (strb >> i) & 1:
                            self.data[off + i] = (word >> (8 * i)) & 0xFF
                            self.bytes_written += 1
                    burst[0] += db
                    burst[1] -= 1
                    if burst[1] == 0:
                        burst = None
                        resp_due.append(cycle + latency)
                stall = self.stall_prob and rng.random() < self.stall_prob
                ctx.set(port.req.ready, int(burst is None))
                ctx.set(port.data.ready, int(burst is not None and not stall))
                resp_valid = bool(resp_due) and resp_due[0] <= cycle
                ctx.set(port.resp.valid, int(resp_valid))
                ctx.set(port.resp.payload, 0)

        return testbench

    def serve(self, port):
        """Return an async testbench that serves ``port`` forever (add it with ``background=True``).

        ``port`` is the DUT's read-port interface: a member declared ``Out(ReadPortSignature(...))``
        on the master (or the flipped view of one).
        """
        sig = port.signature
        if isinstance(sig, wiring.FlippedSignature):
            sig = sig.flip()
        if not isinstance(sig, ReadPortSignature):
            raise TypeError(f"port must have a ReadPortSignature, not {sig!r}")
        self._data_bytes = db = sig.data_bytes
        rng = random.Random(self.seed)
        bpc = self.bytes_per_cycle

        async def testbench(ctx):
            pending = deque()          # accepted requests: [record, next_addr, beats_left, ready_cycle]
            beat = None                # (record, is_first, is_last) of the beat being presented
            credit = float(db)         # token bucket, at most one beat
            req_ready = False
            held = None                # payload of a request offered but not yet accepted
            ctx.set(port.req.ready, 0)
            ctx.set(port.resp.valid, 0)
            # One-shot waits in a plain loop, not `async for`: a background testbench left suspended
            # inside an async iterator at the end of a simulation breaks the interpreter's recursion
            # bookkeeping under CPython 3.11.7 (pytest then fails in an unrelated ast.parse).
            while True:
                _, _, req_valid, req_p, resp_ready = await ctx.tick().sample(
                    port.req.valid, port.req.payload, port.resp.ready)
                c = self.cycle         # the cycle that just ended
                addr, beats = int(req_p.addr), int(req_p.beats)
                if held is not None and (not req_valid or (addr, beats) != held):
                    raise AssertionError(f"ext_memory: cycle {c}: request {held} was withdrawn or "
                                         f"changed before it was accepted")
                held = None
                if req_valid and req_ready:
                    self._check(addr, beats, sig)
                    rec = RequestRecord(addr, beats, c)
                    self.log.append(rec)
                    self.request_count += 1
                    pending.append([rec, addr, beats, c + self.latency])
                elif req_valid:
                    held = (addr, beats)
                if beat is not None and resp_ready:
                    rec, is_first, is_last = beat
                    if is_first:
                        rec.first_beat_cycle = c
                    if is_last:
                        rec.last_beat_cycle = c
                    self.bytes_served += db
                    self.beats_served += 1
                    beat = None

                self.cycle = c = c + 1  # now decide what to drive in this new cycle
                credit += bpc
                stall = self.stall_prob and rng.random() < self.stall_prob
                if (beat is None and not stall and pending and pending[0][3] <= c
                        and credit >= db):
                    entry = pending[0]
                    rec, a, left = entry[0], entry[1], entry[2]
                    off = a - self.base
                    word = int.from_bytes(self.data[off:off + db], "little")
                    beat = (rec, left == rec.beats, left == 1)
                    entry[1] += db
                    entry[2] -= 1
                    if entry[2] == 0:
                        pending.popleft()
                    credit -= db
                    ctx.set(port.resp.payload, {"data": word, "last": int(left == 1)})
                credit = min(credit, float(db))
                ctx.set(port.resp.valid, int(beat is not None))
                # A request stays outstanding until its last beat is presented.
                req_ready = not stall and len(pending) < self.max_outstanding
                ctx.set(port.req.ready, int(req_ready))

        return testbench
