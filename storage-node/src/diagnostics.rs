//! What `basalt support-bundle` collects from a node: the end of its log (kept in memory as
//! it is written to stderr, so it is there whatever collects stderr: journald, a file, a
//! terminal), its configuration with anything secret-looking redacted, and its metrics.

use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Bytes of log lines a node keeps for support bundles.
pub const LOG_RING_BYTES: usize = 4 << 20;

struct Ring {
    lines: VecDeque<String>,
    bytes: usize,
}

fn ring() -> &'static Mutex<Ring> {
    static RING: OnceLock<Mutex<Ring>> = OnceLock::new();
    RING.get_or_init(|| Mutex::new(Ring { lines: VecDeque::new(), bytes: 0 }))
}

/// A log writer: everything goes to stderr, and complete lines also into the ring (the oldest
/// dropped past [`LOG_RING_BYTES`]).
#[derive(Default)]
pub struct TeeWriter {
    partial: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(buf)?;
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            // The log may carry terminal colours when stderr is a terminal: keep the text only.
            let text = strip_ansi(&String::from_utf8_lossy(&line));
            let mut r = ring().lock().unwrap_or_else(|p| p.into_inner());
            r.bytes += text.len();
            r.lines.push_back(text);
            while r.bytes > LOG_RING_BYTES {
                match r.lines.pop_front() {
                    Some(old) => r.bytes -= old.len(),
                    None => break,
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeMaker {
    type Writer = TeeWriter;
    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter::default()
    }
}

/// Makes a [`TeeWriter`] per event (tracing's writer factory).
#[derive(Clone, Copy, Default)]
pub struct TeeMaker;

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `max_bytes` of this process's log.
pub fn log_tail(max_bytes: usize) -> String {
    let r = ring().lock().unwrap_or_else(|p| p.into_inner());
    let mut taken = 0;
    let mut start = r.lines.len();
    for line in r.lines.iter().rev() {
        if taken + line.len() > max_bytes {
            break;
        }
        taken += line.len();
        start -= 1;
    }
    r.lines.range(start..).map(String::as_str).collect()
}

/// Whether a configuration key names something secret (its value is not shown).
fn secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["token", "secret", "password", "passphrase", "credential"].iter().any(|s| k.contains(s))
}

/// The configuration file's text with the values of secret-looking keys replaced.
pub fn redact_toml(text: &str) -> String {
    text.lines()
        .map(|line| match line.split_once('=') {
            Some((key, _)) if !line.trim_start().starts_with('#') && secret_key(key.trim()) => format!("{} = \"<redacted>\"", key.trim_end()),
            _ => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The configuration file at `path`, redacted, or why it could not be read.
pub fn config_file(path: Option<&Path>) -> String {
    match path {
        None => "# started without a configuration file (flags only)".into(),
        Some(p) => match std::fs::read_to_string(p) {
            Ok(text) => format!("# {}\n{}", p.display(), redact_toml(&text)),
            Err(e) => format!("# {}: {e}", p.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_values_are_redacted_and_the_rest_kept() {
        let text = "id = 3\napi_token = \"abc\"\n[security]\nkey = \"/etc/basalt/node.key\"\n# token = \"in a comment\"\nPassword=hunter2";
        let r = redact_toml(text);
        assert!(!r.contains("abc") && !r.contains("hunter2"), "{r}");
        assert!(r.contains("id = 3") && r.contains("/etc/basalt/node.key") && r.contains("api_token = \"<redacted>\""), "{r}");
    }

    #[test]
    fn the_ring_keeps_whole_lines_without_colours() {
        let mut w = TeeWriter::default();
        w.write_all(b"\x1b[32mINFO\x1b[0m first ").unwrap();
        w.write_all(b"line\nsecond line\n").unwrap();
        let tail = log_tail(1 << 20);
        assert!(tail.ends_with("INFO first line\nsecond line\n"), "{tail:?}");
        assert_eq!(log_tail("second line\n".len()), "second line\n");
    }
}
