"""AcceleratorConfig: validation (every error names its parameter), derived sizes, presets."""

import pytest

from m3vit_hw import numerics
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.onchip import budget, buffer_report
from m3vit_hw.control.onchip import fits as onchip_fits
from m3vit_hw.model_config import ModelConfig, preset


def _tiny(**kw):
    return AcceleratorConfig.from_preset("tiny", **kw)


@pytest.mark.parametrize("name", ["vit-tiny-cityscapes", "vit-small-nyud", "tiny", "tiny-task-embedding"])
def test_presets_build(name):
    cfg = AcceleratorConfig.from_preset(name)
    assert cfg.model.name == name
    assert cfg.token_capacity == cfg.model.tokens
    text = cfg.describe()
    assert cfg.model.name in text and "MAC/cycle" in text and "\n" in text
    print(text)


def test_w1_w2_figures():
    w1 = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    # Issue 12: the W1 default is device-sized, >= 2,048 MAC/cycle from 1,024 DSP48E2s.
    assert (w1.pe_rows, w1.pe_cols, w1.pe_pack, w1.macs_per_cycle, w1.pe_dsps) == (32, 64, 2, 2048, 1024)
    small = AcceleratorConfig.from_preset("vit-tiny-cityscapes", sizing="small")
    assert (small.pe_rows, small.pe_cols, small.pe_pack, small.macs_per_cycle) == (16, 16, 1, 256)
    assert w1.largest_k == 768                       # patch_dim = fc2's 4D = 768
    # One whole expert (fc1 + fc2, int8) per half: 2 * 192 * 384 bytes.
    assert w1.weight_buffer_half_bytes == 2 * 192 * 384 == w1.expert_weight_bytes
    assert w1.weight_buffer_bytes == 2 * w1.weight_buffer_half_bytes
    w2 = AcceleratorConfig.from_preset("vit-small-nyud")
    assert w2.largest_k == 1536                      # fc2 K = 4D
    assert w2.token_capacity == 1201
    worst, what, _ = w2.worst_case_acc
    # fc2 reads uint8 GELU codes: its K = 1536 is the worst uint8 x int8 sum (AV's K is 1201).
    assert worst == 255 * 128 * 1536 and "fc2" in what and "uint8" in what
    assert w2.worst_case_acc[0] < (1 << (numerics.ACC_BITS - 1))


@pytest.mark.parametrize("name", ["vit-tiny-cityscapes", "vit-small-nyud"])
def test_device_sized_presets(name):
    """The device-sized W1/W2 configs: >= 2,048 MAC/cycle from <= 1,024 DSP48E2s (>= 1,024 used)."""
    cfg = AcceleratorConfig.from_preset(name, sizing="device")
    assert cfg.macs_per_cycle >= 2048 and cfg.pe_dsps == 1024
    assert cfg.pe_dsps == cfg.pe_rows * cfg.pe_cols // cfg.pe_pack
    default = AcceleratorConfig.from_preset(name)
    assert default == cfg                                           # both defaults are device-sized
    # ... and their on-chip buffers fit within 80 % of the part's BRAM36 and URAM.
    assert onchip_fits(buffer_report(cfg, budget()), budget())[2]
    print(cfg.describe())


def test_act_holds_dense():
    """``act_holds_dense`` sizes the derived activation buffer for a one-tile dense MLP (each block's MLP
    weights fetched once); W1's default uses it, and keeps it when the model changes."""
    from m3vit_hw.dense.dense_layout import dense_buffer_map
    w1 = AcceleratorConfig.from_preset("vit-tiny-cityscapes")
    assert w1.act_holds_dense and w1.act_buffer_bytes == w1.dense_act_full_words * w1.act_word_bytes
    assert dense_buffer_map(w1).token_tile >= w1.token_capacity
    lean = w1.with_(act_holds_dense=False)
    assert lean.act_buffer_bytes < w1.act_buffer_bytes
    assert dense_buffer_map(lean).token_tile < lean.token_capacity      # two token tiles without it
    wider = AcceleratorConfig.from_preset("vit-tiny-cityscapes", dim=256, heads=4)
    assert dense_buffer_map(wider).token_tile >= wider.token_capacity
    # An explicit size wins (it only has to hold the legal minimum).
    assert w1.with_(act_buffer_bytes=lean.act_buffer_bytes).act_buffer_bytes == lean.act_buffer_bytes
    with pytest.raises(TypeError, match="act_holds_dense must be a bool, not 1"):
        AcceleratorConfig.from_preset("tiny", act_holds_dense=1)


def test_bad_sizing():
    with pytest.raises(ValueError, match=r"sizing must be one of \['default', 'device', 'small'\], not 'big'"):
        AcceleratorConfig.from_preset("tiny", sizing="big")
    with pytest.raises(ValueError, match="sizing='device' has presets"):
        AcceleratorConfig.from_preset("tiny", sizing="device")


def test_epilogue_lanes():
    """``epi_lanes`` defaults to ``pe_cols`` and is derived again when the array changes; the drain
    of a PE row takes ``pe_cols / epi_lanes`` beats."""
    cfg = _tiny()
    assert (cfg.epi_lanes, cfg.epi_beats, cfg.epi_hidden_min_k) == (4, 1, 8)
    wide = cfg.with_(pe_cols=8)
    assert (wide.epi_lanes, wide.epi_beats) == (8, 1)
    narrow = cfg.with_(pe_cols=8, epi_lanes=2)
    assert (narrow.epi_lanes, narrow.epi_beats, narrow.epi_hidden_min_k) == (2, 4, 4 * 4 + 4)
    assert "epilogue lanes 2" in narrow.describe()


def test_formats_come_from_numerics():
    cfg = _tiny()
    assert (cfg.act_bits, cfg.weight_bits, cfg.acc_bits, cfg.res_bits) == \
        (numerics.ACT_BITS, numerics.WEIGHT_BITS, numerics.ACC_BITS, numerics.RES_BITS)


def test_derived_sizes():
    cfg = _tiny(pe_rows=3, pe_cols=8, token_capacity=20)
    assert cfg.macs_per_cycle == 24
    assert cfg.act_word_lanes == 8 and cfg.act_word_bytes == 8
    assert cfg.act_buffer_bytes == -(-cfg.act_buffer_min_bytes // 8) * 8
    assert cfg.act_buffer_min_bytes == max(n for n, _ in cfg.act_buffer_needs.values())
    # The tiny preset's 16x16x3 patches make the patch embedding's two slots the largest user:
    # 2 slots x pe_rows=3 rows x ceil(768 / 8) words x 8 B.
    assert cfg.act_buffer_min_bytes == cfg.act_buffer_needs["embed"][0] == 2 * 3 * 96 * 8
    assert cfg.res_buffer_words == 20 * 4
    assert cfg.weight_panel_bytes == cfg.largest_weight_k * 8
    # The default weight buffer grows to two panels when one expert is smaller than a panel.
    assert cfg.weight_buffer_half_bytes == max(cfg.weight_panel_bytes, cfg.expert_weight_bytes)
    assert cfg.b_addr_bits == 1 + max(cfg.weight_addr_bits, cfg.act_addr_bits)
    assert cfg.q_tile == 3
    assert cfg.rowtab_entries == max(20 * cfg.model.top_k, 2 * 3)    # MoE rows, two attention q tiles
    assert cfg.largest_n == max(3 * 32, 128, 64, 20, 64)


def test_equality_repr_and_overrides():
    a = _tiny()
    b = AcceleratorConfig(model=preset("tiny"), pe_rows=4, pe_cols=4, weight_buffer_bytes=8192)
    assert a.weight_buffer_bytes == 8192                    # the default: one 4 KiB expert per half
    assert a == b and hash(a) == hash(b)
    assert a != _tiny(pe_rows=2)
    assert "pe_rows=4" in repr(a) and "AcceleratorConfig(" in repr(a)
    c = _tiny(experts=8, top_k=3)                   # model fields go to the model
    assert c.model.experts == 8 and c.model.top_k == 3
    assert a.with_(clock_mhz=250).clock_mhz == 250
    # Derived sizes follow the change; explicit ones stay.
    bigger = a.with_(token_capacity=80)
    assert bigger.act_buffer_bytes >= bigger.act_buffer_min_bytes > a.act_buffer_bytes
    assert bigger == _tiny(token_capacity=80)
    fixed = _tiny(act_buffer_bytes=8192).with_(token_capacity=20)
    assert fixed.act_buffer_bytes == 8192
    with pytest.raises(AttributeError):
        a.pe_rows = 8                                # frozen


@pytest.mark.parametrize("kwargs,exc,name", [
    # model (validated by ModelConfig, reached through from_preset overrides)
    (dict(experts=0), ValueError, "experts"),
    (dict(top_k=5), ValueError, "top_k"),
    (dict(heads=3), ValueError, "heads"),
    # array
    (dict(pe_rows=0), ValueError, "pe_rows"),
    (dict(pe_rows=2.5), TypeError, "pe_rows"),
    (dict(pe_cols=-4), ValueError, "pe_cols"),
    (dict(pe_cols=True), TypeError, "pe_cols"),
    # tokens and tiles
    (dict(token_capacity=8), ValueError, "token_capacity"),
    (dict(q_tile=10), ValueError, "q_tile"),
    (dict(q_tile=0), ValueError, "q_tile"),
    (dict(ln_lanes=0), ValueError, "ln_lanes"),
    (dict(softmax_lanes="4"), TypeError, "softmax_lanes"),
    (dict(epi_lanes=0), ValueError, r"epi_lanes must be in \[1, 4\], not 0"),
    (dict(epi_lanes=8), ValueError, r"epi_lanes must be in \[1, 4\], not 8"),
    (dict(epi_lanes=3), ValueError, r"epi_lanes must divide pe_cols=4 .*not 3; allowed: \[1, 2, 4\]"),
    (dict(epi_lanes=2.0), TypeError, "epi_lanes must be an integer"),
    # accumulator: AV over too many tokens (uint8 x int8), and a too-long int8 reduction
    (dict(token_capacity=70000), ValueError, "token_capacity=70000"),
    (dict(dim=131072 // 4, heads=1, mlp_hidden=131072 * 2), ValueError, "mlp_hidden"),
    # buffers
    (dict(act_buffer_bytes=1000), ValueError, "act_buffer_bytes"),
    (dict(act_buffer_bytes=1010), ValueError, "act_buffer_bytes"),
    (dict(weight_buffer_bytes=4096), ValueError, "weight_buffer_bytes"),
    (dict(weight_buffer_bytes=8196), ValueError, "weight_buffer_bytes"),
    (dict(param_buffer_words=0), ValueError, "param_buffer_words"),
    (dict(clock_mhz=0), ValueError, "clock_mhz"),
    # memory system and counters
    (dict(mem_addr_width=0), ValueError, r"mem_addr_width must be in \[1, 64\], not 0"),
    (dict(mem_addr_width=10), ValueError, r"mem_addr_width must address a MoE layer's"),
    (dict(mem_data_bytes=24), ValueError, "mem_data_bytes must be a power of two"),
    (dict(mem_data_bytes=1.0), TypeError, "mem_data_bytes must be an integer"),
    (dict(mem_max_burst=512), ValueError, r"mem_max_burst must be in \[1, 256\]"),
    (dict(tile_tag_width=0), ValueError, r"tile_tag_width must be in \[1, 64\], not 0"),
    (dict(tile_tag_width=1), ValueError, r"tile_tag_width must number the gate"),
    (dict(arbiter_depth=300), ValueError, r"arbiter_depth must be in \[1, 256\], not 300"),
    (dict(counter_width=8), ValueError, r"counter_width must be in \[16, 64\], not 8"),
    (dict(gemm_desc_depth=1), ValueError, r"gemm_desc_depth must be in \[2, 16\], not 1"),
    (dict(pe_pack=3), ValueError, r"pe_pack must be in \[1, 2\], not 3"),
    (dict(pe_pack=1.0), TypeError, r"pe_pack must be an integer"),
    (dict(pe_pack=2, pe_cols=5), ValueError, r"pe_cols must be even with pe_pack=2"),
    (dict(expert_hidden=0), ValueError, r"expert_hidden must be an integer >= 1, not 0"),
    (dict(mlp_hidden=2.5), TypeError, r"mlp_hidden must be an integer"),
    (dict(clock_mhz="fast"), ValueError, "clock_mhz"),
])
def test_validation_names_the_parameter(kwargs, exc, name):
    with pytest.raises(exc, match=name) as info:
        _tiny(**kwargs)
    print(f"{kwargs}: {info.value}")


def test_messages_state_range_and_value():
    with pytest.raises(ValueError) as info:
        _tiny(pe_rows=0)
    assert "[1, 256]" in str(info.value) and "not 0" in str(info.value)
    with pytest.raises(ValueError) as info:
        _tiny(act_buffer_bytes=1000)
    msg = str(info.value)
    assert ">= 6144" in msg and "patch embedding" in msg and "not 1000" in msg
    with pytest.raises(ValueError) as info:
        _tiny(weight_buffer_bytes=4096)
    assert "weight panel" in str(info.value) and "6144" in str(info.value)
    with pytest.raises(ValueError) as info:
        _tiny(token_capacity=70000)
    assert "accumulator" in str(info.value) and "65793" in str(info.value)


def test_accumulator_bound_is_tight():
    """The largest legal AV K passes, one more token fails."""
    limit = ((1 << 31) - 1) // (255 * 128)
    big = dict(act_buffer_bytes=None)
    assert _tiny(token_capacity=limit, **big).worst_case_acc[0] <= (1 << 31) - 1
    with pytest.raises(ValueError, match="token_capacity"):
        _tiny(token_capacity=limit + 1, **big)


def test_buffer_needs_are_the_largest_user():
    """The activation buffer is sized for its largest user; the error names that user and the size.

    Attention needs h and the per-head padded context of every token, one head's Q|K|V (rows padded
    to whole tiles plus one row tile; at a multiple of its power-of-two range) and, at an aligned
    base, two e8 query tiles; the MoE layer
    every token's h row and hidden row; the dense MLP h and one row tile of hidden rows; the patch
    embedding two slots of one row tile of patch rows. With 8x8 patches and a wide expert (h = 8D)
    the MoE layer is the largest.
    """
    cfg = _tiny()
    needs = cfg.act_buffer_needs
    T, rw, hw, word = 9, 8, 4, 4                      # tiny: D=32, 2 heads of 16, 4x4 PEs
    qkv = (12 + 4) * 3 * hw                           # rows padded: round_up(9, 4) + 4
    # h and the context end at word 144; the Q|K|V region (192 words) starts at a multiple of 256.
    assert T * rw + T * 2 * hw == 144 and cfg.attn_qkv_base == 256 and cfg.attn_main_words == 256 + qkv
    e8_slot = 4 * 3                                   # q_tile 4 rows x ceil(9 / 4) words
    assert needs["attention"][0] == (448 + 2 * e8_slot) * word                   # e8 base 448
    assert needs["moe"][0] == 9 * (32 + 64)
    assert needs["dense"][0] == (12 * rw + 4 * 32) * word
    assert needs["embed"][0] == 2 * 4 * 192 * word
    assert cfg.act_buffer_min_bytes == max(n for n, _ in needs.values())
    wide = _tiny(expert_hidden=256, patch_size=8, img_size=(16, 32))
    assert wide.act_buffer_min_bytes == wide.act_buffer_needs["moe"][0] == 9 * (32 + 256)
    with pytest.raises(ValueError, match=r"act_buffer_bytes must be >= 2592 \(MoE layer: "
                                          r"token_capacity=9 x \(8 \+ 64\) words"):
        _tiny(expert_hidden=256, patch_size=8, img_size=(16, 32), act_buffer_bytes=1024)
    # The row table holds two attention query tiles when the MoE rows are fewer.
    few = _tiny(top_k=1, q_tile=9)
    assert few.rowtab_needs["attention"][0] == 2 * 12 and few.rowtab_entries == 24


def test_hidden_sizes_any_positive():
    """Hidden widths are fields (any size, h < D included); the ratios are a convenience constructor,
    and the presets keep their widths (4D dense, 2D experts)."""
    w1 = preset("vit-tiny-cityscapes")
    assert (w1.mlp_hidden, w1.expert_hidden) == (768, 384)
    small = w1.with_(expert_hidden=100, mlp_hidden=50)
    assert (small.mlp_hidden, small.expert_hidden) == (50, 100)
    assert w1.with_(dim=96).expert_hidden == 192                    # derived widths follow dim
    assert small.with_(dim=96).expert_hidden == 100                 # explicit ones stay
    r = ModelConfig.from_ratios(name="r", img_size=(32, 32), dim=24, depth=2, heads=2, experts=2,
                                top_k=1, mlp_ratio=3, moe_mlp_ratio=1)
    assert (r.mlp_hidden, r.expert_hidden) == (72, 24)
    with pytest.raises(ValueError, match="moe_mlp_ratio must be an integer >= 1, not 0"):
        ModelConfig.from_ratios(name="r", img_size=(32, 32), dim=24, depth=2, heads=2, experts=2,
                                top_k=1, moe_mlp_ratio=0)
    cfg = AcceleratorConfig.from_preset("tiny", expert_hidden=20)
    assert cfg.moe_hidden_words == 5


def test_bad_model_and_preset():
    with pytest.raises(TypeError, match="model"):
        AcceleratorConfig(model="tiny")
    with pytest.raises(ValueError, match="preset"):
        AcceleratorConfig.from_preset("vit-huge")
    with pytest.raises(TypeError, match="override"):
        AcceleratorConfig.from_preset("tiny", pe_rowz=4)
