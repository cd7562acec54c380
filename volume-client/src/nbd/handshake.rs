//! The handshake phase: fixed newstyle negotiation (§ Handshake, § Fixed newstyle
//! negotiation, § Option types).
//!
//! Every option is length-prefixed, so anything unknown or malformed gets an error reply and
//! negotiation continues; only a broken stream (bad magic, an absurd length, an unknown client
//! flag, `NBD_OPT_EXPORT_NAME` for an unknown export) ends the connection.

use std::io;

use bytes::{BufMut, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;

/// What a client may learn about an export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name (the volume name).
    pub name: String,
    /// Human-readable description.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Smallest request granularity (any alignment works; this is the advertised minimum).
    pub min_block: u32,
    /// Preferred granularity.
    pub preferred_block: u32,
    /// Largest request payload.
    pub max_block: u32,
}

impl ExportInfo {
    /// Transmission flags for this export (§ Transmission flags).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        f
    }
}

/// The outcome of a successful negotiation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The chosen export.
    pub export: String,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected for this export (NBD_CMD_BLOCK_STATUS answers).
    pub base_allocation: bool,
}

/// Why negotiation ended without an export.
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// The connection failed or closed.
    #[error("connection error during handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("protocol violation during handshake: {0}")]
    Protocol(String),
    /// The TLS handshake after NBD_OPT_STARTTLS failed (a client certificate missing or
    /// from another CA, say); the connection is closed (§ FORCEDTLS mode).
    #[error("TLS handshake failed: {0}")]
    Tls(String),
    /// The client sent NBD_OPT_ABORT.
    #[error("client aborted the negotiation")]
    Aborted,
}

/// Most options one connection may send before it must choose an export.
const MAX_OPTIONS: usize = 256;

async fn reply<S: AsyncWrite + Unpin>(s: &mut S, option: u32, typ: u32, data: &[u8]) -> io::Result<()> {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPT_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(typ);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    s.write_all(&b).await
}

async fn error<S: AsyncWrite + Unpin>(s: &mut S, option: u32, typ: u32, message: &str) -> io::Result<()> {
    reply(s, option, typ, message.as_bytes()).await
}

/// Parses NBD_OPT_INFO / NBD_OPT_GO data: name, then the list of requested information types.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    if data.len() < 6 {
        return Err("option data shorter than its fixed fields".into());
    }
    let name_len = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err("export name length exceeds the option data".into());
    }
    let name = std::str::from_utf8(&rest[..name_len]).map_err(|_| "export name is not UTF-8".to_string())?.to_string();
    let rest = &rest[name_len..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        return Err(format!("{count} information requests but {} bytes of them", list.len()));
    }
    Ok((name, list.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect()))
}

/// Parses NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: the export name, then
/// the queries (§ Metadata querying).
fn parse_meta_request(data: &[u8]) -> Result<(String, Vec<String>), String> {
    let mut rest = data;
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        if rest.len() < n {
            return Err(format!("meta context request truncated in its {what}"));
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Ok(head)
    };
    let u32_of = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
    let name_len = u32_of(take(4, "name length")?);
    let name = String::from_utf8_lossy(take(name_len, "export name")?).into_owned();
    let count = u32_of(take(4, "query count")?);
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = u32_of(take(4, "query length")?);
        if len > MAX_META_QUERY {
            return Err(format!("a {len}-byte meta context query is too long"));
        }
        queries.push(String::from_utf8_lossy(take(len, "query")?).into_owned());
    }
    if !rest.is_empty() {
        return Err("meta context request has trailing bytes".into());
    }
    Ok((name, queries))
}

/// Whether `query` selects `base:allocation`: its exact name, or the `base:` namespace
/// (§ Metadata querying: a namespace query lists every context in it).
fn selects_base_allocation(query: &str) -> bool {
    query == META_BASE_ALLOCATION || query == "base:"
}

fn find<'a>(exports: &'a [ExportInfo], name: &str) -> Option<&'a ExportInfo> {
    // The empty name is the default export (§ NBD_OPT_EXPORT_NAME).
    if name.is_empty() { exports.first() } else { exports.iter().find(|e| e.name == name) }
}

/// What a listener does with NBD_OPT_STARTTLS (§ TLS support, server-side requirements).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsMode {
    /// NOTLS mode: STARTTLS is refused with NBD_REP_ERR_POLICY.
    Off,
    /// FORCEDTLS mode: every option but STARTTLS and ABORT is refused with
    /// NBD_REP_ERR_TLS_REQD until TLS is up.
    Forced,
}

/// How the plaintext part of a negotiation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An export was chosen; transmission follows on the same stream.
    Export(Negotiated),
    /// NBD_OPT_STARTTLS was acknowledged: the caller runs the TLS handshake and continues
    /// with [`negotiate_over_tls`].
    StartTls {
        /// The client asked for no zero padding in the greeting (carries over into TLS).
        no_zeroes: bool,
    },
}

/// Where a negotiation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Plaintext, in the given mode.
    Plain(TlsMode),
    /// Inside TLS.
    Tls,
}

/// Runs the server side of the handshake on `s`: the greeting, then options until an export
/// is chosen or (in [`TlsMode::Forced`]) TLS is started.
pub async fn negotiate<S>(s: &mut S, exports: &[ExportInfo], tls: TlsMode) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = BytesMut::with_capacity(18);
    hello.put_u64(NBDMAGIC);
    hello.put_u64(IHAVEOPT);
    hello.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&hello).await?;
    s.flush().await?;

    let client_flags = s.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    if tls == TlsMode::Forced && client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        // TLS needs fixed newstyle (§ Certificates, authentication and authorisation).
        return Err(HandshakeError::Protocol("the client does not speak fixed newstyle, which TLS requires".into()));
    }
    options(s, exports, client_flags & FLAG_C_NO_ZEROES != 0, Phase::Plain(tls)).await
}

/// Continues option haggling inside TLS after [`Outcome::StartTls`]. Nothing negotiated
/// before TLS carries over (in FORCEDTLS mode nothing could be).
pub async fn negotiate_over_tls<S>(s: &mut S, exports: &[ExportInfo], no_zeroes: bool) -> Result<Negotiated, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match options(s, exports, no_zeroes, Phase::Tls).await? {
        Outcome::Export(n) => Ok(n),
        Outcome::StartTls { .. } => Err(HandshakeError::Protocol("STARTTLS inside TLS".into())),
    }
}

async fn options<S>(s: &mut S, exports: &[ExportInfo], no_zeroes: bool, phase: Phase) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut structured = false;
    // The export `base:allocation` was selected for (NBD_OPT_SET_META_CONTEXT).
    let mut meta_export: Option<String> = None;

    for _ in 0..MAX_OPTIONS {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Protocol(format!("bad option magic {magic:#x}")));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::Protocol(format!("option {option} claims {len} bytes of data")));
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;

        if phase == Phase::Plain(TlsMode::Forced) {
            match option {
                OPT_STARTTLS if data.is_empty() => {
                    reply(s, option, REP_ACK, &[]).await?;
                    s.flush().await?;
                    return Ok(Outcome::StartTls { no_zeroes });
                }
                OPT_STARTTLS => error(s, option, REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data").await?,
                OPT_ABORT => {
                    let _ = reply(s, option, REP_ACK, &[]).await;
                    let _ = s.flush().await;
                    return Err(HandshakeError::Aborted);
                }
                // It cannot be answered with an error: terminate (§ FORCEDTLS mode).
                OPT_EXPORT_NAME => return Err(HandshakeError::Protocol("NBD_OPT_EXPORT_NAME before TLS on a listener that requires TLS".into())),
                _ => error(s, option, REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first").await?,
            }
            s.flush().await?;
            continue;
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(export) = find(exports, &name) else {
                    // This option cannot be answered with an error: terminate (§ NBD_OPT_EXPORT_NAME).
                    return Err(HandshakeError::Protocol(format!("no export named {name:?}")));
                };
                let mut b = BytesMut::with_capacity(134);
                b.put_u64(export.size);
                b.put_u16(export.transmission_flags(structured));
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                let base_allocation = structured && meta_export.as_deref() == Some(export.name.as_str());
                return Ok(Outcome::Export(Negotiated { export: export.name.clone(), structured, base_allocation }));
            }
            OPT_ABORT => {
                let _ = reply(s, option, REP_ACK, &[]).await;
                let _ = s.flush().await;
                return Err(HandshakeError::Aborted);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    error(s, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
                } else {
                    for e in exports {
                        let mut d = BytesMut::new();
                        d.put_u32(e.name.len() as u32);
                        d.put_slice(e.name.as_bytes());
                        d.put_slice(e.description.as_bytes());
                        reply(s, option, REP_SERVER, &d).await?;
                    }
                    reply(s, option, REP_ACK, &[]).await?;
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    error(s, option, REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data").await?;
                } else {
                    structured = true;
                    reply(s, option, REP_ACK, &[]).await?;
                }
            }
            OPT_INFO | OPT_GO => {
                let (name, requests) = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(msg) => {
                        error(s, option, REP_ERR_INVALID, &msg).await?;
                        s.flush().await?;
                        continue;
                    }
                };
                let Some(export) = find(exports, &name) else {
                    error(s, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}")).await?;
                    s.flush().await?;
                    continue;
                };
                let mut d = BytesMut::new();
                d.put_u16(INFO_EXPORT);
                d.put_u64(export.size);
                d.put_u16(export.transmission_flags(structured));
                reply(s, option, REP_INFO, &d).await?;
                // Block sizes go out even unrequested: the constraints hold regardless.
                let mut d = BytesMut::new();
                d.put_u16(INFO_BLOCK_SIZE);
                d.put_u32(export.min_block);
                d.put_u32(export.preferred_block);
                d.put_u32(export.max_block);
                reply(s, option, REP_INFO, &d).await?;
                for r in requests {
                    let mut d = BytesMut::new();
                    match r {
                        INFO_NAME => {
                            d.put_u16(INFO_NAME);
                            d.put_slice(export.name.as_bytes());
                        }
                        INFO_DESCRIPTION => {
                            d.put_u16(INFO_DESCRIPTION);
                            d.put_slice(export.description.as_bytes());
                        }
                        _ => continue, // already sent, or unknown: ignored (§ NBD_OPT_INFO)
                    }
                    reply(s, option, REP_INFO, &d).await?;
                }
                reply(s, option, REP_ACK, &[]).await?;
                s.flush().await?;
                if option == OPT_GO {
                    let base_allocation = structured && meta_export.as_deref() == Some(export.name.as_str());
                    return Ok(Outcome::Export(Negotiated { export: export.name.clone(), structured, base_allocation }));
                }
                continue;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                let (name, queries) = match parse_meta_request(&data) {
                    Ok(r) => r,
                    Err(msg) => {
                        error(s, option, REP_ERR_INVALID, &msg).await?;
                        s.flush().await?;
                        continue;
                    }
                };
                // § NBD_OPT_SET_META_CONTEXT: only once structured replies are on.
                if set && !structured {
                    error(s, option, REP_ERR_INVALID, "negotiate structured replies (NBD_OPT_STRUCTURED_REPLY) first").await?;
                    s.flush().await?;
                    continue;
                }
                let Some(export) = find(exports, &name) else {
                    error(s, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}")).await?;
                    s.flush().await?;
                    continue;
                };
                // A LIST without queries lists every context; a SET without any selects none.
                let matched = if queries.is_empty() { !set } else { queries.iter().any(|q| selects_base_allocation(q)) };
                if set {
                    meta_export = matched.then(|| export.name.clone());
                }
                if matched {
                    let mut d = BytesMut::new();
                    // A LIST's ids mean nothing (§ NBD_REP_META_CONTEXT).
                    d.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
                    d.put_slice(META_BASE_ALLOCATION.as_bytes());
                    reply(s, option, REP_META_CONTEXT, &d).await?;
                }
                reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS if phase == Phase::Tls => error(s, option, REP_ERR_INVALID, "TLS is already on").await?,
            OPT_STARTTLS => error(s, option, REP_ERR_POLICY, "TLS is not offered on this listener").await?,
            _ => error(s, option, REP_ERR_UNSUP, &format!("option {option} is not supported")).await?,
        }
        s.flush().await?;
    }
    Err(HandshakeError::Protocol(format!("more than {MAX_OPTIONS} options without choosing an export")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "demo".into(),
            description: "a volume".into(),
            size: 1 << 30,
            read_only: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: 32 << 20,
        }
    }

    fn option(b: &mut Vec<u8>, opt: u32, data: &[u8]) {
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    async fn run(input: Vec<u8>) -> (Result<Negotiated, HandshakeError>, Vec<u8>) {
        let (r, out) = run_mode(input, TlsMode::Off).await;
        (
            r.map(|o| match o {
                Outcome::Export(n) => n,
                other => panic!("{other:?}"),
            }),
            out,
        )
    }

    async fn run_mode(input: Vec<u8>, mode: TlsMode) -> (Result<Outcome, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(&input).await.unwrap();
        client.shutdown().await.unwrap();
        let exports = vec![export()];
        let result = negotiate(&mut server, &exports, mode).await;
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.unwrap();
        (result, out)
    }

    /// Reply types in the order the server sent them (after the 18-byte greeting).
    fn reply_types(out: &[u8]) -> Vec<u32> {
        let mut types = Vec::new();
        let mut pos = 18;
        while pos + 20 <= out.len() && out[pos..pos + 8] == OPT_REPLY_MAGIC.to_be_bytes() {
            types.push(u32::from_be_bytes(out[pos + 12..pos + 16].try_into().unwrap()));
            let len = u32::from_be_bytes(out[pos + 16..pos + 20].try_into().unwrap()) as usize;
            pos += 20 + len;
        }
        types
    }

    #[tokio::test]
    async fn go_with_structured_replies_and_unknown_options() {
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, 99, b"whatever");
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        option(&mut b, OPT_LIST, &[]);
        option(&mut b, OPT_GO, &go_data("nope", &[]));
        option(&mut b, OPT_GO, &[0, 0, 0, 200, 1]);
        option(&mut b, OPT_GO, &go_data("demo", &[INFO_NAME, INFO_BLOCK_SIZE, INFO_DESCRIPTION, 77]));
        let (r, out) = run(b).await;
        assert_eq!(r.unwrap(), Negotiated { export: "demo".into(), structured: true, base_allocation: false });
        assert_eq!(&out[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(
            reply_types(&out),
            vec![REP_ERR_UNSUP, REP_ACK, REP_SERVER, REP_ACK, REP_ERR_UNKNOWN, REP_ERR_INVALID, REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
        );
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[tokio::test]
    async fn base_allocation_is_listed_and_selected_only_with_structured_replies() {
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, OPT_SET_META_CONTEXT, &meta_data("demo", &[META_BASE_ALLOCATION]));
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        option(&mut b, OPT_LIST_META_CONTEXT, &meta_data("demo", &[]));
        option(&mut b, OPT_LIST_META_CONTEXT, &meta_data("demo", &["qemu:dirty-bitmap:x"]));
        option(&mut b, OPT_SET_META_CONTEXT, &meta_data("nope", &["base:"]));
        option(&mut b, OPT_SET_META_CONTEXT, &[0, 0, 0, 9, b'd']);
        option(&mut b, OPT_SET_META_CONTEXT, &meta_data("demo", &["other:thing", "base:"]));
        option(&mut b, OPT_GO, &go_data("demo", &[]));
        let (r, out) = run(b).await;
        assert_eq!(r.unwrap(), Negotiated { export: "demo".into(), structured: true, base_allocation: true });
        assert_eq!(
            reply_types(&out),
            vec![
                REP_ERR_INVALID,  // SET before structured replies
                REP_ACK,          // structured replies
                REP_META_CONTEXT, // LIST of everything
                REP_ACK,
                REP_ACK,         // LIST of a context not served: nothing
                REP_ERR_UNKNOWN, // unknown export
                REP_ERR_INVALID, // truncated
                REP_META_CONTEXT,
                REP_ACK,
                REP_INFO,
                REP_INFO,
                REP_ACK
            ]
        );

        // Selected for another export than the one chosen, or not at all: no block status.
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        option(&mut b, OPT_SET_META_CONTEXT, &meta_data("demo", &[]));
        option(&mut b, OPT_GO, &go_data("demo", &[]));
        assert!(!run(b).await.0.unwrap().base_allocation, "a SET without queries selects nothing");
    }

    #[tokio::test]
    async fn export_name_and_abort_and_violations() {
        let mut b = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
        option(&mut b, OPT_EXPORT_NAME, b"");
        let (r, out) = run(b).await;
        assert_eq!(r.unwrap().export, "demo", "empty name is the default export");
        assert_eq!(out.len(), 18 + 10, "no zero padding once NO_ZEROES was negotiated");

        let mut b = 0u32.to_be_bytes().to_vec();
        option(&mut b, OPT_ABORT, &[]);
        assert!(matches!(run(b).await.0, Err(HandshakeError::Aborted)));

        let mut b = 0u32.to_be_bytes().to_vec();
        option(&mut b, OPT_EXPORT_NAME, b"nope");
        assert!(matches!(run(b).await.0, Err(HandshakeError::Protocol(_))));

        assert!(matches!(run(0x80u32.to_be_bytes().to_vec()).await.0, Err(HandshakeError::Protocol(_))), "unknown client flag");
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&[0xde; 16]);
        assert!(matches!(run(b).await.0, Err(HandshakeError::Protocol(_))), "bad magic");
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&OPT_LIST.to_be_bytes());
        b.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(run(b).await.0, Err(HandshakeError::Protocol(_))), "absurd option length");
        // Truncated handshake: the client vanishes mid-option.
        let mut b = 0u32.to_be_bytes().to_vec();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes()[..5]);
        assert!(matches!(run(b).await.0, Err(HandshakeError::Io(_))));
    }

    #[tokio::test]
    async fn forced_tls_refuses_everything_but_starttls() {
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, OPT_STRUCTURED_REPLY, &[]);
        option(&mut b, OPT_GO, &go_data("demo", &[]));
        option(&mut b, OPT_STARTTLS, b"x");
        option(&mut b, OPT_STARTTLS, &[]);
        let (r, out) = run_mode(b, TlsMode::Forced).await;
        assert_eq!(r.unwrap(), Outcome::StartTls { no_zeroes: false });
        assert_eq!(reply_types(&out), vec![REP_ERR_TLS_REQD, REP_ERR_TLS_REQD, REP_ERR_INVALID, REP_ACK]);

        // EXPORT_NAME cannot be refused with an error: the connection ends.
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, OPT_EXPORT_NAME, b"demo");
        let (r, out) = run_mode(b, TlsMode::Forced).await;
        assert!(matches!(r, Err(HandshakeError::Protocol(_))));
        assert_eq!(out.len(), 18, "nothing but the greeting was sent");

        // TLS needs fixed newstyle.
        let (r, _) = run_mode(0u32.to_be_bytes().to_vec(), TlsMode::Forced).await;
        assert!(matches!(r, Err(HandshakeError::Protocol(_))));

        // Without TLS on offer, STARTTLS is refused by policy and negotiation goes on.
        let mut b = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        option(&mut b, OPT_STARTTLS, &[]);
        option(&mut b, OPT_GO, &go_data("demo", &[]));
        let (r, out) = run(b).await;
        assert!(r.is_ok());
        assert_eq!(reply_types(&out)[0], REP_ERR_POLICY);
    }

    #[tokio::test]
    async fn inside_tls_a_second_starttls_is_invalid() {
        let mut b = Vec::new();
        option(&mut b, OPT_STARTTLS, &[]);
        option(&mut b, OPT_EXPORT_NAME, b"demo");
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(&b).await.unwrap();
        client.shutdown().await.unwrap();
        let n = negotiate_over_tls(&mut server, &[export()], true).await.unwrap();
        assert_eq!(n.export, "demo");
        drop(server);
        let mut out = vec![0u8; 18];
        client.read_to_end(&mut out).await.unwrap();
        assert_eq!(reply_types(&out), vec![REP_ERR_INVALID]);
        assert_eq!(out.len(), 18 + 20 + "TLS is already on".len() + 10, "no zero padding after NO_ZEROES");
    }
}
