"""Instructions beyond baseline armv8-a in aarch64 objects or shared libraries, found by disassembly.

A Raspberry Pi 4 (Cortex-A72) runs armv8-a plus CRC32; an instruction from a later architecture
version or an optional extension kills the process with SIGILL there.  The extension is built for
armv8-a (edgepanel/kernels/_build.py) and only functions whose name says `dotprod` (arm_neon.c marks
them `EP_DOTPROD`, chosen at run time) may use the Armv8.2 dot product.  This lists every other
instruction of the families below, by function.  tests/test_c_variants.py runs it on the objects
cross-compiled as the package build compiles them; .ci/arm64.sh on the extension built inside the
arm64 root.

    python tools/arm64_isa.py [--objdump aarch64-linux-gnu-objdump] [--require-dotprod] FILE...

Exit 1, each offending instruction listed, when one is found; 0 with a summary otherwise.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass

OBJDUMP = "aarch64-linux-gnu-objdump"

# (family, mnemonic pattern); the first match names an instruction's family
FAMILIES = [
    ("LSE atomics (Armv8.1)",
     r"(cas|casp|swp|ld(add|clr|eor|set|smax|smin|umax|umin)|st(add|clr|eor|set|smax|smin|umax|umin))(a|l|al)?[bh]?"),
    ("dot product (Armv8.2)", r"[su]dot"),
    ("int8 matrix multiply (Armv8.6)", r"usdot|sudot|smmla|ummla|usmmla"),
    ("bfloat16 (Armv8.6)", r"bfdot|bfmmla|bfmlal[bt]|bfcvtn?2?"),
    ("rounding doubling multiply-accumulate (Armv8.1)", r"sqrdml[as]h"),
    ("complex numbers, JavaScript conversion, RCpc (Armv8.3+)", r"fcmla|fcadd|fjcvtzs|ldapr\w*|ldapur\w*|stlur\w*"),
    ("frint32/64 (Armv8.5)", r"frint(32|64)[xz]"),
    ("pointer authentication outside the hint space (Armv8.3)", r"reta[ab]|bla?ra[ab]z?|ereta[ab]|ldra[ab]"),
    ("crypto", r"aes[de]|aesi?mc|sha1\w+|sha256\w+|sha512\w+|sm3\w+|sm4\w+|eor3|bcax|rax1|xar"),
    ("CRC32 (optional in Armv8.0)", r"crc32c?[bhwx]"),
]
FAMILY_RES = [(name, re.compile(rf"(?:{pat})")) for name, pat in FAMILIES]

# half-precision arithmetic (FEAT_FP16, Armv8.2): a floating-point instruction on h registers or
# .4h/.8h lanes.  Conversions to and from single precision are armv8-a (fcvt s0, h0; fcvtl/fcvtn).
BASELINE_HALF = {"fcvt", "fcvtl", "fcvtl2", "fcvtn", "fcvtn2"}
HALF_OPERAND = re.compile(r"\bh\d+\b|\.[48]h\b|\.h\[")
SVE_OPERAND = re.compile(r"\bz\d+\.[bhsdq]\b|\bp\d+/[zm]\b")
# pmull on 64-bit lanes (into .1q) is the crypto extension; on 8-bit lanes it is armv8-a
PMULL_64 = re.compile(r"\.1q\b")

FUNCTION_LINE = re.compile(r"^[0-9a-f]+ <([^>]+)>:$")
INSTRUCTION_LINE = re.compile(r"^\s*([0-9a-f]+):\s+(?:[0-9a-f]{8}\s+)?(\S+)\s*(.*)$")


@dataclass(frozen=True)
class Instruction:
    function: str
    address: str
    mnemonic: str
    operands: str


def family(mnemonic: str, operands: str) -> str | None:
    """The family beyond armv8-a this instruction belongs to, or None."""
    for name, pattern in FAMILY_RES:
        if pattern.fullmatch(mnemonic):
            return name
    if mnemonic in ("pmull", "pmull2") and PMULL_64.search(operands):
        return "crypto"
    if ((mnemonic.startswith("f") or mnemonic in ("scvtf", "ucvtf")) and mnemonic not in BASELINE_HALF
            and HALF_OPERAND.search(operands)):
        return "half-precision arithmetic (Armv8.2)"
    if SVE_OPERAND.search(operands):
        return "SVE"
    if mnemonic == ".inst":
        return "an encoding objdump does not know"
    return None


def instructions(disassembly: str):
    """(function, address, mnemonic, operands) of every instruction in `objdump -d` output."""
    function = "?"
    for line in disassembly.splitlines():
        m = FUNCTION_LINE.match(line.strip())
        if m:
            function = m.group(1)
            continue
        m = INSTRUCTION_LINE.match(line)
        if m and not line.lstrip().startswith(("Disassembly", "file format")):
            operands = m.group(3).split("//")[0].split(";")[0].strip()
            yield Instruction(function, m.group(1), m.group(2), operands)


def marked_for_dotprod(function: str) -> bool:
    """arm_neon.c's rule: the dot-product functions say so in their names (clones such as
    .constprop.0 keep the name)."""
    return "dotprod" in function.split(".")[0]


def disassemble(path, objdump: str = OBJDUMP) -> str:
    res = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{objdump} -d {path} failed: {res.stderr.strip()}")
    if "file format elf64-littleaarch64" not in res.stdout:
        raise RuntimeError(f"{path} is not an aarch64 ELF file")
    return res.stdout


def check(disassembly: str) -> tuple[list[tuple[Instruction, str]], dict[str, int]]:
    """(instructions beyond armv8-a outside the dotprod functions, with their family;
    dot-product instruction counts of the dotprod functions)."""
    bad, dot = [], {}
    for ins in instructions(disassembly):
        fam = family(ins.mnemonic, ins.operands)
        if fam is None:
            continue
        if marked_for_dotprod(ins.function):
            dot[ins.function] = dot.get(ins.function, 0) + (fam == "dot product (Armv8.2)")
            continue
        bad.append((ins, fam))
    return bad, dot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--objdump", default=OBJDUMP)
    ap.add_argument("--require-dotprod", action="store_true",
                    help="fail unless some dotprod function holds dot-product instructions")
    args = ap.parse_args(argv)
    failed, n_dot = False, 0
    for path in args.files:
        bad, dot = check(disassemble(path, args.objdump))
        for ins, fam in bad:
            print(f"{path}: {ins.function} at 0x{ins.address}: {ins.mnemonic} {ins.operands}  [{fam}]")
        print(f"{path}: {len(bad)} instructions beyond armv8-a outside the dotprod functions; "
              f"dot-product instructions: {sum(dot.values())} in {', '.join(sorted(dot)) or 'none'}")
        failed |= bool(bad)
        n_dot += sum(dot.values())
    if args.require_dotprod and n_dot == 0:
        print("no dot-product instructions in any dotprod function: the run-time dot-product path is missing")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
