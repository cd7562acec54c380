//! Validation of user-chosen names (volumes, later snapshots and schedules).

use thiserror::Error;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 63;

/// Why a name was rejected.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    /// Empty name.
    #[error("name must not be empty")]
    Empty,
    /// Longer than [`MAX_NAME_LEN`].
    #[error("name {0:?} is longer than {MAX_NAME_LEN} characters")]
    TooLong(String),
    /// A character outside the allowed set, or a bad first character.
    #[error("name {0:?} is invalid: use letters, digits, '.', '_' and '-', starting with a letter or digit")]
    BadCharacter(String),
}

/// Names are 1–63 characters of `[A-Za-z0-9._-]`, starting with a letter or digit, so they are
/// safe in NBD export names, URLs, file names and log lines.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    let Some(first) = name.chars().next() else {
        return Err(NameError::Empty);
    };
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong(name.to_string()));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !first.is_ascii_alphanumeric() || !name.chars().all(allowed) {
        return Err(NameError::BadCharacter(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(validate_name("demo").is_ok());
        assert!(validate_name("vm-42_disk.0").is_ok());
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(validate_name("-x"), Err(NameError::BadCharacter(_))));
        assert!(matches!(validate_name("a b"), Err(NameError::BadCharacter(_))));
        assert!(matches!(validate_name("a/b"), Err(NameError::BadCharacter(_))));
        assert!(matches!(validate_name(&"a".repeat(64)), Err(NameError::TooLong(_))));
        assert!(validate_name(&"a".repeat(63)).is_ok());
    }
}
