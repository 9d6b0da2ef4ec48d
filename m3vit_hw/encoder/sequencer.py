"""``ProgramSequencer``: fetches the program from external memory, decodes it and dispatches it.

Behaviour (the RTL twin of :func:`sim.program_executor.execute`; ``docs/isa.md``)
------------------------------------------------------------------------------
1. ``start`` takes the registers (``task``, ``program_base``, ``param_base``, ``output_base``,
   ``image_base``);
   they stay on ``regs`` for the units until the next start.
2. **Fetch.** Instructions are read in bursts (up to ``fetch_burst`` beats, never across a 4 KiB
   boundary) into a beat FIFO, several requests outstanding while the FIFO has room for their beats.
   ``program_base`` is a multiple of the memory beat. The fetcher runs ahead of execution by at most
   the FIFO's depth, so it may read up to ``fifo_beats`` beats past ``END``: that memory must be
   readable (the compiler puts the program last in the image; a driver leaves one FIFO of slack).
3. **Decode.** ``words * 32 / (8 * mem_data_bytes)`` beats make one instruction (bit ``i`` of the
   instruction is bit ``i % (8*data_bytes)`` of beat ``i // (8*data_bytes)``, the ISA's little-endian
   word order); a beat wider than an instruction holds ``8 * mem_data_bytes / (words * 32)`` of
   them, the first in its low bits (the program stays packed: ``docs/isa.md``). The opcode is bits
   0-3, ``wait`` bit 4 (:class:`~m3vit_hw.control.isa.InstructionSet`).
4. **Dispatch.** An instruction for a unit goes out on ``insn`` (whole instruction bits; the top views
   them with ``InstructionSet.layout(op)``) when
   * ``wait`` is clear or every unit is idle (``unit_busy == 0``), and
   * its opcode class is the one that last used the datapath, or every unit is idle (one client owns
     the shared datapath at a time; only a unit that queues its own instructions -- the GEMM
     executor -- sees back-to-back instructions of its class overlap).
   The top raises ``insn.ready`` when the opcode's unit takes it. ``SYNC`` waits until every unit is
   idle; ``END`` waits until every unit is idle, then the sequencer drains its fetches and raises
   ``done``.
5. **Errors.** An opcode outside :class:`~m3vit_hw.control.isa.Opcode`, or one whose unit the top does
   not have (``units``), stops the program: ``error`` holds :class:`SeqError` and ``done`` rises (after
   the outstanding fetches drain). ``error`` is cleared by the next start.

Counters (reset by start, valid after done): ``cycles`` (start .. done), ``op_cycles[op]`` (cycles in
which the unit of opcode class ``op`` is busy, from ``unit_busy``) and ``insn_count`` (instructions
decoded, END included).
"""

from amaranth.hdl import Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..config import AcceleratorConfig
from ..control.isa import OPCODE_BITS, InstructionSet, Opcode
from ..lib.mem_port import BOUNDARY_BYTES, ReadPortSignature

__all__ = ["ProgramSequencer", "SeqStartLayout", "SeqError", "InsnLayout", "TASK_BITS", "OP_CLASSES"]

#: Width of the run-time task register (the gate select of MOE instructions).
TASK_BITS = 8
#: Number of opcode classes (counters, ``unit_busy`` bits): every 4-bit opcode value that exists.
OP_CLASSES = len(Opcode)


class SeqError(enum.Enum, shape=2):
    """``error`` codes."""
    NONE = 0
    #: An opcode value outside :class:`~m3vit_hw.control.isa.Opcode`.
    BAD_OPCODE = 1
    #: A valid opcode whose unit this top does not have.
    NO_UNIT = 2


class SeqStartLayout(data.StructLayout):
    """The start registers: ``task``, ``program_base`` (beat-aligned), ``param_base`` (the image),
    ``output_base`` (where ``STORE`` writes), ``image_base`` (``LOAD_IMAGE.img_addr`` is relative to
    it: ``param_base`` for a frame in the image's ``input`` section, or ``frame - input_addr`` for a
    camera frame in a buffer of its own)."""

    def __init__(self, addr_width):
        super().__init__({
            "task": unsigned(TASK_BITS),
            "program_base": unsigned(addr_width),
            "param_base": unsigned(addr_width),
            "output_base": unsigned(addr_width),
            "image_base": unsigned(addr_width),
        })


class InsnLayout(data.StructLayout):
    """A dispatched instruction: ``op``, ``wait`` and the whole instruction ``bits``."""

    def __init__(self, isa):
        super().__init__({"op": Opcode, "wait": 1, "bits": unsigned(isa.bits)})


class _BeatQueue(wiring.Component):
    """The fetch queue: ``depth`` beats in distributed RAM, first word fall-through.

    ``r_rdy`` (a beat is queued) and ``r_data`` (the oldest beat, an asynchronous read) show a beat
    two cycles after its write; ``r_en`` pops it. The caller never writes into a full queue (the
    sequencer's ``space`` count guarantees it), so there is no ``w_rdy``. Unlike
    ``SyncFIFOBuffered``, a pop only steps a pointer and a count: the decode's pop does not run
    through an output-register refill into an inner level counter.
    """

    def __init__(self, width, depth):
        self._depth = depth
        super().__init__({"w_data": In(width), "w_en": In(1), "r_data": Out(width), "r_rdy": Out(1),
                          "r_en": In(1)})

    def elaborate(self, platform):
        m = Module()
        depth = self._depth
        m.submodules.storage = mem = Memory(shape=len(self.w_data), depth=depth, init=[])
        wp, rp = mem.write_port(), mem.read_port(domain="comb")
        wptr, rptr = Signal(range(depth)), Signal(range(depth))
        count = Signal(range(depth + 1))
        pop = self.r_en & self.r_rdy
        m.d.comb += [wp.addr.eq(wptr), wp.data.eq(self.w_data), wp.en.eq(self.w_en),
                     rp.addr.eq(rptr), self.r_data.eq(rp.data)]
        with m.If(self.w_en):
            m.d.sync += wptr.eq(Mux(wptr == depth - 1, 0, wptr + 1))
        with m.If(pop):
            m.d.sync += rptr.eq(Mux(rptr == depth - 1, 0, rptr + 1))
        # The count takes a write a cycle late (``w_q``): ``w_en`` is the read arbiter's response
        # decode, kept off the count's carry chain. A beat then shows two cycles after its write.
        w_q = Signal()
        m.d.sync += w_q.eq(self.w_en)
        # The count keeps count + 1 and count - 1 in registers of their own, and ``r_rdy`` is a flag:
        # a pop (a decode in the sequencer, fanning out to the instruction register) only selects
        # among registers. (Two adders behind one select would be merged by yosys into one adder
        # with the select in front of its carry chain.)
        count_p1 = Signal(range(depth + 2), init=1)
        count_m1 = Signal(range(-1, depth + 1), init=-1)
        nonempty = Signal()
        m.d.comb += self.r_rdy.eq(nonempty)
        with m.If(w_q & ~pop):
            m.d.sync += [count.eq(count_p1), count_p1.eq(count_p1 + 1), count_m1.eq(count), nonempty.eq(1)]
        with m.Elif(pop & ~w_q):
            m.d.sync += [count.eq(count_m1), count_p1.eq(count), count_m1.eq(count_m1 - 1),
                         nonempty.eq(count != 1)]
        return m


class ProgramSequencer(wiring.Component):
    """Program fetch, decode and dispatch (see the module docstring).

    Parameters
    ----------
    config : AcceleratorConfig
        The instruction format (:class:`InstructionSet`), the read port and the counter width.
    units : iterable of Opcode
        The opcodes the top has a unit for (others stop the program with ``SeqError.NO_UNIT``).
    fetch_burst : int or None
        Beats per fetch request (default ``min(mem_max_burst, 4 instructions)``).

    Interface attributes
    --------------------
    start : In(stream.Signature(SeqStartLayout(mem_addr_width)))
        Accepted while not busy.
    regs : Out(SeqStartLayout(mem_addr_width))
    mem : Out(ReadPortSignature(...))
    insn : Out(stream.Signature(InsnLayout(isa)))
    unit_busy : In(OP_CLASSES)
        Bit ``op``: the unit of that opcode class is busy (high from the cycle after it takes an
        instruction until it is finished).
    done : Out(1)
        High from the end of the program until the next start.
    busy : Out(1)
    error : Out(SeqError)
    cycles, insn_count : Out(counter_width)
    op_cycles : Out(ArrayLayout(counter_width, OP_CLASSES))

    Raises
    ------
    TypeError, ValueError
        On a bad argument, or a memory beat that neither divides the instruction nor is a multiple
        of it.
    """

    def __init__(self, config, *, units=tuple(Opcode), fetch_burst=None):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"config must be an AcceleratorConfig, not {config!r}")
        self._config = config
        self._isa = isa = InstructionSet(config)
        db = config.mem_data_bytes
        # A beat either divides the instruction (several beats make one) or is a whole multiple of
        # it (one beat holds several); both hold for every power-of-two beat the port allows while
        # the instruction is a power-of-two number of bytes.
        if isa.bits % (8 * db) and (8 * db) % isa.bits:
            raise ValueError(f"mem_data_bytes={db} must divide the {isa.bits // 8}-byte instruction "
                             f"or be a multiple of it")
        self._ibeats = max(1, isa.bits // (8 * db))
        #: Instructions per beat (1 unless the beat is wider than an instruction).
        self._per_beat = max(1, (8 * db) // isa.bits)
        if fetch_burst is None:
            fetch_burst = min(config.mem_max_burst, 4 * self._ibeats)
        if not isinstance(fetch_burst, int) or not 1 <= fetch_burst <= config.mem_max_burst:
            raise ValueError(f"fetch_burst must be an int in [1, {config.mem_max_burst}], not {fetch_burst!r}")
        self._burst = fetch_burst
        self._fifo_beats = max(2 * fetch_burst, self._ibeats)
        self._units = frozenset(Opcode(u) for u in units) - {Opcode.END, Opcode.SYNC}
        aw = config.mem_addr_width
        cw = config.counter_width
        super().__init__({
            "start": In(stream.Signature(SeqStartLayout(aw))),
            "regs": Out(SeqStartLayout(aw)),
            "mem": Out(ReadPortSignature(addr_width=aw, data_bytes=db, max_burst=config.mem_max_burst)),
            "insn": Out(stream.Signature(InsnLayout(isa))),
            "unit_busy": In(OP_CLASSES),
            "done": Out(1),
            "busy": Out(1),
            "error": Out(SeqError),
            "cycles": Out(cw),
            "insn_count": Out(cw),
            "op_cycles": Out(data.ArrayLayout(cw, OP_CLASSES)),
        })

    @property
    def isa(self):
        return self._isa

    @property
    def fifo_beats(self):
        """Beats the fetcher may run ahead (also the most it reads past ``END``)."""
        return self._fifo_beats

    def elaborate(self, platform):
        m = Module()
        cfg = self._config
        db = cfg.mem_data_bytes
        lb = db.bit_length() - 1
        bw = 8 * db
        ib = self._ibeats
        nbits = self._isa.bits
        depth = self._fifo_beats
        m.submodules.fifo = fq = _BeatQueue(bw, depth)

        running = Signal()          # between start and done
        fetching = Signal()         # the fetcher may issue requests
        start = self.start.valid & self.start.ready
        m.d.comb += [self.start.ready.eq(~running), self.busy.eq(running)]
        with m.If(start):
            m.d.sync += [self.regs.eq(self.start.payload), running.eq(1), fetching.eq(1),
                         self.done.eq(0), self.error.eq(SeqError.NONE)]

        # ---- fetch ---------------------------------------------------------------------------------
        faddr = Signal(cfg.mem_addr_width)
        inflight = Signal(range(depth + 1))         # beats requested, not yet in the FIFO
        page_beats = BOUNDARY_BYTES // db
        page_bits = BOUNDARY_BYTES.bit_length() - 1
        beat_in_page = faddr[lb:page_bits] if cfg.mem_addr_width > lb else 0
        room = Signal(range(page_beats + 1))
        # The burst length is a register, computed in the cycle after faddr moves (bok low), so the
        # page-room subtract and compare do not feed the address adder in the same cycle. Costs one
        # cycle per program fetch burst.
        beats = Signal(range(self._burst + 1))
        bok = Signal()
        m.d.comb += room.eq(page_beats - beat_in_page)
        with m.If(~bok):
            m.d.sync += [beats.eq(Mux(room < self._burst, room, self._burst)), bok.eq(1)]
        req, resp = self.mem.req, self.mem.resp
        # Room for a whole burst: what is queued plus what is still coming stays within the FIFO.
        # A request once offered is held until taken (stream rules), even if fetching stops meanwhile.
        hold = Signal()
        m.d.sync += hold.eq(req.valid & ~req.ready)
        # depth - level - inflight, kept as a counter of its own (it changes only when a request is
        # sent or a beat leaves the FIFO; the FIFO is empty and nothing in flight at start), so the
        # request's valid is a compare of one register against a constant, not a three-way add.
        space = Signal(range(depth + 1), init=depth)
        # The room compare is registered too: ``space`` only drops when a request is sent, and
        # then ``bok`` is low in the next cycle anyway, so a compare one cycle old never lets a
        # request out that the FIFO could not hold (it may wait one cycle after a pop).
        # ``space`` and ``inflight`` take a request's beats and a pop a cycle late (``sent_beats``,
        # ``pop_q``): the request handshake (``bok`` and the arbiter's ready) and the decode's pop then
        # only load registers, and the counters' adders start at flip-flops. ``roomy`` is held low
        # in the cycle the late beats are still missing from ``space``.
        sent_beats = Signal.like(beats)
        pop_q = Signal()
        roomy = Signal()
        m.d.sync += roomy.eq((space >= self._burst) & (sent_beats == 0))
        m.d.comb += [
            req.valid.eq(hold | (fetching & bok & roomy)),
            req.payload.addr.eq(faddr), req.payload.beats.eq(beats),
            fq.w_data.eq(resp.payload.data), fq.w_en.eq(resp.valid),
            # ``space`` keeps queued plus requested beats within the queue: a beat always has room.
            resp.ready.eq(1),
        ]
        sent = req.valid & req.ready
        got = resp.valid & resp.ready
        # ``inflight`` counts a beat off the cycle after it arrives: the response valid is a decode
        # in the read arbiter, and the three-operand update is a carry chain. It only gates DRAIN's
        # exit (one cycle later at most), and a late count errs on the side of waiting.
        got_q = Signal()
        m.d.sync += got_q.eq(got & ~start)
        # Not cleared by ``start`` (which clears every fetch register, behind the host's start
        # handshake): nothing is sent or popped in the cycles around a start (DRAIN ends with both
        # zero and IDLE neither fetches nor pops).
        m.d.sync += [sent_beats.eq(Mux(sent, beats, 0)), pop_q.eq(fq.r_en & fq.r_rdy)]
        with m.If(start):
            m.d.sync += [faddr.eq(self.start.payload.program_base), inflight.eq(0), space.eq(depth),
                         bok.eq(0)]
        with m.Else():
            with m.If(sent):
                m.d.sync += [faddr.eq(faddr + (beats << lb)), bok.eq(0)]
            m.d.sync += inflight.eq(inflight + sent_beats - got_q)
            m.d.sync += space.eq(space - sent_beats + pop_q)

        # ---- assemble and decode -------------------------------------------------------------------
        pb = self._per_beat
        pop = Signal()
        consume = Signal()          # the assembled instruction leaves (dispatched, or END/SYNC/error)
        if pb == 1:
            asm = Signal(nbits)
            have = Signal(range(ib + 1))    # beats of ``asm`` assembled
            full = have == ib
            after = 0                       # ``have`` once the instruction is consumed
        else:
            # A beat holds ``pb`` instructions, the first in its low bits (the program's
            # little-endian word order): the beat is held and a small index steps through it at each
            # consume (the dispatch handshake then enables a few counter bits, not the whole beat);
            # the next beat is popped once the last of this one has left. Whatever follows END in
            # its beat is never decoded.
            wide = Signal(bw)
            have = Signal(range(pb + 1))    # instructions of ``wide`` not yet consumed
            sel = Signal(range(pb))         # the current one
            asm = wide.word_select(sel, nbits)
            full = have != 0
            after = have - 1
        m.d.comb += [pop.eq(fq.r_rdy & ~full), fq.r_en.eq(pop)]
        if pb == 1:
            with m.If(pop):
                m.d.sync += [asm.eq((asm >> bw) | (fq.r_data << (nbits - bw))), have.eq(have + 1)]
        else:
            with m.If(pop):
                m.d.sync += [wide.eq(fq.r_data), have.eq(pb), sel.eq(0)]
            with m.Elif(consume):
                m.d.sync += sel.eq(sel + 1)
        op_raw = asm[:OPCODE_BITS]
        wait = asm[OPCODE_BITS]
        # The units' busy flags, registered: each is an OR over a unit's state (the engine's through the
        # datapath and the client multiplexer), and "idle" gates the dispatch into every unit's start
        # logic. Registering costs one cycle at each wait for idle; a unit only turns busy by taking
        # an instruction, which the guard covers.
        # The OR over the units is taken before the register, so "idle" is a 3-input function of
        # flip-flops (this one and ``guard``) in the dispatch decode.
        none_busy = Signal()
        m.d.sync += none_busy.eq(self.unit_busy == 0)
        # A unit raises busy the cycle after it takes an instruction, and none_busy drops a cycle
        # later: hold "idle" off for three cycles.
        guard = Signal(2)
        idle = none_busy & (guard == 0)
        last_op = Signal(OPCODE_BITS)
        with m.If(guard != 0):
            m.d.sync += guard.eq(guard - 1)
        m.d.comb += [self.insn.payload.op.eq(op_raw), self.insn.payload.wait.eq(wait),
                     self.insn.payload.bits.eq(asm)]
        valid_ops = {op.value for op in Opcode}
        unit_ops = {op.value for op in self._units}

        with m.FSM(name="seq"):
            with m.State("IDLE"):
                with m.If(start):
                    m.d.sync += [have.eq(0), guard.eq(0), last_op.eq(Opcode.END)]
                    m.next = "RUN"
            with m.State("RUN"):
                with m.If(full):
                    with m.Switch(op_raw):
                        with m.Case(Opcode.END):
                            with m.If(idle):
                                m.d.comb += consume.eq(1)
                                m.d.sync += [have.eq(0), fetching.eq(0)]
                                m.next = "DRAIN"
                        with m.Case(Opcode.SYNC):
                            with m.If(idle):
                                m.d.comb += consume.eq(1)
                                m.d.sync += have.eq(after)
                        for v in sorted(unit_ops):
                            with m.Case(v):
                                m.d.comb += self.insn.valid.eq((~wait | idle) & ((op_raw == last_op) | idle))
                                with m.If(self.insn.ready & self.insn.valid):
                                    m.d.comb += consume.eq(1)
                                    m.d.sync += [have.eq(after), guard.eq(3), last_op.eq(op_raw)]
                        with m.Default():
                            with m.If(idle):
                                err = Mux(op_raw.matches(*sorted(valid_ops)), SeqError.NO_UNIT,
                                          SeqError.BAD_OPCODE)
                                m.d.comb += consume.eq(1)
                                m.d.sync += [self.error.eq(err), fetching.eq(0)]
                                m.next = "DRAIN"
            with m.State("DRAIN"):
                # Let the outstanding fetches arrive and drop every prefetched beat. ``inflight``
                # reaches 0 two cycles after the last beat arrives, by when the queue shows it (its
                # write-to-read latency is 2), so no response can still be coming and no beat is left
                # behind.
                m.d.comb += fq.r_en.eq(1)
                with m.If((inflight == 0) & (sent_beats == 0) & ~fq.r_rdy & ~req.valid):
                    m.d.sync += [running.eq(0), self.done.eq(1), have.eq(0)]
                    m.next = "IDLE"

        # ---- counters --------------------------------------------------------------------------------
        with m.If(start):
            m.d.sync += [self.cycles.eq(0), self.insn_count.eq(0)]
            m.d.sync += [self.op_cycles[i].eq(0) for i in range(OP_CLASSES)]
        with m.Elif(running):
            m.d.sync += self.cycles.eq(self.cycles + 1)
            for i in range(OP_CLASSES):
                with m.If(self.unit_busy[i]):
                    m.d.sync += self.op_cycles[i].eq(self.op_cycles[i] + 1)
            with m.If(consume):
                m.d.sync += self.insn_count.eq(self.insn_count + 1)
        return m
