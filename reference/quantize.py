"""Post-training quantization: float M³ViT encoder -> integer-only parameters for the golden model.

Calibration runs the float model on sample images (never the evaluation images) for every task and
records the largest magnitude seen at each quantization point. From those ranges every scale is fixed,
and every scale ratio is turned into an integer multiplier and shift here, once, so the integer forward
pass (:mod:`reference.golden_model`) never touches a float.

Scheme (``docs/numerics.md`` has the formulas):

* weights: int8, symmetric, one scale per output channel (per expert and channel for experts); the gate
  matrices use ONE scale each so that logits of different experts stay comparable for top-k;
* GEMM inputs: int8, symmetric, one scale per tensor (per block site), shared by all tasks so that a task
  switch changes only the gate weights;
* residual stream: int16 at one encoder-wide scale, so residual adds are plain saturating adds;
* the GELU input scale clips the negative side at -GELU_NEG_CLIP, where GELU is already ~0, which buys
  resolution for the positive side that matters.

Floats kept in the result (``*_scale``) are metadata for the host: quantizing the input image and
dequantizing the encoder output for the float decoders and for the fidelity report.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from dataclasses import dataclass

from m3vit_hw import numerics
from .qparams import QLinear, QLayerNorm, QAttention, QDenseMlp, QMoE, QBlock, QuantizedEncoder

__all__ = [
    "calibrate", "quantize", "quantize_image", "PixelInput", "DEFAULTS", "RES_HEADROOM", "GELU_NEG_CLIP",
]

#: Residual scale headroom over the calibrated maximum: evaluation inputs may exceed the calibration
#: range, and int16 has bits to spare.
RES_HEADROOM = 2.0
#: GELU(x) for x < -GELU_NEG_CLIP is below 1e-6 in magnitude: clip the GELU input range there.
GELU_NEG_CLIP = 5.0


# --------------------------------------------------------------------------------------------------
# Scale -> integer conversions (the only place floats meet integers)

def _scale(absmax, bits):
    return max(float(absmax), 1e-12) / ((1 << (bits - 1)) - 1)


def _mult_shift(real, mult_bits, shift_max=numerics.SHIFT_MAX):
    """Integer multipliers ``round(real * 2**shift)`` below ``2**mult_bits``, one shared shift."""
    real = np.asarray(real, dtype=np.float64)
    top = float(np.abs(real).max())
    if top <= 0:
        return np.zeros(real.shape, dtype=np.int64), 0
    shift = int(math.floor(math.log2(((1 << mult_bits) - 1) / top)))
    shift = max(0, min(shift_max, shift))
    mult = np.round(real * (1 << shift)).astype(np.int64)
    lim = (1 << mult_bits) - 1
    if np.abs(mult).max() > lim:
        raise ValueError(f"multiplier {top} does not fit {mult_bits} bits even at shift 0")
    return mult, shift


def _mse_row_scale(w):
    """Per-row int8 scale minimising the squared error (rows on the last axis), searched over clips."""
    top = np.maximum(np.abs(w).max(-1), 1e-12)
    best_s = top / 127.0
    best_err = None
    for frac in np.linspace(0.5, 1.0, 26):
        s = top * frac / 127.0
        err = ((np.clip(np.round(w / s[..., None]), -127, 127) * s[..., None] - w) ** 2).sum(-1)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_s = np.where(better, s, best_s)
    return best_s


def _quant_weight(w, per_channel=True, weight_clip="max"):
    """Symmetric int8 weights; scale per output row (last-but-one axis) or per tensor.

    ``weight_clip``: per-row range ``max`` (absmax) or ``mse`` (the clip in [0.5, 1] x absmax that
    minimises the row's squared rounding + clipping error).
    """
    w = np.asarray(w, dtype=np.float64)
    if per_channel:
        if weight_clip == "mse":
            s = _mse_row_scale(w)
        else:
            s = np.maximum(np.abs(w).max(-1), 1e-12) / 127.0
        q = np.clip(np.round(w / s[..., None]), -127, 127)
    else:
        s = max(np.abs(w).max(), 1e-12) / 127.0
        q = np.clip(np.round(w / s), -127, 127)
    return q.astype(np.int64), s


def _qlinear(w, b, in_scale, out_scale, out_bits, weight_clip="max"):
    """Quantize ``y = x @ w.T + b`` with int8 x at ``in_scale`` into an out_bits result at ``out_scale``."""
    wq, ws = _quant_weight(w, weight_clip=weight_clip)
    acc_scale = in_scale * ws
    bias = np.round(np.asarray(b, dtype=np.float64) / acc_scale).astype(np.int64)
    lo, hi = numerics.int_range(numerics.BIAS_BITS)
    bias = np.clip(bias, lo, hi)
    mult, shift = _mult_shift(acc_scale / out_scale, numerics.MULT_BITS)
    return QLinear(wq, bias, mult, shift, out_bits)


def _qlayernorm(gamma, beta, eps, dim, res_scale, out_scale, out_bits=numerics.ACT_BITS):
    g = np.asarray(gamma, dtype=np.float64) / out_scale
    b = np.asarray(beta, dtype=np.float64) / out_scale
    g_lim = (1 << (numerics.LN_GAMMA_BITS - 1)) - 1
    b_lim = (1 << (numerics.LN_BETA_BITS - 1)) - 1
    # Largest shift that keeps both gamma_mult and beta_int inside their formats.
    s_g = math.floor(math.log2(g_lim / max(np.abs(g).max(), 1e-12))) + numerics.LN_Z_FRAC
    s_b = math.floor(math.log2(b_lim / max(np.abs(b).max(), 1e-12)))
    shift = max(0, min(numerics.SHIFT_MAX, s_g, s_b))
    gamma_mult = np.clip(np.round(g * 2.0 ** (shift - numerics.LN_Z_FRAC)), -g_lim - 1, g_lim).astype(np.int64)
    beta_int = np.clip(np.round(b * 2.0 ** shift), -b_lim - 1, b_lim).astype(np.int64)
    eps_int = int(min((1 << numerics.LN_EPS_BITS) - 1, round(eps * dim * dim / (res_scale * res_scale))))
    extra = out_bits - numerics.ACT_BITS
    if extra:
        # The same parameters rounded `extra` bits later: the output step is out_scale / 2^extra.
        if shift < extra:
            raise ValueError(f"LayerNorm shift {shift} leaves no room for a {out_bits}-bit output")
        return QLayerNorm(eps_int, gamma_mult, beta_int, shift - extra, out_bits)
    return QLayerNorm(eps_int, gamma_mult, beta_int, shift)


def _softmax_mult(real):
    """``c_mult * 2**-c_shift`` ~= real, c_mult below 2**SOFTMAX_MULT_BITS."""
    m, s = _mult_shift(np.array([real]), numerics.SOFTMAX_MULT_BITS)
    return int(m[0]), s


def _gelu_lut(in_scale, out_scale, out_bits=numerics.ACT_BITS):
    x = np.arange(-128, 128, dtype=np.float64) * in_scale
    y = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    lo, hi = numerics.int_range(out_bits)
    return np.clip(np.round(y / out_scale), lo, hi).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Calibration

#: Values kept per observation and per site for the percentile / MSE range searches (deterministic
#: stride samples; the MSE search is O(candidates x sample)).
_SAMPLE = 1 << 15
_SAMPLE_TOTAL = 1 << 18


class _Range:
    """Running max |x| (and of the positive and negative parts), per-channel max |x| (last axis), and a
    sample of the values for the percentile and MSE range searches."""

    def __init__(self):
        self.absmax = 0.0
        self.pos = 0.0
        self.neg = 0.0
        self.chan = None
        self.samples = []

    def add(self, t):
        t = t.detach()
        if t.numel() == 0:
            return
        self.pos = max(self.pos, float(t.max().clamp(min=0)))
        self.neg = max(self.neg, float((-t.min()).clamp(min=0)))
        self.absmax = max(self.pos, self.neg)
        c = t.abs().reshape(-1, t.shape[-1]).amax(0).double()
        self.chan = c if self.chan is None or self.chan.shape != c.shape else torch.maximum(self.chan, c)
        flat = t.reshape(-1).double()
        step = max(1, flat.numel() // _SAMPLE)
        self.samples.append(flat[::step])

    def values(self):
        v = torch.cat(self.samples) if self.samples else torch.zeros(1, dtype=torch.float64)
        return v[::max(1, v.numel() // _SAMPLE_TOTAL)]

    def clip(self, method, bits=8, signed_part=None):
        """Range to quantize to: ``max`` (the calibrated max), ``pNN.NN`` (that percentile of |x|) or
        ``mse`` (the clip in [0.2, 1] x max minimising the int ``bits`` rounding+clipping error on the
        sample). ``signed_part``: ``"pos"`` to search the positive side only (GELU input)."""
        top = self.pos if signed_part == "pos" else self.absmax
        if method == "max" or top <= 0:
            return top
        v = self.values()
        if signed_part == "pos":
            v = v.clamp(min=0)
        if method.startswith("p"):
            q = float(method[1:]) / 100.0
            a = v.abs()
            return min(top, float(torch.quantile(a[:1 << 24], q))) if a.numel() else top
        if method == "mse":
            lim = (1 << (bits - 1)) - 1
            best, best_err = top, None
            for frac in np.linspace(0.2, 1.0, 41):
                c = top * frac
                q = torch.clamp(torch.round(v / (c / lim)), -lim, lim) * (c / lim)
                err = float(((q - v) ** 2).sum())
                if best_err is None or err < best_err:
                    best, best_err = c, err
            return best
        raise ValueError(f"calibration method must be 'max', 'mse' or 'pNN' (e.g. 'p99.99'), not {method!r}")


def _heads(t, heads):
    B, N, C = t.shape
    return t.reshape(B, N, heads, C // heads).transpose(1, 2)


@torch.no_grad()
def calibrate(model, images):
    """Run the float encoder over ``images`` for every task and return the ranges at each quant point.

    The walk below follows :class:`reference.model.Encoder` step by step (it reuses its modules) so
    that it can observe values the modules do not return, e.g. the attention context before ``proj``
    and expert hidden activations. ``tests/test_quantize.py`` checks it reproduces the encoder output.
    """
    from collections import defaultdict
    enc = model.backbone
    cfg = enc.cfg
    ranges = defaultdict(_Range)
    ranges["img"].add(images)
    finals = []
    for task in range(cfg.num_tasks):
        x = enc.embed(images)
        ranges["res"].add(x)
        task_repr = enc.task_repr(task)
        for i, blk in enumerate(enc.blocks):
            h1 = blk.norm1(x)
            ranges[f"{i}.ln1"].add(h1)
            q, k, v = blk.attn.qkv(h1).chunk(3, dim=-1)
            for name, t in (("q", q), ("k", k), ("v", v)):
                ranges[f"{i}.{name}"].add(t)
            qh, kh, vh = (_heads(t, cfg.heads) for t in (q, k, v))
            attn = ((qh @ kh.transpose(-2, -1)) * cfg.head_dim ** -0.5).softmax(-1)
            ctx = (attn @ vh).transpose(1, 2).reshape(x.shape)
            ranges[f"{i}.ctx"].add(ctx)
            x = x + blk.attn.proj(ctx)
            ranges["res"].add(x)
            h2 = blk.norm2(x)
            ranges[f"{i}.ln2"].add(h2)
            if not blk.moe:
                pre = blk.mlp.fc1(h2)
                ranges[f"{i}.pre"].add(pre)
                ranges[f"{i}.gelu"].add(F.gelu(pre))
                x = x + blk.mlp.fc2(F.gelu(pre))
            else:
                gate_index = task if cfg.router == "multi_gate" else 0
                out, r = blk.mlp(h2, blk.gate_input(h2, task_repr), gate_index, return_routing=True)
                flat = h2.reshape(-1, cfg.dim)
                sel = r.experts.reshape(-1, cfg.top_k)
                ex = blk.mlp.experts
                for e in sel.unique().tolist():
                    toks = (sel == e).any(-1)
                    pre = F.linear(flat[toks], ex.htoh4.weight[e], ex.htoh4.bias[e])
                    ranges[f"{i}.pre"].add(pre)
                    ranges[f"{i}.gelu"].add(F.gelu(pre))
                x = x + out
            ranges["res"].add(x)
        finals.append(x)
    return dict(ranges), finals


# --------------------------------------------------------------------------------------------------
# Quantization

def _np(t):
    return t.detach().cpu().double().numpy()


@dataclass(frozen=True)
class PixelInput:
    """The encoder takes uint8 camera pixels: the int8 input is ``p - 128`` (the pixel with its top bit
    flipped) and the per-channel normalisation ``(p / 255 - mean) / std`` is folded into the
    patch-embedding weights and bias. Stored as ``QuantizedEncoder.img_scale`` so that
    ``quantize_image(img, qm.img_scale)`` works for either input format."""
    mean: tuple
    std: tuple


#: Methods :func:`quantize` applies by default, chosen by measurement (``docs/numerics.md`` §9).
DEFAULTS = dict(pixel_input=True, drop_k_bias=True, calib="mse", smooth_alpha=None, gelu_bits=8, router_h_bits=8,
                weight_clip="max", calib_sites=("pre", "gelu"), ln_bits=8, gelu_code="u8")


def _smooth(model, ranges, alpha):
    """SmoothQuant, folded exactly into the float model: per channel ``c`` of a LayerNorm output,
    ``s_c = a_c**alpha / w_c**(1 - alpha)`` (``a_c`` calibrated max |x_c|, ``w_c`` max |W[:, c]| over
    every consumer), the LayerNorm gain and bias divided by ``s_c``, every consumer's column ``c``
    multiplied by it. The float function is unchanged; the int8 LayerNorm output gets flatter channels."""
    enc = model.backbone
    D = enc.cfg.dim
    for i, blk in enumerate(enc.blocks):
        # Consumers: linear weights [..., out, D] (input channels on the last axis) and gates [D_in, E]
        # (token channels on the first D rows).
        sites = [(blk.norm1, f"{i}.ln1", [blk.attn.qkv.weight], [])]
        if blk.moe:
            sites.append((blk.norm2, f"{i}.ln2", [blk.mlp.experts.htoh4.weight], [g.w_gate for g in blk.mlp.gate]))
        else:
            sites.append((blk.norm2, f"{i}.ln2", [blk.mlp.fc1.weight], []))
        for norm, key, linears, gates in sites:
            a = ranges[key].chan.clamp_min(1e-5)
            w = torch.zeros(D, dtype=torch.float64)
            for wt in linears:
                w = torch.maximum(w, wt.detach().double().abs().reshape(-1, D).amax(0))
            for wt in gates:
                w = torch.maximum(w, wt.detach().double()[:D].abs().amax(1))
            sc = (a ** alpha / w.clamp_min(1e-5) ** (1 - alpha)).clamp(1e-2, 1e2)
            norm.weight.div_(sc.to(norm.weight.dtype))
            norm.bias.div_(sc.to(norm.bias.dtype))
            for wt in linears:
                wt.mul_(sc.to(wt.dtype))
            for wt in gates:
                wt[:D].mul_(sc.to(wt.dtype).unsqueeze(1))


@torch.no_grad()
def quantize(model, calib_images, *, pixel_input=DEFAULTS["pixel_input"], drop_k_bias=DEFAULTS["drop_k_bias"],
             calib=DEFAULTS["calib"], smooth_alpha=DEFAULTS["smooth_alpha"], gelu_bits=DEFAULTS["gelu_bits"],
             router_h_bits=DEFAULTS["router_h_bits"], weight_clip=DEFAULTS["weight_clip"],
             calib_sites=DEFAULTS["calib_sites"], ln_bits=DEFAULTS["ln_bits"], gelu_code=None):
    """Quantize ``model``'s encoder, calibrating on ``calib_images`` [B,3,H,W] over every task.

    Parameters
    ----------
    model : M3ViT
        Left unchanged (the exact float rewrites below act on a copy).
    calib_images : torch.Tensor
        Normalised float images (``reference.inputs.normalize_pixels`` of uint8 pixels).
    pixel_input : bool
        Take uint8 pixels (``PixelInput``) instead of a symmetric int8 quantization of the normalised image.
    drop_k_bias : bool
        Zero the ``k`` bias: ``q . b_k`` is constant along a softmax row, so this is exact, and the k range
        no longer has to hold the bias (up to 50 on real weights).
    calib : str
        Activation range per site: ``max``, ``mse`` or a percentile ``pNN.NN`` of |x| (see ``_Range.clip``).
        The residual stream always uses ``max`` (int16 has headroom to spare).
    calib_sites : tuple of str
        The per-block sites that use ``calib`` (the others use ``max``): ``ln1 q k v ctx ln2 pre gelu``.
    smooth_alpha : float or None
        SmoothQuant migration strength for the LayerNorm outputs (None: off).
    gelu_bits : int
        8 to 16: the GELU table gives ``gelu_bits``-bit outputs (scale ``s_gelu / 2^(gelu_bits-8)``) and
        fc2 reads them (two byte-plane passes in hardware above 8). Measured, not in the RTL
        (``docs/numerics.md`` §9.4, §9.6).
    gelu_code : str or None
        ``u8`` (the spec, ``docs/numerics.md`` §3): the GELU output as a uint8 code ``u`` with a zero
        point ``z``, ``a = s'(u - z)`` (GELU >= -0.17 needs only a few negative codes, so the step is
        about half the int8 one); fc2 reads ``u`` with the unsigned-A flag and ``-z * sum(W)`` is folded
        into its bias. ``s8``: the former int8 GELU output (golden only: the RTL's fc2 reads uint8, and
        its image packers reject a negative table entry). ``None``: ``DEFAULTS["gelu_code"]`` with
        ``gelu_bits=8``, ``s8`` (the signed wide code) above 8 bits.
    router_h_bits : int
        8, or 16: the router reads a 16-bit LN2 output (the same LayerNorm rounded 8 bits later,
        ``QMoE.router_h_shift = 8``). Measured, not in the RTL.
    weight_clip : str
        ``max`` or ``mse``: the per-output-channel weight range (MSE: the clip minimising each row's error).
    ln_bits : int
        8, or 16: both LayerNorm outputs are int16 (the int8 range with 256x finer steps) and the GEMMs
        that read them (qkv, fc1 / expert htoh4, the router) take a 16-bit A operand: two byte-plane
        passes in hardware. Measured, not in the RTL (``docs/numerics.md`` §9.6).
    """
    if weight_clip not in ("max", "mse"):
        raise ValueError(f"weight_clip must be 'max' or 'mse', not {weight_clip!r}")
    if gelu_code is None:
        gelu_code = DEFAULTS["gelu_code"] if gelu_bits == numerics.ACT_BITS else "s8"
    return _quantize(model, calib_images, pixel_input, drop_k_bias, calib, smooth_alpha, gelu_bits,
                     router_h_bits, weight_clip, tuple(calib_sites), ln_bits, gelu_code)


def _quantize(model, calib_images, pixel_input, drop_k_bias, calib, smooth_alpha, gelu_bits, router_h_bits,
              weight_clip, calib_sites, ln_bits=8, gelu_code="s8"):
    qlin = functools.partial(_qlinear, weight_clip=weight_clip)
    if not isinstance(gelu_bits, int) or not 8 <= gelu_bits <= 16:
        raise ValueError(f"gelu_bits must be an int in [8, 16], not {gelu_bits!r}")
    if router_h_bits not in (8, 16):
        raise ValueError(f"router_h_bits must be 8 or 16, not {router_h_bits!r}")
    if gelu_code not in ("s8", "u8") or gelu_code == "u8" and gelu_bits != 8:
        raise ValueError(f"gelu_code must be 's8' or 'u8' (u8 with gelu_bits=8), not {gelu_code!r} "
                         f"with gelu_bits={gelu_bits}")
    if ln_bits not in (8, 16):
        raise ValueError(f"ln_bits must be 8 or 16, not {ln_bits!r}")
    if ln_bits == 16:
        router_h_bits = 16       # the router reads the (16-bit) LN2 output
    import copy
    if drop_k_bias or smooth_alpha is not None:
        model = copy.deepcopy(model)
    enc = model.backbone
    cfg = enc.cfg
    D = cfg.dim
    if drop_k_bias:
        for blk in enc.blocks:
            blk.attn.qkv.bias[D:2 * D] = 0.0
    ranges, _ = calibrate(model, calib_images)
    if smooth_alpha is not None:
        _smooth(model, ranges, smooth_alpha)
        ranges, _ = calibrate(model, calib_images)
    s_res = _scale(ranges["res"].absmax * RES_HEADROOM, numerics.RES_BITS)

    w_pe = _np(enc.patch_embed.proj.weight).reshape(cfg.dim, -1)
    b_pe = _np(enc.patch_embed.proj.bias)
    if pixel_input:
        from .inputs import pixel_normalization
        mean_t, std_t = pixel_normalization(cfg.in_chans)
        mean, std = mean_t.reshape(-1).numpy(), std_t.reshape(-1).numpy()
        per_in = np.repeat(np.arange(cfg.in_chans), cfg.patch_size * cfg.patch_size)
        # x = (p/255 - m)/s = (v + 128)/(255 s) - m/s with v = p - 128: fold both into w and b.
        w_px = w_pe / (255.0 * std[per_in])
        b_px = b_pe + w_px @ np.full(w_px.shape[1], 128.0) - w_pe @ (mean[per_in] / std[per_in])
        patch = qlin(w_px, b_px, 1.0, s_res, numerics.RES_BITS)
        s_img = PixelInput(tuple(float(v) for v in mean), tuple(float(v) for v in std))
    else:
        s_img = _scale(ranges["img"].absmax, numerics.ACT_BITS)
        patch = qlin(w_pe, b_pe, s_img, s_res, numerics.RES_BITS)
    scales = {"img": s_img, "res": s_res,
              "options": dict(pixel_input=pixel_input, drop_k_bias=drop_k_bias, calib=calib,
                              smooth_alpha=smooth_alpha, gelu_bits=gelu_bits, router_h_bits=router_h_bits,
                              weight_clip=weight_clip, calib_sites=calib_sites, ln_bits=ln_bits,
                              gelu_code=gelu_code)}
    lo, hi = numerics.int_range(numerics.RES_BITS)
    pos = _np(enc.pos_embed)[0]
    pos_int = np.clip(np.round(pos / s_res), lo, hi).astype(np.int64)
    cls_int = np.clip(np.round((_np(enc.cls_token)[0, 0] + pos[0]) / s_res), lo, hi).astype(np.int64)

    blocks = []
    for i, blk in enumerate(enc.blocks):
        sc = {n: _scale(ranges[f"{i}.{n}"].clip(calib if n in calib_sites else "max"), numerics.ACT_BITS)
              for n in ("ln1", "q", "k", "v", "ctx", "ln2", "gelu")}
        pre = ranges[f"{i}.pre"]
        pre_pos = pre.clip(calib if "pre" in calib_sites else "max", signed_part="pos")
        sc["pre"] = _scale(max(pre_pos, min(pre.neg, GELU_NEG_CLIP)), numerics.ACT_BITS)
        scales[i] = sc

        ln1 = _qlayernorm(_np(blk.norm1.weight), _np(blk.norm1.bias), cfg.ln_eps, cfg.dim, s_res, sc["ln1"],
                          ln_bits)
        ln2 = _qlayernorm(_np(blk.norm2.weight), _np(blk.norm2.bias), cfg.ln_eps, cfg.dim, s_res, sc["ln2"],
                          ln_bits)
        # GEMMs reading a LayerNorm output see its step: s_ln / 2^(ln_bits - 8).
        s_ln1 = sc["ln1"] / (1 << (ln_bits - numerics.ACT_BITS))
        s_ln2 = sc["ln2"] / (1 << (ln_bits - numerics.ACT_BITS))

        # qkv: one GEMM, three output scales (q|k|v rows), folded into the per-channel multipliers.
        w_qkv, b_qkv = _np(blk.attn.qkv.weight), _np(blk.attn.qkv.bias)
        wq, ws = _quant_weight(w_qkv, weight_clip=weight_clip)
        out_scale = np.repeat([sc["q"], sc["k"], sc["v"]], cfg.dim)
        acc_scale = s_ln1 * ws
        mult, shift = _mult_shift(acc_scale / out_scale, numerics.MULT_BITS)
        bias = np.clip(np.round(b_qkv / acc_scale), *numerics.int_range(numerics.BIAS_BITS)).astype(np.int64)
        qkv = QLinear(wq, bias, mult, shift, numerics.ACT_BITS)
        c_mult, c_shift = _softmax_mult(sc["q"] * sc["k"] * cfg.head_dim ** -0.5 * math.log2(math.e)
                                        * (1 << numerics.EXP_FRAC_BITS))
        o_mult, o_shift = _mult_shift(np.array([sc["v"] / sc["ctx"]]), numerics.AV_OUT_MULT_BITS)
        proj = qlin(_np(blk.attn.proj.weight), _np(blk.attn.proj.bias), sc["ctx"], s_res, numerics.RES_BITS)
        attn = QAttention(qkv, c_mult, c_shift, int(o_mult[0]), o_shift, proj)

        # A 16-bit GELU output keeps the scale's range with 256x finer steps.
        s_gelu_out = sc["gelu"] / (1 << (gelu_bits - numerics.ACT_BITS))
        zero = 0
        if gelu_code == "u8":
            # uint8 code with a zero point: the range [-neg, pos] over 255 steps (pos searched on that grid).
            g = ranges[f"{i}.gelu"]
            pos = g.clip(calib if "gelu" in calib_sites else "max", bits=9, signed_part="pos")
            s_gelu_out = max(pos + g.neg, 1e-12) / 255.0
            zero = int(round(g.neg / s_gelu_out))
            sc["gelu_u8"] = (s_gelu_out, zero)
            lut = np.clip(_gelu_lut(sc["pre"], s_gelu_out, 16) + zero, 0, 255)
        else:
            lut = _gelu_lut(sc["pre"], s_gelu_out, gelu_bits)
        if not blk.moe:
            mlp = QDenseMlp(qlin(_np(blk.mlp.fc1.weight), _np(blk.mlp.fc1.bias), s_ln2, sc["pre"],
                                     numerics.ACT_BITS),
                            lut,
                            _fold_zero(qlin(_np(blk.mlp.fc2.weight), _np(blk.mlp.fc2.bias), s_gelu_out, s_res,
                                            numerics.RES_BITS), zero))
        else:
            mlp = _quantize_moe(enc, blk, cfg, sc, s_res, lut, s_gelu_out, router_h_bits - numerics.ACT_BITS,
                                weight_clip, s_ln2)
            mlp.fc2 = _fold_zero(mlp.fc2, zero)
        blocks.append(QBlock(ln1, attn, ln2, mlp))
    return QuantizedEncoder(cfg, s_img, s_res, patch, cls_int, pos_int, blocks, scales)


def _fold_zero(q, zero):
    """A GEMM whose A operand is ``u - zero``: ``sum (u - z) w = sum u w - z sum w``, the constant folded
    into the bias (exact)."""
    if zero:
        lo, hi = numerics.int_range(numerics.BIAS_BITS)
        q.bias = np.clip(q.bias - zero * q.w.sum(-1), lo, hi)
    return q


def _quantize_moe(enc, blk, cfg, sc, s_res, lut, s_gelu_out, router_h_shift, weight_clip, s_h=None):
    """``s_h``: the step of the LN2 output the experts read (``sc["ln2"]`` unless ``ln_bits=16``)."""
    qlin = functools.partial(_qlinear, weight_clip=weight_clip)
    ex = blk.mlp.experts
    s_h = sc["ln2"] if s_h is None else s_h
    fc1 = qlin(_np(ex.htoh4.weight), _np(ex.htoh4.bias), s_h, sc["pre"], numerics.ACT_BITS)
    fc2 = qlin(_np(ex.h4toh.weight), _np(ex.h4toh.bias), s_gelu_out, s_res, numerics.RES_BITS)
    gates, c_mults, c_shifts = [], [], []
    task_bias = np.zeros((cfg.num_tasks, cfg.experts), dtype=np.int64)
    for g, gate in enumerate(blk.mlp.gate):
        w = _np(gate.w_gate)                       # [gate_in, E]
        w_tok = w[:cfg.dim]
        # One scale per gate over the token rows: logits of all experts share it (top-k compares them).
        wq, ws = _quant_weight(w_tok.T, per_channel=False)
        gates.append(wq.T)
        logit_scale = sc["ln2"] / (1 << router_h_shift) * ws
        m, s = _softmax_mult(logit_scale * math.log2(math.e) * (1 << numerics.EXP_FRAC_BITS))
        c_mults.append(m)
        c_shifts.append(s)
        if cfg.router == "task_embedding":
            # The task representation is constant per task, so its share of the logits is a constant
            # per-task offset, computed once here in float and stored at the logit scale.
            for t in range(cfg.num_tasks):
                rep = _np(enc.task_repr(t))
                task_bias[t] = np.round(rep @ w[cfg.dim:] / logit_scale).astype(np.int64)
    lo, hi = numerics.int_range(numerics.ACC_BITS)
    task_bias = np.clip(task_bias, lo, hi)
    return QMoE(gates, task_bias, c_mults, c_shifts, fc1, lut, fc2, router_h_shift)


def quantize_image(img, img_scale):
    """Host-side input conversion to the encoder's int8 input (numpy int64).

    ``img_scale`` is ``QuantizedEncoder.img_scale``: a :class:`PixelInput` (the default) turns a
    normalised float image [..., C, H, W] back into its uint8 pixels and returns ``p - 128``; uint8
    pixels are taken as they are. A float scale (``pixel_input=False``) quantizes the normalised
    image symmetrically to int8.
    """
    if isinstance(img_scale, PixelInput):
        if isinstance(img, torch.Tensor) and not img.is_floating_point() or \
                isinstance(img, np.ndarray) and img.dtype == np.uint8:
            p = np.asarray(img, dtype=np.int64)
        else:
            x = img.detach().cpu().double().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, float)
            shape = (-1, 1, 1)
            p = np.round(255.0 * (x * np.array(img_scale.std).reshape(shape) + np.array(img_scale.mean).reshape(shape)))
        return np.clip(p, 0, 255).astype(np.int64) - 128
    x = img.detach().cpu().double().numpy() if isinstance(img, torch.Tensor) else np.asarray(img, float)
    return np.clip(np.round(x / img_scale), -127, 127).astype(np.int64)
