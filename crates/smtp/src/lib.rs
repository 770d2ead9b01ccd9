//! The SMTP wire protocol shared by Sealpost's submission server and delivery client.
//!
//! Pure protocol, no TLS and no configuration: a strict CRLF line reader ([`LineReader`]),
//! command parsing ([`Command::parse`]) and formatting ([`mail_from_line`], [`rcpt_to_line`]),
//! replies with enhanced status codes ([`Reply`], [`read_reply`]), the DATA phase with
//! smuggling-proof framing ([`read_data`], [`write_data`]) and EHLO parsing ([`EhloInfo`]).

pub mod address;
pub mod codec;
pub mod command;
mod crlf;
pub mod data;
pub mod ehlo;
pub mod format;
pub mod reply;
pub mod status;
pub mod xtext;

pub use address::{AddressError, Mailbox, ReversePath};
pub use codec::{LineError, LineReader};
pub use command::{
    BodyType, Command, CommandError, MailParams, Notify, ParseOptions, RcptParams, Ret,
};
pub use data::{read_data, write_data, DataError, DataLimits};
pub use ehlo::EhloInfo;
pub use format::{mail_from_line, rcpt_to_line};
pub use reply::{read_reply, Reply, ReplyError};
pub use status::EnhancedStatus;

/// Longest command line, CRLF included (RFC 5321 §4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;
/// Longest text line in a message, CRLF included (RFC 5321 §4.5.3.1.6).
pub const MAX_TEXT_LINE: usize = 1000;
