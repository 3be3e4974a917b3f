//! The engine: one OS thread owns the model; everything else talks to it through [`Engine`].
//!
//! The split follows text-embeddings-inference. An item's life:
//! 1. it takes a *queue slot*, one semaphore permit per image it will put through the model
//!    (one per view; waits while all `queue_capacity` are taken, which is the backpressure
//!    every stream feels);
//! 2. it is decoded and preprocessed on tokio's blocking pool, at most `decode_threads` at
//!    once, so neither the async runtime nor memory is at the mercy of large images; before
//!    decoding, it reserves what its header says decoding will take from one byte budget
//!    shared by every decode thread (`decode_budget_bytes`), waiting while others hold it;
//! 3. it goes over a bounded channel to the engine thread, which merges items from every
//!    stream into batches and hands the slot back as it takes the item;
//! 4. its embedding (or error) comes back through its own oneshot.
//!
//! Memory is bounded by construction: at most `queue_capacity` preprocessed images (views)
//! wait, at most `max_batch` are in the model (plus the other views of its last item), and at
//! most `decode_threads` images are being decoded, holding at most `decode_budget_bytes`.
//!
//! If the engine thread dies (a panic outside the paths that catch one), its state turns
//! [`State::Failed`]: the server reports NOT_SERVING and `run` returns the error, so the process
//! exits non-zero and an orchestrator restarts it.

mod batcher;
mod stats;

use prost::bytes::Bytes;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};

use candle_core::{Device, Tensor};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};

pub use self::batcher::MAX_VIEWS;
use self::batcher::{Batcher, ITEM_LEN, Job};
pub use self::stats::{Gate, Stats, StatsSnapshot};
use crate::config::{Config, DeviceChoice};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::models::{Backbone, BackboneKind, Precision};
use crate::preprocess::{self, Limits, View};

/// What a loaded engine runs, for `Info` and for the identity on every embedding.
#[derive(Clone, Debug)]
pub struct ModelMeta {
    pub backbone: BackboneKind,
    pub dim: usize,
    pub weights_sha256: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// What the backbone computes in.
    pub precision: Precision,
    /// `<backbone>@sha256:<hex>[+<dtype>]`, see [`taxon_proto::model_identity`].
    pub model: String,
}

/// Where the engine thread is in its life.
#[derive(Clone, Debug)]
pub enum State {
    /// Loading the weights or running the warm-up batch.
    Loading,
    /// Warmed up and taking work.
    Ready(Arc<ModelMeta>),
    /// Loading or warm-up failed; the message is the error's.
    Failed(String),
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` once closed: new items get `ShuttingDown`, queued ones are still answered.
    tx: Mutex<Option<SyncSender<Job>>>,
    slots: Arc<Semaphore>,
    capacity: usize,
    /// Items sent to the engine thread and not yet taken into a batch.
    depth: Arc<watch::Sender<usize>>,
    /// `Embed` streams open.
    streams: Arc<watch::Sender<usize>>,
    decoders: Arc<Semaphore>,
    /// Decoded bytes held over all decode threads, one permit per KiB.
    budget: Arc<Semaphore>,
    budget_bytes: u64,
    limits: Limits,
    state: watch::Receiver<State>,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    gate: Arc<Gate>,
    thread: Mutex<Option<std::thread::JoinHandle<Result<()>>>>,
}

impl Engine {
    /// Starts the engine thread, which loads the configured weights and runs a warm-up batch;
    /// watch [`Engine::ready`] for the outcome. Returns at once.
    pub fn spawn(config: &Config) -> Result<Engine> {
        let (kind, weights) = (config.backbone, config.weights.clone());
        let precision = config.precision;
        Self::spawn_with(
            config,
            Box::new(move |device| {
                let (model, sha) = Backbone::load(kind, &weights, device, precision)?;
                Ok((Box::new(model) as Box<dyn Model>, sha))
            }),
        )
    }

    /// Like [`Engine::spawn`], with the model made by `loader` on the engine thread: tests and
    /// benches use it to put a cheap stand-in behind the real queue, batcher and service.
    pub fn spawn_with(config: &Config, loader: Loader) -> Result<Engine> {
        config.validate()?;
        let (tx, rx) = sync_channel::<Job>(config.queue_capacity);
        let (state_tx, state) = watch::channel(State::Loading);
        let stats = Arc::new(Stats::default());
        let metrics = Arc::new(Metrics::default());
        let gate = Arc::new(Gate::default());
        let (kind, choice, precision) = (config.backbone, config.device, config.precision);
        let (max_batch, max_wait) = (config.max_batch, config.max_wait);
        let (thread_stats, thread_gate) = (stats.clone(), gate.clone());
        let thread_metrics = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("taxon-engine".into())
            .spawn(move || {
                let started = std::time::Instant::now();
                let loaded = (|| {
                    let device = make_device(choice)?;
                    let (model, sha) = loader(&device)?;
                    let batcher = Batcher {
                        model,
                        device,
                        max_batch,
                        max_wait,
                        stats: thread_stats,
                        metrics: thread_metrics,
                        gate: thread_gate,
                    };
                    // The first pass allocates and tunes; pay for it before health says SERVING.
                    batcher.forward(vec![0.0; ITEM_LEN], 1)?;
                    Ok::<_, Error>((batcher, sha))
                })();
                match loaded {
                    Ok((batcher, sha)) => {
                        let meta = ModelMeta {
                            backbone: kind,
                            dim: batcher.model.dim(),
                            model: taxon_proto::model_identity(
                                kind.as_str(),
                                &sha,
                                precision.as_str(),
                            ),
                            weights_sha256: sha,
                            device: choice.to_string(),
                            precision,
                        };
                        tracing::info!(
                            model = %meta.model,
                            dim = meta.dim,
                            device = %meta.device,
                            dtype = %meta.precision,
                            secs = started.elapsed().as_secs_f64(),
                            "model loaded and warmed up"
                        );
                        state_tx.send_replace(State::Ready(Arc::new(meta)));
                        // The forward pass catches its own panics; one anywhere else in the
                        // loop ends the thread, and that must be seen, not just logged.
                        match catch_unwind(AssertUnwindSafe(|| batcher.run(rx))) {
                            Ok(()) => Ok(()),
                            Err(panic) => {
                                let message = format!(
                                    "the engine thread panicked: {}",
                                    panic_message(&*panic)
                                );
                                tracing::error!(error = %message, "engine thread died");
                                state_tx.send_replace(State::Failed(message.clone()));
                                Err(Error::Internal(message))
                            }
                        }
                    }
                    Err(err) => {
                        tracing::error!(error = %err, "engine failed to start");
                        state_tx.send_replace(State::Failed(err.to_string()));
                        Err(err)
                    }
                }
            })?;
        Ok(Engine {
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                slots: Arc::new(Semaphore::new(config.queue_capacity)),
                capacity: config.queue_capacity,
                depth: Arc::new(watch::Sender::new(0)),
                streams: Arc::new(watch::Sender::new(0)),
                decoders: Arc::new(Semaphore::new(config.decode_threads)),
                budget: Arc::new(Semaphore::new(kib(config.decode_budget_bytes) as usize)),
                budget_bytes: config.decode_budget_bytes,
                limits: config.limits,
                state,
                stats,
                metrics,
                gate,
                thread: Mutex::new(Some(thread)),
            }),
        })
    }

    /// Waits until the model is loaded and warmed up.
    pub async fn ready(&self) -> Result<Arc<ModelMeta>> {
        let mut state = self.inner.state.clone();
        let state = state
            .wait_for(|s| !matches!(s, State::Loading))
            .await
            .map_err(|_| Error::Internal("engine thread ended while loading".into()))?
            .clone();
        match state {
            State::Ready(meta) => Ok(meta),
            State::Failed(message) => Err(Error::Internal(format!(
                "engine failed to start: {message}"
            ))),
            State::Loading => Err(Error::Internal("engine still loading".into())),
        }
    }

    pub fn state(&self) -> State {
        self.inner.state.borrow().clone()
    }

    /// Resolves with the reason once the engine has failed, at start or later (its thread
    /// died); never resolves while it works.
    pub async fn failed(&self) -> String {
        let mut state = self.inner.state.clone();
        let failed = state.wait_for(|s| matches!(s, State::Failed(_))).await;
        match failed.as_deref() {
            Ok(State::Failed(message)) => message.clone(),
            Ok(_) => "the engine is in an unknown state".into(),
            Err(_) => "the engine thread ended without a word".into(),
        }
    }

    /// Decodes, preprocesses and embeds one encoded image (the ImageNet center crop). Waits
    /// for a queue slot first.
    pub async fn embed(&self, image: impl Into<Bytes>) -> Result<Vec<f32>> {
        self.embed_views(image.into(), &[View::CENTER]).await
    }

    /// Like [`Engine::embed`], for the mean embedding of several views of the image: decoded
    /// once, one queue slot, one batch.
    pub async fn embed_views(&self, image: Bytes, views: &'static [View]) -> Result<Vec<f32>> {
        self.embed_traced(image, views, None).await
    }

    /// Like [`Engine::embed_views`], on behalf of the request of trace `trace`: the batch that
    /// serves it logs the trace ids of the requests it served.
    pub async fn embed_traced(
        &self,
        image: Bytes,
        views: &'static [View],
        trace: Option<u128>,
    ) -> Result<Vec<f32>> {
        if views.is_empty() || views.len() > MAX_VIEWS {
            return Err(Error::Internal(format!(
                "{} views asked for; 1 to {MAX_VIEWS} are supported",
                views.len()
            )));
        }
        let slot = self.slot(views.len()).await?;
        let pixels = self.preprocess(image, views).await?;
        let (reply, answer) = oneshot::channel();
        self.send(Job {
            pixels,
            reply,
            slot,
            queued: std::time::Instant::now(),
            trace,
        })?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Decodes and preprocesses on the blocking pool, at most `decode_threads` at once, each
    /// holding what decoding takes from the shared byte budget: the views of one image, laid
    /// end to end.
    pub async fn preprocess(&self, image: Bytes, views: &'static [View]) -> Result<Vec<f32>> {
        let permit = self
            .inner
            .decoders
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let limits = self.inner.limits;
        // Reading the header costs a copy of the input at most, plus the metadata allowance.
        let reading = self.reserve(preprocess::header_bytes(&image)).await?;
        let (image, header) = tokio::task::spawn_blocking(move || {
            let header = preprocess::read_header_deferring_walk(&image, &limits);
            (image, header)
        })
        .await
        .map_err(|e| Error::Internal(format!("image header task failed: {e}")))?;
        let header = header?;
        // Given back before the full reservation is asked for: an item never holds some of the
        // budget while waiting for more, so items cannot deadlock one another.
        drop(reading);
        let decoding = self.reserve(header.decode_bytes()).await?;
        // The permits move into the task: a cancelled caller cannot free them early and let
        // more decodes run (or more memory be held) than the limits allow.
        tokio::task::spawn_blocking(move || {
            let _held = (permit, decoding);
            let img = preprocess::decode_with(&image, &limits, &header)?;
            let views = preprocess::views_of(&img, views)?;
            Ok(views.concat())
        })
        .await
        .map_err(|e| Error::Internal(format!("image decoding task failed: {e}")))?
    }

    /// Waits until `bytes` of the decode budget are free and holds them; more than the whole
    /// budget is an error at once.
    async fn reserve(&self, bytes: u64) -> Result<OwnedSemaphorePermit> {
        let limit = self.inner.budget_bytes;
        let too_much = || Error::DecodeBudget { need: bytes, limit };
        if bytes > limit {
            return Err(too_much());
        }
        let permits = u32::try_from(kib(bytes)).map_err(|_| too_much())?;
        self.inner
            .budget
            .clone()
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Bytes of the decode budget free now (tests watch it come back).
    pub fn decode_budget_free(&self) -> u64 {
        self.inner.budget.available_permits() as u64 * 1024
    }

    /// Queue places for one item of `images` views: they are taken all at once, so items
    /// waiting for places never hold some of them each and starve one another.
    async fn slot(&self, images: usize) -> Result<QueueSlot> {
        let permit = self
            .inner
            .slots
            .clone()
            .acquire_many_owned(images as u32)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        Ok(QueueSlot {
            _permit: permit,
            queued: None,
        })
    }

    fn send(&self, mut job: Job) -> Result<()> {
        job.slot.mark_queued(&self.inner.depth);
        let guard = self.inner.tx.lock().unwrap_or_else(|p| p.into_inner());
        let tx = guard.as_ref().ok_or(Error::ShuttingDown)?;
        // Never blocks: the job holds one of `capacity` slots and the channel has `capacity`
        // places, so it always has room.
        tx.try_send(job).map_err(|e| match e {
            TrySendError::Disconnected(_) => Error::ShuttingDown,
            TrySendError::Full(_) => Error::QueueFull {
                capacity: self.inner.capacity,
            },
        })
    }

    /// True when every queue slot is taken: new streams are refused while this holds.
    pub fn is_full(&self) -> bool {
        self.inner.slots.available_permits() == 0
    }

    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// Items decoded and waiting for the engine thread, as it changes. Items still decoding
    /// hold a queue slot ([`Engine::is_full`]) but are not counted here.
    pub fn queue_depth(&self) -> watch::Receiver<usize> {
        self.inner.depth.subscribe()
    }

    /// Open `Embed` streams, as it changes: a cancelled stream must bring it back down.
    pub fn open_streams(&self) -> watch::Receiver<usize> {
        self.inner.streams.subscribe()
    }

    /// Counts a stream as open until the guard drops.
    pub fn stream_guard(&self) -> StreamGuard {
        self.inner.streams.send_modify(|n| *n += 1);
        StreamGuard(self.inner.streams.clone())
    }

    /// The Prometheus series this engine and its service record. A layer that records per
    /// call holds this, not the engine: a response still in flight must not keep it alive.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The metrics in the text exposition format, the state gauges read now.
    pub fn render_metrics(&self) -> String {
        let depth = *self.inner.depth.borrow();
        let streams = *self.inner.streams.borrow();
        self.inner.metrics.render(depth, streams)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Holds the engine before its next batch (a test hook: fills the queue deterministically).
    pub fn pause(&self) {
        self.inner.gate.close();
    }

    pub fn resume(&self) {
        self.inner.gate.open();
    }

    /// Stops taking new items; those already queued are still answered.
    pub fn close(&self) {
        self.inner
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.inner.gate.open();
    }

    /// Closes, then waits for the engine thread to drain the queue and exit. Returns the
    /// thread's start-up error, if it had one.
    pub async fn join(&self) -> Result<()> {
        self.close();
        let handle = self
            .inner
            .thread
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(handle) = handle else { return Ok(()) };
        tokio::task::spawn_blocking(move || handle.join())
            .await
            .map_err(|e| Error::Internal(format!("joining the engine thread: {e}")))?
            .map_err(|_| Error::Internal("the engine thread panicked".into()))?
    }
}

/// Bytes to whole KiB, rounded up.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// What a panic said, when it said it with a string.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// One of the `queue_capacity` places, held from before decoding until the engine takes the
/// item; counted in [`Engine::queue_depth`] once the item is in the channel.
pub(crate) struct QueueSlot {
    _permit: OwnedSemaphorePermit,
    queued: Option<Arc<watch::Sender<usize>>>,
}

impl QueueSlot {
    fn mark_queued(&mut self, depth: &Arc<watch::Sender<usize>>) {
        depth.send_modify(|d| *d += 1);
        self.queued = Some(depth.clone());
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        if let Some(depth) = &self.queued {
            depth.send_modify(|d| *d = d.saturating_sub(1));
        }
    }
}

/// Keeps one stream counted in [`Engine::open_streams`].
pub struct StreamGuard(Arc<watch::Sender<usize>>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// What the engine thread runs: a backbone, or in tests and benches a cheap stand-in.
pub trait Model: Send {
    /// `[N, 3, 224, 224]` -> `[N, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor>;
    fn dim(&self) -> usize;
}

impl Model for Backbone {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Backbone::forward(self, x)
    }

    fn dim(&self) -> usize {
        Backbone::dim(self)
    }
}

/// Makes the model on the engine thread, for the given device: the model and the sha256 that
/// identifies its weights.
pub type Loader = Box<dyn FnOnce(&Device) -> Result<(Box<dyn Model>, String)> + Send>;

/// The candle device for a choice; CUDA only in builds with the `cuda` feature.
fn make_device(choice: DeviceChoice) -> Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(n) => {
            Device::new_cuda(n).map_err(|e| Error::Device(choice.to_string(), e.to_string()))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => Err(Error::Device(choice.to_string(), NO_CUDA.into())),
    }
}

#[cfg(not(feature = "cuda"))]
pub(crate) const NO_CUDA: &str =
    "this binary was built without the `cuda` feature; rebuild with `--features cuda`";
