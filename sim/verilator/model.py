"""A compiled Verilator model of an Amaranth top, and the jobs that drive it.

The top must use the accelerator's port style, which :class:`TopSpec` reads off the component's
signature:

* ``In(stream.Signature(...))`` members are *input streams* the host drives (``start``, ``load``,
  ``rd_addr``); ``Out(stream.Signature(...))`` members are *output streams* it consumes (``rd_data``);
* ``Out(ReadPortSignature(...))`` members are external-memory read ports, served by the C++ memory
  model (same timing as :class:`sim.ext_memory.ExternalMemory`);
* ``Out(WritePortSignature(...))`` members are external-memory write ports (a store DMA), served by
  the C++ write model (:meth:`Job.write_memory`: the semantics of
  :meth:`sim.ext_memory.ExternalMemory.serve_write`, plus an optional bandwidth limit with the read
  side's token bucket); the written bytes come back in :attr:`RunResult.written`;
* plain ``Out`` members are *scalars* (``done``, ``busy``, counters), read with
  :meth:`Job.sample`; ``Out(MonitorSignature(...))`` members are *monitors* (see :class:`Probed`),
  logged at every handshake. Scalars named in ``pulses`` are logged in every cycle they are non-zero.

A :class:`Job` is the host's script: configure the memories, put beats on input streams, wait for a
scalar, sample the scalars, read beats back. :meth:`VerilatorModel.run` writes it to a file, runs the
compiled harness (``harness.cpp``) once and returns a :class:`RunResult`. Python is not involved
while the clock runs.

Example::

    model = VerilatorModel(MoELayer(cfg), monitors={"q": layer.queues.o}, pulses=("done",))
    job = Job(model.spec)
    job.memory("mem", image, base=0x10000, bytes_per_cycle=4.0, latency=20)
    job.put("load", [model.spec.pack("load", beat) for beat in beats])
    job.put("start", [model.spec.pack("start", fields)])
    job.wait("done", timeout=10**6)
    job.sample()
    job.xfer("rd_addr", "rd_data", range(n))
    res = model.run(job)
    res.samples[0]["cycles"], res.gets[0], res.monitors["q"]

Cycle semantics match Amaranth's simulator with async testbenches: inputs change right after a clock
edge, outputs are sampled just before the next one, and cycle ``k`` is the one that ends with edge
``k`` (counted from 0 at the start of the job).
"""

import os
import re
import subprocess
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from amaranth.hdl import Module, Shape, UnusedElaboratable, Value
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from m3vit_hw.build.verilog import emit_sv
from m3vit_hw.lib.mem_port import ReadPortSignature, WritePortSignature
from .toolchain import build_model, cache_dir, check_fst, find_verilator
from .vcache import cached_verilog

__all__ = ["MonitorSignature", "Probed", "TopSpec", "Job", "RunResult", "VerilatorModel", "strip_src",
           "VerilatorError"]

HARNESS = Path(__file__).with_name("harness.cpp")

# Job operations and result records: the numbers are mirrored in harness.cpp.
_OP_MEM, _OP_HOST, _OP_PUT, _OP_GET, _OP_XFER, _OP_WAIT, _OP_TICK, _OP_SAMPLE, _OP_MARK, _OP_WMEM = range(1, 11)
_R_GET, _R_SAMPLE, _R_MARK, _R_MON, _R_PULSE, _R_MEM, _R_END, _R_WMEM = range(1, 9)
_EXIT_CODES = {2: "bad job", 3: "memory protocol error", 4: "timeout"}


class VerilatorError(RuntimeError):
    """The compiled model stopped with an error (memory protocol violation, timeout, bad job)."""


class MonitorSignature(wiring.Signature):
    """An observed stream: ``valid``, ``ready`` and ``payload``, all outputs of the top."""

    def __init__(self, shape):
        super().__init__({"valid": Out(1), "ready": Out(1), "payload": Out(shape)})


class Probed(wiring.Component):
    """A wrapper that passes ``dut``'s ports through and exposes internal streams as monitor ports.

    Parameters
    ----------
    dut : wiring.Component
        The design; its signature's members become the wrapper's.
    monitors : dict of str to stream interface
        Name to any object with ``valid``, ``ready`` and ``payload`` inside ``dut`` (an internal
        stream). Each becomes an ``Out(MonitorSignature)`` member ``mon_<name>``.
    """

    def __init__(self, dut, monitors):
        self.dut = dut
        self.probes = dict(monitors)
        members = {name: member for name, member in dut.signature.members.items()}
        self.monitor_shapes = {}
        for name, s in self.probes.items():
            shape = s.payload.shape() if hasattr(s.payload, "shape") else Value.cast(s.payload).shape()
            self.monitor_shapes[name] = shape
            if f"mon_{name}" in members:
                raise ValueError(f"monitor name {name!r} clashes with a port of the design")
            members[f"mon_{name}"] = Out(MonitorSignature(Shape.cast(shape).width))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.dut = dut = self.dut
        for name, member in dut.signature.members.items():
            outer, inner = getattr(self, name), getattr(dut, name)
            if member.is_signature:
                wiring.connect(m, wiring.flipped(outer), inner)
            elif member.flow == In:
                m.d.comb += inner.eq(outer)
            else:
                m.d.comb += outer.eq(inner)
        for name, s in self.probes.items():
            mon = getattr(self, f"mon_{name}")
            m.d.comb += [mon.valid.eq(s.valid), mon.ready.eq(s.ready),
                         mon.payload.eq(Value.cast(s.payload))]
        return m


def _cxx_name(name):
    """The C++ member name Verilator gives a top-level port (``__`` is escaped as ``___05F``)."""
    return re.sub(r"_(?=_)", "_", name).replace("__", "___05F")


def _words(width):
    return max(1, -(-width // 32))


def _unflip(member):
    sig = member.signature
    return sig.flip() if isinstance(sig, wiring.FlippedSignature) else sig


@dataclass
class TopSpec:
    """The ports of a top as the harness sees them (see the module docstring).

    ``inputs``/``outputs``/``monitors`` map a name to the payload shape; ``mems`` maps a name to its
    :class:`ReadPortSignature`, ``wmems`` to its :class:`WritePortSignature`; ``scalars`` maps a name to its width; ``pulses`` lists scalars logged
    whenever non-zero.
    """

    inputs: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    mems: dict = field(default_factory=dict)
    wmems: dict = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)
    monitors: dict = field(default_factory=dict)
    pulses: tuple = ()

    @classmethod
    def from_component(cls, top, pulses=()):
        spec = cls()
        monitor_shapes = getattr(top, "monitor_shapes", {})
        for name, member in top.signature.members.items():
            if member.is_port:
                if member.flow == In:
                    raise TypeError(f"port {name!r}: plain input ports are not supported by the "
                                    f"Verilator harness (use a stream)")
                spec.scalars[name] = Shape.cast(member.shape).width
                continue
            sig = _unflip(member)
            if isinstance(sig, MonitorSignature):
                spec.monitors[name[len("mon_"):]] = monitor_shapes.get(name[len("mon_"):],
                                                                        sig.members["payload"].shape)
            elif isinstance(sig, ReadPortSignature) and member.flow == Out:
                spec.mems[name] = sig
            elif isinstance(sig, WritePortSignature) and member.flow == Out:
                spec.wmems[name] = sig
            elif isinstance(sig, stream.Signature):
                (spec.inputs if member.flow == In else spec.outputs)[name] = sig.members["payload"].shape
            else:
                raise TypeError(f"member {name!r}: {sig!r} is not a stream, a memory port or a monitor")
        for p in pulses:
            if p not in spec.scalars:
                raise ValueError(f"pulse {p!r} is not a scalar output of the top "
                                 f"(scalars: {', '.join(spec.scalars)})")
        spec.pulses = tuple(pulses)
        return spec

    def width(self, name):
        for d in (self.inputs, self.outputs, self.monitors):
            if name in d:
                return Shape.cast(d[name]).width
        return self.scalars[name]

    def pack(self, stream_name, value):
        """The raw bits of a payload for input stream ``stream_name`` (an int, or anything the
        payload's layout accepts in ``const``)."""
        shape = self.inputs[stream_name]
        if isinstance(value, int):
            return value & ((1 << Shape.cast(shape).width) - 1)
        layout = data.Layout.cast(shape)
        return layout.const(value).as_bits()

    def decode(self, name, bits):
        """A payload's raw bits as its layout's view (``int`` for plain shapes)."""
        shape = ({**self.inputs, **self.outputs, **self.monitors})[name]
        if isinstance(shape, data.Layout):
            return shape.from_bits(bits)
        return bits

    def check_verilog(self, text):
        """Raise if a port the harness needs is missing from the emitted Verilog."""
        header = text[text.index("module top("):]
        header = header[:header.index(");")]
        have = {p.strip() for p in header[len("module top("):].split(",")}
        missing = [p for p in self._port_names() if p not in have]
        if missing:
            raise RuntimeError(f"emitted Verilog lacks the ports {missing} (has {sorted(have)})")

    def _port_names(self):
        names = ["clk", "rst"]
        for n in self.inputs:
            names += [f"{n}__valid", f"{n}__ready", f"{n}__payload"]
        for n in self.outputs:
            names += [f"{n}__valid", f"{n}__ready", f"{n}__payload"]
        for n in self.monitors:
            names += [f"mon_{n}__valid", f"mon_{n}__ready", f"mon_{n}__payload"]
        for n in self.mems:
            names += [f"{n}__req__{s}" for s in ("valid", "ready", "payload")]
            names += [f"{n}__resp__{s}" for s in ("valid", "ready", "payload")]
        for n in self.wmems:
            names += [f"{n}__{c}__{s}" for c in ("req", "data", "resp") for s in ("valid", "ready", "payload")]
        return names + list(self.scalars)

    def ports_header(self):
        """C++ accessors (``vsim_ports.h``) the generic harness is compiled against."""
        L = ['// Generated by sim/verilator/model.py: the ports of this top. Do not edit.',
             '#pragma once', '#include <cstdint>', '#include "Vtop.h"', '',
             'template <class T> static inline void vs_set(T& s, const uint32_t* w, int nw) {',
             '    uint64_t v = w[0]; if (nw > 1) v |= uint64_t(w[1]) << 32; s = (T)v; }',
             'template <std::size_t N> static inline void vs_set(VlWide<N>& s, const uint32_t* w, int) {',
             '    for (std::size_t i = 0; i < N; i++) s[i] = w[i]; }',
             'template <class T> static inline void vs_get(const T& s, uint32_t* w, int nw) {',
             '    uint64_t v = s; w[0] = (uint32_t)v; if (nw > 1) w[1] = (uint32_t)(v >> 32); }',
             'template <std::size_t N> static inline void vs_get(const VlWide<N>& s, uint32_t* w, int) {',
             '    for (std::size_t i = 0; i < N; i++) w[i] = s[i]; }',
             'template <class T> static inline bool vs_nonzero(const T& s) { return s != 0; }',
             'template <std::size_t N> static inline bool vs_nonzero(const VlWide<N>& s) {',
             '    for (std::size_t i = 0; i < N; i++) if (s[i]) return true; return false; }', '']

        def table(ctype, name, values):
            vals = ", ".join(values) if values else ("0" if ctype != "char*" else '""')
            L.append(f"static const {ctype} {name}[] = {{{vals}}};")

        def switch(sig, body, names, ret=None):
            L.append(f"static inline {sig} {{")
            L.append("    switch (i) {")
            for k, n in enumerate(names):
                L.append(f"    case {k}: {body.format(n=n, nw=self._nw(n))}")
            L.append("    }")
            if ret is not None:
                L.append(f"    return {ret};")
            L.append("}")

        ins, outs, mons, scs = list(self.inputs), list(self.outputs), list(self.monitors), list(self.scalars)
        mems, wmems = list(self.mems), list(self.wmems)
        L += [f"static const int N_IN = {len(ins)}, N_OUT = {len(outs)}, N_MON = {len(mons)}, "
              f"N_SC = {len(scs)}, N_PULSE = {len(self.pulses)}, N_MEM = {len(mems)}, "
              f"N_WMEM = {len(wmems)};"]
        table("int", "IN_WORDS", [str(self._nw(n)) for n in ins])
        table("int", "OUT_WORDS", [str(self._nw(n)) for n in outs])
        table("int", "MON_WORDS", [str(self._nw(n)) for n in mons])
        table("int", "SC_WORDS", [str(_words(self.scalars[n])) for n in scs])
        table("char*", "SC_NAMES", [f'"{n}"' for n in scs])
        table("int", "MEM_DATA_BYTES", [str(self.mems[n].data_bytes) for n in mems])
        table("int", "MEM_ADDR_BITS", [str(self.mems[n].addr_width) for n in mems])
        table("int", "MEM_BEATS_BITS", [str(Shape.cast(range(self.mems[n].max_burst + 1)).width)
                                         for n in mems])
        table("int", "MEM_MAX_BURST", [str(self.mems[n].max_burst) for n in mems])
        table("int", "MEM_REQ_WORDS", [str(_words(Shape.cast(
            self.mems[n].members["req"].signature.members["payload"].shape).width)) for n in mems])
        table("int", "MEM_RESP_WORDS", [str(_words(8 * self.mems[n].data_bytes + 1)) for n in mems])
        w = self.wmems
        table("int", "WMEM_DATA_BYTES", [str(w[n].data_bytes) for n in wmems])
        table("int", "WMEM_ADDR_BITS", [str(w[n].addr_width) for n in wmems])
        table("int", "WMEM_BEATS_BITS", [str(Shape.cast(range(w[n].max_burst + 1)).width) for n in wmems])
        table("int", "WMEM_MAX_BURST", [str(w[n].max_burst) for n in wmems])
        table("int", "WMEM_REQ_WORDS", [str(_words(Shape.cast(
            w[n].members["req"].signature.members["payload"].shape).width)) for n in wmems])
        table("int", "WMEM_DATA_WORDS", [str(_words(9 * w[n].data_bytes)) for n in wmems])
        L.append("")
        switch("void in_set_valid(Vtop* t, int i, int v)", "t->{n}__valid = v; break;", ins)
        switch("bool in_get_ready(Vtop* t, int i)", "return t->{n}__ready;", ins, "false")
        switch("void in_set_payload(Vtop* t, int i, const uint32_t* w)",
               "vs_set(t->{n}__payload, w, {nw}); break;", ins)
        switch("void out_set_ready(Vtop* t, int i, int v)", "t->{n}__ready = v; break;", outs)
        switch("bool out_get_valid(Vtop* t, int i)", "return t->{n}__valid;", outs, "false")
        switch("void out_get_payload(Vtop* t, int i, uint32_t* w)",
               "vs_get(t->{n}__payload, w, {nw}); break;", outs)
        switch("bool mon_fire(Vtop* t, int i)", "return t->mon_{n}__valid && t->mon_{n}__ready;",
               mons, "false")
        switch("void mon_payload(Vtop* t, int i, uint32_t* w)",
               "vs_get(t->mon_{n}__payload, w, {nw}); break;", mons)
        L.append("static inline void sc_get(Vtop* t, int i, uint32_t* w) {\n    switch (i) {")
        for k, n in enumerate(scs):
            L.append(f"    case {k}: vs_get(t->{n}, w, {_words(self.scalars[n])}); break;")
        L.append("    }\n}")
        switch("bool sc_get_bool(Vtop* t, int i)", "return vs_nonzero(t->{n});", scs, "false")
        switch("bool pulse_get(Vtop* t, int i)", "return vs_nonzero(t->{n});", list(self.pulses),
               "false")
        switch("bool mem_req_valid(Vtop* t, int i)", "return t->{n}__req__valid;", mems, "false")
        switch("void mem_req_payload(Vtop* t, int i, uint32_t* w)",
               "vs_get(t->{n}__req__payload, w, MEM_REQ_WORDS[i]); break;", mems)
        switch("void mem_req_set_ready(Vtop* t, int i, int v)", "t->{n}__req__ready = v; break;", mems)
        switch("bool mem_resp_ready(Vtop* t, int i)", "return t->{n}__resp__ready;", mems, "false")
        switch("void mem_resp_set_valid(Vtop* t, int i, int v)", "t->{n}__resp__valid = v; break;", mems)
        switch("void mem_resp_set_payload(Vtop* t, int i, const uint32_t* w)",
               "vs_set(t->{n}__resp__payload, w, MEM_RESP_WORDS[i]); break;", mems)
        switch("bool wmem_req_valid(Vtop* t, int i)", "return t->{n}__req__valid;", wmems, "false")
        switch("void wmem_req_payload(Vtop* t, int i, uint32_t* w)",
               "vs_get(t->{n}__req__payload, w, WMEM_REQ_WORDS[i]); break;", wmems)
        switch("void wmem_req_set_ready(Vtop* t, int i, int v)", "t->{n}__req__ready = v; break;", wmems)
        switch("bool wmem_data_valid(Vtop* t, int i)", "return t->{n}__data__valid;", wmems, "false")
        switch("void wmem_data_payload(Vtop* t, int i, uint32_t* w)",
               "vs_get(t->{n}__data__payload, w, WMEM_DATA_WORDS[i]); break;", wmems)
        switch("void wmem_data_set_ready(Vtop* t, int i, int v)", "t->{n}__data__ready = v; break;", wmems)
        switch("bool wmem_resp_ready(Vtop* t, int i)", "return t->{n}__resp__ready;", wmems, "false")
        switch("void wmem_resp_set_valid(Vtop* t, int i, int v)", "t->{n}__resp__valid = v; break;", wmems)
        switch("void wmem_resp_set_payload(Vtop* t, int i, int v)", "t->{n}__resp__payload = v; break;",
               wmems)
        # Verilator escapes "__" in port names ("a__b" is the C++ member "a___05Fb").
        return re.sub(r"t->(\w+)", lambda mo: "t->" + _cxx_name(mo.group(1)), "\n".join(L)) + "\n"

    def _nw(self, name):
        """32-bit words per payload of stream or monitor ``name`` (memory ports and scalars size
        their payloads from their own tables)."""
        if name in self.mems or name in self.wmems or name in self.pulses:
            return 0
        return _words(self.width(name))


def _to_words(values, nw):
    """Non-negative ints -> a flat uint32 array, ``nw`` little-endian words each."""
    out = np.empty(len(values) * nw, dtype=np.uint32)
    mask = 0xFFFFFFFF
    k = 0
    for v in values:
        for _ in range(nw):
            out[k] = v & mask
            v >>= 32
            k += 1
    return out


def _f64_words(x):
    return list(np.array([x], dtype="<f8").view("<u4"))


class Job:
    """The host's script for one run of a :class:`VerilatorModel` (see the module docstring).

    Operations execute in order; each starts in the cycle after the previous one finished, like
    ``await``-ed testbench verbs. Streams take port names of the top.
    """

    def __init__(self, spec):
        self.spec = spec
        self._mem = []
        self._wmem = []
        self._ops = []
        self._in = {n: i for i, n in enumerate(spec.inputs)}
        self._out = {n: i for i, n in enumerate(spec.outputs)}
        self._sc = {n: i for i, n in enumerate(spec.scalars)}
        self.n_gets = 0

    def _op(self, code, body):
        body = np.asarray(body, dtype=np.uint32)
        self._ops.append(np.concatenate([np.array([code, len(body)], dtype=np.uint32), body]))

    def memory(self, port, image, *, base=0, bytes_per_cycle, latency=1, max_outstanding=4,
               stall_prob=0.0, seed=0):
        """Back read port ``port`` with ``image`` at byte address ``base`` (parameters as
        :class:`sim.ext_memory.ExternalMemory`; the stall RNG is the harness's own, seeded)."""
        if port not in self.spec.mems:
            raise ValueError(f"port must be one of {list(self.spec.mems)}, not {port!r}")
        if not isinstance(bytes_per_cycle, (int, float)) or not bytes_per_cycle > 0:
            raise ValueError(f"bytes_per_cycle must be a positive number, not {bytes_per_cycle!r}")
        if not isinstance(latency, int) or latency < 1:
            raise ValueError(f"latency must be an integer >= 1, not {latency!r}")
        if not isinstance(max_outstanding, int) or max_outstanding < 1:
            raise ValueError(f"max_outstanding must be an integer >= 1, not {max_outstanding!r}")
        if not 0.0 <= stall_prob < 1.0:
            raise ValueError(f"stall_prob must be in [0, 1), not {stall_prob!r}")
        img = np.frombuffer(bytes(np.ascontiguousarray(image).tobytes()
                                  if isinstance(image, np.ndarray) else image), dtype=np.uint8)
        nbytes = len(img)
        padded = np.zeros(-(-nbytes // 4) * 4, dtype=np.uint8)
        padded[:nbytes] = img
        body = [list(self.spec.mems).index(port), *_f64_words(float(bytes_per_cycle)), latency,
                max_outstanding, *_f64_words(float(stall_prob)), seed & 0xFFFFFFFF,
                base & 0xFFFFFFFF, base >> 32, nbytes & 0xFFFFFFFF, nbytes >> 32]
        body = np.concatenate([np.asarray(body, dtype=np.uint32), padded.view("<u4")])
        self._mem.append(np.concatenate([np.array([_OP_MEM, len(body)], dtype=np.uint32), body]))
        return self

    def write_memory(self, port, *, share=None, size=None, base=0, bytes_per_cycle=None, latency=2,
                     stall_prob=0.0, seed=0):
        """Serve write port ``port``.

        The bytes land in read port ``share``'s backing store (so later reads see them; ``base`` is
        then that store's), or in a zeroed store of ``size`` bytes at byte address ``base``. Timing
        follows :meth:`sim.ext_memory.ExternalMemory.serve_write`: one burst open at a time
        (``req.ready`` while none is), its data beats taken one a cycle unless a stall is drawn
        (``stall_prob``, the harness's seeded generator), the response ``latency`` cycles after the
        last beat. ``bytes_per_cycle`` (``None``: unlimited, as pysim's write model) limits the data
        beats with the read side's token bucket (credit capped at one beat). The protocol checks are
        the read side's (alignment, burst length, 4 KiB boundary, backing store; exit code 3).
        """
        if port not in self.spec.wmems:
            raise ValueError(f"port must be one of {list(self.spec.wmems)}, not {port!r}")
        if share is not None and share not in self.spec.mems:
            raise ValueError(f"share must be one of the read ports {list(self.spec.mems)}, not {share!r}")
        if share is None and (not isinstance(size, int) or size < 1):
            raise ValueError(f"size must be a positive integer when share is None, not {size!r}")
        if bytes_per_cycle is not None and (not isinstance(bytes_per_cycle, (int, float))
                                            or not bytes_per_cycle > 0):
            raise ValueError(f"bytes_per_cycle must be None or a positive number, not {bytes_per_cycle!r}")
        if not isinstance(latency, int) or latency < 1:
            raise ValueError(f"latency must be an integer >= 1, not {latency!r}")
        if not 0.0 <= stall_prob < 1.0:
            raise ValueError(f"stall_prob must be in [0, 1), not {stall_prob!r}")
        sh = 0xFFFFFFFF if share is None else list(self.spec.mems).index(share)
        size = 0 if share is not None else size
        body = [list(self.spec.wmems).index(port), sh, *_f64_words(float(bytes_per_cycle or 0.0)), latency,
                *_f64_words(float(stall_prob)), seed & 0xFFFFFFFF, base & 0xFFFFFFFF, base >> 32,
                size & 0xFFFFFFFF, size >> 32]
        body = np.asarray(body, dtype=np.uint32)
        # After the read ports' configurations (the harness sets those up first; a shared store must exist).
        self._wmem.append(np.concatenate([np.array([_OP_WMEM, len(body)], dtype=np.uint32), body]))
        return self

    def host(self, stall_prob=0.0, seed=0):
        """Random idle cycles before each beat the host puts or takes (probability per cycle)."""
        if not 0.0 <= stall_prob < 1.0:
            raise ValueError(f"stall_prob must be in [0, 1), not {stall_prob!r}")
        self._op(_OP_HOST, [*_f64_words(float(stall_prob)), seed & 0xFFFFFFFF])
        return self

    def _payloads(self, name, payloads):
        nw = _words(self.spec.width(name))
        vals = [self.spec.pack(name, p) for p in payloads]
        return len(vals), _to_words(vals, nw)

    def put(self, stream_name, payloads):
        """Offer the beats on input stream ``stream_name``, in order; finishes when all are taken."""
        n, w = self._payloads(stream_name, payloads)
        self._op(_OP_PUT, np.concatenate([np.array([self._in[stream_name], n], dtype=np.uint32), w]))
        return self

    def get(self, stream_name, n):
        """Take ``n`` beats from output stream ``stream_name`` (they appear in ``RunResult.gets``)."""
        self._op(_OP_GET, [self._out[stream_name], n])
        self.n_gets += 1
        return self

    def xfer(self, in_name, out_name, payloads):
        """Put the beats on ``in_name`` while taking as many from ``out_name`` (read-back)."""
        n, w = self._payloads(in_name, payloads)
        self._op(_OP_XFER, np.concatenate([np.array([self._in[in_name], self._out[out_name], n],
                                                    dtype=np.uint32), w]))
        self.n_gets += 1
        return self

    def wait(self, scalar, timeout):
        """Tick until ``scalar`` is non-zero, then one more cycle (as the pysim runners do)."""
        self._op(_OP_WAIT, [self._sc[scalar], timeout])
        return self

    def tick(self, n=1):
        self._op(_OP_TICK, [n])
        return self

    def sample(self):
        """Record every scalar output (``RunResult.samples``)."""
        self._op(_OP_SAMPLE, [])
        return self

    def mark(self):
        """Record the current cycle (``RunResult.marks``)."""
        self._op(_OP_MARK, [])
        return self

    def tobytes(self):
        return np.concatenate(self._mem + self._wmem + self._ops).astype("<u4").tobytes()


@dataclass
class RunResult:
    """What one :meth:`VerilatorModel.run` returned.

    ``gets``: one uint32 array ``[n, words]`` per get/xfer, in job order; ``samples``: one dict
    ``{scalar: int}`` (plus ``"_cycle"``) per sample; ``marks``: cycles; ``monitors``:
    ``{name: [(cycle, bits)]}``; ``pulses``: ``{name: [cycle]}``; ``memory``: per port
    ``{bytes_served, beats_served, request_count}``; ``written``: per write port ``{bytes_written,
    beats, request_count, base, data}`` (``data``: the uint8 backing store after the run, the shared
    read store's when ``share`` was given); ``cycles``: cycles simulated; ``sim_seconds``:
    wall time of the clock loop in C++; ``wall_seconds``: including process start and file I/O.
    """

    gets: list
    samples: list
    marks: list
    monitors: dict
    pulses: dict
    memory: dict
    cycles: int
    sim_seconds: float
    wall_seconds: float = 0.0
    written: dict = field(default_factory=dict)

    @property
    def cycles_per_second(self):
        return self.cycles / self.sim_seconds if self.sim_seconds else None


def _u64(w, i):
    return int(w[i]) | (int(w[i + 1]) << 32)


def _bits(words):
    v = 0
    for k, x in enumerate(words):
        v |= int(x) << (32 * k)
    return v


def _parse(raw, spec):
    w = np.frombuffer(raw, dtype="<u4")
    res = RunResult([], [], [], {n: [] for n in spec.monitors}, {n: [] for n in spec.pulses}, {}, 0, 0.0)
    mons, pulses, mems, scs = list(spec.monitors), list(spec.pulses), list(spec.mems), list(spec.scalars)
    i = 0
    while i < len(w):
        tag, n = int(w[i]), int(w[i + 1])
        b = w[i + 2:i + 2 + n]
        i += 2 + n
        if tag == _R_GET:
            s, cnt = int(b[0]), int(b[1])
            nw = _words(spec.width(list(spec.outputs)[s]))
            res.gets.append(np.array(b[2:], dtype=np.uint32).reshape(cnt, nw))
        elif tag == _R_SAMPLE:
            d = {"_cycle": _u64(b, 0)}
            k = 2
            for name in scs:
                nw = _words(spec.scalars[name])
                d[name] = _bits(b[k:k + nw])
                k += nw
            res.samples.append(d)
        elif tag == _R_MARK:
            res.marks.append(_u64(b, 0))
        elif tag == _R_MON:
            res.monitors[mons[int(b[0])]].append((_u64(b, 1), _bits(b[3:])))
        elif tag == _R_PULSE:
            res.pulses[pulses[int(b[0])]].append(_u64(b, 1))
        elif tag == _R_MEM:
            res.memory[mems[int(b[0])]] = {"bytes_served": _u64(b, 1), "beats_served": _u64(b, 3),
                                           "request_count": _u64(b, 5)}
        elif tag == _R_WMEM:
            nbytes = _u64(b, 9)
            res.written[list(spec.wmems)[int(b[0])]] = {
                "bytes_written": _u64(b, 1), "beats": _u64(b, 3), "request_count": _u64(b, 5),
                "base": _u64(b, 7), "data": np.array(b[11:], dtype="<u4").view(np.uint8)[:nbytes].copy()}
        elif tag == _R_END:
            res.cycles = _u64(b, 0)
            res.sim_seconds = _u64(b, 2) / 1e9
    return res


def _run_with_progress(cmd, timeout, progress, seconds):
    """Run the harness with ``VSIM_PROGRESS_SECONDS`` set, pass its progress lines to ``progress`` as
    they come and return ``(exit code, the other stderr lines)``; ``timeout`` (s) kills it and raises
    :class:`subprocess.TimeoutExpired` as :func:`subprocess.run` does."""
    env = dict(os.environ, VSIM_PROGRESS_SECONDS=str(float(seconds)))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    timer, fired = None, []

    def kill():
        fired.append(True)
        proc.kill()

    if timeout is not None:
        timer = threading.Timer(timeout, kill)
        timer.start()
    other = []
    try:
        for line in proc.stderr:
            parts = line.split()
            if len(parts) == 3 and parts[0] == "vsim-progress":
                progress(int(parts[1]), float(parts[2]))
            else:
                other.append(line.rstrip())
        code = proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if fired:
        raise subprocess.TimeoutExpired(cmd, timeout)
    return code, "\n".join(other).strip()


#: yosys's source-location attributes (``(* src = "file.py:line" *)``), inline or on their own line.
_SRC_ATTR = re.compile(r'[ \t]*\(\* src = "[^"]*" \*\)(\n|[ \t]?)')


def strip_src(text):
    """``text`` without yosys's ``src`` attributes. Verilator ignores them, but they name the checkout
    and the line of every statement: left in, a compiled model would be rebuilt (tens of minutes at
    the device size) after any edit that only moves lines, or for another worktree of the same code."""
    return _SRC_ATTR.sub(lambda mo: "" if mo.group(1) == "\n" else "", text)


class VerilatorModel:
    """An Amaranth top compiled with Verilator into the generic harness (cached).

    Parameters
    ----------
    top : wiring.Component
        The design (port style: see the module docstring).
    monitors : dict of str to stream interface, optional
        Internal streams of ``top`` to log at every handshake (wraps ``top`` in :class:`Probed`).
    pulses : sequence of str
        Scalar outputs to log in every cycle they are non-zero (e.g. ``done``).
    threads : int
        Verilator ``--threads`` (1: single-threaded model).
    trace : None, "fst" or "vcd"
        Build with waveform support; :meth:`run` then takes ``trace_file`` and a cycle window.
    cache : path-like, optional
        Model cache directory (default ``$M3VIT_SIM_CACHE`` or ``~/.cache/m3vit-hw/verilator``).
    log : callable, optional
        Progress messages (e.g. ``print``).
    verilog_key : str, optional
        A :func:`~sim.verilator.vcache.design_key` naming ``top`` (its class and config): the emitted
        Verilog is then cached on disk (:func:`~sim.verilator.vcache.cached_verilog`; the monitor
        names and pulses are added to the key), and a hit skips elaboration and conversion. Without
        it every construction converts.

    Attributes
    ----------
    spec : TopSpec
    executable : Path
    build : dict
        ``key``, ``cached`` (True: no compilation happened), ``compile_seconds`` (of the build that made
        the model), ``convert_seconds`` (Amaranth -> Verilog, or the Verilog cache lookup, this time),
        ``verilog_cached`` (True: the Verilog came from the cache; False: converted).

    Raises
    ------
    VerilatorNotFound
        Before any conversion, if Verilator or its helper tools are missing.
    """

    def __init__(self, top, *, monitors=None, pulses=(), threads=1, trace=None, cache=None, log=None,
                 verilog_key=None):
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads must be a positive integer, not {threads!r}")
        if trace not in (None, "fst", "vcd"):
            raise ValueError(f"trace must be None, 'fst' or 'vcd', not {trace!r}")
        toolchain = find_verilator()
        if trace == "fst":
            check_fst()
        if monitors:
            top = Probed(top, monitors)
        self.top = top
        self.spec = TopSpec.from_component(top, pulses)
        t0 = time.time()
        if verilog_key is None:
            text = emit_sv(top, "top")
            vinfo = {"verilog_cached": False}
        else:
            key = f"{verilog_key}|monitors={sorted(monitors or {})!r}|pulses={tuple(pulses)!r}"
            text, vinfo = cached_verilog(key, lambda: emit_sv(top, "top"),
                                         cache=Path(cache) if cache is not None else cache_dir())
            if vinfo["verilog_cached"]:
                # The design was constructed (for its signature and probes) but is deliberately
                # never elaborated: Amaranth would warn about every one of its submodules when they
                # are collected.
                warnings.filterwarnings("ignore", category=UnusedElaboratable)
            if log:
                log(f"verilog: {'cache hit' if vinfo['verilog_cached'] else 'converted'} "
                    f"({vinfo['verilog_key']})")
        convert_seconds = time.time() - t0
        self.spec.check_verilog(text)
        text = strip_src(text)
        flags = []
        if threads > 1:
            flags += ["--threads", str(threads)]
        if trace == "fst":
            flags += ["--trace-fst"]
        elif trace == "vcd":
            flags += ["--trace"]
        self.trace = trace
        sources = {"top.v": text, "vsim_ports.h": self.spec.ports_header(),
                   "harness.cpp": HARNESS.read_text()}
        self.executable, self.build = build_model(sources, flags, toolchain=toolchain, cache=cache,
                                                  log=log)
        self.build["convert_seconds"] = round(convert_seconds, 2)
        self.build["verilog_cached"] = vinfo["verilog_cached"]

    def run(self, job, *, trace_file=None, trace_window=(0, 2**63 - 1), timeout=None, progress=None,
            progress_seconds=30.0):
        """Execute ``job`` and return a :class:`RunResult`.

        ``trace_file`` writes a waveform of the cycles in ``trace_window`` (inclusive) when the model was
        built with ``trace``. ``progress`` (a callable ``(cycle, seconds)``) is called about every
        ``progress_seconds`` of the clock loop while it runs (the harness's ``vsim-progress`` lines).
        Raises :class:`VerilatorError` with the harness's message on a memory protocol violation, a
        wait timeout or a bad job.
        """
        if trace_file is not None and self.trace is None:
            raise ValueError("trace_file needs a model built with trace='fst' or 'vcd'")
        with tempfile.TemporaryDirectory(prefix="vsim-") as d:
            jp, rp = os.path.join(d, "job.bin"), os.path.join(d, "result.bin")
            with open(jp, "wb") as f:
                f.write(job.tobytes())
            cmd = [str(self.executable), jp, rp]
            if trace_file is not None:
                cmd += [str(trace_file), str(int(trace_window[0])), str(int(trace_window[1]))]
            t0 = time.time()
            if progress is None:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
                code, err = out.returncode, out.stderr.strip() or out.stdout.strip()
            else:
                code, err = _run_with_progress(cmd, timeout, progress, progress_seconds)
            wall = time.time() - t0
            if code:
                kind = _EXIT_CODES.get(code, f"exit code {code}")
                raise VerilatorError(f"{kind}: {err}")
            with open(rp, "rb") as f:
                res = _parse(f.read(), self.spec)
        res.wall_seconds = wall
        return res
