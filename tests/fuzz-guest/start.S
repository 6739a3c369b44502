/*
 * Entry of the device-fuzzing guest. vmm enters a PVH kernel in 32-bit protected mode with paging off,
 * interrupts off, flat segments and %ebx pointing at struct hvm_start_info. This sets up long mode with
 * the low 4 GiB identity-mapped in 2 MiB pages (RAM and the MMIO gap alike, all user-accessible), calls
 * fuzz_setup(start_info) in ring 0 and then fuzz_main(): in ring 3 with IOPL 3 unless fuzz_setup returned
 * nonzero (fuzz.ring0=1). Either way the guest reaches every port and every MMIO address, and vmm sees the
 * same exits; ring 3 is the default because a PVM host (this project's machines) interprets guest ring 0
 * at about a microsecond per instruction, while guest ring 3 runs natively. When fuzz_main returns, the
 * guest resets the VM through the i8042 (0xFE to port 0x64), which ends vmm's run.
 */
        .section .note.Xen, "a"
        .balign 4
        .long 4                 /* name size */
        .long 8                 /* descriptor size */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .quad _start

        .section .text.entry, "ax"
        .code32
        .globl _start
_start:
        cli
        cld
        mov     %ebx, %esi                      /* keep the start info */
        mov     $stack_top, %esp

        /* zero .bss (page tables, stack and the C globals) */
        mov     $__bss_start, %edi
        mov     $__bss_end, %ecx
        sub     %edi, %ecx
        xor     %eax, %eax
        rep stosb

        /* PML4[0] -> PDPT; PDPT[0..3] -> PD0..PD3; PDn[i] = 2 MiB page (n * 1 GiB + i * 2 MiB) */
        mov     $pdpt, %eax
        or      $0x7, %eax
        mov     %eax, pml4
        mov     $pd, %edi
        xor     %ecx, %ecx
1:      mov     %ecx, %eax
        shl     $12, %eax
        add     $pd, %eax
        or      $0x7, %eax
        mov     %eax, pdpt(, %ecx, 8)
        inc     %ecx
        cmp     $4, %ecx
        jne     1b
        xor     %ecx, %ecx                      /* 2048 entries of 2 MiB: 4 GiB */
2:      mov     %ecx, %eax
        shl     $21, %eax
        or      $0x87, %eax                     /* present, writable, user, page size */
        mov     %eax, (%edi, %ecx, 8)
        mov     %ecx, %eax
        shr     $11, %eax                       /* bits 32+ of the address */
        mov     %eax, 4(%edi, %ecx, 8)
        inc     %ecx
        cmp     $2048, %ecx
        jne     2b

        mov     %cr4, %eax
        or      $0x20, %eax                     /* PAE */
        mov     %eax, %cr4
        mov     $pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx               /* EFER */
        rdmsr
        or      $0x100, %eax                    /* LME */
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax               /* PG | PE */
        mov     %eax, %cr0
        lgdt    gdt_pointer
        ljmp    $0x08, $long_mode

        .code64
long_mode:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        mov     %ax, %fs
        mov     %ax, %gs
        mov     $stack_top, %rsp

        /*
         * A TSS whose I/O permission bitmap allows every port. Hardware skips the bitmap at IOPL 3, but a
         * PVM host checks it for guest ring 3 all the same, and without a TSS of our own it would read
         * whatever lies at the TSS base vmm left (the boot GDT at 0x500): some ports would fault.
         */
        movw    $TSS_BITMAP, tss + 0x66         /* I/O map base */
        movb    $0xff, tss + TSS_BITMAP + 8192  /* the byte the bitmap must end with */
        mov     $tss, %eax
        mov     %eax, %edx
        and     $0xffffff, %edx
        shl     $16, %rdx                       /* base 23:0 */
        or      $TSS_LIMIT, %rdx                /* limit 15:0 */
        mov     $0x89, %ecx                     /* present, available 64-bit TSS */
        shl     $40, %rcx
        or      %rcx, %rdx
        mov     %eax, %ecx
        shr     $24, %ecx
        shl     $56, %rcx                       /* base 31:24 */
        or      %rcx, %rdx
        mov     %rdx, gdt_tss
        movq    $0, gdt_tss + 8                 /* base 63:32 */
        mov     $0x28, %ax
        ltr     %ax

        mov     %esi, %edi                      /* fuzz_setup(start_info) */
        call    fuzz_setup
        test    %eax, %eax
        jnz     run
        /* to ring 3, with IOPL 3 for the ports and interrupts still off */
        pushq   $0x23                           /* SS: user data, RPL 3 */
        pushq   $stack_top                      /* RSP */
        pushq   $0x3002                         /* RFLAGS: IOPL 3, IF 0 */
        pushq   $0x1b                           /* CS: user code, RPL 3 */
        pushq   $run                            /* RIP */
        iretq
run:    call    fuzz_main
        mov     $0xfe, %al
        out     %al, $0x64
3:      pause                                   /* (hlt would fault in ring 3) */
        jmp     3b

        .equ    TSS_BITMAP, 104
        .equ    TSS_LIMIT, TSS_BITMAP + 8192    /* the last byte: the bitmap's 0xff terminator */

        .data                                   /* writable: ltr marks the TSS descriptor busy */
        .balign 8
gdt:    .quad 0
        .quad 0x00af9a000000ffff                /* 0x08: 64-bit code */
        .quad 0x00cf92000000ffff                /* 0x10: data */
        .quad 0x00affa000000ffff                /* 0x18: user code (64-bit, DPL 3) */
        .quad 0x00cff2000000ffff                /* 0x20: user data (DPL 3) */
gdt_tss: .quad 0, 0                             /* 0x28: the TSS, filled in above */
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt

        .section .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4 * 4096
tss:    .skip TSS_LIMIT + 1
        .balign 16
stack:  .skip 64 * 1024
stack_top:
