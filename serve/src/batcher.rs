//! Dynamic batching: one worker thread per served model. Requests wait in a bounded queue; the
//! worker takes the first, gathers the requests that arrive within `max_wait` (up to
//! `max_batch_rows` rows, same tensors present), runs the model once on all their rows and hands
//! each request its rows back. A full queue is answered at once (503), not buffered without bound.
//!
//! The model is built inside its worker (burn tensors stay on the thread that made them); a panic
//! in a forward becomes that batch's error, and the worker keeps serving.
//!
//! Under a [`MemoryBudget`] (`ddm serve --max-memory`) a worker holds its model only while the
//! budget has room: it loads it when a request comes, and unloads it after a batch (or when idle)
//! while another worker waits for room, so the models in memory stay under the cap.

use std::panic::AssertUnwindSafe;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use ddm_core::flow::VelocityError;
use ddm_core::host::HostTensor;
use ddm_ensemble::remote::Request;
use tokio::sync::oneshot;

use crate::error::ServeError;

use crate::metrics::Metrics;

/// A model as a worker runs it: a batch of request rows in, one output row per input row out.
pub trait Forward {
    /// `request.x_t` `[N, ...]` -> `[N, ...]` (an expert's velocity) or `[N, K]` (router logits).
    fn forward(&self, request: &Request) -> Result<HostTensor, VelocityError>;
}

/// How requests are coalesced.
#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    /// How long the first request of a batch waits for others (0: no coalescing).
    pub max_wait: Duration,
    /// The most rows one forward takes (a single larger request still runs alone).
    pub max_batch_rows: usize,
    /// Requests waiting per model before new ones are refused.
    pub queue: usize,
}

/// The bytes the models of one server may hold in memory at once, shared by its workers.
pub struct MemoryBudget {
    cap: u64,
    metrics: Metrics,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    /// Workers waiting for room.
    waiting: usize,
    /// The most models held at once, and loads so far.
    held: usize,
    held_peak: usize,
    loads: u64,
}

impl MemoryBudget {
    pub fn new(cap: u64, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            cap,
            metrics,
            state: Mutex::new(BudgetState::default()),
            freed: Condvar::new(),
        })
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until `bytes` fit (a model larger than the cap was refused at start).
    fn acquire(&self, bytes: u64) {
        let mut s = self.lock();
        s.waiting += 1;
        while s.used + bytes > self.cap && s.used > 0 {
            s = self.freed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.waiting -= 1;
        s.used += bytes;
        s.held += 1;
        s.loads += 1;
        s.held_peak = s.held_peak.max(s.held);
        self.metrics.model_loaded(s.held);
    }

    fn release(&self, bytes: u64) {
        let mut s = self.lock();
        s.used -= bytes;
        s.held -= 1;
        self.metrics.model_unloaded(s.held);
        self.freed.notify_all();
    }

    /// Whether a worker waits for room.
    fn wanted(&self) -> bool {
        self.lock().waiting > 0
    }

    /// (models loaded so far, the most held at once).
    pub fn loads_and_peak(&self) -> (u64, usize) {
        let s = self.lock();
        (s.loads, s.held_peak)
    }
}

/// How often an idle worker under a budget checks whether another waits for its room.
const IDLE_CHECK: Duration = Duration::from_millis(50);

struct Job {
    request: Request,
    reply: oneshot::Sender<Result<HostTensor, ServeError>>,
}

/// A handle to one model's worker.
pub struct Batcher {
    tx: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
}

/// The queue was full: the caller answers 503.
#[derive(Debug)]
pub struct QueueFull;

impl Batcher {
    /// Start the worker for model `name`: `load` builds the model on the worker's thread; its error
    /// (a corrupted checkpoint, say) is returned here, before anything is served. Under a `budget`
    /// the model takes `bytes` of it while loaded, and `load` runs again whenever it was unloaded.
    pub fn start<F, L>(
        name: String,
        load: L,
        policy: BatchPolicy,
        metrics: Metrics,
        budget: Option<(Arc<MemoryBudget>, u64)>,
    ) -> anyhow::Result<Self>
    where
        F: Forward + 'static,
        L: Fn() -> anyhow::Result<F> + Send + 'static,
    {
        let (tx, rx) = sync_channel::<Job>(policy.queue.max(1));
        let (ready_tx, ready_rx) = sync_channel::<anyhow::Result<()>>(1);
        let worker = std::thread::Builder::new()
            .name(format!("serve {name}"))
            .spawn(move || {
                if let Some((b, bytes)) = &budget {
                    b.acquire(*bytes);
                }
                let model = match load() {
                    Ok(m) => {
                        let _ = ready_tx.send(Ok(()));
                        m
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut worker = Worker {
                    name,
                    load: Box::new(load),
                    model: Some(model),
                    budget,
                };
                worker.run(rx, policy, &metrics);
            })
            .context("starting a worker thread")?;
        ready_rx
            .recv()
            .map_err(|_| anyhow!("the worker thread died while loading"))??;
        Ok(Self {
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// Queue a request; its answer comes on the returned receiver.
    pub fn submit(
        &self,
        request: Request,
    ) -> Result<oneshot::Receiver<Result<HostTensor, ServeError>>, QueueFull> {
        let (reply, answer) = oneshot::channel();
        let tx = self.tx.as_ref().expect("open until dropped");
        match tx.try_send(Job { request, reply }) {
            Ok(()) => Ok(answer),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(QueueFull),
        }
    }
}

impl Drop for Batcher {
    /// Close the queue and let the worker finish what it holds.
    fn drop(&mut self) {
        self.tx.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Whether two requests can share a forward: the same optional tensors, the same widths.
fn compatible(a: &Request, b: &Request) -> bool {
    a.x_t.shape[1..] == b.x_t.shape[1..]
        && a.y.is_some() == b.y.is_some()
        && a.c.as_ref().map(|c| c.shape[1]) == b.c.as_ref().map(|c| c.shape[1])
        && a.tokens.as_ref().map(|(e, _)| e.shape[1..].to_vec())
            == b.tokens.as_ref().map(|(e, _)| e.shape[1..].to_vec())
}

/// A worker's model: held, or (under a budget) unloaded until the next request.
struct Worker<F> {
    name: String,
    load: Box<dyn Fn() -> anyhow::Result<F>>,
    model: Option<F>,
    budget: Option<(Arc<MemoryBudget>, u64)>,
}

impl<F: Forward> Worker<F> {
    /// The next job: with a budget, an idle worker gives its room up to one that waits.
    fn next(&mut self, rx: &Receiver<Job>) -> Option<Job> {
        loop {
            let Some((b, _)) = &self.budget else {
                return rx.recv().ok();
            };
            match rx.recv_timeout(IDLE_CHECK) {
                Ok(j) => return Some(j),
                Err(RecvTimeoutError::Timeout) => {
                    if b.wanted() {
                        self.unload();
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    fn unload(&mut self) {
        if let Some((b, bytes)) = &self.budget
            && self.model.take().is_some()
        {
            tracing::debug!("{}: unloaded to make room", self.name);
            b.release(*bytes);
        }
    }

    /// The model, loaded again (waiting for room) if it was unloaded.
    fn ensure_loaded(&mut self) -> anyhow::Result<()> {
        if self.model.is_some() {
            return Ok(());
        }
        let (b, bytes) = self.budget.as_ref().expect("only a budget unloads");
        b.acquire(*bytes);
        match (self.load)() {
            Ok(m) => {
                self.model = Some(m);
                Ok(())
            }
            Err(e) => {
                b.release(*bytes);
                Err(e)
            }
        }
    }

    fn run(&mut self, rx: Receiver<Job>, policy: BatchPolicy, metrics: &Metrics) {
        let mut held: Option<Job> = None;
        loop {
            let first = match held.take() {
                Some(j) => j,
                None => match self.next(&rx) {
                    Some(j) => j,
                    None => return, // the server is shutting down and the queue is empty
                },
            };
            if let Err(e) = self.ensure_loaded() {
                tracing::error!("{}: cannot load the model again: {e:#}", self.name);
                let _ = first.reply.send(Err(ServeError::Model(format!(
                    "{}: loading the model: {e:#}",
                    self.name
                ))));
                continue;
            }
            let mut rows = first.request.rows();
            let mut batch = vec![first];
            let deadline = Instant::now() + policy.max_wait;
            while !policy.max_wait.is_zero() && rows < policy.max_batch_rows {
                let left = deadline.saturating_duration_since(Instant::now());
                let next = match rx.recv_timeout(left) {
                    Ok(j) => j,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                };
                if compatible(&batch[0].request, &next.request)
                    && rows + next.request.rows() <= policy.max_batch_rows
                {
                    rows += next.request.rows();
                    batch.push(next);
                } else {
                    held = Some(next);
                    break;
                }
            }
            let name = self.name.as_str();
            let model = self.model.as_ref().expect("loaded above");
            let merged = merge(batch.iter().map(|j| &j.request));
            let out = std::panic::catch_unwind(AssertUnwindSafe(|| model.forward(&merged)));
            metrics.batch(name, rows);
            let out = match out {
                Ok(Ok(out)) => Ok(out),
                Ok(Err(e)) => Err(format!("{name}: {}", ddm_core::error::chain(&e))),
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into());
                    Err(format!("{name}: the forward failed: {what}"))
                }
            };
            match out {
                Ok(out) => {
                    let per_row = out.data.len() / rows.max(1);
                    let mut offset = 0;
                    for job in batch {
                        let m = job.request.rows();
                        let mut shape = out.shape.clone();
                        shape[0] = m;
                        let data = out.data[offset * per_row..(offset + m) * per_row].to_vec();
                        offset += m;
                        let _ = job.reply.send(Ok(HostTensor::new(shape, data)));
                    }
                }
                Err(what) => {
                    tracing::error!("{what}");
                    for job in batch {
                        let _ = job.reply.send(Err(ServeError::Model(what.clone())));
                    }
                }
            }
            if self.budget.as_ref().is_some_and(|(b, _)| b.wanted()) {
                self.unload();
            }
        }
    }
}

/// Concatenate requests along rows (they are [`compatible`]).
fn merge<'a>(requests: impl Iterator<Item = &'a Request> + Clone) -> Request {
    let all: Vec<&Request> = requests.collect();
    if all.len() == 1 {
        return all[0].clone();
    }
    let rows: usize = all.iter().map(|r| r.rows()).sum();
    let mut shape = all[0].x_t.shape.clone();
    shape[0] = rows;
    let x = all.iter().flat_map(|r| r.x_t.data.iter().copied()).collect();
    let t = all.iter().flat_map(|r| r.t.iter().copied()).collect();
    let y = all[0]
        .y
        .as_ref()
        .map(|_| all.iter().flat_map(|r| r.y.clone().unwrap_or_default()).collect());
    let c = all[0].c.as_ref().map(|c0| {
        HostTensor::new(
            vec![rows, c0.shape[1]],
            all.iter()
                .flat_map(|r| r.c.as_ref().map(|c| c.data.clone()).unwrap_or_default())
                .collect(),
        )
    });
    let tokens = all[0].tokens.as_ref().map(|(e0, _)| {
        let both = |pick: fn(&(HostTensor, HostTensor)) -> &HostTensor, shape: Vec<usize>| {
            let data = all
                .iter()
                .flat_map(|r| {
                    r.tokens
                        .as_ref()
                        .map(|s| pick(s).data.clone())
                        .unwrap_or_default()
                })
                .collect();
            HostTensor::new(shape, data)
        };
        let (l, dt) = (e0.shape[1], e0.shape[2]);
        (both(|s| &s.0, vec![rows, l, dt]), both(|s| &s.1, vec![rows, l]))
    });
    Request {
        x_t: HostTensor::new(shape, x),
        t,
        y,
        c,
        tokens,
    }
}
