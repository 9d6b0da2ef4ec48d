"""The register map's description, its generated C header and docs, and the memory image (no simulation)."""

import re

import numpy as np
import pytest

from m3vit_hw.soc.image import ImageLayout, MAGIC, config_id, pack_image, pack_program, unpack_output
from m3vit_hw.soc.regmap import FIELDS, OFFSETS, REGISTERS, Field, Register, c_header, markdown, register
from sim.moe_layer import moe_config
from sim.moe_workload import make_moe_workload


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
    md = markdown()
    assert all(f"| 0x{r.offset:03X} | {r.name} |" in md for r in REGISTERS)


def test_config_id_stable_and_sensitive():
    cfg = moe_config(experts=4, top_k=2, dim=8, hidden=16, tokens=5, tasks=2)
    a = config_id(cfg, axi_masters=1)
    assert a == config_id(cfg, axi_masters=1)
    assert a != config_id(cfg, axi_masters=2)
    assert a != config_id(cfg.with_(pe_rows=2), axi_masters=1)
    # The memory port is part of the config, so it changes the ID too.
    assert a != config_id(cfg.with_(mem_data_bytes=32), axi_masters=1)


def test_image_round_trip():
    cfg = moe_config(experts=4, top_k=2, dim=8, hidden=16, tokens=5, tasks=2)
    wl = make_moe_workload(4, 2, 8, 16, 5, tasks=2, seed=0)
    lay = ImageLayout(cfg)
    prog = pack_program(wl["qmoe"], lay, 5, 0xDEADBEEF)
    assert len(prog) == lay.program_bytes and len(prog) % 16 == 0
    assert int.from_bytes(prog[:4], "little") == MAGIC
    assert int.from_bytes(prog[4:8], "little") == 0xDEADBEEF
    gelu = np.frombuffer(prog[lay.gelu_offset:lay.gelu_offset + 256], dtype="<i1")
    assert (gelu == wl["qmoe"].gelu_lut).all()
    img = pack_image(wl["h"], wl["x"], lay)
    x_back = unpack_output(img[lay.x_offset(5):], lay, 5)
    assert (x_back == wl["x"]).all()
    with pytest.raises(ValueError, match="tokens must be in"):
        pack_program(wl["qmoe"], lay, cfg.token_capacity + 1, 0)
