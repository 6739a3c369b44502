//! Guest RAM: anonymous private memory reserved lazily (MAP_NORESERVE: a page costs nothing until the
//! guest touches it), placed on 2 MiB boundaries and offered to transparent huge pages (MADV_HUGEPAGE,
//! as QEMU does for guest RAM; the host's policy in /sys/kernel/mm/transparent_hugepage decides).
//!
//! Why: a booting kernel touches tens of MiB of its memory (the struct page array alone is 16 MiB per
//! GiB), and each first touch of a 4 KiB page is a fault on the host and a nested-paging violation in
//! KVM. With huge pages one fault backs 2 MiB, and KVM maps it with one large nested-paging entry, which
//! needs the host address and the guest address to agree modulo 2 MiB: hence the alignment, which
//! vm-memory's own mapping does not give on kernels before 6.7.

use std::io;
use std::ptr::null_mut;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestRegionMmap};

/// The guest memory every device and vCPU works on: anonymous mappings (see [`map`]) and, where the
/// kernel is mapped from its file, file mappings, as vm-memory regions.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

/// The size of an x86-64 transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// How guest RAM is mapped, as vm-memory is told too.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error("cannot reserve {0} MiB of address space for guest memory: {1}")]
    Map(usize, io::Error),
    #[error("guest memory layout: {0}")]
    Layout(String),
}

/// Maps guest RAM for `ranges` (guest address, size; sizes in whole pages).
///
/// The mappings stay until the process exits. vmm runs one VM per process, and devices and vCPU threads
/// hold references to this memory until the very end, so no point before exit is safe to unmap it.
pub fn map(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, GuestRamError> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(guest, size) in ranges {
        // Not the first 2 MiB: vmm writes the boot parameters, the command line and the MP table there
        // before the guest runs, and a huge page would be allocated (zeroed, perhaps compacted for) on
        // vmm's own way to the first KVM_RUN: 0.5 to 12 ms on this project's machines, against a few
        // small pages.
        let small_first = if guest.0 == 0 { HUGE_PAGE.min(size) } else { 0 };
        let host = map_aligned(size, small_first).map_err(|e| GuestRamError::Map(size >> 20, e))?;
        // SAFETY: `host` is the start of a live mapping of exactly `size` bytes that we made and never
        // unmap (see above).
        let builder = unsafe {
            MmapRegionBuilder::new(size)
                .with_mmap_prot(PROT)
                .with_mmap_flags(FLAGS)
                .with_raw_mmap_pointer(host)
        };
        let region = builder
            .build()
            .map_err(|e| GuestRamError::Layout(e.to_string()))?;
        let region = GuestRegionMmap::new(region, guest)
            .ok_or_else(|| GuestRamError::Layout(format!("a region at {guest:?} overflows")))?;
        regions.push(region);
    }
    GuestMemory::from_regions(regions).map_err(|e| GuestRamError::Layout(e.to_string()))
}

/// An anonymous mapping of `size` bytes that starts on a 2 MiB boundary, with huge pages requested for
/// all but its first `small_first` bytes.
fn map_aligned(size: usize, small_first: usize) -> io::Result<*mut u8> {
    let len = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing: no memory of ours changes.
    let start = unsafe { libc::mmap(null_mut(), len, PROT, FLAGS, -1, 0) };
    if start == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = start as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping just made, outside [aligned, aligned + size), and
    // nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(start as *mut libc::c_void, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Requests, not requirements: a kernel without THP answers EINVAL, and the memory works the
        // same with small pages. NOHUGEPAGE for the first bytes, or a host whose policy is `always`
        // would give them a huge page anyway.
        if small_first > 0 {
            libc::madvise(
                aligned as *mut libc::c_void,
                small_first,
                libc::MADV_NOHUGEPAGE,
            );
        }
        if size > small_first {
            libc::madvise(
                (aligned + small_first) as *mut libc::c_void,
                size - small_first,
                libc::MADV_HUGEPAGE,
            );
        }
        // The host tools vmm forks (mkfs.ext4 for --scratch) get no copy of the guest's memory, nor of
        // the page tables that map it, as QEMU does.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_DONTFORK);
    }
    Ok(aligned as *mut u8)
}

/// Pages per mincore call in [`resident_kib`].
const MINCORE_CHUNK_PAGES: usize = 4096;

/// How much guest memory is resident: the pages the guest (or we, loading it) touched.
pub fn resident_kib(mem: &GuestMemory, file_backed: &[(usize, usize)]) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .unwrap_or(0)
        .max(4096);
    let mut resident_pages = 0u64;
    for region in mem.iter() {
        // A region this process has mapped has a length that fits its address space.
        let (Ok(host), Ok(len)) = (
            region.get_host_address(MemoryRegionAddress(0)),
            usize::try_from(region.len()),
        ) else {
            continue;
        };
        resident_pages += mincore_pages(host as usize, len, page);
    }
    // Where guest memory is mapped from the kernel file, mincore counts the pages in the page cache;
    // count the ones this process has mapped (touched) instead.
    if let Ok(pagemap) = std::fs::File::open("/proc/self/pagemap") {
        for &(addr, len) in file_backed {
            let cached = mincore_pages(addr, len, page);
            let touched = mapped_pages(&pagemap, addr, len, page).unwrap_or(cached);
            resident_pages = (resident_pages + touched).saturating_sub(cached);
        }
    }
    resident_pages * page as u64 / 1024
}

/// Pages of `[addr, addr + len)` (page-aligned, mapped by us) that mincore reports resident.
fn mincore_pages(addr: usize, len: usize, page: usize) -> u64 {
    // One byte per page, a chunk at a time: a vector for all of a 1 GiB guest would add 256 KiB to the
    // peak RSS that is being reported.
    let mut vec = vec![0u8; MINCORE_CHUNK_PAGES];
    let mut pages = 0u64;
    let mut offset = 0;
    while offset < len {
        let chunk = (len - offset).min(MINCORE_CHUNK_PAGES * page);
        // SAFETY: [addr + offset, addr + offset + chunk) lies in a page-aligned mapping of ours (a guest
        // memory region), alive for the call, and `vec` has one byte for each of its at most
        // MINCORE_CHUNK_PAGES pages.
        let rc = unsafe {
            libc::mincore(
                (addr + offset) as *mut libc::c_void,
                chunk,
                vec.as_mut_ptr(),
            )
        };
        if rc == 0 {
            pages += vec[..chunk.div_ceil(page)]
                .iter()
                .filter(|b| **b & 1 != 0)
                .count() as u64;
        }
        offset += chunk;
    }
    pages
}

/// Pages of `[addr, addr + len)` present in this process's page tables (/proc/self/pagemap bit 63).
fn mapped_pages(
    pagemap: &std::fs::File,
    addr: usize,
    len: usize,
    page: usize,
) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut entries = vec![0u8; 8 * MINCORE_CHUNK_PAGES];
    let (first, count) = (addr / page, len.div_ceil(page));
    let mut pages = 0u64;
    let mut done = 0;
    while done < count {
        let n = (count - done).min(MINCORE_CHUNK_PAGES);
        let buf = &mut entries[..8 * n];
        pagemap.read_exact_at(buf, ((first + done) * 8) as u64)?;
        pages += buf.chunks_exact(8).filter(|e| e[7] & 0x80 != 0).count() as u64;
        done += n;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {

    #[test]
    fn touched_pages_are_counted_by_page_table_not_page_cache() {
        let page = 4096;
        let mut mem = vec![0u8; 64 * page];
        let start = (mem.as_mut_ptr() as usize).next_multiple_of(page);
        let pages = 16;
        // SAFETY: [start, start + 16 pages) lies inside `mem`; MADV_DONTNEED on anonymous memory of
        // ours only drops its contents, which are zero anyway.
        unsafe {
            libc::madvise(
                start as *mut libc::c_void,
                pages * page,
                libc::MADV_DONTNEED,
            )
        };
        for i in [0, 3, 7] {
            // SAFETY: inside `mem`, as above.
            unsafe { ((start + i * page) as *mut u8).write_volatile(1) };
        }
        let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
        assert_eq!(
            mapped_pages(&pagemap, start, pages * page, page).unwrap(),
            3
        );
        assert_eq!(mincore_pages(start, pages * page, page), 3);
    }
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn regions_start_on_huge_page_boundaries_and_hold_data() {
        let mem = map(&crate::arch::layout::ram_regions(64 << 20)).expect("map");
        for region in mem.iter() {
            assert_eq!(region.as_ptr() as usize % HUGE_PAGE, 0);
        }
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .expect("write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x1000)).expect("read"),
            0xdead_beef
        );
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }

    /// The VmFlags line of the mapping in /proc/self/smaps that holds `addr`.
    fn vm_flags_at(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().unwrap_or("");
            if let Some((start, end)) = range.split_once('-') {
                if let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                ) {
                    inside = (start..end).contains(&addr);
                    continue;
                }
            }
            if inside {
                if let Some(flags) = line.strip_prefix("VmFlags:") {
                    return flags.to_string();
                }
            }
        }
        panic!("no mapping holds {addr:#x}")
    }

    #[test]
    fn huge_pages_are_requested_except_for_the_first_2_mib() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            eprintln!("no transparent huge pages in this kernel: nothing to check");
            return;
        }
        let mem = map(&crate::arch::layout::ram_regions(64 << 20)).expect("map");
        let base = mem.iter().next().expect("a region").as_ptr() as usize;
        // "hg" is VM_HUGEPAGE (MADV_HUGEPAGE), "nh" VM_NOHUGEPAGE, "dc" VM_DONTCOPY (MADV_DONTFORK)
        let has = |flags: &str, flag: &str| flags.split_whitespace().any(|f| f == flag);
        let low = vm_flags_at(base);
        let high = vm_flags_at(base + HUGE_PAGE);
        assert!(has(&low, "nh") && !has(&low, "hg"), "{low}");
        assert!(has(&high, "hg"), "{high}");
        assert!(has(&low, "dc") && has(&high, "dc"), "{low} / {high}");
    }
}
