//! HMAC-signed tokens (HS256, HS384, HS512) checked in one pass.
//!
//! Owns: the keyed HMAC states (keyed once at start, cloned per token) and
//! the claims check for them. A new connection's token is the largest
//! single part of its set-up's user time (`perf/RESULTS.md`), and
//! `jsonwebtoken::decode` parses the header twice and the claims twice, and
//! keys a fresh HMAC for every token. This path keeps jsonwebtoken for the
//! header (`decode_header`, so the same headers pass; run once per distinct
//! header per thread) and for everything
//! else it does (public keys, minting), decodes the claims once into one
//! struct whose fields have the types jsonwebtoken gives them (its
//! `ClaimsForValidation` and our `Claims` together), and applies its rules
//! in its order: the verdict and the failure text are jsonwebtoken's for
//! every token, which `tests` checks against `jsonwebtoken::decode` over
//! a corpus of valid, tampered and odd tokens.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::Algorithm;
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use sha2::{Sha256, Sha384, Sha512};

use super::StringOrNumber;

/// One secret, keyed for each HMAC algorithm.
pub(super) struct HmacKeys {
    hs256: Hmac<Sha256>,
    hs384: Hmac<Sha384>,
    hs512: Hmac<Sha512>,
}

impl HmacKeys {
    pub(super) fn new(secret: &[u8]) -> Self {
        // HMAC takes a key of any length.
        Self {
            hs256: Hmac::new_from_slice(secret).expect("HMAC accepts any key length"),
            hs384: Hmac::new_from_slice(secret).expect("HMAC accepts any key length"),
            hs512: Hmac::new_from_slice(secret).expect("HMAC accepts any key length"),
        }
    }

    /// Whether `signature` is `alg`'s MAC of `message` (compared in
    /// constant time).
    fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        fn check<M: Mac + Clone>(keyed: &M, message: &[u8], signature: &[u8]) -> bool {
            let mut mac = keyed.clone();
            mac.update(message);
            mac.verify_slice(signature).is_ok()
        }
        match alg {
            Algorithm::HS256 => check(&self.hs256, message, signature),
            Algorithm::HS384 => check(&self.hs384, message, signature),
            Algorithm::HS512 => check(&self.hs512, message, signature),
            _ => false,
        }
    }
}

/// What the claims must satisfy besides the signature: jsonwebtoken's
/// `Validation` as `LocalJwt` sets it up.
pub(super) struct Rules {
    pub algorithms: Vec<Algorithm>,
    pub leeway: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Why a token failed, as jsonwebtoken's error kinds read in `describe`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Failure {
    Invalid,
    Algorithm,
    Signature,
    Expired,
    Immature,
    Issuer,
    Audience,
    MissingClaim,
}

impl Failure {
    pub(super) fn text(self) -> &'static str {
        match self {
            Failure::Expired => "Token expired",
            Failure::Immature => "Token not yet valid",
            Failure::Issuer => "Invalid token issuer",
            Failure::Audience => "Invalid token audience",
            Failure::Algorithm => "Invalid token algorithm",
            Failure::Signature => "Invalid token signature",
            Failure::MissingClaim => "Token is missing a required claim",
            Failure::Invalid => "Invalid token",
        }
    }
}

/// Checks `token` as `jsonwebtoken::decode` with `rules` would, at `now`
/// (seconds since the epoch).
pub(super) fn verify(keys: &HmacKeys, rules: &Rules, token: &str, now: u64) -> Result<super::Claims, Failure> {
    // Split as jsonwebtoken does: the signature after the last dot, the
    // claims after the one before, the header before that (a token with
    // fewer dots fails decode_header, as Invalid, too).
    let (message, signature) = token.rsplit_once('.').ok_or(Failure::Invalid)?;
    let (header, claims) = message.rsplit_once('.').ok_or(Failure::Invalid)?;
    let alg = header_alg(token, header)?;
    if !rules.algorithms.contains(&alg) {
        return Err(Failure::Algorithm);
    }
    let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| Failure::Invalid)?;
    if !keys.verify(alg, message.as_bytes(), &signature) {
        return Err(Failure::Signature);
    }
    let json = URL_SAFE_NO_PAD.decode(claims).map_err(|_| Failure::Invalid)?;
    // serde would read the struct from a JSON array too, filling the
    // defaulted fields; jsonwebtoken's two structs (4 and 5 fields) never
    // both fit one array, so it refuses every array: so do we.
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(Failure::Invalid);
    }
    let c: Claims = serde_json::from_slice(&json).map_err(|_| Failure::Invalid)?;
    // jsonwebtoken's `validate`, in its order, for `exp` required (always),
    // `iss` and `aud` required when configured, `nbf` checked.
    if rules.issuer.is_some() && !matches!(c.iss, TryParse::Parsed(_)) {
        return Err(Failure::MissingClaim);
    }
    if rules.audience.is_some() && !matches!(c.aud, TryParse::Parsed(_)) {
        return Err(Failure::MissingClaim);
    }
    if matches!(c.nbf, TryParse::FailedToParse) {
        return Err(Failure::Invalid); // jsonwebtoken's InvalidClaimFormat
    }
    if c.exp < now.saturating_sub(rules.leeway) {
        return Err(Failure::Expired);
    }
    if matches!(c.nbf, TryParse::Parsed(nbf) if nbf > now + rules.leeway) {
        return Err(Failure::Immature);
    }
    if let (TryParse::Parsed(iss), Some(want)) = (&c.iss, &rules.issuer) {
        if !iss.has(want) {
            return Err(Failure::Issuer);
        }
    }
    if let Some(want) = &rules.audience {
        if let TryParse::Parsed(aud) = &c.aud {
            if !aud.has(want) {
                return Err(Failure::Audience);
            }
        }
    }
    Ok(super::Claims { sub: c.sub, user_id: c.user_id, email: c.email, exp: c.exp })
}

/// Header segments longer than this are decoded every time, not kept.
const MAX_KEPT_HEADER: usize = 256;

thread_local! {
    /// The last header segment this thread decoded, and its algorithm. An
    /// issuer's tokens share one header, so most tokens skip
    /// `decode_header`'s JSON parse (1% of a connect storm's CPU): the
    /// same bytes always decode to the same header. One entry per thread,
    /// at most `MAX_KEPT_HEADER` bytes.
    static LAST_HEADER: std::cell::RefCell<Option<(String, Algorithm)>> = const { std::cell::RefCell::new(None) };
}

/// The token's `alg`, as `jsonwebtoken::decode_header` reads it from
/// `segment`, the token's header (what comes before its last two dots).
fn header_alg(token: &str, segment: &str) -> Result<Algorithm, Failure> {
    LAST_HEADER.with_borrow_mut(|last| {
        if let Some((kept, alg)) = last {
            if kept == segment {
                return Ok(*alg);
            }
        }
        let alg = jsonwebtoken::decode_header(token).map_err(|_| Failure::Invalid)?.alg;
        if segment.len() <= MAX_KEPT_HEADER {
            let (kept, kept_alg) = last.get_or_insert_with(|| (String::new(), alg));
            kept.clear();
            kept.push_str(segment);
            *kept_alg = alg;
        }
        Ok(alg)
    })
}

/// Every claim either check reads, each with the type it has there:
/// `sub`, `userId`, `email` and `exp` as `LocalJwt`'s `Claims` (a token
/// they do not fit is invalid; the same fields, kept here rather than
/// flattened in, since `#[serde(flatten)]` reads differently: duplicates,
/// arrays), `nbf`, `iss` and `aud` as jsonwebtoken's
/// `ClaimsForValidation` (a claim of the wrong type is "not parsed", not
/// an error).
#[derive(Deserialize)]
struct Claims<'a> {
    #[serde(default)]
    sub: Option<StringOrNumber>,
    #[serde(default, rename = "userId")]
    user_id: Option<StringOrNumber>,
    #[serde(default)]
    email: Option<String>,
    exp: u64,
    #[serde(deserialize_with = "numeric_type", default)]
    nbf: TryParse<u64>,
    #[serde(borrow, default)]
    iss: TryParse<OneOrMany<'a>>,
    #[serde(borrow, default)]
    aud: TryParse<OneOrMany<'a>>,
}

/// A claim that may be absent or of another type (jsonwebtoken's).
#[derive(Default)]
enum TryParse<T> {
    Parsed(T),
    FailedToParse,
    #[default]
    NotPresent,
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for TryParse<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(deserializer) {
            Ok(Some(value)) => TryParse::Parsed(value),
            Ok(None) => TryParse::NotPresent,
            Err(_) => TryParse::FailedToParse,
        })
    }
}

/// `iss` or `aud`: one string or a set of them (jsonwebtoken's `Issuer`
/// and `Audience`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<'a> {
    One(#[serde(borrow)] Cow<'a, str>),
    Many(Vec<Borrowed<'a>>),
}

/// A string borrowed from the claims when it has no escapes.
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

impl OneOrMany<'_> {
    /// Whether it names `want` (for a set: has it among its members).
    fn has(&self, want: &str) -> bool {
        match self {
            OneOrMany::One(one) => one == want,
            OneOrMany::Many(many) => many.iter().any(|m| m.0 == want),
        }
    }
}

/// A number that can be read as a `u64` (a float is rounded), as
/// jsonwebtoken reads `nbf`.
fn numeric_type<'de, D: Deserializer<'de>>(deserializer: D) -> Result<TryParse<u64>, D::Error> {
    struct NumericType(PhantomData<fn() -> TryParse<u64>>);

    impl Visitor<'_> for NumericType {
        type Value = TryParse<u64>;

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("A NumericType that can be reasonably coerced into a u64")
        }

        fn visit_u64<E: de::Error>(self, value: u64) -> Result<Self::Value, E> {
            Ok(TryParse::Parsed(value))
        }

        fn visit_f64<E: de::Error>(self, value: f64) -> Result<Self::Value, E> {
            if value.is_finite() && value >= 0.0 && value < (u64::MAX as f64) {
                Ok(TryParse::Parsed(value.round() as u64))
            } else {
                Err(de::Error::custom("NumericType must be representable as a u64"))
            }
        }
    }

    match deserializer.deserialize_any(NumericType(PhantomData)) {
        Ok(ok) => Ok(ok),
        Err(_) => Ok(TryParse::FailedToParse),
    }
}
