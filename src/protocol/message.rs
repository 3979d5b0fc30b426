//! Client and server messages (PROTOCOL.md §2, §3, §5), sans-IO.
//!
//! Owns: the channel set, parsing a client text message into a typed
//! [`ClientMessage`] (two phases: the envelope with `data` kept raw, then the
//! type's own fields), and encoding server messages as complete frames into
//! caller-owned buffers. The error codes of §3 are decided here.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_with::{As, BorrowCow};

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

// serde's own `Cow` borrows only outside an `Option`: `BorrowCow`
// borrows every string that needs no unescaping (no allocation per field).
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, with = "As::<Option<BorrowCow>>")]
    id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default, with = "As::<Option<BorrowCow>>")]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct TokenData<'a> {
    #[serde(borrow, default, with = "As::<Option<BorrowCow>>")]
    token: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    #[serde(borrow, default, with = "As::<Option<BorrowCow>>")]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default, with = "As::<Option<Vec<BorrowCow>>>")]
    channels: Option<Vec<Cow<'a, str>>>,
    #[serde(default)]
    snapshot: Option<bool>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
}

/// Parses one client text message (its UTF-8 checked by the codec, so
/// serde_json's `from_str` does not check it again).
pub fn parse_client(text: &str) -> Result<ClientMessage<'_>, ParseError<'_>> {
    const NOT_AN_ENVELOPE: &str = "expected a JSON object with string type, string id and object data";
    let invalid = |id, reason| ParseError::Invalid { id, reason };
    // serde would also take a struct from a JSON array, by position.
    if !text.trim_start().starts_with('{') {
        return Err(invalid(None, NOT_AN_ENVELOPE));
    }
    let env: Envelope = serde_json::from_str(text).map_err(|_| invalid(None, NOT_AN_ENVELOPE))?;
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
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct UserView<'a> {
    pub id: &'a str,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
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

/// Appends `msg` as one complete text frame to `out`. `json` is a scratch
/// buffer (cleared here) so the caller's allocations are reused.
///
/// Written by hand, as [`write_update_json`] is: every connection gets two
/// or three of these while it sets up, and serde's generic path (each key
/// and value escaped byte by byte) was 7.6% of the instructions of a
/// connection storm under callgrind (perf/RESULTS.md). The test `reference` module keeps
/// the serde structs this replaced and holds the output to them byte for
/// byte.
pub fn encode_outgoing(msg: &Outgoing, id: &str, now_ms: u64, json: &mut Vec<u8>, out: &mut Vec<u8>) {
    json.clear();
    json.extend_from_slice(b"{\"id\":");
    write_str(json, id);
    json.extend_from_slice(b",\"type\":\"");
    json.extend_from_slice(msg.type_name().as_bytes());
    json.extend_from_slice(b"\",\"timestamp\":");
    write_u64(json, now_ms);
    json.extend_from_slice(b",\"data\":");
    let mut data = Fields::open(json);
    match msg {
        Outgoing::AuthRequired { timeout_ms, connection_id } => {
            data.u64("timeout", *timeout_ms);
            data.str("connectionId", connection_id);
        }
        Outgoing::AuthSuccess { user, connection_id, request_id } => {
            let mut u = Fields::open(data.key("user"));
            u.str("id", user.id);
            u.opt_str("email", user.email);
            u.close();
            data.str("connectionId", connection_id);
            data.opt_str("requestId", *request_id);
        }
        Outgoing::AuthFailed { error, request_id } => {
            data.str("error", error);
            data.opt_str("requestId", *request_id);
        }
        Outgoing::Subscribed { names, snapshot, recovery, request_id } => {
            channel_data(&mut data, *names, *snapshot, *recovery, *request_id)
        }
        Outgoing::Unsubscribed { names, request_id } => channel_data(&mut data, *names, None, None, *request_id),
        Outgoing::Pong { now_ms, request_id } => {
            data.u64("timestamp", *now_ms);
            data.opt_str("requestId", *request_id);
        }
        Outgoing::Error { code, message, request_id, retry_after_ms, channel } => {
            data.str("code", code.as_str());
            data.str("message", message);
            data.opt_str("requestId", *request_id);
            if let Some(ms) = retry_after_ms {
                data.u64("retryAfterMs", *ms);
            }
            data.opt_str("channel", *channel);
        }
    }
    data.close();
    json.push(b'}');
    encode_frame(OP_TEXT, json, out);
}

fn channel_data(
    data: &mut Fields,
    names: Names,
    snapshot: Option<usize>,
    recovery: Option<Recovery>,
    request_id: Option<&str>,
) {
    match names {
        Names::One(channel) => data.str("channel", channel),
        Names::Many(channels) => {
            let out = data.key("channels");
            out.push(b'[');
            for (i, name) in channels.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, name);
            }
            out.push(b']');
        }
    }
    if let Some(n) = snapshot {
        data.u64("snapshot", n as u64);
    }
    // A list of channels never carries a recovery (`since` needs one channel).
    if let (Names::One(_), Some(r)) = (names, recovery) {
        data.key("recovered").extend_from_slice(if r.recovered { b"true" } else { b"false" });
        data.u64("missed", r.missed);
    }
    data.opt_str("requestId", request_id);
}

/// A JSON object being written: keys are this module's own (plain ASCII,
/// written as they are), values are escaped.
struct Fields<'o> {
    out: &'o mut Vec<u8>,
    first: bool,
}

impl<'o> Fields<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, first: true }
    }

    /// Writes `"key":` and returns the buffer for the value.
    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !std::mem::take(&mut self.first) {
            self.out.push(b',');
        }
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    fn str(&mut self, key: &str, value: &str) {
        write_str(self.key(key), value);
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        if let Some(value) = value {
            self.str(key, value);
        }
    }

    fn u64(&mut self, key: &str, value: u64) {
        write_u64(self.key(key), value);
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

/// Appends `s` as a JSON string, escaped exactly as serde_json escapes it.
/// A string with nothing to escape (ids, channel names, almost every user
/// id) is copied in one piece; any other goes through serde_json.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.reserve(s.len() + 2);
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // Writing a string into a Vec cannot fail.
        serde_json::to_writer(&mut *out, s).expect("serialize a string");
    }
}

fn write_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
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
    write_u64(out, now_ms);
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

/// The serde encoding [`encode_outgoing`] replaced, kept as the reference
/// it is tested against.
#[cfg(test)]
mod reference {
    use std::borrow::Cow;

    use serde::Serialize;

    use super::{Names, Outgoing, Recovery, UserView};

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

    /// The envelope JSON (unframed) as the serde derive wrote it.
    pub fn encode_json(msg: &Outgoing, id: &str, now_ms: u64) -> Vec<u8> {
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
        serde_json::to_vec(&ServerEnvelope { id, ty: msg.type_name(), timestamp: now_ms, data }).unwrap()
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> Result<ClientKind<'_>, ErrorCode> {
        parse_client(text).map(|m| m.kind).map_err(|e| e.code())
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
        let m = parse_client(r#"{"id":"r\"1","type":"ping"}"#).unwrap();
        assert_eq!(m.id.as_deref(), Some("r\"1"));
        match parse_client(r#"{"id":"r2","type":"zzz","data":{}}"#) {
            Err(ParseError::UnknownType { id }) => assert_eq!(id.as_deref(), Some("r2")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn only_a_json_object_is_a_message() {
        // serde takes a struct from an array by position: not a message.
        for text in [r#"["r1","ping"]"#, r#"["r1"]"#, "[]", r#" "ping" "#, "1", "null"] {
            match parse_client(text) {
                Err(ParseError::Invalid { id: None, .. }) => {}
                other => panic!("{text}: {other:?}"),
            }
        }
        assert!(matches!(parse_client(r#" {"type":"ping"}"#).map(|m| m.kind), Ok(ClientKind::Ping)));
    }

    /// Every kind of server message, with and without each optional
    /// field, over strings that need every kind of escaping: byte for
    /// byte what the serde derive wrote.
    #[test]
    fn the_hand_written_encoding_matches_serdes() {
        let strings = [
            "",
            "s0-17",
            "user_123",
            "a\"quote",
            "back\\slash",
            "tab\there",
            "nl\n",
            "\u{1}\u{1f}",
            "\u{7f}del",
            "é ü 日本 🚀",
            "</script>",
            "{\"json\":1}",
        ];
        let many: Vec<Cow<str>> = strings.iter().map(|s| Cow::Borrowed(*s)).collect();
        let opts = |i: usize| if i.is_multiple_of(3) { None } else { Some(strings[i % strings.len()]) };
        let mut msgs = Vec::new();
        for (i, s) in strings.iter().enumerate() {
            let o = opts(i);
            let n = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            msgs.push(Outgoing::AuthRequired { timeout_ms: n, connection_id: s });
            msgs.push(Outgoing::AuthSuccess {
                user: UserView { id: s, email: o },
                connection_id: s,
                request_id: opts(i + 1),
            });
            msgs.push(Outgoing::AuthFailed { error: s, request_id: o });
            for recovery in [None, Some(Recovery { recovered: i % 2 == 0, missed: n })] {
                for snapshot in [None, Some(i)] {
                    let names = [Names::One(s), Names::Many(&many[..i.max(1)])];
                    for names in names {
                        msgs.push(Outgoing::Subscribed { names, snapshot, recovery, request_id: o });
                    }
                }
            }
            msgs.push(Outgoing::Unsubscribed { names: Names::One(s), request_id: o });
            msgs.push(Outgoing::Unsubscribed { names: Names::Many(&many[i..]), request_id: o });
            msgs.push(Outgoing::Pong { now_ms: n, request_id: o });
            for code in [ErrorCode::InvalidMessage, ErrorCode::RateLimited, ErrorCode::UnknownChannel] {
                let retry = (i % 2 == 1).then_some(n);
                msgs.push(Outgoing::Error {
                    code,
                    message: s,
                    request_id: o,
                    retry_after_ms: retry,
                    channel: opts(i + 2),
                });
            }
        }
        let (mut json, mut out) = (Vec::new(), Vec::new());
        for (i, msg) in msgs.iter().enumerate() {
            let id = strings[(i * 7) % strings.len()];
            let now = u64::MAX - i as u64;
            out.clear();
            encode_outgoing(msg, id, now, &mut json, &mut out);
            let want = reference::encode_json(msg, id, now);
            assert_eq!(String::from_utf8_lossy(&json), String::from_utf8_lossy(&want), "message {i}: {msg:?}");
            let mut framed = Vec::new();
            encode_frame(OP_TEXT, &want, &mut framed);
            assert_eq!(out, framed, "message {i}: the frame around it");
        }
        assert!(msgs.len() > 200, "{} messages", msgs.len());
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
