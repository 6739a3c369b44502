#!/usr/bin/env python3
"""Turns the records a benchmark printed into its table. Standard library only.

    report.py boot RECORDS [TITLE]   # tests/bench/run.sh: vmm vs QEMU microvm boots in one session
    report.py null RECORDS [TITLE]   # tests/bench/null-guest.sh: vmm's own cost on a null guest

RECORDS holds, among anything else, lines `bench-record {json}`, one per run:
  m            what was measured (vmm-init, vmm-cmd, qemu-init, vmmb-init, vmmb-cmd (a second vmm binary),
               vmm-tput, vmm-null, qemu-null, wrapper)
  i            round: 0 is a warm-up round (reported apart, not in the statistics)
  rc           exit status
  wall_us      exec to exit, microseconds, as the benchmark script saw it
  maxrss_kib   the process's peak RSS from wait4 (GNU time's %M), or null
  status       (vmm-spin, qemu-spin) VmHWM, VmRSS, RssAnon, RssFile, RssShmem in KiB from /proc/PID/status
               while a never-ending null guest runs
  bytes        (throughput) bytes counted at the far end of the pipe
  result       vmm's --result JSON, or null
A run counts as failed when its exit status is not the expected one (0 for vmm, 253 for QEMU, which the
guest's reset through isa-debug-exit gives) or its result is missing; failed runs are counted, not averaged.
"""
import json
import math
import statistics
import sys

EXPECTED_RC = {"qemu-init": 253, "qemu-null": 253}


def load(path):
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line.startswith("bench-record "):
                continue
            try:
                records.append(json.loads(line[len("bench-record "):]))
            except json.JSONDecodeError as e:
                print(f"report: skipping a broken record ({e}): {line[:120]}", file=sys.stderr)
    return records


def ok(r):
    if r["rc"] != EXPECTED_RC.get(r["m"], 0):
        return False
    return not r["m"].startswith("vmm") or r.get("result") is not None


def pick(records, m):
    """The runs of one measurement outside warm-up: (good, failed)."""
    runs = [r for r in records if r["m"] == m and r["i"] > 0]
    good = [r for r in runs if ok(r)]
    return good, len(runs) - len(good)


def p90(xs):
    """Nearest-rank 90th percentile."""
    s = sorted(xs)
    return s[max(0, math.ceil(0.9 * len(s)) - 1)]


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return (min(xs), statistics.median(xs), p90(xs), len(xs))


def fmt(v, unit="ms"):
    if v is None:
        return "n/a"
    if unit in ("ms", "MiB/s"):
        return f"{v:.1f}" if v >= 100 else f"{v:.2f}"
    return f"{v:.0f}"


class Table:
    def __init__(self, unit_header="ms"):
        self.rows = []
        self.unit_header = unit_header

    def add(self, label, values, unit="ms", target=""):
        s = stats(values)
        if s is None:
            self.rows.append((label, "0", "n/a", "n/a", "n/a", unit, target))
        else:
            mn, med, p, n = s
            self.rows.append((label, str(n), fmt(mn, unit), fmt(med, unit), fmt(p, unit), unit, target))
        return s

    def print(self):
        head = ("measurement", "n", "min", "median", "p90", "unit", "")
        w = [max(len(r[k]) for r in self.rows + [head]) for k in range(6)]
        def line(r):
            return (f"  {r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}  {r[4]:>{w[4]}}"
                    f"  {r[5]:<{w[5]}}  {r[6]}").rstrip()
        print(line(head))
        for r in self.rows:
            print(line(r))


def wall_ms(runs):
    return [r["wall_us"] / 1000 for r in runs]


def timing(runs, key):
    return [(r["result"].get("timings_ms") or {}).get(key) for r in runs]


def exit_total(result):
    return sum(e["count"] for e in result.get("exits", []))


def exits_summary(runs, top=6):
    """Median total exits and the median count of the most frequent kinds."""
    if not runs:
        return "n/a"
    kinds = {}
    for r in runs:
        for e in r["result"].get("exits", []):
            kinds.setdefault(e["kind"], []).append(e["count"])
    # a kind missing from a run counts 0 there
    med = {k: statistics.median(v + [0] * (len(runs) - len(v))) for k, v in kinds.items()}
    ordered = sorted(med.items(), key=lambda kv: (-kv[1], kv[0]))
    total = statistics.median(exit_total(r["result"]) for r in runs)
    parts = ", ".join(f"{k} {v:g}" for k, v in ordered[:top])
    more = f", +{len(ordered) - top} more kinds" if len(ordered) > top else ""
    return f"{total:g} in all (median per run): {parts}{more}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def failures(records, names):
    lines = []
    for m in names:
        runs = [r for r in records if r["m"] == m and r["i"] > 0]
        bad = [r for r in runs if not ok(r)]
        if bad:
            rcs = ", ".join(str(r["rc"]) for r in bad)
            lines.append(f"  {m}: {len(bad)} of {len(runs)} runs failed (exit status {rcs}); not in the figures")
    return lines


def warmup_line(records, names):
    parts = []
    for m in names:
        w = [r for r in records if r["m"] == m and r["i"] == 0]
        if w:
            parts.append(f"{m} {w[0]['wall_us'] / 1000:.1f} ms (rc {w[0]['rc']})")
    return "  warm-up round (not counted): " + "; ".join(parts) if parts else None


def vcpu_stats_missing(r):
    """vmm's result without its vCPU's figures: setup 0 and no exits at all. vmm takes the exit counts and
    the first KVM_RUN time from the vCPU thread when it joins it, and leaves them out when the thread has
    not left KVM_RUN within its stop wait (seen in the loaded test host)."""
    res = r["result"]
    return not res.get("exits") and not (res.get("timings_ms") or {}).get("setup")


def vmm_rows(t, label, init, cmd):
    def setup(runs):
        return [None if vcpu_stats_missing(r) else r["result"]["timings_ms"].get("setup") for r in runs]
    t.add(f"{label} boot to init + reset: wall, exec to exit", wall_ms(init))
    t.add("  setup: vmm start to first KVM_RUN", setup(init))
    t.add("  boot: vmm start to guest reset", timing(init, "boot"))
    t.add("  total (in vmm)", timing(init, "total"))
    t.add(f"{label} --cmd true: wall, exec to exit", wall_ms(cmd))
    t.add("  setup: vmm start to first KVM_RUN", setup(cmd))
    t.add("  boot: vmm start to command started", timing(cmd, "boot"))
    t.add("  command", timing(cmd, "command"))
    t.add("  teardown", timing(cmd, "teardown"))
    t.add("  total (in vmm)", timing(cmd, "total"))
    runs = init + cmd
    if any("peak_rss_kib" in r["result"] for r in runs):
        t.add("  peak RSS (result's peak_rss_kib), both kinds", [r["result"].get("peak_rss_kib") for r in runs],
              unit="KiB")
        t.add("  guest pages resident (guest_resident_kib)", [r["result"].get("guest_resident_kib") for r in runs],
              unit="KiB")
        t.add("  peak RSS beyond guest pages", [r["result"]["peak_rss_kib"] - r["result"].get("guest_resident_kib", 0)
                                               for r in runs if "peak_rss_kib" in r["result"]], unit="KiB")


def report_boot(records, title):
    variants = [("vmm", "vmm")]
    if any(r["m"].startswith("vmmb-") for r in records):
        variants.append(("vmmb", "vmm B"))
    got = {p: (pick(records, f"{p}-init")[0], pick(records, f"{p}-cmd")[0]) for p, _ in variants}
    qi, _ = pick(records, "qemu-init")
    print(title)
    t = Table()
    for p, label in variants:
        vmm_rows(t, label, *got[p])
    t.add("QEMU microvm boot to init + reset: wall", wall_ms(qi))
    t.print()
    print()
    print("VM exits to user space (vmm's result; whole run)")
    for p, label in variants:
        vi, vc = got[p]
        for what, runs in ((f"{label} boot to init", vi), (f"{label} --cmd true", vc)):
            with_stats = [r for r in runs if not vcpu_stats_missing(r)]
            missing = len(runs) - len(with_stats)
            note = f"  [{missing} of {len(runs)} runs had no vCPU statistics]" if missing else ""
            print(f"  {what + ':':<22} {exits_summary(with_stats)}{note}")
    print()
    q = med(wall_ms(qi))
    print("ratios (medians)")
    for p, label in variants:
        vi, vc = got[p]
        print(f"  {label} boot to init / QEMU boot to init (wall):         {ratio(med(wall_ms(vi)), q)}")
        print(f"  {label} --cmd true total / QEMU boot to init (wall):     {ratio(med(wall_ms(vc)), q)}")
        print(f"  {label} --cmd true to command start / QEMU boot to init: {ratio(med(timing(vc, 'boot')), q)}"
              "   (issue 5 target: <= 0.70)")
    if len(variants) == 2:
        (ai, ac), (bi, bc) = got["vmm"], got["vmmb"]
        print(f"  vmm B / vmm, boot to init (wall):    {ratio(med(wall_ms(bi)), med(wall_ms(ai)))}")
        print(f"  vmm B / vmm, --cmd true (wall):      {ratio(med(wall_ms(bc)), med(wall_ms(ac)))}")
    tput, tput_bad = pick(records, "vmm-tput")
    if tput or tput_bad:
        print()
        print("stdout throughput: vmm --cmd 'head -c BYTES /dev/zero' | wc -c")
        tt = Table()
        mib = [r["bytes"] / 2**20 for r in tput]
        tt.add("MiB/s over the command's time (result's timings_ms.command)",
               [r["bytes"] / 2**20 / (r["result"]["timings_ms"]["command"] / 1000) for r in tput
                if r["result"]["timings_ms"].get("command")], unit="MiB/s")
        tt.add("MiB/s over the wall time (exec to exit, boot included)",
               [r["bytes"] / 2**20 / (r["wall_us"] / 1e6) for r in tput], unit="MiB/s")
        tt.add("command time", timing(tput, "command"))
        tt.add("wall", wall_ms(tput))
        tt.print()
        sizes = sorted({f"{m:g}" for m in mib})
        print(f"  bytes through: {', '.join(sizes) or 'n/a'} MiB per run (as counted by wc -c)")
        wrong = [r for r in tput if r["bytes"] != r["result"].get("stdout_bytes")]
        if wrong:
            print(f"  NOTE: {len(wrong)} runs: wc -c counted a different number of bytes than the result's "
                  "stdout_bytes")
    copies, copies_bad = pick(records, "vmm-copy")
    if copies or copies_bad:
        print()
        print("copy throughput: vmm --copy-in WS:/ws --copy-out /ws:OUT --cmd true (one big file, 64 of 16 KiB)")
        tt = Table()
        for way in ("copy_in", "copy_out"):
            tt.add(f"{way.replace('_', '-')}: MiB/s (result's {way}_bytes over timings_ms.{way})",
                   [r["result"][f"{way}_bytes"] / 2**20 / (r["result"]["timings_ms"][way] / 1000)
                    for r in copies if r["result"]["timings_ms"].get(way)], unit="MiB/s")
            tt.add(f"{way.replace('_', '-')} time", timing(copies, way))
        tt.add("wall", wall_ms(copies))
        tt.print()
        differ = [r for r in copies if not r.get("same")]
        sizes = ", ".join(sorted({f"{r['bytes'] / 2**20:g}" for r in copies})) or "n/a"
        back = f"differs in {len(differ)} runs" if differ else "is identical (diff -r)"
        print(f"  bytes: {sizes} MiB per run; the tree that came back {back}")
    names = [f"{p}-{k}" for p, _ in variants for k in ("init", "cmd")] + ["qemu-init", "vmm-tput", "vmm-copy"]
    lines = failures(records, names)
    w = warmup_line(records, names[:-1])
    if lines or w:
        print()
        for line in ([w] if w else []) + lines:
            print(line)


def report_null(records, title):
    vn, _ = pick(records, "vmm-null")
    qn, _ = pick(records, "qemu-null")
    wr, _ = pick(records, "wrapper")
    print(title)
    t = Table()
    t.add("vmm: its start (main) to first KVM_RUN (timings_ms.setup)",
          [None if vcpu_stats_missing(r) else r["result"]["timings_ms"].get("setup") for r in vn])
    # exec to vmm's start, from a separate run spawned by exec-stamp.py (vmm cannot see its own exec)
    ex = [r["exec"] for r in records if r["m"] == "vmm-exec" and r["i"] > 0 and r.get("exec")
          and r["exec"].get("rc") == 0 and r["exec"].get("start_ns")
          and (r["exec"].get("setup_ms") or 0) > 0]
    t.add("vmm: spawn + exec to its start (exec-stamp.py, --trace)",
          [(x["start_ns"] - x["exec_ns"]) / 1e6 for x in ex])
    s_setup = t.add("vmm: exec to first KVM_RUN (spawn stamp to first KVM_RUN)",
                    [(x["start_ns"] - x["exec_ns"]) / 1e6 + x["setup_ms"] for x in ex],
                    target="target <= 2 ms median")
    t.add("vmm: teardown (VM end to exit, in vmm)", timing(vn, "teardown"))
    t.add("vmm: total (in vmm)", timing(vn, "total"))
    t.add("vmm: wall, exec to exit", wall_ms(vn))
    t.add("vmm: wall - total (exec, VM fd close, result write, exit)",
          [r["wall_us"] / 1000 - r["result"]["timings_ms"]["total"] for r in vn])
    t.add("QEMU microvm: wall, exec to exit", wall_ms(qn))
    if wr:
        t.add("wrapper alone (/usr/bin/time true): wall", wall_ms(wr))
    t.add("vmm: peak RSS (wait4, GNU time %M)", [r.get("maxrss_kib") for r in vn], unit="KiB")
    has_own = [r for r in vn if "peak_rss_kib" in r["result"]]
    s_beyond = None
    if has_own:
        t.add("vmm: peak RSS (its result's peak_rss_kib)", [r["result"]["peak_rss_kib"] for r in has_own],
              unit="KiB")
        t.add("vmm: guest pages resident (guest_resident_kib)",
              [r["result"].get("guest_resident_kib") for r in has_own], unit="KiB")
        s_beyond = t.add("vmm: peak RSS beyond guest pages (wait4 - resident)",
                         [r["maxrss_kib"] - r["result"].get("guest_resident_kib", 0) for r in has_own
                          if r.get("maxrss_kib") is not None], unit="KiB", target="target <= 2048 KiB")
    t.add("QEMU: peak RSS (wait4, GNU time %M)", [r.get("maxrss_kib") for r in qn], unit="KiB")
    s_private = None
    for m, label in (("vmm-spin", "vmm"), ("qemu-spin", "QEMU")):
        spins = [r for r in records if r["m"] == m and r["i"] > 0 and r.get("status")]
        if not spins:
            continue
        st = [r["status"] for r in spins]
        t.add(f"{label}, VM running: VmHWM (peak RSS)", [x.get("VmHWM") for x in st], unit="KiB")
        t.add(f"{label}, VM running: RssFile (shared: binary, libraries)", [x.get("RssFile") for x in st], unit="KiB")
        t.add(f"{label}, VM running: RssAnon (private)", [x.get("RssAnon") for x in st], unit="KiB")
        if label == "vmm":
            # the guest's resident pages are private anonymous memory of vmm's: take them out
            s_private = t.add("vmm, VM running: RssAnon + RssShmem - guest pages",
                              [r["status"].get("RssAnon", 0) + r["status"].get("RssShmem", 0)
                               - r["result"].get("guest_resident_kib", 0)
                               for r in spins if r.get("result") and "guest_resident_kib" in r["result"]],
                              unit="KiB", target="target <= 2048 KiB")
    t.print()
    if not has_own:
        print("  (vmm's result has no peak_rss_kib/guest_resident_kib: RSS beyond guest pages not computed)")
    print()
    v = med(wall_ms(vn))
    q = med(wall_ms(qn))
    print("ratios (medians)")
    print(f"  vmm wall / QEMU wall: {ratio(v, q)}   (QEMU / vmm: {ratio(q, v)})")
    if s_setup:
        verdict = "meets" if s_setup[1] <= 2 else "misses"
        print(f"  exec to first KVM_RUN: median {s_setup[1]:.2f} ms, {verdict} the 2 ms target")
    if s_beyond:
        verdict = "meets" if s_beyond[1] <= 2048 else "misses"
        print(f"  peak RSS beyond guest pages: median {s_beyond[1]:.0f} KiB, {verdict} the 2048 KiB target"
              " counting shared file pages")
    if s_private:
        verdict = "meets" if s_private[1] <= 2048 else "misses"
        print(f"  private memory beyond guest pages (VM running): median {s_private[1]:.0f} KiB, {verdict}"
              " the 2048 KiB target")
    if vn:
        print(f"  vmm exits: {exits_summary(vn)}")
    lines = failures(records, ["vmm-null", "qemu-null"])
    w = warmup_line(records, ["vmm-null", "qemu-null"])
    for line in ([w] if w else []) + lines:
        print(line)


def main():
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("boot", "null"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    records = load(sys.argv[2])
    title = sys.argv[3] if len(sys.argv) == 4 else ""
    if not records:
        print("report: no records: the benchmark ran nothing to its end", file=sys.stderr)
        return 1
    (report_boot if sys.argv[1] == "boot" else report_null)(records, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
