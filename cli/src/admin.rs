//! Talking to the cluster's admin API: any node works, so try each address in turn and retry
//! briefly while the meta group elects a leader.

use std::time::Duration;

use basalt_proto::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint};

use crate::exit::CliError;

/// Admin access to a cluster given by its nodes' addresses.
pub struct Admin {
    addrs: Vec<String>,
}

impl Admin {
    /// From `--cluster`/`BASALT_CLUSTER`.
    pub fn new(cluster: Option<String>) -> Result<Self, CliError> {
        let raw = cluster.unwrap_or_default();
        let addrs: Vec<String> = raw.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        if addrs.is_empty() {
            return Err(CliError::usage("no cluster given: pass --cluster ADDR[,ADDR...] or set BASALT_CLUSTER (e.g. from `basalt dev up`)"));
        }
        Ok(Self { addrs })
    }

    /// The addresses.
    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// An admin client for the node at `addr` (for requests a node answers about itself).
    pub fn client(addr: &str) -> Result<AdminClient<Channel>, CliError> {
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CliError::usage(format!("bad cluster address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(180));
        Ok(AdminClient::new(ep.connect_lazy())
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// Runs `f` against the nodes in turn until one answers; UNAVAILABLE (elections, a node
    /// down) is retried for up to 20 seconds. Other errors are final.
    pub async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, CliError>
    where
        F: FnMut(AdminClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let started = tokio::time::Instant::now();
        let mut last: Option<tonic::Status>;
        let mut reached_any = false;
        let mut i = 0usize;
        loop {
            let addr = &self.addrs[i % self.addrs.len()];
            match f(Self::client(addr)?).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown) => {
                    // A transport error means nothing listens there; anything else came from a
                    // node (e.g. an election in progress) and is worth waiting out longer.
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
                    "the cluster at {} is unavailable: {} (is it running? check --cluster or BASALT_CLUSTER)",
                    self.addrs.join(","),
                    s.message()
                )));
            }
            if i % self.addrs.len() == 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}
