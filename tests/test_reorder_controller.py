# amaranth: UnusedElaboratable=no
"""ReorderController: command sequence, fetch-once, prefetch overlap, zero-overhead switching, bandwidth.

Two levels:

* **Alone** (``_Bench``): the controller with its real streamers, buffers and arbiter against the
  external-memory model, but with the testbench playing the router, the expert queues and the GEMM
  engine. Checks the exact command contract: the gate, then for each active expert (ascending) and each
  tile of the static plan, the streamer pieces at the layout's addresses and the GEMM command with the
  right fields, issued only when both halves are FULL; idle experts never fetched; the row table
  holding the queue walk; the next tile loading while the "engine" computes.
* **In the MoELayer** (``MoELayerSim``): the overhead bound at a bandwidth above the compute-balance
  point, and the cycles-vs-bandwidth curve.
"""

import numpy as np
import pytest
from amaranth.back import verilog
from amaranth.hdl import Module
from amaranth.lib import memory, wiring
from amaranth.lib.wiring import Out
from amaranth.sim import Simulator

from m3vit_hw.gemm.epilogue import LATENCY as EPILOGUE_LATENCY, EpilogueMode as Mode
from m3vit_hw.gemm.pe_array import PEArray
from m3vit_hw.gemm.gemm_engine import GemmEngine, RowEntryLayout
from m3vit_hw.moe.expert_layout import pack_moe, plan_moe, start_fields, unpack_params
from m3vit_hw.moe.expert_queues import ExpertQueues
from m3vit_hw.lib.mem_arbiter import ReadArbiter
from m3vit_hw.lib.mem_port import ReadPortSignature
from m3vit_hw.moe.reorder_controller import GATE_TAG, ReorderController
from m3vit_hw.moe.router import Router
from m3vit_hw.weights.weight_buffer import WeightBuffer
from m3vit_hw.weights.weight_streamer import WeightStreamer
from reference import golden
from sim.ext_memory import ExternalMemory
from sim.moe_layer import IMAGE_BASE, MoELayerSim, moe_config
from sim.moe_workload import make_moe_workload
from sim.testbench import Stalls, stream_get, stream_put

pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")


class _Bench(wiring.Component):
    """Controller + streamers + buffers + arbiter + the row table it writes; router, queues and engine
    are left to the testbench (which reads the row table through ``rowtab``)."""

    def __init__(self, cfg):
        db = cfg.mem_data_bytes
        lay = plan_moe(cfg)
        self.ctl = ReorderController(cfg, lay)
        tw = cfg.tile_tag_width
        self.wbuf = WeightBuffer(lay.weight_half_bytes, cfg.pe_cols, write_bytes=db, tag_width=tw)
        self.pbuf = WeightBuffer(lay.param_half_bytes, lay.param_word_bytes, write_bytes=db,
                                 tag_width=tw)
        port = dict(addr_width=cfg.mem_addr_width, data_bytes=db, max_burst=cfg.mem_max_burst)
        self.ws = WeightStreamer(lay.weight_half_bytes, tag_width=tw, **port)
        self.ps = WeightStreamer(lay.param_half_bytes, tag_width=tw, **port)
        self.arb = ReadArbiter(2, **port)
        self.rowtab_mem = memory.Memory(shape=RowEntryLayout(cfg), depth=cfg.rowtab_entries, init=[])
        c = self.ctl.signature.members
        super().__init__({
            "start": c["start"], "q": c["q"], "router_cmd": c["router_cmd"],
            "router_drained": c["router_drained"], "gemm": c["gemm"], "gemm_done": c["gemm_done"],
            "pe_beat": c["pe_beat"],
            "rowtab": Out(memory.ReadPort.Signature(addr_width=cfg.rowtab_addr_bits,
                                                    shape=RowEntryLayout(cfg))),
            "done": c["done"], "busy": c["busy"],
            "mem": Out(ReadPortSignature(**port)),
            "wfull": Out(1), "pfull": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        for name in ("ctl", "wbuf", "pbuf", "ws", "ps", "arb", "rowtab_mem"):
            m.submodules[name] = getattr(self, name)
        wiring.connect(m, self.ctl.rt_wr, self.rowtab_mem.write_port())
        wiring.connect(m, wiring.flipped(self.rowtab), self.rowtab_mem.read_port())
        ctl = self.ctl
        wiring.connect(m, self.ws.mem, self.arb.masters[0])
        wiring.connect(m, self.ps.mem, self.arb.masters[1])
        wiring.connect(m, self.arb.mem, wiring.flipped(self.mem))
        wiring.connect(m, self.ws.buf, self.wbuf.write)
        wiring.connect(m, self.ps.buf, self.pbuf.write)
        wiring.connect(m, ctl.wcmd, self.ws.cmd)
        wiring.connect(m, ctl.pcmd, self.ps.cmd)
        for buf, tile in ((self.wbuf, ctl.wtile), (self.pbuf, ctl.ptile)):
            m.d.comb += [tile.valid.eq(buf.read.tile.valid), tile.payload.eq(buf.read.tile.payload),
                         buf.read.tile.ready.eq(tile.ready)]
        m.d.comb += [self.wfull.eq(self.wbuf.read.tile.valid), self.pfull.eq(self.pbuf.read.tile.valid)]
        for name in ("start", "q"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(ctl, name))
        for name in ("router_cmd", "gemm"):
            wiring.connect(m, getattr(ctl, name), wiring.flipped(getattr(self, name)))
        m.d.comb += [self.done.eq(ctl.done), self.busy.eq(ctl.busy),
                     ctl.gemm_done.eq(self.gemm_done), ctl.router_drained.eq(self.router_drained),
                     ctl.pe_beat.eq(self.pe_beat)]
        return m


def _walk(queues, active):
    """The ExpertQueues output beats for golden queues."""
    beats = []
    total = sum(len(queues[e]) for e in active)
    n = 0
    for e in active:
        beats.append({"header": 1, "expert": e, "count": len(queues[e]), "token": 0, "weight": 0, "last": 0})
        for tok, w in queues[e]:
            n += 1
            beats.append({"header": 0, "expert": e, "count": len(queues[e]), "token": tok, "weight": w,
                          "last": int(n == total)})
    return beats


def _expected_gemms(cfg, lay, fields, queues, active):
    """The GEMM commands the controller must issue, in order (only the fields that matter)."""
    C = cfg.pe_cols
    D, h, E = lay.dim, lay.hidden, lay.experts
    rw, hw = cfg.row_words, -(-h // C)
    hb = cfg.moe_hidden_base
    cmds = [dict(mode=Mode.RAW, m=fields["tokens"], k=D, n=t.n, a_base=0, a_stride=rw,
                 b_tile_stride=D, gather=0, scatter=0) for t in lay.gate_tiles]
    off = 0
    for e in active:
        cnt = len(queues[e])
        first_fc2 = True
        for t in lay.tiles:
            if t.kind == "fc1":
                cmds.append(dict(mode=Mode.GELU8, m=cnt, k=D, n=t.n, a_base=0, a_stride=rw, b_tile_stride=D,
                                 dst_base=hb + t.n0 // C, dst_stride=hw, rowtab_base=off, gather=1,
                                 scatter=0, shift=fields["fc1_shift"], sync=0))
            else:
                cmds.append(dict(mode=Mode.COMBINE, m=cnt, k=h, n=t.n, a_base=hb, a_stride=hw,
                                 b_tile_stride=h, dst_base=t.n0 // C, dst_stride=rw, rowtab_base=off,
                                 gather=0, scatter=1, shift=fields["fc2_shift"], sync=int(first_fc2)))
                first_fc2 = False
        off += cnt
    return cmds


def _expected_pieces(lay, fields, active):
    """(addr, length) of every weight-streamer and parameter-streamer command, in order."""
    g = fields["gate_base"] + fields["task"] * lay.gate_stride
    w = [(g + t.w_offset, t.w_bytes) for t in lay.gate_tiles]
    p = [(g + t.p_offset, t.p_bytes) for t in lay.gate_tiles]
    for e in active:
        base = fields["expert_base"] + e * lay.expert_stride
        for t in lay.tiles:
            w.append((base + t.w_offset, t.w_bytes))
            p.append((base + t.p_offset, t.p_bytes))
    return w, p


def _watchdog(limit):
    """A background testbench that fails the simulation after ``limit`` cycles (plain ticks only)."""
    async def tb(ctx):
        for _ in range(limit):
            await ctx.tick()
        raise AssertionError(f"simulation did not finish within {limit} cycles")
    return tb


def _run_alone(cfg, wl, task, *, drain=12, stall=0.0, bandwidth=16.0, latency=8, seed=0):
    """Run one layer through the bench; return what the controller did."""
    bench = _Bench(cfg)
    image, lay = pack_moe(wl["qmoe"], cfg)
    T = wl["h"].shape[0]
    logits = golden.router_logits(wl["h"], wl["qmoe"].gates[task], wl["qmoe"].task_bias[task])
    probs = golden.router_probs(logits, wl["qmoe"].router_c_mult[task], wl["qmoe"].router_c_shift[task])
    queues, active = golden.expert_queues(golden.topk(logits, cfg.model.top_k), probs, cfg.model.experts)
    fields = start_fields(wl["qmoe"], task, T, lay, base=IMAGE_BASE)
    mem = ExternalMemory(image, base=IMAGE_BASE, bytes_per_cycle=bandwidth, latency=latency,
                         stall_prob=stall, seed=seed)
    ctl = bench.ctl
    log = {"gemm": [], "wcmd": [], "pcmd": [], "wcommit": [], "done_at": [], "beats": [], "rowtab": None,
           "cycle": 0}

    async def monitor(ctx):
        sigs = (ctl.wcmd.valid, ctl.wcmd.ready, ctl.wcmd.p, ctl.pcmd.valid, ctl.pcmd.ready, ctl.pcmd.p,
                bench.ws.buf.commit.valid, bench.ws.buf.commit.ready)
        while True:
            _, _, wv, wr, wp, pv, pr, pp, cv, cr = await ctx.tick().sample(*sigs)
            c = log["cycle"]
            log["cycle"] += 1
            if wv and wr:
                log["wcmd"].append((int(wp.addr), int(wp.length), int(wp.tag), c))
            if pv and pr:
                log["pcmd"].append((int(pp.addr), int(pp.length), int(pp.tag), c))
            if cv and cr:
                log["wcommit"].append(c)

    async def host(ctx):
        st = Stalls(stall, seed + 1)
        await stream_put(ctx, bench.start, fields, stalls=st)
        rc = await stream_get(ctx, bench.router_cmd, stalls=st)
        assert (int(rc.tokens), int(rc.c_mult), int(rc.c_shift)) == (
            T, fields["c_mult"], fields["c_shift"]), "ReorderController: router command fields"
        # The router is "done" with the bias words some time after its command.
        for _ in range(30):
            await ctx.tick()
        ctx.set(bench.router_drained, 1)
        for b in _walk(queues, active):
            await stream_put(ctx, bench.q, b, stalls=st)

    async def engine(ctx):
        # A behavioural GemmEngine: it takes a command once the previous one's beats have all entered
        # the PE array (a sync command: once every earlier command is done), feeds one beat per cycle
        # (pe_beat), and pulses done `drain` cycles after a command's last beat.
        R, C = cfg.pe_rows, cfg.pe_cols
        rng = np.random.default_rng(seed + 2)
        n_cmds = len(lay.gate_tiles) + len(active) * len(lay.tiles)
        left, dues, cyc = 0, [], 0
        fields = ("mode", "m", "k", "n", "a_base", "a_stride", "b_tile_stride", "dst_base", "dst_stride",
                  "rowtab_base", "gather", "scatter", "shift", "sync", "b_base", "colp_base")
        while len(log["gemm"]) < n_cmds or left or dues:
            p = ctx.get(bench.gemm.payload)
            ready = left == 0 and not (p.sync and dues) and rng.random() >= stall
            beat = left > 0 and rng.random() >= stall / 2
            ctx.set(bench.gemm.ready, int(ready))
            ctx.set(bench.pe_beat, int(beat))
            ctx.set(bench.gemm_done, int(cyc in dues))
            valid = ctx.get(bench.gemm.valid)
            full = (ctx.get(bench.wfull), ctx.get(bench.pfull))
            await ctx.tick()
            if cyc in dues:
                dues.remove(cyc)
                log["done_at"].append(cyc)
            if beat:
                left -= 1
                log["beats"][-1].append(cyc)
                if left == 0:
                    dues.append(cyc + drain)
            if valid and ready:
                log["gemm"].append(({f: (p[f] if f == "mode" else int(p[f])) for f in fields}, full, cyc))
                left = -(-int(p.m) // R) * -(-int(p.n) // C) * int(p.k)
                log["beats"].append([])
            cyc += 1
        ctx.set(bench.gemm_done, 0)
        ctx.set(bench.pe_beat, 0)
        await ctx.tick().until(bench.done)
        assert not ctx.get(bench.wfull) and not ctx.get(bench.pfull), "halves left FULL after the layer"
        # The captured row table: the queue entries in walk order.
        entries = []
        ctx.set(bench.rowtab.en, 1)
        for a in range(sum(len(queues[e]) for e in active)):
            ctx.set(bench.rowtab.addr, a)
            await ctx.tick()
            d = ctx.get(bench.rowtab.data)
            entries.append((int(d.token), int(d.scale)))
        log["rowtab"] = entries

    sim = Simulator(bench)
    sim.add_clock(1e-8)
    sim.add_testbench(mem.serve(bench.mem), background=True)
    sim.add_testbench(monitor, background=True)
    sim.add_testbench(_watchdog(50000), background=True)
    sim.add_testbench(host)
    sim.add_testbench(engine)
    sim.run()
    return log, lay, fields, queues, active, mem


def _workload(E, k, T, seed, skew="none", tasks=1, D=16, H=32):
    return make_moe_workload(E, k, D, H, T, tasks=tasks, seed=seed, skew=skew)


@pytest.mark.parametrize("E, k, T, skew, stall", [(5, 2, 9, "none", 0.25), (8, 1, 7, "sparse", 0.0),
                                                  (3, 3, 6, "hot", 0.3), (22, 2, 9, "none", 0.2)])
def test_command_sequence_alone(E, k, T, skew, stall):
    """Gate chunks, then (active experts ascending) x (tiles): exact streamer pieces and GEMM
    commands. E=22 needs 6 gate panels, more than a 256-byte half holds: the gate comes in 2 chunks."""
    cfg = moe_config(experts=E, top_k=k, dim=16, hidden=32, tokens=T, weight_buffer_bytes=512)
    wl = _workload(E, k, T, seed=E + T, skew=skew)
    log, lay, fields, queues, active, mem = _run_alone(cfg, wl, 0, stall=stall)
    assert len(lay.tiles) == 4, "the small weight buffer should split each expert into 4 tiles"
    want_w, want_p = _expected_pieces(lay, fields, active)
    got_w = [(a, n) for a, n, _, _ in log["wcmd"]]
    got_p = [(a, n) for a, n, _, _ in log["pcmd"]]
    assert got_w == want_w, f"ReorderController weight pieces: expected {want_w}, got {got_w}"
    assert got_p == want_p, f"ReorderController parameter pieces: expected {want_p}, got {got_p}"
    assert len(lay.gate_tiles) == (2 if E > 16 else 1), lay.gate_tiles
    ng = len(lay.gate_tiles)
    assert all(t == GATE_TAG for _, _, t, _ in log["wcmd"][:ng])
    assert all(t != GATE_TAG for _, _, t, _ in log["wcmd"][ng:])
    want_g = _expected_gemms(cfg, lay, fields, queues, active)
    assert len(log["gemm"]) == len(want_g)
    for i, ((got, full, _), want) in enumerate(zip(log["gemm"], want_g)):
        for name, v in want.items():
            assert got[name] == v, f"ReorderController GEMM {i} field {name}: expected {v}, got {got[name]}"
        assert got["b_base"] == 0 and got["colp_base"] == 0
        assert full == (1, 1), f"ReorderController GEMM {i} issued before both halves were FULL"
    want_rt = [entry for e in active for entry in queues[e]]
    assert log["rowtab"] == want_rt, "ReorderController: row table differs from the queue walk"
    # Fetch once: the memory saw exactly the active experts' bytes, nothing of an idle expert.
    idle = [e for e in range(E) if e not in active]
    for r in mem.log:
        off = r.addr - fields["expert_base"]
        if off >= 0:
            assert off // lay.expert_stride not in idle, f"idle expert {off // lay.expert_stride} fetched"
    fetched = sum(r.beats for r in mem.log) * 16
    minimum = lay.gate_bytes + sum(lay.weight_bytes(e) for e in active)
    print(f"ReorderController E={E} k={k} {skew}: active {active}, {len(log['gemm'])} GEMMs, "
          f"fetched {fetched} B = gate + active minimum {minimum} B")
    assert fetched == minimum


def test_next_tile_loads_while_engine_computes():
    """The next tile (the next expert's included) is FULL before the engine needs it, and its command
    is issued as soon as the previous command's last block is in the PE array: the array goes from one
    command's last beat to the next command's first beat without a gap, except where the next command
    must wait (``sync``: an expert's first fc2 tile waits for its fc1 to drain)."""
    cfg = moe_config(experts=4, top_k=2, dim=16, hidden=32, tokens=8)
    wl = _workload(4, 2, 8, seed=3)
    log, lay, *_ = _run_alone(cfg, wl, 0, bandwidth=16.0, drain=12)
    beats, cmds = log["beats"], log["gemm"]
    gaps = [beats[j + 1][0] - beats[j][-1] - 1 for j in range(1, len(beats) - 1)]
    syncs = [cmds[j + 1][0]["sync"] for j in range(1, len(beats) - 1)]
    print(f"ReorderController: PE idle cycles between commands {gaps} (sync: {syncs})")
    for j, (gap, sync) in enumerate(zip(gaps, syncs), start=1):
        if sync:
            assert gap <= 12 + 3, f"sync command {j + 1} waited {gap} cycles"
        else:
            assert gap <= 2, f"command {j + 1} started {gap} cycles after command {j}'s last beat"
            assert cmds[j + 1][2] < log["done_at"][j], f"command {j + 1} was not overlapped with {j}"


def test_overhead_bound_above_balance():
    """Zero-overhead switching: with memory bandwidth above the compute-balance point, the cycles not
    spent computing are at most the first expert tile's load, the fixed pipeline latencies paid once per
    layer, not per switch (the engine's loader stages, the router's softmax row latency before the
    first expert can start, the last tile's drain through the PE array and the epilogue) and 2 % of the
    compute cycles."""
    E, k, D, H, T = 4, 2, 32, 64, 32
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T)
    wl = make_moe_workload(E, k, D, H, T, seed=0)
    lay = plan_moe(cfg)
    # Balance: the bandwidth at which loading the largest tile takes as long as computing the
    # smallest tile of an average expert (T*k/E tokens, rounded to whole PE row tiles).
    count = T * k // E
    rows = -(-count // cfg.pe_rows)
    tile_compute = min(rows * -(-t.n // cfg.pe_cols) * t.k for t in lay.tiles)
    balance = max(t.bytes for t in lay.tiles) / tile_compute
    bandwidth = 8.0
    assert bandwidth >= balance
    sim = MoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=bandwidth, latency=20)
    res, = sim.run([(wl["h"], wl["x"], 0)])
    cyc, comp, first = res["cycles"], res["compute_cycles"], res["first_tile_load_cycles"]
    overhead = cyc - comp
    # The fixed pipeline: the engine's loader stages at the start, the router's softmax on the last
    # token's row before the first expert is known, the engine's feed pipeline, the PE array and the
    # epilogue at the end; and a cycle per expert for the MoE sequencer's command skid buffers (the
    # commands' valid, payload and ready are flip-flops on both sides of the client boundary); and the
    # expert queues' scatter drain before their walk (the picked entry registered before its decode).
    drain = (PEArray(cfg.pe_rows, cfg.pe_cols, cfg.pe_pack).latency + EPILOGUE_LATENCY
             + GemmEngine.LOADER_LATENCY + GemmEngine.FEED_LATENCY + Router(cfg).softmax.row_latency(E) + E
             + ExpertQueues.SCATTER_DRAIN)
    bound = first + drain + 0.02 * comp
    macs = T * D * E + T * k * 2 * D * H
    print(f"MoELayer E={E} k={k} D={D} h={H} T={T} at {bandwidth} B/cycle (balance {balance:.2f}): "
          f"{cyc} cycles, compute {comp}, overhead {overhead} <= first tile load {first} + drain {drain} + 2% compute "
          f"= {bound:.0f}; {macs / cyc:.2f} MAC/cycle of {cfg.macs_per_cycle}; timing "
          f"{ {k_: v for k_, v in res.items() if k_.startswith('t_')} }")
    assert overhead <= bound


def test_bandwidth_curve():
    """Cycles vs memory bytes/cycle: memory-bound (cycles ~ bytes / bandwidth) at low bandwidth,
    compute-bound (flat) at high bandwidth, monotonic in between."""
    E, k, D, H, T = 4, 2, 16, 32, 16
    cfg = moe_config(experts=E, top_k=k, dim=D, hidden=H, tokens=T)
    wl = make_moe_workload(E, k, D, H, T, seed=1)
    points = []
    for bw in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
        sim = MoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=bw, latency=20)
        res, = sim.run([(wl["h"], wl["x"], 0)])
        fetched = res["expert_bytes"] + res["gate_bytes"]
        points.append((bw, res["cycles"], res["compute_cycles"], fetched))
    print("MoELayer cycles vs bandwidth (B/cycle, cycles, compute, bytes/bandwidth):")
    for bw, cyc, comp, fetched in points:
        print(f"  {bw:5.1f} {cyc:7d} {comp:7d} {fetched / bw:9.0f}")
    cycles = [c for _, c, _, _ in points]
    assert all(a >= b for a, b in zip(cycles, cycles[1:])), f"cycles not monotonic: {cycles}"
    bw, cyc, comp, fetched = points[0]
    assert fetched / bw <= cyc <= 1.15 * fetched / bw + 200, "low bandwidth should be memory-bound"
    assert cycles[-1] <= 1.05 * cycles[-2], "high bandwidth should be compute-bound (flat)"


def test_verilog_and_embedding():
    """The controller converts alone, and embeds with its streamers and buffers via wiring.connect."""
    cfg = moe_config(experts=3, top_k=2, dim=8, hidden=16, tokens=6)
    lay = plan_moe(cfg)
    assert "module ctl" in verilog.convert(ReorderController(cfg, lay), name="ctl")
    assert "module bench" in verilog.convert(_Bench(cfg), name="bench")


def test_bad_parameters():
    cfg = moe_config(experts=3, top_k=2, dim=8, hidden=16, tokens=6)
    other = moe_config(experts=4, top_k=2, dim=8, hidden=16, tokens=6)
    with pytest.raises(TypeError, match="layout must be a MoELayout, not None"):
        ReorderController(cfg, None)
    with pytest.raises(ValueError, match=r"layout must be planned for config"):
        ReorderController(cfg, plan_moe(other))
    # Sizes the controller needs are the config's: refused when the config is built.
    with pytest.raises(ValueError, match=r"mem_addr_width must address a MoE layer's \d+-byte"):
        cfg.with_(mem_addr_width=8)
    with pytest.raises(ValueError, match=r"tile_tag_width must number the gate and an expert's 2 tiles"):
        cfg.with_(tile_tag_width=1)


# ---- the static tile plan and the external-memory image (m3vit_hw/expert_layout.py) ----------------

def _unpack_panels(raw, k, n, C):
    """Inverse of the panel layout: bytes -> int8 B [k, n]."""
    panels = -(-n // C)
    words = np.frombuffer(raw[:panels * k * C], dtype=np.int8).astype(np.int64).reshape(panels, k, C)
    return words.transpose(1, 0, 2).reshape(k, panels * C)[:, :n]


@pytest.mark.parametrize("E, D, H, C, wbuf", [(4, 16, 32, 4, None), (64, 16, 32, 4, None),
                                              (64, 16, 32, 4, 512), (3, 16, 48, 4, 512),
                                              (5, 24, 48, 8, 1024),
                                              (2, 32, 64, 4, 768)])
def test_layout_plan_and_image(E, D, H, C, wbuf):
    """Tiles cover every fc1 and fc2 column exactly once, each fits one half of both buffers, pieces are
    beat-aligned and contiguous; the packed image decodes back to the QMoE's weights and parameters."""
    cfg = moe_config(experts=E, top_k=2, dim=D, hidden=H, tokens=8, tasks=2, pe_cols=C,
                     weight_buffer_bytes=wbuf)
    wl = make_moe_workload(E, 2, D, H, 8, tasks=2, seed=E + D)
    image, lay = pack_moe(wl["qmoe"], cfg)
    q = wl["qmoe"]
    for kind, n_cols in (("fc1", H), ("fc2", D)):
        cols = [c for t in lay.tiles if t.kind == kind for c in range(t.n0, t.n0 + t.n)]
        assert cols == list(range(n_cols)), f"{kind} tiles cover columns {cols}"
    off = 0
    for t in lay.tiles:
        assert t.w_bytes <= lay.weight_half_bytes and t.panels <= lay.param_half_words
        assert t.w_offset == off and t.p_offset == off + t.w_bytes and t.bytes % lay.data_bytes == 0
        off += t.bytes
    assert off == lay.expert_stride == lay.weight_bytes(E - 1)
    assert [t.kind for t in lay.tiles] == sorted(t.kind for t in lay.tiles), "fc1 tiles come first"
    for e in (0, E - 1):
        base = lay.expert_offset(e)
        for t in lay.tiles:
            lin = q.fc1 if t.kind == "fc1" else q.fc2
            sl = slice(t.n0, t.n0 + t.n)
            got_w = _unpack_panels(image[base + t.w_offset:], t.k, t.n, C)
            assert np.array_equal(got_w, lin.w[e][sl].T), f"expert {e} tile {t.index} weights"
            b, mu = unpack_params(image[base + t.p_offset:base + t.p_offset + t.p_bytes], t.n, C)
            assert np.array_equal(b, lin.bias[e][sl]) and np.array_equal(mu, lin.mult[e][sl])
    cols = [c for t in lay.gate_tiles for c in range(t.n0, t.n0 + t.n)]
    assert cols == list(range(E)), f"gate chunks cover columns {cols}"
    off = 0
    for t in lay.gate_tiles:
        assert t.w_bytes <= lay.weight_half_bytes and t.panels <= lay.param_half_words
        assert t.w_offset == off and t.p_offset == off + t.w_bytes and t.bytes % lay.data_bytes == 0
        off += t.bytes
    assert off == lay.gate_stride == lay.gate_bytes
    for task in range(2):
        g = lay.gate_record_offset(task)
        for t in lay.gate_tiles:
            sl = slice(t.n0, t.n0 + t.n)
            got_w = _unpack_panels(image[g + t.w_offset:], D, t.n, C)
            assert np.array_equal(got_w, q.gates[task][:, sl]), f"task {task} gate chunk {t.index}"
            b, mu = unpack_params(image[g + t.p_offset:g + t.p_offset + t.p_bytes], t.n, C)
            assert np.array_equal(b, q.task_bias[task][sl]) and not mu.any()
    print(f"layout E={E} D={D} h={H} C={C}: {len(lay.tiles)} tiles, {lay.expert_stride} B per expert, "
          f"gate in {len(lay.gate_tiles)} chunk(s), half {lay.weight_half_bytes} B")


def test_layout_is_independent_of_experts():
    plans = [plan_moe(moe_config(experts=E, top_k=1, dim=16, hidden=32, tokens=8)) for E in (1, 2, 64)]
    assert len({(p.tiles, p.expert_stride, p.weight_half_bytes) for p in plans}) == 1
    # A weight buffer too small for the whole gate: it is chunked, never refused.
    small = moe_config(experts=64, top_k=1, dim=16, hidden=32, tokens=8, weight_buffer_bytes=512)
    assert small.gate_chunks == (4, 4, 4, 4), small.gate_chunks


@pytest.mark.parametrize("kw, words", [
    (dict(weight_buffer_bytes=272), r"weight_buffer_bytes must be a multiple of 32 \(two halves of whole "
                                    r"4-byte words and 16-byte memory beats\), not 272"),
    (dict(param_buffer_words=1), r"param_buffer_words must be >= 2"),
    (dict(experts=64, weight_buffer_bytes=64), r"weight_buffer_bytes must be >= 256 \(each half must "
                                               r"hold one weight panel"),
])
def test_layout_errors(kw, words):
    """Sizes the layout cannot use are refused when the config is built, naming the parameter."""
    base = moe_config(experts=kw.pop("experts", 2), top_k=1, dim=16, hidden=32, tokens=8)
    with pytest.raises(ValueError, match=words) as info:
        base.with_(**kw)
    print(info.value)
