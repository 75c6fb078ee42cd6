//! Sans-IO wire protocol: everything here works on byte slices, never on sockets or clocks.
//!
//! - [`http`]: the HTTP/1.1 front door: bounded request parser, routing, upgrade shape
//!   checks, credential extraction, subprotocol selection, client IP, responses.
//! - [`frame`]: RFC 6455 frame decoder (server side: masked input) and encoders.
//! - [`mask`]: XOR masking, a word-at-a-time path checked against a byte loop.
//! - [`utf8`]: incremental, fail-fast UTF-8 validation across chunks and fragments.
//! - [`close`]: close codes and their validity rules.
//! - [`deflate`]: permessage-deflate (RFC 7692): negotiation, compressor, bounded inflater.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod http;
pub mod mask;
pub mod utf8;
