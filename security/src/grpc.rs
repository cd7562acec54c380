//! gRPC over Basalt's connections: channels whose connector is a [`Dialer`], and bearer tokens
//! in request metadata.

use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};

use crate::stream::Dialer;
use crate::tls::{Expect, Protocol};
use crate::token::Token;

/// The metadata key carrying credentials.
pub const AUTHORIZATION: &str = "authorization";

/// A lazily connected channel to `addr` through `dialer`, verifying the node `expect` names.
/// `tune` adjusts the endpoint (timeouts, windows) before the channel is made.
pub fn channel(addr: &str, dialer: &Dialer, expect: Expect, tune: impl FnOnce(Endpoint) -> Endpoint) -> Result<Channel, String> {
    // The scheme only fills HTTP/2's :scheme; the connector below decides what is spoken.
    let endpoint = Endpoint::from_shared(format!("http://{addr}")).map_err(|e| format!("bad node address {addr:?}: {e}"))?;
    let endpoint = tune(endpoint.tcp_nodelay(true).http2_keep_alive_interval(Duration::from_secs(10)));
    let dialer = dialer.clone();
    let target = addr.to_string();
    Ok(endpoint.connect_with_connector_lazy(tower::service_fn(move |_uri: http::Uri| {
        let (dialer, target) = (dialer.clone(), target.clone());
        async move { dialer.connect(&target, expect, Protocol::Grpc).await.map(TokioIo::new) }
    })))
}

/// Adds a bearer token to every request of a client.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Bearer {
    /// Sends `token` (or nothing).
    pub fn new(token: Option<&Token>) -> Bearer {
        Bearer(token.and_then(|t| format!("Bearer {}", t.expose()).parse().ok()))
    }

    /// Puts the credentials into `metadata`.
    pub fn apply(&self, metadata: &mut MetadataMap) {
        if let Some(v) = &self.0 {
            metadata.insert(AUTHORIZATION, v.clone());
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        self.apply(request.metadata_mut());
        Ok(request)
    }
}

/// A channel that sends credentials on every request.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Bearer>;

/// The bearer token text in `metadata`, if any (`Err`: present but not a bearer credential).
pub fn bearer(metadata: &MetadataMap) -> Result<Option<&str>, String> {
    let Some(value) = metadata.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let text = value.to_str().map_err(|_| "the authorization header is not ASCII".to_string())?;
    match text.strip_prefix("Bearer ") {
        Some(t) => Ok(Some(t.trim())),
        None => Err("the authorization header is not a bearer token".into()),
    }
}
