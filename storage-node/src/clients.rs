//! gRPC clients to other nodes, one lazily-connected channel per address, over mutual TLS
//! with this node's certificate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use basalt_proto::admin::admin_client::AdminClient;
use basalt_proto::admin::backup_node_client::BackupNodeClient;
use basalt_proto::data::data_client::DataClient;
use basalt_security::{Dialer, Expect};
use tonic::transport::Channel;

/// Channels by address, shared by every client of the node.
pub struct Clients {
    dialer: Dialer,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Clients {
    /// Clients whose connections `dialer` opens.
    pub fn new(dialer: Dialer) -> Self {
        Self { dialer: dialer.with_connect_timeout(Duration::from_secs(2)), channels: Mutex::new(HashMap::new()) }
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        // Any node of the cluster: addresses come from the map and configuration.
        let channel = basalt_security::grpc::channel(addr, &self.dialer, Expect::AnyNode, |ep| ep.connect_timeout(Duration::from_secs(2)))
            .map_err(tonic::Status::internal)?;
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Admin client for `addr`.
    pub fn admin(&self, addr: &str) -> Result<AdminClient<Channel>, tonic::Status> {
        Ok(AdminClient::new(self.channel(addr)?)
            .max_decoding_message_size(basalt_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(basalt_proto::MAX_MESSAGE_BYTES))
    }

    /// Backup-node client for `addr`.
    pub fn backup(&self, addr: &str) -> Result<BackupNodeClient<Channel>, tonic::Status> {
        Ok(BackupNodeClient::new(self.channel(addr)?)
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
