//! PROTOCOL.md §4.3 local verification with public keys: RS256 and ES256
//! accepted with their key, and the classic attacks refused over a real
//! connection: `alg: none`, HS256 signed with the public key (key
//! confusion), wrong iss/aud, expired, not yet valid.

mod common;

use common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn attempt(srv: &TestServer, token: &str) -> Value {
    let mut ws = connect(srv.addr);
    recv(&mut ws);
    send(&mut ws, json!({"type":"authenticate","data":{"token": token}}));
    let reply = recv(&mut ws);
    if reply["type"] == "auth_failed" {
        assert_eq!(expect_close(&mut ws), 4001);
    }
    reply
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"sub": "keyed-user", "exp": now_secs() + 600, "iss": "moonx-auth", "aud": "moonx-ws"});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

#[test]
fn rs256_with_public_key_and_the_attacks_on_it() {
    let srv = TestServer::start(&[
        ("JWT_SECRET", ""),
        ("JWT_PUBLIC_KEY", &fixture("rsa_public.pem")),
        ("JWT_ISSUER", "moonx-auth"),
        ("JWT_AUDIENCE", "moonx-ws"),
    ]);
    let private = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let sign = |c: Value| encode(&Header::new(Algorithm::RS256), &c, &private).unwrap();

    let ok = attempt(&srv, &sign(claims(json!({}))));
    assert_eq!(ok["type"], "auth_success", "{ok}");
    assert_eq!(ok["data"]["user"]["id"], "keyed-user");

    let public_pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    let confused =
        encode(&Header::new(Algorithm::HS256), &claims(json!({})), &EncodingKey::from_secret(&public_pem)).unwrap();
    assert_eq!(attempt(&srv, &confused)["type"], "auth_failed", "HS256 signed with the RSA public key");

    // {"alg":"none"} with valid-looking claims and no signature.
    let header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let body = {
        use std::fmt::Write;
        let raw = claims(json!({})).to_string();
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut s = String::new();
        for chunk in raw.as_bytes().chunks(3) {
            let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..=chunk.len() {
                let _ = write!(s, "{}", table[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        s
    };
    assert_eq!(attempt(&srv, &format!("{header}.{body}."))["type"], "auth_failed", "alg none");

    for (bad, why) in [
        (json!({"iss": "someone-else"}), "Invalid token issuer"),
        (json!({"aud": "another-service"}), "Invalid token audience"),
        (json!({"exp": now_secs() - 3600}), "Token expired"),
        (json!({"nbf": now_secs() + 3600}), "Token not yet valid"),
    ] {
        let reply = attempt(&srv, &sign(claims(bad.clone())));
        assert_eq!(reply["type"], "auth_failed", "{bad}");
        assert_eq!(reply["data"]["error"], why, "{bad}");
    }
    let no_iss = sign(json!({"sub": "u", "exp": now_secs() + 600, "aud": "moonx-ws"}));
    assert_eq!(attempt(&srv, &no_iss)["type"], "auth_failed", "iss required when configured");
}

#[test]
fn es256_with_public_key() {
    let srv = TestServer::start(&[("JWT_SECRET", ""), ("JWT_PUBLIC_KEY", &fixture("ec_public.pem"))]);
    let private = EncodingKey::from_ec_pem(&std::fs::read(fixture("ec_private.pem")).unwrap()).unwrap();
    let token =
        encode(&Header::new(Algorithm::ES256), &json!({"sub": "ec-user", "exp": now_secs() + 600}), &private).unwrap();
    let ok = attempt(&srv, &token);
    assert_eq!(ok["type"], "auth_success", "{ok}");
    assert_eq!(ok["data"]["user"]["id"], "ec-user");
    let rsa = EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    let wrong_family =
        encode(&Header::new(Algorithm::RS256), &json!({"sub": "x", "exp": now_secs() + 600}), &rsa).unwrap();
    assert_eq!(attempt(&srv, &wrong_family)["type"], "auth_failed", "only the configured key's algorithm");
}
