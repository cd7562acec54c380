//! `basalt snapshot create|list|delete`: read-only, stable images of a volume, taken in one
//! meta round whatever the volume's size (docs/architecture.md, "Snapshots, clones and
//! backups"). A snapshot of an attached volume is cut by its read-write holder, so it is
//! crash-consistent; serve one with `basalt attach VOLUME@SNAPSHOT --read-only`.

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use basalt_common::units::format_size;
use basalt_proto::admin::{
    Snapshot, SnapshotCreateRequest, SnapshotDeleteRequest, SnapshotListRequest, Volume, VolumeCloneRequest, VolumeRollbackRequest, VolumeShowRequest,
};
use basalt_volume_client::crypt::Kek;
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table, when};
use crate::exit::CliError;

fn snapshot_json(v: &Volume, s: &Snapshot) -> Value {
    json!({
        "volume": v.name, "name": s.name, "epoch": s.epoch, "created_unix_ms": s.created_unix_ms,
        "exclusive_bytes": s.exclusive_bytes, "usage_partial": v.usage_partial,
    })
}

/// Splits `VOLUME@SNAPSHOT`.
pub fn parse_ref(s: &str) -> Result<(&str, &str), CliError> {
    match s.split_once('@') {
        Some((v, n)) if !v.is_empty() && !n.is_empty() => Ok((v, n)),
        _ => Err(CliError::usage(format!("{s:?} is not VOLUME@SNAPSHOT"))),
    }
}

/// `basalt snapshot create VOLUME NAME`.
pub async fn create(admin: &Admin, out: Out, volume: String, name: String) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    let r = admin
        .call(|mut c| {
            let req = SnapshotCreateRequest { volume: volume.clone(), name: name.clone() };
            async move { c.snapshot_create(req).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    let s = r.snapshot.ok_or_else(|| CliError::other("the cluster answered without the snapshot"))?;
    let took = started.elapsed();
    let mut value = snapshot_json(&v, &s);
    value["took_ms"] = json!(took.as_millis() as u64);
    out.print(value, || {
        let how = if v.attached_by.is_empty() { "" } else { ", cut by its read-write holder" };
        format!("snapshot {}@{} taken (epoch {}{how}) in {} ms", v.name, s.name, s.epoch, took.as_millis())
    });
    Ok(())
}

/// `basalt volume clone VOLUME@SNAPSHOT NAME [--kek-file FILE]`.
pub async fn clone(admin: &Admin, out: Out, source: String, name: String, kek_file: Option<&Path>) -> Result<(), CliError> {
    let (volume, snapshot) = parse_ref(&source)?;
    let started = std::time::Instant::now();
    let keys = match kek_file {
        Some(path) => {
            let kek = Kek::from_file(path).map_err(|e| CliError::invalid(e.to_string()))?;
            crate::rekey::keys_for_clone(admin, volume, &name, &kek).await?
        }
        None => Vec::new(),
    };
    let r = admin
        .call(|mut c| {
            let req = VolumeCloneRequest { source: volume.to_string(), snapshot: snapshot.to_string(), name: name.clone(), keys: keys.clone() };
            async move { c.volume_clone(req).await }
        })
        .await?;
    let v = r.volume.ok_or_else(|| CliError::other("the cluster answered without the volume"))?;
    let took = started.elapsed();
    let mut value = crate::commands::volume_json(&v);
    value["took_ms"] = json!(took.as_millis() as u64);
    out.print(value, || format!("volume {} created as a clone of {source} ({}) in {} ms", v.name, format_size(v.size), took.as_millis()));
    Ok(())
}

/// `basalt snapshot list [VOLUME]`.
pub async fn list(admin: &Admin, out: Out, volume: Option<String>) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let req = SnapshotListRequest { volume: volume.clone().unwrap_or_default() };
            async move { c.snapshot_list(req).await }
        })
        .await?;
    let rows: Vec<(&Volume, &Snapshot)> = r.volumes.iter().flat_map(|v| v.snapshots.iter().map(move |s| (v, s))).collect();
    out.print(Value::Array(rows.iter().map(|(v, s)| snapshot_json(v, s)).collect()), || {
        let mut t = table(&["volume", "snapshot", "epoch", "created", "held only by it"]);
        for (v, s) in &rows {
            let partial = if v.usage_partial { " (partial: a node did not answer)" } else { "" };
            t.add_row(vec![
                v.name.clone(),
                s.name.clone(),
                s.epoch.to_string(),
                when(s.created_unix_ms, "-"),
                format!("{}{partial}", format_size(s.exclusive_bytes)),
            ]);
        }
        let mut text = t.to_string();
        for v in r.volumes.iter().filter(|v| !v.snapshots.is_empty()) {
            text.push_str(&format!(
                "\n{}: {} for the volume as it is, {} more kept by its {} snapshot(s) (one replica's bytes)",
                v.name,
                format_size(v.head_bytes),
                format_size(v.snapshot_bytes),
                v.snapshots.len()
            ));
        }
        text
    });
    Ok(())
}

/// `basalt snapshot delete VOLUME NAME`.
pub async fn delete(admin: &Admin, out: Out, volume: String, name: String) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let req = SnapshotDeleteRequest { volume: volume.clone(), name: name.clone() };
            async move { c.snapshot_delete(req).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    let s = r.snapshot.unwrap_or_default();
    out.print(snapshot_json(&v, &s), || {
        format!("snapshot {}@{} deleted; the blocks only it held are released and overwritten in the background", v.name, s.name)
    });
    Ok(())
}

/// `basalt volume rollback VOLUME SNAPSHOT`: returns a detached volume to a snapshot, then
/// follows the placement groups applying it with a progress bar (or percentages).
pub async fn rollback(admin: &Admin, out: Out, volume: String, snapshot: String, no_wait: bool) -> Result<(), CliError> {
    let r = admin
        .call(|mut c| {
            let req = VolumeRollbackRequest { volume: volume.clone(), snapshot: snapshot.clone() };
            async move { c.volume_rollback(req).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    let total = u64::from(v.pgs_total.max(1));
    let value = json!({ "volume": volume, "snapshot": snapshot });
    if no_wait {
        out.print(value, || format!("rolling {volume} back to {snapshot} in the background; it can be attached once that is done"));
        return Ok(());
    }
    let tty = std::io::stderr().is_terminal() && !out.json;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template("rolling {msg} back [{bar:30}] {pos}/{len} placement groups")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b.set_message(format!("{volume} to {snapshot}"));
        b
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut last_pct = u64::MAX;
    loop {
        let shown = admin
            .call(|mut c| {
                let name = volume.clone();
                async move { c.volume_show(VolumeShowRequest { name, usage: false }).await }
            })
            .await?
            .volume
            .unwrap_or_default();
        let left = if shown.rolling_back_to.is_empty() { 0 } else { u64::from(shown.rollback_pgs_left) };
        let done = total.saturating_sub(left);
        let pct = done * 100 / total;
        match &bar {
            Some(b) => b.set_position(done),
            None if pct != last_pct => {
                if out.json {
                    eprintln!("{}", json!({"volume": volume, "progress_percent": pct}));
                } else {
                    eprintln!("rolling {volume} back to {snapshot}: {pct}%");
                }
                last_pct = pct;
            }
            None => {}
        }
        if left == 0 {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(CliError::other(format!(
                "rolling {volume} back to {snapshot} is still in progress after 10 minutes ({left} placement groups left); run this command again to follow it"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    out.print(value, || format!("rolled {volume} back to snapshot {snapshot}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_references_need_both_halves() {
        assert_eq!(parse_ref("vol@snap").unwrap(), ("vol", "snap"));
        for bad in ["vol", "@snap", "vol@", "@"] {
            assert!(parse_ref(bad).is_err(), "{bad}");
        }
    }
}
