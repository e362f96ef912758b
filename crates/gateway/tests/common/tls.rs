//! A throwaway certificate authority and a TLS-terminating proxy, for
//! the tests of TLS towards clients, Postgres and Redis.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// A CA and one server certificate it signed for `127.0.0.1` (the
/// `openssl` command line makes them; nothing here is secret).
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA's certificate (what clients are told to trust).
    pub ca: PathBuf,
    /// The server's certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    pub fn new() -> TestCa {
        let dir = super::private_dir("tls");
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&dir)
                .output()
                .expect("openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        let mut ca = vec![
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            "/CN=chatgate test CA",
        ];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        run(&ca);
        let mut server = vec!["req", "-x509", "-days", "2", "-subj", "/CN=127.0.0.1"];
        server.extend(ec);
        server.extend([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            // A leaf, not another CA (verifiers refuse a CA as the server).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-keyout",
            "server.key",
            "-out",
            "server.pem",
        ]);
        run(&server);
        TestCa {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        }
    }

    /// The CA's certificate as client settings.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let pem = std::fs::read(&self.ca).unwrap();
        chatgate_protocol::tls::client_config(Some(&pem)).unwrap()
    }

    fn server_config(&self) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(&self.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(&self.key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            chatgate_protocol::tls::provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Arc::new(config)
    }

    /// A TLS-terminating proxy on an ephemeral loopback port in front of
    /// `upstream`, as nginx's `listen 443 ssl` is; returns its address.
    /// It lives as long as the test's runtime.
    pub async fn terminate_in_front_of(
        &self,
        upstream: std::net::SocketAddr,
    ) -> std::net::SocketAddr {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(socket).await else {
                        return;
                    };
                    let Ok(mut plain) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        addr
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
