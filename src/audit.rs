//! The audit log: append-only, hash-chained.
//!
//! Each row carries the hash of the row before it and its own hash over its
//! fields and that link, so altering a row breaks its hash, and removing or
//! reordering rows breaks the chain after them. The database refuses update
//! and delete (triggers); the chain catches what someone with the file does
//! anyway. Rows hold ids, counts and codes, never text or patient ids.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The link before the first row.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What happened, as the service records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// The authenticated client's name, or `crisisd` for the service itself.
    pub actor: String,
    pub request_id: String,
    /// `stream.open`, `stream.close`, `message`, `escalation.create`,
    /// `escalation.raise`, `escalation.get`, `escalation.list`, …
    pub action: String,
    /// What it concerns: `call:ID`, `thread:ID`, `escalation:ID`, …
    pub subject: String,
    /// A JSON object of counts and codes.
    pub detail: serde_json::Value,
}

/// A stored row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub request_id: String,
    pub action: String,
    pub subject: String,
    /// JSON text, exactly as hashed.
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of a row's fields and the link before it. Each field is
/// length-prefixed, so no choice of field contents can mimic another row.
/// `text` is actor, request id, action, subject and detail, in that order.
pub fn row_hash(prev_hash: &str, seq: i64, at_ms: i64, text: [&str; 5]) -> String {
    let mut h = Sha256::new();
    let [actor, request_id, action, subject, detail] = text;
    for field in [
        prev_hash.as_bytes(),
        &seq.to_le_bytes(),
        &at_ms.to_le_bytes(),
        actor.as_bytes(),
        request_id.as_bytes(),
        action.as_bytes(),
        subject.as_bytes(),
        detail.as_bytes(),
    ] {
        h.update((field.len() as u64).to_le_bytes());
        h.update(field);
    }
    hex::encode(h.finalize())
}

impl AuditRow {
    /// The row that follows `prev_hash` at `seq`.
    pub fn chain(prev_hash: &str, seq: i64, at_ms: i64, e: &AuditEvent) -> AuditRow {
        let detail = e.detail.to_string();
        let hash = row_hash(
            prev_hash,
            seq,
            at_ms,
            [&e.actor, &e.request_id, &e.action, &e.subject, &detail],
        );
        AuditRow {
            seq,
            at_ms,
            actor: e.actor.clone(),
            request_id: e.request_id.clone(),
            action: e.action.clone(),
            subject: e.subject.clone(),
            detail,
            prev_hash: prev_hash.to_string(),
            hash,
        }
    }

    fn computed_hash(&self) -> String {
        row_hash(
            &self.prev_hash,
            self.seq,
            self.at_ms,
            [
                &self.actor,
                &self.request_id,
                &self.action,
                &self.subject,
                &self.detail,
            ],
        )
    }
}

/// One break in the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The row's contents no longer match its hash.
    Altered { seq: i64 },
    /// Rows are missing before this one (its sequence number skips).
    Missing { seq: i64, expected: i64 },
    /// The row does not follow the one before it: rows were removed or
    /// reordered, or a hash was rewritten.
    Unlinked { seq: i64 },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Altered { seq } => {
                write!(f, "row {seq}: altered (contents do not match its hash)")
            }
            Problem::Missing { seq, expected } => {
                write!(f, "row {seq}: rows {expected}..{} are missing", seq - 1)
            }
            Problem::Unlinked { seq } => write!(
                f,
                "row {seq}: does not follow the row before it (removed, reordered or rewritten rows)"
            ),
        }
    }
}

/// Checks rows in stored order (by `seq`) from the first. Returns every
/// problem found; empty means the chain is intact.
pub fn verify<'a>(rows: impl IntoIterator<Item = &'a AuditRow>) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut prev = GENESIS.to_string();
    let mut expected = 1;
    for r in rows {
        if r.seq != expected {
            problems.push(Problem::Missing {
                seq: r.seq,
                expected,
            });
        }
        if r.computed_hash() != r.hash {
            problems.push(Problem::Altered { seq: r.seq });
        } else if r.prev_hash != prev {
            problems.push(Problem::Unlinked { seq: r.seq });
        }
        prev = r.hash.clone();
        expected = r.seq + 1;
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<AuditRow> {
        let mut rows: Vec<AuditRow> = Vec::new();
        for seq in 1..=n {
            let prev = rows.last().map_or(GENESIS.to_string(), |r| r.hash.clone());
            rows.push(AuditRow::chain(
                &prev,
                seq,
                1_000 + seq,
                &AuditEvent {
                    actor: "voice".into(),
                    request_id: format!("r{seq}"),
                    action: "message".into(),
                    subject: format!("thread:t{seq}"),
                    detail: serde_json::json!({"outcome": "none"}),
                },
            ));
        }
        rows
    }

    #[test]
    fn intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), vec![]);
        assert_eq!(verify(&[]), vec![]);
    }

    #[test]
    fn tampering_table() {
        type Tamper = fn(&mut Vec<AuditRow>);
        let cases: &[(&str, Tamper, Problem)] = &[
            (
                "altered detail",
                |r| r[2].detail = "{}".into(),
                Problem::Altered { seq: 3 },
            ),
            (
                "altered actor",
                |r| r[0].actor = "admin".into(),
                Problem::Altered { seq: 1 },
            ),
            (
                "removed row",
                |r| {
                    r.remove(1);
                },
                Problem::Missing {
                    seq: 3,
                    expected: 2,
                },
            ),
            (
                "swapped rows",
                |r| r.swap(1, 2),
                Problem::Missing {
                    seq: 3,
                    expected: 2,
                },
            ),
            (
                "rehashed after edit",
                |r| {
                    r[3].detail = "{}".into();
                    r[3].hash = r[3].computed_hash();
                },
                Problem::Unlinked { seq: 5 },
            ),
        ];
        for (what, tamper, want) in cases {
            let mut rows = chain(5);
            tamper(&mut rows);
            let got = verify(&rows);
            assert!(got.contains(want), "{what}: {got:?}");
        }
    }

    #[test]
    fn removing_the_last_row_needs_the_count() {
        // Truncation at the end leaves a valid chain; the store keeps the
        // count of rows written to catch it (see store::Store::audit_head).
        let mut rows = chain(3);
        rows.pop();
        assert_eq!(verify(&rows), vec![]);
    }
}
