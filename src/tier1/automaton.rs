//! The matcher's automaton: Aho-Corasick over words, not bytes.
//!
//! Each word a rule uses has a small id (the normalizer's lexicon hands it
//! out with the word), each literal is a sequence of ids, and the automaton
//! takes one step per word. Every other word sends it to the start.
//!
//! Why not the `aho-corasick` crate's automaton over two-byte word codes,
//! which the matcher ran before: about four words in five of a text are
//! words some rule uses, and each cost two byte steps, each a walk of a
//! sparse state and its failure links. Here a step from the start (the
//! state after most words) is one array lookup, and a step elsewhere is
//! one probe of a hash table of trie edges per failure link followed. The
//! matches are the byte automaton's: a literal can only begin at a word,
//! so its failure links landed on word bounds too.
//!
//! Matches are reported as Aho-Corasick's standard, overlapping semantics
//! has them: at each word, every literal that ends there.

/// A state of the automaton.
pub(crate) type StateId = u32;

/// The start state: where matching begins and where unknown words lead.
pub(crate) const START: StateId = 0;

/// Set in a state id whose state ends some literal. Most steps land on a
/// state that ends none, and the bit says so without a load: on a long text
/// that load, a cache miss into a table of 40,000 states, was a tenth of
/// the scan's time. Edge keys and table indices use the id without it.
const ENDS: StateId = 1 << 31;

/// Word ids are below this; a state and a word make one edge key.
const WORD_BITS: u32 = 16;

const EMPTY: u64 = u64::MAX;

#[derive(Debug, Clone, Copy)]
struct Edge {
    key: u64,
    next: StateId,
}

/// Trie edges out of states other than the start, keyed by state and
/// word: open addressing, at most a quarter full, so that a probe nearly
/// always ends at its first slot (a step that follows failure links
/// probes once a link).
#[derive(Debug, Default)]
struct Edges {
    slots: Vec<Edge>,
    shift: u32,
}

impl Edges {
    fn with_edges(n: usize) -> Self {
        let size = (4 * n.max(4)).next_power_of_two();
        Edges {
            slots: vec![
                Edge {
                    key: EMPTY,
                    next: START
                };
                size
            ],
            shift: 64 - size.trailing_zeros(),
        }
    }

    #[inline]
    fn key(state: StateId, word: u16) -> u64 {
        (u64::from(state) << WORD_BITS) | u64::from(word)
    }

    /// The slot holding `key`, or the empty slot where it would go.
    #[inline]
    fn find(&self, key: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize;
        loop {
            let k = self.slots[i].key;
            if k == key || k == EMPTY {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    fn get(&self, state: StateId, word: u16) -> Option<StateId> {
        let e = self.slots[self.find(Self::key(state, word))];
        (e.key != EMPTY).then_some(e.next)
    }

    fn insert(&mut self, state: StateId, word: u16, next: StateId) {
        let key = Self::key(state, word);
        let i = self.find(key);
        self.slots[i] = Edge { key, next };
    }
}

#[derive(Debug, Default)]
pub(crate) struct WordAutomaton {
    /// Per word id, the state that word leads to from the start.
    from_start: Vec<StateId>,
    edges: Edges,
    fail: Vec<StateId>,
    /// Per state, its matches: a range of `matches`. Indexed by a state
    /// id without `ENDS`.
    match_at: Vec<(u32, u32)>,
    /// Literal ids; each state's own literal first, then its failure
    /// state's matches, so that a state holds every literal it ends.
    matches: Vec<u32>,
}

/// The automaton's size overflowed its 32-bit state or match ids.
#[derive(Debug)]
pub(crate) struct TooLarge;

impl WordAutomaton {
    /// The automaton of `literals` (literal `i` is the word ids of the
    /// `i`-th); every word id is below `words`.
    pub(crate) fn new<'a>(
        literals: impl ExactSizeIterator<Item = &'a [u16]> + Clone,
        words: usize,
    ) -> Result<Self, TooLarge> {
        // The trie: states in order of creation, each with its parent and
        // the word that leads to it.
        let mut from_start = vec![START; words];
        let mut parent: Vec<(StateId, u16)> = vec![(START, 0)];
        let mut own: Vec<(StateId, u32)> = Vec::with_capacity(literals.len());
        let mut building: rustc_hash::FxHashMap<u64, StateId> = rustc_hash::FxHashMap::default();
        for (i, lit) in literals.clone().enumerate() {
            let mut s = START;
            for &w in lit {
                let known = if s == START {
                    from_start
                        .get(usize::from(w))
                        .copied()
                        .filter(|&n| n != START)
                } else {
                    building.get(&Edges::key(s, w)).copied()
                };
                s = match known {
                    Some(n) => n,
                    None => {
                        let n = StateId::try_from(parent.len())
                            .ok()
                            .filter(|&n| n < ENDS)
                            .ok_or(TooLarge)?;
                        parent.push((s, w));
                        if s == START {
                            *from_start.get_mut(usize::from(w)).ok_or(TooLarge)? = n;
                        } else {
                            building.insert(Edges::key(s, w), n);
                        }
                        n
                    }
                };
            }
            own.push((s, u32::try_from(i).map_err(|_| TooLarge)?));
        }
        let mut edges = Edges::with_edges(building.len());
        for (&key, &next) in &building {
            // The key was made from a state and a word: split it back.
            edges.insert((key >> WORD_BITS) as StateId, key as u16, next);
        }
        drop(building);

        // States by depth: a state's failure state is shallower, so it is
        // known by the time the state is reached.
        let n = parent.len();
        let mut depth = vec![0u32; n];
        for s in 1..n {
            depth[s] = depth[parent[s].0 as usize] + 1;
        }
        let mut order: Vec<StateId> = (1..n as StateId).collect();
        order.sort_by_key(|&s| depth[s as usize]);

        let mut a = WordAutomaton {
            from_start,
            edges,
            fail: vec![START; n],
            match_at: vec![(0, 0); n],
            matches: Vec::new(),
        };
        for &s in &order {
            let (p, w) = parent[s as usize];
            if p != START {
                a.fail[s as usize] = a.next(a.fail[p as usize], w);
            }
        }
        // Matches, shallow states first: each state's own literals, then
        // its failure state's.
        own.sort_unstable();
        let mut own_of = vec![(0u32, 0u32); n];
        let mut own_ids = Vec::with_capacity(own.len());
        for &(s, i) in &own {
            let r = &mut own_of[s as usize];
            if r.1 == 0 {
                r.0 = own_ids.len() as u32;
            }
            r.1 += 1;
            own_ids.push(i);
        }
        for &s in &order {
            let start = u32::try_from(a.matches.len()).map_err(|_| TooLarge)?;
            let (o, len) = own_of[s as usize];
            a.matches
                .extend_from_slice(&own_ids[o as usize..(o + len) as usize]);
            let (f, flen) = a.match_at[a.fail[s as usize] as usize];
            a.matches
                .extend_from_within(f as usize..(f + flen) as usize);
            let end = u32::try_from(a.matches.len()).map_err(|_| TooLarge)?;
            a.match_at[s as usize] = (start, end - start);
        }
        // Mark the ids `next` returns (failure links are only followed,
        // never returned) that lead to a state ending a literal.
        let tag = |n: StateId, match_at: &[(u32, u32)]| match match_at.get(n as usize) {
            Some(&(_, len)) if len > 0 => n | ENDS,
            _ => n,
        };
        for n in &mut a.from_start {
            *n = tag(*n, &a.match_at);
        }
        for e in &mut a.edges.slots {
            if e.key != EMPTY {
                e.next = tag(e.next, &a.match_at);
            }
        }
        Ok(a)
    }

    /// The state after word `word` from state `s`.
    #[inline]
    pub(crate) fn next(&self, s: StateId, word: u16) -> StateId {
        let mut s = s & !ENDS;
        loop {
            if s == START {
                return self
                    .from_start
                    .get(usize::from(word))
                    .copied()
                    .unwrap_or(START);
            }
            if let Some(n) = self.edges.get(s, word) {
                return n;
            }
            s = self.fail.get(s as usize).copied().unwrap_or(START);
        }
    }

    /// The literals that end at state `s`. The test of the bit is inlined
    /// into every word's step; the lookup, for a state that ends a
    /// literal, is not. Left to the compiler, the whole was a call for
    /// each of the four in five words the rules use.
    #[inline(always)]
    pub(crate) fn matches(&self, s: StateId) -> &[u32] {
        if s & ENDS == 0 {
            return &[];
        }
        self.matches_at(s)
    }

    #[inline(never)]
    fn matches_at(&self, s: StateId) -> &[u32] {
        match self.match_at.get((s & !ENDS) as usize) {
            Some(&(start, len)) if len > 0 => self
                .matches
                .get(start as usize..(start + len) as usize)
                .unwrap_or_default(),
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (word count at the match's end, literal id), sorted.
    type Found = Vec<(usize, u32)>;

    /// Every (end, literal) a naive search over word ids finds, and what
    /// the automaton reports, word by word.
    fn both(literals: &[Vec<u16>], text: &[Option<u16>]) -> (Found, Found) {
        let a = WordAutomaton::new(literals.iter().map(Vec::as_slice), 64).expect("builds");
        let mut naive = Vec::new();
        for end in 1..=text.len() {
            for (i, l) in literals.iter().enumerate() {
                if l.len() <= end
                    && text[end - l.len()..end]
                        .iter()
                        .zip(l)
                        .all(|(t, w)| *t == Some(*w))
                {
                    naive.push((end, i as u32));
                }
            }
        }
        let mut got = Vec::new();
        let mut s = START;
        for (k, w) in text.iter().enumerate() {
            s = match w {
                Some(w) => a.next(s, *w),
                None => START,
            };
            for &m in a.matches(s) {
                got.push((k + 1, m));
            }
        }
        naive.sort_unstable();
        got.sort_unstable();
        (naive, got)
    }

    #[test]
    fn finds_every_literal_ending_at_every_word() {
        let lits: Vec<Vec<u16>> = vec![
            vec![1, 2, 3],
            vec![2, 3],
            vec![3],
            vec![1, 2, 1, 2, 4],
            vec![2, 1],
            vec![5, 5, 5],
            vec![1],
        ];
        let texts: Vec<Vec<Option<u16>>> = vec![
            vec![Some(1), Some(2), Some(3)],
            vec![
                Some(1),
                Some(2),
                Some(1),
                Some(2),
                Some(1),
                Some(2),
                Some(4),
            ],
            vec![Some(5), Some(5), Some(5), Some(5), None, Some(5), Some(5)],
            vec![Some(2), Some(1), None, Some(2), Some(3), Some(9)],
            vec![],
        ];
        for t in &texts {
            let (naive, got) = both(&lits, t);
            assert_eq!(got, naive, "{t:?}");
        }
    }

    #[test]
    fn agrees_with_a_naive_search_on_pseudo_random_text() {
        let mut x: u64 = 7;
        let mut rnd = |n: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for _ in 0..200 {
            let lits: Vec<Vec<u16>> = (0..1 + rnd(12))
                .map(|_| (0..1 + rnd(4)).map(|_| rnd(4) as u16).collect())
                .collect();
            let text: Vec<Option<u16>> = (0..rnd(40))
                .map(|_| (rnd(6) != 0).then(|| rnd(5) as u16))
                .collect();
            let (naive, got) = both(&lits, &text);
            assert_eq!(got, naive, "{lits:?} {text:?}");
        }
    }
}
