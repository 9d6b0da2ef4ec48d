"""The register map's description, its generated C header and docs, the config ID, and the driver's
token unpacking (no simulation)."""

import re

import numpy as np
import pytest

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control.image_layout import output_row_bytes
from m3vit_hw.model_config import ModelConfig
from m3vit_hw.soc.regmap import (COUNTED_OPS, FIELDS, OFFSETS, REGISTERS, Field, Register, c_header, config_id,
                                 markdown, register)


def _cfg():
    model = ModelConfig(name="regmap", img_size=(8, 16), patch_size=4, dim=12, depth=2, heads=2, experts=2,
                        top_k=1, tasks=("a", "b"), task_channels=(1, 1), decoder_channels=8)
    return AcceleratorConfig(model=model, pe_rows=4, pe_cols=4)


def test_offsets_unique_and_word_aligned():
    offs = [r.offset for r in REGISTERS]
    assert len(set(offs)) == len(offs)
    assert all(o % 4 == 0 for o in offs)


def test_register_rejects_bad_access_and_overlap():
    with pytest.raises(ValueError, match="access must be one of"):
        Register("X", 0, "rx", "")
    with pytest.raises(ValueError, match="overlaps"):
        Register("X", 0, "rw", "", (Field("A", 0, 4), Field("B", 2, 4)))
    with pytest.raises(KeyError, match="no register 'NOPE'"):
        register("NOPE")


def test_c_header_lists_every_register_and_field():
    text = c_header(defines=[("CONFIG_ID", 0x1234ABCD, "config id")])
    for r in REGISTERS:
        m = re.search(rf"#define M3VIT_REG_{r.name} 0x([0-9A-F]+)u", text)
        assert m and int(m.group(1), 16) == r.offset, r.name
    for (reg, name), f in FIELDS.items():
        m = re.search(rf"#define M3VIT_{reg}_{name}_MASK 0x([0-9A-F]+)u", text)
        assert m and int(m.group(1), 16) == f.mask, (reg, name)
    assert "#define M3VIT_CONFIG_ID 0x1234ABCDu" in text
    for op in COUNTED_OPS:
        assert f"M3VIT_REG_OP_CYCLES_{op.name} " in text and f"M3VIT_REG_PE_CYCLES_{op.name} " in text
    md = markdown()
    assert all(f"| 0x{r.offset:03X} | {r.name} |" in md for r in REGISTERS)


def test_config_id_stable_and_sensitive():
    cfg = _cfg()
    a = config_id(cfg, axi_masters=1)
    assert a == config_id(cfg, axi_masters=1)
    assert a != config_id(cfg, axi_masters=2)
    assert a != config_id(cfg.with_(pe_rows=2), axi_masters=1)
    # The memory port is part of the config, so it changes the ID too.
    assert a != config_id(cfg.with_(mem_data_bytes=32), axi_masters=1)


def test_tokens_unpack_the_store_layout():
    """The driver reads the tokens where STORE writes them (program_executor.read_tokens' layout)."""
    from m3vit_hw.driver import unpack_tokens
    from sim.program_executor import read_tokens
    cfg = _cfg()
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, cfg.model.tokens * output_row_bytes(cfg) + 7).astype(np.uint8).tobytes()
    got = unpack_tokens(raw, cfg)
    assert got.shape == (cfg.model.tokens, cfg.model.dim)
    assert (got == read_tokens(raw, cfg, 0)).all()
    with pytest.raises(ValueError, match="raw must hold"):
        unpack_tokens(raw[:10], cfg)
