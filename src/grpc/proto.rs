//! Generated `piivault.v1` messages and services, plus redacting `Debug`
//! for the messages that carry values: `?request` in a log line shows
//! counts, never content.

#![allow(missing_docs, clippy::pedantic, clippy::default_trait_access)] // generated code

use std::fmt;

tonic::include_proto!("piivault.v1");

/// The encoded file descriptor set of `proto/`, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/piivault_descriptor.bin"));

impl fmt::Debug for TokenizeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenizeRequest")
            .field("collection", &self.collection)
            .field("values", &format_args!("<{} redacted>", self.values.len()))
            .finish()
    }
}

impl fmt::Debug for DetokenizeResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeResponse").field("results", &self.results).finish()
    }
}

impl fmt::Debug for DetokenizeResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetokenizeResult").field("outcome", &self.outcome).field("masked", &self.masked).finish()
    }
}

impl fmt::Debug for detokenize_result::Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Value(_) => f.write_str("Value(<redacted>)"),
            Self::Error(error) => f.debug_tuple("Error").field(error).finish(),
        }
    }
}

impl fmt::Debug for RotateRootKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RotateRootKeyRequest { <redacted> }")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_values() {
        let request = TokenizeRequest { collection: "card".into(), values: vec!["4111-SECRET".into(), "x".into()] };
        let shown = format!("{request:?}");
        assert_eq!(shown, "TokenizeRequest { collection: \"card\", values: <2 redacted> }");
        let response = DetokenizeResponse {
            results: vec![DetokenizeResult {
                outcome: Some(detokenize_result::Outcome::Value("4111-SECRET".into())),
                masked: false,
            }],
        };
        let shown = format!("{response:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("Value(<redacted>)"), "{shown}");
    }
}
