//! A fixed table from the words the rules use to their ids in the
//! automaton, looked up once for every word of every text.
//!
//! Why not a `HashMap<Box<str>, _>`: normalized words are short, and the
//! general map spends most of a lookup hashing through a `Hasher` and
//! comparing keys through `memcmp`. This table hashes whole 8-byte chunks,
//! keeps the full hash in each slot so a mismatch is rejected without
//! touching the key, and compares the key only on a hash hit of a word
//! longer than eight bytes: for shorter words the hash is a bijection of
//! the word (see [`hash`]), so equal hashes and lengths are equal words.

/// A slot; `len == EMPTY` marks it empty.
#[derive(Debug, Clone, Copy)]
struct Slot<V> {
    hash: u64,
    at: u32,
    len: u32,
    code: V,
}

const EMPTY: u32 = u32::MAX;

impl<V: Default> Default for Slot<V> {
    fn default() -> Self {
        Slot {
            hash: 0,
            at: 0,
            len: EMPTY,
            code: V::default(),
        }
    }
}

/// Word → a small value: the automaton's word id in the matcher, the
/// normalizer's word flags in its lexicon. Built once; read-only afterwards.
#[derive(Debug, Clone, Default)]
pub struct WordTable<V = u16> {
    slots: Vec<Slot<V>>,
    keys: Vec<u8>,
    len: usize,
    /// A hash's home slot is its top bits: `hash >> shift`.
    shift: u32,
}

const K: u64 = 0x9E37_79B9_7F4A_7C15;

/// The table's hash of a word. Exposed so that a caller that keeps a
/// word's hash (the normalizer, for repeats) computes it once.
///
/// For a word of at most eight bytes it is a bijection of the word given
/// its length: the length is fixed, the word zero-padded to eight bytes is
/// one `u64`, and each step (xor with a constant, multiplication by an odd
/// constant, `h ^ (h >> 29)`) can be undone. So two such words of the same
/// length are equal exactly when their hashes are.
#[inline]
pub fn hash(w: &[u8]) -> u64 {
    let mut h = w.len() as u64;
    let mut chunks = w.chunks_exact(8);
    for c in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        h = step(h, u64::from_le_bytes(b));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut b = [0u8; 8];
        b[..rest.len()].copy_from_slice(rest);
        h = step(h, u64::from_le_bytes(b));
    }
    h ^ (h >> 29)
}

#[inline]
fn step(h: u64, chunk: u64) -> u64 {
    (h.rotate_left(23) ^ chunk).wrapping_mul(K)
}

/// `hash` of a word of 1 to 8 bytes given as one `u64` (little-endian,
/// zero-padded), for a caller that already holds it that way.
#[inline]
pub fn hash_short(len: usize, chunk: u64) -> u64 {
    let h = step(len as u64, chunk);
    h ^ (h >> 29)
}

/// `hash` of a word of 9 to 16 bytes given as two `u64`s (little-endian,
/// the second zero-padded).
#[inline]
pub fn hash_pair(len: usize, first: u64, second: u64) -> u64 {
    let h = step(step(len as u64, first), second);
    h ^ (h >> 29)
}

/// Byte equality without a call into `memcmp`, which costs more than the
/// comparison itself for keys this short.
#[inline]
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x == y)
}

impl<V: Copy + Default> WordTable<V> {
    /// A table with room for `n` words at a load of at most one half.
    pub fn with_capacity(n: usize) -> Self {
        let size = (2 * n.max(4)).next_power_of_two();
        WordTable {
            slots: vec![Slot::default(); size],
            keys: Vec::new(),
            len: 0,
            shift: shift_for(size),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Every word and its value, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], V)> {
        self.slots
            .iter()
            .filter(|s| s.len != EMPTY)
            .map(|s| (self.key(s), s.code))
    }

    fn key(&self, s: &Slot<V>) -> &[u8] {
        &self.keys[s.at as usize..(s.at + s.len) as usize]
    }

    /// The slot holding `w`, or the empty slot where it would go.
    /// Always inlined, as `get_hashed`: every word of every text is looked
    /// up, and a call costs about as much as the lookup.
    #[inline(always)]
    fn find(&self, w: &[u8], h: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = self.home(h);
        loop {
            let s = &self.slots[i];
            if s.len == EMPTY
                || (s.hash == h
                    && s.len as usize == w.len()
                    && (w.len() <= 8 || same(self.key(s), w)))
            {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    #[inline]
    pub fn get(&self, w: &[u8]) -> Option<V> {
        self.get_hashed(w, hash(w))
    }

    /// Like `get`, with `h == hash(w)` already known.
    #[inline(always)]
    pub fn get_hashed(&self, w: &[u8], h: u64) -> Option<V> {
        let s = &self.slots[self.find(w, h)];
        (s.len != EMPTY).then_some(s.code)
    }

    /// `get_hashed`, with `V::default()` for a word not in the table: an
    /// empty slot holds that value, so no branch decides between the two.
    #[inline(always)]
    pub fn get_or_default(&self, w: &[u8], h: u64) -> V {
        self.slots[self.find(w, h)].code
    }

    /// Adds `w` with the code `make` gives it, unless already present;
    /// returns its code. Grows as needed.
    pub fn insert_with(&mut self, w: &[u8], make: impl FnOnce(usize) -> V) -> V {
        *self.entry_with(w, make)
    }

    /// The value of `w`, added with the code `make` gives it if absent.
    pub fn entry_with(&mut self, w: &[u8], make: impl FnOnce(usize) -> V) -> &mut V {
        if 2 * (self.len + 1) > self.slots.len() {
            self.grow();
        }
        let h = hash(w);
        let i = self.find(w, h);
        if self.slots[i].len != EMPTY {
            return &mut self.slots[i].code;
        }
        let code = make(self.len);
        // Keys are words of rule phrases, far below 4 GiB in all.
        self.slots[i] = Slot {
            hash: h,
            at: self.keys.len() as u32,
            len: w.len() as u32,
            code,
        };
        self.keys.extend_from_slice(w);
        self.len += 1;
        &mut self.slots[i].code
    }

    /// Doubles the slots (a load of at most one quarter) for a table that
    /// is read far more than it is built: a probe then nearly always ends
    /// at its first slot.
    pub fn spread(&mut self) {
        self.grow();
    }

    /// The slot where a search for hash `h` begins. The top bits: of a
    /// multiplicative hash they are the best mixed. (Bits 40 up, which
    /// this took before, depend on none of a word's eighth byte: the
    /// lexicon's 9,592 words then sat half a slot from home on average
    /// and up to 32, at a load of one seventh; from the top bits, 0.09
    /// and 2.)
    #[inline(always)]
    fn home(&self, h: u64) -> usize {
        (h >> self.shift) as usize
    }

    fn grow(&mut self) {
        let old = std::mem::take(&mut self.slots);
        self.slots = vec![Slot::default(); (old.len() * 2).max(8)];
        self.shift = shift_for(self.slots.len());
        for s in old.into_iter().filter(|s| s.len != EMPTY) {
            let mask = self.slots.len() - 1;
            let mut j = self.home(s.hash);
            while self.slots[j].len != EMPTY {
                j = (j + 1) & mask;
            }
            self.slots[j] = s;
        }
    }
}

/// The shift that leaves a hash's top bits as a slot of a table of
/// `size` (a power of two, at least 2) slots.
fn shift_for(size: usize) -> u32 {
    64 - size.trailing_zeros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_was_inserted_and_nothing_else() {
        let mut t = WordTable::with_capacity(2);
        let words: Vec<String> = (0..5000).map(|i| format!("w{i}")).collect();
        for (i, w) in words.iter().enumerate() {
            let c = t.insert_with(w.as_bytes(), |n| [(n >> 8) as u8, n as u8]);
            assert_eq!(c, [(i >> 8) as u8, i as u8]);
        }
        // Inserting again keeps the first code.
        assert_eq!(t.insert_with(b"w7", |_| [9, 9]), [0, 7]);
        assert_eq!(t.len(), 5000);
        for (i, w) in words.iter().enumerate() {
            assert_eq!(t.get(w.as_bytes()), Some([(i >> 8) as u8, i as u8]), "{w}");
        }
        for miss in ["", "w", "w5000", "w12345678901234567", "x1"] {
            assert_eq!(t.get(miss.as_bytes()), None, "{miss}");
        }
    }

    /// Words that differ only in their eighth byte ("scheduld", "schedule",
    /// ...) each begin a search at a slot of their own, nearly: their
    /// hashes differ in the top bits. From bits 40 up they shared one home
    /// and lay in a row after it.
    #[test]
    fn words_differing_in_their_eighth_byte_sit_near_home() {
        let mut t = WordTable::with_capacity(64);
        for b in b'a'..=b'z' {
            let w = [b's', b'c', b'h', b'e', b'd', b'u', b'l', b];
            t.insert_with(&w, |n| n as u16);
        }
        let mask = t.slots.len() - 1;
        let farthest = t
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.len != EMPTY)
            .map(|(i, s)| i.wrapping_sub(t.home(s.hash)) & mask)
            .max();
        assert!(farthest.is_some_and(|d| d <= 3), "{farthest:?}");
    }

    #[test]
    fn short_words_of_equal_hash_and_length_are_equal() {
        // Neighbours in every byte, and words that differ only in padding.
        let mut t = WordTable::with_capacity(4);
        let base = b"abcdefgh";
        for n in 0..=8 {
            for i in 0..n {
                for d in [1u8, 0x20, 0x80] {
                    let mut w = base[..n].to_vec();
                    w[i] ^= d;
                    t.insert_with(&w, |_| [n as u8, i as u8]);
                }
            }
        }
        for n in 0..=8 {
            assert_eq!(t.get(&base[..n]), None, "{n}");
            let mut padded = base[..n].to_vec();
            padded.push(0);
            assert_eq!(t.get(&padded), None, "{n} padded");
        }
    }

    #[test]
    fn hash_short_is_hash() {
        for w in ["ab", "i", "myself", "abcdefgh", "suicide", "zz"] {
            let mut b = [0u8; 8];
            b[..w.len()].copy_from_slice(w.as_bytes());
            assert_eq!(
                hash_short(w.len(), u64::from_le_bytes(b)),
                hash(w.as_bytes()),
                "{w}"
            );
        }
    }

    #[test]
    fn hash_pair_is_hash() {
        for w in [
            "abcdefghi",
            "suicidality",
            "abcdefghijklmnop",
            "hopelessness",
        ] {
            let mut b = [0u8; 16];
            b[..w.len()].copy_from_slice(w.as_bytes());
            let (mut x0, mut x1) = ([0u8; 8], [0u8; 8]);
            x0.copy_from_slice(&b[..8]);
            x1.copy_from_slice(&b[8..]);
            assert_eq!(
                hash_pair(w.len(), u64::from_le_bytes(x0), u64::from_le_bytes(x1)),
                hash(w.as_bytes()),
                "{w}"
            );
        }
    }

    #[test]
    fn long_and_empty_keys() {
        let mut t = WordTable::with_capacity(4);
        let long = "a".repeat(40);
        t.insert_with(long.as_bytes(), |_| [1, 1]);
        t.insert_with(b"", |_| [2, 2]);
        assert_eq!(t.get(long.as_bytes()), Some([1, 1]));
        assert_eq!(t.get(&long.as_bytes()[1..]), None);
        assert_eq!(t.get(b""), Some([2, 2]));
    }
}
