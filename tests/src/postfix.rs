//! A real Postfix (Debian's package) running as a test peer: its own config, queue and mail
//! directories under a temp dir, one loopback listener, a certificate from the test CA.
//! Used as a receiving MX (mail lands in a Maildir the test reads) and, by the benchmark, as the
//! relay Sealpost is compared with. Needs root and the `postfix` package (CI installs it).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running Postfix instance; stopped on drop.
pub struct Postfix {
    dir: tempfile::TempDir,
    listen: SocketAddr,
}

/// How to configure an instance.
#[derive(Debug, Clone)]
pub struct PostfixOptions {
    /// Address of the SMTP listener (any 127.0.0.0/8 address).
    pub listen: SocketAddr,
    /// `myhostname`.
    pub hostname: String,
    /// PEM certificate chain for `smtpd_tls_cert_file`.
    pub cert_chain: PathBuf,
    /// PEM key for `smtpd_tls_key_file`.
    pub key: PathBuf,
    /// Domains whose mail is stored in the instance's Maildir.
    pub mailbox_domains: Vec<String>,
    /// Further `main.cf` lines (`name = value`).
    pub extra_main_cf: Vec<String>,
}

fn postfix_ids() -> (u32, u32) {
    let out = Command::new("id").arg("-u").arg("postfix").output();
    let uid = out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            panic!("no `postfix` user: install Debian's postfix package (see .ci/run)")
        });
    let out = Command::new("id").arg("-g").arg("postfix").output();
    let gid = out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(uid);
    (uid, gid)
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} (tests need root): {e}", path.display()));
}

/// The `main.cf` lines every instance in a temp dir needs: its queue, data and log under
/// `base`, Debian's postfix user, loopback networks, no local delivery.
pub fn instance_main_cf(base: &Path, hostname: &str) -> String {
    let base = base.display();
    format!(
        "compatibility_level = 3.6\n\
         queue_directory = {base}/queue\n\
         data_directory = {base}/data\n\
         mail_owner = postfix\n\
         setgid_group = postdrop\n\
         inet_interfaces = all\n\
         inet_protocols = ipv4\n\
         myhostname = {hostname}\n\
         mydestination =\n\
         mynetworks = 127.0.0.0/8\n\
         maillog_file_prefixes = {base}\n\
         maillog_file = {base}/maillog\n"
    )
}

impl Postfix {
    /// Starts an instance and waits until it accepts connections.
    pub fn start(opts: PostfixOptions) -> Postfix {
        assert!(
            Path::new("/usr/sbin/postfix").exists(),
            "/usr/sbin/postfix missing: install Debian's postfix package (see .ci/run)"
        );
        let (uid, gid) = postfix_ids();
        let dir = tempfile::Builder::new()
            .prefix("sealpost-postfix-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir: {e}"));
        let base = dir.path();
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
            .unwrap_or_else(|e| panic!("chmod: {e}"));
        for sub in ["conf", "queue", "data", "mail"] {
            std::fs::create_dir(base.join(sub)).unwrap_or_else(|e| panic!("mkdir: {e}"));
        }
        chown(&base.join("data"), uid, gid);
        chown(&base.join("mail"), uid, gid);
        let main_cf = instance_main_cf(base, &opts.hostname)
            + &format!(
                "virtual_mailbox_domains = {domains}\n\
             virtual_mailbox_base = {base}/mail\n\
             virtual_mailbox_maps = static:inbox/\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n\
             smtpd_tls_cert_file = {cert}\n\
             smtpd_tls_key_file = {key}\n\
             smtpd_tls_security_level = may\n\
             smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
             {extra}\n",
                base = base.display(),
                domains = opts.mailbox_domains.join(", "),
                cert = opts.cert_chain.display(),
                key = opts.key.display(),
                extra = opts.extra_main_cf.join("\n"),
            );
        std::fs::write(base.join("conf/main.cf"), main_cf)
            .unwrap_or_else(|e| panic!("main.cf: {e}"));
        let master = std::fs::read_to_string("/etc/postfix/master.cf")
            .unwrap_or_else(|e| panic!("/etc/postfix/master.cf: {e}"));
        let service = format!("{} inet n - n - - smtpd", opts.listen);
        let master: String = master
            .lines()
            .map(|l| {
                if l.starts_with("smtp      inet") {
                    service.as_str()
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(base.join("conf/master.cf"), master + "\n")
            .unwrap_or_else(|e| panic!("master.cf: {e}"));
        let pf = Postfix {
            dir,
            listen: opts.listen,
        };
        let out = pf.postfix(&["start"]);
        assert!(
            out.status.success(),
            "postfix start failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            pf.log()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect_timeout(&pf.listen, Duration::from_millis(200)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "postfix did not listen on {}:\n{}",
                pf.listen,
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    fn postfix(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/sbin/postfix")
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running /usr/sbin/postfix: {e}"))
    }

    /// The SMTP listener address.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The instance's log (its `maillog_file`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Messages delivered to the Maildir so far, as stored (Postfix adds Return-Path, Delivered-To, Received).
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let new = self.dir.path().join("mail/inbox/new");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&new)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
    }

    /// Waits until at least `n` messages were delivered; panics with the log after `timeout`.
    pub fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.messages();
            if m.len() >= n {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "postfix got {} of {n} messages; log:\n{}",
                m.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.postfix(&["stop"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::{LeafSpec, TestCa};

    /// The harness itself: a message sent in plain SMTP lands in the Maildir.
    #[test]
    fn postfix_receives_into_maildir() {
        let work = tempfile::tempdir().unwrap();
        let ca = TestCa::new(work.path());
        let leaf = ca.issue("mx", &LeafSpec::new(&["mx.recv.test"]));
        let pf = Postfix::start(PostfixOptions {
            listen: "127.0.0.240:2526".parse().unwrap(),
            hostname: "mx.recv.test".into(),
            cert_chain: leaf.chain_pem.clone(),
            key: leaf.key_pem.clone(),
            mailbox_domains: vec!["recv.test".into()],
            extra_main_cf: vec![],
        });
        let mut s = std::net::TcpStream::connect(pf.addr()).unwrap();
        use std::io::{BufRead, BufReader, Write};
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut line = String::new();
        let mut expect = |r: &mut BufReader<std::net::TcpStream>, code: &str| loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert!(line.starts_with(code), "expected {code}, got {line:?}");
            if line.as_bytes().get(3) == Some(&b' ') {
                break;
            }
        };
        expect(&mut r, "220");
        for (cmd, code) in [
            ("EHLO t\r\n", "250"),
            ("MAIL FROM:<a@x.test>\r\n", "250"),
            ("RCPT TO:<b@recv.test>\r\n", "250"),
            ("DATA\r\n", "354"),
            ("Subject: harness\r\n\r\nbody-marker\r\n.\r\n", "250"),
        ] {
            s.write_all(cmd.as_bytes()).unwrap();
            expect(&mut r, code);
        }
        let msgs = pf.wait_for_messages(1, Duration::from_secs(20));
        assert!(String::from_utf8_lossy(&msgs[0]).contains("body-marker"));
    }
}
