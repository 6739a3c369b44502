#!/usr/bin/env python3
"""Writes the null guest: an ELF64 x86_64 file with a PVH entry whose code ends the VM at once.

    tests/bench/null-guest/mkelf.py [--spin | --triple-fault] OUT.elf

The guest is entered by the PVH boot protocol (32-bit protected mode, paging off) at ENTRY and runs

    mov $0xfe, %al      # b0 fe
    out %al, $0x64      # e6 64   i8042 "pulse reset": vmm ends the VM; QEMU's isa-debug-exit on 0x64 exits
1:  hlt                 # f4
    jmp 1b              # eb fd

With --spin the code is only `1: hlt; jmp 1b`: a guest that never ends, so that a benchmark can look at
the VMM's memory (/proc/PID/status) while the VM runs.

With --triple-fault the code is

    mov $0x7f1e5eed, %eax   # b8 ed 5e 1e 7f   a value to find in the dump
    mov $0x8000, %esp       # bc 00 80 00 00
    ud2                     # 0f 0b            #UD -> #GP -> #DF -> shutdown

The boot IDT that a VMM gives a PVH guest is empty (limit 7 or 0): the #UD cannot be delivered, nor the #GP
that follows, nor the double fault: the vCPU shuts down, a triple fault, which vmm reports with the guest's
state in --result (fault_dump.rs).

Layout: ELF header, two program headers (PT_LOAD of the code at physical ENTRY, which is the 1 MiB himem
start that linux-loader requires; PT_NOTE with the Xen PVH note), the note, then the code at file offset
0x1000. The note's descriptor is 8 bytes (the entry address zero-extended), as in a real vmlinux: linux-loader
reads its first 4 bytes, QEMU reads all 8.
"""
import os
import struct
import sys

ENTRY = 0x100000
CODE = bytes([0xB0, 0xFE, 0xE6, 0x64, 0xF4, 0xEB, 0xFD])
SPIN = bytes([0xF4, 0xEB, 0xFD])
TRIPLE_FAULT = bytes([0xB8, 0xED, 0x5E, 0x1E, 0x7F, 0xBC, 0x00, 0x80, 0x00, 0x00, 0x0F, 0x0B])
CODE_OFFSET = 0x1000

EHDR_SIZE = 64
PHDR_SIZE = 56
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_R = 1, 4
EM_X86_64 = 62
ET_EXEC = 2
XEN_ELFNOTE_PHYS32_ENTRY = 18


def note() -> bytes:
    name = b"Xen\0"  # 4 bytes: already 4-aligned
    desc = struct.pack("<Q", ENTRY)
    return struct.pack("<III", len(name), len(desc), XEN_ELFNOTE_PHYS32_ENTRY) + name + desc


def image(code: bytes = CODE) -> bytes:
    phnum = 2
    note_offset = EHDR_SIZE + phnum * PHDR_SIZE
    the_note = note()
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # ELFCLASS64, little-endian, version 1, SysV
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        ET_EXEC, EM_X86_64, 1,   # type, machine, version
        ENTRY,                   # e_entry (linux-loader wants it >= the himem start)
        EHDR_SIZE, 0,            # e_phoff, e_shoff (no sections)
        0,                       # e_flags
        EHDR_SIZE, PHDR_SIZE, phnum,
        0, 0, 0,                 # e_shentsize, e_shnum, e_shstrndx
    )
    load = struct.pack(
        "<IIQQQQQQ", PT_LOAD, PF_R | PF_X, CODE_OFFSET, ENTRY, ENTRY, len(code), len(code), 0x1000
    )
    notes = struct.pack(
        "<IIQQQQQQ", PT_NOTE, PF_R, note_offset, 0, 0, len(the_note), len(the_note), 4
    )
    head = ehdr + load + notes + the_note
    assert len(ehdr) == EHDR_SIZE and len(head) <= CODE_OFFSET
    return head + bytes(CODE_OFFSET - len(head)) + code


def main() -> int:
    args = sys.argv[1:]
    code = CODE
    if args[:1] == ["--spin"]:
        code, args = SPIN, args[1:]
    elif args[:1] == ["--triple-fault"]:
        code, args = TRIPLE_FAULT, args[1:]
    if len(args) != 1:
        print(f"usage: {sys.argv[0]} [--spin | --triple-fault] OUT.elf", file=sys.stderr)
        return 2
    out = args[0]
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(image(code))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
