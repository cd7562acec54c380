//! Per-volume quality of service: the limits a volume's I/O is held to (enforced by the storage
//! nodes, `basalt-node`'s `qos` module), as operators set them and as the meta state, the
//! cluster map and the CLI carry them.

use serde::{Deserialize, Serialize};

use crate::units::{format_size, parse_size};

/// Smallest IOPS limit: below it a client's ordinary queue would be held longer than a node
/// holds one request (a second, under the client's 3 s patience), and the limit would be
/// approximate.
pub const MIN_IOPS: u64 = 10;
/// Largest IOPS limit (anything above is effectively unlimited: say so instead).
pub const MAX_IOPS: u64 = 10_000_000;
/// Smallest bandwidth limit, for the same reason as [`MIN_IOPS`].
pub const MIN_BPS: u64 = 4 << 20;
/// Largest bandwidth limit.
pub const MAX_BPS: u64 = 1 << 40;
/// Longest burst allowance.
pub const MAX_BURST_MS: u64 = 60_000;
/// Burst allowance when none is given: one second's worth.
pub const DEFAULT_BURST_MS: u64 = 1_000;

/// A volume's limits. Zero means unlimited for that dimension; reads and writes count
/// together (every request is one operation and its bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosLimits {
    /// Operations a second (0: unlimited).
    pub iops: u64,
    /// Bytes a second (0: unlimited).
    pub bps: u64,
    /// How much unused allowance may be saved up, as milliseconds of the limits: a volume
    /// that was idle may run this much above them before it is held to them.
    pub burst_ms: u64,
}

impl QosLimits {
    /// No limit.
    pub const UNLIMITED: QosLimits = QosLimits { iops: 0, bps: 0, burst_ms: 0 };

    /// True if neither operations nor bytes are limited.
    pub fn is_unlimited(&self) -> bool {
        self.iops == 0 && self.bps == 0
    }

    /// Checks the limits are ones a volume can be held to; `Err` says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.iops != 0 && !(MIN_IOPS..=MAX_IOPS).contains(&self.iops) {
            return Err(format!("an IOPS limit of {} is outside {MIN_IOPS}..={MAX_IOPS} (or \"unlimited\")", self.iops));
        }
        if self.bps != 0 && !(MIN_BPS..=MAX_BPS).contains(&self.bps) {
            return Err(format!(
                "a bandwidth limit of {}/s is outside {}/s..={}/s (or \"unlimited\")",
                format_size(self.bps),
                format_size(MIN_BPS),
                format_size(MAX_BPS)
            ));
        }
        if self.burst_ms > MAX_BURST_MS {
            return Err(format!("a burst of {} ms is longer than the {} s allowed", self.burst_ms, MAX_BURST_MS / 1000));
        }
        Ok(())
    }

    /// For people: "500 IOPS, 100 MiB/s, burst 1 s" or "unlimited".
    pub fn describe(&self) -> String {
        if self.is_unlimited() {
            return "unlimited".into();
        }
        let mut parts = Vec::new();
        if self.iops != 0 {
            parts.push(format!("{} IOPS", self.iops));
        }
        if self.bps != 0 {
            parts.push(format!("{}/s", format_size(self.bps)));
        }
        parts.push(format!("burst {} ms", self.burst_ms));
        parts.join(", ")
    }
}

/// Parses an IOPS limit as typed: a whole number, or `unlimited` (0).
pub fn parse_iops(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let v: u64 = s.parse().map_err(|_| format!("invalid IOPS limit {input:?}; use a whole number or \"unlimited\""))?;
    if v == 0 {
        return Err("an IOPS limit of 0 would stop the volume; say \"unlimited\" for no limit".into());
    }
    Ok(v)
}

/// Parses a bandwidth limit as typed: a size a second (`100MiB`), or `unlimited` (0).
pub fn parse_bps(input: &str) -> Result<u64, String> {
    let s = input.trim();
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    let v = parse_size(s.trim_end_matches("/s")).map_err(|e| format!("invalid bandwidth limit {input:?}: {e}"))?;
    if v == 0 {
        return Err("a bandwidth limit of 0 would stop the volume; say \"unlimited\" for no limit".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_validate_and_describe() {
        assert_eq!(parse_iops("500"), Ok(500));
        assert_eq!(parse_iops("Unlimited"), Ok(0));
        assert!(parse_iops("0").unwrap_err().contains("unlimited"));
        assert!(parse_iops("-5").is_err());
        assert!(parse_iops("lots").is_err());
        assert_eq!(parse_bps("100MiB"), Ok(100 << 20));
        assert_eq!(parse_bps("100MiB/s"), Ok(100 << 20));
        assert_eq!(parse_bps("unlimited"), Ok(0));
        assert!(parse_bps("0").is_err());
        assert!(parse_bps("fast").is_err());

        let ok = QosLimits { iops: 500, bps: 0, burst_ms: DEFAULT_BURST_MS };
        assert_eq!(ok.validate(), Ok(()));
        assert_eq!(ok.describe(), "500 IOPS, burst 1000 ms");
        assert!(QosLimits::UNLIMITED.validate().is_ok() && QosLimits::UNLIMITED.is_unlimited());
        assert_eq!(QosLimits::UNLIMITED.describe(), "unlimited");
        for bad in [
            QosLimits { iops: 5, ..ok },
            QosLimits { iops: MAX_IOPS + 1, ..ok },
            QosLimits { bps: 1 << 20, ..ok },
            QosLimits { bps: MAX_BPS + 1, ..ok },
            QosLimits { burst_ms: MAX_BURST_MS + 1, ..ok },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
