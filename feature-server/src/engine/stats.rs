//! Counters the engine thread keeps, and the pause gate tests use to hold it still.
//!
//! The counters exist so that batching is observable: a test (or an operator reading the
//! logs) can see that items from several streams really were merged into one forward pass.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};

/// Monotonic counters, updated by the engine thread after every batch.
#[derive(Debug, Default)]
pub struct Stats {
    batches: AtomicU64,
    images: AtomicU64,
    items: AtomicU64,
    largest_batch: AtomicU64,
    multi_item_batches: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Forward passes run (the warm-up excluded).
    pub batches: u64,
    /// Images embedded by those passes (an image sent with several views counts once).
    pub images: u64,
    /// Items (views) embedded by those passes.
    pub items: u64,
    /// The largest batch so far.
    pub largest_batch: u64,
    /// Batches that held more than one item.
    pub multi_item_batches: u64,
}

impl Stats {
    /// One forward pass of `batch_size` views from `images` images.
    pub(crate) fn record(&self, batch_size: usize, images: usize) {
        let n = batch_size as u64;
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.images.fetch_add(images as u64, Ordering::Relaxed);
        self.items.fetch_add(n, Ordering::Relaxed);
        self.largest_batch.fetch_max(n, Ordering::Relaxed);
        if n > 1 {
            self.multi_item_batches.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            batches: self.batches.load(Ordering::Relaxed),
            images: self.images.load(Ordering::Relaxed),
            items: self.items.load(Ordering::Relaxed),
            largest_batch: self.largest_batch.load(Ordering::Relaxed),
            multi_item_batches: self.multi_item_batches.load(Ordering::Relaxed),
        }
    }
}

/// Holds the engine thread before it forms its next batch, while the gate is closed. Tests
/// close it to fill the queue deterministically (no sleeps); production never touches it.
#[derive(Debug, Default)]
pub struct Gate {
    closed: Mutex<bool>,
    changed: Condvar,
}

impl Gate {
    pub fn close(&self) {
        *self.lock() = true;
    }

    pub fn open(&self) {
        *self.lock() = false;
        self.changed.notify_all();
    }

    /// Blocks the calling (engine) thread while the gate is closed.
    pub(crate) fn wait_open(&self) {
        let mut closed = self.lock();
        while *closed {
            closed = self
                .changed
                .wait(closed)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, bool> {
        // A bool cannot be left half-written, so a poisoned lock is still a good lock.
        self.closed
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
