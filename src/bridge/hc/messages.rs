//! The JSON messages of the listener control channel (the same types serve the bridge and
//! the test relay, so both sides agree on the wire form).
//!
//! `{"accept":{"address":"wss://…/$hc/{path}?sb-hc-action=accept&sb-hc-id=…","id":"…",
//! "connectHeaders":{…}}}` from the service; `{"renewToken":{"token":"SharedAccessSignature …"}}`
//! from the listener. Other commands (`request`, `response`: relayed HTTP, which the bridge
//! does not enable) are read as [`ControlMessage::Other`] and ignored.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Accept {
    pub address: String,
    pub id: String,
    #[serde(default)]
    pub connect_headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewToken {
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    Accept(Accept),
    RenewToken(RenewToken),
    /// A command the bridge does not use.
    Other,
}

/// The wire form: an object with one member named after the command.
#[derive(Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Wire {
    #[serde(skip_serializing_if = "Option::is_none")]
    accept: Option<Accept>,
    #[serde(skip_serializing_if = "Option::is_none")]
    renew_token: Option<RenewToken>,
}

impl ControlMessage {
    pub fn parse(text: &[u8]) -> Result<ControlMessage, serde_json::Error> {
        let wire: Wire = serde_json::from_slice(text)?;
        Ok(match (wire.accept, wire.renew_token) {
            (Some(accept), _) => ControlMessage::Accept(accept),
            (None, Some(renew)) => ControlMessage::RenewToken(renew),
            (None, None) => ControlMessage::Other,
        })
    }

    pub fn to_json(&self) -> String {
        let wire = match self {
            ControlMessage::Accept(accept) => Wire {
                accept: Some(accept.clone()),
                ..Wire::default()
            },
            ControlMessage::RenewToken(renew) => Wire {
                renew_token: Some(renew.clone()),
                ..Wire::default()
            },
            ControlMessage::Other => Wire::default(),
        };
        serde_json::to_string(&wire).expect("control messages serialise")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_accept_message_parses() {
        let text = br#"{"accept":{"address":"wss://dc-node.servicebus.windows.net:443/$hc/hyco?sb-hc-action=accept&sb-hc-id=4cb5","id":"4cb542c3-047a-4d40-a19f-bdc66441e736","connectHeaders":{"Host":"contoso.servicebus.windows.net:443","Sec-WebSocket-Key":"l8fWd829IrZbEqUcLejv+Q=="},"remoteEndpoint":{"address":"10.0.0.1","port":1234}}}"#;
        let ControlMessage::Accept(accept) = ControlMessage::parse(text).unwrap() else {
            panic!("not an accept");
        };
        assert_eq!(accept.id, "4cb542c3-047a-4d40-a19f-bdc66441e736");
        assert!(accept.address.ends_with("sb-hc-id=4cb5"));
        assert_eq!(
            accept.connect_headers["Sec-WebSocket-Key"],
            "l8fWd829IrZbEqUcLejv+Q=="
        );
    }

    #[test]
    fn renew_token_is_written_as_documented_and_requests_are_ignored() {
        let renew = ControlMessage::RenewToken(RenewToken {
            token: "SharedAccessSignature sr=a&sig=b&se=1&skn=k".into(),
        });
        assert_eq!(
            renew.to_json(),
            r#"{"renewToken":{"token":"SharedAccessSignature sr=a&sig=b&se=1&skn=k"}}"#
        );
        assert_eq!(
            ControlMessage::parse(br#"{"request":{"id":"1","body":false}}"#).unwrap(),
            ControlMessage::Other
        );
    }
}
