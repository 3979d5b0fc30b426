//! Token verification (PROTOCOL.md §4.3).
//!
//! Owns: choosing the verifier from the config (a local key first, the
//! remote Auth Service otherwise, a generated dev secret when neither is
//! set), verifying JWTs locally with jsonwebtoken, and minting the dev token.
//! The remote path lives in `remote.rs`; HMAC-signed tokens take the
//! one-pass check in `hs.rs`, which gives jsonwebtoken's verdicts. Nothing here touches a socket of a
//! client; results are [`Identity`] or an [`AuthFailure`] text.

mod hs;
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
    /// For a shared secret: the keyed HMACs and the same rules, for the
    /// one-pass check (`hs.rs`).
    hmac: Option<(hs::HmacKeys, hs::Rules)>,
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
        let algorithms = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        let rules = hs::Rules {
            algorithms: algorithms.to_vec(),
            leeway: cfg.jwt_leeway_seconds.as_secs(),
            issuer: cfg.jwt_issuer.clone(),
            audience: cfg.jwt_audience.clone(),
        };
        Self { hmac: Some((hs::HmacKeys::new(secret), rules)), ..Self::with(key, &algorithms, cfg) }
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
        Self { key, validation: v, hmac: None }
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthFailure> {
        let Some((keys, rules)) = &self.hmac else {
            return self.verify_generic(token);
        };
        identity(hs::verify(keys, rules, token, unix_secs()).map_err(|f| AuthFailure(f.text().into()))?)
    }

    /// Through `jsonwebtoken::decode` (public keys; and the reference the
    /// one-pass HMAC check is tested against).
    fn verify_generic(&self, token: &str) -> Result<Identity, AuthFailure> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthFailure(describe(e.kind()).into()))?;
        identity(data.claims)
    }

    fn mint_hs256(&self, secret: &[u8], user: &str, email: Option<&str>, ttl_secs: u64) -> String {
        let exp = unix_secs() + ttl_secs;
        let claims = serde_json::json!({ "sub": user, "email": email, "exp": exp, "iat": unix_secs() });
        // HS256 over a JSON object with a byte secret cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
            .expect("sign dev token")
    }
}

/// Who a verified token names: `sub`, else `userId`.
fn identity(c: Claims) -> Result<Identity, AuthFailure> {
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

    /// A token with exactly these header and claims bytes, signed with
    /// `secret` by jsonwebtoken (or with the signature given).
    fn raw_token(header: &str, claims: &str, secret: &[u8], alg: Algorithm, signature: Option<&str>) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let message = format!("{}.{}", b64.encode(header), b64.encode(claims));
        let sig = match signature {
            Some(s) => s.to_string(),
            None => jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(secret), alg).unwrap(),
        };
        format!("{message}.{sig}")
    }

    /// The one-pass HMAC check gives jsonwebtoken's verdict, failure text
    /// included, for every token of a corpus: valid, expired and early,
    /// claims of every wrong type, duplicated claims, issuers and audiences
    /// of every shape, tampered and malformed tokens, other algorithms.
    #[test]
    fn the_one_pass_hmac_check_agrees_with_jsonwebtoken() {
        let now = unix_secs();
        let (exp, past, skew, future) = (now + 600, now - 600, now - 5, now + 600);
        let mut claims: Vec<String> = vec![
            format!(r#"{{"sub":"u1","exp":{exp}}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"email":"a@b.c","iss":"moonx","aud":"ws"}}"#),
            format!(r#"{{"userId":42,"exp":{exp}}}"#),
            format!(r#"{{"sub":7,"exp":{exp}}}"#),
            format!(r#"{{"sub":"","exp":{exp}}}"#),
            format!(r#"{{"sub":"","userId":"u2","exp":{exp}}}"#),
            format!(r#"{{"sub":null,"exp":{exp}}}"#),
            format!(r#"{{"sub":{{"a":1}},"exp":{exp}}}"#),
            format!(r#"{{"sub":["u"],"exp":{exp}}}"#),
            format!(r#"{{"sub":true,"exp":{exp}}}"#),
            format!(r#"{{"sub":"u\u0031","exp":{exp}}}"#),
            r#"{"sub":"u1"}"#.into(),
            r#"{"sub":"u1","exp":"soon"}"#.into(),
            format!(r#"{{"sub":"u1","exp":{exp}.5}}"#),
            r#"{"sub":"u1","exp":-1}"#.into(),
            r#"{"sub":"u1","exp":null}"#.into(),
            format!(r#"{{"sub":"u1","exp":{past}}}"#),
            format!(r#"{{"sub":"u1","exp":{skew}}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"email":5}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"email":null}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"exp":{exp}}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"email":"a","email":"b"}}"#),
            format!(r#"{{"sub":"u1","exp":{exp},"other":{{"deep":[1,{{"x":null}}]}}}}"#),
            format!(r#"{{"sub":"u1","exp":{exp}}} trailing"#),
            format!(r#"[{{"sub":"u1","exp":{exp}}}]"#),
            format!(r#"["u1",null,null,{exp}]"#),
            format!(r#"["u1",null,null,{exp},null]"#),
            format!(r#"[{exp},null,"u1",null,null]"#),
            format!(r#" {{"sub":"u1","exp":{exp}}}"#),
            "not json".into(),
            "".into(),
        ];
        let nbfs = [
            format!("{future}"),
            format!("{}", now + 5),
            format!("{}", now - 60),
            format!("{}.4", now - 60),
            format!("{future}.0"),
            "-3".into(),
            "\"later\"".into(),
            "[1]".into(),
            "{\"a\":1}".into(),
            "null".into(),
            "true".into(),
            "1e400".into(),
        ];
        for nbf in &nbfs {
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"nbf":{nbf}}}"#));
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"nbf":{nbf},"nbf":{nbf}}}"#));
        }
        let shapes = [
            "\"moonx\"",
            "\"ws\"",
            "\"other\"",
            "[\"moonx\",\"x\"]",
            "[\"ws\"]",
            "[\"x\"]",
            "[]",
            "5",
            "null",
            "[5]",
            "{\"a\":1}",
            "\"mo\\u006fnx\"",
            "[\"w\\u0073\"]",
        ];
        for shape in shapes {
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"iss":{shape},"aud":"ws"}}"#));
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"iss":"moonx","aud":{shape}}}"#));
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"iss":{shape}}}"#));
            claims.push(format!(r#"{{"sub":"u1","exp":{exp},"aud":{shape}}}"#));
        }
        let headers = [
            (r#"{"alg":"HS256","typ":"JWT"}"#, Algorithm::HS256),
            (r#"{"alg":"HS384"}"#, Algorithm::HS384),
            (r#"{"alg":"HS512","typ":"JWT","kid":"k1"}"#, Algorithm::HS512),
            (r#"{"alg":"HS256","kid":5}"#, Algorithm::HS256),
            (r#"{"typ":"JWT"}"#, Algorithm::HS256),
            (r#"{"alg":"none"}"#, Algorithm::HS256),
            (r#"{"alg":"RS256"}"#, Algorithm::HS256),
            (r#"{"alg":"hs256"}"#, Algorithm::HS256),
            ("not json", Algorithm::HS256),
        ];
        let configs = [
            cfg(&[("JWT_SECRET", "s3cret")]),
            cfg(&[("JWT_SECRET", "s3cret"), ("JWT_ISSUER", "moonx"), ("JWT_AUDIENCE", "ws")]),
            cfg(&[("JWT_SECRET", "s3cret"), ("JWT_LEEWAY_SECONDS", "0")]),
        ];
        let mut checked = 0;
        let mut outcomes = std::collections::BTreeSet::new();
        for c in &configs {
            let Auth::Local(jwt) = Auth::from_config(c).unwrap().0 else { panic!() };
            assert!(jwt.hmac.is_some(), "a shared secret takes the one-pass check");
            let mut tokens = Vec::new();
            for (header, alg) in headers {
                for claim in &claims {
                    tokens.push(raw_token(header, claim, b"s3cret", alg, None));
                }
            }
            let good = format!(r#"{{"sub":"u1","exp":{exp}}}"#);
            let signed = raw_token(r#"{"alg":"HS256"}"#, &good, b"s3cret", Algorithm::HS256, None);
            let sig = signed.rsplit_once('.').unwrap().1;
            let flipped: String = sig
                .chars()
                .enumerate()
                .map(|(i, ch)| {
                    if i == 3 {
                        if ch == 'A' {
                            'B'
                        } else {
                            'A'
                        }
                    } else {
                        ch
                    }
                })
                .collect();
            tokens.extend([
                raw_token(r#"{"alg":"HS256"}"#, &good, b"other", Algorithm::HS256, None),
                raw_token(r#"{"alg":"HS256"}"#, &good, b"", Algorithm::HS256, Some(&flipped)),
                raw_token(r#"{"alg":"HS256"}"#, &good, b"", Algorithm::HS256, Some("!!!")),
                raw_token(r#"{"alg":"HS256"}"#, &good, b"", Algorithm::HS256, Some("")),
                raw_token(r#"{"alg":"HS256"}"#, &good, b"", Algorithm::HS256, Some(&format!("{sig}="))),
                raw_token(r#"{"alg":"HS256"}"#, &good, b"s3cret", Algorithm::HS384, None),
                format!("x.{signed}"),
                signed.replacen('.', "..", 1),
                signed.rsplit_once('.').unwrap().0.to_string(),
                "a.b".into(),
                "abc".into(),
                "".into(),
                "..".into(),
                format!("{signed} "),
                signed.clone(),
            ]);
            for t in &tokens {
                let fast = jwt.verify(t);
                let reference = jwt.verify_generic(t);
                assert_eq!(fast, reference, "token {t}");
                outcomes.insert(match &fast {
                    Ok(_) => "ok".to_string(),
                    Err(e) => e.0.clone(),
                });
                checked += 1;
            }
        }
        assert!(checked > 2000, "{checked}");
        // The corpus reaches every verdict there is.
        for text in [
            "ok",
            "Invalid token",
            "Invalid token algorithm",
            "Invalid token signature",
            "Token expired",
            "Token not yet valid",
            "Invalid token issuer",
            "Invalid token audience",
            "Token is missing a required claim",
            "Token has no subject",
        ] {
            assert!(outcomes.contains(text), "no token got {text:?}: {outcomes:?}");
        }
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
