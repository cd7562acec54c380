//! gRPC clients to other nodes, one lazily-connected channel per address.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::data::data_client::DataClient;
use tonic::transport::{Channel, Endpoint};

/// Channels by address, shared by every client of the node.
#[derive(Default)]
pub struct Clients {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Clients {
    fn channel(&self, addr: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| tonic::Status::internal(format!("bad node address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10));
        let channel = endpoint.connect_lazy();
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Admin client for `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, tonic::Status> {
        Ok(AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// Data client for `addr`.
    pub fn data(&self, addr: &str) -> Result<DataClient<Channel>, tonic::Status> {
        Ok(DataClient::new(self.channel(addr)?)
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }
}
