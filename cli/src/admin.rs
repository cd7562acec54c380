//! Talking to the cluster's admin API: any node works, so try each address in turn and retry
//! briefly while the meta group elects a leader. Every connection is TLS verifying the nodes
//! against the cluster CA, and every request carries the operator's token.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use basalt_proto::admin::admin_client::AdminClient;
use basalt_security::grpc::{AuthChannel, Bearer};
use basalt_security::{Dialer, Expect, TlsContext, TlsFiles, Token};
use basalt_volume_client::{ClientOptions, ClientSecurity};

use crate::exit::CliError;

/// Where the CLI's credentials come from (flags, then environment).
#[derive(Clone, Debug, Default)]
pub struct CredentialFlags {
    /// `--ca` / `BASALT_CA`.
    pub ca: Option<PathBuf>,
    /// `--token-file` / `BASALT_TOKEN_FILE`.
    pub token_file: Option<PathBuf>,
    /// `--cert` / `BASALT_CERT`.
    pub cert: Option<PathBuf>,
    /// `--key` / `BASALT_KEY`.
    pub key: Option<PathBuf>,
    /// `--insecure`: plaintext, for clusters running with security off.
    pub insecure: bool,
}

/// The CLI's TLS and token.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// Opens connections to nodes.
    pub dialer: Dialer,
    /// The bearer token, if any.
    pub token: Option<Token>,
}

impl Credentials {
    /// Loads the CA (and client certificate) and reads the token: `--token-file`, else
    /// `BASALT_TOKEN_FILE`, else `BASALT_TOKEN`.
    pub fn load(flags: &CredentialFlags) -> Result<Credentials, CliError> {
        let token = match (&flags.token_file, std::env::var("BASALT_TOKEN").ok().filter(|t| !t.trim().is_empty())) {
            (Some(path), _) => {
                let text =
                    std::fs::read_to_string(path).map_err(|e| CliError::usage(format!("cannot read the token file {}: {e}", path.display())))?;
                Some(Token::parse(&text).map_err(|e| CliError::unauthenticated(format!("{}: {e}", path.display())))?)
            }
            (None, Some(text)) => Some(Token::parse(&text).map_err(|e| CliError::unauthenticated(format!("BASALT_TOKEN: {e}")))?),
            (None, None) => None,
        };
        let dialer = match &flags.ca {
            Some(ca) => {
                let files = TlsFiles { ca: ca.clone(), cert: flags.cert.clone(), key: flags.key.clone() };
                Dialer::new(Some(Arc::new(TlsContext::load(files).map_err(|e| CliError::usage(e.to_string()))?)))
            }
            None if flags.insecure => Dialer::new(None),
            None => {
                return Err(CliError::usage(
                    "no cluster CA given: pass --ca PATH or set BASALT_CA (printed by `basalt dev up`); --insecure talks plaintext to a cluster running with security off",
                ));
            }
        };
        Ok(Credentials { dialer, token })
    }

    /// Volume-client options carrying these credentials.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions { security: ClientSecurity { dialer: self.dialer.clone(), token: self.token.clone() }, ..ClientOptions::default() }
    }
}

/// Admin access to a cluster given by its nodes' addresses.
pub struct Admin {
    addrs: Vec<String>,
    creds: Credentials,
}

impl Admin {
    /// From `--cluster`/`BASALT_CLUSTER` and the credentials.
    pub fn new(cluster: Option<String>, creds: Credentials) -> Result<Self, CliError> {
        let raw = cluster.unwrap_or_default();
        let addrs: Vec<String> = raw.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if addrs.is_empty() {
            return Err(CliError::usage("no cluster given: pass --cluster ADDR[,ADDR...] or set BASALT_CLUSTER (e.g. from `basalt dev up`)"));
        }
        Ok(Self { addrs, creds })
    }

    /// The addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The credentials.
    pub fn credentials(&self) -> &Credentials {
        &self.creds
    }

    /// An admin client for the node at `addr` (for requests a node answers about itself).
    pub fn client(&self, addr: &str) -> Result<AdminClient<AuthChannel>, CliError> {
        let channel = basalt_security::grpc::channel(addr, &self.creds.dialer, Expect::AnyNode, |ep| {
            ep.connect_timeout(Duration::from_secs(3)).timeout(Duration::from_secs(180))
        })
        .map_err(CliError::usage)?;
        Ok(AdminClient::with_interceptor(channel, Bearer::new(self.creds.token.as_ref()))
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// Runs `f` against the nodes in turn until one answers; UNAVAILABLE (elections, a node
    /// down) is retried for up to 20 seconds. Other errors are final.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(AdminClient<AuthChannel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut last: Option<tonic::Status>;
        let mut reached_any = false;
        let mut i = 0usize;
        loop {
            let addr = &self.addrs[i % self.addrs.len()];
            match f(self.client(addr)?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) => {
                    // A transport error means nothing listens there (or the TLS handshake
                    // failed); anything else came from a node (e.g. an election in progress)
                    // and is worth waiting out longer.
                    reached_any |= !(s.message().contains("transport error") || s.message().contains("connect error"));
                    last = Some(s);
                }
                Err(s) => return Err(CliError::from_status(&s)),
            }
            i += 1;
            let patience = if reached_any { Duration::from_secs(20) } else { Duration::from_secs(3) };
            if started.elapsed() > patience {
                let s = last.unwrap_or_else(|| tonic::Status::unavailable("no answer"));
                return Err(CliError::unreachable(format!(
                    "the cluster at {} is unavailable: {} (is it running? check --cluster or BASALT_CLUSTER, and --ca or BASALT_CA)",
                    self.addrs.join(","),
                    error_chain(&s)
                )));
            }
            if i.is_multiple_of(self.addrs.len()) {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// A status message with its source chain (a TLS failure hides under "transport error").
pub fn error_chain(s: &tonic::Status) -> String {
    let mut text = s.message().to_string();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}
