//! The audit log's records and their hash chain.
//!
//! Each record carries the SHA-256 of the one before it, and its own hash covers its sequence
//! number, every field and that link. Editing a record breaks its own hash; deleting one
//! breaks the sequence and the next record's link; both are found by [`verify`]. The meta
//! group assigns sequence numbers and links as it applies records, so every meta node holds the
//! same chain.
//!
//! On disk and in exports a record is one JSON line ([`AuditRecord::to_json_line`]) with a
//! format version `v` (this build writes and reads 1).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::token::{hex, unhex};

/// The hash linking records.
pub type ChainHash = [u8; 32];

/// The record format this build writes.
pub const RECORD_VERSION: u32 = 1;

/// How an audited action ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused: no credentials, bad credentials, not allowed, or an allow-list.
    Denied,
    /// Allowed, but it failed (a volume that does not exist, say).
    Failed,
}

impl Outcome {
    /// The outcome's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Outcome, String> {
        match s {
            "ok" => Ok(Outcome::Ok),
            "denied" => Ok(Outcome::Denied),
            "failed" => Ok(Outcome::Failed),
            _ => Err(format!("unknown outcome {s:?}; outcomes are ok, denied, failed")),
        }
    }
}

/// What happened, before the meta group numbers and links it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When, Unix milliseconds (the recording node's clock).
    pub time_unix_ms: u64,
    /// Who: `token:<id>`, `node-3`, `client:ops`, or `unauthenticated`.
    pub actor: String,
    /// From where: the peer's address.
    pub source: String,
    /// What: an action name such as `volume.create` or `connect.data`.
    pub action: String,
    /// On what: a volume, node, token id (may be empty).
    pub target: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Why (an error, a refusal reason); never a credential.
    pub detail: String,
}

/// A record in the chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position in the chain, from 1.
    pub seq: u64,
    /// The event.
    pub event: AuditEvent,
    /// Hash of the previous record (zeros before the first).
    pub prev: ChainHash,
    /// This record's hash.
    pub hash: ChainHash,
}

fn field(h: &mut Sha256, s: &str) {
    h.update((s.len() as u64).to_be_bytes());
    h.update(s.as_bytes());
}

/// The hash a record with these contents must carry.
pub fn record_hash(seq: u64, event: &AuditEvent, prev: &ChainHash) -> ChainHash {
    let mut h = Sha256::new();
    h.update(b"basalt-audit-v1\0");
    h.update(seq.to_be_bytes());
    h.update(prev);
    h.update(event.time_unix_ms.to_be_bytes());
    for f in [&event.actor, &event.source, &event.action, &event.target, event.outcome.as_str(), &event.detail] {
        field(&mut h, f);
    }
    h.finalize().into()
}

impl AuditRecord {
    /// Numbers and links `event` after a record whose hash is `prev`.
    pub fn seal(seq: u64, event: AuditEvent, prev: ChainHash) -> AuditRecord {
        let hash = record_hash(seq, &event, &prev);
        AuditRecord { seq, event, prev, hash }
    }

    /// One JSON line (no newline).
    pub fn to_json_line(&self) -> String {
        let e = &self.event;
        serde_json::json!({
            "v": RECORD_VERSION,
            "seq": self.seq,
            "time_ms": e.time_unix_ms,
            "time": crate::identity::format_unix((e.time_unix_ms / 1000) as i64),
            "actor": e.actor,
            "source": e.source,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "detail": e.detail,
            "prev": hex(&self.prev),
            "hash": hex(&self.hash),
        })
        .to_string()
    }

    /// Parses a line written by [`AuditRecord::to_json_line`]. The stored hashes are taken as
    /// written, not recomputed: [`verify`] judges them.
    pub fn from_json_line(line: &str) -> Result<AuditRecord, String> {
        #[derive(Deserialize)]
        struct Line {
            v: u32,
            seq: u64,
            time_ms: u64,
            actor: String,
            source: String,
            action: String,
            target: String,
            outcome: Outcome,
            detail: String,
            prev: String,
            hash: String,
        }
        let l: Line = serde_json::from_str(line).map_err(|e| format!("not an audit record: {e}"))?;
        if l.v != RECORD_VERSION {
            return Err(format!("audit record format {} is not one this build reads (it reads {RECORD_VERSION})", l.v));
        }
        let h = |s: &str, what: &str| -> Result<ChainHash, String> {
            let b = unhex(s).filter(|b| b.len() == 32).ok_or_else(|| format!("record {}: {what} is not 64 hex digits", l.seq))?;
            let mut out = [0u8; 32];
            out.copy_from_slice(&b);
            Ok(out)
        };
        Ok(AuditRecord {
            seq: l.seq,
            prev: h(&l.prev, "prev")?,
            hash: h(&l.hash, "hash")?,
            event: AuditEvent {
                time_unix_ms: l.time_ms,
                actor: l.actor,
                source: l.source,
                action: l.action,
                target: l.target,
                outcome: l.outcome,
                detail: l.detail,
            },
        })
    }
}

/// Where a chain (or what is left of it after pruning) starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainAnchor {
    /// Sequence number of the first record kept.
    pub first_seq: u64,
    /// Hash of the record before it (zeros at the very start).
    pub prev: ChainHash,
}

/// What [`verify`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Records checked.
    pub checked: u64,
    /// The first problem, if any: the sequence number where it is and what it is.
    pub problem: Option<(u64, String)>,
    /// Hash of the last record (the chain's head).
    pub head: ChainHash,
}

/// Checks that `records` continue the chain from `anchor` with nothing edited, removed,
/// reordered or inserted, and that the last one is `expect_last` (when known: a record
/// deleted at the end leaves the chain intact but short).
pub fn verify<'a>(anchor: ChainAnchor, records: impl IntoIterator<Item = &'a AuditRecord>, expect_last: Option<u64>) -> Verdict {
    let mut expect_seq = anchor.first_seq.max(1);
    let mut prev = anchor.prev;
    let mut checked = 0;
    for r in records {
        let problem = if r.seq != expect_seq {
            Some(if r.seq > expect_seq {
                format!("records {expect_seq}..{} are missing", r.seq - 1)
            } else {
                format!("record {} appears again after {}", r.seq, expect_seq - 1)
            })
        } else if r.prev != prev {
            Some(format!("record {} does not link to the record before it", r.seq))
        } else if r.hash != record_hash(r.seq, &r.event, &r.prev) {
            Some(format!("record {} was altered: its contents do not match its hash", r.seq))
        } else {
            None
        };
        if let Some(p) = problem {
            return Verdict { checked, problem: Some((r.seq.min(expect_seq), p)), head: prev };
        }
        prev = r.hash;
        expect_seq += 1;
        checked += 1;
    }
    if let Some(last) = expect_last
        && expect_seq <= last
    {
        return Verdict { checked, problem: Some((expect_seq, format!("records {expect_seq}..{last} are missing at the end"))), head: prev };
    }
    Verdict { checked, problem: None, head: prev }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            time_unix_ms: 1_700_000_000_000 + i,
            actor: "token:00112233".into(),
            source: "127.0.0.1:5000".into(),
            action: "volume.create".into(),
            target: format!("vm{i}"),
            outcome: if i.is_multiple_of(2) { Outcome::Ok } else { Outcome::Denied },
            detail: "line\nbreak \"quoted\"".into(),
        }
    }

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = [0u8; 32];
        (1..=n)
            .map(|seq| {
                let r = AuditRecord::seal(seq, event(seq), prev);
                prev = r.hash;
                r
            })
            .collect()
    }

    #[test]
    fn an_intact_chain_verifies_and_round_trips_through_json() {
        let records = chain(5);
        let v = verify(ChainAnchor::default(), &records, Some(5));
        assert_eq!((v.checked, v.problem.clone()), (5, None));
        assert_eq!(v.head, records[4].hash);
        for r in &records {
            assert_eq!(&AuditRecord::from_json_line(&r.to_json_line()).unwrap(), r);
        }
        // Pruned: the rest verifies from its anchor.
        let anchor = ChainAnchor { first_seq: 3, prev: records[1].hash };
        assert_eq!(verify(anchor, &records[2..], Some(5)).problem, None);
    }

    #[test]
    fn edits_deletions_and_reordering_are_found() {
        let records = chain(6);
        let mut edited = records.clone();
        edited[2].event.outcome = Outcome::Ok;
        edited[2].event.outcome = if records[2].event.outcome == Outcome::Ok { Outcome::Denied } else { Outcome::Ok };
        let v = verify(ChainAnchor::default(), &edited, Some(6));
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(3));
        assert!(v.problem.unwrap().1.contains("altered"));

        // An edit that also rewrites the record's own hash still breaks the next link.
        let mut rehashed = records.clone();
        rehashed[2].event.detail = "nothing to see".into();
        rehashed[2].hash = record_hash(3, &rehashed[2].event, &rehashed[2].prev);
        let v = verify(ChainAnchor::default(), &rehashed, Some(6));
        assert_eq!(v.problem.as_ref().map(|p| p.0), Some(4));
        assert!(v.problem.unwrap().1.contains("does not link"));

        let mut deleted = records.clone();
        deleted.remove(3);
        let v = verify(ChainAnchor::default(), &deleted, Some(6));
        assert_eq!(v.problem, Some((4, "records 4..4 are missing".into())));

        let v = verify(ChainAnchor::default(), &records[..5], Some(6));
        assert_eq!(v.problem, Some((6, "records 6..6 are missing at the end".into())));

        let mut swapped = records.clone();
        swapped.swap(1, 2);
        assert!(verify(ChainAnchor::default(), &swapped, Some(6)).problem.is_some());
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        let line = chain(1)[0].to_json_line().replace("\"v\":1", "\"v\":2");
        assert!(AuditRecord::from_json_line(&line).unwrap_err().contains("format 2"));
        assert!(AuditRecord::from_json_line("{").is_err());
        assert!(AuditRecord::from_json_line(&chain(1)[0].to_json_line().replace("\"hash\":\"", "\"hash\":\"zz")).is_err());
    }
}
