//! Kafka value validation (PROTOCOL.md §6), sans-IO.
//!
//! Owns: deciding whether a Kafka value may become an update's `data` — a
//! JSON object with the routing fields of its topic — and extracting the
//! route. Parsing uses simd-json's tape over a reused, padded copy of the
//! value (simd-json unescapes in place, and the original bytes must stay
//! verbatim), with reused buffers: no allocation per message except the
//! user id of a private route.

use simd_json::prelude::*;
use simd_json::{Buffers, Tape};

use crate::protocol::channel::{normalize_token, whole_chain, Market};
use crate::protocol::message::Channel;
use crate::shard::inbox::Route;

/// Why a value was skipped; each is a label of
/// `moonx_ws_kafka_messages_invalid_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    Empty,
    NotJson,
    NotObject,
    MissingRouting,
}

impl Invalid {
    pub const ALL: [Invalid; 4] = [Invalid::Empty, Invalid::NotJson, Invalid::NotObject, Invalid::MissingRouting];

    pub fn as_str(self) -> &'static str {
        match self {
            Invalid::Empty => "empty",
            Invalid::NotJson => "not_json",
            Invalid::NotObject => "not_object",
            Invalid::MissingRouting => "missing_routing_fields",
        }
    }
}

/// Reusable validation state (one per consumer thread).
pub struct Validator {
    scratch: Vec<u8>,
    buffers: Buffers,
    tape: Option<Tape<'static>>,
}

impl Default for Validator {
    fn default() -> Self {
        Self { scratch: Vec::with_capacity(4096), buffers: Buffers::new(4096), tape: Some(Tape::null()) }
    }
}

impl Validator {
    /// Checks `value` for `channel`'s topic and returns where it goes.
    pub fn route(&mut self, channel: Channel, value: &[u8]) -> Result<Route, Invalid> {
        if value.iter().all(u8::is_ascii_whitespace) {
            return Err(Invalid::Empty);
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(value);
        self.scratch.resize(value.len() + simd_json::INPUT_PADDING, 0);
        let mut tape = self.tape.take().unwrap_or_else(Tape::null).reset();
        let result = match simd_json::fill_tape_padded(&mut self.scratch, value.len(), &mut self.buffers, &mut tape) {
            Err(_) => Err(Invalid::NotJson),
            Ok(()) => route_of(channel, &tape),
        };
        self.tape = Some(tape.reset());
        result
    }
}

fn route_of(channel: Channel, tape: &Tape<'_>) -> Result<Route, Invalid> {
    let root = tape.as_value();
    let obj = root.as_object().ok_or(Invalid::NotObject)?;
    match channel {
        Channel::Prices => {
            let (Some(token), Some(chain)) = (obj.get("token"), obj.get("chainId")) else {
                return Err(Invalid::MissingRouting);
            };
            let (Some(token), true) = (token.as_str(), chain.is_number()) else {
                return Err(Invalid::MissingRouting);
            };
            // PROTOCOL.md §11: a chain id outside 0..=2^64-1 or not whole
            // reaches `prices` only; a token outside the grammar reaches
            // `prices` and its chain only.
            let chain = chain.as_u64().or_else(|| chain.as_f64().and_then(whole_chain));
            Ok(match (chain, chain.and(normalize_token(token))) {
                (Some(chain), Some(token)) => Route::Market(Market { chain, token }),
                (Some(chain), None) => Route::Chain(chain),
                _ => Route::Prices,
            })
        }
        _ => {
            let v = obj.get("userId").ok_or(Invalid::MissingRouting)?;
            let user: Box<str> = if let Some(s) = v.as_str() {
                s.into()
            } else if let Some(n) = v.as_u64() {
                n.to_string().into()
            } else if let Some(n) = v.as_i64() {
                n.to_string().into()
            } else {
                return Err(Invalid::MissingRouting);
            };
            if user.is_empty() {
                return Err(Invalid::MissingRouting);
            }
            Ok(Route::User { channel, user })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(channel: Channel, v: &str) -> Result<Route, Invalid> {
        Validator::default().route(channel, v.as_bytes())
    }

    #[test]
    fn prices_need_token_and_numeric_chain() {
        let market = |chain, token: &str| Ok(Route::Market(Market { chain, token: token.into() }));
        assert_eq!(route(Channel::Prices, r#"{"token":"ETH","chainId":8453,"x":{"y":[1]}}"#), market(8453, "ETH"));
        assert_eq!(route(Channel::Prices, r#"{"token":"ETH","chainId":"8453"}"#), Err(Invalid::MissingRouting));
        assert_eq!(route(Channel::Prices, r#"{"chainId":1}"#), Err(Invalid::MissingRouting));
    }

    #[test]
    fn the_market_a_price_reaches_by_section_11() {
        let market = |chain, token: &str| Ok(Route::Market(Market { chain, token: token.into() }));
        assert_eq!(route(Channel::Prices, r#"{"token":"\u0045TH","chainId":1}"#), market(1, "ETH"));
        assert_eq!(
            route(Channel::Prices, r#"{"token":"ETH","chainId":18446744073709551615}"#),
            market(u64::MAX, "ETH")
        );
        assert_eq!(route(Channel::Prices, r#"{"token":"ETH","chainId":8453.0}"#), market(8453, "ETH"));
        let address = r#"{"token":"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913","chainId":8453}"#;
        assert_eq!(route(Channel::Prices, address), market(8453, "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"));
        // A token outside the grammar: `prices` and its chain only.
        assert_eq!(route(Channel::Prices, r#"{"token":"ETH/USD","chainId":1}"#), Ok(Route::Chain(1)));
        assert_eq!(route(Channel::Prices, r#"{"token":"","chainId":1}"#), Ok(Route::Chain(1)));
        // A chain id that is not a whole number in range: `prices` only.
        for chain in ["1.5", "-1", "1e30"] {
            let v = format!(r#"{{"token":"ETH","chainId":{chain}}}"#);
            assert_eq!(route(Channel::Prices, &v), Ok(Route::Prices), "{chain}");
        }
        // An integer past 2^64 - 1 is beyond the JSON parser itself: the
        // value is skipped as not JSON (counted), not delivered.
        let huge = r#"{"token":"ETH","chainId":18446744073709551616}"#;
        assert_eq!(route(Channel::Prices, huge), Err(Invalid::NotJson));
    }

    #[test]
    fn private_routes_by_user_id_string_or_integer() {
        let user = |r: Result<Route, Invalid>| match r {
            Ok(Route::User { user, .. }) => user.to_string(),
            other => format!("{other:?}"),
        };
        assert_eq!(user(route(Channel::Orders, r#"{"userId":"u\"1","status":"filled"}"#)), "u\"1");
        assert_eq!(user(route(Channel::Trades, r#"{"userId":42}"#)), "42");
        assert_eq!(user(route(Channel::Trades, r#"{"userId":-7}"#)), "-7");
        assert_eq!(route(Channel::Portfolio, r#"{"userId":1.5}"#), Err(Invalid::MissingRouting));
        assert_eq!(route(Channel::Portfolio, r#"{"userId":""}"#), Err(Invalid::MissingRouting));
        assert_eq!(route(Channel::Portfolio, r#"{"user":"a"}"#), Err(Invalid::MissingRouting));
    }

    #[test]
    fn rejects_non_objects_and_broken_json() {
        assert_eq!(route(Channel::Prices, "  "), Err(Invalid::Empty));
        assert_eq!(route(Channel::Prices, "[1,2]"), Err(Invalid::NotObject));
        assert_eq!(route(Channel::Prices, "\"x\""), Err(Invalid::NotObject));
        assert_eq!(route(Channel::Prices, r#"{"token":"ETH","chainId":1"#), Err(Invalid::NotJson));
        let bad_utf8 = b"{\"token\":\"\xff\",\"chainId\":1}";
        assert_eq!(Validator::default().route(Channel::Prices, bad_utf8), Err(Invalid::NotJson));
        assert_eq!(route(Channel::Prices, r#"{"token":"E","chainId":1} {"#), Err(Invalid::NotJson));
    }

    #[test]
    fn one_validator_is_reused_across_values() {
        let mut v = Validator::default();
        for i in 0..100 {
            let ok = format!(r#"{{"token":"T{i}","chainId":{i}}}"#);
            assert_eq!(
                v.route(Channel::Prices, ok.as_bytes()),
                Ok(Route::Market(Market { chain: i, token: format!("T{i}").into() }))
            );
            assert_eq!(v.route(Channel::Prices, b"nope"), Err(Invalid::NotJson));
        }
    }
}
