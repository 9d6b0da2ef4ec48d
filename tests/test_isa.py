"""The instruction format: encode/decode round trips, range errors, and the generated C header agrees
with the Python encoder bit for bit (compiled with the system C compiler when there is one)."""

import random
import shutil
import subprocess

import pytest

from m3vit_hw.config import AcceleratorConfig
from m3vit_hw.control import InstructionSet, Opcode
from m3vit_hw.control.isa import main

PRESETS = ["tiny", "vit-tiny-cityscapes", "vit-small-nyud"]


def _random_fields(isa, op, rng):
    return {f.name: rng.randrange(1 << f.width) for f in isa.fields(op)}


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_and_layout(preset):
    isa = InstructionSet(AcceleratorConfig.from_preset(preset))
    rng = random.Random(preset)
    for op in Opcode:
        assert isa.layout(op).size == isa.bits
        for _ in range(20):
            vals = _random_fields(isa, op, rng)
            wait = rng.random() < 0.5
            words = isa.encode(op, wait=wait, **vals)
            assert len(words) == isa.words and all(0 <= w < 1 << 32 for w in words)
            assert isa.decode(words) == (op, vals, wait), f"ISA {preset} {op.name}: round trip differs"
        # Field extremes do not spill into neighbours.
        ones = {f.name: (1 << f.width) - 1 for f in isa.fields(op)}
        assert isa.decode(isa.encode(op, **ones))[1] == ones


def test_widths_follow_the_config():
    small = InstructionSet(AcceleratorConfig.from_preset("vit-tiny-cityscapes"))
    big = InstructionSet(AcceleratorConfig.from_preset("vit-small-nyud"))
    w = lambda isa, op, name: next(f.width for f in isa.fields(op) if f.name == name)
    assert w(small, Opcode.ATTENTION, "tokens") == 8      # 129 tokens
    assert w(big, Opcode.ATTENTION, "tokens") == 11       # 1201 tokens
    cfg = big.config
    assert w(big, Opcode.GEMM, "a_base") == cfg.act_addr_bits


def test_bad_values_are_refused():
    isa = InstructionSet(AcceleratorConfig.from_preset("tiny"))
    vals = _random_fields(isa, Opcode.ATTENTION, random.Random(0))
    width = next(f.width for f in isa.fields(Opcode.ATTENTION) if f.name == "tokens")
    with pytest.raises(ValueError, match=rf"ATTENTION.tokens must be in \[0, {(1 << width) - 1}\]"):
        isa.encode(Opcode.ATTENTION, **{**vals, "tokens": 1 << width})
    with pytest.raises(TypeError, match="needs field 'tokens'"):
        isa.encode(Opcode.ATTENTION, **{k: v for k, v in vals.items() if k != "tokens"})
    with pytest.raises(TypeError, match="no field"):
        isa.encode(Opcode.SYNC, bogus=1)
    with pytest.raises(TypeError, match="config must be an AcceleratorConfig"):
        InstructionSet("tiny")
    with pytest.raises(ValueError, match="mem_addr_width must be in"):
        InstructionSet(AcceleratorConfig.from_preset("tiny"), mem_addr_width=8)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_c_header_matches_python(tmp_path):
    isa = InstructionSet(AcceleratorConfig.from_preset("vit-tiny-cityscapes"))
    (tmp_path / "m3vit_isa.h").write_text(isa.c_header())
    rng = random.Random(1)
    cases, expected = [], []
    for op in Opcode:
        vals = _random_fields(isa, op, rng)
        expected.append(isa.encode(op, wait=True, **vals))
        sets = [f"m3vit_insn_set(w, M3VIT_OPCODE_LSB, M3VIT_OPCODE_WIDTH, M3VIT_OP_{op.name});",
                "m3vit_insn_set(w, M3VIT_WAIT_LSB, M3VIT_WAIT_WIDTH, 1);"]
        sets += [f"m3vit_insn_set(w, M3VIT_{op.name}_{k.upper()}_LSB, M3VIT_{op.name}_{k.upper()}_WIDTH, "
                 f"{v}ull);" for k, v in vals.items()]
        cases.append("{ uint32_t w[M3VIT_INSN_WORDS] = {0}; " + " ".join(sets) +
                     " for (unsigned i = 0; i < M3VIT_INSN_WORDS; i++) printf(\"%u \", w[i]); printf(\"\\n\"); }")
    src = "#include <stdio.h>\n#include \"m3vit_isa.h\"\nint main(void) {\n" + "\n".join(cases) + "\nreturn 0; }\n"
    (tmp_path / "t.c").write_text(src)
    subprocess.run(["cc", "-std=c99", "-Wall", "-Werror", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")],
                   check=True, cwd=tmp_path)
    out = subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout
    got = [[int(x) for x in line.split()] for line in out.strip().splitlines()]
    for op, g, e in zip(Opcode, got, expected):
        assert g == e, f"ISA C header: {op.name} encodes {g}, Python {e}"


def test_cli_writes_files_and_refuses_bad_paths(tmp_path, capsys):
    assert main(["--preset", "tiny", "--header", str(tmp_path / "a.h"),
                 "--markdown", str(tmp_path / "a.md")]) == 0
    assert "#define M3VIT_OP_ATTENTION 4u" in (tmp_path / "a.h").read_text()
    assert "### `ATTENTION` = 4" in (tmp_path / "a.md").read_text()
    assert main(["--header", str(tmp_path / "missing" / "a.h")]) == 2
    assert "does not exist" in capsys.readouterr().err
