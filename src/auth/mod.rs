//! Token verification (PROTOCOL.md §4.3).
//!
//! Owns: choosing the verifier from the config (a local key first, the
//! remote Auth Service otherwise, a generated dev secret when neither is
//! set), verifying JWTs locally with jsonwebtoken, and minting the dev token.
//! The remote path lives in `remote.rs`. Nothing here touches a socket of a
//! client; results are [`Identity`] or an [`AuthFailure`] text.

mod remote;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_channel::oneshot;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;

use crate::config::Config;
pub use crate::protocol::session::{AuthFailure, Identity};
pub use remote::RemoteAuth;

/// Why the auth configuration cannot be used (start-up error).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("JWT_PUBLIC_KEY: {0}")]
    PublicKey(String),
    #[error("AUTH_SERVICE_URL: {0}")]
    AuthServiceUrl(String),
}

/// The outcome of starting a verification.
pub enum Verification {
    Done(Result<Identity, AuthFailure>),
    /// The remote service was asked; the answer arrives on this channel.
    Pending(oneshot::Receiver<Result<Identity, AuthFailure>>),
}

/// The configured verifier, shared by every shard.
pub enum Auth {
    Local(Box<LocalJwt>),
    Remote(RemoteAuth),
}

/// A freshly generated development secret and a token signed with it.
pub struct DevToken {
    pub token: String,
    pub user_id: String,
}

impl Auth {
    /// Builds the verifier the config asks for. With no key and no Auth
    /// Service it generates a random secret and returns a dev token for it.
    pub fn from_config(cfg: &Config) -> Result<(Auth, Option<DevToken>), ConfigError> {
        if let Some(secret) = &cfg.jwt_secret {
            return Ok((Auth::Local(Box::new(LocalJwt::hmac(secret.as_bytes(), cfg))), None));
        }
        if let Some(key) = &cfg.jwt_public_key {
            return Ok((Auth::Local(Box::new(LocalJwt::public_key(key, cfg)?)), None));
        }
        if let Some(url) = &cfg.auth_service_url {
            return Ok((Auth::Remote(RemoteAuth::start(url, cfg)?), None));
        }
        let secret: [u8; 32] = rand::random();
        let jwt = LocalJwt::hmac(&secret, cfg);
        let token = jwt.mint_hs256(&secret, "demo", Some("demo@moonx.local"), 24 * 3600);
        let dev = DevToken { token, user_id: "demo".into() };
        Ok((Auth::Local(Box::new(jwt)), Some(dev)))
    }

    pub fn verify(&self, token: &str) -> Verification {
        match self {
            Auth::Local(jwt) => Verification::Done(jwt.verify(token)),
            Auth::Remote(remote) => remote.verify(token),
        }
    }

    /// Whether the remote service answered its last request (true when local).
    pub fn is_reachable(&self) -> bool {
        match self {
            Auth::Local(_) => true,
            Auth::Remote(r) => r.is_reachable(),
        }
    }
}

/// Local JWT verification with one key and the algorithms of its family.
pub struct LocalJwt {
    key: DecodingKey,
    validation: Validation,
}

/// Claims this service reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<StringOrNumber>,
    #[serde(default, rename = "userId")]
    user_id: Option<StringOrNumber>,
    #[serde(default)]
    email: Option<String>,
    exp: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum StringOrNumber {
    String(String),
    Number(serde_json::Number),
}

impl StringOrNumber {
    pub(crate) fn into_string(self) -> String {
        match self {
            StringOrNumber::String(s) => s,
            StringOrNumber::Number(n) => n.to_string(),
        }
    }
}

impl LocalJwt {
    fn hmac(secret: &[u8], cfg: &Config) -> Self {
        let key = DecodingKey::from_secret(secret);
        Self::with(key, &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512], cfg)
    }

    fn public_key(value: &str, cfg: &Config) -> Result<Self, ConfigError> {
        let pem = if value.contains("-----BEGIN") {
            value.replace("\\n", "\n").into_bytes()
        } else {
            std::fs::read(value).map_err(|e| ConfigError::PublicKey(format!("cannot read {value}: {e}")))?
        };
        if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
            return Ok(Self::with(key, &[Algorithm::RS256], cfg));
        }
        if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
            return Ok(Self::with(key, &[Algorithm::ES256], cfg));
        }
        Err(ConfigError::PublicKey("not an RSA or EC (P-256) public key in PEM".into()))
    }

    fn with(key: DecodingKey, algorithms: &[Algorithm], cfg: &Config) -> Self {
        let mut v = Validation::new(algorithms[0]);
        v.algorithms = algorithms.to_vec();
        v.leeway = cfg.jwt_leeway_seconds.as_secs();
        v.validate_nbf = true;
        let mut required: HashSet<String> = ["exp".to_string()].into();
        if let Some(iss) = &cfg.jwt_issuer {
            v.set_issuer(&[iss]);
            required.insert("iss".into());
        }
        match &cfg.jwt_audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        v.required_spec_claims = required;
        Self { key, validation: v }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthFailure(describe(e.kind()).into()))?;
        let c = data.claims;
        let user = c
            .sub
            .or(c.user_id)
            .map(StringOrNumber::into_string)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| AuthFailure("Token has no subject".into()))?;
        Ok(Identity {
            user_id: Arc::from(user),
            email: c.email.map(Arc::from),
            expires_at_ms: Some(c.exp.saturating_mul(1000)),
        })
    }

    fn mint_hs256(&self, secret: &[u8], user: &str, email: Option<&str>, ttl_secs: u64) -> String {
        let exp = unix_secs() + ttl_secs;
        let claims = serde_json::json!({ "sub": user, "email": email, "exp": exp, "iat": unix_secs() });
        // HS256 over a JSON object with a byte secret cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
            .expect("sign dev token")
    }
}

fn describe(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "Token expired",
        ErrorKind::ImmatureSignature => "Token not yet valid",
        ErrorKind::InvalidIssuer => "Invalid token issuer",
        ErrorKind::InvalidAudience => "Invalid token audience",
        ErrorKind::InvalidAlgorithm => "Invalid token algorithm",
        ErrorKind::InvalidSignature => "Invalid token signature",
        ErrorKind::MissingRequiredClaim(_) => "Token is missing a required claim",
        _ => "Invalid token",
    }
}

pub(crate) fn unix_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(env: &[(&str, &str)]) -> Config {
        let env: std::collections::HashMap<_, _> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_sources(["moonx-ws"], |k| env.get(k).cloned()).unwrap()
    }

    fn sign(alg: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn hmac_family_and_claims() {
        let c = cfg(&[("JWT_SECRET", "s3cret")]);
        let (auth, dev) = Auth::from_config(&c).unwrap();
        assert!(dev.is_none());
        let Auth::Local(jwt) = auth else { panic!() };
        let exp = unix_secs() + 60;
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let t = sign(alg, b"s3cret", serde_json::json!({"sub": "u1", "exp": exp}));
            assert_eq!(&*jwt.verify(&t).unwrap().user_id, "u1");
        }
        let t = sign(Algorithm::HS256, b"s3cret", serde_json::json!({"userId": 42, "exp": exp}));
        assert_eq!(&*jwt.verify(&t).unwrap().user_id, "42");
        let no_exp = sign(Algorithm::HS256, b"s3cret", serde_json::json!({"sub": "u1"}));
        assert!(jwt.verify(&no_exp).is_err());
        let wrong = sign(Algorithm::HS256, b"other", serde_json::json!({"sub": "u1", "exp": exp}));
        assert_eq!(jwt.verify(&wrong).unwrap_err().0, "Invalid token signature");
        let old = sign(Algorithm::HS256, b"s3cret", serde_json::json!({"sub": "u1", "exp": unix_secs() - 31}));
        assert_eq!(jwt.verify(&old).unwrap_err().0, "Token expired");
        let skewed = sign(Algorithm::HS256, b"s3cret", serde_json::json!({"sub": "u1", "exp": unix_secs() - 5}));
        assert!(jwt.verify(&skewed).is_ok(), "within leeway");
    }

    #[test]
    fn alg_none_is_rejected() {
        let c = cfg(&[("JWT_SECRET", "s3cret")]);
        let Auth::Local(jwt) = Auth::from_config(&c).unwrap().0 else { panic!() };
        // {"alg":"none","typ":"JWT"} . {"sub":"u1","exp":9999999999} . (empty)
        let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJ1MSIsImV4cCI6OTk5OTk5OTk5OX0.";
        assert!(jwt.verify(none).is_err());
    }

    #[test]
    fn issuer_and_audience_are_required_when_configured() {
        let c = cfg(&[("JWT_SECRET", "k"), ("JWT_ISSUER", "moonx"), ("JWT_AUDIENCE", "ws")]);
        let Auth::Local(jwt) = Auth::from_config(&c).unwrap().0 else { panic!() };
        let exp = unix_secs() + 60;
        let good = sign(Algorithm::HS256, b"k", serde_json::json!({"sub":"u","exp":exp,"iss":"moonx","aud":"ws"}));
        assert!(jwt.verify(&good).is_ok());
        let missing = sign(Algorithm::HS256, b"k", serde_json::json!({"sub":"u","exp":exp,"aud":"ws"}));
        assert!(jwt.verify(&missing).is_err());
        let wrong = sign(Algorithm::HS256, b"k", serde_json::json!({"sub":"u","exp":exp,"iss":"x","aud":"ws"}));
        assert_eq!(jwt.verify(&wrong).unwrap_err().0, "Invalid token issuer");
    }

    #[test]
    fn embedded_mode_mints_a_working_dev_token() {
        let (auth, dev) = Auth::from_config(&cfg(&[])).unwrap();
        let dev = dev.expect("dev token");
        let Auth::Local(jwt) = auth else { panic!() };
        assert_eq!(&*jwt.verify(&dev.token).unwrap().user_id, "demo");
    }
}
