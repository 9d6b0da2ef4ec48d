"""A Python executor of a compiled program: the contract the RTL sequencer implements.

:func:`execute` is started like the sequencer (``param_base``, ``program_base``, ``output_base``,
``task`` registers over an external memory), fetches and decodes the instructions from memory with the
accelerator's :class:`~m3vit_hw.control.isa.InstructionSet`, and runs each with the golden per-op
functions (:mod:`reference.golden`) on a model of the on-chip buffers: the int8 activation buffer and
the int16 residual buffer, ``pe_cols`` lanes a word. Weights, column parameters, LayerNorm records,
gates, router records, GELU tables and the cls/pos rows are read **only from memory**, through the
per-op layout modules (panels, parameter words, records), never from the quantized parameters.

The instruction fields do not carry the model's shape (D, heads, experts, top-k, patch size); the
executor takes them from ``model_config`` (the compiler's ``Program.model_config``), as an elaborated
sequencer takes them from its configuration. numpy only.
"""

from dataclasses import dataclass, field

import numpy as np

from m3vit_hw import numerics
from m3vit_hw.control.image_layout import attn_layout_for, moe_layout_for
from m3vit_hw.control.isa import ROUTER_RECORD_BYTES, InstructionSet, Opcode
from m3vit_hw.dense.embed_layout import plan_embed
from m3vit_hw.dense.norm_stage import norm_lanes, norm_record_bytes
from m3vit_hw.gemm.epilogue import EpilogueMode
from m3vit_hw.moe.expert_layout import param_word_bytes, unpack_params
from reference import golden as g

__all__ = ["ExecResult", "execute", "read_tokens", "run_program"]


def _ceil_div(a, b):
    return -(-a // b)


@dataclass
class ExecResult:
    """``counts``: instructions executed per opcode name; ``trace``: ``(opcode, fields)`` in order;
    ``macs``: multiply-accumulates of the GEMMs run (as the golden functions compute them)."""

    counts: dict = field(default_factory=dict)
    trace: list = field(default_factory=list)
    macs: int = 0


class _Machine:
    def __init__(self, mem, config, view, task, param_base, output_base):
        self.mem = mem
        self.hw = config
        self.cfg = view
        self.task = task
        self.pb = param_base
        self.ob = output_base
        self.C = view.pe_cols
        # The on-chip buffers, at the accelerator's sizes.
        self.act = np.zeros((config.act_buffer_words, self.C), dtype=np.int64)
        self.res = np.zeros((config.res_buffer_words, self.C), dtype=np.int64)
        self.macs = 0

    # -- external memory -----------------------------------------------------------------------
    def raw(self, addr, n, base=None):
        at = (self.pb if base is None else base) + addr
        if at < 0 or at + n > len(self.mem):
            raise ValueError(f"memory read [{at}, {at + n}) outside the {len(self.mem)}-byte memory")
        return bytes(self.mem[at:at + n])

    def panels(self, addr, k, n):
        """B [k, n] int8 from ``ceil(n/C)`` panels of ``k`` words at ``addr``."""
        C = self.C
        p = _ceil_div(n, C)
        b = np.frombuffer(self.raw(addr, p * k * C), dtype=np.int8).astype(np.int64)
        return b.reshape(p, k, C).transpose(1, 0, 2).reshape(k, p * C)[:, :n]

    def params(self, addr, n):
        return unpack_params(self.raw(addr, _ceil_div(n, self.C) * param_word_bytes(self.C)), n, self.C)

    def lut(self, addr):
        """The GELU table: uint8 codes (``numerics.GELU_CODE_BITS``)."""
        return np.frombuffer(self.raw(addr, 1 << numerics.ACT_BITS), dtype=np.uint8).astype(np.int64)

    def tiles_operand(self, base, tiles, k, n):
        """B [k, n], bias, mult assembled from tiles at ``base + offset``."""
        b = np.zeros((k, n), dtype=np.int64)
        bias = np.zeros(n, dtype=np.int64)
        mult = np.zeros(n, dtype=np.int64)
        for t in tiles:
            cols = slice(t.n0, t.n0 + t.n)
            b[:, cols] = self.panels(base + t.w_offset, t.k, t.n)
            bias[cols], mult[cols] = self.params(base + t.p_offset, t.n)
        return b, bias, mult

    # -- on-chip buffers -----------------------------------------------------------------------
    @staticmethod
    def _check(buf, name, base, pitch, rows, words):
        last = base + (rows - 1) * pitch + words
        if base < 0 or last > len(buf):
            raise ValueError(f"{name} buffer access up to word {last} outside its {len(buf)} words")

    def read(self, buf, name, base, pitch, rows, cols):
        w = _ceil_div(cols, self.C)
        self._check(buf, name, base, pitch, rows, w)
        idx = base + pitch * np.arange(rows)[:, None] + np.arange(w)[None, :]
        return buf[idx].reshape(rows, w * self.C)[:, :cols]

    def write(self, buf, name, base, pitch, values):
        rows, cols = values.shape
        w = _ceil_div(cols, self.C)
        self._check(buf, name, base, pitch, rows, w)
        for r in range(rows):
            flat = buf[base + r * pitch: base + r * pitch + w].reshape(-1)
            flat[:cols] = values[r]
            buf[base + r * pitch: base + r * pitch + w] = flat.reshape(w, self.C)

    def matmul(self, a, b):
        self.macs += a.shape[0] * a.shape[1] * b.shape[1]
        return g.matmul(a, b)

    # -- instructions --------------------------------------------------------------------------
    def load_image(self, f):
        m = self.cfg.model
        if (f["img_rows"], f["img_cols"]) != tuple(m.img_size):
            raise ValueError(f"LOAD_IMAGE {f['img_rows']}x{f['img_cols']} does not match the model's {m.img_size}")
        H, W = m.img_size
        p, cin = m.patch_size, m.in_chans
        raw = self.raw(f["img_addr"], H * W * cin, base=self.ib)
        img = np.frombuffer(raw, dtype=np.uint8).astype(np.int64) - 128
        # The loader's unfolding: patch rows in raster order, features in (kh, kw, c) order.
        patches = img.reshape(H // p, p, W // p, p, cin).transpose(0, 2, 1, 3, 4).reshape(-1, p * p * cin)
        lay = plan_embed(self.cfg)
        rw, C = self.cfg.row_words, self.C
        init = np.stack([np.frombuffer(self.raw(f["param_addr"] + i * lay.res_record_bytes, 2 * C), dtype="<i2")
                         for i in range(lay.res_words)]).astype(np.int64)
        b, bias, mult = self.tiles_operand(f["param_addr"], lay.tiles, lay.patch_dim, lay.dim)
        y = g.requantize(self.matmul(patches, b), bias, mult, f["shift"], numerics.RES_BITS)
        init = init.reshape(lay.tokens, rw * C)
        init[1:, :m.dim] = g.residual_add(init[1:, :m.dim], y)
        self.res[:lay.tokens * rw] = init.reshape(-1, C)

    def layernorm(self, f):
        D = self.cfg.model.dim
        L = norm_lanes(self.cfg)
        rb = norm_record_bytes(self.cfg)
        gamma, beta = np.zeros(D, dtype=np.int64), np.zeros(D, dtype=np.int64)
        eps = shift = None
        for r in range(D // L):
            rec = self.raw(f["param_addr"] + r * rb, rb)
            gamma[r * L:(r + 1) * L] = np.frombuffer(rec[:2 * L], dtype="<i2")
            beta[r * L:(r + 1) * L] = np.frombuffer(rec[2 * L:6 * L], dtype="<i4")
            eps = int.from_bytes(rec[6 * L:6 * L + 4], "little")
            shift = rec[6 * L + 4]
        if shift != f["shift"]:
            raise ValueError(f"LAYERNORM shift field {f['shift']} differs from its records' {shift}")
        rw = self.cfg.row_words
        x = self.read(self.res, "residual", f["res_base"], rw, f["tokens"], D)
        self.write(self.act, "activation", f["act_base"], rw, g.layernorm(x, eps, gamma, beta, shift))

    def attention(self, f):
        cfg = self.cfg
        m = cfg.model
        T, D, H, hd = f["tokens"], m.dim, m.heads, m.head_dim
        lay = attn_layout_for(cfg, self.hw)
        hp = lay.hw * self.C
        rw = cfg.row_words
        h = self.read(self.act, "activation", 0, rw, T, D)
        ctx = np.zeros((T, lay.proj_k), dtype=np.int64)
        for i in range(H):
            tiles = [t for t in lay.tiles if t.kind == "qkv" and t.head == i]
            b, bias, mult = self.tiles_operand(f["param_addr"], tiles, D, 3 * hp)
            qkv = g.requantize(self.matmul(h, b), bias, mult, f["qkv_shift"], numerics.ACT_BITS)
            q, k = (qkv[:, s * hp:s * hp + hd] for s in range(2))
            v = qkv[:, 2 * hp + lay.v_lane(i):2 * hp + lay.v_lane(i) + hd]
            self.macs += 2 * T * T * hd
            ctx[:, lay.ctx_lane(i):lay.ctx_lane(i) + hd] = g.attention_head_tiled(
                q, k, v, f["c_mult"], f["c_shift"], f["out_mult"], f["out_shift"], cfg.q_tile)
        b, bias, mult = self.tiles_operand(f["param_addr"], [t for t in lay.tiles if t.kind == "proj"],
                                          lay.proj_k, D)
        y = g.requantize(self.matmul(ctx, b), bias, mult, f["proj_shift"], numerics.RES_BITS)
        x = self.read(self.res, "residual", 0, rw, T, D)
        self.write(self.res, "residual", 0, rw, g.residual_add(x, y))

    def moe(self, f):
        cfg = self.cfg
        m = cfg.model
        T, D = f["tokens"], m.dim
        # The image's layout: on a design elaborated for more experts / a wider hidden layer the gate is
        # padded to the design's experts (padded logits never win, their probability is 0).
        lay = moe_layout_for(cfg, self.hw)
        E = lay.gate_cols
        rw = cfg.row_words
        h = self.read(self.act, "activation", 0, rw, T, D)
        x = self.read(self.res, "residual", 0, rw, T, D)
        gate_at = f["gate_addr"] + self.task * f["gate_stride"]
        gate, bias, _ = self.tiles_operand(gate_at, lay.gate_tiles, D, E)
        rec = self.raw(f["router_addr"] + self.task * ROUTER_RECORD_BYTES, ROUTER_RECORD_BYTES)
        c_mult, c_shift = int.from_bytes(rec[:2], "little"), rec[2]
        logits = g.router_logits(h, gate, bias)
        self.macs += T * D * E
        probs = g.router_probs(logits, c_mult, c_shift)
        queues, active = g.expert_queues(g.topk(logits, m.top_k), probs, E)
        lut = self.lut(f["lut_addr"])
        for e in active:
            base = f["expert_addr"] + e * lay.expert_stride
            b1, bias1, mult1 = self.tiles_operand(base, lay.fc1_tiles, D, lay.hidden)
            b2, bias2, mult2 = self.tiles_operand(base, lay.fc2_tiles, lay.hidden, D)
            toks = np.array([t for t, _ in queues[e]], dtype=np.int64)
            wts = np.array([w for _, w in queues[e]], dtype=np.int64)
            a = g.gelu(g.requantize(self.matmul(h[toks], b1), bias1, mult1, f["fc1_shift"], numerics.ACT_BITS), lut)
            y = g.requantize(self.matmul(a, b2), bias2, mult2, f["fc2_shift"], numerics.RES_BITS)
            x[toks] = g.moe_combine(x[toks], y, wts[:, None])
        self.write(self.res, "residual", 0, rw, x)

    def gemm(self, f):
        if f["gather"] or f["scatter"]:
            raise ValueError("GEMM gather/scatter (row tables) is not modelled by the executor")
        mode = EpilogueMode(f["mode"])
        a = self.read(self.act, "activation", f["a_base"], f["a_stride"], f["m"], f["k"])
        # The buffer holds bytes: the PE array reads them as uint8 (a_unsigned) or int8.
        a = a & 0xFF if f.get("a_unsigned", 0) else ((a + 128) & 0xFF) - 128
        b = self.panels(f["w_addr"], f["k"], f["n"])
        bias, mult = self.params(f["p_addr"], f["n"])
        acc = self.matmul(a, b)
        if mode in (EpilogueMode.ACT8, EpilogueMode.GELU8):
            y = g.requantize(acc, bias, mult, f["shift"], numerics.ACT_BITS)
            if mode is EpilogueMode.GELU8:
                y = g.gelu(y, self.lut(f["lut_addr"]))
            self.write(self.act, "activation", f["dst_base"], f["dst_stride"], y)
        elif mode in (EpilogueMode.RES16, EpilogueMode.RESADD):
            y = g.requantize(acc, bias, mult, f["shift"], numerics.RES_BITS)
            if mode is EpilogueMode.RESADD:
                y = g.residual_add(self.read(self.res, "residual", f["dst_base"], f["dst_stride"], f["m"], f["n"]), y)
            self.write(self.res, "residual", f["dst_base"], f["dst_stride"], y)
        else:
            raise ValueError(f"GEMM mode {mode.name} is not modelled by the executor")

    def store(self, f):
        words = self.res[f["res_base"]:f["res_base"] + f["words"]]
        if len(words) != f["words"]:
            raise ValueError(f"STORE of {f['words']} words past the residual buffer")
        blob = (words & 0xFFFF).astype("<u2").tobytes()
        at = self.ob + f["dst_addr"]
        if at + len(blob) > len(self.mem):
            raise ValueError(f"STORE to [{at}, {at + len(blob)}) outside the {len(self.mem)}-byte memory")
        self.mem[at:at + len(blob)] = blob


def execute(mem, config, model_config, *, task, param_base, program_base, output_base,
            max_instructions=1 << 20, observer=None, image_base=None):
    """Run the program at ``program_base`` over ``mem`` (a bytearray, modified in place: STORE writes).

    Parameters
    ----------
    mem : bytearray
        External memory holding the image at ``param_base``, the program and the camera image.
    config : AcceleratorConfig
        The accelerator (its instruction format and buffer sizes).
    model_config : AcceleratorConfig
        The compiled model's view (``Program.model_config``).
    task : int
        The run-time task register.
    image_base : int or None
        ``LOAD_IMAGE.img_addr`` is relative to it (the sequencer's ``image_base`` register); default
        ``param_base`` (the frame in the image's ``input`` section).
    observer : callable or None
        Called as ``observer(index, opcode, fields, act, res)`` after every executed instruction
        (``act`` and ``res`` are the on-chip buffers as ``[words, pe_cols]`` int64 arrays; copy what
        you keep): the reference states of the RTL's diff ladder.

    Instructions run one after another in program order, which satisfies every ``wait`` bit (the
    executor models results, not overlap or cycles).

    Returns
    -------
    ExecResult
    """
    m = model_config.model
    if not isinstance(task, int) or not 0 <= task < m.num_tasks:
        raise ValueError(f"task must be in [0, {m.num_tasks - 1}], not {task!r}")
    isa = InstructionSet(config)
    mach = _Machine(mem, config, model_config, task, param_base, output_base)
    mach.ib = param_base if image_base is None else image_base
    run = {Opcode.LOAD_IMAGE: mach.load_image, Opcode.LAYERNORM: mach.layernorm, Opcode.ATTENTION: mach.attention,
           Opcode.MOE: mach.moe, Opcode.GEMM: mach.gemm, Opcode.STORE: mach.store, Opcode.SYNC: lambda f: None}
    result = ExecResult()
    nbytes = 4 * isa.words
    pc = program_base
    for _ in range(max_instructions):
        raw = mach.raw(pc, nbytes, base=0)
        op, fields, _wait = isa.decode([int.from_bytes(raw[4 * i:4 * i + 4], "little") for i in range(isa.words)])
        pc += nbytes
        result.counts[op.name] = result.counts.get(op.name, 0) + 1
        result.trace.append((op, fields))
        if op is Opcode.END:
            result.macs = mach.macs
            return result
        run[op](fields)
        if observer is not None:
            observer(len(result.trace) - 1, op, fields, mach.act, mach.res)
    raise ValueError(f"no END within {max_instructions} instructions")


def read_tokens(mem, model_config, output_base):
    """The int16 encoder tokens [T, D] a STORE of the whole residual wrote at ``output_base``."""
    m = model_config.model
    C, rw = model_config.pe_cols, model_config.row_words
    n = m.tokens * rw * C
    out = np.frombuffer(bytes(mem[output_base:output_base + 2 * n]), dtype="<i2").astype(np.int64)
    return out.reshape(m.tokens, rw * C)[:, :m.dim]


def run_program(program, img_u8, task, *, param_base=0x1000):
    """Place ``program``'s image at ``param_base``, write the uint8 HWC camera image, execute, and
    return ``(tokens [T, D], ExecResult)``."""
    lay = program.layout
    img = np.asarray(img_u8)
    if img.dtype != np.uint8 or img.size != lay.input_bytes:
        raise ValueError(f"img_u8 must be uint8 with {lay.input_bytes} values (H, W, C), not {img.dtype} "
                         f"with {img.size}")
    mem = bytearray(param_base + len(program.image))
    mem[param_base:] = program.image
    at = param_base + lay.input_addr
    mem[at:at + lay.input_bytes] = img.tobytes()
    res = execute(mem, program.config, program.model_config, task=task, param_base=param_base,
                  program_base=param_base + lay.program_addr, output_base=param_base + lay.output_addr)
    return read_tokens(mem, program.model_config, param_base + lay.output_addr), res
