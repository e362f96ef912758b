//! TLS client settings every chatgate component uses: the native client
//! (`wss://`), and the gateway towards Postgres (`sslmode=require`) and
//! Redis (`rediss://`). Feature `tls`.
//!
//! One stack for the whole workspace: rustls on *ring* (built with a C
//! compiler alone). Certificates are verified against Mozilla's roots
//! (bundled: the runtime image has no CA store), the system's roots when
//! it has a store (a CA an organisation installed there is trusted as by
//! every other program), and, when given, the operator's own CA (a
//! private PKI, a test CA). Callers read the operator's file.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The extra CA is not PEM, or holds no certificate.
    #[error("CA certificates: {0}")]
    Ca(String),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Settings(String),
}

/// rustls on *ring*: built with the C compiler alone, where aws-lc-rs
/// (rustls' default) also wants cmake and takes far longer to build.
/// rustls 0.23.48 deprecates it for lacking post-quantum key exchange
/// (X25519MLKEM768), which keeps recorded traffic secret from a future
/// quantum computer: today's certificates and key exchange are sound, and
/// the backends usually sit in a private network; moving to aws-lc-rs is
/// one function away when the build may need cmake.
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Client settings trusting Mozilla's roots, the system's, and the
/// certificates in `extra_ca_pem` (PEM, one or more `CERTIFICATE` blocks).
pub fn client_config(extra_ca_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A store that is missing or holds unreadable entries adds what it
    // can: the bundled roots stand either way.
    let system = rustls_native_certs::load_native_certs();
    let _ = roots.add_parsable_certificates(system.certs);
    if let Some(pem) = extra_ca_pem {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| TlsError::Ca(e.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::Ca("no CERTIFICATE block found".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| TlsError::Ca(e.to_string()))?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Settings(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Whether a Redis URL asks for TLS, and the URL with the scheme's plain
/// equivalent (for a parser that is then given TLS settings explicitly).
/// Schemes are matched without regard to case; a scheme that is not a
/// known Redis or Valkey one is refused rather than guessed at (a client
/// library may take an unknown scheme for plain TCP, as it did
/// `redis+tls://`).
pub fn redis_url(url: &str) -> Result<(bool, String), TlsError> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(TlsError::Settings(format!("not a Redis URL: {url:?}")));
    };
    let scheme = scheme.to_ascii_lowercase();
    let (family, kind) = match scheme.split_once(['-', '+']) {
        Some((family, _)) => (family, &scheme[family.len()..]),
        None => (scheme.as_str(), ""),
    };
    let tls = match family {
        "redis" | "valkey" => false,
        "rediss" | "valkeys" => true,
        _ => {
            return Err(TlsError::Settings(format!(
                "unknown Redis URL scheme {scheme:?}"
            )));
        }
    };
    let known = match kind {
        "" | "-cluster" | "-sentinel" => true,
        "+unix" => !tls,
        _ => false,
    };
    if !known {
        return Err(TlsError::Settings(format!(
            "unknown Redis URL scheme {scheme:?}"
        )));
    }
    Ok((tls, format!("redis{kind}://{rest}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_that_ask_for_tls_are_known_whatever_their_case() {
        let tls = redis_url;
        assert_eq!(
            tls("redis://h:1/0").unwrap(),
            (false, "redis://h:1/0".into())
        );
        assert_eq!(tls("REDISS://h:1").unwrap(), (true, "redis://h:1".into()));
        assert_eq!(tls("valkeys://h").unwrap(), (true, "redis://h".into()));
        assert_eq!(
            tls("rediss-cluster://h?node=x:1").unwrap(),
            (true, "redis-cluster://h?node=x:1".into())
        );
        assert_eq!(
            tls(" Rediss-Sentinel://h").unwrap(),
            (true, "redis-sentinel://h".into())
        );
        assert_eq!(
            tls("redis+unix:///s").unwrap(),
            (false, "redis+unix:///s".into())
        );
        for bad in [
            "redis+tls://h",
            "rediss+unix:///s",
            "tls://h",
            "h:6379",
            "redis-tls://h",
        ] {
            assert!(redis_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_ca_that_is_not_pem_is_refused() {
        assert!(client_config(None).is_ok());
        assert!(matches!(
            client_config(Some(b"not a certificate")),
            Err(TlsError::Ca(_))
        ));
        let garbled = b"-----BEGIN CERTIFICATE-----\n%%%%\n-----END CERTIFICATE-----\n";
        assert!(client_config(Some(garbled)).is_err());
    }
}
