//! A small pool of I/O threads with two queues: demand reads (a layer is
//! waiting for them) go before read-ahead. Reads block in the kernel, so
//! these threads are not rayon's compute threads.
//!
//! Read-ahead must never stand between a forward pass and its misses:
//! - at most `max_ahead_running` read-ahead jobs run at once, so the other
//!   threads (and most of the device's queue) stay free for demand reads;
//! - with `ahead_when_idle` (off by default in the pager: measured, the
//!   guesses then started too late to land before their layer routed) a
//!   read-ahead job starts only while no demand job runs or waits;
//! - when a layer routes, its queued predicted reads that it did choose are
//!   moved to the demand queue, and those it did not choose are cancelled
//!   before they start ([`IoPool::reprioritise`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

/// A job; its argument says whether it may run (`false`: cancelled before
/// it started, release what it holds).
type Run = Box<dyn FnOnce(bool) + Send>;

/// What a job reads, so that a layer's routing can find its queued reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// The layer.
    pub layer: u32,
    /// The expert.
    pub expert: u32,
    /// Read because a router predicted it (may be cancelled).
    pub predicted: bool,
}

struct Job {
    tag: Option<Tag>,
    queued: Instant,
    run: Run,
}

#[derive(Default)]
struct Queues {
    demand: VecDeque<Job>,
    ahead: VecDeque<Job>,
    running_demand: usize,
    running_ahead: usize,
    /// Since when some job has been running (`None`: the pool is idle).
    busy_since: Option<Instant>,
    stop: bool,
}

#[derive(Default)]
struct Counters {
    demand_jobs: AtomicU64,
    demand_queue_ns: AtomicU64,
    ahead_running_at_demand: AtomicU64,
    promoted: AtomicU64,
    cancelled: AtomicU64,
    busy_ns: AtomicU64,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
    max_ahead_running: usize,
    ahead_when_idle: bool,
    counters: Counters,
}

/// The I/O threads.
pub struct IoPool {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

/// Which queue a job goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A forward pass waits for it.
    Demand,
    /// Read-ahead (predicted experts, the hot set at start).
    Ahead,
}

/// The pool's counters (monotonic; take differences).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolStats {
    /// Demand jobs started.
    pub demand_jobs: u64,
    /// Seconds demand jobs waited in the queue, summed.
    pub demand_queue_s: f64,
    /// Read-ahead jobs running when each demand job was queued, summed.
    pub ahead_running_at_demand: u64,
    /// Queued read-ahead jobs moved to the demand queue.
    pub promoted: u64,
    /// Queued read-ahead jobs cancelled.
    pub cancelled: u64,
    /// Seconds at least one job was running (the device had a read).
    pub busy_s: f64,
}

impl IoPool {
    /// Starts `n` threads (at least one), at most `max_ahead_running` of
    /// them (at least one) on read-ahead at a time; with `ahead_when_idle`
    /// read-ahead starts only while no demand job runs or waits. A
    /// `nice` other than 0 is applied to each thread where allowed
    /// ([`crate::direct_io::set_thread_nice`]).
    pub fn new(n: usize, max_ahead_running: usize, ahead_when_idle: bool, nice: i32) -> IoPool {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
            max_ahead_running: max_ahead_running.max(1),
            ahead_when_idle,
            counters: Counters::default(),
        });
        let threads = (0..n.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("rh-expert-io-{i}"))
                    .spawn(move || {
                        if nice != 0 {
                            crate::direct_io::set_thread_nice(nice);
                        }
                        worker(&s)
                    })
                    .expect("spawning an I/O thread")
            })
            .collect();
        IoPool { shared, threads }
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.shared.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `job`; it is called with `true` when it runs, or with
    /// `false` when cancelled before it started.
    pub fn submit(
        &self,
        priority: Priority,
        tag: Option<Tag>,
        job: impl FnOnce(bool) + Send + 'static,
    ) {
        let job = Job {
            tag,
            queued: Instant::now(),
            run: Box::new(job),
        };
        let mut q = self.queues();
        match priority {
            Priority::Demand => {
                self.shared
                    .counters
                    .ahead_running_at_demand
                    .fetch_add(q.running_ahead as u64, Ordering::Relaxed);
                q.demand.push_back(job);
            }
            Priority::Ahead => q.ahead.push_back(job),
        }
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Layer `layer` has routed to `chosen`: its queued predicted reads of
    /// chosen experts move to the demand queue, those of other experts are
    /// cancelled (called with `false`, outside the pool's lock).
    pub fn reprioritise(&self, layer: usize, chosen: &[usize]) {
        let mut cancelled = Vec::new();
        let mut promoted = 0;
        {
            let mut q = self.queues();
            let ahead = std::mem::take(&mut q.ahead);
            for job in ahead {
                match job.tag {
                    Some(t) if t.layer as usize == layer && t.predicted => {
                        if chosen.contains(&(t.expert as usize)) {
                            self.shared
                                .counters
                                .ahead_running_at_demand
                                .fetch_add(q.running_ahead as u64, Ordering::Relaxed);
                            promoted += 1;
                            q.demand.push_back(job);
                        } else {
                            cancelled.push(job);
                        }
                    }
                    _ => q.ahead.push_back(job),
                }
            }
        }
        let c = &self.shared.counters;
        c.promoted.fetch_add(promoted, Ordering::Relaxed);
        c.cancelled
            .fetch_add(cancelled.len() as u64, Ordering::Relaxed);
        if promoted > 0 {
            self.shared.ready.notify_all();
        }
        for job in cancelled {
            (job.run)(false);
        }
    }

    /// Jobs of the read-ahead queue not yet started.
    pub fn ahead_queued(&self) -> usize {
        self.queues().ahead.len()
    }

    /// Read-ahead jobs running now.
    pub fn ahead_running(&self) -> usize {
        self.queues().running_ahead
    }

    /// The counters now.
    pub fn stats(&self) -> PoolStats {
        let c = &self.shared.counters;
        let ld = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PoolStats {
            demand_jobs: ld(&c.demand_jobs),
            demand_queue_s: ld(&c.demand_queue_ns) as f64 * 1e-9,
            ahead_running_at_demand: ld(&c.ahead_running_at_demand),
            promoted: ld(&c.promoted),
            cancelled: ld(&c.cancelled),
            busy_s: ld(&c.busy_ns) as f64 * 1e-9,
        }
    }
}

/// The next job a free thread takes: demand first; read-ahead while fewer
/// than the cap run. Returns the job and whether it is read-ahead.
fn take(s: &Shared, q: &mut Queues) -> Option<(Job, bool)> {
    let job = take_next(s, q)?;
    if q.busy_since.is_none() {
        q.busy_since = Some(Instant::now());
    }
    Some(job)
}

fn take_next(s: &Shared, q: &mut Queues) -> Option<(Job, bool)> {
    if let Some(j) = q.demand.pop_front() {
        q.running_demand += 1;
        let c = &s.counters;
        c.demand_jobs.fetch_add(1, Ordering::Relaxed);
        c.demand_queue_ns
            .fetch_add(j.queued.elapsed().as_nanos() as u64, Ordering::Relaxed);
        return Some((j, false));
    }
    let device_free = !s.ahead_when_idle || q.running_demand == 0;
    if q.running_ahead < s.max_ahead_running && device_free {
        if let Some(j) = q.ahead.pop_front() {
            q.running_ahead += 1;
            return Some((j, true));
        }
    }
    None
}

fn worker(s: &Shared) {
    loop {
        let (job, ahead) = {
            let mut q = s.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = take(s, &mut q) {
                    break j;
                }
                if q.stop {
                    return;
                }
                q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        (job.run)(true);
        let mut q = s.queues.lock().unwrap_or_else(|e| e.into_inner());
        if ahead {
            q.running_ahead -= 1;
        } else {
            q.running_demand -= 1;
        }
        if q.running_ahead + q.running_demand == 0 {
            if let Some(t) = q.busy_since.take() {
                s.counters
                    .busy_ns
                    .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
        }
        // A thread may be idle only because the read-ahead cap was reached,
        // or because demand jobs were running.
        let wake = !q.ahead.is_empty() && (ahead || q.running_demand == 0);
        drop(q);
        if wake {
            s.ready.notify_one();
        }
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let cancelled: Vec<Job> = {
            let mut q = self.queues();
            q.stop = true;
            q.ahead.drain(..).collect()
        };
        for job in cancelled {
            (job.run)(false);
        }
        self.shared.ready.notify_all();
        for t in self.threads.drain(..) {
            // A job runs on the thread that drops the pool only when the
            // pager's last reference was a job's; never join oneself.
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Duration;

    fn tag(layer: u32, expert: u32) -> Option<Tag> {
        Some(Tag {
            layer,
            expert,
            predicted: true,
        })
    }

    /// A gate the test opens: jobs block on it until then.
    fn gate() -> (Arc<(Mutex<bool>, Condvar)>, impl Fn()) {
        let g = Arc::new((Mutex::new(false), Condvar::new()));
        let g2 = g.clone();
        (g, move || {
            *g2.0.lock().unwrap() = true;
            g2.1.notify_all();
        })
    }

    fn wait_gate(g: &(Mutex<bool>, Condvar)) {
        let mut open = g.0.lock().unwrap();
        while !*open {
            open = g.1.wait(open).unwrap();
        }
    }

    #[test]
    fn read_ahead_never_runs_more_than_its_cap() {
        let pool = IoPool::new(4, 2, false, 0);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel();
        for e in 0..12 {
            let (running, most, tx) = (running.clone(), most.clone(), tx.clone());
            pool.submit(Priority::Ahead, tag(0, e), move |run| {
                assert!(run);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(2));
                running.fetch_sub(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            });
        }
        for _ in 0..12 {
            rx.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn demand_runs_before_queued_read_ahead_even_at_the_cap() {
        // One thread, busy: everything queued behind it; then demand must
        // come out first although it was queued last.
        let pool = IoPool::new(1, 1, false, 0);
        let (g, open) = gate();
        let order = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let g = g.clone();
            pool.submit(Priority::Demand, None, move |_| wait_gate(&g));
        }
        for (p, name) in [(Priority::Ahead, "ahead"), (Priority::Demand, "demand")] {
            let (order, tx) = (order.clone(), tx.clone());
            pool.submit(p, tag(1, 0), move |run| {
                assert!(run);
                order.lock().unwrap().push(name);
                tx.send(()).unwrap();
            });
        }
        open();
        for _ in 0..2 {
            rx.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        assert_eq!(*order.lock().unwrap(), ["demand", "ahead"]);
    }

    #[test]
    fn read_ahead_waits_for_running_demand_when_idle_only() {
        // Two threads: one runs a demand job held on a gate, the other is
        // free, yet the read-ahead job must not start until the demand
        // job is done.
        let pool = IoPool::new(2, 2, true, 0);
        let (g, open) = gate();
        let demand_done = Arc::new(AtomicUsize::new(0));
        {
            let (g, done) = (g.clone(), demand_done.clone());
            pool.submit(Priority::Demand, None, move |_| {
                wait_gate(&g);
                std::thread::sleep(Duration::from_millis(5));
                done.store(1, Ordering::SeqCst);
            });
        }
        let (tx, rx) = mpsc::channel();
        let done = demand_done.clone();
        pool.submit(Priority::Ahead, tag(0, 1), move |run| {
            tx.send((run, done.load(Ordering::SeqCst))).unwrap();
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        open();
        let (ran, after) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(ran);
        assert_eq!(after, 1, "read-ahead started while a demand job ran");
    }

    #[test]
    fn routing_promotes_chosen_and_cancels_unchosen_predictions() {
        let pool = IoPool::new(1, 1, false, 0);
        let (g, open) = gate();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        {
            let g = g.clone();
            pool.submit(Priority::Demand, None, move |_| wait_gate(&g));
        }
        // Layer 2's predictions, then a hot-set read of layer 2 (not
        // predicted: kept), then a demand read of another layer.
        let jobs = [
            (Priority::Ahead, tag(2, 5), "p5"),
            (Priority::Ahead, tag(2, 6), "p6"),
            (Priority::Ahead, tag(3, 5), "l3"),
            (
                Priority::Ahead,
                Some(Tag {
                    layer: 2,
                    expert: 7,
                    predicted: false,
                }),
                "hot7",
            ),
            (Priority::Demand, None, "demand"),
            (Priority::Ahead, tag(2, 8), "p8"),
        ];
        for (p, t, name) in jobs {
            let (log, tx) = (log.clone(), tx.clone());
            pool.submit(p, t, move |run| {
                log.lock()
                    .unwrap()
                    .push(format!("{name}:{}", if run { "ran" } else { "cancelled" }));
                tx.send(()).unwrap();
            });
        }
        pool.reprioritise(2, &[6, 8]);
        // p5 was cancelled at once, before the busy thread was freed.
        assert_eq!(*log.lock().unwrap(), ["p5:cancelled"]);
        open();
        // Six messages: p5's cancellation, then the five jobs that run
        // (waiting for five raced the last job's log entry).
        for _ in 0..6 {
            rx.recv_timeout(Duration::from_secs(20)).unwrap();
        }
        assert_eq!(
            *log.lock().unwrap(),
            [
                "p5:cancelled",
                "demand:ran",
                "p6:ran",
                "p8:ran",
                "l3:ran",
                "hot7:ran"
            ]
        );
        let s = pool.stats();
        assert_eq!((s.promoted, s.cancelled), (2, 1));
        assert!(s.busy_s > 0.0, "{s:?}");
    }

    #[test]
    fn dropping_the_pool_cancels_queued_read_ahead() {
        let pool = IoPool::new(1, 1, false, 0);
        let (g, open) = gate();
        {
            let g = g.clone();
            pool.submit(Priority::Demand, None, move |_| wait_gate(&g));
        }
        let (tx, rx) = mpsc::channel();
        pool.submit(Priority::Ahead, tag(0, 0), move |run| tx.send(run).unwrap());
        open();
        drop(pool);
        // Either it ran before the drop took the queue, or it was
        // cancelled; it was never lost.
        assert!(rx.recv_timeout(Duration::from_secs(20)).is_ok());
    }
}
