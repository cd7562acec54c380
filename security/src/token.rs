//! Bearer tokens. A token is `bst1_<id>_<secret>`: `bst1` names the format (version 1), the id
//! (8 random bytes, hex) is public — it names the token in listings and the audit log — and the
//! secret is 32 random bytes (256 bits, hex). The cluster stores only a SHA-256 of id and secret;
//! the token itself is shown once, when it is created.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::SecurityError;

/// The format prefix.
pub const PREFIX: &str = "bst1_";

/// A token's public id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TokenId(pub [u8; 8]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl std::str::FromStr for TokenId {
    type Err = SecurityError;
    fn from_str(s: &str) -> Result<TokenId, SecurityError> {
        let bytes = unhex(s).filter(|b| b.len() == 8).ok_or_else(|| SecurityError::Invalid(format!("{s:?} is not a token id (16 hex digits)")))?;
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes);
        Ok(TokenId(id))
    }
}

/// SHA-256 of a token, as stored.
pub type TokenHash = [u8; 32];

/// A bearer token. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    id: TokenId,
    secret: [u8; 32],
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, secret hidden)", self.id)
    }
}

impl Token {
    /// A new random token.
    pub fn generate() -> Token {
        Token { id: TokenId(rand::random()), secret: rand::random() }
    }

    /// Parses a token as written by [`Token::expose`] (surrounding whitespace ignored). The
    /// error never repeats the input: it may be a mistyped secret.
    pub fn parse(text: &str) -> Result<Token, SecurityError> {
        let bad = |why: &str| SecurityError::Invalid(format!("not a Basalt token: {why}"));
        let text = text.trim();
        let rest = text.strip_prefix(PREFIX).ok_or_else(|| {
            if text.starts_with("bst") {
                bad("unknown token format version (this build reads bst1_ tokens)")
            } else {
                bad("it does not start with bst1_")
            }
        })?;
        let (id, secret) = rest.split_once('_').ok_or_else(|| bad("no '_' between id and secret"))?;
        let id: TokenId = id.parse().map_err(|_| bad("the id is not 16 hex digits"))?;
        let secret = unhex(secret).filter(|s| s.len() == 32).ok_or_else(|| bad("the secret is not 64 hex digits"))?;
        let mut s = [0u8; 32];
        s.copy_from_slice(&secret);
        Ok(Token { id, secret: s })
    }

    /// The public id.
    pub fn id(&self) -> TokenId {
        self.id
    }

    /// The token's text, to show once or write to a file.
    pub fn expose(&self) -> String {
        format!("{PREFIX}{}_{}", self.id, hex(&self.secret))
    }

    /// What the cluster stores.
    pub fn hash(&self) -> TokenHash {
        let mut h = Sha256::new();
        h.update(b"basalt-token-v1\0");
        h.update(self.id.0);
        h.update(self.secret);
        h.finalize().into()
    }

    /// Whether this token is the one `stored` is the hash of (constant time).
    pub fn matches(&self, stored: &TokenHash) -> bool {
        let mine = self.hash();
        mine.iter().zip(stored.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Hex (either case) to bytes; `None` if it is not an even number of hex digits.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes().chunks(2).map(|p| Some(digit(p[0])? << 4 | digit(p[1])?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_malformed_ones_are_refused_without_echo() {
        let t = Token::generate();
        let text = t.expose();
        assert_eq!(text.len(), PREFIX.len() + 16 + 1 + 64);
        assert_eq!(Token::parse(&format!("  {text}\n")).unwrap(), t);
        assert!(t.matches(&t.hash()));
        assert!(!Token::generate().matches(&t.hash()));
        assert!(!format!("{t:?}").contains(&text[PREFIX.len() + 17..]), "Debug hides the secret");
        let cases = [
            String::new(),
            "bst2_0011223344556677_".to_string() + &"a".repeat(64),
            text.replace('_', "-"),
            text[..text.len() - 1].to_string(),
            text.clone() + "0",
            text.replacen(&text[5..7], "zz", 1),
            "bst1_".to_string() + "é".repeat(8).as_str() + "_" + &"a".repeat(64),
        ];
        for bad in cases {
            let e = Token::parse(&bad).unwrap_err().to_string();
            assert!(e.starts_with("not a Basalt token"), "{bad:?}: {e}");
            assert!(bad.len() < 20 || !e.contains(&bad), "the error never echoes the token: {e}");
        }
    }

    #[test]
    fn hex_round_trips() {
        assert_eq!(unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(), vec![0, 1, 0xab, 0xff]);
        assert_eq!(unhex("ABcd"), Some(vec![0xab, 0xcd]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
