//! TLS between real sockets on 127.0.0.1: who is let in, who is refused, and why.

use std::path::Path;
use std::sync::Arc;

use basalt_security::certs::{self, Validity};
use basalt_security::{Dialer, Expect, Identity, Protocol, TlsContext, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn files(ca_dir: &Path, out: &Path, who: Option<&Identity>) -> TlsFiles {
    let stem = who.map(certs::file_stem);
    TlsFiles {
        ca: ca_dir.join(certs::CA_CERT),
        cert: stem.as_ref().map(|s| out.join(format!("{s}.pem"))),
        key: stem.as_ref().map(|s| out.join(format!("{s}.key"))),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    other_ca: std::path::PathBuf,
    out: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let other_ca = dir.path().join("other-ca");
    let out = dir.path().join("certs");
    certs::init_ca(&ca, 30).unwrap();
    certs::init_ca(&other_ca, 30).unwrap();
    for id in [1, 2] {
        certs::issue(&ca, &Identity::Node(id), Validity::days(5), &out, &[]).unwrap();
    }
    certs::issue(&ca, &Identity::Client("ops".into()), Validity::days(5), &out, &[]).unwrap();
    certs::issue(&other_ca, &Identity::Node(9), Validity::days(5), &out, &[]).unwrap();
    Fixture { ca, other_ca, out, _dir: dir }
}

/// A server for node 1 that echoes one line per connection and reports each accept's result.
async fn serve(tls: Arc<TlsContext>) -> (String, tokio::sync::mpsc::UnboundedReceiver<Result<(Protocol, Option<Identity>), String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(tcp, |p| if p == Protocol::Http { Err("metrics are not served on this port".into()) } else { Ok(()) }).await {
                    Ok(mut a) => {
                        let _ = tx.send(Ok((a.protocol, a.identity.clone())));
                        let mut buf = [0u8; 5];
                        if a.stream.read_exact(&mut buf).await.is_ok() {
                            let _ = a.stream.write_all(&buf).await;
                            let _ = a.stream.flush().await;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    (addr, rx)
}

async fn echo(dialer: &Dialer, addr: &str, expect: Expect, protocol: Protocol) -> std::io::Result<()> {
    let mut s = dialer.connect(addr, expect, protocol).await?;
    if let basalt_security::stream::Stream::Tls(t) = &s {
        let suite = t.get_ref().1.negotiated_cipher_suite().map(|c| c.suite());
        assert_eq!(suite, Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256), "AES-128-GCM is preferred on Basalt links");
    }
    s.write_all(b"hello").await?;
    s.flush().await?;
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).await?;
    assert_eq!(&buf, b"hello");
    Ok(())
}

#[tokio::test]
async fn nodes_and_clients_of_the_cluster_ca_get_in_and_everyone_else_is_refused() {
    let f = fixture();
    let server = Arc::new(TlsContext::load(files(&f.ca, &f.out, Some(&Identity::Node(1)))).unwrap());
    let (addr, mut results) = serve(server).await;

    // A node: mutual TLS, identities on both sides.
    let node2 = Dialer::new(Some(Arc::new(TlsContext::load(files(&f.ca, &f.out, Some(&Identity::Node(2)))).unwrap())));
    echo(&node2, &addr, Expect::Node(1), Protocol::Raft).await.unwrap();
    assert_eq!(results.recv().await.unwrap(), Ok((Protocol::Raft, Some(Identity::Node(2)))));
    echo(&node2, &addr, Expect::AnyNode, Protocol::Grpc).await.unwrap();
    assert_eq!(results.recv().await.unwrap(), Ok((Protocol::Grpc, Some(Identity::Node(2)))));

    // A client without a certificate may speak data and gRPC (tokens authenticate it), not Raft.
    let anon = Dialer::new(Some(Arc::new(TlsContext::load(files(&f.ca, &f.out, None)).unwrap())));
    echo(&anon, &addr, Expect::AnyNode, Protocol::Data).await.unwrap();
    assert_eq!(results.recv().await.unwrap(), Ok((Protocol::Data, None)));
    assert!(echo(&anon, &addr, Expect::AnyNode, Protocol::Raft).await.is_err());
    let e = results.recv().await.unwrap().unwrap_err();
    assert!(e.contains("handshake") || e.contains("node certificates"), "{e}");

    // A client certificate is no node certificate, even for Raft.
    let ops = Dialer::new(Some(Arc::new(TlsContext::load(files(&f.ca, &f.out, Some(&Identity::Client("ops".into())))).unwrap())));
    let _ = echo(&ops, &addr, Expect::Node(1), Protocol::Raft).await;
    let e = results.recv().await.unwrap().unwrap_err();
    assert!(e.contains("node certificates only"), "{e}");

    // Expecting another node than the one answering fails on the client.
    let e = echo(&node2, &addr, Expect::Node(3), Protocol::Grpc).await.unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
    let _ = results.recv().await;

    // A node of another cluster (another CA): refused both ways.
    let stranger = Dialer::new(Some(Arc::new(TlsContext::load(files(&f.other_ca, &f.out, Some(&Identity::Node(9)))).unwrap())));
    let e = echo(&stranger, &addr, Expect::AnyNode, Protocol::Raft).await.unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer") || e.to_string().contains("certificate"), "{e}");
    let _ = results.recv().await;
    // A client trusting our CA but presenting the other CA's certificate: the server refuses it.
    let mixed = TlsFiles { ca: f.ca.join(certs::CA_CERT), cert: Some(f.out.join("node-9.pem")), key: Some(f.out.join("node-9.key")) };
    let mixed = Dialer::new(Some(Arc::new(TlsContext::load(mixed).unwrap())));
    let _ = echo(&mixed, &addr, Expect::AnyNode, Protocol::Data).await;
    let e = results.recv().await.unwrap().unwrap_err();
    assert!(e.contains("UnknownIssuer") || e.contains("invalid peer certificate"), "{e}");

    // Plaintext is refused before any TLS work.
    let mut plain = TcpStream::connect(&addr).await.unwrap();
    plain.write_all(b"BSLTDAT1").await.unwrap();
    let e = results.recv().await.unwrap().unwrap_err();
    assert!(e.contains("plaintext"), "{e}");
    let mut buf = [0u8; 1];
    assert_eq!(plain.read(&mut buf).await.unwrap_or(0), 0, "the server closed the plaintext connection");

    // A protocol the admit callback refuses is refused before the handshake completes.
    assert!(echo(&anon, &addr, Expect::AnyNode, Protocol::Http).await.is_err());
    assert_eq!(results.recv().await.unwrap().unwrap_err(), "metrics are not served on this port");
}

#[tokio::test]
async fn expired_certificates_are_refused_by_name_and_rotation_is_picked_up() {
    let f = fixture();
    let node1 = files(&f.ca, &f.out, Some(&Identity::Node(1)));
    let server = Arc::new(TlsContext::load(node1.clone()).unwrap());
    let (addr, mut results) = serve(server.clone()).await;

    // Loading an expired certificate fails and says so.
    let past = Validity {
        from: time::OffsetDateTime::now_utc() - time::Duration::days(10),
        until: time::OffsetDateTime::now_utc() - time::Duration::days(1),
    };
    let old_dir = f.out.join("old");
    certs::issue(&f.ca, &Identity::Node(2), past, &old_dir, &[]).unwrap();
    let expired = files(&f.ca, &old_dir, Some(&Identity::Node(2)));
    let e = TlsContext::load(expired.clone()).unwrap_err().to_string();
    assert!(e.contains("expired at"), "{e}");

    // A reload that meets an expired replacement keeps the current certificate.
    let before = server.own_certificate().unwrap();
    certs::issue(&f.ca, &Identity::Node(1), past, &f.out, &[]).unwrap();
    let e = server.reload_if_changed().unwrap_err().to_string();
    assert!(e.contains("expired at"), "{e}");
    assert_eq!(server.own_certificate().unwrap(), before);

    // A valid replacement is used for new connections.
    certs::issue(&f.ca, &Identity::Node(1), Validity::days(3), &f.out, &[]).unwrap();
    assert!(server.reload_if_changed().unwrap());
    assert!(!server.reload_if_changed().unwrap(), "nothing changed since");
    let after = server.own_certificate().unwrap();
    assert!(after.not_after < before.not_after, "the 3-day certificate replaced the 5-day one");
    let node2 = Dialer::new(Some(Arc::new(TlsContext::load(files(&f.ca, &f.out, Some(&Identity::Node(2)))).unwrap())));
    echo(&node2, &addr, Expect::Node(1), Protocol::Raft).await.unwrap();
    assert!(results.recv().await.unwrap().is_ok());
}
