//! Audit verification holds a page of the trail, not the trail: measured
//! with a counting allocator (this test binary's own, so nothing else runs
//! beside it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::Fixture;
use piivault::VaultError;
use piivault::vault::Requester;

/// The system allocator, counting the bytes live now and the most live
/// since the last [`reset_peak`].
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

#[allow(unsafe_code)] // a global allocator is unsafe by definition; this one only counts
// SAFETY: every call is forwarded to `System` unchanged; the counters are
// plain atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `System::alloc`, with the caller's layout.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn reset_peak() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// 1,501 records of 100 tokens each, a tokenize and 1,500 reads of its
/// tokens (about 12 MiB once decoded with their token index, which the old
/// verification held at once): verifying them
/// allocates at most 4 MiB beyond what was live before, the head is the
/// last record, and a second verification while one runs is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifying_a_large_trail_holds_one_page() {
    const RECORDS: usize = 1501;
    let fx = Fixture::new();
    let vault = fx.create().await;
    // One tokenize of 100 values, then reads of all 100 tokens: each read's
    // record lists them, and the token index holds each under each.
    let values: Vec<piivault::PiiValue> = (0..100).map(|i| piivault::PiiValue::from(format!("Person {i}"))).collect();
    let tokens: Vec<String> = vault
        .tokenize(&Requester::named("loader"), "name", values)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.unwrap().into_string())
        .collect();
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..(RECORDS - 1) / 10 {
        let vault = vault.clone();
        let tokens = tokens.clone();
        readers.spawn(async move {
            for _ in 0..10 {
                let read = vault.detokenize(&Requester::named("reader"), "name", tokens.clone()).await.unwrap();
                assert!(read.iter().all(Result::is_ok));
            }
        });
    }
    while let Some(done) = readers.join_next().await {
        done.unwrap();
    }
    let head = vault.audit_head().await.unwrap();
    assert_eq!(head.seq, RECORDS as u64);

    let before = reset_peak();
    let verified = vault.verify_audit().await.unwrap().unwrap();
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert_eq!(verified, head);
    eprintln!("verification allocated {} KiB at its peak", peak >> 10);
    assert!(peak < 4 << 20, "verification allocated {} KiB at its peak", peak >> 10);

    let (first, second) = tokio::join!(vault.verify_audit(), vault.verify_audit());
    assert_eq!(first.unwrap().unwrap(), head);
    assert!(matches!(second, Err(VaultError::VerifyBusy)), "{:?}", second.map(|r| r.is_ok()));
}
