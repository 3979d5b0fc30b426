//! The `/docs` page: the protocol reference, a live console and examples
//! (`docs.html`, no external assets), built once at start-up.
//!
//! The reference is `docs/PROTOCOL.md`, the same file the repository
//! carries for readers, rendered to HTML here (pulldown-cmark): one source,
//! so the page and the file cannot disagree. The examples are rendered by
//! the server's own encoders, so they cannot drift from what it sends, and
//! the dev token is filled in when running in embedded mode.

use std::borrow::Cow;

use crate::protocol::message::{
    encode_outgoing, write_update_json, Channel, ErrorCode, Names, Outgoing, Recovery, UserView,
};

const TEMPLATE: &str = include_str!("docs.html");
/// The protocol reference users read in the repository.
const REFERENCE: &str = include_str!("../../docs/PROTOCOL.md");
const EXAMPLE_TS: u64 = 1_701_234_567_890;

/// Builds the page once; `dev_token` is set only in embedded-auth mode.
pub fn render(dev_token: Option<&str>) -> String {
    let token = dev_token.map(escape).unwrap_or_default();
    TEMPLATE
        .replace("__DEV_TOKEN__", &token)
        .replace("<!--REFERENCE-->", &reference())
        .replace("<!--EXAMPLES-->", &examples())
}

/// `docs/PROTOCOL.md` as HTML (tables on; the file is ours, so its HTML
/// needs no sanitising).
fn reference() -> String {
    let parser = pulldown_cmark::Parser::new_ext(REFERENCE, pulldown_cmark::Options::ENABLE_TABLES);
    let mut html = String::with_capacity(REFERENCE.len() * 2);
    pulldown_cmark::html::push_html(&mut html, parser);
    html
}

fn examples() -> String {
    let user = UserView { id: "user_123", email: Some("user@example.com") };
    let rid = Some("msg_1");
    let markets =
        [Cow::Borrowed("prices:8453:ETH"), Cow::Borrowed("prices:1:0x833589fcd6edb6e08f4c7c32d4f71b54bda02913")];
    let server: Vec<Outgoing> = vec![
        Outgoing::AuthRequired { timeout_ms: 10_000, connection_id: "ws-1-8f3a2c/42" },
        Outgoing::AuthSuccess { user, connection_id: "ws-1-8f3a2c/42", request_id: rid },
        Outgoing::AuthFailed { error: "Token expired", request_id: None },
        Outgoing::Subscribed { names: Names::One("prices"), snapshot: Some(0), recovery: None, request_id: rid },
        Outgoing::Subscribed {
            names: Names::One("prices:8453:ETH"),
            snapshot: Some(1),
            recovery: None,
            request_id: rid,
        },
        Outgoing::Subscribed { names: Names::Many(&markets), snapshot: Some(2), recovery: None, request_id: rid },
        Outgoing::Subscribed {
            names: Names::One("orders"),
            snapshot: None,
            recovery: Some(Recovery { recovered: true, missed: 2 }),
            request_id: rid,
        },
        Outgoing::Unsubscribed { names: Names::One("orders"), request_id: rid },
        Outgoing::Pong { now_ms: EXAMPLE_TS, request_id: rid },
        Outgoing::Error {
            code: ErrorCode::RateLimited,
            message: "message rate limit exceeded",
            request_id: rid,
            retry_after_ms: Some(42_000),
            channel: None,
        },
        Outgoing::Error {
            code: ErrorCode::UnknownChannel,
            message: "unknown channel",
            request_id: rid,
            retry_after_ms: None,
            channel: Some("prices:01"),
        },
    ];
    let mut out = String::from("<h3>Client to server</h3>\n");
    for text in [
        r#"{"id":"msg_1","type":"authenticate","timestamp":1701234567890,"data":{"token":"<JWT>"}}"#,
        r#"{"id":"msg_2","type":"subscribe","timestamp":1701234567890,"data":{"channel":"prices"}}"#,
        r#"{"id":"msg_3","type":"subscribe","data":{"channels":["prices:8453:ETH","prices:8453"],"snapshot":true}}"#,
        r#"{"id":"msg_4","type":"subscribe","data":{"channel":"orders","since":"3:1042"}}"#,
        r#"{"id":"msg_5","type":"unsubscribe","data":{"channel":"prices"}}"#,
        r#"{"id":"msg_6","type":"ping"}"#,
    ] {
        // Checked by the real parser: an example the server would refuse is a bug.
        debug_assert!(crate::protocol::message::parse_client(text).is_ok());
        out.push_str(&format!("<pre>{}</pre>\n", escape(text)));
    }
    out.push_str("<h3>Server to client</h3>\n");
    let (mut json, mut frame) = (Vec::new(), Vec::new());
    for (i, msg) in server.iter().enumerate() {
        frame.clear();
        encode_outgoing(msg, &format!("s0-{}", i + 1), EXAMPLE_TS, &mut json, &mut frame);
        out.push_str(&format!("<pre>{}</pre>\n", escape(&String::from_utf8_lossy(&json))));
    }
    let updates = [
        (
            Channel::Prices,
            r#"{"token":"ETH","chainId":8453,"price":"2150.45","priceUsd":"2150.45","change24h":"5.2","volume24h":"1250000","timestamp":1701234567890}"#,
        ),
        (
            Channel::Orders,
            r#"{"orderId":"order_123","userId":"user_123","status":"filled","tokenIn":"ETH","tokenOut":"USDC","amountIn":"1.0","amountOut":"2150.45","chainId":8453}"#,
        ),
        (
            Channel::Portfolio,
            r#"{"userId":"user_123","totalValue":10500.25,"tokens":[{"token":"ETH","balance":"2.5","valueUsd":5375.25}],"chainId":8453}"#,
        ),
        (
            Channel::Trades,
            r#"{"tradeId":"trade_123","userId":"user_123","tokenIn":"ETH","tokenOut":"USDC","amountIn":"1.0","amountOut":"2150.45","txHash":"0x123...","chainId":8453}"#,
        ),
    ];
    for (i, (channel, data)) in updates.into_iter().enumerate() {
        json.clear();
        let pos = Some((i as i32 % 4, 1_000_000 + i as i64));
        write_update_json(&format!("u{}", i + 1), channel.update_type(), EXAMPLE_TS, pos, data.as_bytes(), &mut json);
        out.push_str(&format!("<pre>{}</pre>\n", escape(&String::from_utf8_lossy(&json))));
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_examples_and_the_token() {
        let page = render(Some("tok<en>"));
        assert!(page.contains(r#"value="tok&lt;en&gt;""#));
        assert!(page.contains("&quot;type&quot;:&quot;auth_required&quot;"));
        assert!(page.contains("&quot;type&quot;:&quot;trade_update&quot;"));
        assert!(!page.contains("<!--EXAMPLES-->"));
        assert!(render(None).contains(r#"value="""#));
    }

    /// The page shows docs/PROTOCOL.md itself: each of its sections and
    /// its tables, not a copy kept elsewhere.
    #[test]
    fn the_reference_is_docs_protocol_md() {
        let page = render(None);
        assert!(!page.contains("<!--REFERENCE-->"));
        let headings: Vec<&str> = REFERENCE.lines().filter_map(|l| l.strip_prefix("## ")).collect();
        assert!(headings.len() >= 8, "{headings:?}");
        for h in headings {
            assert!(page.contains(&format!("<h2>{}</h2>", escape(h))), "section {h:?} is on the page");
        }
        assert!(page.contains("<table>") && page.contains("<td>4009</td>"), "tables are rendered");
    }
}
