"""A config that validates elaborates: every preset's configs build every sub-layer unit.

``Fragment.get`` elaborates the whole hierarchy (the engine, buffers, streamers, score path, ...), so a
buffer, row table or address field the config sized too small would fail here. The per-unit bit-exact
tests run small configs; this one runs the real preset sizes (W2 takes a few seconds per unit):
the ``small`` sizing of every preset in the default suite, the device sizing (W1's default) as
``slow``.
``MoELayer`` is elaborated for every preset by ``test_moe_layer.py::test_every_preset_elaborates``;
``NormMlp`` holds ``DenseLayer``'s whole datapath (engine, buffers, ``DenseSequencer``) plus the
``NormStage``, so ``DenseLayer`` itself is not repeated here.
"""

import time

import pytest
from amaranth.hdl import Fragment

from m3vit_hw.attention import AttentionLayer
from m3vit_hw.attention.attn_layout import buffer_map
from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.dense import NormMlp, PatchEmbed
from m3vit_hw.dense.dense_layout import dense_buffer_map
from m3vit_hw.dense.embed_layout import embed_buffer_map

PRESETS = ["tiny", "tiny-task-embedding", "vit-tiny-cityscapes", "vit-small-nyud"]
UNITS = {"attention": AttentionLayer, "norm_mlp": NormMlp, "patch_embed": PatchEmbed}


@pytest.mark.parametrize("name", PRESETS)
def test_buffer_maps_fit_the_config(name):
    """The unit buffer maps fit the buffers the config derived (they read the same properties)."""
    cfg = AcceleratorConfig.from_preset(name)
    bm = buffer_map(cfg)
    assert bm.act_words <= cfg.act_buffer_words
    assert bm.rowtab_words <= cfg.rowtab_entries
    assert bm.score_buffer_words <= 1 << cfg.dst_addr_bits
    assert dense_buffer_map(cfg).act_words <= cfg.act_buffer_words
    assert embed_buffer_map(cfg).act_words <= cfg.act_buffer_words
    sizes = {user: need for user, (need, _) in cfg.act_buffer_needs.items()}
    print(f"{name}: act_buffer_bytes {cfg.act_buffer_bytes}, needs {sizes}, row table "
          f"{cfg.rowtab_entries} entries, e8 bank {bm.e8_words * cfg.act_word_bytes} B, score buffer "
          f"{bm.score_buffer_words * cfg.pe_cols * 4} B, dense token tile {dense_buffer_map(cfg).token_tile}, "
          f"patch tile {embed_buffer_map(cfg).patch_tile}")


@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_elaborates(name, unit):
    """The small sizing of every preset (W1's default is device-sized: the slow test below)."""
    cfg = AcceleratorConfig.from_preset(name, sizing="small")
    t0 = time.process_time()
    Fragment.get(UNITS[unit](cfg), None)
    print(f"{name} {unit}: elaborated in {time.process_time() - t0:.2f} s CPU")


@pytest.mark.slow
@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("name", ["vit-tiny-cityscapes", "vit-small-nyud"])
def test_device_sized_presets_elaborate(name, unit):
    """The device-sized configs (32 x 64, two MACs per DSP) elaborate every sub-layer unit."""
    cfg = AcceleratorConfig.from_preset(name, sizing="device")
    t0 = time.process_time()
    Fragment.get(UNITS[unit](cfg), None)
    print(f"{name} device-sized {unit}: elaborated in {time.process_time() - t0:.2f} s CPU")
