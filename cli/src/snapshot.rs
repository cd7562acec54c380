//! `basalt snapshot create|list|delete`: read-only, stable images of a volume, taken in one
//! meta round whatever the volume's size (docs/architecture.md, "Snapshots, clones and
//! backups"). A snapshot of an attached volume is cut by its read-write holder, so it is
//! crash-consistent; serve one with `basalt attach VOLUME@SNAPSHOT --read-only`.

use basalt_proto::admin::{Snapshot, SnapshotCreateRequest, SnapshotDeleteRequest, SnapshotListRequest, Volume};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table};
use crate::exit::CliError;

fn snapshot_json(v: &Volume, s: &Snapshot) -> Value {
    json!({ "volume": v.name, "name": s.name, "epoch": s.epoch, "created_unix_ms": s.created_unix_ms })
}

fn created(s: &Snapshot) -> String {
    basalt_security::identity::format_unix((s.created_unix_ms / 1000) as i64)
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
        let mut t = table(&["volume", "snapshot", "epoch", "created"]);
        for (v, s) in &rows {
            t.add_row(vec![v.name.clone(), s.name.clone(), s.epoch.to_string(), created(s)]);
        }
        t.to_string()
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
