//! SMTP commands as received by a server (RFC 5321 §4.1, with ESMTP parameters).

use crate::address::{parse_path, path_extent, AddressError, Mailbox, ReversePath};
use crate::reply::Reply;
use crate::status::EnhancedStatus;
use crate::xtext;

/// Longest ENVID value (RFC 3461 §4.4).
const MAX_ENVID_LEN: usize = 100;
/// Longest ORCPT value (RFC 3461 §4.2).
const MAX_ORCPT_LEN: usize = 500;
/// Longest parameter keyword echoed back in a reply.
const MAX_ECHO: usize = 20;

/// Session facts that change how a command line is parsed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ParseOptions {
    /// The MAIL command of the current transaction asked for SMTPUTF8 (allows UTF-8 in RCPT).
    pub smtputf8: bool,
}

/// A parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain`: the client's name as given (not validated beyond being non-empty).
    Ehlo(String),
    /// `HELO domain`.
    Helo(String),
    /// `MAIL FROM:<path> params`.
    Mail {
        /// The reverse path.
        from: ReversePath,
        /// ESMTP parameters.
        params: MailParams,
    },
    /// `RCPT TO:<path> params`.
    Rcpt {
        /// The recipient (source route dropped).
        to: Mailbox,
        /// ESMTP parameters.
        params: RcptParams,
    },
    /// `DATA`.
    Data,
    /// `BDAT ...` (CHUNKING): recognised only so it can be refused; arguments are ignored.
    Bdat,
    /// `RSET`.
    Rset,
    /// `NOOP [string]` (the argument is ignored).
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY string`.
    Vrfy(String),
    /// `EXPN string`.
    Expn(String),
    /// `HELP [string]`.
    Help(Option<String>),
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954); the mechanism is upper-cased.
    Auth {
        /// SASL mechanism name, upper case.
        mechanism: String,
        /// Initial response as sent (base64, or `=` for an empty one).
        initial: Option<String>,
    },
}

/// The message body type declared with `BODY=` (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// What a DSN should return of the message (`RET=`, RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ret {
    /// `RET=FULL`: the whole message.
    Full,
    /// `RET=HDRS`: only the headers.
    Hdrs,
}

/// When DSNs are requested for a recipient (`NOTIFY=`, RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notify {
    /// `NOTIFY=NEVER`.
    Never,
    /// A non-empty set of conditions.
    On {
        /// `SUCCESS`.
        success: bool,
        /// `FAILURE`.
        failure: bool,
        /// `DELAY`.
        delay: bool,
    },
}

/// Parameters of `MAIL FROM`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MailParams {
    /// `SIZE=`: declared message size in octets (RFC 1870).
    pub size: Option<u64>,
    /// `BODY=`.
    pub body: Option<BodyType>,
    /// `SMTPUTF8` (RFC 6531).
    pub smtputf8: bool,
    /// `RET=`.
    pub ret: Option<Ret>,
    /// `ENVID=`, xtext-decoded.
    pub envid: Option<String>,
    /// `REQUIRETLS` (RFC 8689).
    pub requiretls: bool,
    /// `AUTH=` (RFC 4954), kept as sent.
    pub auth: Option<String>,
}

/// Parameters of `RCPT TO`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RcptParams {
    /// `NOTIFY=`.
    pub notify: Option<Notify>,
    /// `ORCPT=` as `addr-type;address` with the address xtext-decoded.
    pub orcpt: Option<String>,
}

/// Why a command line was refused; [`CommandError::reply`] gives the reply to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// A NUL byte in the line (500 5.5.2).
    #[error("NUL byte in command")]
    NulByte,
    /// The verb is not a known command (500 5.5.1). The input is not kept: it may be message text.
    #[error("unknown command")]
    UnknownVerb,
    /// Non-ASCII bytes in a command that does not allow them (500 5.5.2).
    #[error("8-bit characters without SMTPUTF8")]
    NonAscii,
    /// Malformed command arguments (501 5.5.4).
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// Bad MAIL address (501 5.1.7; non-ASCII without SMTPUTF8: 553 5.6.7).
    #[error("bad sender address: {0}")]
    MailAddress(AddressError),
    /// Bad RCPT address (501 5.1.3).
    #[error("bad recipient address: {0}")]
    RcptAddress(AddressError),
    /// An unknown parameter for this command (555 5.5.4); holds the sanitised keyword.
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// A known parameter with a value we do not support, e.g. `BODY=BINARYMIME` (555 5.5.4).
    #[error("unsupported value for parameter {0}")]
    UnsupportedValue(String),
    /// A parameter given twice (501 5.5.4).
    #[error("duplicate parameter {0}")]
    DuplicateParameter(String),
    /// A known parameter with a malformed value (501 5.5.4).
    #[error("invalid value for parameter {0}")]
    InvalidParameter(String),
}

impl CommandError {
    /// The reply a server should send for this error.
    pub fn reply(&self) -> Reply {
        use EnhancedStatus as S;
        match self {
            CommandError::NulByte => Reply::new(500, Some(S::SYNTAX), "NUL characters not allowed"),
            CommandError::UnknownVerb => {
                Reply::new(500, Some(S::INVALID_COMMAND), "Command unrecognized")
            }
            CommandError::NonAscii => Reply::new(
                500,
                Some(S::SYNTAX),
                "8-bit characters not allowed without SMTPUTF8",
            ),
            CommandError::Syntax(why) => Reply::new(
                501,
                Some(S::INVALID_ARGUMENTS),
                &format!("Syntax error: {why}"),
            ),
            CommandError::MailAddress(AddressError::NonAscii)
            | CommandError::RcptAddress(AddressError::NonAscii) => Reply::new(
                553,
                Some(S::NON_ASCII_ADDRESS),
                "Non-ASCII address requires SMTPUTF8",
            ),
            CommandError::MailAddress(e) => Reply::new(
                501,
                Some(S::BAD_SENDER_SYNTAX),
                &format!("Bad sender address syntax: {e}"),
            ),
            CommandError::RcptAddress(e) => Reply::new(
                501,
                Some(S::BAD_RCPT_SYNTAX),
                &format!("Bad recipient address syntax: {e}"),
            ),
            CommandError::UnknownParameter(k) => Reply::new(
                555,
                Some(S::INVALID_ARGUMENTS),
                &format!("Unsupported parameter {k}"),
            ),
            CommandError::UnsupportedValue(k) => Reply::new(
                555,
                Some(S::INVALID_ARGUMENTS),
                &format!("Unsupported value for parameter {k}"),
            ),
            CommandError::DuplicateParameter(k) => Reply::new(
                501,
                Some(S::INVALID_ARGUMENTS),
                &format!("Duplicate parameter {k}"),
            ),
            CommandError::InvalidParameter(k) => Reply::new(
                501,
                Some(S::INVALID_ARGUMENTS),
                &format!("Invalid value for parameter {k}"),
            ),
        }
    }
}

/// A keyword made safe to echo: upper case, at most 20 characters, others replaced by `?`.
fn echo(keyword: &[u8]) -> String {
    let mut out: String = keyword
        .iter()
        .take(MAX_ECHO)
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b == b'-' {
                char::from(b.to_ascii_uppercase())
            } else {
                '?'
            }
        })
        .collect();
    if keyword.len() > MAX_ECHO {
        out.push_str("...");
    }
    out
}

/// ASCII bytes as a string (callers have checked they are ASCII).
fn ascii(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Strips a case-insensitive ASCII prefix.
fn strip_prefix_ci<'a>(bytes: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    let (head, tail) = bytes.split_at_checked(prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then_some(tail)
}

/// Drops leading spaces.
fn trim_start(mut bytes: &[u8]) -> &[u8] {
    while let [b' ', rest @ ..] = bytes {
        bytes = rest;
    }
    bytes
}

/// Drops trailing spaces and tabs.
fn trim_end(mut bytes: &[u8]) -> &[u8] {
    while let [rest @ .., b' ' | b'\t'] = bytes {
        bytes = rest;
    }
    bytes
}

/// One `keyword[=value]` parameter.
struct Param<'a> {
    keyword: &'a [u8],
    value: Option<&'a [u8]>,
}

/// Splits parameters at spaces and checks the esmtp-param grammar.
fn split_params(bytes: &[u8]) -> Result<Vec<Param<'_>>, CommandError> {
    let mut out = Vec::new();
    for token in bytes.split(|&b| b == b' ').filter(|t| !t.is_empty()) {
        let (keyword, value) = match token.iter().position(|&b| b == b'=') {
            Some(i) => (
                token.get(..i).unwrap_or_default(),
                Some(token.get(i + 1..).unwrap_or_default()),
            ),
            None => (token, None),
        };
        let keyword_ok = keyword.first().is_some_and(u8::is_ascii_alphanumeric)
            && keyword
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
        if !keyword_ok {
            return Err(CommandError::Syntax("malformed parameter"));
        }
        if let Some(v) = value {
            if v.is_empty() || !v.iter().all(|&b| (33..=126).contains(&b) && b != b'=') {
                return Err(CommandError::InvalidParameter(echo(keyword)));
            }
        }
        out.push(Param { keyword, value });
    }
    Ok(out)
}

/// The value of a parameter that needs one.
fn required<'a>(p: &Param<'a>) -> Result<&'a [u8], CommandError> {
    p.value
        .ok_or_else(|| CommandError::InvalidParameter(echo(p.keyword)))
}

/// Fails when a flag parameter carries a value.
fn flag(p: &Param<'_>) -> Result<bool, CommandError> {
    match p.value {
        None => Ok(true),
        Some(_) => Err(CommandError::InvalidParameter(echo(p.keyword))),
    }
}

/// Stores `value` into `slot` unless it is already set.
fn set_once<T>(slot: &mut Option<T>, value: T, keyword: &[u8]) -> Result<(), CommandError> {
    if slot.is_some() {
        return Err(CommandError::DuplicateParameter(echo(keyword)));
    }
    *slot = Some(value);
    Ok(())
}

/// Sets a flag unless it is already set.
fn set_flag(slot: &mut bool, p: &Param<'_>) -> Result<(), CommandError> {
    if *slot {
        return Err(CommandError::DuplicateParameter(echo(p.keyword)));
    }
    *slot = flag(p)?;
    Ok(())
}

/// Parses the parameters of MAIL FROM.
fn mail_params(bytes: &[u8]) -> Result<MailParams, CommandError> {
    let mut params = MailParams::default();
    for p in split_params(bytes)? {
        let kw = p.keyword.to_ascii_uppercase();
        let invalid = || CommandError::InvalidParameter(echo(p.keyword));
        match kw.as_slice() {
            b"SIZE" => {
                let v = required(&p)?;
                if v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
                    return Err(invalid());
                }
                let size = ascii(v).parse::<u64>().map_err(|_| invalid())?;
                set_once(&mut params.size, size, p.keyword)?;
            }
            b"BODY" => {
                let v = required(&p)?.to_ascii_uppercase();
                let body = match v.as_slice() {
                    b"7BIT" => BodyType::SevenBit,
                    b"8BITMIME" => BodyType::EightBitMime,
                    b"BINARYMIME" => {
                        return Err(CommandError::UnsupportedValue("BODY".into()));
                    }
                    _ => return Err(invalid()),
                };
                set_once(&mut params.body, body, p.keyword)?;
            }
            b"RET" => {
                let v = required(&p)?.to_ascii_uppercase();
                let ret = match v.as_slice() {
                    b"FULL" => Ret::Full,
                    b"HDRS" => Ret::Hdrs,
                    _ => return Err(invalid()),
                };
                set_once(&mut params.ret, ret, p.keyword)?;
            }
            b"ENVID" => {
                let v = required(&p)?;
                if v.len() > MAX_ENVID_LEN {
                    return Err(invalid());
                }
                let envid = xtext::decode(v).map_err(|_| invalid())?;
                set_once(&mut params.envid, envid, p.keyword)?;
            }
            b"AUTH" => {
                let v = ascii(required(&p)?);
                set_once(&mut params.auth, v, p.keyword)?;
            }
            b"SMTPUTF8" => set_flag(&mut params.smtputf8, &p)?,
            b"REQUIRETLS" => set_flag(&mut params.requiretls, &p)?,
            _ => return Err(CommandError::UnknownParameter(echo(p.keyword))),
        }
    }
    Ok(params)
}

/// Parses the parameters of RCPT TO.
fn rcpt_params(bytes: &[u8]) -> Result<RcptParams, CommandError> {
    let mut params = RcptParams::default();
    for p in split_params(bytes)? {
        let kw = p.keyword.to_ascii_uppercase();
        let invalid = || CommandError::InvalidParameter(echo(p.keyword));
        match kw.as_slice() {
            b"NOTIFY" => {
                let v = required(&p)?.to_ascii_uppercase();
                let notify = parse_notify(&v).ok_or_else(invalid)?;
                set_once(&mut params.notify, notify, p.keyword)?;
            }
            b"ORCPT" => {
                let v = required(&p)?;
                if v.len() > MAX_ORCPT_LEN {
                    return Err(invalid());
                }
                let semi = v.iter().position(|&b| b == b';').ok_or_else(invalid)?;
                let addr_type = v.get(..semi).unwrap_or_default();
                let addr = v.get(semi + 1..).unwrap_or_default();
                let type_ok = addr_type.first().is_some_and(u8::is_ascii_alphanumeric)
                    && addr_type
                        .iter()
                        .all(|&b| b.is_ascii_alphanumeric() || b == b'-');
                if !type_ok || addr.is_empty() {
                    return Err(invalid());
                }
                let decoded = xtext::decode(addr).map_err(|_| invalid())?;
                let orcpt = format!("{};{decoded}", ascii(addr_type));
                set_once(&mut params.orcpt, orcpt, p.keyword)?;
            }
            _ => return Err(CommandError::UnknownParameter(echo(p.keyword))),
        }
    }
    Ok(params)
}

/// Parses an upper-cased NOTIFY value.
fn parse_notify(v: &[u8]) -> Option<Notify> {
    if v == b"NEVER" {
        return Some(Notify::Never);
    }
    let (mut success, mut failure, mut delay) = (false, false, false);
    for item in v.split(|&b| b == b',') {
        let slot = match item {
            b"SUCCESS" => &mut success,
            b"FAILURE" => &mut failure,
            b"DELAY" => &mut delay,
            _ => return None,
        };
        if *slot {
            return None;
        }
        *slot = true;
    }
    Some(Notify::On {
        success,
        failure,
        delay,
    })
}

/// Splits `<path> params`, checking that a space separates them.
fn split_path(
    args: &[u8],
    err: fn(AddressError) -> CommandError,
) -> Result<(&[u8], &[u8]), CommandError> {
    let args = trim_start(args);
    let end = path_extent(args).ok_or(err(AddressError::Syntax("path must be enclosed in <>")))?;
    let (path, params) = args.split_at_checked(end).unwrap_or((args, &[]));
    if !params.is_empty() && params.first() != Some(&b' ') {
        return Err(CommandError::Syntax("a space must follow the address"));
    }
    Ok((path, params))
}

/// `MAIL FROM:<path> params`.
fn parse_mail(args: &[u8]) -> Result<Command, CommandError> {
    let args =
        strip_prefix_ci(args, b"FROM:").ok_or(CommandError::Syntax("expected FROM:<address>"))?;
    let (path, params_bytes) = split_path(args, CommandError::MailAddress)?;
    let wants_utf8 = params_bytes
        .split(|&b| b == b' ')
        .any(|t| t.eq_ignore_ascii_case(b"SMTPUTF8"));
    if !params_bytes.is_ascii() {
        return Err(if wants_utf8 {
            CommandError::Syntax("non-ASCII parameter")
        } else {
            CommandError::NonAscii
        });
    }
    let params = mail_params(params_bytes)?;
    let from = match parse_path(path, params.smtputf8).map_err(CommandError::MailAddress)? {
        None => ReversePath::Null,
        Some(m) => ReversePath::Mailbox(m),
    };
    Ok(Command::Mail { from, params })
}

/// `RCPT TO:<path> params`.
fn parse_rcpt(args: &[u8], opts: ParseOptions) -> Result<Command, CommandError> {
    let args =
        strip_prefix_ci(args, b"TO:").ok_or(CommandError::Syntax("expected TO:<address>"))?;
    let (path, params_bytes) = split_path(args, CommandError::RcptAddress)?;
    if !params_bytes.is_ascii() {
        return Err(CommandError::Syntax("non-ASCII parameter"));
    }
    let params = rcpt_params(params_bytes)?;
    let to = parse_path(path, opts.smtputf8)
        .map_err(CommandError::RcptAddress)?
        .ok_or(CommandError::RcptAddress(AddressError::Syntax(
            "empty recipient",
        )))?;
    Ok(Command::Rcpt { to, params })
}

/// `AUTH mechanism [initial-response]`.
fn parse_auth(args: &[u8]) -> Result<Command, CommandError> {
    let mut words = args.split(|&b| b == b' ').filter(|w| !w.is_empty());
    let mechanism = words
        .next()
        .ok_or(CommandError::Syntax("AUTH needs a mechanism"))?;
    let mech_ok = mechanism.len() <= 20
        && mechanism.iter().all(|&b| {
            b.is_ascii_uppercase()
                || b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'-'
                || b == b'_'
        });
    if !mech_ok {
        return Err(CommandError::Syntax("bad SASL mechanism name"));
    }
    let initial = words.next().map(ascii);
    if words.next().is_some() {
        return Err(CommandError::Syntax("too many AUTH arguments"));
    }
    Ok(Command::Auth {
        mechanism: ascii(mechanism).to_ascii_uppercase(),
        initial,
    })
}

impl Command {
    /// The command's verb in upper case (safe to log: it carries no arguments).
    pub fn verb(&self) -> &'static str {
        match self {
            Command::Ehlo(_) => "EHLO",
            Command::Helo(_) => "HELO",
            Command::Mail { .. } => "MAIL",
            Command::Rcpt { .. } => "RCPT",
            Command::Data => "DATA",
            Command::Bdat => "BDAT",
            Command::Rset => "RSET",
            Command::Noop => "NOOP",
            Command::Quit => "QUIT",
            Command::Vrfy(_) => "VRFY",
            Command::Expn(_) => "EXPN",
            Command::Help(_) => "HELP",
            Command::StartTls => "STARTTLS",
            Command::Auth { .. } => "AUTH",
        }
    }

    /// Parses a command line given without its CRLF.
    pub fn parse(line: &[u8], opts: ParseOptions) -> Result<Command, CommandError> {
        if line.contains(&0) {
            return Err(CommandError::NulByte);
        }
        let line = trim_end(line);
        let (verb, args) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (
                line.get(..i).unwrap_or_default(),
                Some(trim_start(line.get(i + 1..).unwrap_or_default())),
            ),
            None => (line, None),
        };
        if !verb.is_ascii() {
            return Err(CommandError::NonAscii);
        }
        let verb = verb.to_ascii_uppercase();
        let args = args.filter(|a| !a.is_empty());
        match verb.as_slice() {
            b"MAIL" => return parse_mail(args.unwrap_or_default()),
            b"RCPT" => {
                if !opts.smtputf8 && !line.is_ascii() {
                    // 8-bit in the address is an address the session cannot take (553 5.6.7,
                    // RFC 6531 §3.4); 8-bit elsewhere is a malformed command (500 5.5.2).
                    let first_8bit = line
                        .iter()
                        .position(|b| !b.is_ascii())
                        .unwrap_or(line.len());
                    let path_end = line.iter().position(|&b| b == b'>').unwrap_or(line.len());
                    return Err(if first_8bit < path_end {
                        CommandError::RcptAddress(AddressError::NonAscii)
                    } else {
                        CommandError::NonAscii
                    });
                }
                return parse_rcpt(args.unwrap_or_default(), opts);
            }
            _ => {}
        }
        let known = [
            &b"EHLO"[..],
            b"HELO",
            b"DATA",
            b"BDAT",
            b"RSET",
            b"NOOP",
            b"QUIT",
            b"VRFY",
            b"EXPN",
            b"HELP",
            b"STARTTLS",
            b"AUTH",
        ];
        if !known.contains(&verb.as_slice()) {
            return Err(CommandError::UnknownVerb);
        }
        if !line.is_ascii() {
            return Err(CommandError::NonAscii);
        }
        let no_args = |cmd: Command| match args {
            None => Ok(cmd),
            Some(_) => Err(CommandError::Syntax("this command takes no argument")),
        };
        let needs_arg = |why: &'static str| args.map(ascii).ok_or(CommandError::Syntax(why));
        match verb.as_slice() {
            b"EHLO" => Ok(Command::Ehlo(needs_arg("EHLO needs a domain")?)),
            b"HELO" => Ok(Command::Helo(needs_arg("HELO needs a domain")?)),
            b"DATA" => no_args(Command::Data),
            b"RSET" => no_args(Command::Rset),
            b"QUIT" => no_args(Command::Quit),
            b"STARTTLS" => no_args(Command::StartTls),
            b"BDAT" => Ok(Command::Bdat),
            b"NOOP" => Ok(Command::Noop),
            b"VRFY" => Ok(Command::Vrfy(needs_arg("VRFY needs an argument")?)),
            b"EXPN" => Ok(Command::Expn(needs_arg("EXPN needs an argument")?)),
            b"HELP" => Ok(Command::Help(args.map(ascii))),
            _ => parse_auth(args.unwrap_or_default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Result<Command, CommandError> {
        Command::parse(line.as_bytes(), ParseOptions::default())
    }

    fn parse_utf8(line: &str) -> Result<Command, CommandError> {
        Command::parse(line.as_bytes(), ParseOptions { smtputf8: true })
    }

    fn mailbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn code(e: CommandError) -> (u16, String) {
        let r = e.reply();
        (r.code, r.status.map(|s| s.to_string()).unwrap_or_default())
    }

    #[test]
    fn simple_verbs_case_insensitive() {
        assert_eq!(parse("data"), Ok(Command::Data));
        assert_eq!(parse("RsEt"), Ok(Command::Rset));
        assert_eq!(parse("QUIT"), Ok(Command::Quit));
        assert_eq!(parse("StartTLS"), Ok(Command::StartTls));
        assert_eq!(parse("NOOP"), Ok(Command::Noop));
        assert_eq!(parse("NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse("BDAT 100 LAST"), Ok(Command::Bdat));
        assert_eq!(parse("QUIT  "), Ok(Command::Quit));
        assert_eq!(parse("HELP"), Ok(Command::Help(None)));
        assert_eq!(parse("HELP mail"), Ok(Command::Help(Some("mail".into()))));
        assert_eq!(
            parse("ehlo client.example"),
            Ok(Command::Ehlo("client.example".into()))
        );
        assert_eq!(
            parse("HELO [192.0.2.1]"),
            Ok(Command::Helo("[192.0.2.1]".into()))
        );
        assert_eq!(
            parse("VRFY postmaster"),
            Ok(Command::Vrfy("postmaster".into()))
        );
        assert_eq!(parse("EXPN staff"), Ok(Command::Expn("staff".into())));
        assert_eq!(parse("starttls").map(|c| c.verb()), Ok("STARTTLS"));
        assert_eq!(parse("MAIL FROM:<>").map(|c| c.verb()), Ok("MAIL"));
    }

    #[test]
    fn argument_count_errors() {
        for bad in [
            "DATA now",
            "RSET x",
            "QUIT x",
            "STARTTLS x",
            "EHLO",
            "HELO  ",
            "VRFY",
            "EXPN",
        ] {
            assert!(matches!(parse(bad), Err(CommandError::Syntax(_))), "{bad}");
            assert_eq!(code(parse(bad).unwrap_err()), (501, "5.5.4".into()));
        }
    }

    #[test]
    fn auth_command() {
        assert_eq!(
            parse("AUTH plain AGFAYg=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGFAYg==".into())
            })
        );
        assert_eq!(
            parse("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            })
        );
        assert_eq!(
            parse("AUTH PLAIN ="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("=".into())
            })
        );
        for bad in ["AUTH", "AUTH PLAIN a b", "AUTH PL@IN"] {
            assert!(matches!(parse(bad), Err(CommandError::Syntax(_))), "{bad}");
        }
    }

    #[test]
    fn unknown_verb_and_nul() {
        assert_eq!(parse("FOO bar"), Err(CommandError::UnknownVerb));
        assert_eq!(
            parse("Subject: lab results"),
            Err(CommandError::UnknownVerb)
        );
        assert_eq!(parse(""), Err(CommandError::UnknownVerb));
        assert_eq!(code(CommandError::UnknownVerb), (500, "5.5.1".into()));
        // The reply never echoes the input (it may be message text).
        assert!(!CommandError::UnknownVerb.reply().text().contains("Subject"));
        assert_eq!(
            Command::parse(b"NOOP\0", ParseOptions::default()),
            Err(CommandError::NulByte)
        );
        assert_eq!(
            Command::parse(b"MAIL FROM:<a\0@b.c>", ParseOptions::default()),
            Err(CommandError::NulByte)
        );
        assert_eq!(code(CommandError::NulByte), (500, "5.5.2".into()));
    }

    #[test]
    fn mail_from_variants() {
        assert_eq!(
            parse("MAIL FROM:<a@b.example>"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("a", "b.example")),
                params: MailParams::default()
            })
        );
        assert_eq!(
            parse("mail from: <>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                params: MailParams::default()
            })
        );
        assert_eq!(
            parse("MAIL FROM:<@relay.example:a@b.example> SIZE=100"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("a", "b.example")),
                params: MailParams {
                    size: Some(100),
                    ..MailParams::default()
                }
            })
        );
    }

    #[test]
    fn mail_parameters() {
        let Ok(Command::Mail { params, .. }) = parse(
            "MAIL FROM:<a@b.c> size=12345 BODY=8bitmime SMTPUTF8 RET=hdrs ENVID=QQ+2B1 REQUIRETLS AUTH=<>",
        ) else {
            panic!("did not parse");
        };
        assert_eq!(
            params,
            MailParams {
                size: Some(12345),
                body: Some(BodyType::EightBitMime),
                smtputf8: true,
                ret: Some(Ret::Hdrs),
                envid: Some("QQ+1".into()),
                requiretls: true,
                auth: Some("<>".into()),
            }
        );
        let Ok(Command::Mail { params, .. }) = parse("MAIL FROM:<a@b.c> BODY=7BIT RET=FULL") else {
            panic!("did not parse");
        };
        assert_eq!(params.body, Some(BodyType::SevenBit));
        assert_eq!(params.ret, Some(Ret::Full));
    }

    #[test]
    fn mail_parameter_errors() {
        let cases: &[(&str, CommandError, (u16, &str))] = &[
            (
                "MAIL FROM:<a@b.c> BODY=BINARYMIME",
                CommandError::UnsupportedValue("BODY".into()),
                (555, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> XFORWARD=1",
                CommandError::UnknownParameter("XFORWARD".into()),
                (555, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> NOTIFY=NEVER",
                CommandError::UnknownParameter("NOTIFY".into()),
                (555, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=1 SIZE=2",
                CommandError::DuplicateParameter("SIZE".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SMTPUTF8 smtputf8",
                CommandError::DuplicateParameter("SMTPUTF8".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=abc",
                CommandError::InvalidParameter("SIZE".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=99999999999999999999",
                CommandError::InvalidParameter("SIZE".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE",
                CommandError::InvalidParameter("SIZE".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SIZE=",
                CommandError::InvalidParameter("SIZE".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> BODY=9BIT",
                CommandError::InvalidParameter("BODY".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> RET=ALL",
                CommandError::InvalidParameter("RET".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> ENVID=a+zz",
                CommandError::InvalidParameter("ENVID".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> SMTPUTF8=yes",
                CommandError::InvalidParameter("SMTPUTF8".into()),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c> =x",
                CommandError::Syntax("malformed parameter"),
                (501, "5.5.4"),
            ),
            (
                "MAIL FROM:<a@b.c>SIZE=1",
                CommandError::Syntax("a space must follow the address"),
                (501, "5.5.4"),
            ),
            (
                "MAIL TO:<a@b.c>",
                CommandError::Syntax("expected FROM:<address>"),
                (501, "5.5.4"),
            ),
        ];
        for (line, err, (c, s)) in cases {
            let got = parse(line);
            assert_eq!(got.as_ref(), Err(err), "{line}");
            assert_eq!(code(err.clone()), (*c, (*s).to_string()), "{line}");
        }
        let long_envid = format!("MAIL FROM:<a@b.c> ENVID={}", "x".repeat(101));
        assert_eq!(
            parse(&long_envid),
            Err(CommandError::InvalidParameter("ENVID".into()))
        );
    }

    #[test]
    fn address_errors_pick_the_right_code() {
        let e = parse("MAIL FROM:a@b.c").unwrap_err();
        assert!(matches!(
            e,
            CommandError::MailAddress(AddressError::Syntax(_))
        ));
        assert_eq!(code(e), (501, "5.1.7".into()));
        let e = parse("RCPT TO:<a@@b.c>").unwrap_err();
        assert!(matches!(
            e,
            CommandError::RcptAddress(AddressError::Syntax(_))
        ));
        assert_eq!(code(e), (501, "5.1.3".into()));
        let e = parse("RCPT TO:<>").unwrap_err();
        assert_eq!(code(e), (501, "5.1.3".into()));
        let e = parse(&format!("RCPT TO:<{}@b.c>", "x".repeat(65))).unwrap_err();
        assert_eq!(e, CommandError::RcptAddress(AddressError::LocalTooLong));
        assert_eq!(code(e), (501, "5.1.3".into()));
    }

    #[test]
    fn non_ascii_rules() {
        // MAIL without SMTPUTF8: the address is refused with 553 5.6.7.
        let e = parse("MAIL FROM:<jörg@b.example>").unwrap_err();
        assert_eq!(e, CommandError::MailAddress(AddressError::NonAscii));
        assert_eq!(code(e), (553, "5.6.7".into()));
        // With SMTPUTF8 it is accepted.
        let Ok(Command::Mail { from, params }) = parse("MAIL FROM:<jörg@bücher.example> SMTPUTF8")
        else {
            panic!("did not parse");
        };
        assert!(params.smtputf8);
        assert_eq!(
            from,
            ReversePath::Mailbox(mailbox("jörg", "bücher.example"))
        );
        // Invalid UTF-8 is a syntax error even with SMTPUTF8.
        let e = Command::parse(
            b"MAIL FROM:<j\xc3@b.example> SMTPUTF8",
            ParseOptions::default(),
        )
        .unwrap_err();
        assert_eq!(e, CommandError::MailAddress(AddressError::InvalidUtf8));
        // Non-ASCII parameters.
        assert_eq!(
            parse("MAIL FROM:<a@b.c> ENVID=é"),
            Err(CommandError::NonAscii)
        );
        assert!(matches!(
            parse("MAIL FROM:<a@b.c> SMTPUTF8 ENVID=é"),
            Err(CommandError::Syntax(_))
        ));
        // RCPT depends on the transaction's MAIL.
        let e = parse("RCPT TO:<jörg@b.example>").unwrap_err();
        assert_eq!(e, CommandError::RcptAddress(AddressError::NonAscii));
        let r = e.reply();
        assert_eq!(
            (r.code, r.status),
            (553, Some(EnhancedStatus::NON_ASCII_ADDRESS))
        );
        let e = parse("RCPT TO:<j@b.example> ORCPT=rfc822;jörg@b.example").unwrap_err();
        assert_eq!(e, CommandError::NonAscii);
        let r = e.reply();
        assert_eq!((r.code, r.status), (500, Some(EnhancedStatus::SYNTAX)));
        assert_eq!(r.lines, ["8-bit characters not allowed without SMTPUTF8"]);
        assert_eq!(
            parse_utf8("RCPT TO:<jörg@b.example>"),
            Ok(Command::Rcpt {
                to: mailbox("jörg", "b.example"),
                params: RcptParams::default()
            })
        );
        // Other commands never take 8-bit text.
        assert_eq!(parse("EHLO bücher.example"), Err(CommandError::NonAscii));
        assert_eq!(parse_utf8("NOOP é"), Err(CommandError::NonAscii));
        assert_eq!(parse("NÖOP"), Err(CommandError::NonAscii));
    }

    #[test]
    fn rcpt_parameters() {
        assert_eq!(
            parse("rcpt to:<a@b.c> NOTIFY=success,DELAY ORCPT=rfc822;a+2Bx@b.c"),
            Ok(Command::Rcpt {
                to: mailbox("a", "b.c"),
                params: RcptParams {
                    notify: Some(Notify::On {
                        success: true,
                        failure: false,
                        delay: true
                    }),
                    orcpt: Some("rfc822;a+x@b.c".into()),
                }
            })
        );
        let Ok(Command::Rcpt { params, .. }) = parse("RCPT TO: <a@b.c> NOTIFY=NEVER") else {
            panic!("did not parse");
        };
        assert_eq!(params.notify, Some(Notify::Never));
        for (line, err) in [
            (
                "RCPT TO:<a@b.c> NOTIFY=NEVER,SUCCESS",
                CommandError::InvalidParameter("NOTIFY".into()),
            ),
            (
                "RCPT TO:<a@b.c> NOTIFY=SUCCESS,SUCCESS",
                CommandError::InvalidParameter("NOTIFY".into()),
            ),
            (
                "RCPT TO:<a@b.c> NOTIFY=",
                CommandError::InvalidParameter("NOTIFY".into()),
            ),
            (
                "RCPT TO:<a@b.c> NOTIFY=SOMETIMES",
                CommandError::InvalidParameter("NOTIFY".into()),
            ),
            (
                "RCPT TO:<a@b.c> NOTIFY=NEVER NOTIFY=NEVER",
                CommandError::DuplicateParameter("NOTIFY".into()),
            ),
            (
                "RCPT TO:<a@b.c> ORCPT=a@b.c",
                CommandError::InvalidParameter("ORCPT".into()),
            ),
            (
                "RCPT TO:<a@b.c> ORCPT=rfc822;",
                CommandError::InvalidParameter("ORCPT".into()),
            ),
            (
                "RCPT TO:<a@b.c> ORCPT=rfc822;a+G0",
                CommandError::InvalidParameter("ORCPT".into()),
            ),
            (
                "RCPT TO:<a@b.c> SIZE=10",
                CommandError::UnknownParameter("SIZE".into()),
            ),
            (
                "RCPT FROM:<a@b.c>",
                CommandError::Syntax("expected TO:<address>"),
            ),
        ] {
            assert_eq!(parse(line), Err(err), "{line}");
        }
    }

    #[test]
    fn error_texts_do_not_echo_long_or_binary_input() {
        let line = format!("MAIL FROM:<a@b.c> {}=1", "X".repeat(300));
        let e = parse(&line).unwrap_err();
        let wire = e.reply().to_wire();
        assert_eq!(e.reply().code, 555);
        assert!(wire.len() < 80, "{}", String::from_utf8_lossy(&wire));
        let e = Command::parse(b"MAIL FROM:<a@b.c> X\x01Y=1", ParseOptions::default()).unwrap_err();
        assert!(e
            .reply()
            .to_wire()
            .iter()
            .all(|&b| b == b'\r' || b == b'\n' || (32..127).contains(&b)));
        assert_eq!(echo(b"ab\x07c"), "AB?C");
    }
}
