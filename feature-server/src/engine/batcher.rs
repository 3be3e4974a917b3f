//! The engine thread: the only code that touches the model.
//!
//! It takes the first waiting item, then gathers more until the batch is full or the first
//! item has waited `max_wait`, runs one forward pass, and answers every item through its own
//! oneshot. A failing or panicking forward fails that batch's items and nothing else; the loop
//! ends when every sender is gone and the queue is drained (graceful shutdown).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use tokio::sync::oneshot;

use super::stats::{Gate, Stats};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::preprocess::INPUT_SIZE;

/// Floats in one preprocessed image.
pub(crate) const ITEM_LEN: usize = 3 * INPUT_SIZE * INPUT_SIZE;

/// Most views one item may carry (`taxon.v1.ViewSet::ScalesAndMirrors` has four).
pub const MAX_VIEWS: usize = 4;

/// One preprocessed item on its way to the model: one or more views of one image, laid end to
/// end; its embedding is the mean of theirs. The views travel together so that an item takes
/// one queue slot and is answered from one batch.
pub(crate) struct Job {
    pub pixels: Vec<f32>,
    pub reply: oneshot::Sender<Result<Vec<f32>>>,
    /// The item's place in the queue, given back as soon as the engine takes the item.
    pub slot: super::QueueSlot,
    /// When it was queued, for the queue-wait histogram.
    pub queued: Instant,
    /// The trace id of the request it belongs to, when the caller sent one.
    pub trace: Option<u128>,
}

/// The model and what the loop needs beside it.
pub(crate) struct Batcher {
    pub model: Box<dyn super::Model>,
    pub device: Device,
    pub max_batch: usize,
    pub max_wait: Duration,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    pub gate: Arc<Gate>,
}

impl Batcher {
    /// Runs until every sender has hung up and the queue is empty.
    pub fn run(self, rx: Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            self.gate.wait_open();
            let batch = self.gather(first, &rx);
            self.answer(batch);
        }
        tracing::info!("engine queue closed and drained; engine thread exits");
    }

    /// Fills a batch behind `first`: whatever is already queued, then whatever arrives before
    /// the first item has waited `max_wait`. `max_batch` counts images (views), so a batch may
    /// pass it by the views of its last item, at most `MAX_VIEWS - 1`.
    fn gather(&self, first: Job, rx: &Receiver<Job>) -> Vec<Job> {
        let deadline = Instant::now() + self.max_wait;
        let mut images = first.pixels.len() / ITEM_LEN;
        let mut batch = vec![first];
        while images < self.max_batch {
            match rx.try_recv() {
                Ok(job) => {
                    images += job.pixels.len() / ITEM_LEN;
                    batch.push(job);
                    continue;
                }
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(job) => {
                    images += job.pixels.len() / ITEM_LEN;
                    batch.push(job);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        batch
    }

    /// Runs one forward pass over the batch and replies to each item.
    fn answer(&self, batch: Vec<Job>) {
        // Items whose caller went away (a cancelled stream) are not worth a forward pass.
        let mut live = Vec::with_capacity(batch.len());
        let mut traces: Vec<u128> = Vec::new();
        let formed = Instant::now();
        for job in batch {
            let Job {
                pixels,
                reply,
                slot,
                queued,
                trace,
            } = job;
            if let Some(t) = trace
                && !traces.contains(&t)
            {
                traces.push(t);
            }
            drop(slot);
            let waited = formed.saturating_duration_since(queued);
            self.metrics
                .queue_wait_seconds
                .observe(waited.as_secs_f64());
            if reply.is_closed() {
                continue;
            }
            let views = pixels.len() / ITEM_LEN;
            if pixels.len() % ITEM_LEN != 0 || !(1..=MAX_VIEWS).contains(&views) {
                let got = pixels.len();
                let _ = reply.send(Err(Error::Internal(format!(
                    "preprocessed item has {got} values, expected 1 to {MAX_VIEWS} times {ITEM_LEN}"
                ))));
                continue;
            }
            live.push((pixels, views, reply));
        }
        if live.is_empty() {
            return;
        }
        let n: usize = live.iter().map(|(_, views, _)| views).sum();
        let started = Instant::now();
        let mut input = Vec::with_capacity(n * ITEM_LEN);
        let images = live.len();
        let mut replies = Vec::with_capacity(images);
        for (pixels, views, reply) in live {
            input.extend_from_slice(&pixels);
            replies.push((views, reply));
        }
        let forward_started = Instant::now();
        let result = self.forward(input, n);
        // Counted before anyone is answered, so a client that has its answer sees the count.
        self.stats.record(n, images);
        self.metrics.batch_views.observe(n as f64);
        self.metrics
            .forward_seconds
            .observe(forward_started.elapsed().as_secs_f64());
        // A batch serves many requests: it names their traces, so that a request's trace leads
        // to the forward pass that served it. Logged before anyone is answered, like the count.
        let trace_ids: Vec<String> = traces.iter().map(|t| format!("{t:032x}")).collect();
        tracing::debug!(
            batch = n,
            images,
            trace_ids = %trace_ids.join(","),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "batch done"
        );
        match result {
            Ok(rows) => {
                let mut rows = rows.into_iter();
                for (views, reply) in replies {
                    let _ = reply.send(Ok(mean(rows.by_ref().take(views))));
                }
            }
            Err(err) => {
                tracing::error!(batch = n, error = %err, "forward pass failed; failing its items");
                let message = err.to_string();
                for (_, reply) in replies {
                    let _ = reply.send(Err(Error::Internal(message.clone())));
                }
            }
        }
    }

    /// `n` images laid end to end -> `n` embeddings. A panic inside candle becomes an error.
    pub(crate) fn forward(&self, input: Vec<f32>, n: usize) -> Result<Vec<Vec<f32>>> {
        let run = || -> Result<Vec<Vec<f32>>> {
            let x = Tensor::from_vec(input, (n, 3, INPUT_SIZE, INPUT_SIZE), &self.device)?;
            let y = self.model.forward(&x)?.to_dtype(DType::F32)?;
            let rows = y.to_vec2::<f32>()?;
            if rows.len() != n {
                return Err(Error::Internal(format!(
                    "model returned {} rows for {n} images",
                    rows.len()
                )));
            }
            Ok(rows)
        };
        catch_unwind(AssertUnwindSafe(run)).unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(Error::Internal(format!("forward pass panicked: {what}")))
        })
    }
}

/// The element-wise mean of one item's view embeddings (the one row itself for one view).
fn mean(rows: impl Iterator<Item = Vec<f32>>) -> Vec<f32> {
    let mut count = 0usize;
    let mut sum: Vec<f32> = Vec::new();
    for row in rows {
        if count == 0 {
            sum = row;
        } else {
            sum.iter_mut().zip(&row).for_each(|(s, v)| *s += v);
        }
        count += 1;
    }
    if count > 1 {
        let scale = 1.0 / count as f32;
        sum.iter_mut().for_each(|s| *s *= scale);
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::mean;

    #[test]
    fn mean_of_views() {
        assert_eq!(mean(vec![vec![1.0, -2.0]].into_iter()), vec![1.0, -2.0]);
        let rows = vec![
            vec![1.0, 0.0],
            vec![3.0, 4.0],
            vec![2.0, 2.0],
            vec![2.0, -2.0],
        ];
        assert_eq!(mean(rows.into_iter()), vec![2.0, 1.0]);
    }
}
