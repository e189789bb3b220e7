//! Prompt reuse for a hybrid model. A recurrent (DeltaNet) state cannot be
//! rolled back to a shared prefix the way a KV cache can be truncated, so
//! instead whole [`State`]s are kept at useful points (the end of a
//! request's history, prompt and answer), keyed by the exact tokens they
//! consumed. A later request whose tokens extend a kept key starts from a
//! copy of that state and feeds only the rest.

use crate::model::State;

/// One kept state.
struct Entry {
    /// Every token the state consumed, in order.
    tokens: Vec<u32>,
    state: State,
    /// Logits after the last token (so a request that ends exactly here
    /// can sample without feeding anything).
    logits: Vec<f32>,
    /// Recency stamp for LRU eviction.
    used: u64,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.state.bytes() + 4 * (self.logits.len() + self.tokens.len())
    }
}

/// What a lookup found: a copy of a kept state and its logits.
pub struct Hit {
    /// Tokens of the request the state already holds.
    pub tokens: usize,
    /// The state after those tokens.
    pub state: State,
    /// Logits after the last of them.
    pub logits: Vec<f32>,
}

/// States keyed by token prefix, least recently used evicted first, under
/// a byte budget.
pub struct PrefixCache {
    entries: Vec<Entry>,
    budget: usize,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes (0 disables it).
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            budget,
            bytes: 0,
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// States held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Lookups that found a state / found none.
    pub fn hits_misses(&self) -> (u64, u64) {
        (self.hits, self.misses)
    }

    /// The longest kept prefix of `tokens`, copied out.
    pub fn lookup(&mut self, tokens: &[u32]) -> Option<Hit> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() <= tokens.len() && tokens.starts_with(&e.tokens))
            .max_by_key(|e| e.tokens.len());
        match best {
            Some(e) => {
                e.used = self.clock;
                self.hits += 1;
                Some(Hit {
                    tokens: e.tokens.len(),
                    state: e.state.clone(),
                    logits: e.logits.clone(),
                })
            }
            None => {
                self.misses += 1;
                None
            }
        }
    }

    /// Keeps `state` (which consumed exactly `tokens`) and its `logits`,
    /// evicting the least recently used states to stay within the budget.
    /// A state larger than the whole budget is not kept.
    pub fn insert(&mut self, tokens: &[u32], state: &State, logits: &[f32]) {
        debug_assert_eq!(state.position(), tokens.len());
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.tokens == tokens) {
            e.used = self.clock;
            return;
        }
        let entry = Entry {
            tokens: tokens.to_vec(),
            state: state.clone(),
            logits: logits.to_vec(),
            used: self.clock,
        };
        let size = entry.bytes();
        if tokens.is_empty() || size > self.budget {
            return;
        }
        while self.bytes + size > self.budget {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.used)
                .map(|(i, _)| i)
                .expect("bytes > 0 means an entry is held");
            let e = self.entries.swap_remove(oldest);
            self.bytes -= e.bytes();
        }
        self.bytes += size;
        self.entries.push(entry);
    }
}

/// Default `--cache-ram` under `--memory-budget`: a sixteenth of the
/// budget (it comes out of the budget), at most [`default_budget_bytes`].
pub fn default_budget_bytes_within(memory_budget: u64) -> usize {
    let share = usize::try_from(memory_budget / 16).unwrap_or(usize::MAX);
    default_budget_bytes().min(share)
}

/// Default `--cache-ram`: a quarter of the RAM the system reports as
/// available, at most 8 GiB; 1 GiB when it cannot be read.
pub fn default_budget_bytes() -> usize {
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<usize>().ok())
            .map(|kb| kb.saturating_mul(1024))
    });
    match avail {
        Some(b) => (b / 4).min(8 << 30),
        None => 1 << 30,
    }
}
