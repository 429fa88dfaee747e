//! Conversation state: what crisisd keeps about a live call or a text
//! thread between one utterance or message and the next.
//!
//! A call's state lives in its stream's task and dies with it: the speaker
//! windows Tier 1 matches across fragments, the open escalation, and the
//! finals already seen. A text thread's state lives in [`Threads`], shared by
//! requests: bounded to `limits.max_threads` threads (the least recently used
//! goes first), and a thread idle past `limits.thread_window_secs` starts
//! afresh. Forgetting a thread forgets only its window; what was escalated
//! is in the store. Texts of one thread are handled one at a time, in
//! arrival order; different threads never wait for each other.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;
use std::sync::Arc;

use lru::LruCache;
use thiserror::Error;
use tokio::sync::Mutex;

use crate::escalation::Open;
use crate::ids::{CallId, PatientId, PracticeId, UtteranceId};
use crate::tier1::StreamState;
use crate::tier2::Turn;

/// Final utterance ids remembered per call, to ignore a repeated final.
const FINALS_REMEMBERED: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("not a language tag")]
pub struct LanguageError;

/// A language tag, reduced to what crisisd uses it for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Language(String);

impl Language {
    /// BCP 47-shaped: a 2-3 letter language, then subtags of 1-8 letters
    /// or digits. Empty means English.
    pub fn parse(s: &str) -> Result<Language, LanguageError> {
        if s.is_empty() {
            return Ok(Language("en".to_string()));
        }
        let mut parts = s.split(['-', '_']);
        let lang = parts.next().unwrap_or_default();
        let ok = s.len() <= 35
            && (2..=3).contains(&lang.len())
            && lang.bytes().all(|b| b.is_ascii_alphabetic())
            && parts.all(|p| {
                (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_alphanumeric())
            });
        if !ok {
            return Err(LanguageError);
        }
        Ok(Language(s.to_ascii_lowercase().replace('_', "-")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a call began.
#[derive(Debug, Clone)]
pub struct CallStart {
    pub call: CallId,
    pub patient: PatientId,
    pub practice: PracticeId,
    pub language: Language,
}

/// One live call.
pub struct Call {
    pub start: CallStart,
    /// Tier 1's window and automaton state for this call.
    pub stream: StreamState,
    /// Recent final turns of both speakers, for Tier 2. In memory only.
    pub turns: VecDeque<Turn>,
    /// The escalation state, shared with the call's Tier 2 worker.
    pub shared: Arc<Mutex<CallShared>>,
    /// The last finals' ids, each with its hash: a repeat is found by
    /// scanning the hashes and confirmed on the id itself, one copy of each
    /// id, no hash set to keep in step (this ran on every final).
    finals: VecDeque<(u64, UtteranceId)>,
    pub utterances: u64,
}

/// What the stream and its Tier 2 worker both change.
#[derive(Debug, Default)]
pub struct CallShared {
    pub open: Option<Open>,
    pub escalations: u64,
    pub directives: u64,
}

impl Call {
    pub fn new(start: CallStart) -> Call {
        Call {
            start,
            stream: StreamState::new(),
            turns: VecDeque::new(),
            shared: Arc::default(),
            finals: VecDeque::new(),
            utterances: 0,
        }
    }

    /// Keeps a final turn for Tier 2's window, at most `max` of them.
    pub fn remember(&mut self, turn: Turn, max: usize) {
        if self.turns.len() >= max.max(1) {
            self.turns.pop_front();
        }
        self.turns.push_back(turn);
    }

    /// Whether this final was seen already; remembers it if not.
    pub fn repeated_final(&mut self, id: &UtteranceId) -> bool {
        let hash = rustc_hash::FxBuildHasher.hash_one(id.as_str());
        if self.finals.iter().any(|(h, seen)| *h == hash && seen == id) {
            return true;
        }
        if self.finals.len() == FINALS_REMEMBERED {
            self.finals.pop_front();
        }
        self.finals.push_back((hash, id.clone()));
        false
    }
}

/// One thread's state.
#[derive(Debug, Default)]
pub struct Thread {
    pub stream: StreamState,
    pub open: Option<Open>,
    pub last_ms: i64,
    /// Recent texts, for Tier 2. In memory only.
    pub turns: VecDeque<Turn>,
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

    #[test]
    fn repeated_finals_are_found_among_the_last_ones_only() {
        let start = CallStart {
            call: CallId::parse("c1").expect("id"),
            patient: PatientId::parse("p1").expect("id"),
            practice: PracticeId::parse("pr").expect("id"),
            language: Language::parse("en").expect("tag"),
        };
        let mut call = Call::new(start);
        let id = |n: usize| UtteranceId::parse(&format!("u{n}")).expect("id");
        assert!(!call.repeated_final(&id(0)));
        assert!(call.repeated_final(&id(0)), "a repeat");
        assert!(!call.repeated_final(&id(1)), "another id");
        for n in 2..FINALS_REMEMBERED + 1 {
            assert!(!call.repeated_final(&id(n)));
        }
        // u0 is the oldest of 257: forgotten; u1 is still remembered.
        assert!(call.repeated_final(&id(1)));
        assert!(!call.repeated_final(&id(0)));
        assert_eq!(call.finals.len(), FINALS_REMEMBERED);
    }
}
