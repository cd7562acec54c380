//! What the outside hands the security layer as text — tokens (bearer headers, Hello frames,
//! token files), CIDR blocks (configs, `--allow-from`), durations (`--expires`), audit lines
//! (files on disk) — parses to a value or an error: never a panic, never a token accepted that
//! does not round-trip, never an error message that repeats a presented token.
#![no_main]

use basalt_security::audit::AuditRecord;
use basalt_security::cidr::Cidr;
use basalt_security::{Role, Token, TokenRecord, TokenTable};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Token::parse(text) {
        Ok(t) => assert_eq!(Token::parse(&t.expose()).ok(), Some(t)),
        Err(e) => {
            // A secret is a long run of hex digits: none may appear in the message.
            let message = e.to_string();
            for run in text.split(|c: char| !c.is_ascii_hexdigit()).filter(|r| r.len() >= 16) {
                assert!(!message.contains(run), "an error repeats part of the input: {message}");
            }
        }
    }
    // A table holding one known token: whatever is presented is accepted only if it is that one.
    let known = Token::generate();
    let table = TokenTable::new([TokenRecord::new(&known, Role::Hypervisor, "fuzz".into(), 0)]);
    if table.authenticate(text, "127.0.0.1".parse().expect("ip"), 1).is_ok() {
        assert_eq!(Token::parse(text).ok(), Some(known));
    }
    if let Ok(c) = text.parse::<Cidr>() {
        assert_eq!(c.to_string().parse::<Cidr>().ok(), Some(c));
    }
    let _ = basalt_common::units::parse_duration(text);
    if let Ok(r) = AuditRecord::from_json_line(text) {
        assert_eq!(AuditRecord::from_json_line(&r.to_json_line()).ok(), Some(r));
    }
});
