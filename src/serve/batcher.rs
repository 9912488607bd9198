//! The model thread: one owner of the model, fed through a bounded queue, running the pairs of
//! concurrent requests together in one forward pass (dynamic batching).
//!
//! Requests wait up to `window` for company, then every queued score and classify request of the
//! same head is run as one batch of at most `max_batch` pairs. A search is a batch by itself (the
//! whole catalogue slice, in chunks of `max_batch`).

use super::metrics::Metrics;
use anyhow::Result;
use burn::tensor::backend::Backend;
use mvlt::data::image::to_unit_floats;
use mvlt::infer::Model;
use mvlt::search::Candidates;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    Itm,
    Cls,
}

impl Head {
    /// The model heads this one runs.
    pub fn heads(self) -> mvlt::model::HeadSet {
        use mvlt::model::HeadSet;
        match self {
            Head::Itm => HeadSet { itm: true, ..HeadSet::NONE },
            Head::Cls => HeadSet { cls: true, ..HeadSet::NONE },
        }
    }
}

pub enum Work {
    /// (image, text) pairs through one head.
    Pairs { head: Head, images: Vec<Arc<Vec<f32>>>, ids: Vec<Arc<Vec<i64>>> },
    /// A query against catalogue rows: text against their images, or an image against their captions.
    Search { text: Option<Arc<Vec<i64>>>, image: Option<Arc<Vec<f32>>>, rows: Vec<usize> },
    /// A text's contrastive embedding: the query of an indexed search's first stage.
    Embed { ids: Arc<Vec<i64>> },
}

pub enum Output {
    Itm(Vec<f32>),
    Cls(Vec<(Vec<f32>, Vec<f32>)>),
    /// (catalogue row, match probability).
    Search(Vec<(usize, f32)>),
    Embedding(Vec<f32>),
}

pub struct Job {
    pub work: Work,
    pub reply: Reply,
    pub enqueued: Instant,
}

/// Where a job's answer goes, and until when anyone waits for it.
pub struct Reply {
    tx: oneshot::Sender<Result<Output, JobError>>,
    /// After this the client has been answered 504: the work is dropped, not finished.
    deadline: Instant,
}

impl Reply {
    /// Nobody waits for the answer any more: the client went away (its handler was dropped, which
    /// closes the reply channel) or was answered 504.
    fn abandoned(&self) -> bool {
        self.tx.is_closed() || Instant::now() >= self.deadline
    }

    /// Answer; a client that has gone no longer listens, which is fine.
    fn send(self, answer: Result<Output, JobError>) {
        let _ = self.tx.send(answer);
    }
}

/// Why the model thread gave no output.
#[derive(Clone, Debug)]
pub enum JobError {
    /// Dropped unfinished: the client had gone or its time was up (the HTTP layer answers 504).
    Abandoned,
    /// The model failed; the message says how.
    Failed(String),
}

/// The error that stops work nobody waits for, told apart from model failures by its type.
#[derive(Debug)]
struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the request was abandoned (client gone or timed out)")
    }
}

impl std::error::Error for Abandoned {}

fn job_error(e: anyhow::Error) -> JobError {
    if e.downcast_ref::<Abandoned>().is_some() {
        JobError::Abandoned
    } else {
        JobError::Failed(format!("{e:#}"))
    }
}

/// What the model thread needs of the catalogue: preprocessed images (u8, as the model sees them)
/// and tokenised captions.
pub struct Catalogue {
    pub images: Vec<Vec<u8>>,
    pub captions: Vec<Arc<Vec<i64>>>,
}

#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Job>,
    metrics: Arc<Metrics>,
}

pub enum Submit {
    Ok(oneshot::Receiver<Result<Output, JobError>>),
    /// The queue is full: answer 503.
    Full,
    /// The model thread is gone.
    Closed,
}

impl Queue {
    pub fn submit(&self, work: Work, timeout: Duration) -> Submit {
        let (tx, rx) = oneshot::channel();
        let now = Instant::now();
        match self.tx.try_send(Job { work, reply: Reply { tx, deadline: now + timeout }, enqueued: now }) {
            Ok(()) => {
                self.metrics.queue_depth.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Submit::Ok(rx)
            }
            Err(TrySendError::Full(_)) => Submit::Full,
            Err(TrySendError::Disconnected(_)) => Submit::Closed,
        }
    }
}

pub struct BatcherConfig {
    pub queue: usize,
    pub max_batch: usize,
    pub window: Duration,
}

/// Start the model thread; it ends when every `Queue` handle is dropped.
pub fn start<B: Backend>(
    model: Model<B>,
    catalogue: Arc<Catalogue>,
    cfg: BatcherConfig,
    metrics: Arc<Metrics>,
) -> Queue {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(cfg.queue.max(1));
    let m = metrics.clone();
    std::thread::Builder::new()
        .name("mvlt-model".into())
        .spawn(move || run(model, catalogue, rx, cfg, m))
        .expect("spawn the model thread");
    Queue { tx, metrics }
}

fn run<B: Backend>(model: Model<B>, cat: Arc<Catalogue>, rx: Receiver<Job>, cfg: BatcherConfig, metrics: Arc<Metrics>) {
    let take = |job: Job, into: &mut Vec<Job>| {
        metrics.queue_depth.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        into.push(job);
    };
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![];
        take(first, &mut jobs);
        // Answers the jobs nobody waits for any more, and leaves the rest.
        let drop_abandoned = |jobs: &mut Vec<Job>| {
            for j in jobs.extract_if(.., |j| j.reply.abandoned()) {
                metrics.abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                j.reply.send(Err(JobError::Abandoned));
            }
        };
        // Wait a little for concurrent requests, then take what is queued.
        let deadline = Instant::now() + cfg.window;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => take(j, &mut jobs),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if jobs.len() >= cfg.max_batch {
                break;
            }
        }
        drop_abandoned(&mut jobs);
        for head in [Head::Itm, Head::Cls] {
            let group: Vec<Job> =
                jobs.extract_if(.., |j| matches!(&j.work, Work::Pairs { head: h, .. } if *h == head)).collect();
            if !group.is_empty() {
                run_pairs(&model, head, group, cfg.max_batch, &metrics);
            }
        }
        // The pairs may have taken a while.
        drop_abandoned(&mut jobs);
        for job in jobs {
            let (text, image, rows) = match &job.work {
                Work::Search { text, image, rows } => (text, image, rows),
                Work::Embed { ids } => {
                    metrics.record_batch(1);
                    let out = model
                        .text_embeddings(&[ids.as_slice()])
                        .map(|mut e| Output::Embedding(e.remove(0)))
                        .map_err(job_error);
                    job.reply.send(out);
                    continue;
                }
                Work::Pairs { .. } => unreachable!("pairs were taken above"),
            };
            // Checked after every forward pass: a search nobody waits for stops there.
            let progress = |n: usize| {
                metrics.record_batch(n);
                if job.reply.abandoned() {
                    metrics.abandoned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Err(Abandoned.into());
                }
                Ok(())
            };
            let out = search(&model, &cat, text.clone(), image.clone(), rows, cfg.max_batch, progress)
                .map(Output::Search)
                .map_err(job_error);
            job.reply.send(out);
        }
    }
}

/// All pairs of `jobs` through `head`, `max_batch` at a time, answers split back per job.
fn run_pairs<B: Backend>(model: &Model<B>, head: Head, jobs: Vec<Job>, max_batch: usize, metrics: &Metrics) {
    let mut images: Vec<Arc<Vec<f32>>> = vec![];
    let mut ids: Vec<Arc<Vec<i64>>> = vec![];
    let mut counts = vec![];
    let mut replies: Vec<Reply> = vec![];
    for j in jobs {
        if let Work::Pairs { images: im, ids: tx, .. } = j.work {
            counts.push(im.len());
            images.extend(im);
            ids.extend(tx);
            replies.push(j.reply);
        }
    }
    // Stop between forward passes once every job of the group is abandoned.
    let all_abandoned = || replies.iter().all(Reply::abandoned);
    let result: Result<Output> = (|| {
        let mut itm = vec![];
        let mut cls = vec![];
        for (ic, tc) in images.chunks(max_batch.max(1)).zip(ids.chunks(max_batch.max(1))) {
            if all_abandoned() {
                metrics.abandoned.fetch_add(replies.len() as u64, std::sync::atomic::Ordering::Relaxed);
                return Err(Abandoned.into());
            }
            let im: Vec<&[f32]> = ic.iter().map(|v| v.as_slice()).collect();
            let tx: Vec<&[i64]> = tc.iter().map(|v| v.as_slice()).collect();
            metrics.record_batch(im.len());
            match head {
                Head::Itm => itm.extend(model.match_probs(&im, &tx)?),
                Head::Cls => cls.extend(model.class_probs(&im, &tx)?),
            }
        }
        Ok(match head {
            Head::Itm => Output::Itm(itm),
            Head::Cls => Output::Cls(cls),
        })
    })();
    match result {
        Err(e) => {
            let err = job_error(e);
            for r in replies {
                r.send(Err(err.clone()));
            }
        }
        Ok(out) => {
            let mut start = 0;
            for (r, n) in replies.into_iter().zip(counts) {
                let part = match &out {
                    Output::Itm(v) => Output::Itm(v[start..start + n].to_vec()),
                    Output::Cls(v) => Output::Cls(v[start..start + n].to_vec()),
                    Output::Search(_) | Output::Embedding(_) => unreachable!(),
                };
                start += n;
                r.send(Ok(part));
            }
        }
    }
}

fn search<B: Backend>(
    model: &Model<B>,
    cat: &Catalogue,
    text: Option<Arc<Vec<i64>>>,
    image: Option<Arc<Vec<f32>>>,
    rows: &[usize],
    max_batch: usize,
    record: impl Fn(usize) -> Result<()>,
) -> Result<Vec<(usize, f32)>> {
    match (&text, &image) {
        (Some(ids), _) => {
            let image_of = |r: usize| Ok(to_unit_floats(&cat.images[r]));
            Ok(model
                .rank_candidates(rows, Candidates::Images { text: ids, image_of: &image_of }, max_batch, record)?
                .scores)
        }
        (None, Some(img)) => {
            let ids_of = |r: usize| Ok(cat.captions[r].to_vec());
            Ok(model
                .rank_candidates(rows, Candidates::Captions { image: img, ids_of: &ids_of }, max_batch, record)?
                .scores)
        }
        (None, None) => anyhow::bail!("a search needs a text or an image"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no model thread draining it, a queue of one takes one request and refuses the next
    /// (the HTTP layer answers that with 503).
    #[test]
    fn a_full_queue_refuses() {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(1);
        let q = Queue { tx, metrics: Arc::new(Metrics::default()) };
        let work = || Work::Search { text: Some(Arc::new(vec![101, 102])), image: None, rows: vec![0] };
        let t = Duration::from_secs(1);
        assert!(matches!(q.submit(work(), t), Submit::Ok(_)));
        assert!(matches!(q.submit(work(), t), Submit::Full));
        assert_eq!(q.metrics.queue_depth.load(std::sync::atomic::Ordering::Relaxed), 1);
        drop(rx);
        assert!(matches!(q.submit(work(), t), Submit::Closed));
    }
}
