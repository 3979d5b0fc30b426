//! Client and server messages (PROTOCOL.md §2, §3, §5), sans-IO.
//!
//! Owns: the channel set, parsing a client text message into a typed
//! [`ClientMessage`] (two phases: the envelope with `data` kept raw, then the
//! type's own fields), and encoding server messages as complete frames into
//! caller-owned buffers. The error codes of §3 are decided here.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::frame::{encode_frame, OP_TEXT};

/// Longest client `id` accepted (PROTOCOL.md §2).
pub const MAX_ID_BYTES: usize = 128;

/// The channels of PROTOCOL.md §5.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Channel {
    Prices = 0,
    Orders = 1,
    Portfolio = 2,
    Trades = 3,
}

impl Channel {
    pub const ALL: [Channel; 4] = [Channel::Prices, Channel::Orders, Channel::Portfolio, Channel::Trades];

    pub fn parse(name: &str) -> Option<Channel> {
        Some(match name {
            "prices" => Channel::Prices,
            "orders" => Channel::Orders,
            "portfolio" => Channel::Portfolio,
            "trades" => Channel::Trades,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Prices => "prices",
            Channel::Orders => "orders",
            Channel::Portfolio => "portfolio",
            Channel::Trades => "trades",
        }
    }

    /// The update message type carried on this channel.
    pub fn update_type(self) -> &'static str {
        match self {
            Channel::Prices => "price_update",
            Channel::Orders => "order_update",
            Channel::Portfolio => "portfolio_update",
            Channel::Trades => "trade_update",
        }
    }

    /// This channel's bit in a subscription set.
    pub fn bit(self) -> u8 {
        1 << self as u8
    }

    pub fn is_private(self) -> bool {
        self != Channel::Prices
    }
}

/// A parsed client message: its `id` (if any) and what it asks for.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientMessage<'a> {
    pub id: Option<Cow<'a, str>>,
    pub kind: ClientKind<'a>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ClientKind<'a> {
    /// `token` is `None` when `data.token` is missing or not a string.
    Authenticate {
        token: Option<Cow<'a, str>>,
    },
    Subscribe(ChannelArgs<'a>),
    Unsubscribe(ChannelArgs<'a>),
    Ping,
}

/// Most channels one subscribe or unsubscribe may name (PROTOCOL.md §5).
pub const MAX_CHANNELS_PER_MESSAGE: usize = 100;

/// The `data` of a subscribe/unsubscribe: the channel names as the client
/// wrote them (not yet checked against the grammar, see
/// `protocol::channel`), and the options.
#[derive(Debug, PartialEq, Eq)]
pub struct ChannelArgs<'a> {
    pub names: Vec<Cow<'a, str>>,
    /// Named as `channels` (a list): the reply names a list too.
    pub many: bool,
    /// `data.snapshot`, when given.
    pub snapshot: Option<bool>,
    /// `data.since`, when given (only with a single `channel`).
    pub since: Option<Since>,
}

/// A subscribe's `since` (PROTOCOL.md §12): a position, or something that
/// is not one (refused on a private channel, ignored on a public one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    Pos(Pos),
    Malformed,
}

impl Since {
    /// Reads `"<partition>:<offset>"`, both non-negative decimal integers.
    pub fn parse(raw: &RawValue) -> Since {
        let Ok(text) = serde_json::from_str::<&str>(raw.get()) else {
            return Since::Malformed;
        };
        parse_pos(text).map_or(Since::Malformed, Since::Pos)
    }
}

/// `"<partition>:<offset>"` with non-negative decimal integers (no sign,
/// no spaces), as `pos` writes it.
pub fn parse_pos(text: &str) -> Option<Pos> {
    let (p, o) = text.split_once(':')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(p) || !digits(o) {
        return None;
    }
    Some((p.parse().ok()?, o.parse().ok()?))
}

impl<'a> ChannelArgs<'a> {
    /// One channel, as `{"channel": name}`.
    pub fn one(name: &'a str) -> Self {
        ChannelArgs { names: vec![Cow::Borrowed(name)], many: false, snapshot: None, since: None }
    }

    /// The names, as a reply shows them.
    pub fn reply_names(&self) -> Names<'_> {
        if self.many {
            Names::Many(&self.names)
        } else {
            Names::One(&self.names[0])
        }
    }
}

/// The channel names a reply carries: `channel` or `channels`.
#[derive(Debug, Clone, Copy)]
pub enum Names<'a> {
    One(&'a str),
    Many(&'a [Cow<'a, str>]),
}

/// A message refused before its own rules apply (§3 order).
#[derive(Debug, PartialEq, Eq)]
pub enum ParseError<'a> {
    Invalid { id: Option<Cow<'a, str>>, reason: &'static str },
    UnknownType { id: Option<Cow<'a, str>> },
}

impl ParseError<'_> {
    pub fn code(&self) -> ErrorCode {
        match self {
            ParseError::Invalid { .. } => ErrorCode::InvalidMessage,
            ParseError::UnknownType { .. } => ErrorCode::UnknownType,
        }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TokenData<'a> {
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    snapshot: Option<bool>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
}

/// Parses one client text message (already UTF-8 checked by the codec).
pub fn parse_client(text: &[u8]) -> Result<ClientMessage<'_>, ParseError<'_>> {
    let invalid = |id, reason| ParseError::Invalid { id, reason };
    let env: Envelope = serde_json::from_slice(text)
        .map_err(|_| invalid(None, "expected a JSON object with string type, string id and object data"))?;
    if env.id.as_ref().is_some_and(|id| id.len() > MAX_ID_BYTES) {
        return Err(invalid(None, "id longer than 128 bytes"));
    }
    let id = env.id;
    let Some(ty) = env.ty else {
        return Err(invalid(id, "missing type"));
    };
    if ty == "ping" {
        return Ok(ClientMessage { id, kind: ClientKind::Ping });
    }
    let data = match env.data {
        Some(raw) if raw.get().starts_with('{') => raw,
        _ => return Err(invalid(id, "data must be an object")),
    };
    let kind = match &*ty {
        "authenticate" => {
            ClientKind::Authenticate { token: serde_json::from_str::<TokenData>(data.get()).ok().and_then(|d| d.token) }
        }
        "subscribe" | "unsubscribe" => {
            const SHAPE: &str =
                "expected data.channel (a string) or data.channels (1 to 100 strings), and data.snapshot a boolean";
            let Ok(d) = serde_json::from_str::<ChannelData>(data.get()) else {
                return Err(invalid(id, SHAPE));
            };
            let since = d.since.map(Since::parse);
            let arg = match (d.channel, d.channels) {
                (Some(name), None) => ChannelArgs { names: vec![name], many: false, snapshot: d.snapshot, since },
                (None, Some(_)) if since.is_some() => {
                    return Err(invalid(id, "data.since is accepted only with a single data.channel"))
                }
                (None, Some(names)) if (1..=MAX_CHANNELS_PER_MESSAGE).contains(&names.len()) => {
                    ChannelArgs { names, many: true, snapshot: d.snapshot, since: None }
                }
                _ => return Err(invalid(id, SHAPE)),
            };
            if ty == "subscribe" {
                ClientKind::Subscribe(arg)
            } else {
                ClientKind::Unsubscribe(arg)
            }
        }
        _ => return Err(ParseError::UnknownType { id }),
    };
    Ok(ClientMessage { id, kind })
}

/// The `code` of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidMessage,
    UnknownType,
    NotAuthenticated,
    UnknownChannel,
    TooManySubscriptions,
    RateLimited,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotAuthenticated => "not_authenticated",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// How a subscribe with `since` ended (PROTOCOL.md §12): `recovered`
/// false means the client must reload its state by other means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    pub recovered: bool,
    pub missed: u64,
}

/// A user as shown in `auth_success`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserView<'a> {
    pub id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<&'a str>,
}

/// A server message other than the Kafka updates (those are built once in
/// ingest). `request_id` is the client's `id` being answered.
#[derive(Debug, Clone)]
pub enum Outgoing<'a> {
    /// `connection_id` names the connection in the server's logs (a client
    /// quotes it in a support ticket).
    AuthRequired {
        timeout_ms: u64,
        connection_id: &'a str,
    },
    AuthSuccess {
        user: UserView<'a>,
        connection_id: &'a str,
        request_id: Option<&'a str>,
    },
    AuthFailed {
        error: &'a str,
        request_id: Option<&'a str>,
    },
    /// `snapshot`: how many snapshot frames follow (for price channels);
    /// `recovery`: for a subscribe with `since`, whether the replay was
    /// complete and how many updates it sent (`recovered`, `missed`).
    Subscribed {
        names: Names<'a>,
        snapshot: Option<usize>,
        recovery: Option<Recovery>,
        request_id: Option<&'a str>,
    },
    Unsubscribed {
        names: Names<'a>,
        request_id: Option<&'a str>,
    },
    Pong {
        now_ms: u64,
        request_id: Option<&'a str>,
    },
    /// `channel`: the first bad channel of a subscribe/unsubscribe.
    Error {
        code: ErrorCode,
        message: &'a str,
        request_id: Option<&'a str>,
        retry_after_ms: Option<u64>,
        channel: Option<&'a str>,
    },
}

impl Outgoing<'_> {
    pub fn type_name(&self) -> &'static str {
        match self {
            Outgoing::AuthRequired { .. } => "auth_required",
            Outgoing::AuthSuccess { .. } => "auth_success",
            Outgoing::AuthFailed { .. } => "auth_failed",
            Outgoing::Subscribed { .. } => "subscribed",
            Outgoing::Unsubscribed { .. } => "unsubscribed",
            Outgoing::Pong { .. } => "pong",
            Outgoing::Error { .. } => "error",
        }
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a> {
    AuthRequired {
        timeout: u64,
        #[serde(rename = "connectionId")]
        connection_id: &'a str,
    },
    User {
        user: &'a UserView<'a>,
        #[serde(rename = "connectionId")]
        connection_id: &'a str,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Failed {
        error: &'a str,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Channel {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        snapshot: Option<usize>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        missed: Option<u64>,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Channels {
        channels: &'a [Cow<'a, str>],
        #[serde(skip_serializing_if = "Option::is_none")]
        snapshot: Option<usize>,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Pong {
        timestamp: u64,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
    },
    Error {
        code: &'static str,
        message: &'a str,
        #[serde(rename = "requestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a str>,
        #[serde(rename = "retryAfterMs", skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
}

#[derive(Serialize)]
struct ServerEnvelope<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    ty: &'static str,
    timestamp: u64,
    data: Data<'a>,
}

/// Appends `msg` as one complete text frame to `out`. `json` is a scratch
/// buffer (cleared here) so the caller's allocations are reused.
pub fn encode_outgoing(msg: &Outgoing, id: &str, now_ms: u64, json: &mut Vec<u8>, out: &mut Vec<u8>) {
    let data = match msg {
        Outgoing::AuthRequired { timeout_ms, connection_id } => {
            Data::AuthRequired { timeout: *timeout_ms, connection_id }
        }
        Outgoing::AuthSuccess { user, connection_id, request_id } => {
            Data::User { user, connection_id, request_id: *request_id }
        }
        Outgoing::AuthFailed { error, request_id } => Data::Failed { error, request_id: *request_id },
        Outgoing::Subscribed { names, snapshot, recovery, request_id } => {
            channel_data(*names, *snapshot, *recovery, *request_id)
        }
        Outgoing::Unsubscribed { names, request_id } => channel_data(*names, None, None, *request_id),
        Outgoing::Pong { now_ms, request_id } => Data::Pong { timestamp: *now_ms, request_id: *request_id },
        Outgoing::Error { code, message, request_id, retry_after_ms, channel } => Data::Error {
            code: code.as_str(),
            message,
            request_id: *request_id,
            retry_after_ms: *retry_after_ms,
            channel: *channel,
        },
    };
    let env = ServerEnvelope { id, ty: msg.type_name(), timestamp: now_ms, data };
    json.clear();
    // Serializing plain structs of strings and integers into a Vec cannot fail.
    serde_json::to_writer(&mut *json, &env).expect("serialize server message");
    encode_frame(OP_TEXT, json, out);
}

fn channel_data<'a>(
    names: Names<'a>,
    snapshot: Option<usize>,
    recovery: Option<Recovery>,
    request_id: Option<&'a str>,
) -> Data<'a> {
    match names {
        Names::One(channel) => Data::Channel {
            channel,
            snapshot,
            recovered: recovery.map(|r| r.recovered),
            missed: recovery.map(|r| r.missed),
            request_id,
        },
        Names::Many(channels) => Data::Channels { channels, snapshot, request_id },
    }
}

/// A Kafka position: partition and offset (PROTOCOL.md §2, `pos`).
pub type Pos = (i32, i64);

/// Appends a Kafka update's envelope JSON (not yet framed) to `out`:
/// `data` is the producer's value, verbatim; `pos` its Kafka position,
/// written as `"pos":"<partition>:<offset>"` (none for an update that did
/// not come from Kafka).
pub fn write_update_json(id: &str, update_type: &str, now_ms: u64, pos: Option<Pos>, data: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(b"\",\"type\":\"");
    out.extend_from_slice(update_type.as_bytes());
    out.extend_from_slice(b"\",\"timestamp\":");
    out.extend_from_slice(itoa::Buffer::new().format(now_ms).as_bytes());
    if let Some((partition, offset)) = pos {
        let mut n = itoa::Buffer::new();
        out.extend_from_slice(b",\"pos\":\"");
        out.extend_from_slice(n.format(partition).as_bytes());
        out.push(b':');
        out.extend_from_slice(n.format(offset).as_bytes());
        out.push(b'"');
    }
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(data);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> Result<ClientKind<'_>, ErrorCode> {
        parse_client(text.as_bytes()).map(|m| m.kind).map_err(|e| e.code())
    }

    #[test]
    fn parses_each_client_type() {
        assert_eq!(
            kind(r#"{"id":"a","type":"authenticate","data":{"token":"t"}}"#),
            Ok(ClientKind::Authenticate { token: Some("t".into()) })
        );
        assert_eq!(
            kind(r#"{"type":"subscribe","data":{"channel":"prices"}}"#),
            Ok(ClientKind::Subscribe(ChannelArgs::one("prices")))
        );
        assert_eq!(
            kind(r#"{"type":"unsubscribe","data":{"channel":"nope"}}"#),
            Ok(ClientKind::Unsubscribe(ChannelArgs::one("nope")))
        );
        assert_eq!(
            kind(r#"{"type":"subscribe","data":{"channels":["prices:1:ETH","orders"],"snapshot":true}}"#),
            Ok(ClientKind::Subscribe(ChannelArgs {
                names: vec!["prices:1:ETH".into(), "orders".into()],
                many: true,
                snapshot: Some(true),
                since: None,
            }))
        );
        assert_eq!(kind(r#"{"type":"ping"}"#), Ok(ClientKind::Ping));
        assert_eq!(kind(r#"{"type":"ping","data":[1,2]}"#), Ok(ClientKind::Ping));
        assert_eq!(kind(r#"{"type":"authenticate","data":{"token":5}}"#), Ok(ClientKind::Authenticate { token: None }));
    }

    #[test]
    fn error_codes_in_protocol_order() {
        use ErrorCode::*;
        assert_eq!(kind("not json"), Err(InvalidMessage));
        assert_eq!(kind("[1,2]"), Err(InvalidMessage));
        assert_eq!(kind(r#"{"data":{}}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":7,"data":{}}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"subscribe"}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"subscribe","data":[]}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"nope"}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"nope","data":{}}"#), Err(UnknownType));
        assert_eq!(kind(r#"{"type":"subscribe","data":{"channel":1}}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"subscribe","data":{"channels":[]}}"#), Err(InvalidMessage));
        assert_eq!(kind(r#"{"type":"subscribe","data":{"channels":"prices"}}"#), Err(InvalidMessage));
        assert_eq!(
            kind(r#"{"type":"subscribe","data":{"channel":"prices","channels":["prices"]}}"#),
            Err(InvalidMessage)
        );
        assert_eq!(kind(r#"{"type":"subscribe","data":{"channel":"prices","snapshot":"yes"}}"#), Err(InvalidMessage));
        let hundred = vec!["\"prices\""; 100].join(",");
        assert!(kind(&format!(r#"{{"type":"subscribe","data":{{"channels":[{hundred}]}}}}"#)).is_ok());
        let over = vec!["\"prices\""; 101].join(",");
        assert_eq!(kind(&format!(r#"{{"type":"subscribe","data":{{"channels":[{over}]}}}}"#)), Err(InvalidMessage));
        let long_id = format!(r#"{{"id":"{}","type":"ping"}}"#, "x".repeat(129));
        assert_eq!(kind(&long_id), Err(InvalidMessage));
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(kind(&format!(r#"{{"type":"ping","data":{deep}}}"#)), Ok(ClientKind::Ping));
        assert_eq!(kind(&deep), Err(InvalidMessage));
    }

    #[test]
    fn keeps_the_id_for_request_ids() {
        let m = parse_client(br#"{"id":"r\"1","type":"ping"}"#).unwrap();
        assert_eq!(m.id.as_deref(), Some("r\"1"));
        match parse_client(br#"{"id":"r2","type":"zzz","data":{}}"#) {
            Err(ParseError::UnknownType { id }) => assert_eq!(id.as_deref(), Some("r2")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encodes_a_framed_envelope() {
        let (mut json, mut out) = (Vec::new(), Vec::new());
        let msg = Outgoing::Error {
            code: ErrorCode::RateLimited,
            message: "slow down",
            request_id: Some("r1"),
            retry_after_ms: Some(1500),
            channel: None,
        };
        encode_outgoing(&msg, "s0-1", 42, &mut json, &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 126, "over 125 bytes: 16-bit length");
        let len = u16::from_be_bytes([out[2], out[3]]) as usize;
        assert_eq!(out.len(), 4 + len);
        let v: serde_json::Value = serde_json::from_slice(&out[4..]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"s0-1","type":"error","timestamp":42,
                "data":{"code":"rate_limited","message":"slow down","requestId":"r1","retryAfterMs":1500}})
        );
    }

    #[test]
    fn update_json_keeps_data_verbatim() {
        let mut out = Vec::new();
        write_update_json("u1", "price_update", 7, None, br#"{"token":"ETH","x":[1]}"#, &mut out);
        assert_eq!(out, br#"{"id":"u1","type":"price_update","timestamp":7,"data":{"token":"ETH","x":[1]}}"#);
        out.clear();
        write_update_json("u2", "order_update", 7, Some((3, 1_234_567)), br#"{"userId":"a"}"#, &mut out);
        assert_eq!(out, br#"{"id":"u2","type":"order_update","timestamp":7,"pos":"3:1234567","data":{"userId":"a"}}"#);
    }
}
