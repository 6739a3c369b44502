/*
 * The device-fuzzing guest: a kernel-less PVH guest that drives vmm's whole MMIO and PIO surface for a
 * fixed, seeded budget of operations, then resets the VM (README.md, "Fuzzing the devices"; start.S says
 * why the operations run in ring 3). tests/device_fuzz.rs builds it and runs it for a set of seeds.
 *
 * Kernel command line (vmm's --append): fuzz.seed=N (default 1), fuzz.ops=N (default 2000; the test uses 1000), fuzz.cmd=1
 * when vmm runs with --cmd, so that a control connection is accepted and the guest speaks mostly valid
 * guest-init frames over it (a frame the host refuses ends the run, so bad ones are rare there),
 * fuzz.mask=BITS (which kinds of operation run: bit N is case N of fuzz_main's switch), fuzz.spin=N (how
 * long to wait for a device, in pause instructions), fuzz.ring0=1 (stay in ring 0).
 *
 * Everything the guest does follows from the seed: the same seed replays the same operations, as long as
 * the devices answer alike (whether a chain is submitted or skipped depends on whether the device has
 * caught up; how the seeded sequence goes on does not).
 * Most operations set a virtio device up properly (feature negotiation, queue addresses, QueueReady,
 * DRIVER_OK) and then corrupt one thing, so that descriptor chains, block requests, vsock packets and
 * connection state are reached, not only the register decoder.
 *
 * The guest never lets a device write over its own code, stack or page tables: every guest-RAM address
 * it hands a device lies in the arena [ARENA_START, arena_end); every other address it hands out is
 * outside RAM (beyond its end, in the MMIO gap, past 4 GiB, near 2^64).
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ---- memory layout (vmm/src/arch/layout.rs) ---------------------------------------------------------- */

#define ARENA_START 0x400000ULL         /* 4 MiB: well clear of this image at 1 MiB */
#define ARENA_MAX (16ULL << 20)         /* what the guest touches bounds vmm's RSS too */
#define RINGS_SIZE (1ULL << 20)         /* first MiB of the arena: the rings, 64 KiB per queue */
#define MMIO_GAP_START 0xd0000000ULL
#define VIRTIO_BASE 0xd0000000ULL
#define VIRTIO_WINDOW 0x1000ULL
#define MAX_DEVICES 4
#define IOAPIC_PAGE 0xfec00000ULL
#define LAPIC_PAGE 0xfee00000ULL

/* ---- virtio-mmio registers (virtio 1.2, 4.2.2) --------------------------------------------------------- */

#define R_MAGIC 0x000
#define R_VERSION 0x004
#define R_DEVICE_ID 0x008
#define R_DEVICE_FEATURES 0x010
#define R_DEVICE_FEATURES_SEL 0x014
#define R_DRIVER_FEATURES 0x020
#define R_DRIVER_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM_MAX 0x034
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_QUEUE_NOTIFY 0x050
#define R_INTERRUPT_STATUS 0x060
#define R_INTERRUPT_ACK 0x064
#define R_STATUS 0x070
#define R_QUEUE_DESC 0x080
#define R_QUEUE_DRIVER 0x090
#define R_QUEUE_DEVICE 0x0a0
#define R_CONFIG_GENERATION 0x0fc
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4

#define ID_BLOCK 2
#define ID_VSOCK 19

/* ---- port I/O and MMIO --------------------------------------------------------------------------------- */

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("mfence" ::: "memory"); }

static void mmio_write(u64 addr, int width, u64 v)
{
    switch (width) {
    case 1: *(volatile u8 *)addr = (u8)v; break;
    case 2: *(volatile u16 *)addr = (u16)v; break;
    case 4: *(volatile u32 *)addr = (u32)v; break;
    default: *(volatile u64 *)addr = v; break;
    }
}

static u64 mmio_read(u64 addr, int width)
{
    switch (width) {
    case 1: return *(volatile u8 *)addr;
    case 2: return *(volatile u16 *)addr;
    case 4: return *(volatile u32 *)addr;
    default: return *(volatile u64 *)addr;
    }
}

/* gcc may emit calls to these for struct copies and zeroing */
void *memset(void *d, int c, unsigned long n)
{
    u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
    u8 *p = d;
    const u8 *q = s;
    while (n--)
        *p++ = *q++;
    return d;
}

/* ---- the seeded generator (xorshift64*) ------------------------------------------------------------------ */

static u64 rng_state;

static u64 rnd(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dULL;
}

/* uniform in [0, n), n > 0 */
static u32 below(u32 n) { return (u32)((rnd() >> 32) % n); }
/* true with probability pct % */
static int chance(u32 pct) { return below(100) < pct; }
static int width_any(void) { static const int w[] = {1, 2, 4, 8}; return w[below(4)]; }

/* values that break parsers: boundaries, all ones, powers of two */
static u64 interesting(void)
{
    static const u64 v[] = {0, 1, 2, 3, 4, 7, 8, 15, 16, 0x7f, 0x80, 0xff, 0x100, 0x1ff, 0x200, 0xfff, 0x1000,
                            0xffff, 0x10000, 0x7fffffff, 0x80000000, 0xffffffff, 0x100000000ULL,
                            0x7fffffffffffffffULL, 0x8000000000000000ULL, 0xffffffffffffffffULL};
    switch (below(4)) {
    case 0: return v[below(sizeof v / sizeof v[0])];
    case 1: return 1ULL << below(64);
    case 2: return below(512);
    default: return rnd();
    }
}

/* ---- what vmm told us --------------------------------------------------------------------------------- */

static u64 ram_end = 0x8000000;     /* end of RAM below the gap, from the PVH memory map */
static u64 arena_end;
static u64 budget = 2000;
static int cmd_mode;
static u32 settle_spins = 20000;
static u32 op_mask = 0x1ff;     /* which kinds of operation run (fuzz.mask) */
static u64 op_index;
static int control_requested, control_established, hello_sent;

/* with --cmd, the vsock device is left alone until the last tenth of the budget (see vsock_control_tx) */
static int vsock_protected(void) { return cmd_mode && op_index < budget - budget / 10; }

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};

struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

/* the value of "key=NUMBER" on the command line, or dflt */
static u64 cmdline_number(const char *cmdline, const char *key, u64 dflt)
{
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k || *q != '=')
            continue;
        u64 n = 0;
        int digits = 0;
        for (q++; *q >= '0' && *q <= '9'; q++, digits++)
            n = n * 10 + (u64)(*q - '0');
        return digits ? n : dflt;
    }
    return dflt;
}

static void read_start_info(const struct hvm_start_info *si, u64 *seed)
{
    const char *cmdline = (const char *)si->cmdline_paddr;
    *seed = cmdline_number(cmdline, "fuzz.seed", 1);
    budget = cmdline_number(cmdline, "fuzz.ops", 2000);
    cmd_mode = cmdline_number(cmdline, "fuzz.cmd", 0) != 0;
    settle_spins = (u32)cmdline_number(cmdline, "fuzz.spin", settle_spins);
    op_mask = (u32)cmdline_number(cmdline, "fuzz.mask", op_mask);
    if (!(op_mask & 0x1ff))
        op_mask = 0x1ff;
    const struct hvm_memmap_entry *map = (const struct hvm_memmap_entry *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries && i < 16; i++) {
        u64 end = map[i].addr + map[i].size;
        if (map[i].type == 1 && map[i].addr < MMIO_GAP_START && end > ARENA_START)
            ram_end = end;
    }
    arena_end = ram_end < ARENA_START + ARENA_MAX ? ram_end : ARENA_START + ARENA_MAX;
}

/* ---- addresses handed to devices ---------------------------------------------------------------------- */

/* an address in the data part of the arena with room for len bytes, aligned to align */
static u64 arena_addr(u64 len, u64 align)
{
    u64 lo = ARENA_START + RINGS_SIZE, span = arena_end - lo;
    if (len >= span)
        len = span - 1;
    u64 a = lo + (rnd() % (span - len));
    return a & ~(align - 1);
}

/* an address that is no guest RAM, or RAM that a range starting there runs off the end of */
static u64 wild_addr(void)
{
    switch (below(12)) {
    case 0: return ram_end - 1 - below(64);                     /* straddles the end of RAM */
    case 1: return ram_end;
    case 2: return ram_end + 0x1000 * below(64);
    case 3: return VIRTIO_BASE + VIRTIO_WINDOW * below(MAX_DEVICES) + 4 * below(0x40); /* device windows */
    case 4: return MMIO_GAP_START + 0x1000ULL * below(0x2ec00);  /* anywhere in the gap */
    case 5: return below(2) ? IOAPIC_PAGE : LAPIC_PAGE;
    case 6: return 0x100000000ULL + 0x1000ULL * below(1024);     /* above 4 GiB: no RAM there */
    case 7: return 0xfffffffffffff000ULL + below(0x1000);        /* wraps around */
    case 8: return 0xffffffff00000000ULL;
    case 9: return 1ULL << (33 + below(30));
    case 10: return MMIO_GAP_START - 8;                           /* runs from RAM (if any) into the gap */
    default: return rnd() | 0x100000000ULL;
    }
}

/* whether [addr, addr + len) lies in the arena: the only guest RAM the guest itself writes for devices */
static int ram_range_ok(u64 addr, u64 len)
{
    return addr >= ARENA_START && addr + len >= addr && addr + len <= arena_end;
}

/* mostly a good buffer address, sometimes a wild one */
static u64 buffer_addr(u64 len, int wild_pct)
{
    return chance(wild_pct) ? wild_addr() : arena_addr(len, below(4) ? 16 : 1);
}

/* ---- the devices -------------------------------------------------------------------------------------- */

struct queue {
    u16 size;
    u16 avail_idx;      /* what the guest last published */
    u16 next_desc;      /* where the next chain's descriptors go */
    u64 desc, avail, used;
};

struct device {
    u64 base;
    u32 id;
    u32 nqueues;
    u32 max_size;
    int live;           /* set up and DRIVER_OK written, as far as the guest knows */
    u64 capacity;       /* block: sectors */
    u64 guest_cid;      /* vsock */
    struct queue q[3];
};

static struct device devs[MAX_DEVICES];
static int ndevs;

static u32 reg_read(struct device *d, u32 off) { return (u32)mmio_read(d->base + off, 4); }
static void reg_write(struct device *d, u32 off, u32 v) { mmio_write(d->base + off, 4, v); }

static void probe_devices(void)
{
    for (int i = 0; i < MAX_DEVICES; i++) {
        u64 base = VIRTIO_BASE + VIRTIO_WINDOW * (u64)i;
        if ((u32)mmio_read(base + R_MAGIC, 4) != 0x74726976)
            continue;
        struct device *d = &devs[ndevs++];
        d->base = base;
        d->id = (u32)mmio_read(base + R_DEVICE_ID, 4);
        d->nqueues = d->id == ID_VSOCK ? 3 : 1;
    }
}

/* the proper ring addresses of queue qi of device di: 64 KiB each in the first MiB of the arena */
static void home_rings(int di, int qi, struct queue *q)
{
    u64 base = ARENA_START + (u64)(di * 3 + qi) * 0x10000;
    q->desc = base;
    q->avail = base + 0x1000 * 4;      /* 256 * 16 bytes of descriptors before it */
    q->used = base + 0x1000 * 5;
}

/* What one set-up gets wrong (SETUP_OK: nothing). */
enum setup_fault {
    SETUP_OK,
    SETUP_QUEUE_SIZE,       /* zero, not a power of two, past the maximum */
    SETUP_WILD_RING,        /* a ring outside RAM, in the MMIO gap, or running off RAM's end */
    SETUP_OVERLAP,          /* rings on top of each other */
    SETUP_UNALIGNED,        /* ring addresses of odd alignment */
    SETUP_NO_FEATURES_OK,   /* DRIVER_OK without FEATURES_OK */
    SETUP_EARLY_DRIVER_OK,  /* DRIVER_OK before the queues are set up, then set them up */
    SETUP_NOT_READY,        /* a queue left unready */
    SETUP_ALL_FEATURES,     /* acknowledge every bit, INDIRECT_DESC and EVENT_IDX included */
    SETUP_BAD_QUEUE_SEL,    /* configure queues that do not exist */
    SETUP_STATUS_CHAOS,     /* status bits in a random order */
    SETUP_HIGH_HALVES,      /* the high 32 bits of the ring addresses set */
    SETUP_FAULTS
};

static u32 status_of(struct device *d) { return reg_read(d, R_STATUS); }

static void configure_queue(struct device *d, int di, int qi, enum setup_fault fault)
{
    struct queue *q = &d->q[qi];
    home_rings(di, qi, q);
    reg_write(d, R_QUEUE_SEL, (u32)qi);
    u32 max = reg_read(d, R_QUEUE_NUM_MAX);
    d->max_size = max;
    u32 size = max ? max : 256;
    if (chance(30) && !(d->id == ID_VSOCK && vsock_protected()))
        size = 1u << below(9);                      /* smaller queues wrap sooner */
    if (size > max && max)
        size = max;
    if (fault == SETUP_QUEUE_SIZE && chance(60)) {
        static const u32 bad[] = {0, 3, 255, 257, 512, 0x8000, 0xffff, 0x10000};
        size = bad[below(8)];
    }
    q->size = (u16)size;
    if (q->size == 0 || (q->size & (q->size - 1)) || q->size > max)
        q->size = max ? (u16)max : 256; /* what the device keeps when it ignores a bad size */
    if (fault == SETUP_WILD_RING && chance(50)) {
        switch (below(3)) {
        case 0: q->desc = wild_addr(); break;
        case 1: q->avail = wild_addr(); break;
        default: q->used = wild_addr(); break;
        }
    }
    if (fault == SETUP_OVERLAP && chance(60)) {
        switch (below(4)) {
        case 0: q->avail = q->desc; break;
        case 1: q->used = q->desc + 16 * below(8); break;
        case 2: q->used = q->avail; break;
        default: q->avail = q->used = q->desc; break;
        }
    }
    if (fault == SETUP_UNALIGNED && chance(60)) {
        q->desc += 1 + below(15);
        q->avail += below(2);
        q->used += 1 + below(3);
    }
    reg_write(d, R_QUEUE_NUM, size);
    reg_write(d, R_QUEUE_DESC, (u32)q->desc);
    reg_write(d, R_QUEUE_DESC + 4, (u32)(q->desc >> 32));
    reg_write(d, R_QUEUE_DRIVER, (u32)q->avail);
    reg_write(d, R_QUEUE_DRIVER + 4, (u32)(q->avail >> 32));
    reg_write(d, R_QUEUE_DEVICE, (u32)q->used);
    reg_write(d, R_QUEUE_DEVICE + 4, (u32)(q->used >> 32));
    if (fault == SETUP_HIGH_HALVES && chance(50))
        reg_write(d, R_QUEUE_DESC + 4 + 0x10 * below(3), (u32)rnd());
    /* rings that are RAM start out empty (a reset device may have left anything there) */
    if (ram_range_ok(q->avail, 6 + 2 * 256))
        memset((void *)q->avail, 0, 6 + 2 * 256);
    if (ram_range_ok(q->used, 6 + 8 * 256))
        memset((void *)q->used, 0, 6 + 8 * 256);
    q->avail_idx = 0;
    q->next_desc = 0;
    if (!(fault == SETUP_NOT_READY && chance(50)))
        reg_write(d, R_QUEUE_READY, 1);
}

/* Sets device di up, getting one thing wrong (or nothing); the device is usable afterwards when live. */
static void setup_device(int di, enum setup_fault fault)
{
    struct device *d = &devs[di];
    reg_write(d, R_STATUS, 0);
    d->live = 0;
    if (fault == SETUP_STATUS_CHAOS) {
        for (int i = 0, n = 1 + (int)below(6); i < n; i++)
            reg_write(d, R_STATUS, chance(50) ? (u32)interesting() : 1u << below(8));
    }
    reg_write(d, R_STATUS, S_ACK);
    reg_write(d, R_STATUS, S_ACK | S_DRIVER);
    reg_write(d, R_DEVICE_FEATURES_SEL, 0);
    u32 lo = reg_read(d, R_DEVICE_FEATURES);
    reg_write(d, R_DEVICE_FEATURES_SEL, 1);
    u32 hi = reg_read(d, R_DEVICE_FEATURES);
    if (fault == SETUP_ALL_FEATURES)
        lo = hi = 0xffffffff;
    reg_write(d, R_DRIVER_FEATURES_SEL, 0);
    reg_write(d, R_DRIVER_FEATURES, lo);
    reg_write(d, R_DRIVER_FEATURES_SEL, 1);
    reg_write(d, R_DRIVER_FEATURES, hi);
    u32 status = S_ACK | S_DRIVER;
    if (fault != SETUP_NO_FEATURES_OK) {
        status |= S_FEATURES_OK;
        reg_write(d, R_STATUS, status);
        status = status_of(d);
    }
    if (fault == SETUP_EARLY_DRIVER_OK)
        reg_write(d, R_STATUS, status | S_DRIVER_OK);
    if (fault == SETUP_BAD_QUEUE_SEL) {
        reg_write(d, R_QUEUE_SEL, d->nqueues + below(100));
        reg_write(d, R_QUEUE_NUM, 16);
        reg_write(d, R_QUEUE_DESC, (u32)arena_addr(4096, 16));
        reg_write(d, R_QUEUE_READY, 1);
    }
    for (u32 qi = 0; qi < d->nqueues; qi++)
        configure_queue(d, di, (int)qi, fault);
    reg_write(d, R_STATUS, status | S_DRIVER_OK);
    d->live = (status_of(d) & (S_DRIVER_OK | 0x40 | 0x80)) == S_DRIVER_OK;
    if (d->id == ID_BLOCK)
        d->capacity = mmio_read(d->base + R_CONFIG, 4) | mmio_read(d->base + R_CONFIG + 4, 4) << 32;
    if (d->id == ID_VSOCK)
        d->guest_cid = mmio_read(d->base + R_CONFIG, 4) | mmio_read(d->base + R_CONFIG + 4, 4) << 32;
}

/* ---- building descriptor chains ------------------------------------------------------------------------ */

struct desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};

/* One buffer of a chain as the driver means it. */
struct seg {
    u64 addr;
    u32 len;
    int write;          /* device-writable */
};

/* What one chain gets wrong. */
enum chain_fault {
    CHAIN_OK,
    CHAIN_LOOP,             /* the last descriptor points back into the chain */
    CHAIN_NEXT_OUT_OF_RANGE,
    CHAIN_HUGE_LEN,
    CHAIN_ZERO_LEN,
    CHAIN_WILD_ADDR,
    CHAIN_INDIRECT,         /* the chain in an indirect table (not negotiated: finding 10) */
    CHAIN_BAD_INDIRECT,     /* an indirect table that loops, nests, is empty, huge or outside RAM */
    CHAIN_WRONG_DIRECTION,
    CHAIN_AVAIL_JUMP,       /* the avail index jumps far ahead of what was filled in */
    CHAIN_BAD_HEAD,         /* an avail ring entry past the queue size */
    CHAIN_FLAGS,            /* random flag bits */
    CHAIN_FAULTS
};

static int vsock_protected(void);

static enum chain_fault pick_chain_fault(void)
{
    enum chain_fault fault = chance(45) ? CHAIN_OK : (enum chain_fault)(1 + below(CHAIN_FAULTS - 1));
    /* faults that leave the vsock queues stuck would end the protected control conversation */
    if (vsock_protected() && (fault == CHAIN_AVAIL_JUMP || fault == CHAIN_BAD_HEAD))
        fault = CHAIN_LOOP;
    return fault;
}

static void put_desc(u64 table, u32 index, struct desc d)
{
    volatile struct desc *t = (volatile struct desc *)table;
    t[index].addr = d.addr;
    t[index].len = d.len;
    t[index].flags = d.flags;
    t[index].next = d.next;
}


/* Writes an indirect table for segs at a fresh arena address, maybe corrupting it; returns its address. */
static u64 indirect_table(const struct seg *segs, int n, enum chain_fault fault, u32 *len)
{
    u64 table = arena_addr(16 * (u64)(n + 4), 16);
    for (int i = 0; i < n; i++) {
        struct desc d = {segs[i].addr, segs[i].len, (u16)(segs[i].write ? F_WRITE : 0), (u16)(i + 1)};
        if (i + 1 < n)
            d.flags |= F_NEXT;
        put_desc(table, (u32)i, d);
    }
    *len = 16 * (u32)n;
    if (fault != CHAIN_BAD_INDIRECT)
        return table;
    volatile struct desc *t = (volatile struct desc *)table;
    switch (below(7)) {
    case 0: t[n - 1].flags |= F_NEXT; t[n - 1].next = 0; break;          /* loops */
    case 1: t[below((u32)n)].flags |= F_INDIRECT; break;                 /* nested */
    case 2: *len = 0; break;
    case 3: *len = (u32)interesting(); break;                            /* huge or not a multiple of 16 */
    case 4: *len += 1 + below(15); break;
    case 5: return wild_addr();
    default: t[below((u32)n)].next = (u16)rnd(); t[below((u32)n)].flags |= F_NEXT; break;
    }
    return table;
}

static void notify(struct device *d, u32 qi) { reg_write(d, R_QUEUE_NOTIFY, qi); }

/* Puts segs on queue qi as one chain (with fault), publishes it and, unless told not to, kicks. */
static void submit_chain(struct device *d, u32 qi, struct seg *segs, int n, enum chain_fault fault, int kick);

/*
 * Whether queue qi has room for one more chain, after waiting a little for the device to catch up. A
 * driver never makes more chains available than the ring holds; a guest that does (CHAIN_AVAIL_JUMP)
 * finds the queue stuck afterwards, and the device is then set up again.
 */
static int has_room(struct device *d, u32 qi)
{
    struct queue *q = &d->q[qi];
    if (!ram_range_ok(q->used, 4))
        return 1;
    volatile u16 *used_idx = (volatile u16 *)(q->used + 2);
    u32 patience = d->id == ID_VSOCK && vsock_protected() ? 10 * settle_spins : settle_spins / 4;
    for (u32 i = 0; (u16)(q->avail_idx - *used_idx) >= q->size && i < patience; i++)
        cpu_relax();
    return (u16)(q->avail_idx - *used_idx) < q->size;
}

/*
 * Puts segs on queue qi as one chain (with fault), publishes it and, unless told not to, kicks. Takes one
 * number from the seeded sequence whatever it does, so that what comes after does not depend on how
 * fast the device was.
 */
static void submit(struct device *d, u32 qi, struct seg *segs, int n, enum chain_fault fault, int kick)
{
    u64 own = rnd() | 1, outer = rng_state;
    rng_state = own;
    if (fault == CHAIN_AVAIL_JUMP || has_room(d, qi))
        submit_chain(d, qi, segs, n, fault, kick);
    else if (!(d->id == ID_VSOCK && vsock_protected()))
        d->live = 0; /* stuck: set it up again next time */
    rng_state = outer;
}

static void submit_chain(struct device *d, u32 qi, struct seg *segs, int n, enum chain_fault fault, int kick)
{
    struct queue *q = &d->q[qi];
    if (n <= 0 || q->size == 0 || !ram_range_ok(q->desc, 16 * (u64)q->size) ||
        !ram_range_ok(q->avail, 6 + 2 * (u64)q->size))
        return; /* a ring outside the arena is never written: the device is left to cope */
    u16 size = q->size;
    if (fault == CHAIN_HUGE_LEN)
        segs[below((u32)n)].len = (u32)(chance(50) ? 0xffffffffu : interesting());
    if (fault == CHAIN_ZERO_LEN)
        segs[below((u32)n)].len = 0;
    if (fault == CHAIN_WILD_ADDR)
        segs[below((u32)n)].addr = wild_addr();
    if (fault == CHAIN_WRONG_DIRECTION) {
        int i = (int)below((u32)n);
        segs[i].write = !segs[i].write;
    }
    u16 head = q->next_desc % size;
    if (fault == CHAIN_INDIRECT || fault == CHAIN_BAD_INDIRECT) {
        u32 len;
        u64 table = indirect_table(segs, n, fault, &len);
        struct desc d = {table, len, F_INDIRECT, 0};
        if (fault == CHAIN_BAD_INDIRECT && chance(20))
            d.flags |= F_NEXT | F_WRITE;
        put_desc(q->desc, head, d);
        q->next_desc = (u16)(head + 1);
    } else {
        if (n > size)
            n = size;
        for (int i = 0; i < n; i++) {
            u16 index = (u16)((head + i) % size);
            struct desc d = {segs[i].addr, segs[i].len, (u16)(segs[i].write ? F_WRITE : 0),
                             (u16)((head + i + 1) % size)};
            if (i + 1 < n)
                d.flags |= F_NEXT;
            if (i + 1 == n) {
                if (fault == CHAIN_LOOP) {
                    d.flags |= F_NEXT;
                    d.next = (u16)((head + below((u32)n)) % size);
                } else if (fault == CHAIN_NEXT_OUT_OF_RANGE) {
                    d.flags |= F_NEXT;
                    d.next = (u16)(size + below(0x10000 - size));
                }
            }
            if (fault == CHAIN_FLAGS && chance(40))
                d.flags = (u16)rnd();
            put_desc(q->desc, index, d);
        }
        q->next_desc = (u16)(head + n);
    }
    volatile u16 *avail = (volatile u16 *)q->avail;
    u16 slot = q->avail_idx % size;
    avail[2 + slot] = fault == CHAIN_BAD_HEAD ? (u16)(size + below(0x10000 - size)) : head;
    barrier();
    q->avail_idx++;
    if (fault == CHAIN_AVAIL_JUMP)
        q->avail_idx += (u16)(chance(50) ? size + below(0x8000) : 0x8000 + below(0x8000));
    avail[1] = q->avail_idx;
    barrier();
    if (kick)
        notify(d, qi);
}

/* Waits a little for the device (on vmm's event loop) to use what was published on queue qi. */
static void settle(struct device *d, u32 qi, u32 spins)
{
    struct queue *q = &d->q[qi];
    if (!ram_range_ok(q->used, 4))
        return;
    volatile u16 *used = (volatile u16 *)q->used;
    for (u32 i = 0; i < spins && used[1] != q->avail_idx; i++)
        cpu_relax();
    /* the interrupt is never taken (interrupts stay off): acknowledge it so the status toggles */
    reg_write(d, R_INTERRUPT_ACK, reg_read(d, R_INTERRUPT_STATUS));
}

/* ---- virtio-blk requests ------------------------------------------------------------------------------- */

static u64 sector_for(struct device *d, u32 sectors)
{
    switch (below(8)) {
    case 0: return d->capacity;                                  /* just past the end */
    case 1: return d->capacity - (sectors ? sectors - 1 : 0) + below(2);
    case 2: return interesting();                                /* huge, overflowing * 512 */
    case 3: return 0xffffffffffffffffULL >> below(12);
    default: return d->capacity > sectors ? rnd() % (d->capacity - sectors + 1) : 0;
    }
}

static void blk_request(int di)
{
    struct device *d = &devs[di];
    static const u32 types[] = {0, 1, 4, 8, 0, 0, 8, 2, 5, 7, 11, 13};   /* IN OUT FLUSH GET_ID, others */
    struct seg segs[40];
    int n = 0;
    u32 type = below(8) ? types[below(12)] : (u32)interesting();
    u32 ndata = type == 4 ? (chance(80) ? 0 : 1) : (below(5) ? 1 + below(4) : below(36));
    u64 total = 0;
    u32 lens[36];
    for (u32 i = 0; i < ndata; i++) {
        u32 len;
        switch (below(6)) {
        case 0: len = 1 + below(4096); break;                  /* not a multiple of 512 */
        case 1: len = 20; break;                               /* a GET_ID buffer */
        case 2: len = 512 * (1 + below(256)); break;           /* up to 128 KiB */
        default: len = 512 * (1 + below(8)); break;
        }
        lens[i] = len;
        total += len;
    }
    u64 hdr = arena_addr(16, 16);
    volatile u32 *h = (volatile u32 *)hdr;
    h[0] = type;
    h[1] = chance(10) ? (u32)rnd() : 0;
    *(volatile u64 *)(hdr + 8) = sector_for(d, (u32)(total / 512));
    segs[n++] = (struct seg){hdr, chance(90) ? 16 : (u32)below(32), 0};
    if (chance(10)) {           /* the header split over two descriptors */
        segs[0].len = 8;
        segs[n++] = (struct seg){hdr + 8, 8, 0};
    }
    int device_writes = type == 0 || type == 8;
    for (u32 i = 0; i < ndata; i++)
        segs[n++] = (struct seg){buffer_addr(lens[i], 3), lens[i], device_writes};
    segs[n++] = (struct seg){arena_addr(1, 1), chance(90) ? 1 : (u32)interesting(), 1};
    submit(d, 0, segs, n, pick_chain_fault(), 1);
}

/* ---- virtio-vsock packets ------------------------------------------------------------------------------ */

#define VSOCK_HDR 44
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define CONTROL_PORT 1024

struct vsock_hdr {
    u64 src_cid, dst_cid;
    u32 src_port, dst_port, len;
    u16 type, op;
    u32 flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

static u32 fwd_cnt[8];      /* what this guest claims to have consumed, per local port */

/*
 * With --cmd (fuzz.cmd=1) vmm's control thread takes the connection to port 1024 and ends the run at the
 * first thing wrong with it: a reset of the connection or of the vsock device, a malformed frame. So
 * that the run goes on long enough to reach everything else, local port 50000 then carries a well-formed
 * guest-init conversation (REQUEST, Hello, frames), and the vsock device is only disturbed (reset,
 * status chaos, register storms, faulty set-ups) in the last tenth of the budget. Until then the other
 * ports, the block device and the rest get the chaos; a rare bad frame still ends some runs early.
 */

/* A guest-init frame (protocol/src/lib.rs) for the control connection. Returns its length. */
static u32 control_frame(u8 *p, u32 room)
{
    u32 len = 0, type;
    int bad = !cmd_mode || below(5000) == 0;  /* the host ends the run at the first frame it refuses */
    switch (bad ? 5 + below(5) : 1 + below(4)) {
    case 1: type = 2; len = 9; p[5] = (u8)(1 + below(5)); *(u64 *)(p + 6) = rnd(); break;  /* Milestone */
    case 2:                                                              /* Stdout */
    case 3: type = 7; len = below(room - 5 < 2048 ? room - 5 : 2048);
        for (u32 i = 0; i < len; i++)
            p[5 + i] = (u8)('a' + below(26));
        break;
    case 4:                                                              /* Milestone, rarely Exit(0) */
        if (below(2000)) {
            type = 2; len = 9; p[5] = (u8)(1 + below(5)); *(u64 *)(p + 6) = rnd();
        } else {
            type = 9; len = 4; *(u32 *)(p + 5) = 0;  /* the run ends with status 0 */
        }
        break;
    case 5: type = 1; len = 3; p[5] = 2; break;                          /* Hello too short */
    case 6: type = 0x11 + below(0xe0); len = below(16); break;           /* unknown type */
    case 7: type = 1; len = 0x100001 + below(0x1000); break;             /* over MAX_PAYLOAD */
    case 8: type = 1; len = 4; *(u32 *)(p + 5) = 2; break;             /* a second Hello */
    default: type = 2; len = 1; p[5] = 0xee; break;                      /* Milestone cut short */
    }
    *(u32 *)p = len;
    p[4] = (u8)type;
    u32 total = 5 + len;
    return total > room ? room : total;
}

static void vsock_rx_buffers(int di, u32 count);

/*
 * Offers rx buffers until the device answers the control REQUEST: RESPONSE (established: data may flow)
 * or RST. Data sent before the RESPONSE has been delivered resets the connection, as it should.
 */
static u16 rx_used_idx(struct device *d)
{
    return ram_range_ok(d->q[0].used, 4) ? *(volatile u16 *)(d->q[0].used + 2) : 0;
}

/* seen: the rx used index before the REQUEST was sent */
static int vsock_await_response(int di, u16 seen)
{
    struct device *d = &devs[di];
    struct queue *q = &d->q[0];
    if (!ram_range_ok(q->used, 6 + 8 * (u64)q->size) || !ram_range_ok(q->desc, 16 * (u64)q->size))
        return 0;
    volatile u16 *used_idx = (volatile u16 *)(q->used + 2);
    volatile struct desc *table = (volatile struct desc *)q->desc;
    u64 rng_saved = rng_state;  /* how many rounds this takes depends on timing: the seed's path must not */
    int answer = 0;
    for (int round = 0; round < 16 && !answer; round++) {
        vsock_rx_buffers(di, 4);
        for (u32 spin = 0; spin < 200000; spin++) {
            while (seen != *used_idx) {
                u32 id = *(volatile u32 *)(q->used + 4 + 8 * (u64)(seen % q->size));
                seen++;
                if (id >= q->size || !ram_range_ok(table[id].addr, VSOCK_HDR))
                    continue;
                volatile struct vsock_hdr *h = (volatile struct vsock_hdr *)table[id].addr;
                if (h->dst_port == 50000 && h->src_port == CONTROL_PORT && h->op == OP_RESPONSE)
                    answer = 1;
                if (h->dst_port == 50000 && h->src_port == CONTROL_PORT && h->op == OP_RST)
                    answer = -1;
            }
            if (answer)
                break;
            cpu_relax();
        }
    }
    rng_state = rng_saved;
    return answer == 1;
}

/* The next packet of the control conversation (fuzz.cmd=1), always well formed. */
static void vsock_control_tx(int di)
{
    struct device *d = &devs[di];
    u64 hdr_addr = arena_addr(VSOCK_HDR + 4096, 8);
    struct vsock_hdr *h = (struct vsock_hdr *)hdr_addr;
    u8 *payload = (u8 *)(hdr_addr + VSOCK_HDR);
    /* fwd_cnt stays 0: the host's Run frame is far smaller than the buffer space this announces */
    *h = (struct vsock_hdr){d->guest_cid, 2, 50000, CONTROL_PORT, 0, 1, OP_RW, 0, 256 * 1024, 0};
    if (!control_requested) {
        h->op = OP_REQUEST;
        control_requested = 1;
        struct seg seg = {hdr_addr, VSOCK_HDR, 0};
        u16 seen = rx_used_idx(d);
        submit(d, 1, &seg, 1, CHAIN_OK, 1);
        control_established = vsock_await_response(di, seen);
        return;
    } else if (!control_established) {
        return; /* refused, or never answered: the control thread waits for a Hello that never comes */
    } else if (!hello_sent) {
        *(u32 *)payload = 4;
        payload[4] = 1;
        *(u32 *)(payload + 5) = 2;
        h->len = 9;
        hello_sent = 1;
    } else if (chance(10)) {
        h->op = chance(50) ? OP_CREDIT_UPDATE : OP_CREDIT_REQUEST;
    } else {
        h->len = control_frame(payload, 4096);
    }
    struct seg seg = {hdr_addr, VSOCK_HDR + h->len, 0};
    submit(d, 1, &seg, 1, CHAIN_OK, 1);
}

static void vsock_tx(int di)
{
    struct device *d = &devs[di];
    u32 port_index = below(chance(90) ? 4 : 8);
    /* the control thread talks to the first connection to port 1024: it must be ours */
    if (cmd_mode && (port_index == 0 || !control_requested)) {
        if (vsock_protected() || chance(80) || !control_requested) {
            vsock_control_tx(di);
            return;
        }
    }
    u64 hdr_addr = arena_addr(VSOCK_HDR + 4096, 8);
    struct vsock_hdr *h = (struct vsock_hdr *)hdr_addr;
    u8 *payload = (u8 *)(hdr_addr + VSOCK_HDR);
    static const u16 ops[] = {OP_REQUEST, OP_RW, OP_RW, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST,
                              OP_SHUTDOWN, OP_RST, OP_RESPONSE, OP_REQUEST};
    h->src_cid = chance(95) ? d->guest_cid : interesting();
    h->dst_cid = chance(95) ? 2 : interesting();
    h->src_port = chance(95) ? 50000 + port_index : (u32)interesting();
    if (chance(5))  /* many connections at once: past the device's limit of 64 */
        h->src_port = 51000 + below(256);
    h->dst_port = chance(85) ? CONTROL_PORT : (chance(50) ? (u32)interesting() : 1 + below(2048));
    h->type = chance(95) ? 1 : (u16)interesting();
    h->op = chance(95) ? ops[below(10)] : (u16)interesting();
    h->flags = h->op == OP_SHUTDOWN ? below(4) : (chance(95) ? 0 : (u32)interesting());
    h->buf_alloc = chance(90) ? 256 * 1024 : (u32)interesting();
    fwd_cnt[port_index] += chance(90) ? below(4096) : (u32)interesting();
    h->fwd_cnt = fwd_cnt[port_index];
    u32 len = 0;
    if (h->op == OP_RW)
        len = chance(70) ? control_frame(payload, 4096) : below(4097);
    else if (chance(5))
        len = below(64);
    h->len = len;
    if (chance(8))
        h->len = chance(50) ? (u32)interesting() : len + 1 + below(64);  /* len and buffers disagree */

    struct seg segs[24];
    int n = 0;
    u32 total = VSOCK_HDR + len;
    if (chance(70)) {
        segs[n++] = (struct seg){hdr_addr, total, 0};
    } else {                    /* the packet cut into pieces, header included */
        u32 at = 0;
        while (at < total && n < 23) {
            u32 piece = n == 22 ? total - at : 1 + below(chance(50) ? 8 : 64);
            if (piece > total - at)
                piece = total - at;
            segs[n++] = (struct seg){hdr_addr + at, piece, 0};
            at += piece;
        }
    }
    if (chance(5))
        segs[n++] = (struct seg){arena_addr(64, 8), 64, 1};     /* a device-writable piece in a tx chain */
    submit(d, 1, segs, n, pick_chain_fault(), 1);
}

static void vsock_rx_buffers(int di, u32 count)
{
    struct device *d = &devs[di];
    for (u32 i = 0; i < count; i++) {
        struct seg segs[4];
        int n = 1;
        switch (vsock_protected() ? 5 : below(6)) {
        case 0: segs[0] = (struct seg){arena_addr(16, 8), 1 + below(VSOCK_HDR), 1}; break;  /* too small */
        case 1: segs[0] = (struct seg){arena_addr(VSOCK_HDR, 8), VSOCK_HDR, 1}; break;      /* no payload room */
        case 2:
            n = 2 + (int)below(3);
            for (int j = 0; j < n; j++)
                segs[j] = (struct seg){arena_addr(512, 8), 1 + below(512), 1};
            break;
        default: segs[0] = (struct seg){arena_addr(4096, 8), 4096, 1}; break;
        }
        submit(d, 0, segs, n, chance(70) || vsock_protected() ? CHAIN_OK : pick_chain_fault(), i + 1 == count);
    }
}

/* ---- the operations ------------------------------------------------------------------------------------ */

static int pick_device(u32 id)
{
    int start = (int)below((u32)ndevs);
    for (int i = 0; i < ndevs; i++) {
        int di = (start + i) % ndevs;
        if (!id || devs[di].id == id)
            return di;
    }
    return -1;
}

/* a device to disturb: any, or only the block device while the control connection is protected */
static int pick_victim(void)
{
    int di = pick_device(0);
    if (vsock_protected() && devs[di].id == ID_VSOCK) {
        int blk = pick_device(ID_BLOCK);
        if (blk >= 0)
            di = blk;
    }
    return di;
}

static void ensure_live(int di)
{
    int keep = vsock_protected() && devs[di].id == ID_VSOCK;
    if (!devs[di].live || (chance(3) && !keep))
        setup_device(di, chance(75) || keep ? SETUP_OK : (enum setup_fault)(1 + below(SETUP_FAULTS - 1)));
}

static void op_block(void)
{
    int di = pick_device(ID_BLOCK);
    if (di < 0)
        return;
    ensure_live(di);
    for (u32 i = 0, n = 1 + below(8); i < n; i++)
        blk_request(di);
    settle(&devs[di], 0, settle_spins);
}

static void op_vsock(void)
{
    int di = pick_device(ID_VSOCK);
    if (di < 0)
        return;
    ensure_live(di);
    struct device *d = &devs[di];
    if (chance(60))
        vsock_rx_buffers(di, 1 + below(16));
    for (u32 i = 0, n = 1 + below(6); i < n; i++)
        vsock_tx(di);
    settle(d, 1, settle_spins);
    if (chance(30))
        settle(d, 0, settle_spins);
}

/* a device reset while requests are in flight, then maybe more requests on the dead queues */
static void op_reset_mid_flight(void)
{
    int di = pick_victim();
    ensure_live(di);
    struct device *d = &devs[di];
    if (d->id == ID_BLOCK)
        for (u32 i = 0, n = 1 + below(4); i < n; i++)
            blk_request(di);
    else
        vsock_tx(di);
    if (chance(50))
        for (u32 i = 0; i < below(200); i++)
            cpu_relax();
    reg_write(d, R_STATUS, 0);
    d->live = 0;
    if (chance(50)) {   /* kicks and requests to a device that is gone */
        notify(d, below(d->nqueues + 1));
        if (d->id == ID_BLOCK)
            blk_request(di);
    }
}

/* every width at every offset of the register block and some of the config space, reads and writes */
static void op_register_storm(void)
{
    struct device *d = &devs[pick_victim()];
    for (u32 i = 0, n = 8 + below(64); i < n; i++) {
        u32 off = chance(80) ? below(0x110) : below(0x1000);
        int w = width_any();
        if (chance(50) || off == R_STATUS || off == R_QUEUE_READY)
            (void)mmio_read(d->base + off, w);
        else
            mmio_write(d->base + off, w, interesting());
    }
    d->live = 0;    /* who knows what it thinks now */
}

static void op_config_sweep(void)
{
    struct device *d = &devs[pick_victim()];
    if (chance(50))
        reg_write(d, R_STATUS, S_ACK | S_DRIVER);   /* config writes count only from DRIVER on */
    u32 end = chance(80) ? 0x40 : 0xf00;
    for (u32 off = 0; off < end; off += 1 + (end > 0x40 ? below(64) : 0)) {
        int w = width_any();
        (void)mmio_read(d->base + R_CONFIG + off, w);
        if (chance(30))
            mmio_write(d->base + R_CONFIG + off, w, interesting());
    }
    (void)reg_read(d, R_CONFIG_GENERATION);
}

static void op_status_chaos(void)
{
    struct device *d = &devs[pick_victim()];
    static const u32 steps[] = {S_ACK, S_DRIVER, S_FEATURES_OK, S_DRIVER_OK, 0x40, 0x80, 0};
    u32 s = 0;
    for (u32 i = 0, n = 1 + below(8); i < n; i++) {
        s = chance(70) ? s | steps[below(7)] : (u32)interesting();
        if (chance(20))
            s = 0;
        reg_write(d, R_STATUS, s);
        if (chance(30))
            configure_queue(d, (int)(d - devs), (int)below(d->nqueues), SETUP_OK);
    }
    d->live = 0;
}

static void op_notify_storm(void)
{
    int di = pick_device(0);
    struct device *d = &devs[di];
    if (chance(50))
        ensure_live(di);
    for (u32 i = 0, n = 50 + below(500); i < n; i++)
        notify(d, chance(90) ? below(d->nqueues) : (u32)interesting());
}

/* ports: random ones of every width, and the ones vmm serves */
static void op_ports(void)
{
    for (u32 i = 0, n = 1 + below(32); i < n; i++) {
        u16 port;
        switch (below(6)) {
        case 0: port = (u16)(0x60 + below(5)); break;       /* i8042 */
        case 1: port = 0x440; break;                        /* timestamp */
        case 2: port = (u16)(0x3f8 + below(8)); break;      /* serial, with --console */
        case 3: port = (u16)(0x43c + below(8)); break;      /* around the timestamp port */
        default: port = (u16)rnd(); break;
        }
        u32 v = (u32)interesting(), how = below(6);
        /*
         * An access of several bytes must end by port 0xffff: a PVM host checks the TSS I/O bitmap even
         * at IOPL 3, and the bits past port 0xffff are the bitmap's terminator, so it would fault.
         */
        u16 last = how == 1 || how == 4 ? 0xfffe : how == 2 || how == 5 ? 0xfffc : 0xffff;
        if (port > last)
            port = last;
        switch (how) {
        case 0: (void)inb(port); break;
        case 1: (void)inw(port); break;
        case 2: (void)inl(port); break;
        case 3:
            if (port == 0x64 && (u8)v == 0xfe)  /* the reset that ends the run */
                v = 0xfd;
            outb(port, (u8)v);
            break;
        case 4: outw(port, (u16)v); break;
        default: outl(port, v); break;
        }
    }
}

/* MMIO where nothing is: every access is an exit to vmm, on many distinct pages */
static void op_unbacked_mmio(void)
{
    u32 pages = chance(95) ? 1 + below(16) : 256 + below(2048);
    u64 page = MMIO_GAP_START + 0x1000ULL * (0x10 + below(0x2ec00 - 0x10 - pages));
    for (u32 i = 0; i < pages; i++, page += 0x1000) {
        if (page == IOAPIC_PAGE || page == LAPIC_PAGE)   /* in-kernel devices: not vmm's surface */
            continue;
        u64 at = page + (below(0x1000) & ~7u);
        if (chance(50))
            (void)mmio_read(at, width_any());
        else
            mmio_write(at, width_any(), interesting());
    }
}

/* ---- the main loop ------------------------------------------------------------------------------------- */

/* In ring 0: reads the command line and the memory map. Returns nonzero to run fuzz_main in ring 0. */
int fuzz_setup(const struct hvm_start_info *si)
{
    u64 seed;
    read_start_info(si, &seed);
    rng_state = seed * 0x9e3779b97f4a7c15ULL + 0x632be59bd9b4e019ULL;
    if (!rng_state)
        rng_state = 1;
    return (int)cmdline_number((const char *)si->cmdline_paddr, "fuzz.ring0", 0);
}

void fuzz_main(void)
{
    probe_devices();
    if (!ndevs)
        return;
    for (op_index = 0; op_index < budget;) {
        u32 r = below(100), kind = r < 28 ? 0 : r < 58 ? 1 : r < 64 ? 2 : r < 72 ? 3 : r < 76 ? 4 : r < 81 ? 5
                                     : r < 85 ? 6 : r < 94 ? 7 : 8;
        if (!(op_mask & (1u << kind)))
            continue;
        op_index++;
        switch (kind) {
        case 0: op_block(); break;
        case 1: op_vsock(); break;
        case 2: op_reset_mid_flight(); break;
        case 3: op_register_storm(); break;
        case 4: op_config_sweep(); break;
        case 5: op_status_chaos(); break;
        case 6: op_notify_storm(); break;
        case 7: op_ports(); break;
        default: op_unbacked_mmio(); break;
        }
    }
}
