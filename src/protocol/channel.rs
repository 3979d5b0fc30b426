//! Channel names (PROTOCOL.md §5, §11), sans-IO.
//!
//! Owns: the grammar of a channel name (`prices`, `prices:<chainId>`,
//! `prices:<chainId>:<token>`, the private channels), the market key a
//! price value routes by, and the EVM-address case rule: a token of the
//! form `0x` + 40 hex digits is kept in lower case, so `0xAbC…` and
//! `0xabc…` name one market; any other token is compared exactly.

use super::message::Channel;

/// Longest token in a market name.
pub const MAX_TOKEN_LEN: usize = 64;

/// A market: a chain and a token (EVM addresses in lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Market {
    pub chain: u64,
    pub token: Box<str>,
}

/// A parsed channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChannelName {
    /// `prices` or a private channel: one bit of the session's set.
    Fixed(Channel),
    /// `prices:<chainId>`.
    Chain(u64),
    /// `prices:<chainId>:<token>`.
    Market(Market),
}

impl ChannelName {
    /// Parses a channel name; None for anything outside the grammar.
    pub fn parse(name: &str) -> Option<ChannelName> {
        if let Some(fixed) = Channel::parse(name) {
            return Some(ChannelName::Fixed(fixed));
        }
        let rest = name.strip_prefix("prices:")?;
        let (chain, token) = match rest.split_once(':') {
            Some((chain, token)) => (chain, Some(token)),
            None => (rest, None),
        };
        let chain = parse_chain(chain)?;
        match token {
            None => Some(ChannelName::Chain(chain)),
            Some(token) => Some(ChannelName::Market(Market { chain, token: normalize_token(token)? })),
        }
    }

    /// Whether updates on this channel are price updates.
    pub fn is_price(&self) -> bool {
        !matches!(self, ChannelName::Fixed(c) if c.is_private())
    }
}

/// The decimal text of a chain id: digits only, no sign, no leading zero
/// (except `0` itself), at most `u64::MAX`.
fn parse_chain(text: &str) -> Option<u64> {
    let bytes = text.as_bytes();
    if bytes.is_empty() || !bytes.iter().all(u8::is_ascii_digit) || (bytes[0] == b'0' && bytes.len() > 1) {
        return None;
    }
    text.parse().ok()
}

/// A token as markets are keyed: None when it does not fit the grammar
/// (1–64 of `[A-Za-z0-9._-]`); an EVM address in lower case.
pub fn normalize_token(token: &str) -> Option<Box<str>> {
    let bytes = token.as_bytes();
    let fits = !bytes.is_empty()
        && bytes.len() <= MAX_TOKEN_LEN
        && bytes.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !fits {
        return None;
    }
    if is_evm_address(bytes) {
        Some(token.to_ascii_lowercase().into_boxed_str())
    } else {
        Some(token.into())
    }
}

/// A chain id written as a float (`8453.0`): whole and exactly
/// representable (below 2^53), or nothing.
pub fn whole_chain(f: f64) -> Option<u64> {
    (f >= 0.0 && f.fract() == 0.0 && f < 9_007_199_254_740_992.0).then_some(f as u64)
}

/// The market of a `price_update` envelope as this server encodes it
/// (`{"id":…,"type":"price_update",…,"data":{…"chainId":…,"token":…}}`);
/// None for any other message, or a price without a market. For the slow
/// path (conflation), not the fan-out: the fan-out has the route.
pub fn market_of_envelope(json: &[u8]) -> Option<Market> {
    #[derive(serde::Deserialize)]
    struct Envelope<'a> {
        #[serde(rename = "type", borrow)]
        ty: std::borrow::Cow<'a, str>,
        data: Option<Data<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(rename = "chainId")]
        chain: Option<serde_json::Number>,
        #[serde(borrow)]
        token: Option<std::borrow::Cow<'a, str>>,
    }
    // Cheap refusal first: replies and private updates are most frames.
    const PRICE: &[u8] = b"\"type\":\"price_update\"";
    let head = &json[..json.len().min(200)];
    if !head.windows(PRICE.len()).any(|w| w == PRICE) {
        return None;
    }
    let env: Envelope = serde_json::from_slice(json).ok()?;
    let data = env.data.filter(|_| env.ty == "price_update")?;
    let chain = data.chain?;
    let chain = chain.as_u64().or_else(|| chain.as_f64().and_then(whole_chain))?;
    Some(Market { chain, token: normalize_token(&data.token?)? })
}

fn is_evm_address(bytes: &[u8]) -> bool {
    bytes.len() == 42 && bytes[0] == b'0' && bytes[1] == b'x' && bytes[2..].iter().all(u8::is_ascii_hexdigit)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn market(chain: u64, token: &str) -> Option<ChannelName> {
        Some(ChannelName::Market(Market { chain, token: token.into() }))
    }

    #[test]
    fn the_grammar_of_section_11() {
        assert_eq!(ChannelName::parse("prices"), Some(ChannelName::Fixed(Channel::Prices)));
        assert_eq!(ChannelName::parse("orders"), Some(ChannelName::Fixed(Channel::Orders)));
        assert_eq!(ChannelName::parse("prices:8453"), Some(ChannelName::Chain(8453)));
        assert_eq!(ChannelName::parse("prices:0"), Some(ChannelName::Chain(0)));
        assert_eq!(ChannelName::parse("prices:18446744073709551615"), Some(ChannelName::Chain(u64::MAX)));
        assert_eq!(ChannelName::parse("prices:8453:ETH"), market(8453, "ETH"));
        assert_eq!(ChannelName::parse("prices:1:a.b_c-D9"), market(1, "a.b_c-D9"));
        assert_eq!(ChannelName::parse(&format!("prices:1:{}", "x".repeat(64))), market(1, &"x".repeat(64)));
        for bad in [
            "prices:",
            "prices:01",
            "prices:-1",
            "prices:+1",
            "prices:1.5",
            "prices:18446744073709551616",
            "prices:1:",
            "prices:1:ETH:x",
            "prices:1:E TH",
            "prices:1:ÉTH",
            "prices:x:ETH",
            "Prices",
            "prices:1:ETH/USD",
            "order",
            "",
        ] {
            assert_eq!(ChannelName::parse(bad), None, "{bad:?}");
        }
        assert_eq!(ChannelName::parse(&format!("prices:1:{}", "x".repeat(65))), None);
    }

    #[test]
    fn the_market_of_an_encoded_price_update() {
        let env = |data: &str| format!(r#"{{"id":"u1","type":"price_update","timestamp":5,"data":{data}}}"#);
        let m = |chain, token: &str| Some(Market { chain, token: token.into() });
        assert_eq!(market_of_envelope(env(r#"{"token":"ETH","chainId":8453,"p":[1]}"#).as_bytes()), m(8453, "ETH"));
        assert_eq!(market_of_envelope(env(r#"{"chainId":1.0,"token":"0xAB"}"#).as_bytes()), m(1, "0xAB"));
        let address = r#"{"token":"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913","chainId":1}"#;
        assert_eq!(market_of_envelope(env(address).as_bytes()), m(1, "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"));
        assert_eq!(market_of_envelope(env(r#"{"token":"ETH/USD","chainId":1}"#).as_bytes()), None);
        assert_eq!(market_of_envelope(env(r#"{"token":"ETH","chainId":-1}"#).as_bytes()), None);
        let order = r#"{"id":"u2","type":"order_update","timestamp":5,"data":{"token":"ETH","chainId":1}}"#;
        assert_eq!(market_of_envelope(order.as_bytes()), None);
        assert_eq!(market_of_envelope(b"not json"), None);
    }

    #[test]
    fn evm_addresses_compare_case_insensitively_other_tokens_exactly() {
        let checksummed = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913";
        let lower = "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913";
        assert_eq!(
            ChannelName::parse(&format!("prices:8453:{checksummed}")),
            ChannelName::parse(&format!("prices:8453:{lower}"))
        );
        assert_eq!(normalize_token(checksummed).as_deref(), Some(lower));
        assert_ne!(ChannelName::parse("prices:1:ETH"), ChannelName::parse("prices:1:eth"));
        // Not an address (41 hex digits; an uppercase X): kept exactly.
        let not_address = format!("0x{}", "A".repeat(41));
        assert_eq!(normalize_token(&not_address).as_deref(), Some(&*not_address));
        assert_eq!(normalize_token("0XABCDEF").as_deref(), Some("0XABCDEF"));
    }
}
