//! `basalt backup create|list|show|verify|delete|restore`: copies of snapshots on the backup
//! tier (docs/architecture.md, "Backups"). Backup nodes do the copying; these commands ask the
//! meta leader and follow the job with a progress bar (percentages on stderr otherwise).

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use basalt_common::units::format_size;
use basalt_proto::admin::{
    Backup, BackupCreateRequest, BackupListRequest, BackupPinRequest, BackupRestoreRequest, BackupShowRequest, JobProgress, RestoreStatusRequest,
};
use basalt_volume_client::crypt::Kek;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table, when};
use crate::exit::CliError;

/// How often a running job is polled.
const POLL: Duration = Duration::from_millis(500);

fn progress_json(p: &JobProgress) -> Value {
    json!({"done": p.done, "total": p.total, "bytes": p.bytes, "percent": percent(p)})
}

fn percent(p: &JobProgress) -> u64 {
    (p.done * 100).checked_div(p.total).unwrap_or(0).min(100)
}

pub(crate) fn backup_json(b: &Backup) -> Value {
    json!({
        "id": b.id, "volume": b.volume, "volume_id": b.volume_id, "snapshot": b.snapshot, "epoch": b.epoch, "size": b.size,
        "state": b.state, "error": b.error, "nodes": b.nodes, "created_unix_ms": b.created_unix_ms,
        "finished_unix_ms": b.finished_unix_ms, "volume_deleted": b.volume_deleted, "auto_snapshot": b.auto_snapshot,
        "schedule": b.schedule, "pinned": b.pinned, "volume_deleted_unix_ms": b.volume_deleted_unix_ms, "encrypted": b.encrypted,
        "copies": b.copies.iter().map(|c| json!({
            "node": c.node, "data_bytes": c.data_bytes, "changed_bytes": c.changed_bytes, "stored_bytes": c.stored_bytes,
            "incremental_to": c.parent, "duration_ms": c.duration_ms,
        })).collect::<Vec<_>>(),
        "progress": b.progress.as_ref().map(progress_json),
    })
}

/// Figures of a backup for people: the first copy's (they differ only in what each node held).
fn figures(b: &Backup) -> String {
    let Some(c) = b.copies.first() else { return String::new() };
    let base = if c.parent == 0 { "full".to_string() } else { format!("incremental to {}", c.parent) };
    format!(
        "{} of data, {} changed and read, {} stored; {base}; {:.1} s",
        format_size(c.data_bytes),
        format_size(c.changed_bytes),
        format_size(c.stored_bytes),
        c.duration_ms as f64 / 1000.0
    )
}

/// A progress bar on a terminal, percentages on stderr otherwise (JSON lines with `--json`).
struct Follow {
    bar: Option<indicatif::ProgressBar>,
    json: bool,
    what: String,
    /// What `done` and `total` count.
    unit: &'static str,
    last_pct: u64,
}

impl Follow {
    fn new(out: Out, what: String) -> Follow {
        let bar = (std::io::stderr().is_terminal() && !out.json).then(|| {
            let b = indicatif::ProgressBar::new(100);
            b.set_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}% ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b.set_message(what.clone());
            b
        });
        Follow { bar, json: out.json, what, unit: "chunks", last_pct: u64::MAX }
    }

    fn counting(self, unit: &'static str) -> Follow {
        Follow { unit, ..self }
    }

    fn show(&mut self, p: &JobProgress) {
        if p.total == 0 {
            // Not counted yet.
            return;
        }
        let pct = percent(p);
        if let Some(b) = &self.bar {
            b.set_position(pct);
            return;
        }
        if std::mem::replace(&mut self.last_pct, pct) == pct {
            return;
        }
        if self.json {
            eprintln!("{}", json!({"job": self.what, "progress_percent": pct, "done": p.done, "total": p.total, "bytes": p.bytes}));
        } else {
            eprintln!("{}: {pct}% ({} of {} {}, {})", self.what, p.done, p.total, self.unit, format_size(p.bytes));
        }
    }

    fn end(self, finished: bool) {
        if let Some(b) = self.bar {
            if finished {
                b.set_position(100);
                b.finish();
            } else {
                b.abandon();
            }
        }
    }
}

/// `basalt backup create VOLUME [--snapshot NAME]`.
pub async fn create(admin: &Admin, out: Out, volume: String, snapshot: Option<String>, no_wait: bool) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let req = BackupCreateRequest { volume: volume.clone(), snapshot: snapshot.clone().unwrap_or_default() };
            async move { c.backup_create(req).await }
        })
        .await?;
    let mut b = r.backup.ok_or_else(|| CliError::other("the cluster answered without the backup"))?;
    if !no_wait {
        let mut follow = Follow::new(out, format!("backup {} of {}@{}", b.id, b.volume, b.snapshot));
        while b.state == "running" {
            if let Some(p) = &b.progress {
                follow.show(p);
            }
            tokio::time::sleep(POLL).await;
            let id = b.id;
            b = admin.call(|mut c| async move { c.backup_show(BackupShowRequest { id }).await }).await?.backup.unwrap_or_default();
        }
        follow.end(b.state == "complete");
    }
    if b.state == "failed" {
        return Err(CliError { code: 1, message: format!("backup {} of {}@{} failed: {}", b.id, b.volume, b.snapshot, b.error) });
    }
    out.print(backup_json(&b), || match b.state.as_str() {
        "complete" => format!("backup {} of {}@{} complete on node(s) {:?}: {}", b.id, b.volume, b.snapshot, b.nodes, figures(&b)),
        _ => format!("backup {} of {}@{} started on node(s) {:?}; follow it with `basalt backup show {}`", b.id, b.volume, b.snapshot, b.nodes, b.id),
    });
    Ok(())
}

/// `basalt backup list [VOLUME] [--running]`.
pub async fn list(admin: &Admin, out: Out, volume: Option<String>, running: bool) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let req = BackupListRequest { volume: volume.clone().unwrap_or_default(), running_only: running };
            async move { c.backup_list(req).await }
        })
        .await?;
    let restores: Vec<Value> = r
        .restores
        .iter()
        .filter_map(|x| {
            let v = x.volume.as_ref()?;
            let error = x.progress.as_ref().map(|p| p.error.clone()).unwrap_or_default();
            Some(json!({"restore_into": v.name, "backup": x.backup, "node": x.node, "error": error, "progress": x.progress.as_ref().map(progress_json)}))
        })
        .collect();
    let mut listed: Vec<Value> = r.backups.iter().map(backup_json).collect();
    if running {
        // Restores under way are long operations too.
        listed.extend(restores.iter().cloned());
    }
    out.print(Value::Array(listed), || {
        let mut t = table(&["id", "volume", "snapshot", "state", "created", "data", "stored", "nodes"]);
        for b in &r.backups {
            let state = match (&b.progress, b.state.as_str()) {
                (Some(p), "running") => format!("running {}%", percent(p)),
                (_, s) => s.to_string(),
            };
            let volume = if b.volume_deleted { format!("{} (deleted)", b.volume) } else { b.volume.clone() };
            let (data, stored) = b.copies.first().map_or(("-".into(), "-".into()), |c| (format_size(c.data_bytes), format_size(c.stored_bytes)));
            t.add_row(vec![
                b.id.to_string(),
                volume,
                b.snapshot.clone(),
                state,
                when(b.created_unix_ms, "-"),
                data,
                stored,
                format!("{:?}", b.nodes),
            ]);
        }
        let mut text = t.to_string();
        if running {
            for x in &restores {
                let stopped = x["error"].as_str().filter(|e| !e.is_empty()).map(|e| format!(" (stopped: {e})")).unwrap_or_default();
                let pct = x["progress"]["percent"].as_u64().map(|p| format!(", {p}%")).unwrap_or_default();
                text.push_str(&format!(
                    "\nrestoring backup {} into {} on node-{}{pct}{stopped}",
                    x["backup"],
                    x["restore_into"].as_str().unwrap_or(""),
                    x["node"]
                ));
            }
        }
        text
    });
    Ok(())
}

/// `basalt backup show ID`.
pub async fn show(admin: &Admin, out: Out, id: u64) -> Result<(), CliError> {
    let b = admin.call(|mut c| async move { c.backup_show(BackupShowRequest { id }).await }).await?.backup.unwrap_or_default();
    out.print(backup_json(&b), || {
        let mut lines = vec![
            format!("backup {} of {}@{} (epoch {}){}", b.id, b.volume, b.snapshot, b.epoch, if b.volume_deleted { ", volume deleted" } else { "" }),
            format!("  state:    {}{}", b.state, if b.error.is_empty() { String::new() } else { format!(": {}", b.error) }),
            format!(
                "  size:     {}{}",
                format_size(b.size),
                if b.encrypted { " (encrypted: stored as ciphertext; restore with --kek-file)" } else { "" }
            ),
            format!("  created:  {}; finished {}", when(b.created_unix_ms, "-"), when(b.finished_unix_ms, "-")),
            format!("  kept on:  node(s) {:?}", b.nodes),
        ];
        if let Some(p) = &b.progress {
            lines.push(format!("  progress: {}% ({} of {} chunks, {} read)", percent(p), p.done, p.total, format_size(p.bytes)));
        }
        for c in &b.copies {
            let base = if c.parent == 0 { "full".to_string() } else { format!("incremental to backup {}", c.parent) };
            lines.push(format!(
                "  node-{}: {} of data, {} changed and read, {} stored ({base}), in {:.1} s",
                c.node,
                format_size(c.data_bytes),
                format_size(c.changed_bytes),
                format_size(c.stored_bytes),
                c.duration_ms as f64 / 1000.0
            ));
        }
        lines.join("\n")
    });
    Ok(())
}

/// `basalt backup verify ID`: exit 10 if a piece is damaged. Shows the read-back's progress
/// while it runs.
pub async fn verify(admin: &Admin, out: Out, id: u64) -> Result<(), CliError> {
    let mut follow = Follow::new(out, format!("verifying backup {id}")).counting("pieces");
    let verify = admin.call(|mut c| async move { c.backup_verify(BackupShowRequest { id }).await });
    tokio::pin!(verify);
    let r = loop {
        tokio::select! {
            r = &mut verify => break r,
            _ = tokio::time::sleep(POLL) => {
                // Progress is shown when it can be had; the verification's answer is what counts.
                if let Ok(p) = admin.call(|mut c| async move { c.backup_verify_progress(BackupShowRequest { id }).await }).await {
                    follow.show(&p);
                }
            }
        }
    };
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            follow.end(false);
            return Err(e);
        }
    };
    follow.end(r.copies.iter().all(|c| c.bad.is_empty()));
    let bad: Vec<String> = r.nodes.iter().zip(&r.copies).flat_map(|(n, c)| c.bad.iter().map(move |b| format!("node-{n}: {b}"))).collect();
    let value = json!({
        "id": id,
        "ok": bad.is_empty(),
        "copies": r.nodes.iter().zip(&r.copies).map(|(n, c)| json!({"node": n, "pieces": c.pieces, "bytes": c.bytes, "bad": c.bad})).collect::<Vec<_>>(),
    });
    if !bad.is_empty() {
        if out.json {
            out.print(value, String::new);
        }
        return Err(CliError { code: 10, message: format!("backup {id} has damaged pieces:\n{}", bad.join("\n")) });
    }
    out.print(value, || {
        let pieces: u64 = r.copies.iter().map(|c| c.pieces).sum();
        let bytes: u64 = r.copies.iter().map(|c| c.bytes).sum();
        format!("backup {id}: {pieces} piece(s), {} read back and checked on {} node(s); all intact", format_size(bytes), r.nodes.len())
    });
    Ok(())
}

/// `basalt backup delete ID`.
pub async fn delete(admin: &Admin, out: Out, id: u64) -> Result<(), CliError> {
    let b = admin.call(|mut c| async move { c.backup_delete(BackupShowRequest { id }).await }).await?.backup.unwrap_or_default();
    out.print(backup_json(&b), || format!("backup {id} deleted; its nodes overwrite the pieces no other backup holds"));
    Ok(())
}

/// `basalt backup pin ID [--unpin]`.
pub async fn pin(admin: &Admin, out: Out, id: u64, unpin: bool) -> Result<(), CliError> {
    let b = admin.call(|mut c| async move { c.backup_pin(BackupPinRequest { id, pinned: !unpin }).await }).await?.backup.unwrap_or_default();
    out.print(backup_json(&b), || {
        if unpin {
            format!("backup {id} unpinned: it expires with its volume's retention again")
        } else {
            format!("backup {id} pinned: kept after its volume's deletion until unpinned")
        }
    });
    Ok(())
}

/// `basalt backup restore ID --to NAME [--kek-file FILE]`: resumes a restore into NAME of the
/// same backup. A backup of an encrypted volume is restored into an encrypted volume: the KEK
/// that opened the volume opens the backup's keys here, and the new volume gets them (and a
/// fresh key of its own) wrapped under the same KEK; the blocks travel sealed, as stored.
pub async fn restore(admin: &Admin, out: Out, id: u64, to: String, kek_file: Option<&Path>, no_wait: bool) -> Result<(), CliError> {
    let keys = match kek_file {
        Some(path) => {
            let kek = Kek::from_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            let b = admin.call(|mut c| async move { c.backup_show(BackupShowRequest { id }).await }).await?.backup.unwrap_or_default();
            if !b.encrypted {
                return Err(CliError::invalid(format!(
                    "backup {id} is of volume {}, which is not encrypted: restore it without --kek-file",
                    b.volume
                )));
            }
            crate::rekey::keys_for_restore(admin, id, &b.volume, &to, &kek).await?
        }
        None => Vec::new(),
    };
    let mut r = admin
        .call(|mut c| {
            let req = BackupRestoreRequest { id, to: to.clone(), keys: keys.clone() };
            async move { c.backup_restore(req).await }
        })
        .await?;
    if !no_wait {
        let mut follow = Follow::new(out, format!("restoring backup {id} to {to}"));
        while r.restoring {
            if let Some(p) = &r.progress {
                if !p.error.is_empty() {
                    follow.end(false);
                    return Err(CliError::other(format!(
                        "restore of backup {id} into {to} stopped: {}; run the same command again to resume it",
                        p.error
                    )));
                }
                follow.show(p);
            }
            tokio::time::sleep(POLL).await;
            r = admin
                .call(|mut c| {
                    let req = RestoreStatusRequest { volume: to.clone() };
                    async move { c.restore_status(req).await }
                })
                .await?;
        }
        follow.end(true);
    }
    let v = r.volume.unwrap_or_default();
    let value = json!({"backup": id, "volume": v.name, "size": v.size, "restoring": r.restoring, "progress": r.progress.as_ref().map(progress_json)});
    out.print(value, || {
        if r.restoring {
            format!("restoring backup {id} into {} ({}); follow it with `basalt backup restore {id} --to {}`", v.name, format_size(v.size), v.name)
        } else {
            format!("backup {id} restored into volume {} ({})", v.name, format_size(v.size))
        }
    });
    Ok(())
}
