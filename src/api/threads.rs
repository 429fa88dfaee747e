//! Text threads in memory: each thread's recent words (so a phrase split
//! over two texts is found) and its open escalation.
//!
//! Bounded: at most `limits.max_threads` threads, the least recently used
//! dropped first, and a thread idle past `limits.thread_window_secs` starts
//! afresh. Dropping a thread forgets only its window; what was escalated is
//! in the store. Texts of one thread are handled one at a time, in arrival
//! order; different threads never wait for each other.

use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use tokio::sync::Mutex;

use crate::escalation::Open;
use crate::tier1::StreamState;

/// One thread's state.
#[derive(Debug, Default)]
pub struct Thread {
    pub stream: StreamState,
    pub open: Option<Open>,
    pub last_ms: i64,
}

/// Threads by (practice, thread id).
type ThreadMap = LruCache<(String, String), Arc<Mutex<Thread>>>;

pub struct Threads {
    map: std::sync::Mutex<ThreadMap>,
    window_ms: i64,
}

impl Threads {
    pub fn new(max: usize, window_secs: u64) -> Threads {
        Threads {
            map: std::sync::Mutex::new(LruCache::new(
                NonZeroUsize::new(max).unwrap_or(NonZeroUsize::MIN),
            )),
            window_ms: i64::try_from(window_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
        }
    }

    /// The thread `(practice, thread)`, created if new. Lock it to use it;
    /// call [`Thread::fresh`] first.
    pub fn get(&self, practice: &str, thread: &str) -> Arc<Mutex<Thread>> {
        // The map lock is held only for the lookup, never across an await.
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get_or_insert((practice.to_string(), thread.to_string()), Default::default)
            .clone()
    }

    pub fn window_ms(&self) -> i64 {
        self.window_ms
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Thread {
    /// Forgets the window and open escalation if the thread has been quiet
    /// longer than `window_ms`.
    pub fn fresh(&mut self, now_ms: i64, window_ms: i64) {
        if self.last_ms > 0 && now_ms.saturating_sub(self.last_ms) > window_ms {
            *self = Thread::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_and_expiring() {
        let t = Threads::new(2, 10);
        t.get("p", "a").lock().await.last_ms = 1;
        t.get("p", "b");
        t.get("p", "c");
        assert_eq!(t.len(), 2);
        // "a" was the least recently used: it starts afresh.
        assert_eq!(t.get("p", "a").lock().await.last_ms, 0);
        // Same thread id in another practice is another thread.
        let x = t.get("q", "c");
        x.lock().await.last_ms = 5;
        assert_eq!(t.get("p", "c").lock().await.last_ms, 0);

        let mut th = Thread {
            last_ms: 1_000,
            ..Default::default()
        };
        th.fresh(5_000, 10_000);
        assert_eq!(th.last_ms, 1_000);
        th.fresh(20_000, 10_000);
        assert_eq!(th.last_ms, 0);
    }
}
