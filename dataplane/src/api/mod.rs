//! The shapes every layer shares: the internal request the ingress produces, the OpenAI-shaped
//! error, the JSON scan, and reading usage from responses.

pub(crate) mod error;
pub mod json;
pub mod request;
pub mod usage;
