//! `basalt schedule create|list|delete`: backups the meta leader takes on its own, every
//! interval, pruned by count and age (docs/operations.md, "Backups").

use basalt_common::units::parse_duration;
use basalt_proto::admin::{Schedule, ScheduleCreateRequest, ScheduleDeleteRequest, ScheduleListRequest};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table, when};
use crate::exit::CliError;

fn schedule_json(s: &Schedule) -> Value {
    json!({
        "name": s.name, "volumes": s.volumes, "all": s.all, "every_secs": s.every_secs, "at": s.at, "keep": s.keep,
        "max_age_secs": s.max_age_secs, "created_unix_ms": s.created_unix_ms, "last_run_unix_ms": s.last_run_unix_ms,
        "next_run_unix_ms": s.next_run_unix_ms, "backups": s.backups,
    })
}

/// What `schedule create` asks for.
pub struct NewSchedule {
    /// Name.
    pub name: String,
    /// Volumes (empty with `all`).
    pub volumes: Vec<String>,
    /// Every volume.
    pub all: bool,
    /// The interval, as typed.
    pub every: String,
    /// `HH:MM` UTC.
    pub at: Option<String>,
    /// Backups kept per volume.
    pub keep: u32,
    /// Oldest backup kept, as typed.
    pub max_age: String,
}

/// `basalt schedule create NAME (--volume V... | --all) --every D [--at HH:MM] --keep N --max-age D`.
pub async fn create(admin: &Admin, out: Out, new: NewSchedule) -> Result<(), CliError> {
    if new.all != new.volumes.is_empty() {
        return Err(CliError::usage("name the volumes (--volume V, repeatable) or --all"));
    }
    let every_secs = parse_duration(&new.every).map_err(|e| CliError::invalid(format!("--every: {e}")))?;
    let max_age_secs = parse_duration(&new.max_age).map_err(|e| CliError::invalid(format!("--max-age: {e}")))?;
    let schedule = Schedule {
        name: new.name,
        volumes: new.volumes,
        all: new.all,
        every_secs,
        at: new.at.unwrap_or_default(),
        keep: new.keep,
        max_age_secs,
        ..Default::default()
    };
    let r = admin
        .call(|mut c| {
            let req = ScheduleCreateRequest { schedule: Some(schedule.clone()) };
            async move { c.schedule_create(req).await }
        })
        .await?;
    let s = r.schedule.unwrap_or_default();
    out.print(schedule_json(&s), || format!("schedule {} created; its first run is due {}", s.name, when(s.next_run_unix_ms, "-")));
    Ok(())
}

/// `basalt schedule list`.
pub async fn list(admin: &Admin, out: Out) -> Result<(), CliError> {
    let r = admin.call(|mut c| async move { c.schedule_list(ScheduleListRequest {}).await }).await?;
    out.print(Value::Array(r.schedules.iter().map(schedule_json).collect()), || {
        let mut t = table(&["name", "volumes", "every", "at", "keep", "max age", "last run", "next run", "backups"]);
        for s in &r.schedules {
            let volumes = if s.all { "all".to_string() } else { s.volumes.join(",") };
            let at = if s.at.is_empty() { "-".to_string() } else { s.at.clone() };
            t.add_row(vec![
                s.name.clone(),
                volumes,
                format!("{} s", s.every_secs),
                at,
                s.keep.to_string(),
                format!("{} s", s.max_age_secs),
                when(s.last_run_unix_ms, "-"),
                when(s.next_run_unix_ms, "-"),
                s.backups.to_string(),
            ]);
        }
        t.to_string()
    });
    Ok(())
}

/// `basalt schedule delete NAME`.
pub async fn delete(admin: &Admin, out: Out, name: String) -> Result<(), CliError> {
    admin
        .call(|mut c| {
            let req = ScheduleDeleteRequest { name: name.clone() };
            async move { c.schedule_delete(req).await }
        })
        .await?;
    out.print(json!({"name": name, "deleted": true}), || format!("schedule {name} deleted; the backups it took stay until deleted"));
    Ok(())
}
