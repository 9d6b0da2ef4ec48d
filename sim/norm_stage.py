"""Standalone LayerNorm sub-layer runner: :class:`~m3vit_hw.dense.NormStage` between a residual and an
activation buffer (owned by a small harness, as the encoder top will own them) against
``reference.golden.layernorm``.

:class:`NormStageSim` places the parameter records in an :class:`~sim.ext_memory.ExternalMemory`,
fills the residual buffer, runs the stage and reads the activation buffer back.
"""

import time

import numpy as np
from amaranth.hdl import Module, signed
from amaranth.lib import data, memory, wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.dense.norm_stage import NormStage, pack_norm_params
from reference import golden as g
from reference.qparams import QLayerNorm
from sim.ext_memory import ExternalMemory
from sim.testbench import Stalls, stream_put, wait_done

__all__ = ["NormHarness", "NormStageSim", "make_norm_workload", "PARAM_BASE"]

#: External byte address of the parameter records.
PARAM_BASE = 0x1000


class NormHarness(wiring.Component):
    """A :class:`NormStage` with the residual and activation buffers it talks to (exposed as ``res``
    and ``act``); every other member of the stage is passed through."""

    def __init__(self, stage):
        self.stage = stage
        cfg = stage.config
        C = cfg.pe_cols
        self.res = memory.Memory(shape=data.ArrayLayout(signed(numerics.RES_BITS), C),
                                 depth=cfg.res_buffer_words, init=[])
        self.act = memory.Memory(shape=data.ArrayLayout(signed(numerics.ACT_BITS), C),
                                 depth=cfg.act_buffer_words, init=[])
        members = stage.signature.members
        super().__init__({name: members[name] for name in ("start", "done", "busy", "mem", "cycles")})

    def elaborate(self, platform):
        m = Module()
        st = self.stage
        m.submodules.stage = st
        m.submodules.res = self.res
        m.submodules.act = self.act
        wiring.connect(m, st.res_rd, self.res.read_port())
        wiring.connect(m, st.act_wr, self.act.write_port(granularity=1))
        wiring.connect(m, wiring.flipped(self.start), st.start)
        wiring.connect(m, st.mem, wiring.flipped(self.mem))
        m.d.comb += [self.done.eq(st.done), self.busy.eq(st.busy), self.cycles.eq(st.cycles)]
        return m


def make_norm_workload(dim, tokens, seed=0, *, extremes=False):
    """``{"x", "qln"}``: int16 residual rows and a :class:`QLayerNorm` (extremes: residual at its range
    ends and constant rows, the largest gains, eps 0)."""
    rng = np.random.default_rng(seed)
    if extremes:
        x = rng.choice([-32768, 32767], (tokens, dim))
        x[0] = 32767                                 # zero variance
        x[-1] = -32768
        glo, ghi = numerics.int_range(numerics.LN_GAMMA_BITS)
        gamma = rng.choice([glo, ghi], dim)
        beta = rng.choice([-(1 << 31), (1 << 31) - 1], dim)
        return {"x": x, "qln": QLayerNorm(0, gamma, beta, 14)}
    x = rng.integers(-3000, 3000, (tokens, dim)) + rng.integers(-2000, 2000, (tokens, 1))
    gamma = rng.integers(2000, 9000, dim) * rng.choice([-1, 1], dim)
    beta = rng.integers(-(1 << 20), 1 << 20, dim)
    return {"x": x, "qln": QLayerNorm(int(rng.integers(0, 1 << 20)), gamma, beta, 16)}


class NormStageSim:
    """One elaborated NormStage harness; ``run(x, qln)`` returns the int8 rows and the cycle count."""

    def __init__(self, config, *, stall_prob=0.0, seed=0, mem_bytes_per_cycle=16, latency=20):
        self.config = config
        self.stage = NormStage(config)
        self.dut = NormHarness(self.stage)
        self.db = config.mem_data_bytes
        self.mem_args = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                             seed=seed)
        self.stall_prob, self.seed = stall_prob, seed

    def run(self, x, qln, *, dst_base=0, dst_stride=None, timeout=200_000):
        cfg, dut = self.config, self.dut
        C, rw, D = cfg.pe_cols, cfg.row_words, cfg.model.dim
        T = x.shape[0]
        dst_stride = rw if dst_stride is None else dst_stride
        recs = pack_norm_params(qln, cfg)
        image = np.zeros(PARAM_BASE + len(recs), dtype=np.uint8)
        image[PARAM_BASE:] = np.frombuffer(recs, dtype=np.uint8)
        mem = ExternalMemory(image, **self.mem_args)
        padded = np.zeros((T, rw * C), dtype=np.int64)
        padded[:, :D] = x
        words = padded.reshape(T * rw, C)
        out = {}

        async def host(ctx):
            for a, wd in enumerate(words):
                ctx.set(dut.res.data[a], [int(v) for v in wd])
            st = Stalls(self.stall_prob, self.seed + 3)
            await stream_put(ctx, dut.start, {"tokens": T, "param_base": PARAM_BASE, "src_base": 0,
                                              "dst_base": dst_base, "dst_stride": dst_stride}, stalls=st)
            await wait_done(ctx, dut.done, timeout=timeout, what="NormStage")
            out["cycles"] = int(ctx.get(dut.cycles))
            rows = []
            for t in range(T):
                row = []
                for w in range(rw):
                    row += [int(v) for v in ctx.get(dut.act.data[dst_base + t * dst_stride + w])]
                rows.append(row[:D])
            out["h"] = np.array(rows, dtype=np.int64)

        t0 = time.time()
        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(host)
        sim.run()
        out["sim_seconds"] = time.time() - t0
        out["want"] = g.layernorm(x, qln.eps_int, qln.gamma_mult, qln.beta_int, qln.shift)
        return out
