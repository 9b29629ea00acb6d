//! Heap allocations per admission, counted by a global allocator wrapper: the pure core
//! (`kips::webhook::review::review`) for every fixture, and the typical pod split into stages.
//!
//! `cargo bench --bench admission_allocations`. Counts, not times: they do not depend on
//! the machine's load.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use kips::inject::InjectConfig;
use kips::webhook::review as admission;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grow(bytes: usize) {
    ALLOCATIONS.fetch_add(1, Relaxed);
    BYTES.fetch_add(bytes, Relaxed);
    let live = LIVE.fetch_add(bytes, Relaxed) + bytes;
    PEAK.fetch_max(live, Relaxed);
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        grow(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A realloc is one more allocation call; count the growth as allocated bytes.
        LIVE.fetch_sub(layout.size(), Relaxed);
        grow(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocation calls, bytes requested, and peak live bytes above the start, per call of `f`.
struct Counted {
    allocations: f64,
    bytes: f64,
    peak: usize,
}

fn count<T>(runs: usize, mut f: impl FnMut() -> T) -> Counted {
    drop(black_box(f())); // warm lazies (thread-locals, one-time tables) outside the count
    let (allocations, bytes) = (ALLOCATIONS.load(Relaxed), BYTES.load(Relaxed));
    let live = LIVE.load(Relaxed);
    PEAK.store(live, Relaxed);
    for _ in 0..runs {
        drop(black_box(f()));
    }
    Counted {
        allocations: (ALLOCATIONS.load(Relaxed) - allocations) as f64 / runs as f64,
        bytes: (BYTES.load(Relaxed) - bytes) as f64 / runs as f64,
        peak: PEAK.load(Relaxed) - live,
    }
}

fn row(name: &str, body_len: usize, counted: &Counted) {
    println!(
        "| {name:<32} | {:>9} | {:>11.1} | {:>12.0} | {:>14} |",
        body_len, counted.allocations, counted.bytes, counted.peak
    );
}

fn main() {
    const RUNS: usize = 200;
    let config = InjectConfig::default();
    println!("\nHeap allocations per admission (mean of {RUNS} runs after one warm-up)\n");
    println!(
        "| {:<32} | {:>9} | {:>11} | {:>12} | {:>14} |",
        "case", "body B", "allocations", "bytes alloc", "peak live B"
    );
    println!(
        "|{:-<34}|{:->11}|{:->13}|{:->14}|{:->16}|",
        "", "", "", "", ""
    );
    for fixture in common::all_fixtures() {
        common::assert_patched(&fixture, &config);
        let counted = count(RUNS, || admission::review(&fixture.body, &config));
        row(
            &format!("review {}", fixture.name),
            fixture.body.len(),
            &counted,
        );
    }
    let reinvoked = common::reinvoked_pod(&config);
    let counted = count(RUNS, || admission::review(&reinvoked.body, &config));
    row("review pod-reinvoked", reinvoked.body.len(), &counted);
    let typical = common::fixture("pod", "typical");
    let decide = count(RUNS, || admission::decide(&typical.body, &config));
    row("  pod-typical: decide", typical.body.len(), &decide);
    let whole = count(RUNS, || admission::review(&typical.body, &config));
    let respond = Counted {
        allocations: whole.allocations - decide.allocations,
        bytes: whole.bytes - decide.bytes,
        peak: whole.peak,
    };
    row(
        "  pod-typical: respond (diff)",
        typical.body.len(),
        &respond,
    );
}
