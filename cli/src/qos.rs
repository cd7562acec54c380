//! `basalt volume set-qos` and the QoS flags of `volume create` and `cluster configure`: a
//! volume's IOPS and bandwidth limits with a burst allowance, enforced by the storage nodes
//! (docs/operations.md, "QoS").

use basalt_common::qos::{DEFAULT_BURST_MS, QosLimits, parse_bps, parse_iops};
use basalt_proto::admin::{Qos, VolumeSetQosRequest};
use basalt_proto::view::qos_to_proto;

use crate::admin::Admin;
use crate::commands::{Out, volume_json};
use crate::exit::CliError;

/// QoS limits as flags: an IOPS limit, a bandwidth limit, a burst allowance.
#[derive(clap::Args, Debug, Default)]
pub struct QosFlags {
    /// Operations a second (reads and writes together), or "unlimited".
    #[arg(long, value_name = "N|unlimited")]
    pub qos_iops: Option<String>,
    /// Bytes a second (e.g. 200MiB), or "unlimited".
    #[arg(long, value_name = "SIZE|unlimited")]
    pub qos_bps: Option<String>,
    /// How much unused allowance an idle volume saves up (e.g. 1s, 500ms; default 1s).
    #[arg(long, value_name = "DURATION")]
    pub qos_burst: Option<String>,
}

impl QosFlags {
    /// The limits, if any flag was given (the dimensions not given are unlimited).
    pub fn limits(&self) -> Result<Option<QosLimits>, CliError> {
        if self.qos_iops.is_none() && self.qos_bps.is_none() && self.qos_burst.is_none() {
            return Ok(None);
        }
        let iops = self.qos_iops.as_deref().map(parse_iops).transpose().map_err(CliError::usage)?.unwrap_or(0);
        let bps = self.qos_bps.as_deref().map(parse_bps).transpose().map_err(CliError::usage)?.unwrap_or(0);
        let burst_ms = self.qos_burst.as_deref().map(parse_burst).transpose()?.unwrap_or(DEFAULT_BURST_MS);
        let limits = QosLimits { iops, bps, burst_ms };
        limits.validate().map_err(CliError::usage)?;
        Ok(Some(limits))
    }

    /// The limits for the wire, if any flag was given.
    pub fn proto(&self) -> Result<Option<Qos>, CliError> {
        Ok(self.limits()?.map(|l| qos_to_proto(&l)))
    }
}

/// A burst allowance: `500ms`, or a duration in seconds and up (`2s`, `1m`).
fn parse_burst(input: &str) -> Result<u64, CliError> {
    let s = input.trim();
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.trim().parse().map_err(|_| CliError::usage(format!("invalid burst {input:?}; e.g. 500ms or 2s")));
    }
    let secs = basalt_common::units::parse_duration(s).map_err(CliError::usage)?;
    secs.checked_mul(1000).ok_or_else(|| CliError::usage(format!("burst {input:?} is too long")))
}

/// `basalt volume set-qos NAME (--qos-iops N --qos-bps B --qos-burst D | --default)`.
pub async fn set(admin: &Admin, out: Out, name: String, flags: QosFlags, default: bool) -> Result<(), CliError> {
    let qos = match (flags.proto()?, default) {
        (Some(_), true) => return Err(CliError::usage("give limits or --default, not both")),
        (None, false) => return Err(CliError::usage("give --qos-iops, --qos-bps and/or --qos-burst (or --default to follow the cluster's)")),
        (q, _) => q,
    };
    let r = admin
        .call(|mut c| {
            let req = VolumeSetQosRequest { name: name.clone(), qos };
            async move { c.volume_set_qos(req).await }
        })
        .await?;
    let v = r.volume.unwrap_or_default();
    out.print(volume_json(&v), || format!("volume {} is held to {} from now on, wherever it is attached", v.name, describe(&v)));
    Ok(())
}

/// A volume's limits for people, saying where they come from.
pub fn describe(v: &basalt_proto::admin::Volume) -> String {
    let limits = v.qos.as_ref().map(basalt_proto::view::qos_from_proto).unwrap_or_default();
    let whose = if v.qos_set { "" } else { " (the cluster's default)" };
    format!("{}{whose}", limits.describe())
}
