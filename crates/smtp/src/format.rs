//! Command lines a client sends (the counterpart of [`crate::command`]).

use crate::address::{Mailbox, ReversePath};
use crate::command::{BodyType, MailParams, Notify, RcptParams, Ret};
use crate::xtext;

/// Builds `MAIL FROM:<from> [SIZE=] [BODY=] [SMTPUTF8] [REQUIRETLS] [RET=] [ENVID=] [AUTH=]\r\n`.
///
/// Only the parameters set in `params` are written; the caller leaves out what the server did
/// not advertise. ENVID is xtext-encoded; AUTH is written as given.
pub fn mail_from_line(from: &ReversePath, params: &MailParams) -> String {
    let mut line = format!("MAIL FROM:<{from}>");
    if let Some(size) = params.size {
        line.push_str(&format!(" SIZE={size}"));
    }
    match params.body {
        Some(BodyType::SevenBit) => line.push_str(" BODY=7BIT"),
        Some(BodyType::EightBitMime) => line.push_str(" BODY=8BITMIME"),
        None => {}
    }
    if params.smtputf8 {
        line.push_str(" SMTPUTF8");
    }
    if params.requiretls {
        line.push_str(" REQUIRETLS");
    }
    match params.ret {
        Some(Ret::Full) => line.push_str(" RET=FULL"),
        Some(Ret::Hdrs) => line.push_str(" RET=HDRS"),
        None => {}
    }
    if let Some(envid) = &params.envid {
        line.push_str(" ENVID=");
        line.push_str(&xtext::encode(envid));
    }
    if let Some(auth) = &params.auth {
        line.push_str(" AUTH=");
        line.push_str(auth);
    }
    line.push_str("\r\n");
    line
}

/// Builds `RCPT TO:<to> [NOTIFY=] [ORCPT=]\r\n`; the address part of ORCPT is xtext-encoded.
pub fn rcpt_to_line(to: &Mailbox, params: &RcptParams) -> String {
    let mut line = format!("RCPT TO:<{to}>");
    match params.notify {
        Some(Notify::Never) => line.push_str(" NOTIFY=NEVER"),
        Some(Notify::On {
            success,
            failure,
            delay,
        }) => {
            let items: Vec<&str> = [(success, "SUCCESS"), (failure, "FAILURE"), (delay, "DELAY")]
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, name)| *name)
                .collect();
            if !items.is_empty() {
                line.push_str(" NOTIFY=");
                line.push_str(&items.join(","));
            }
        }
        None => {}
    }
    if let Some(orcpt) = &params.orcpt {
        let (addr_type, addr) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
        line.push_str(" ORCPT=");
        line.push_str(addr_type);
        line.push(';');
        line.push_str(&xtext::encode(addr));
    }
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, ParseOptions};

    fn mailbox(s: &str) -> Mailbox {
        Mailbox::parse(s, true).unwrap()
    }

    #[test]
    fn mail_from_with_all_parameters() {
        let params = MailParams {
            size: Some(1234),
            body: Some(BodyType::EightBitMime),
            smtputf8: true,
            ret: Some(Ret::Hdrs),
            envid: Some("id+1=2 x".into()),
            requiretls: true,
            auth: Some("<>".into()),
        };
        let from = ReversePath::Mailbox(mailbox("a@b.example"));
        let line = mail_from_line(&from, &params);
        assert_eq!(
            line,
            "MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8 REQUIRETLS RET=HDRS \
             ENVID=id+2B1+3D2+20x AUTH=<>\r\n"
        );
        let parsed = Command::parse(line.trim_end().as_bytes(), ParseOptions::default()).unwrap();
        assert_eq!(parsed, Command::Mail { from, params });
    }

    #[test]
    fn null_sender_and_no_parameters() {
        assert_eq!(
            mail_from_line(&ReversePath::Null, &MailParams::default()),
            "MAIL FROM:<>\r\n"
        );
    }

    #[test]
    fn rcpt_to_round_trips_through_the_parser() {
        let to = mailbox("jörg@bücher.example");
        let params = RcptParams {
            notify: Some(Notify::On {
                success: true,
                failure: true,
                delay: false,
            }),
            orcpt: Some("rfc822;jörg+x@bücher.example".into()),
        };
        let line = rcpt_to_line(&to, &params);
        assert!(line.ends_with("ORCPT=rfc822;j+C3+B6rg+2Bx@b+C3+BCcher.example\r\n"));
        assert!(line.contains(" NOTIFY=SUCCESS,FAILURE "));
        let parsed =
            Command::parse(line.trim_end().as_bytes(), ParseOptions { smtputf8: true }).unwrap();
        assert_eq!(parsed, Command::Rcpt { to, params });
        let never = RcptParams {
            notify: Some(Notify::Never),
            orcpt: None,
        };
        assert_eq!(
            rcpt_to_line(&mailbox("a@b.c"), &never),
            "RCPT TO:<a@b.c> NOTIFY=NEVER\r\n"
        );
    }
}
