//! A meta node's copy of the audit log: one JSON line per record in `audit.jsonl`, appended as
//! the meta state machine applies audit commands, in the order the meta group sealed them.
//!
//! The Raft log is the authority until a checkpoint: appends are not synced one by one, a
//! checkpoint syncs the file before the log entries behind it may be purged, and recovery cuts
//! the file back to the checkpoint's head so replay appends the rest again (a torn last line
//! goes with it). Pruning writes the oldest records to an export file (synced) before it drops
//! them from the live file. Nothing here judges the chain; [`basalt_security::audit::verify`]
//! does, on what [`AuditLog::read`] returns — including lines that no longer parse.

use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use basalt_security::audit::AuditRecord;
use basalt_security::certs::write_atomically;

/// One line of the file as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Line {
    /// A record.
    Record(AuditRecord),
    /// A line that does not parse (edited by hand, or damaged): its number and why.
    Bad {
        /// 1-based line number.
        line: usize,
        /// The parser's complaint.
        why: String,
    },
}

/// A meta node's audit file and its export directory.
pub struct AuditLog {
    path: PathBuf,
    export_dir: PathBuf,
    /// Serialises writers (apply, prune, install and recovery never overlap in practice; this
    /// makes sure).
    lock: Mutex<()>,
}

impl AuditLog {
    /// The audit log in `dir` (created if missing), exporting pruned records to `export_dir`.
    pub fn open(dir: &Path, export_dir: &Path) -> io::Result<AuditLog> {
        std::fs::create_dir_all(dir)?;
        Ok(AuditLog { path: dir.join("audit.jsonl"), export_dir: export_dir.to_path_buf(), lock: Mutex::new(()) })
    }

    /// The live file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw_lines(&self) -> io::Result<Vec<String>> {
        match std::fs::File::open(&self.path) {
            Ok(f) => io::BufReader::new(f).lines().collect(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    /// Appends `records` (not synced: see [`AuditLog::sync`]).
    pub fn append(&self, records: &[AuditRecord]) -> io::Result<()> {
        let _g = self.guard();
        let mut text = String::new();
        for r in records {
            text.push_str(&r.to_json_line());
            text.push('\n');
        }
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        f.write_all(text.as_bytes())
    }

    /// Makes every appended record durable.
    pub fn sync(&self) -> io::Result<()> {
        let _g = self.guard();
        match std::fs::File::open(&self.path) {
            Ok(f) => f.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every line, parsed where it parses.
    pub fn read(&self) -> io::Result<Vec<Line>> {
        let _g = self.guard();
        Ok(self
            .raw_lines()?
            .into_iter()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| match AuditRecord::from_json_line(&l) {
                Ok(r) => Line::Record(r),
                Err(why) => Line::Bad { line: i + 1, why },
            })
            .collect())
    }

    /// The lines of the records before `next_seq`, as a snapshot carries them to a new member.
    pub fn bytes_before(&self, next_seq: u64) -> io::Result<Vec<u8>> {
        let _g = self.guard();
        let mut out = Vec::new();
        for l in self.raw_lines()? {
            if seq_of(&l).is_none_or(|s| s < next_seq) {
                out.extend_from_slice(l.as_bytes());
                out.push(b'\n');
            }
        }
        Ok(out)
    }

    /// Drops the records numbered `next_seq` and later (recovery: replaying the Raft log from the
    /// checkpoint appends them again), and a torn last line.
    pub fn truncate_from(&self, next_seq: u64) -> io::Result<()> {
        let _g = self.guard();
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let text = String::from_utf8_lossy(&bytes);
        let complete = text.ends_with('\n');
        let lines: Vec<&str> = text.lines().collect();
        let mut kept = String::with_capacity(text.len());
        for (i, l) in lines.iter().enumerate() {
            let torn = i + 1 == lines.len() && !complete;
            // Lines that do not parse stay (verification reports them), unless torn at the end.
            let keep = match seq_of(l) {
                Some(s) => s < next_seq && !torn,
                None => !torn,
            };
            if keep {
                kept.push_str(l);
                kept.push('\n');
            }
        }
        if kept.len() != bytes.len() {
            write_atomically(&self.path, kept.as_bytes(), false).map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Writes the records up to `through` to an export file (synced), then rewrites the live file
    /// without them.
    pub fn prune(&self, through: u64) -> io::Result<()> {
        let _g = self.guard();
        let lines = self.raw_lines()?;
        let (old, keep): (Vec<&String>, Vec<&String>) = lines.iter().partition(|l| seq_of(l).is_some_and(|s| s <= through));
        if old.is_empty() {
            return Ok(());
        }
        let first = seq_of(old[0]).unwrap_or(0);
        std::fs::create_dir_all(&self.export_dir)?;
        let export = self.export_dir.join(format!("audit-{first:012}-{through:012}.jsonl"));
        let mut text = String::new();
        for l in &old {
            text.push_str(l);
            text.push('\n');
        }
        // An export of the same range from an earlier, interrupted prune is simply replaced.
        write_atomically(&export, text.as_bytes(), false).map_err(io::Error::other)?;
        let mut rest = String::new();
        for l in keep {
            rest.push_str(l);
            rest.push('\n');
        }
        write_atomically(&self.path, rest.as_bytes(), false).map_err(io::Error::other)
    }

    /// Replaces the file with `bytes` (lines from a snapshot), synced.
    pub fn replace(&self, bytes: &[u8]) -> io::Result<()> {
        let _g = self.guard();
        write_atomically(&self.path, bytes, false).map_err(io::Error::other)
    }
}

/// Where to prune `records` (the kept chain, oldest first) to keep at most `max_records` and
/// none older than `oldest_allowed_ms`: the last record to drop and its hash (the kept chain's
/// new anchor). Over the count it drops a tenth more than needed, so pruning (which rewrites the
/// file on every meta node) happens once per tenth of the limit, not once per record; the
/// newest record always stays.
pub fn prune_point(records: &[AuditRecord], max_records: u64, oldest_allowed_ms: u64) -> Option<(u64, basalt_security::audit::ChainHash)> {
    let excess = (records.len() as u64).saturating_sub(max_records);
    let by_count = if excess > 0 { excess + max_records / 10 } else { 0 };
    let by_age = records.iter().take_while(|r| r.event.time_unix_ms < oldest_allowed_ms).count() as u64;
    let drop = by_count.max(by_age).min(records.len().saturating_sub(1) as u64);
    let last = records.get(usize::try_from(drop).ok()?.checked_sub(1)?)?;
    Some((last.seq, last.hash))
}

/// The sequence number of a record line, read without trusting the rest of it.
fn seq_of(line: &str) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: u64,
    }
    serde_json::from_str::<Seq>(line).ok().map(|s| s.seq)
}

#[cfg(test)]
mod tests {
    use super::*;
    use basalt_security::audit::{AuditEvent, Outcome};

    fn records(from: u64, n: u64) -> Vec<AuditRecord> {
        (from..from + n)
            .map(|seq| {
                let e = AuditEvent {
                    time_unix_ms: seq,
                    actor: "a".into(),
                    source: "s".into(),
                    action: "x".into(),
                    target: String::new(),
                    outcome: Outcome::Ok,
                    detail: String::new(),
                };
                AuditRecord::seal(seq, e, [0; 32])
            })
            .collect()
    }

    fn seqs(log: &AuditLog) -> Vec<u64> {
        log.read().unwrap().into_iter().filter_map(|l| if let Line::Record(r) = l { Some(r.seq) } else { None }).collect()
    }

    #[test]
    fn recovery_cuts_back_to_the_checkpoint_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path(), &dir.path().join("export")).unwrap();
        log.append(&records(1, 5)).unwrap();
        log.truncate_from(4).unwrap();
        assert_eq!(seqs(&log), vec![1, 2, 3]);
        // A torn line at the end (a crash mid-append) goes; an edited one in the middle stays.
        let mut text = std::fs::read_to_string(log.path()).unwrap();
        text = text.replacen("\"seq\":2", "\"seq\":\"two\"", 1);
        text.push_str("{\"v\":1,\"seq\":4,\"ti");
        std::fs::write(log.path(), text).unwrap();
        log.truncate_from(10).unwrap();
        let lines = log.read().unwrap();
        assert_eq!(lines.len(), 3);
        assert!(matches!(&lines[1], Line::Bad { line: 2, .. }), "{lines:?}");
        let lines_before = |seq| String::from_utf8(log.bytes_before(seq).unwrap()).unwrap().lines().count();
        assert_eq!(lines_before(4), 3, "unparseable lines travel too");
        assert_eq!(lines_before(3), 2);
    }

    #[test]
    fn retention_prunes_by_count_with_slack_and_by_age_and_keeps_the_newest() {
        let r = records(1, 20); // times 1..=20
        assert_eq!(prune_point(&r, 100, 0), None, "under both bounds");
        // 20 kept, at most 10: drop 10 plus a tenth of the limit (1).
        assert_eq!(prune_point(&r, 10, 0).map(|p| p.0), Some(11));
        assert_eq!(prune_point(&r, 10, 0).map(|p| p.1), Some(r[10].hash));
        // Older than time 6: records 1..=5.
        assert_eq!(prune_point(&r, 100, 6).map(|p| p.0), Some(5));
        // Everything too old: all but the newest.
        assert_eq!(prune_point(&r, 100, u64::MAX).map(|p| p.0), Some(19));
        assert_eq!(prune_point(&r[..1], 0, u64::MAX), None, "the last record always stays");
        assert_eq!(prune_point(&[], 0, u64::MAX), None);
    }

    #[test]
    fn pruning_exports_before_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("export");
        let log = AuditLog::open(dir.path(), &export).unwrap();
        log.append(&records(1, 6)).unwrap();
        log.prune(4).unwrap();
        assert_eq!(seqs(&log), vec![5, 6]);
        let exported = std::fs::read_to_string(export.join("audit-000000000001-000000000004.jsonl")).unwrap();
        assert_eq!(exported.lines().count(), 4);
        log.prune(4).unwrap();
        assert_eq!(seqs(&log), vec![5, 6], "pruning again changes nothing");
        log.replace(b"").unwrap();
        assert!(seqs(&log).is_empty());
    }
}
