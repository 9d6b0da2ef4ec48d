# amaranth: UnusedElaboratable=no
"""The Verilog conversion cache (:mod:`sim.verilator.vcache`): hit, miss and invalidation.

The unit tests use a throw-away source tree and a counting ``convert``; the last test goes through
:class:`~sim.verilator.model.VerilatorModel` with a tiny top and checks that the second construction
neither converts nor compiles.
"""

import pytest

from sim.verilator import vcache
from sim.verilator.vcache import cached_verilog, design_key, source_digest


class _Counter:
    def __init__(self, text="module top(); endmodule\n"):
        self.calls, self.text = 0, text

    def __call__(self):
        self.calls += 1
        return self.text


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "a.py").write_text("X = 1\n")
    (root / "pkg" / "b.py").write_text("Y = 2\n")
    return root


def test_miss_then_hit(tmp_path, tree):
    conv = _Counter()
    text, info = cached_verilog("k1", conv, cache=tmp_path / "c", roots=[tree])
    assert (conv.calls, info["verilog_cached"]) == (1, False) and text == conv.text
    text2, info2 = cached_verilog("k1", conv, cache=tmp_path / "c", roots=[tree])
    assert (conv.calls, info2["verilog_cached"]) == (1, True) and text2 == conv.text
    assert info2["verilog_key"] == info["verilog_key"]
    # No temporary file is left beside the entry.
    assert [p.suffix for p in (tmp_path / "c" / "verilog").iterdir()] == [".sv"]


def test_other_key_misses(tmp_path, tree):
    conv = _Counter()
    cached_verilog("k1", conv, cache=tmp_path, roots=[tree])
    cached_verilog("k2", conv, cache=tmp_path, roots=[tree])
    assert conv.calls == 2


@pytest.mark.parametrize("edit", ["change", "add", "rename", "remove"])
def test_source_edit_invalidates(tmp_path, tree, edit):
    conv = _Counter()
    before = source_digest([tree])
    cached_verilog("k", conv, cache=tmp_path, roots=[tree])
    if edit == "change":
        (tree / "pkg" / "b.py").write_text("Y = 3\n")
    elif edit == "add":
        (tree / "pkg" / "c.py").write_text("")
    elif edit == "rename":
        (tree / "a.py").rename(tree / "a2.py")
    else:
        (tree / "pkg" / "b.py").unlink()
    assert source_digest([tree]) != before
    cached_verilog("k", conv, cache=tmp_path, roots=[tree])
    assert conv.calls == 2, f"{edit}: the stale entry was used"
    cached_verilog("k", conv, cache=tmp_path, roots=[tree])
    assert conv.calls == 2


def test_non_python_and_pycache_files_do_not_invalidate(tmp_path, tree):
    before = source_digest([tree])
    (tree / "notes.txt").write_text("x")
    (tree / "__pycache__").mkdir()
    (tree / "__pycache__" / "a.py").write_text("junk")
    assert source_digest([tree]) == before


def test_design_key_names_class_and_config():
    from sim.moe_layer import moe_config
    from m3vit_hw.moe.moe_layer import MoELayer
    from m3vit_hw.attention import AttentionLayer
    a = moe_config(experts=3, top_k=2, dim=8, hidden=16, tokens=6)
    b = moe_config(experts=3, top_k=2, dim=8, hidden=16, tokens=7)
    assert design_key(MoELayer, a) == design_key(MoELayer, moe_config(experts=3, top_k=2, dim=8,
                                                                       hidden=16, tokens=6))
    assert design_key(MoELayer, a) != design_key(MoELayer, b)
    assert design_key(MoELayer, a) != design_key(AttentionLayer, a)
    assert design_key(MoELayer, a, "probe") != design_key(MoELayer, a)
    with pytest.raises(TypeError, match="component_class must be a class"):
        design_key("MoELayer", a)


def test_default_roots_cover_the_generator():
    import m3vit_hw
    from pathlib import Path
    assert Path(m3vit_hw.__file__).resolve().parent in vcache.SOURCE_ROOTS
    assert Path(vcache.__file__).resolve().parent in vcache.SOURCE_ROOTS


def test_model_hit_skips_conversion(tmp_path, monkeypatch):
    """A second VerilatorModel of the same design key neither converts nor compiles."""
    from sim.verilator import model as vmodel
    from tests.test_verilator import _Fetcher
    cache = tmp_path / "cache"
    first = vmodel.VerilatorModel(_Fetcher(), pulses=("done",), cache=cache,
                                  verilog_key=design_key(_Fetcher, None))
    assert first.build["verilog_cached"] is False

    def boom(*args, **kwargs):
        raise AssertionError("emit_sv called on a cache hit")

    monkeypatch.setattr(vmodel, "emit_sv", boom)
    again = vmodel.VerilatorModel(_Fetcher(), pulses=("done",), cache=cache,
                                  verilog_key=design_key(_Fetcher, None))
    print(first.build, again.build)
    assert again.build["verilog_cached"] and again.build["cached"]
    assert again.executable == first.executable
    # Other pulses are another netlist key: converted again (here: boom).
    with pytest.raises(AssertionError, match="emit_sv called"):
        vmodel.VerilatorModel(_Fetcher(), pulses=(), cache=cache, verilog_key=design_key(_Fetcher, None))
