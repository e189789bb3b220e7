//! A small pool of I/O threads with two queues: demand reads (a layer is
//! waiting for them) go before read-ahead. Reads block in the kernel, so
//! these threads are not rayon's compute threads.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queues {
    demand: VecDeque<Job>,
    ahead: VecDeque<Job>,
    stop: bool,
}

struct Shared {
    queues: Mutex<Queues>,
    ready: Condvar,
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

impl IoPool {
    /// Starts `n` threads (at least one).
    pub fn new(n: usize) -> IoPool {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        let threads = (0..n.max(1))
            .map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("rh-expert-io-{i}"))
                    .spawn(move || worker(&s))
                    .expect("spawning an I/O thread")
            })
            .collect();
        IoPool { shared, threads }
    }

    /// Queues `job`.
    pub fn submit(&self, priority: Priority, job: impl FnOnce() + Send + 'static) {
        let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        match priority {
            Priority::Demand => q.demand.push_back(Box::new(job)),
            Priority::Ahead => q.ahead.push_back(Box::new(job)),
        }
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Jobs of the read-ahead queue not yet started.
    pub fn ahead_queued(&self) -> usize {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ahead
            .len()
    }
}

fn worker(s: &Shared) {
    loop {
        let job = {
            let mut q = s.queues.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(j) = q.demand.pop_front().or_else(|| q.ahead.pop_front()) {
                    break j;
                }
                if q.stop {
                    return;
                }
                q = s.ready.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        job();
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            q.stop = true;
            q.ahead.clear();
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
