//! Sizes with units (`10GiB`, `512MiB`, `4096`), as operators type them.

use thiserror::Error;

/// Why a size string was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    /// Empty input.
    #[error("empty size; give a number with an optional unit, e.g. 10GiB")]
    Empty,
    /// Not a number followed by a known unit.
    #[error(
        "invalid size {0:?}; use a whole number with an optional unit: B, KiB, MiB, GiB, TiB, PiB (or K/M/G/T/P, also KB/MB/GB/TB/PB meaning powers of 1000)"
    )]
    Invalid(String),
    /// The value does not fit in 64 bits.
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses `N[unit]`. Binary units (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`, and the short `K`,
/// `M`, `G`, `T`, `P`) are powers of 1024; `KB`, `MB`, `GB`, `TB`, `PB` are powers of 1000.
/// Case-insensitive; whitespace between number and unit is allowed.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::Invalid(input.to_string()));
    }
    let value: u64 = digits.parse().map_err(|_| SizeError::Overflow(input.to_string()))?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return Err(SizeError::Invalid(input.to_string())),
    };
    value.checked_mul(multiplier).ok_or_else(|| SizeError::Overflow(input.to_string()))
}

/// Formats a byte count with the largest binary unit that keeps it exact to two decimals,
/// e.g. `4 GiB`, `1.5 MiB`, `512 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if value.fract() == 0.0 {
        format!("{} {}", value as u64, UNITS[unit])
    } else {
        format!("{:.2} {}", value, UNITS[unit])
    }
}

/// Parses a duration as operators type it: `N` seconds or `N` with a unit `s`, `m`
/// (minutes), `h`, `d` or `w` (`30d`, `12h`). Returns whole seconds.
pub fn parse_duration(input: &str) -> Result<u64, String> {
    let s = input.trim();
    let bad = || format!("invalid duration {input:?}; use a whole number with an optional unit s, m, h, d or w (e.g. 30d)");
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(split);
    if digits.is_empty() || digits.len() > 12 {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    let multiplier = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(bad()),
    };
    value.checked_mul(multiplier).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration(" 90 "), Ok(90));
        assert_eq!(parse_duration("2w"), Ok(14 * 86_400));
        assert_eq!(parse_duration("5m"), Ok(300));
        for bad in ["", "d", "-1d", "1.5h", "3y", "99999999999999d", "1dd"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("10 gib"), Ok(10 << 30));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("1TB"), Ok(1_000_000_000_000));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("GiB"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("10 parsecs"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("-5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("1.5G"), Err(SizeError::Invalid(_))));
        assert!(matches!(parse_size("99999999999999999999"), Err(SizeError::Overflow(_))));
        assert!(matches!(parse_size("100000PiB"), Err(SizeError::Overflow(_))));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(4 << 30), "4 GiB");
        assert_eq!(format_size(3 << 19), "1.50 MiB");
    }
}
