# amaranth: UnusedElaboratable=no
"""LayerNormUnit: bit-exact with ``golden.layernorm``, under random stalls on every stream."""


import numpy as np
import pytest
from amaranth import Module
from amaranth.back import verilog
from amaranth.lib import wiring
from amaranth.sim import Simulator

from m3vit_hw import numerics
from m3vit_hw.rowops.layernorm import LayerNormUnit
from m3vit_hw.config import AcceleratorConfig
from reference import golden
from sim.testbench import Stalls, stream_get, stream_put, StreamPassthrough, transfer_logger

# Constructors that reject their parameters leave a half-built Elaboratable behind; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

I16_LO, I16_HI = numerics.int_range(numerics.RES_BITS)
G_LO, G_MAX = numerics.int_range(numerics.LN_GAMMA_BITS)
B_LO, B_HI = numerics.int_range(numerics.LN_BETA_BITS)


class Layer:
    """One layer's parameters and the rows normalized with them."""

    def __init__(self, x, eps, gamma, beta, shift):
        self.x = np.asarray(x, dtype=np.int64)
        self.eps, self.shift = int(eps), int(shift)
        self.gamma = np.asarray(gamma, dtype=np.int64)
        self.beta = np.asarray(beta, dtype=np.int64)

    def expected(self):
        return golden.layernorm(self.x, self.eps, self.gamma, self.beta, self.shift)


def _run(dut, layers, *, stall_p=0.3, out_stall_p=None, seed=0):
    """Program each layer, stream its rows, collect every output beat.

    Returns (outputs [rows, D] per layer, cycle of each output beat, cycle of each input beat).
    """
    D, L, R = dut.dim, dut.lanes, dut.dim // dut.lanes
    total_beats = sum(layer.x.shape[0] * R for layer in layers)
    beats, when, in_when = [], [], []

    async def feeder(ctx):
        stalls = Stalls(stall_p, seed)
        for layer in layers:
            for a in range(R):
                c = slice(a * L, (a + 1) * L)
                await stream_put(ctx, dut.param, {
                    "addr": a, "gamma": layer.gamma[c].tolist(), "beta": layer.beta[c].tolist(),
                    "eps": layer.eps, "shift": layer.shift}, stalls=stalls)
            for row in layer.x:
                for a in range(R):
                    await stream_put(ctx, dut.i, row[a * L:(a + 1) * L].tolist(), stalls=stalls)

    async def checker(ctx):
        stalls = Stalls(stall_p if out_stall_p is None else out_stall_p, seed + 1)
        for _ in range(total_beats):
            beats.append(list(await stream_get(ctx, dut.o, stalls=stalls)))
        for _ in range(3 * dut.buffer_depth):
            await ctx.tick()
            assert not ctx.get(dut.o.valid), "layernorm: extra output beat after the last expected one"
        assert not ctx.get(dut.busy), "layernorm: busy after every row was emitted"

    monitor, (in_when, when) = transfer_logger(dut.i, dut.o)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(feeder)
    sim.add_testbench(checker)
    sim.add_process(monitor)
    sim.run()

    out, pos = [], 0
    for layer in layers:
        n = layer.x.shape[0] * R
        out.append(np.array(beats[pos:pos + n], dtype=np.int64).reshape(layer.x.shape[0], D))
        pos += n
    return out, when, in_when


def _check(layers, outs):
    for n, (layer, got) in enumerate(zip(layers, outs)):
        want = layer.expected()
        bad = np.argwhere(want != got)
        if bad.size:
            r, c = bad[0]
            raise AssertionError(f"layernorm: first mismatch in layer {n}, row {r}, channel {c}: "
                                 f"expected {want[r, c]}, got {got[r, c]} (row {layer.x[r].tolist()})")


def _random_layer(rng, D, rows, eps_bits):
    scale = rng.choice([1, 16, 300, 4000, 32767], size=(rows, 1))
    x = np.clip(np.round(rng.standard_normal((rows, D)) * scale), I16_LO, I16_HI).astype(np.int64)
    # An outlier channel, as trained ViTs have.
    x[:, rng.integers(D)] = rng.integers(I16_LO, I16_HI + 1, size=rows)
    shift = int(rng.choice([0, 1, 14, 18, 22, 63]))
    g = 1 << min(max(shift - 6, 4), numerics.LN_GAMMA_BITS - 1)
    gamma = rng.integers(-g, g, size=D)
    beta = rng.integers(-(1 << (shift + 6)), 1 << (shift + 6), size=D) if shift < 25 else \
        rng.integers(B_LO, B_HI + 1, size=D)
    eps = int(rng.choice([0, 1, int(rng.integers(1 << 20)), (1 << eps_bits) - 1]))
    return Layer(x, eps, gamma, beta, shift)


def test_random_rows_four_layers_with_stalls():
    """Random rows (with an outlier channel), four layers reprogrammed through ``param``."""
    dut = LayerNormUnit(16, 4)
    rng = np.random.default_rng(1)
    layers = [_random_layer(rng, 16, 8, dut.eps_bits) for _ in range(4)]
    outs, _, _ = _run(dut, layers, stall_p=0.3, seed=1)
    _check(layers, outs)


@pytest.mark.parametrize("D,lanes", [(1, 1), (3, 1), (4, 4), (12, 3), (10, 5)])
def test_small_shapes(D, lanes):
    """Degenerate and odd shapes: D = 1 (z is always 0), one lane, one beat per row, odd lane counts."""
    dut = LayerNormUnit(D, lanes)
    rng = np.random.default_rng(100 + D * 10 + lanes)
    layers = [_random_layer(rng, D, 5, dut.eps_bits), Layer(_extreme_rows(2 * D)[:, :D], 0,
                                                            np.full(D, G_MAX), np.full(D, 12345), 9)]
    outs, _, _ = _run(dut, layers, stall_p=0.3, seed=D)
    _check(layers, outs)


def test_slow_consumer_fills_buffer():
    """A consumer slower than the producer: the row buffer fills and ``i`` must back-pressure."""
    dut = LayerNormUnit(8, 2)
    rng = np.random.default_rng(6)
    # More rows than the row buffer, the row-sum FIFO and the S1 queue hold together (12 rows did
    # not fill them once the statistics pass got its own result FIFO).
    layers = [_random_layer(rng, 8, 24, dut.eps_bits)]
    outs, _, in_when = _run(dut, layers, stall_p=0.0, out_stall_p=0.75, seed=6)
    _check(layers, outs)
    waited = (in_when[-1] - in_when[0] + 1) - len(in_when)
    print(f"layernorm: input held off for {waited} cycles by a full row buffer")
    assert waited > 0


@pytest.mark.parametrize("D,lanes,rows", [(192, 4, 3), (192, 16, 4), (384, 32, 3)])
def test_workload_dims(D, lanes, rows):
    """W1 (D=192) and W2 (D=384) row lengths, random rows with outliers, with stalls; lanes 16 / 32
    are the config defaults (pe_cols)."""
    dut = LayerNormUnit(D, lanes)
    rng = np.random.default_rng(D)
    layers = [_random_layer(rng, D, rows, dut.eps_bits)]
    outs, _, _ = _run(dut, layers, stall_p=0.2, seed=D)
    _check(layers, outs)


def _extreme_rows(D):
    rows = [
        [0] * D,                                  # zero variance, zero mean
        [I16_HI] * D,                             # zero variance at the rails
        [I16_LO] * D,
        [I16_LO, I16_HI] * (D // 2),              # maximum variance
        [0] * (D - 1) + [1],                      # tiny variance: den = 1 region
        [0] * (D - 1) + [I16_HI],                 # one spike
        [I16_HI] * (D - 1) + [I16_LO],
        [-1, 0] * (D // 2),
    ]
    return np.array(rows, dtype=np.int64)


@pytest.mark.parametrize("D,lanes", [(8, 2), (6, 3)])
def test_extremes(D, lanes):
    """Zero-variance rows, max-magnitude int16, eps = 0 and max, gamma/beta at their limits,
    shift = 0 (saturation) and shift = 63 (everything rounds to 0)."""
    dut = LayerNormUnit(D, lanes)
    x = _extreme_rows(D)
    rng = np.random.default_rng(2)
    eps_max = (1 << dut.eps_bits) - 1
    layers = [
        Layer(x, 0, np.full(D, G_MAX), np.zeros(D), 0),                       # saturates both ways
        Layer(x, eps_max, np.full(D, -G_MAX), np.full(D, B_HI), 18),
        Layer(x, 0, np.full(D, 1 << 12), np.full(D, B_LO), 63),
        Layer(x, 1, rng.integers(G_LO, G_MAX + 1, D), rng.integers(B_LO, B_HI + 1, D), 28),
        Layer(x, 7, np.full(D, G_LO), np.full(D, B_LO), 1),
        Layer(x, 0, np.full(D, 1 << 12), rng.integers(-(1 << 14), 1 << 14, D), 15),
    ]
    outs, _, _ = _run(dut, layers, stall_p=0.2, seed=D)
    _check(layers, outs)


def test_param_write_waits_until_drained():
    """``param.ready`` stays low while a row is in flight, even when ``o`` is stalled."""
    dut = LayerNormUnit(8, 4)
    seen = {}

    async def bench(ctx):
        await stream_put(ctx, dut.param, {"addr": 0, "gamma": [1] * 4, "beta": [0] * 4,
                                          "eps": 0, "shift": 0})
        await stream_put(ctx, dut.i, [1, 2, 3, 4])
        await stream_put(ctx, dut.i, [5, 6, 7, 8])
        ctx.set(dut.param.valid, 1)
        for _ in range(3 * dut.buffer_depth):          # o.ready is held low: the row cannot leave
            await ctx.tick()
            assert ctx.get(dut.busy) and not ctx.get(dut.param.ready)
        seen["held"] = ctx.get(dut.o.valid)
        ctx.set(dut.param.valid, 0)
        ctx.set(dut.o.ready, 1)
        await ctx.tick().until(~dut.busy)
        seen["ready_after"] = ctx.get(dut.param.ready)

    sim = Simulator(dut)
    sim.add_clock(1e-8)
    sim.add_testbench(bench)
    sim.run()
    assert seen == {"held": 1, "ready_after": 1}


@pytest.mark.parametrize("D,lanes", [(32, 2), (192, 16), (384, 32)])
def test_throughput_full_rate(D, lanes):
    """R = dim/lanes >= min_row_beats: one beat per cycle in and out, sustained over many rows.
    (192, 16) and (384, 32) are W1 and W2 at the config's default lanes."""
    dut = LayerNormUnit(D, lanes)
    assert dut.row_beats >= dut.min_row_beats
    rng = np.random.default_rng(3)
    rows = 10
    layer = _random_layer(rng, D, rows, dut.eps_bits)
    outs, when, in_when = _run(dut, [layer], stall_p=0.0)
    _check([layer], outs)
    span = when[-1] - when[0] + 1
    rate = rows * dut.row_beats / span
    print(f"layernorm D={D} lanes={lanes} (R={dut.row_beats}, min_row_beats={dut.min_row_beats}, "
          f"k={dut.recip_bits_per_cycle}, buffer {dut.buffer_depth} beats): "
          f"{rate:.3f} elements/cycle/lane over {rows} rows; last-in to first-out latency "
          f"{when[0] - in_when[dut.row_beats - 1]} cycles (documented {dut.row_latency})")
    assert rate == 1.0
    assert when[0] - in_when[dut.row_beats - 1] == dut.row_latency


@pytest.mark.parametrize("k", [1, None])
def test_throughput_short_rows(k):
    """One row per max(R, min_row_beats) cycles: with iterative engines (k=1) R < min_row_beats and
    the engines set the pace; the pipelined engines (default) keep one beat per cycle."""
    dut = LayerNormUnit(8, 4, recip_bits_per_cycle=k)
    rng = np.random.default_rng(4)
    rows = 8
    layer = _random_layer(rng, 8, rows, dut.eps_bits)
    outs, when, in_when = _run(dut, [layer], stall_p=0.0)
    _check([layer], outs)
    per_row = (when[-1] - when[dut.row_beats - 1]) / (rows - 1)
    print(f"layernorm D=8 lanes=4 (R={dut.row_beats}): {per_row:.2f} cycles/row "
          f"(min_row_beats={dut.min_row_beats}), {dut.row_beats / per_row:.3f} elements/cycle/lane")
    assert per_row <= max(dut.row_beats, dut.min_row_beats)
    if k is not None:
        assert dut.row_beats < dut.min_row_beats


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(dim=0, lanes=1), ValueError, "dim must be an integer >= 1, not 0"),
    (dict(dim=16, lanes=0), ValueError, "lanes must be an integer >= 1, not 0"),
    (dict(dim=16, lanes=2.0), TypeError, "lanes must be an integer, not 2.0"),
    (dict(dim=18, lanes=4), ValueError, "dim must be a multiple of lanes=4, not 18"),
    (dict(dim=1 << 15, lanes=4), ValueError, r"dim must be in \[1, 16384\], not 32768"),
    (dict(dim=16, lanes=4, recip_bits_per_cycle=0), ValueError,
     r"recip_bits_per_cycle must be in \[1, 8\], not 0"),
])
def test_bad_parameters(kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        LayerNormUnit(**kwargs)


def test_from_config():
    cfg = AcceleratorConfig.from_preset("vit-tiny-cityscapes", ln_lanes=4)
    unit = LayerNormUnit.from_config(cfg)
    assert (unit.dim, unit.lanes, unit.row_beats) == (192, 4, 48)
    print(f"layernorm D=192 lanes=4: k={unit.recip_bits_per_cycle}, min_row_beats={unit.min_row_beats}, "
          f"buffer {unit.buffer_depth} beats")
    assert unit.row_beats >= unit.min_row_beats


class _Top(wiring.Component):
    """A design embedding the unit; every stream is wired with ``wiring.connect``."""

    def __init__(self, dim, lanes):
        self.unit = LayerNormUnit(dim, lanes)
        self.dim, self.lanes, self.buffer_depth = dim, lanes, self.unit.buffer_depth
        super().__init__(dict(self.unit.signature.members))

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = self.unit
        m.submodules.stage = stage = StreamPassthrough(self.unit.o.signature)
        wiring.connect(m, wiring.flipped(self.i), self.unit.i)
        wiring.connect(m, wiring.flipped(self.param), self.unit.param)
        wiring.connect(m, self.unit.o, stage.i)
        wiring.connect(m, stage.o, wiring.flipped(self.o))
        m.d.comb += self.busy.eq(self.unit.busy)
        return m


def test_verilog_standalone():
    assert "module layernorm" in verilog.convert(LayerNormUnit(32, 4), name="layernorm")


def test_embedded_with_connect():
    top = _Top(8, 2)
    assert "module top" in verilog.convert(top, name="top")
    rng = np.random.default_rng(5)
    layer = _random_layer(rng, 8, 2, top.unit.eps_bits)
    outs, _, _ = _run(top, [layer], stall_p=0.2)
    _check([layer], outs)
