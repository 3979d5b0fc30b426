//! Close codes of PROTOCOL.md §9, and which codes a peer may put on the wire.

/// A WebSocket close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: Self = Self(1000);
    pub const GOING_AWAY: Self = Self(1001);
    pub const PROTOCOL: Self = Self(1002);
    pub const UNSUPPORTED: Self = Self(1003);
    pub const INVALID_DATA: Self = Self(1007);
    pub const TOO_BIG: Self = Self(1009);
    pub const INTERNAL: Self = Self(1011);
    pub const AUTH_FAILED: Self = Self(4001);
    pub const AUTH_TIMEOUT: Self = Self(4002);
    pub const RATE_LIMITED: Self = Self(4008);
    pub const SLOW_CONSUMER: Self = Self(4009);

    /// Codes an endpoint may send in a close frame (RFC 6455 §7.4).
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }

    /// The short reason text sent with the close frame.
    pub fn reason(self) -> &'static str {
        match self.0 {
            1000 => "normal closure",
            1001 => "server shutting down",
            1002 => "protocol error",
            1003 => "binary frames are not accepted",
            1007 => "invalid UTF-8",
            1009 => "message too big",
            1011 => "internal error",
            4001 => "authentication failed",
            4002 => "authentication timeout",
            4008 => "rate limited",
            4009 => "slow consumer",
            _ => "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity_follows_rfc_6455() {
        for ok in [1000, 1001, 1002, 1003, 1007, 1011, 3000, 4001, 4999] {
            assert!(CloseCode(ok).is_valid_on_wire(), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
    }
}
