//! Large buffers on transparent huge pages, and [`release`], which zeroes a dead buffer by handing its
//! pages back ([`discard`] hands them back without zeroing the rest: for buffers whose contents nobody
//! reads again); [`reuse`] and [`reuse_zeroed`] give a buffer about to be written pages handed back
//! by others.
//!
//! Why: a training step needs its gradients only from the backward pass that writes them to the
//! optimizer step that reads them, and each layer's kept activations only from its forward to its
//! backward. Backward hands each layer's activations back once it is done with them and the optimizer
//! step hands the gradients back once it has read them, so the gradients fill memory while the
//! activations leave it: the step's peak holds the larger of the two, not their sum (PyTorch gets the
//! same by freeing saved tensors in backward and `zero_grad(set_to_none=True)`).
//!
//! A page handed back (`madvise(MADV_DONTNEED)`) reads as zero and costs a fault and the kernel's
//! zeroing when it is written again. On 4 KiB pages that is five times a `memset` (512 MiB written
//! again: 235 ms against 45 ms, Intel Xeon, 2026-12-07); on 2 MiB pages 76 ms, about what zeroing the
//! buffer and writing it cost anyway. So pages are handed back only from the mappings of
//! [`HugePageAlloc`], the global allocator the `dpo` binary installs: it maps every allocation of
//! [`MAPPED_FROM`] bytes and more itself, those of 2 MiB and more on a 2 MiB boundary with huge pages
//! asked for on their whole 2 MiB blocks (the last, partial block stays on small pages: a huge page
//! there would hold up to 2 MiB nobody asked for). The small pages such buffers have (that last block,
//! buffers under 2 MiB) come back all at once when [`reuse`] or [`reuse_zeroed`] is called, or a fault
//! each where the writer does not call them. Elsewhere (another
//! allocator, transparent huge pages off, not Linux) [`release`] writes zeros.
//!
//! From the first backward pass on ([`pool::start`]), the whole 2 MiB blocks do not go to the kernel but
//! to the process's [`pool`], from which [`reuse`]
//! (called by every writer of a buffer handed back: the activations' `fit`, the gradients before each
//! layer's backward) and the allocator take them: on a virtual machine that reports free memory to its
//! host, a block handed to the kernel cost ten times the figure above to get back (the pool's
//! documentation has the figures). `DPO_NO_PAGE_POOL=1` turns the pool off (for comparisons).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

#[cfg(target_os = "linux")]
pub mod pool;

/// A transparent huge page.
pub const HUGE_PAGE: usize = 2 << 20;

/// The size from which [`HugePageAlloc`] maps allocations itself (those of a huge page and more on huge
/// pages; smaller ones on small pages, so that they too can be handed back).
pub const MAPPED_FROM: usize = 256 << 10;

/// Element types whose all-zero bytes are the value zero (what a page handed back reads as).
///
/// # Safety
/// The all-zero bit pattern must be a valid value of the type, equal to `Self::ZERO`.
pub unsafe trait Zeroed: Copy + Send + Sync {
    const ZERO: Self;
}
// SAFETY: 0.0f32 is all-zero bits; so is 0u16.
unsafe impl Zeroed for f32 {
    const ZERO: Self = 0.0;
}
// SAFETY: as above.
unsafe impl Zeroed for u16 {
    const ZERO: Self = 0;
}

/// Set once [`HugePageAlloc`] has mapped an allocation itself: from then on every buffer of
/// [`MAPPED_FROM`] bytes or more that starts on a page boundary lies in its mappings.
static MAPPING: AtomicBool = AtomicBool::new(false);

/// The global allocator that maps buffers of [`MAPPED_FROM`] bytes and more itself, from 2 MiB on on
/// transparent huge pages (see the module documentation); smaller ones, and all of them where the
/// kernel offers no huge pages, come from the system allocator.
pub struct HugePageAlloc;

// SAFETY: every block comes from `System` or from `mmap`, and is given back to the one it came from:
// the choice depends only on the layout (`maps`), which `dealloc` and `realloc` are given unchanged.
unsafe impl GlobalAlloc for HugePageAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if maps(layout) {
            return map(layout.size(), false);
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if maps(layout) {
            return map(layout.size(), true);
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if maps(layout) {
            unmap(ptr, layout.size());
        } else {
            System.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if !maps(layout) && !maps(new) {
            return System.realloc(ptr, layout, new_size);
        }
        let fresh = self.alloc(new);
        if !fresh.is_null() {
            std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        fresh
    }
}

/// Whether [`HugePageAlloc`] maps a block of `layout` itself (a mapping starts on a page boundary at
/// least, so any alignment up to a small page's is met).
fn maps(layout: Layout) -> bool {
    layout.size() >= MAPPED_FROM && layout.align() <= 4096 && huge_pages_offered()
}

/// Whether the kernel hands out transparent huge pages on request (`enabled` is `always` or `madvise`).
/// Read once; `/sys` is read with `libc` calls because the allocator itself asks.
fn huge_pages_offered() -> bool {
    // 0: not read yet, 1: offered, 2: not.
    static OFFERED: AtomicU8 = AtomicU8::new(0);
    match OFFERED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let offered = read_thp_mode();
            OFFERED.store(if offered { 1 } else { 2 }, Ordering::Relaxed);
            offered
        }
    }
}

#[cfg(target_os = "linux")]
fn read_thp_mode() -> bool {
    let path = c"/sys/kernel/mm/transparent_hugepage/enabled";
    let mut buf = [0u8; 128];
    // SAFETY: a plain open/read/close into a stack buffer, with its length.
    let n = unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    // The file reads like `always [madvise] never`, the mode in brackets.
    let text = &buf[..n.max(0) as usize];
    text.windows(8).any(|w| w == b"[always]") || text.windows(9).any(|w| w == b"[madvise]")
}

#[cfg(not(target_os = "linux"))]
fn read_thp_mode() -> bool {
    false
}

/// Maps `size` bytes, from a huge page on on a 2 MiB boundary with huge pages asked for on its whole
/// 2 MiB blocks, which get pooled pages where the pool has them ([`pool`]: zeroed if `zeroed`; fresh
/// pages read as zero anyway); null when the kernel refuses (the caller reports the allocation failure).
#[cfg(target_os = "linux")]
unsafe fn map(size: usize, zeroed: bool) -> *mut u8 {
    let len = size.next_multiple_of(page_size());
    let anonymous = |len| {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    MAPPING.store(true, Ordering::Relaxed);
    if len < HUGE_PAGE {
        let p = anonymous(len);
        if p == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        fill_mapping(p as usize, len, zeroed);
        return p.cast();
    }
    // Map a huge page more than needed, then unmap what lies before the boundary and after the block.
    let total = len + HUGE_PAGE;
    let raw = anonymous(total);
    if raw == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let raw = raw as usize;
    let start = raw.next_multiple_of(HUGE_PAGE);
    if start > raw {
        libc::munmap(raw as *mut libc::c_void, start - raw);
    }
    if raw + total > start + len {
        libc::munmap((start + len) as *mut libc::c_void, raw + total - start - len);
    }
    let whole = len / HUGE_PAGE * HUGE_PAGE;
    // Advice only: without it the block is still valid memory, on small pages.
    libc::madvise(start as *mut libc::c_void, whole, libc::MADV_HUGEPAGE);
    fill_mapping(start, len, zeroed);
    start as *mut u8
}

/// A piece of [`pieces`] about to be written: a block takes a pooled one (true where it did); small
/// pages keep the pool's balance with the kernel ([`pool::balance`]).
///
/// # Safety
/// As for [`pool::fill`].
#[cfg(target_os = "linux")]
unsafe fn fill(addr: usize, len: usize) -> bool {
    if len == HUGE_PAGE {
        return pool::fill(addr);
    }
    pool::balance(addr, len);
    false
}

/// Gives a fresh mapping pooled pages ([`pool`]), zeroed if `zeroed` (fresh pages read as zero).
#[cfg(target_os = "linux")]
unsafe fn fill_mapping(start: usize, len: usize, zeroed: bool) {
    for (addr, len) in pieces(start, start + len) {
        // Serial: the allocator must not call into rayon (which allocates).
        if fill(addr, len) && zeroed {
            std::ptr::write_bytes(addr as *mut u8, 0, len);
        }
    }
}

/// Faults in the small pages of `addr..addr + len` writable, all at once, before a writer touches them:
/// written one by one they fault a page at a time, and a page read first (a GEMM accumulating into a
/// gradient handed back) maps the shared zero page, whose replacement on the write then flushes the other
/// threads' TLBs, an IPI per page. On the 2-vCPU Intel Xeon (2026-12-08) the faults, flushes and the page
/// tables' lock took 8% of an f32 SmolLM2-135M bench step; faulted in here, its steps ran 7-11% faster
/// (bf16: 20-25%) and took a quarter of the faults.
/// A hint: a kernel without `MADV_POPULATE_WRITE` (before 5.14) leaves them to fault as before.
///
/// # Safety
/// `addr..addr + len` are whole pages of a mapping of the caller, about to be written.
#[cfg(target_os = "linux")]
unsafe fn populate(addr: usize, len: usize) -> bool {
    libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) == 0
}

#[cfg(not(target_os = "linux"))]
unsafe fn map(_size: usize, _zeroed: bool) -> *mut u8 {
    unreachable!("huge_pages_offered is false off Linux")
}

/// Unmaps a block of [`map`], its pages kept in the pool ([`pool`]) for the next buffer.
#[cfg(target_os = "linux")]
unsafe fn unmap(ptr: *mut u8, size: usize) {
    let len = size.next_multiple_of(page_size());
    for (addr, len) in pieces(ptr as usize, ptr as usize + len) {
        if len == HUGE_PAGE {
            pool::stash(addr);
        }
    }
    libc::munmap(ptr.cast(), len);
}

#[cfg(not(target_os = "linux"))]
unsafe fn unmap(_ptr: *mut u8, _size: usize) {
    unreachable!("huge_pages_offered is false off Linux")
}

#[cfg(target_os = "linux")]
fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Whether [`release`] hands `buf`'s pages back rather than writing zeros over it: a buffer of
/// [`HugePageAlloc`]'s own mappings.
pub fn hands_back<T>(buf: &[T]) -> bool {
    MAPPING.load(Ordering::Relaxed)
        && std::mem::size_of_val(buf) >= MAPPED_FROM
        && (buf.as_ptr() as usize).is_multiple_of(4096)
}

/// Whether this process hands buffers' pages back at all ([`HugePageAlloc`] is its allocator and the
/// kernel offers huge pages): what the memory estimate needs to know. Allocates one 2 MiB buffer to
/// find out.
pub fn hands_back_pages() -> bool {
    let probe: Vec<f32> = vec![0.0; HUGE_PAGE / 4];
    hands_back(&probe)
}

/// Bytes of a buffer of `bytes` that stay in memory after [`release`] where pages are handed back: a
/// buffer under [`MAPPED_FROM`] whole (it is written with zeros), of a larger one its last, partial page.
pub fn kept_by_release(bytes: u64) -> u64 {
    match bytes {
        b if b < MAPPED_FROM as u64 => b,
        b => b % 4096,
    }
}

/// Sets every value of `buf` to zero, handing back (to the pool or the kernel) every whole page of it where
/// [`hands_back`] allows: its 2 MiB blocks and the small pages of its last, partial block (the
/// SmolLM2-135M bench then peaks 63 MiB lower than with their tails kept; [`reuse_zeroed`] faults them
/// in again before the next writer).
/// Elsewhere zeros are written (in parallel for a large buffer).
pub fn release<T: Zeroed>(buf: &mut [T]) {
    use rayon::prelude::*;
    let handed = hand_back(buf);
    let rest = &mut buf[handed..];
    const CHUNK: usize = 1 << 16;
    if rest.len() <= CHUNK {
        rest.fill(T::ZERO);
    } else {
        rest.par_chunks_mut(CHUNK).for_each(|c| c.fill(T::ZERO));
    }
}

/// Hands back the whole pages of a dead buffer where [`hands_back`] allows, writing nothing else: its
/// values are then unspecified (zero where handed back, as they were elsewhere). For buffers whose every
/// user writes before reading (spent activations, a scratch block), which need no zeros: where pages are
/// not handed back this costs nothing.
pub fn discard<T: Zeroed>(buf: &mut [T]) {
    hand_back(buf);
}

/// Hands back the whole pages at the start of `buf` where [`hands_back`] allows: its whole 2 MiB blocks
/// to the process's pool ([`pool`]; to the kernel where the pool cannot take them), the small pages
/// around them to the kernel. Returns how many of its values they held
/// (now zero).
fn hand_back<T: Zeroed>(buf: &mut [T]) -> usize {
    #[cfg(target_os = "linux")]
    if hands_back(buf) {
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf) / page_size() * page_size();
        let mut done = true;
        for (addr, len) in pieces(start, end) {
            // SAFETY: a whole 2 MiB block inside `buf` (a mapping of `HugePageAlloc`, `hands_back`),
            // dead.
            if len < HUGE_PAGE {
                pool::credit(len);
            }
            if len < HUGE_PAGE || !unsafe { pool::stash(addr) } {
                done &= advise_dontneed(addr, len);
            }
        }
        if done {
            return (end - start) / std::mem::size_of::<T>();
        }
    }
    0
}

/// `start..end` (whole pages) cut at 2 MiB boundaries: each whole 2 MiB block, then the small pages
/// before the first boundary and after the last; empty pieces left out.
#[cfg(target_os = "linux")]
fn pieces(start: usize, end: usize) -> impl Iterator<Item = (usize, usize)> {
    let first = start.next_multiple_of(HUGE_PAGE).min(end);
    let last = (end / HUGE_PAGE * HUGE_PAGE).max(first);
    let blocks = (first..last).step_by(HUGE_PAGE).map(|b| (b, HUGE_PAGE));
    // Each is short of 2 MiB: what lies before the first boundary, and after the last.
    let small = [(start, first - start), (last, end - last)];
    blocks.chain(small).filter(|&(_, l)| l > 0)
}

/// `madvise(MADV_DONTNEED)` on `len` bytes of whole pages at `addr` (nothing where `len` is 0).
#[cfg(target_os = "linux")]
fn advise_dontneed(addr: usize, len: usize) -> bool {
    // SAFETY: the callers pass whole pages of a buffer they may write, whose values are dead; pages
    // handed back read as zero, the value of a `Zeroed` type with all-zero bytes.
    len == 0 || unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) } == 0
}

/// Before a buffer handed back by [`discard`] is written again: its empty 2 MiB blocks get pooled ones
/// (contents unspecified), so the writes find pages instead of faulting fresh ones from the kernel
/// (see [`pool`]), and its small pages are faulted in at once ([`populate`]). A hint: a block not given
/// one is faulted in on its first write, as without it.
pub fn reuse<T: Zeroed>(buf: &mut [T]) {
    fill_from_pool(buf, false);
}

/// [`reuse`] for a buffer handed back by [`release`], which must still read as zero: blocks taken from
/// the pool are zeroed (a `memset`, a fifth of what the kernel's fault and zeroing cost).
pub fn reuse_zeroed<T: Zeroed>(buf: &mut [T]) {
    fill_from_pool(buf, true);
}

fn fill_from_pool<T: Zeroed>(buf: &mut [T], zero: bool) {
    #[cfg(target_os = "linux")]
    if hands_back(buf) {
        use rayon::prelude::*;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf) / page_size() * page_size();
        // SAFETY: whole pages inside `buf` (a mapping of `HugePageAlloc`), which `&mut` lets this
        // function write.
        let mut filled: Vec<(usize, usize)> = pieces(start, end).filter(|&(a, l)| unsafe { fill(a, l) }).collect();
        for (a, l) in pieces(start, end).filter(|&(_, l)| l < HUGE_PAGE) {
            // SAFETY: as above. A hint: where it fails the pages fault as they are written.
            unsafe { populate(a, l) };
        }
        if zero && !filled.is_empty() {
            // The filled pieces of `buf` (disjoint), zeroed in parallel.
            filled.sort_unstable();
            let size = std::mem::size_of::<T>();
            let (mut rest, mut at) = (&mut buf[..], start);
            let mut parts = Vec::with_capacity(filled.len());
            for (a, l) in filled {
                let (piece, tail) = std::mem::take(&mut rest)[(a - at) / size..].split_at_mut(l / size);
                parts.push(piece);
                (rest, at) = (tail, a + l);
            }
            parts.into_par_iter().for_each(|p| p.fill(T::ZERO));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_zeroes_small_and_large_buffers() {
        for n in [0, 1, 1000, HUGE_PAGE / 4 + 12345] {
            let mut v = vec![1.5f32; n];
            release(&mut v);
            assert!(v.iter().all(|&x| x == 0.0), "{n}");
            let mut w = vec![7u16; n];
            release(&mut w[..]);
            assert!(w.iter().all(|&x| x == 0), "{n}");
        }
    }

    /// The allocator's own blocks, called directly (the test binary keeps the system allocator): on a
    /// 2 MiB boundary, zeroed, writable to the last byte, grown and shrunk with their contents, and
    /// released to zeros then written again.
    #[test]
    fn huge_page_blocks_round_trip() {
        let a = HugePageAlloc;
        for size in [100, MAPPED_FROM + 8, HUGE_PAGE - 8, HUGE_PAGE, 3 * HUGE_PAGE + 4100] {
            let layout = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: a non-zero layout; the block is written within `size` and freed with its layout.
            unsafe {
                let p = a.alloc_zeroed(layout);
                assert!(!p.is_null());
                let block = std::slice::from_raw_parts_mut(p, size);
                assert!(block.iter().all(|&b| b == 0), "{size}");
                if maps(layout) && size >= HUGE_PAGE {
                    assert!((p as usize).is_multiple_of(HUGE_PAGE), "{size}");
                }
                block.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
                let grown = a.realloc(p, layout, size * 2);
                let grown_layout = Layout::from_size_align(size * 2, 8).unwrap();
                let g = std::slice::from_raw_parts_mut(grown, size * 2);
                assert!(g[..size].iter().enumerate().all(|(i, &b)| b == i as u8), "{size}");
                g.fill(3);
                let floats = std::slice::from_raw_parts_mut(grown.cast::<f32>(), size * 2 / 4);
                discard(floats);
                let handed = if hands_back(floats) { size * 2 / 4096 * 1024 } else { 0 };
                assert!(floats[..handed].iter().all(|&x| x == 0.0), "{size}");
                assert!(floats[handed..].iter().all(|&x| x.to_bits() == 0x0303_0303), "{size}");
                release(floats);
                assert!(floats.iter().all(|&x| x == 0.0), "{size}");
                floats.fill(2.0);
                assert!(floats.iter().all(|&x| x == 2.0), "{size}");
                a.dealloc(grown, grown_layout);
            }
        }
    }

    /// Blocks handed back go through the pool to the next buffer written: [`reuse`] gives an empty
    /// buffer pooled pages (it is then resident before any write), [`reuse_zeroed`] zeroes what it
    /// gives, and either way what is written afterwards stays. Other tests share the pool (the
    /// allocator test maps and unmaps), so the move itself is asserted over a few tries.
    #[cfg(target_os = "linux")]
    #[test]
    fn pooled_blocks_go_to_the_next_buffer_written() {
        let a = HugePageAlloc;
        let size = 3 * HUGE_PAGE + 3 * 4096;
        let layout = Layout::from_size_align(size, 64).unwrap();
        if !maps(layout) {
            return; // no huge pages offered: nothing is mapped or pooled
        }
        let floats = size / 4;
        // Pooling starts as at the first backward pass (the test must not depend on another running first).
        pool::start();
        // SAFETY: two blocks of `layout`, used as f32 slices of their length, freed with it.
        unsafe {
            let (pa, pb) = (a.alloc_zeroed(layout), a.alloc_zeroed(layout));
            let fa = std::slice::from_raw_parts_mut(pa.cast::<f32>(), floats);
            let fb = std::slice::from_raw_parts_mut(pb.cast::<f32>(), floats);
            let mut moved = false;
            for _ in 0..10 {
                fa.fill(7.0);
                discard(fa);
                assert!(fa.iter().all(|&x| x == 0.0), "handed back pages read as zero");
                release(fb);
                reuse(fb);
                moved |= pool::residency(pb as usize, HUGE_PAGE) == Some(true);
                fb.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
                assert!(fb.iter().enumerate().all(|(i, &x)| x == i as f32));
                fa.fill(5.0);
                discard(fa);
                release(fb);
                reuse_zeroed(fb);
                assert!(fb.iter().all(|&x| x == 0.0), "a buffer released then reused reads as zero");
                if moved {
                    break;
                }
            }
            assert!(moved || std::env::var_os("DPO_NO_PAGE_POOL").is_some(), "no pooled block reached the buffer");
            a.dealloc(pa, layout);
            a.dealloc(pb, layout);
        }
    }

    /// The small pages of a buffer handed back are in memory again once [`reuse_zeroed`] returns, before
    /// anything is written (where the kernel has `MADV_POPULATE_WRITE`), and read as zero.
    #[cfg(target_os = "linux")]
    #[test]
    fn reuse_faults_in_the_small_pages_before_the_writes() {
        let a = HugePageAlloc;
        let size = HUGE_PAGE + 5 * 4096;
        let layout = Layout::from_size_align(size, 64).unwrap();
        if !maps(layout) {
            return;
        }
        // SAFETY: a block of `layout`, used as an f32 slice of its length, freed with it; `tail` is its
        // last five pages.
        unsafe {
            let p = a.alloc_zeroed(layout);
            let f = std::slice::from_raw_parts_mut(p.cast::<f32>(), size / 4);
            let tail = p as usize + HUGE_PAGE;
            f.fill(3.0);
            release(f);
            assert_eq!(pool::residency(tail, 5 * 4096), None, "the small pages went back to the kernel");
            reuse_zeroed(f);
            let resident = pool::residency(tail, 5 * 4096);
            let supported = populate(tail, 5 * 4096);
            assert!(resident == Some(true) || !supported, "reuse left the small pages to fault one by one");
            assert!(f.iter().all(|&x| x == 0.0));
            a.dealloc(p, layout);
        }
    }
}
