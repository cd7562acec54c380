//! `basalt cert|auth|audit ...`: the cluster CA and its certificates, bearer tokens, and the
//! audit log.

use std::io::Write;
use std::path::{Path, PathBuf};

use basalt_common::units::parse_duration;
use basalt_proto::admin::{AuditListRequest, AuditVerifyRequest, TokenCreateRequest, TokenInfo, TokenListRequest, TokenRevokeRequest};
use basalt_security::certs::{self, Validity};
use basalt_security::identity::format_unix;
use basalt_security::{Identity, Token};
use serde_json::{Value, json};

use crate::admin::Admin;
use crate::commands::{Out, table, when};
use crate::exit::CliError;

fn sec_err(e: basalt_security::SecurityError) -> CliError {
    match e {
        basalt_security::SecurityError::Exists(_) => CliError { code: 4, message: e.to_string() },
        basalt_security::SecurityError::Invalid(_) => CliError::invalid(e.to_string()),
        other => CliError::other(other.to_string()),
    }
}

/// Writes a secret (a token) to a new file readable only by its owner; refuses to replace one.
pub fn write_secret_file(path: &Path, secret: &str) -> Result<(), CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliError { code: 4, message: format!("{} already exists; not replacing it (pick another path)", path.display()) }
        } else {
            CliError::other(format!("cannot create {}: {e}", path.display()))
        }
    })?;
    f.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| CliError::other(format!("cannot write {}: {e}", path.display())))
}

/// `basalt cert init`.
pub fn cert_init(out: Out, dir: &Path, days: u32) -> Result<(), CliError> {
    let ca = certs::init_ca(dir, days).map_err(sec_err)?;
    out.print(json!({"ca": ca.cert, "key": ca.key, "not_after": ca.not_after}), || {
        format!(
            "created the cluster CA {} (valid until {}); its key {} issues certificates: keep it offline",
            ca.cert.display(),
            format_unix(ca.not_after),
            ca.key.display()
        )
    });
    Ok(())
}

/// `basalt cert issue`.
pub fn cert_issue(
    out: Out,
    dir: &Path,
    node: Option<u64>,
    client: Option<String>,
    out_dir: Option<PathBuf>,
    days: u32,
    sans: &[String],
) -> Result<(), CliError> {
    let identity = match (node, client) {
        (Some(id), None) => Identity::Node(id),
        (None, Some(name)) => Identity::Client(name),
        _ => return Err(CliError::usage("give --node N or --client NAME")),
    };
    if days == 0 {
        return Err(CliError::invalid("--days must be at least 1"));
    }
    let files = certs::issue(dir, &identity, Validity::days(days), out_dir.as_deref().unwrap_or(dir), sans).map_err(sec_err)?;
    out.print(json!({"identity": identity.to_string(), "cert": files.cert, "key": files.key, "not_after": files.not_after}), || {
        format!("issued {identity}: {} and {} (valid until {})", files.cert.display(), files.key.display(), format_unix(files.not_after))
    });
    Ok(())
}

/// `basalt cert nbd`.
pub fn cert_nbd(out: Out, dir: &Path, hosts: &[String], days: u32) -> Result<(), CliError> {
    if days == 0 {
        return Err(CliError::invalid("--days must be at least 1"));
    }
    let issued = basalt_security::nbd_tls::create(dir, hosts, Validity::days(days)).map_err(sec_err)?;
    out.print(json!({"dir": issued.dir, "hosts": hosts, "not_after": issued.not_after}), || {
        format!(
            "created NBD TLS certificates in {} for {} (valid until {}): `basalt attach --nbd-tls-dir {}` serves with them; \
             QEMU reads the client side with -object tls-creds-x509,id=tls0,endpoint=client,dir={}",
            issued.dir.display(),
            hosts.join(", "),
            format_unix(issued.not_after),
            issued.dir.display(),
            issued.dir.display()
        )
    });
    Ok(())
}

fn token_json(t: &TokenInfo) -> Value {
    json!({
        "id": t.id, "role": t.role, "volumes": t.volumes, "expires_unix_ms": t.expires_unix_ms,
        "allow_from": t.allow_from, "name": t.name, "created_unix_ms": t.created_unix_ms,
        "created_by": t.created_by, "revoked_unix_ms": t.revoked_unix_ms,
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A token to create.
pub struct NewToken {
    /// Role.
    pub role: String,
    /// Volume grants.
    pub volumes: Vec<String>,
    /// Lifetime.
    pub expires: Option<String>,
    /// Source blocks.
    pub allow_from: Vec<String>,
    /// Description.
    pub name: String,
    /// Write the token here instead of printing it.
    pub file: Option<PathBuf>,
}

/// `basalt auth token create`.
pub async fn token_create(admin: &Admin, out: Out, t: NewToken) -> Result<(), CliError> {
    let expires_in_secs = match &t.expires {
        Some(e) => {
            let secs = parse_duration(e).map_err(|m| CliError::invalid(format!("--expires: {m}")))?;
            if secs == 0 {
                return Err(CliError::invalid("--expires must be longer than 0 seconds"));
            }
            secs
        }
        None => 0,
    };
    // Refuse bad blocks before asking the cluster (it checks again).
    basalt_security::cidr::AllowList::parse(&t.allow_from).map_err(|e| CliError::invalid(format!("--allow-from: {e}")))?;
    if let Some(path) = &t.file
        && path.exists()
    {
        return Err(CliError { code: 4, message: format!("{} already exists; not replacing it (pick another path)", path.display()) });
    }
    let req = TokenCreateRequest { role: t.role, volumes: t.volumes, expires_in_secs, allow_from: t.allow_from, name: t.name };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.token_create(req).await }
        })
        .await?;
    let info = reply.info.unwrap_or_default();
    // The token is parsed back before it is shown: what is printed is what works.
    Token::parse(&reply.token).map_err(|e| CliError::other(format!("the cluster returned a malformed token: {e}")))?;
    if let Some(path) = &t.file {
        write_secret_file(path, &reply.token)?;
    }
    let shown = if t.file.is_some() { Value::Null } else { Value::String(reply.token.clone()) };
    out.print(json!({"token": shown, "file": t.file, "info": token_json(&info)}), || {
        let head = format!(
            "created token {} (role {}{})",
            info.id,
            info.role,
            if info.volumes.is_empty() { String::new() } else { format!(", volumes {}", info.volumes.join(",")) }
        );
        match &t.file {
            Some(p) => format!("{head}; written to {} (mode 0600)", p.display()),
            None => format!("{head}; it is shown once, now:\n{}", reply.token),
        }
    });
    Ok(())
}

/// `basalt auth token list`.
pub async fn token_list(admin: &Admin, out: Out) -> Result<(), CliError> {
    let reply = admin.call(|mut c| async move { c.token_list(TokenListRequest {}).await }).await?;
    out.print(json!({"tokens": reply.tokens.iter().map(token_json).collect::<Vec<_>>()}), || {
        let mut t = table(&["ID", "ROLE", "VOLUMES", "NAME", "CREATED", "BY", "EXPIRES", "ALLOW FROM", "STATE"]);
        let now = now_ms();
        for k in &reply.tokens {
            let state = if k.revoked_unix_ms != 0 {
                format!("revoked {}", when(k.revoked_unix_ms, ""))
            } else if k.expires_unix_ms != 0 && k.expires_unix_ms <= now {
                "expired".into()
            } else {
                "active".into()
            };
            t.add_row(vec![
                k.id.clone(),
                k.role.clone(),
                if k.volumes.is_empty() { "all".into() } else { k.volumes.join(",") },
                k.name.clone(),
                when(k.created_unix_ms, ""),
                k.created_by.clone(),
                when(k.expires_unix_ms, "never"),
                if k.allow_from.is_empty() { "any".into() } else { k.allow_from.join(",") },
                state,
            ]);
        }
        t.to_string()
    });
    Ok(())
}

/// `basalt auth token revoke`.
pub async fn token_revoke(admin: &Admin, out: Out, id: &str) -> Result<(), CliError> {
    let req = TokenRevokeRequest { id: id.to_string() };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.token_revoke(req).await }
        })
        .await?;
    let info = reply.info.unwrap_or_default();
    out.print(json!({"revoked": token_json(&info)}), || format!("revoked token {}; it stops working on every node within seconds", info.id));
    Ok(())
}

/// Parses `--since`: an RFC 3339 time, or an age (`1h`: an hour ago).
fn since_ms(s: &str) -> Result<u64, CliError> {
    let now = now_ms();
    if let Ok(secs) = parse_duration(s) {
        return Ok(now.saturating_sub(secs.saturating_mul(1000)));
    }
    time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        .map_err(|_| CliError::invalid(format!("--since {s:?}: give a time like 2026-12-04T10:00:00Z or an age like 1h or 7d")))
}

/// `basalt audit list`.
pub async fn audit_list(
    admin: &Admin,
    out: Out,
    since: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    limit: u32,
) -> Result<(), CliError> {
    let since_unix_ms = since.as_deref().map(since_ms).transpose()?.unwrap_or(0);
    let req = AuditListRequest { since_unix_ms, actor: actor.unwrap_or_default(), action: action.unwrap_or_default(), limit };
    let reply = admin
        .call(|mut c| {
            let req = req.clone();
            async move { c.audit_list(req).await }
        })
        .await?;
    let records: Vec<Value> = reply
        .records
        .iter()
        .map(|r| {
            let e = r.event.clone().unwrap_or_default();
            json!({
                "seq": r.seq, "time_unix_ms": e.time_unix_ms, "time": when(e.time_unix_ms, ""),
                "actor": e.actor, "source": e.source, "action": e.action, "target": e.target,
                "outcome": e.outcome, "detail": e.detail,
                "hash": basalt_security::token::hex(&r.hash),
            })
        })
        .collect();
    out.print(json!({"records": records, "kept": reply.total, "first_seq": reply.first_seq}), || {
        let mut t = table(&["SEQ", "TIME", "ACTOR", "SOURCE", "ACTION", "TARGET", "OUTCOME", "DETAIL"]);
        for r in &reply.records {
            let e = r.event.clone().unwrap_or_default();
            t.add_row(vec![r.seq.to_string(), when(e.time_unix_ms, ""), e.actor, e.source, e.action, e.target, e.outcome, e.detail]);
        }
        format!("{t}\n{} shown; {} kept from record {} (older ones exported and pruned)", reply.records.len(), reply.total, reply.first_seq)
    });
    Ok(())
}

/// `basalt audit verify`: exit 10 if any meta node's chain is broken or could not be checked.
pub async fn audit_verify(admin: &Admin, out: Out) -> Result<(), CliError> {
    let reply = admin.call(|mut c| async move { c.audit_verify(AuditVerifyRequest {}).await }).await?;
    let nodes: Vec<Value> = reply
        .nodes
        .iter()
        .map(|n| json!({"node": n.node, "checked": n.checked, "ok": n.problem.is_empty(), "problem": n.problem, "problem_seq": n.problem_seq, "unreachable": n.unreachable}))
        .collect();
    let broken: Vec<String> = reply.nodes.iter().filter(|n| !n.problem.is_empty()).map(|n| format!("node-{}: {}", n.node, n.problem)).collect();
    out.print(json!({"last_seq": reply.last_seq, "ok": broken.is_empty(), "nodes": nodes}), || {
        let mut t = table(&["NODE", "RECORDS CHECKED", "RESULT"]);
        for n in &reply.nodes {
            let result = if n.problem.is_empty() {
                "intact".to_string()
            } else if n.unreachable {
                format!("not checked: {}", n.problem)
            } else {
                format!("BROKEN at {}: {}", n.problem_seq, n.problem)
            };
            t.add_row(vec![format!("node-{}", n.node), n.checked.to_string(), result]);
        }
        format!("{t}\nlast record: {}", reply.last_seq)
    });
    if broken.is_empty() { Ok(()) } else { Err(CliError { code: 10, message: format!("the audit log failed verification: {}", broken.join("; ")) }) }
}
