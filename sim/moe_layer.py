"""Standalone MoE-layer runner: the RTL :class:`~m3vit_hw.moe.moe_layer.MoELayer` against ``golden_moe``.

:class:`MoELayerSim` elaborates one MoELayer for a config, puts the :func:`~m3vit_hw.moe.expert_layout.pack_moe`
image of a workload into an :class:`~sim.ext_memory.ExternalMemory`, and runs one or more layers
(possibly of different tasks, on the same elaborated design) in Amaranth's simulator: load ``h``, ``x``
and the GELU table, start, wait for ``done``, read ``x`` back, compare with
``reference.golden_model.moe_layer``. Every external stream (load, start, read-back) and the memory get
random stalls when ``stall_prob > 0``.

:func:`run_moe_layer` is the one-call form used by ``python -m sim moe-layer`` (see :func:`main`).
With ``backend="verilator"`` (``--backend verilator``) the same runs go through
:class:`sim.verilator.moe_layer.VerilatorMoELayerSim`: the design compiled with Verilator (cached),
the same report, the same cycle counts when ``stall_prob`` is 0.
"""

import argparse
import json
import sys
import time

import numpy as np
from amaranth.sim import Simulator

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.gemm.epilogue import EpilogueMode
from m3vit_hw.moe.expert_layout import (ROUTER_RECORD_BYTES, pack_moe, pack_plan, pack_router_record,
                                        plan_moe, start_fields)
from m3vit_hw.model_config import ModelConfig
from m3vit_hw.moe.moe_layer import LoadTarget, MoELayer
from m3vit_hw.moe.reorder_controller import GATE_TAG
from sim.ext_memory import ExternalMemory
from sim.moe_workload import SKEWS, golden_moe, make_moe_workload
from m3vit_hw.checks import check_output_path
from sim.testbench import Stalls, stream_get, stream_put, wait_done

__all__ = ["moe_config", "append_tables", "MoELayerSim", "run_moe_layer", "sweep_memory", "main", "IMAGE_BASE", "BACKENDS"]

#: Simulation backends of :func:`run_moe_layer`: Amaranth's simulator, or compiled with Verilator.
BACKENDS = ("pysim", "verilator")

#: External byte address of the parameter image (not 0, so base addresses are exercised).
IMAGE_BASE = 0x10000


def moe_config(*, experts, top_k, dim, hidden, tokens, tasks=1, pe_rows=4, pe_cols=4,
               weight_buffer_bytes=None, param_buffer_words=None):
    """An :class:`AcceleratorConfig` for one MoE layer of the given dimensions.

    The model is a minimal encoder around the layer (one head, a 1x1 "patch" per token so no other
    GEMM sets the weight-panel size, ``tokens`` tokens including cls, a dense MLP as wide as the
    experts); ``hidden`` is any positive expert width (``h < dim`` included). Every buffer is sized
    by the config from the layer (:attr:`~m3vit_hw.config.AcceleratorConfig.act_buffer_needs`,
    :attr:`~m3vit_hw.config.AcceleratorConfig.weight_half_needs`); the default weight buffer holds one
    expert per half.
    """
    model = ModelConfig(
        name=f"moe-D{dim}-h{hidden}-E{experts}", img_size=(1, max(1, tokens - 1)), patch_size=1,
        in_chans=1, dim=dim, depth=2, heads=1, experts=experts, top_k=top_k,
        tasks=tuple(f"task{i}" for i in range(tasks)), task_channels=(1,) * tasks,
        mlp_hidden=hidden, expert_hidden=hidden)
    return AcceleratorConfig(model=model, pe_rows=pe_rows, pe_cols=pe_cols,
                             token_capacity=max(tokens, model.tokens),
                             weight_buffer_bytes=weight_buffer_bytes,
                             param_buffer_words=param_buffer_words)


def append_tables(image, qmoe, tasks, data_bytes):
    """``image`` + the per-task router records (:func:`~m3vit_hw.moe.expert_layout.pack_router_record`)
    + the GELU table, each beat-aligned; returns ``(image, router_offset, lut_offset)``."""
    align = max(data_bytes, ROUTER_RECORD_BYTES)
    out = bytearray(image)
    out += bytes(-len(out) % align)
    router_offset = len(out)
    for t in range(tasks):
        g = t if len(qmoe.gates) > 1 else 0
        out += pack_router_record(qmoe.router_c_mult[g], qmoe.router_c_shift[g])
    out += bytes(-len(out) % align)
    lut_offset = len(out)
    out += (np.asarray(qmoe.gelu_lut, dtype=np.int64) & 0xFF).astype(np.uint8).tobytes()
    return bytes(out), router_offset, lut_offset


def _words(matrix, C):
    """Rows of ``matrix`` as buffer words: row t, word w at t * ceil(cols / C) + w (lanes padded 0)."""
    matrix = np.asarray(matrix, dtype=np.int64)
    rows, cols = matrix.shape
    rw = -(-cols // C)
    padded = np.zeros((rows, rw * C), dtype=np.int64)
    padded[:, :cols] = matrix
    return padded.reshape(rows * rw, C)


class MoELayerSim:
    """One elaborated :class:`MoELayer` plus an external memory holding one workload's parameters.

    Parameters
    ----------
    config : AcceleratorConfig
    qmoe : reference.qparams.QMoE
        The layer's parameters (placed at :data:`IMAGE_BASE`).
    mem_bytes_per_cycle, latency, stall_prob, seed :
        The :class:`~sim.ext_memory.ExternalMemory` model; ``stall_prob`` also stalls every external
        stream of the layer (load, start, read-back).
    tables_from_memory : bool
        Place the per-task router records and the GELU table after the parameter image and let the
        layer's client fetch them (``router_fetch``/``lut_fetch`` start fields, as the encoder's MOE
        instruction does; ``c_mult``/``c_shift`` are then sent as 0) instead of loading the table
        through ``load`` and sending the router scale in ``start``.
    models : sequence of (qmoe, top_k)
        Smaller MoE layers to run on the same elaborated design (run-time shape: same D, at most the
        config's experts, top-k, expert hidden and tasks; their hidden width and expert count come
        from ``qmoe``). Each is packed with ``plan_moe(config, hidden=, experts=, tasks=)`` (padded
        gate) plus its plan table (:func:`~m3vit_hw.moe.expert_layout.pack_plan`) after the main
        image; a run ``(h, x, task, i)`` runs model ``i`` (1-based; 0 or no index = ``qmoe``).
    """

    def __init__(self, config, qmoe, *, mem_bytes_per_cycle=16, latency=20, stall_prob=0.0, seed=0,
                 tables_from_memory=False, models=()):
        self.config = config
        self.qmoe = qmoe
        self.dut = MoELayer(config)
        image, self.layout = pack_moe(qmoe, config)
        self.tables_from_memory = tables_from_memory
        db = config.mem_data_bytes
        # Model 0 = the design's own; then the run-time shaped ones. Each entry: qmoe, top_k,
        # layout, image base offset, plan offset (None for model 0), router/lut table offsets.
        self.models = []
        image = bytearray(image)

        def place(blob):
            image.extend(bytes(-len(image) % max(db, ROUTER_RECORD_BYTES)))
            at = len(image)
            image.extend(blob)
            return at

        for n, (q, k) in enumerate([(qmoe, config.model.top_k), *models]):
            if n == 0:
                lay, at, plan_at = self.layout, 0, None
            else:
                E, h = np.asarray(q.fc1.w).shape[:2]
                lay = plan_moe(config, hidden=int(h), experts=int(E),
                               tasks=np.asarray(q.task_bias).shape[0])
                blob, _ = pack_moe(q, config, layout=lay)
                at = place(blob)
                plan_at = place(pack_plan(lay, config))
            tables = (None, None)
            if tables_from_memory:
                tabs, r_off, l_off = append_tables(b"", q, lay.tasks, db)
                t_at = place(tabs)
                tables = (t_at + r_off, t_at + l_off)
            self.models.append(dict(qmoe=q, top_k=k, layout=lay, base=at, plan=plan_at, tables=tables))
        self.image = bytes(image)
        self.mem_kwargs = dict(bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                               stall_prob=stall_prob, seed=seed, max_outstanding=4)
        self.stall_prob = stall_prob
        self.seed = seed

    def start_fields(self, task, tokens, model=0):
        """The ``start`` payload of one run of model ``model`` (see ``tables_from_memory``)."""
        md = self.models[model]
        kw = {}
        if md["plan"] is not None:
            kw = dict(top_k=md["top_k"], plan_addr=IMAGE_BASE + md["plan"])
        fields = start_fields(md["qmoe"], task, tokens, md["layout"], base=IMAGE_BASE + md["base"], **kw)
        if self.tables_from_memory:
            r_at, l_at = md["tables"]
            fields.update(c_mult=0, c_shift=0, router_fetch=1, router_addr=IMAGE_BASE + r_at,
                          lut_fetch=1, lut_addr=IMAGE_BASE + l_at)
        return fields

    def run(self, runs, *, timeout=2_000_000):
        """Run layers ``[(h, x, task)]`` back to back on the same design; return one dict per run.

        Each dict: ``x`` (the read-back int16 [T, D]), ``cycles``, ``compute_cycles``,
        ``expert_bytes``, ``gate_bytes``, ``active_experts`` (counters read after ``done``),
        ``expert_tokens`` ({expert: count} from the queue walk), ``events`` (timing, see below) and
        ``sim_seconds``.
        """
        cfg, dut = self.config, self.dut
        C = cfg.pe_cols
        ctl = dut.controller
        mem = ExternalMemory(self.image, base=IMAGE_BASE, **self.mem_kwargs)
        results = [None] * len(runs)
        events = [dict(expert_tokens={}, gemm=[], wcommit=[], pcommit=[], wcmd=[], done=None,
                       start=None) for _ in runs]
        state = {"run": -1, "cycle": 0, "finished": False}
        lut = np.asarray(self.qmoe.gelu_lut, dtype=np.int64)

        sigs = [dut.start.valid, dut.start.ready, dut.queues.o.valid, dut.queues.o.ready,
                dut.queues.o.p, ctl.gemm.valid, ctl.gemm.ready, ctl.gemm.p.mode,
                ctl.wcmd.valid, ctl.wcmd.ready, ctl.wcmd.p.tag,
                dut.wstream.buf.commit.valid, dut.wstream.buf.commit.ready, dut.wstream.buf.commit.p.tag,
                dut.pstream.buf.commit.valid, dut.pstream.buf.commit.ready, dut.pstream.buf.commit.p.tag,
                dut.done]

        async def monitor(ctx):
            # Background: plain one-shot ticks only (see sim/ext_memory.py for why). Values are
            # sampled at the clock edge, so each handshake is seen exactly once.
            while True:
                _, _, *v = await ctx.tick().sample(*sigs)
                cyc = state["cycle"]
                state["cycle"] += 1
                r = state["run"]
                if r < 0 or state["finished"]:
                    continue
                (sv, sr, qv, qr, qp, gv, gr, gmode, wv, wr, wtag, cwv, cwr, cwtag, cpv, cpr, cptag,
                 done) = v
                ev = events[r]
                if sv and sr:
                    ev["start"] = cyc
                if qv and qr:
                    if qp.header:
                        ev["expert_tokens"][int(qp.expert)] = int(qp.count)
                        ev.setdefault("first_header", cyc)
                    if qp.last:
                        ev["walk_done"] = cyc
                if gv and gr:
                    ev["gemm"].append((cyc, int(gmode.value)))
                if wv and wr:
                    ev["wcmd"].append((cyc, int(wtag)))
                if cwv and cwr:
                    ev["wcommit"].append((cyc, int(cwtag)))
                if cpv and cpr:
                    ev["pcommit"].append((cyc, int(cptag)))
                if done:
                    ev["done"] = cyc

        async def host(ctx):
            st = Stalls(self.stall_prob, self.seed + 7)
            prev_model = 0
            for a in range(0 if self.tables_from_memory else 256):
                await stream_put(ctx, dut.load, {"target": LoadTarget.GELU, "addr": a,
                                                 "data": [int(lut[a])] + [0] * (C - 1)}, stalls=st)
            for r, (h, x, task, *model) in enumerate(runs):
                t0 = time.time()
                model = model[0] if model else 0
                if not self.tables_from_memory and model != prev_model:
                    # Another model's GELU table (the run-time shaped ones bring their own).
                    glut = np.asarray(self.models[model]["qmoe"].gelu_lut, dtype=np.int64)
                    for a in range(256):
                        await stream_put(ctx, dut.load, {"target": LoadTarget.GELU, "addr": a,
                                                         "data": [int(glut[a])] + [0] * (C - 1)}, stalls=st)
                prev_model = model
                T = h.shape[0]
                for target, mat in ((LoadTarget.H, h), (LoadTarget.X, x)):
                    for a, word in enumerate(_words(mat, C)):
                        await stream_put(ctx, dut.load, {"target": target, "addr": a,
                                                         "data": [int(v) for v in word]}, stalls=st)
                state["run"] = r
                await stream_put(ctx, dut.start, self.start_fields(task, T, model), stalls=st)
                await wait_done(ctx, dut.done, timeout=timeout, what=f"MoELayer (run {r})")
                res = {name: int(ctx.get(getattr(dut, name))) for name in
                       ("cycles", "compute_cycles", "expert_bytes", "gate_bytes", "active_experts",
                        "overflow")}
                words = []
                for a in range(T * cfg.row_words):
                    await stream_put(ctx, dut.rd_addr, a, stalls=st)
                    words.append([int(v) for v in await stream_get(ctx, dut.rd_data, stalls=st)])
                xo = np.array(words, dtype=np.int64).reshape(T, cfg.row_words * C)[:, :x.shape[1]]
                res["x"] = xo
                res["sim_seconds"] = time.time() - t0
                results[r] = res
            state["finished"] = True

        sim = Simulator(dut)
        sim.add_clock(1e-8)
        sim.add_testbench(mem.serve(dut.mem), background=True)
        sim.add_testbench(monitor, background=True)
        sim.add_testbench(host)
        sim.run()
        for res, ev in zip(results, events):
            res["events"] = ev
            res["expert_tokens"] = dict(sorted(ev["expert_tokens"].items()))
            res.update(_timing(ev))
        self.memory = mem
        return results


def _timing(ev):
    """Derived timing of one run, from the monitor's events (cycles relative to ``start``)."""
    s = ev["start"]
    out = {}
    if s is None:
        return out
    rel = lambda c: None if c is None else c - s
    gate_commits = [c for c, tag in ev["wcommit"] + ev["pcommit"] if tag == GATE_TAG]
    out["t_gate_loaded"] = rel(max(gate_commits)) if gate_commits else None
    out["t_gate_gemm"] = rel(ev["gemm"][0][0]) if ev["gemm"] else None
    out["t_first_header"] = rel(ev.get("first_header"))
    out["t_walk_done"] = rel(ev.get("walk_done"))
    # The gate runs as one RAW GEMM per gate chunk; the experts' GEMMs are the others.
    gate_gemms = [c for c, mode in ev["gemm"] if mode == EpilogueMode.RAW.value]
    expert_gemms = [c for c, mode in ev["gemm"] if mode != EpilogueMode.RAW.value]
    out["gate_gemms"] = len(gate_gemms)
    out["t_first_expert_gemm"] = rel(expert_gemms[0]) if expert_gemms else None
    exp_cmds = [c for c, tag in ev["wcmd"] if tag != GATE_TAG]
    exp_w = [c for c, tag in ev["wcommit"] if tag != GATE_TAG]
    exp_p = [c for c, tag in ev["pcommit"] if tag != GATE_TAG]
    if exp_cmds and exp_w and exp_p:
        # The first expert tile's load: its streamer command accepted -> both of its halves FULL.
        out["first_tile_load_cycles"] = max(exp_w[0], exp_p[0]) - exp_cmds[0] + 1
    out["t_done"] = rel(ev["done"])
    return out


def run_moe_layer(*, experts=4, top_k=2, dim=16, hidden=32, tokens=16, tasks=1, task=0, seed=0,
                  skew="none", pe_rows=4, pe_cols=4, weight_buffer_bytes=None, param_buffer_words=None,
                  mem_bytes_per_cycle=16.0,
                  latency=20, stall_prob=0.0, extra_tasks=(), router="multi_gate", backend="pysim",
                  threads=1, trace_file=None, trace_window=(0, 2**63 - 1)):
    """Build a workload, simulate the layer for ``task`` (then each of ``extra_tasks`` on the same
    design) and return a report dict (see :func:`main` for the keys).

    ``backend`` is ``"pysim"`` (Amaranth's simulator) or ``"verilator"`` (compiled, cached:
    :mod:`sim.verilator`; same cycle counts without stalls). ``threads`` and ``trace_file``
    (``.fst`` or ``.vcd``, cycles ``trace_window``) apply to Verilator only.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    cfg = moe_config(experts=experts, top_k=top_k, dim=dim, hidden=hidden, tokens=tokens, tasks=tasks,
                     pe_rows=pe_rows, pe_cols=pe_cols, weight_buffer_bytes=weight_buffer_bytes,
                     param_buffer_words=param_buffer_words)
    wl = make_moe_workload(experts, top_k, dim, hidden, tokens, tasks=tasks, seed=seed, skew=skew,
                           router=router)
    t0 = time.time()
    task_list = [task, *extra_tasks]
    runs = [(wl["h"], wl["x"], t) for t in task_list]
    if backend == "verilator":
        from sim.verilator.moe_layer import VerilatorMoELayerSim
        trace = None if trace_file is None else _trace_format(trace_file)
        ms = VerilatorMoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=mem_bytes_per_cycle,
                                  latency=latency, stall_prob=stall_prob, seed=seed, threads=threads,
                                  trace=trace)
        results = ms.run(runs, trace_file=trace_file, trace_window=trace_window)
    else:
        ms = MoELayerSim(cfg, wl["qmoe"], mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency,
                         stall_prob=stall_prob, seed=seed)
        results = ms.run(runs)
    reports = [_report(cfg, ms, wl, t, res) for t, res in zip(task_list, results)]
    for r in reports:
        r["wall_seconds"] = round(time.time() - t0, 2)
        r["backend"] = backend
        if backend == "verilator":
            b, lr = ms.model.build, ms.last_run
            r["verilator"] = {"compile_seconds": b["compile_seconds"], "cached": b["cached"],
                              "convert_seconds": b["convert_seconds"], "job_cycles": lr.cycles,
                              "job_sim_seconds": round(lr.sim_seconds, 4),
                              "cycles_per_second": round(lr.cycles_per_second or 0)}
    rep = reports[0]
    rep["config"] = dict(experts=experts, top_k=top_k, dim=dim, expert_hidden=hidden, tokens=tokens,
                         tasks=tasks, task=task, seed=seed, skew=skew, router=router, pe_rows=pe_rows, pe_cols=pe_cols,
                         mem_bytes_per_cycle=mem_bytes_per_cycle, latency=latency, stall_prob=stall_prob,
                         token_capacity=cfg.token_capacity, param_buffer_words=cfg.param_buffer_words)
    if extra_tasks:
        rep["task_runs"] = reports
    return rep


def _trace_format(path):
    """``"fst"`` or ``"vcd"`` from a waveform file name."""
    for fmt in ("fst", "vcd"):
        if str(path).endswith("." + fmt):
            return fmt
    raise ValueError(f"--trace file must end in .fst or .vcd, not {str(path)!r}")


def _report(cfg, ms, wl, task, res):
    """The report of one run: bit-exactness, counters, fetch accounting, the overhead bound."""
    m = cfg.model
    lay = ms.layout
    want, routing = golden_moe(wl, task)
    got = res["x"]
    bad = np.argwhere(got != want)
    active = [int(e) for e in routing["active"]]
    counts = {int(e): int(np.sum(routing["experts"] == e)) for e in active}
    minimum = sum(lay.weight_bytes(e) for e in active)
    T = got.shape[0]
    macs = T * m.gate_in_dim * m.experts + T * m.top_k * 2 * m.dim * m.expert_hidden
    cyc, comp = res["cycles"], res["compute_cycles"]
    first_load = res.get("first_tile_load_cycles")
    rep = {
        "bit_exact": bool(len(bad) == 0 and res["expert_tokens"] == counts),
        "mismatches": int(len(bad)),
        "first_mismatch": None if not len(bad) else {
            "token": int(bad[0][0]), "channel": int(bad[0][1]),
            "expected": int(want[tuple(bad[0])]), "got": int(got[tuple(bad[0])])},
        "task": task,
        "cycles": cyc,
        "compute_cycles": comp,
        "macs": macs,
        "mac_per_cycle": round(macs / cyc, 3) if cyc else None,
        "peak_mac_per_cycle": cfg.macs_per_cycle,
        "weight_bytes_fetched": res["expert_bytes"],
        "weight_bytes_minimum": minimum,
        "gate_bytes_fetched": res["gate_bytes"],
        "gate_bytes_minimum": lay.gate_bytes,
        "gate_chunks": len(lay.gate_tiles),
        "weight_buffer_bytes": cfg.weight_buffer_bytes,
        "param_buffer_bytes": 2 * lay.param_half_bytes,
        "expert_bytes_each": lay.expert_stride,
        "tiles_per_expert": len(lay.tiles),
        "active_experts": res["active_experts"],
        "active_expert_ids": active,
        "expert_tokens": {str(e): c for e, c in res["expert_tokens"].items()},
        "golden_expert_tokens": {str(e): c for e, c in counts.items()},
        "overflow": bool(res["overflow"]),
        "overhead_cycles": cyc - comp,
        "first_tile_load_cycles": first_load,
        "overhead_bound": None if first_load is None else round(first_load + 0.02 * comp, 1),
        # Bandwidth that hides every load behind compute on average: the bound applies at or above it.
        "balance_bytes_per_cycle": round((res["expert_bytes"] + res["gate_bytes"]) / comp, 3) if comp else None,
        "timing": {k: v for k, v in res.items() if k.startswith("t_")},
        "sim_seconds": round(res["sim_seconds"], 2),
    }
    rep["within_bound"] = None if first_load is None else rep["overhead_cycles"] <= rep["overhead_bound"]
    return rep


def sweep_memory(bandwidths, **kwargs):
    """Cycles vs memory bytes/cycle: one simulation per bandwidth, same workload."""
    points = []
    for bw in bandwidths:
        rep = run_moe_layer(mem_bytes_per_cycle=bw, **kwargs)
        points.append({"mem_bytes_per_cycle": bw, "cycles": rep["cycles"],
                       "compute_cycles": rep["compute_cycles"], "bit_exact": rep["bit_exact"],
                       "weight_bytes_fetched": rep["weight_bytes_fetched"],
                       "mac_per_cycle": rep["mac_per_cycle"]})
    return points


def _print_report(rep, out=None):
    out = sys.stdout if out is None else out   # resolved per call, so capture tools see it
    c = rep["config"]
    print(f"MoE layer E={c['experts']} top-{c['top_k']} D={c['dim']} h={c['expert_hidden']} "
          f"T={c['tokens']} task {rep['task']}/{c['tasks']} skew={c['skew']} on {c['pe_rows']}x{c['pe_cols']} "
          f"PEs, memory {c['mem_bytes_per_cycle']} B/cycle latency {c['latency']} stall {c['stall_prob']}",
          file=out)
    verdict = "BIT-EXACT" if rep["bit_exact"] else f"MISMATCH ({rep['mismatches']} values)"
    print(f"  result          {verdict} vs reference.golden_model.moe_layer", file=out)
    if rep["first_mismatch"]:
        fm = rep["first_mismatch"]
        print(f"  first mismatch  token {fm['token']} channel {fm['channel']}: expected {fm['expected']}, "
              f"got {fm['got']}", file=out)
    print(f"  active experts  {rep['active_experts']} of {c['experts']}: tokens {rep['expert_tokens']}", file=out)
    print(f"  cycles          {rep['cycles']} (compute {rep['compute_cycles']}, overhead "
          f"{rep['overhead_cycles']}), {rep['mac_per_cycle']} MAC/cycle of {rep['peak_mac_per_cycle']}",
          file=out)
    if rep["overhead_bound"] is not None:
        print(f"  overhead bound  first tile load {rep['first_tile_load_cycles']} + 2% compute = "
              f"{rep['overhead_bound']} -> {'within' if rep['within_bound'] else 'ABOVE'} (the bound "
              f"applies at or above ~{rep['balance_bytes_per_cycle']} B/cycle, the compute balance)",
              file=out)
    print(f"  expert bytes    fetched {rep['weight_bytes_fetched']}, minimum {rep['weight_bytes_minimum']} "
          f"({rep['expert_bytes_each']} B per expert in {rep['tiles_per_expert']} tiles)", file=out)
    print(f"  gate bytes      fetched {rep['gate_bytes_fetched']} (one task's record: "
          f"{rep['gate_bytes_minimum']}, in {rep['gate_chunks']} chunk(s))", file=out)
    print(f"  buffers         weight {rep['weight_buffer_bytes']} B, params {rep['param_buffer_bytes']} B",
          file=out)
    print(f"  timing          {rep['timing']}", file=out)
    vl = rep.get("verilator")
    extra = "" if vl is None else (
        f" (Verilator: model {'cached' if vl['cached'] else 'compiled in ' + str(vl['compile_seconds']) + ' s'}, "
        f"{vl['job_cycles']} cycles at {vl['cycles_per_second']} cycles/s)")
    print(f"  simulated in {rep['wall_seconds']} s on {rep.get('backend', 'pysim')}{extra}", file=out)


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m sim moe-layer",
        description="Simulate one MoE layer (router, expert queues, reordering controller, GEMM engine) "
                    "in Amaranth's simulator or compiled with Verilator, against the integer golden "
                    "model.")
    a = p.add_argument
    a("--experts", type=int, default=4, help="E, experts (default 4)")
    a("--top-k", type=int, default=2, help="k, experts per token (default 2)")
    a("--dim", type=int, default=16, help="D, token width (default 16)")
    a("--expert-hidden", type=int, default=32, help="h, expert hidden width, any positive size (default 32)")
    a("--tokens", type=int, default=16, help="T, tokens (default 16)")
    a("--tasks", type=int, default=1, help="tasks (gates) in the layer (default 1)")
    a("--task", type=int, default=0, help="task to run (default 0)")
    a("--seed", type=int, default=0, help="workload and stall seed (default 0)")
    a("--mem-bytes-per-cycle", type=float, default=16.0, help="external memory bandwidth (default 16)")
    a("--latency", type=int, default=20, help="external memory latency in cycles (default 20)")
    a("--stall-prob", type=float, default=0.0, help="random stall probability on memory and streams")
    a("--skew", choices=SKEWS, default="none", help="routing skew of the workload (default none)")
    a("--router", choices=("multi_gate", "task_embedding"), default="multi_gate",
      help="one gate per task, or one shared gate + per-task logit bias (default multi_gate)")
    a("--pe-rows", type=int, default=4, help="PE rows (default 4)")
    a("--pe-cols", type=int, default=4, help="PE columns (default 4)")
    a("--weight-buffer-bytes", type=int, default=None, help="weight buffer, both halves (default: "
      "one expert per half; the gate is streamed in chunks that fit a half)")
    a("--param-buffer-words", type=int, default=None, help="column-parameter buffer, both halves, in "
      "words of pe_cols columns (default: the widest dense GEMM pair); a half bounds the column "
      "tiles of an expert tile or gate chunk")
    a("--sweep-mem", nargs="?", const="0.5,1,2,4,8,16", default=None, metavar="B1,B2,...",
      help="run the layer at several memory bandwidths and print cycles vs bytes/cycle "
           "(default list 0.5,1,2,4,8,16)")
    a("--backend", choices=BACKENDS, default="pysim",
      help="simulator: Amaranth's pysim, or Verilator (compiled once, cached; default pysim)")
    a("--threads", type=int, default=1, help="Verilator model threads (default 1)")
    a("--trace", metavar="FILE", default=None,
      help="Verilator only: write a waveform (.fst or .vcd) of the cycles in --trace-window")
    a("--trace-window", metavar="FROM:TO", default=None,
      help="cycles to trace, inclusive, counted from the start of the simulation (the first load "
           "beat; the report's timing is relative to start) (default: all)")
    a("--json", metavar="FILE", help="write the report as JSON")
    return p


def _validate(args):
    """Range checks that need no elaboration; raise ValueError with one clear sentence."""
    for name in ("experts", "top_k", "dim", "expert_hidden", "tokens", "tasks", "pe_rows", "pe_cols",
                 "latency"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, not {v}")
    if args.top_k > args.experts:
        raise ValueError(f"--top-k must be <= --experts ({args.experts}), not {args.top_k}")
    if not 0 <= args.task < args.tasks:
        raise ValueError(f"--task must be in [0, {args.tasks - 1}], not {args.task}")
    if not args.mem_bytes_per_cycle > 0:
        raise ValueError(f"--mem-bytes-per-cycle must be > 0, not {args.mem_bytes_per_cycle}")
    if not 0 <= args.stall_prob < 1:
        raise ValueError(f"--stall-prob must be in [0, 1), not {args.stall_prob}")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, not {args.threads}")
    if args.trace is not None:
        if args.backend != "verilator":
            raise ValueError("--trace needs --backend verilator")
        _trace_format(args.trace)
        check_output_path(args.trace, "--trace")
    if args.trace_window is not None:
        try:
            lo, hi = (int(v) for v in args.trace_window.split(":"))
        except ValueError:
            raise ValueError(f"--trace-window must be FROM:TO (cycles), not {args.trace_window!r}") from None
        if not 0 <= lo <= hi:
            raise ValueError(f"--trace-window needs 0 <= FROM <= TO, not {args.trace_window!r}")
    if args.sweep_mem is not None:
        try:
            bws = [float(b) for b in args.sweep_mem.split(",")]
        except ValueError:
            raise ValueError(f"--sweep-mem must be a comma-separated list of numbers, "
                             f"not {args.sweep_mem!r}") from None
        if not bws or min(bws) <= 0:
            raise ValueError(f"--sweep-mem bandwidths must be > 0, not {args.sweep_mem!r}")
        return bws
    return None


def main(argv=None):
    """``python -m sim moe-layer``: returns the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        bws = _validate(args)
        check_output_path(args.json, "--json")
        kwargs = dict(experts=args.experts, top_k=args.top_k, dim=args.dim, hidden=args.expert_hidden,
                      tokens=args.tokens, tasks=args.tasks, task=args.task, seed=args.seed,
                      skew=args.skew, router=args.router, pe_rows=args.pe_rows, pe_cols=args.pe_cols,
                      weight_buffer_bytes=args.weight_buffer_bytes,
                      param_buffer_words=args.param_buffer_words, latency=args.latency,
                      stall_prob=args.stall_prob, backend=args.backend, threads=args.threads)
        if args.trace is not None:
            window = (0, 2**63 - 1)
            if args.trace_window is not None:
                window = tuple(int(v) for v in args.trace_window.split(":"))
            kwargs.update(trace_file=args.trace, trace_window=window)
        # Build the config once up front so a bad size fails before any simulation.
        moe_config(experts=args.experts, top_k=args.top_k, dim=args.dim, hidden=args.expert_hidden,
                   tokens=args.tokens, tasks=args.tasks, pe_rows=args.pe_rows, pe_cols=args.pe_cols,
                   weight_buffer_bytes=args.weight_buffer_bytes,
                   param_buffer_words=args.param_buffer_words)
        if bws is not None:
            points = sweep_memory(bws, **kwargs)
            fastest = min(pt["cycles"] for pt in points)
            # The knee: the lowest bandwidth within 5 % of the fastest run; below it the layer waits
            # for weights (memory-bound), above it the PE array is the limit (compute-bound).
            knee = min(pt["mem_bytes_per_cycle"] for pt in points if pt["cycles"] <= 1.05 * fastest)
            report = {"sweep": points, "knee_bytes_per_cycle": knee, "config": kwargs}
            compute = points[-1]["compute_cycles"]
            print(f"cycles vs memory bandwidth (compute {compute} cycles):")
            print(f"  {'B/cycle':>8} {'cycles':>8} {'x compute':>10} {'MAC/cycle':>10} {'bit-exact':>10}")
            for pt in points:
                print(f"  {pt['mem_bytes_per_cycle']:>8g} {pt['cycles']:>8} "
                      f"{pt['cycles'] / pt['compute_cycles']:>10.3f} {pt['mac_per_cycle']:>10} "
                      f"{str(pt['bit_exact']):>10}")
            print(f"  memory-bound below ~{knee:g} B/cycle (cycles within 5% of the fastest from there up)")
            ok = all(pt["bit_exact"] for pt in points)
        else:
            report = run_moe_layer(mem_bytes_per_cycle=args.mem_bytes_per_cycle, **kwargs)
            _print_report(report)
            ok = report["bit_exact"]
    except (TypeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # Verilator missing (VerilatorNotFound), a failed build, or a model error: one line each.
        print(f"error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
