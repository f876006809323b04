//! The process's pool of huge blocks taken out of dead buffers, for the next buffer written.
//!
//! Why not hand them to the kernel: a page handed back costs a fault and the kernel's zeroing when it is
//! written again, and on a virtual machine that reports free memory to its host (virtio-balloon's free
//! page reporting, on in the VMs this project is measured on) a free 2 MiB block is given to the host
//! about two seconds after it is freed and costs ten times that to get back: 512 MiB written again
//! after a 3 s pause, 620 ms against 62 ms without the pause and 20 ms for a `memset` of resident
//! memory (AMD EPYC VM, 2026-12-07). Training steps of several seconds paid it every step (12% of a
//! GPT-2 bf16 step there). So a dead buffer's whole 2 MiB blocks are moved into this pool instead
//! (`mremap` with `MREMAP_DONTUNMAP`: page tables only, the buffer's range stays mapped and reads as
//! zero) and [`fill`] moves them into the next buffer about to be written (512 MiB out and in again:
//! 1.3 ms each way). Memory still goes from the activations to the gradients and back, without the
//! kernel's zeroing or the host.
//!
//! The small pages around a buffer's blocks (the last, partial 2 MiB of a large buffer, all of one
//! under 2 MiB) still go to the kernel: moved page by page they would split the mappings into ever
//! more pieces (the kernel's limit on mappings is 65530; tried: ~850 more a GPT-2 step). The pool keeps
//! the balance instead ([`balance`]): a buffer about to fault small pages from the kernel hands the
//! kernel as many bytes of pooled blocks, less the small pages handed to the kernel since the
//! optimizer's last step ([`credit`], [`settle`]). Without that the activations' small pages (more
//! than the gradients') would come back from the kernel in the forward pass while the gradients'
//! blocks sit in the pool, and the step's peak would hold both (55 MiB more on the GPT-2 bf16 bench).
//!
//! Pooled blocks live at fixed slots of one address range reserved (`PROT_NONE`) on first use; a
//! slot's block given back to a buffer leaves it mapped, empty, so no other mapping can take its place.
//! Where `mremap` refuses (kernels before 5.7) the pool turns itself off and blocks go to the kernel as
//! before.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::HUGE_PAGE;

/// Slots in the reserved range: 64 GiB of address space (blocks beyond it go to the kernel).
const SLOTS: usize = 32 << 10;

/// The small page `mincore` reports on.
const PAGE: usize = 4096;

/// Cleared when `mremap` refuses a move: pages then go to the kernel.
static ON: AtomicBool = AtomicBool::new(true);

/// Set by [`start`], at the first backward pass: dead buffers before it go to the kernel.
static STARTED: AtomicBool = AtomicBool::new(false);

/// Starts pooling dead buffers' blocks (the engine calls it at the start of every backward pass).
///
/// Why not from the start of the process: the pool serves a training step's cycle, the activations
/// handed back in backward becoming the gradients and the gradients handed back by the optimizer step
/// becoming the next forward's activations. Before the first backward nothing cycles: loading frees
/// each f32 tensor once stored in NF4 or bf16, and a buffer allocated before those frees (a random base's
/// tensors are all allocated first, then drawn) never takes their blocks, so pooled they stayed resident
/// until the end: `dpo bench --arch smollm2-1.7b --quantize nf4` held 6.6 GB of dead f32 blocks against
/// 1.6 GB without the pool (AMD EPYC, 2026-12-07), and Llama-3-8B's would have held 32 GB. Commands that
/// never train (scoring, generation) never pool.
pub fn start() {
    STARTED.store(true, Ordering::Relaxed);
}

/// Slot lists in fixed arrays: the allocator calls into the pool, so the pool must not allocate.
struct Pool {
    /// Start of the reserved range (on a 2 MiB boundary); 0 until first use.
    base: usize,
    /// `blocks[..n_blocks]`: slots holding a huge block, last in first out.
    blocks: [u32; SLOTS],
    n_blocks: usize,
    /// Bytes of small pages buffers are about to fault from the kernel less those handed to the kernel,
    /// since the last [`settle`], not yet matched by a block handed to the kernel from the pool.
    debt: isize,
    /// `empty[..n_empty]`: slots whose pages have gone back to buffers.
    empty: [u32; SLOTS],
    n_empty: usize,
    /// Slots never used: `next..SLOTS`.
    next: usize,
}

static POOL: Mutex<Pool> =
    Mutex::new(Pool { base: 0, blocks: [0; SLOTS], n_blocks: 0, debt: 0, empty: [0; SLOTS], n_empty: 0, next: 0 });

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // A panic while the lock was held leaves the slot lists consistent (each push or pop is whole).
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    fn slot_addr(&self, slot: usize) -> usize {
        self.base + slot * HUGE_PAGE
    }

    /// A slot to move pages into (reserving the range on first use).
    fn take_empty(&mut self) -> Option<usize> {
        if self.base == 0 && !self.reserve() {
            return None;
        }
        if let Some(n) = self.n_empty.checked_sub(1) {
            self.n_empty = n;
            return Some(self.empty[n] as usize);
        }
        (self.next < SLOTS).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    fn put_empty(&mut self, slot: usize) {
        self.empty[self.n_empty] = slot as u32;
        self.n_empty += 1;
    }

    /// Reserves the slots' address range (no memory: `PROT_NONE`, no swap reserved).
    fn reserve(&mut self) -> bool {
        // SAFETY: sysconf only reads a system constant.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        if page != PAGE || std::env::var_os("DPO_NO_PAGE_POOL").is_some() {
            ON.store(false, Ordering::Relaxed);
            return false;
        }
        let len = (SLOTS + 1) * HUGE_PAGE;
        // SAFETY: a fresh anonymous mapping the kernel places; nothing else is touched.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            ON.store(false, Ordering::Relaxed);
            return false;
        }
        self.base = (raw as usize).next_multiple_of(HUGE_PAGE);
        true
    }
}

/// Whether any of the `len` bytes at `addr` (whole small pages, at most 2 MiB) are in memory: `Some(all)`
/// if some are, `None` if none.
pub(super) fn residency(addr: usize, len: usize) -> Option<bool> {
    let mut vec = [0u8; HUGE_PAGE / PAGE];
    let pages = len / PAGE;
    // SAFETY: `addr..addr + len` is mapped (a caller's buffer or a slot); `vec` has a byte for each of
    // its small pages.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, len, vec.as_mut_ptr()) };
    if r != 0 {
        // Unknown: counted as partly resident, so nothing is moved onto it and all of it is kept.
        return Some(false);
    }
    let resident = vec[..pages].iter().filter(|&&b| b & 1 != 0).count();
    (resident > 0).then_some(resident == pages)
}

/// Moves the `len` bytes of pages at `from` onto `to`, leaving `from` mapped and empty.
///
/// # Safety
/// Both are whole pages of private anonymous mappings that nothing else reads or writes meanwhile;
/// whatever `to` held is dropped.
unsafe fn move_pages(from: usize, len: usize, to: usize) -> bool {
    let flags = libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP;
    let p = libc::mremap(from as *mut libc::c_void, len, len, flags, to as *mut libc::c_void);
    if p as usize == to {
        return true;
    }
    ON.store(false, Ordering::Relaxed);
    false
}

/// Moves the dead 2 MiB block at `addr` into the pool. True where it is handled: pooled, or nothing of
/// it was in memory; false where the pool cannot take it (off, full, or the kernel refused) and the
/// caller hands it to the kernel.
///
/// # Safety
/// `addr` is a 2 MiB block, on a 2 MiB boundary, of a private anonymous mapping owned by the caller,
/// whose contents are dead.
pub(super) unsafe fn stash(addr: usize) -> bool {
    if !ON.load(Ordering::Relaxed) || !STARTED.load(Ordering::Relaxed) {
        return false;
    }
    if residency(addr, HUGE_PAGE).is_none() {
        // Already empty: reads as zero, nothing to keep.
        return true;
    }
    let mut p = pool();
    let Some(slot) = p.take_empty() else { return false };
    if !move_pages(addr, HUGE_PAGE, p.slot_addr(slot)) {
        p.put_empty(slot);
        return false;
    }
    let n = p.n_blocks;
    p.blocks[n] = slot as u32;
    p.n_blocks += 1;
    true
}

/// Moves a pooled block onto the empty 2 MiB block at `addr`. True where one was moved (the block then
/// holds unspecified values); false where the pool has none, or the block holds pages already
/// (written since it was emptied).
///
/// # Safety
/// As for [`stash`], for a block about to be written.
pub(super) unsafe fn fill(addr: usize) -> bool {
    if !ON.load(Ordering::Relaxed) {
        return false;
    }
    let mut p = pool();
    if p.n_blocks == 0 || residency(addr, HUGE_PAGE).is_some() {
        return false;
    }
    p.n_blocks -= 1;
    let slot = p.blocks[p.n_blocks] as usize;
    if move_pages(p.slot_addr(slot), HUGE_PAGE, addr) {
        p.put_empty(slot);
        return true;
    }
    p.n_blocks += 1;
    false
}

/// Before `len` bytes of small pages at `addr` (short of a block) are written: if none is in memory
/// they will be faulted from the kernel, so as many bytes of pooled blocks go to the kernel, a block
/// each time the debt reaches 2 MiB (module documentation).
///
/// # Safety
/// `addr..addr + len` are whole pages of a mapping of the caller.
pub(super) unsafe fn balance(addr: usize, len: usize) {
    if len == 0 || !ON.load(Ordering::Relaxed) || residency(addr, len).is_some() {
        return;
    }
    let mut p = pool();
    p.debt += len as isize;
    while p.debt >= HUGE_PAGE as isize && p.n_blocks > 0 {
        p.n_blocks -= 1;
        let slot = p.blocks[p.n_blocks] as usize;
        // The slot stays mapped, empty; its pages go to the kernel.
        libc::madvise(p.slot_addr(slot) as *mut libc::c_void, HUGE_PAGE, libc::MADV_DONTNEED);
        p.put_empty(slot);
        p.debt -= HUGE_PAGE as isize;
    }
    // Debt with no block to match it is forgotten: the pages it stands for are new memory.
    if p.n_blocks == 0 {
        p.debt = p.debt.min(0);
    }
}

/// Small pages handed to the kernel: buffers may fault as many back before the pool gives up blocks.
pub(super) fn credit(len: usize) {
    if len > 0 && ON.load(Ordering::Relaxed) {
        pool().debt -= len as isize;
    }
}

/// Starts a new balance (called once a training step, when the optimizer hands the gradients back):
/// small pages handed to the kernel in one step are not owed to the next, whose pages differ in kind
/// (module documentation).
pub fn settle() {
    pool().debt = 0;
}
