//! The byte stream under a connection: plain TCP, or TLS (wss://) when
//! `TLS_CERT_FILE` and `TLS_KEY_FILE` are set.
//!
//! Owns: loading the certificate chain and key into a rustls server config
//! (ring provider), swapping it on SIGHUP without touching open connections
//! (each keeps the config it was accepted with), and [`Stream`], which the
//! HTTP phase and the WebSocket driver read and write without caring which
//! kind it is. TLS connections are never written directly by the fan-out
//! (their bytes must be encrypted per connection): `sys::DirectSocket`
//! exists only for plain ones.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_lite::io::{AsyncRead, AsyncWrite};
use futures_rustls::TlsAcceptor;
use glommio::net::TcpStream;
use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;

/// Why TLS could not be configured (start-up or reload error).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS_CERT_FILE {0}: {1}")]
    Cert(String, String),
    #[error("TLS_KEY_FILE {0}: {1}")]
    Key(String, String),
    #[error("TLS_CERT_FILE and TLS_KEY_FILE must be set together")]
    Half,
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The TLS settings in force; replaced as a whole on reload.
pub struct Tls {
    cert_file: String,
    key_file: String,
    config: RwLock<Arc<ServerConfig>>,
}

impl Tls {
    /// `None` when TLS is not configured.
    pub fn from_files(cert: Option<&str>, key: Option<&str>) -> Result<Option<Arc<Tls>>, TlsError> {
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(c), Some(k)) => {
                let config = load(c, k)?;
                Ok(Some(Arc::new(Tls { cert_file: c.into(), key_file: k.into(), config: RwLock::new(config) })))
            }
            _ => Err(TlsError::Half),
        }
    }

    /// Re-reads the files; new connections use them, open ones keep theirs.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = load(&self.cert_file, &self.key_file)?;
        *self.config.write() = config;
        Ok(())
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().clone())
    }
}

fn load(cert_file: &str, key_file: &str) -> Result<Arc<ServerConfig>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .map_err(|e| TlsError::Cert(cert_file.into(), e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Cert(cert_file.into(), e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Cert(cert_file.into(), "no certificate found".into()));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| TlsError::Key(key_file.into(), e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection's stream, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_close(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_close(cx),
        }
    }
}
