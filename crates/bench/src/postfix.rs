//! Postfix from Debian's package as the comparison relay: its own config, queue and data
//! directories under a temp dir, an smtpd on a loopback address, and an smtp client that
//! relays everything to the sink with `secure` TLS (TLS 1.2+, HIGH ciphers, the bench CA,
//! certificate name checked against the sink's name).

use crate::error::BenchError;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where the Postfix binary is.
pub const POSTFIX: &str = "/usr/sbin/postfix";

/// True if Debian's postfix package is installed.
pub fn installed() -> bool {
    Path::new(POSTFIX).exists() && Path::new("/etc/postfix/master.cf").exists()
}

/// How to set up the instance.
#[derive(Debug, Clone)]
pub struct PostfixOptions {
    /// The smtpd listener (loopback).
    pub listen: SocketAddr,
    /// `myhostname`.
    pub hostname: String,
    /// The sink: `relayhost = [ip]:port`.
    pub relay: SocketAddr,
    /// The name the sink's certificate must carry (`match=` in the TLS policy).
    pub relay_name: String,
    /// The bench CA (`smtp_tls_CAfile`).
    pub ca_file: PathBuf,
    /// `smtp_tls_connection_reuse = yes` (through tlsproxy); Postfix's default is no, which
    /// means one TLS handshake per delivered message.
    pub tls_reuse: bool,
}

/// A running instance; stopped on drop.
#[derive(Debug)]
pub struct Postfix {
    dir: tempfile::TempDir,
    /// The smtpd listener.
    pub listen: SocketAddr,
}

fn id_of(flag: &str) -> Result<u32, BenchError> {
    let out = Command::new("id")
        .args([flag, "postfix"])
        .output()
        .map_err(|e| BenchError::io("running", "id", e))?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| BenchError::Program {
            program: "id postfix".into(),
            detail: "no `postfix` user: install Debian's postfix package".into(),
        })
}

/// The `main.cf` for the instance.
pub fn main_cf(base: &Path, o: &PostfixOptions) -> String {
    let common = sealpost_tests::postfix::instance_main_cf(base, &o.hostname);
    let base = base.display();
    common
        + &format!(
            "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
         smtpd_client_connection_count_limit = 0\n\
         relayhost = [{rip}]:{rport}\n\
         smtp_tls_security_level = secure\n\
         smtp_tls_mandatory_protocols = >=TLSv1.2\n\
         smtp_tls_mandatory_ciphers = high\n\
         smtp_tls_CAfile = {ca}\n\
         smtp_tls_policy_maps = texthash:{base}/conf/tls_policy\n\
         message_size_limit = 52428800\n\
         smtp_tls_connection_reuse = {reuse}\n",
            rip = o.relay.ip(),
            rport = o.relay.port(),
            ca = o.ca_file.display(),
            reuse = if o.tls_reuse { "yes" } else { "no" },
        )
}

/// The `master.cf`: Debian's, with the smtpd on `listen`, no chroot anywhere (the queue
/// lives in a temp dir, which has no chroot set-up) and, if asked, the `tlsproxy` service that
/// `smtp_tls_connection_reuse` needs (commented out in Debian's file).
pub fn master_cf(debian: &str, listen: SocketAddr, tlsproxy: bool) -> String {
    let mut out = String::new();
    for line in debian.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let is_service =
            !line.starts_with('#') && !line.starts_with(char::is_whitespace) && fields.len() >= 8;
        if tlsproxy && line.starts_with("#tlsproxy ") {
            out.push_str("tlsproxy unix - - n - 0 tlsproxy");
        } else if !is_service {
            out.push_str(line);
        } else if line.starts_with("smtp ") && fields.get(1) == Some(&"inet") {
            out.push_str(&format!("{listen} inet n - n - - smtpd"));
        } else {
            let mut f = fields.clone();
            if let Some(chroot) = f.get_mut(4) {
                *chroot = "n";
            }
            out.push_str(&f.join(" "));
        }
        out.push('\n');
    }
    out
}

impl Postfix {
    /// Writes the configuration, starts Postfix and waits until its smtpd answers.
    pub fn start(o: &PostfixOptions) -> Result<Postfix, BenchError> {
        let (uid, gid) = (id_of("-u")?, id_of("-g")?);
        let dir = tempfile::Builder::new()
            .prefix("sealpost-bench-postfix-")
            .tempdir()
            .map_err(|e| BenchError::io("creating", "temp dir", e))?;
        let base = dir.path().to_path_buf();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| BenchError::io("chmod", &base, e))?;
        for sub in ["conf", "queue", "data"] {
            let p = base.join(sub);
            std::fs::create_dir(&p).map_err(|e| BenchError::io("creating", &p, e))?;
        }
        let data = base.join("data");
        std::os::unix::fs::chown(&data, Some(uid), Some(gid))
            .map_err(|e| BenchError::io("chown (needs root)", &data, e))?;
        let write = |name: &str, text: String| {
            let p = base.join("conf").join(name);
            std::fs::write(&p, text).map_err(|e| BenchError::io("writing", p, e))
        };
        write("main.cf", main_cf(&base, o))?;
        let debian = std::fs::read_to_string("/etc/postfix/master.cf")
            .map_err(|e| BenchError::io("reading", "/etc/postfix/master.cf", e))?;
        write("master.cf", master_cf(&debian, o.listen, o.tls_reuse))?;
        write(
            "tls_policy",
            format!(
                "[{}]:{} secure match={}\n",
                o.relay.ip(),
                o.relay.port(),
                o.relay_name
            ),
        )?;
        let pf = Postfix {
            dir,
            listen: o.listen,
        };
        let out = pf.postfix(&["start"])?;
        if !out.status.success() {
            return Err(BenchError::Program {
                program: "postfix start".into(),
                detail: format!(
                    "{}{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    pf.log()
                ),
            });
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&pf.listen, Duration::from_millis(200)).is_err()
        {
            if Instant::now() > deadline {
                return Err(BenchError::Timeout {
                    what: format!("postfix to listen on {}", pf.listen),
                    secs: 30,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(pf)
    }

    fn postfix(&self, args: &[&str]) -> Result<std::process::Output, BenchError> {
        Command::new(POSTFIX)
            .arg("-c")
            .arg(self.dir.path().join("conf"))
            .args(args)
            .output()
            .map_err(|e| BenchError::io("running", POSTFIX, e))
    }

    /// The master process id.
    pub fn master_pid(&self) -> Result<u32, BenchError> {
        let p = self.dir.path().join("queue/pid/master.pid");
        let text = std::fs::read_to_string(&p).map_err(|e| BenchError::io("reading", &p, e))?;
        text.trim().parse().map_err(|_| BenchError::Program {
            program: "postfix".into(),
            detail: format!("{} does not hold a pid", p.display()),
        })
    }

    /// The instance's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Messages still in the queue (files under active, incoming, deferred).
    pub fn queued(&self) -> usize {
        ["incoming", "active", "deferred", "hold"]
            .iter()
            .map(|d| count_files(&self.dir.path().join("queue").join(d)))
            .sum()
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                count_files(&p)
            } else {
                1
            }
        })
        .sum()
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = self.postfix(&["stop"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_cf_moves_smtpd_and_drops_chroot() {
        let debian = "# comment\nsmtp      inet  n       -       y       -       -       smtpd\n\
                      cleanup   unix  n       -       y       -       0       cleanup\n  -o x=y\n";
        let m = master_cf(debian, "127.0.0.5:2525".parse().unwrap(), false);
        assert_eq!(
            m,
            "# comment\n127.0.0.5:2525 inet n - n - - smtpd\ncleanup unix n - n - 0 cleanup\n  -o x=y\n"
        );
        let with_proxy =
            format!("{debian}#tlsproxy  unix  -       -       y       -       0       tlsproxy\n");
        let m = master_cf(&with_proxy, "127.0.0.5:2525".parse().unwrap(), true);
        assert!(m.ends_with("\ntlsproxy unix - - n - 0 tlsproxy\n"), "{m}");
    }

    #[test]
    fn main_cf_has_the_issue_tls_settings() {
        let o = PostfixOptions {
            listen: "127.0.0.5:2525".parse().unwrap(),
            hostname: "postfix.bench.test".into(),
            relay: "127.0.0.1:3000".parse().unwrap(),
            relay_name: "mx.bench.test".into(),
            ca_file: "/x/ca.pem".into(),
            tls_reuse: false,
        };
        let cf = main_cf(Path::new("/b"), &o);
        for line in [
            "smtp_tls_security_level = secure",
            "smtp_tls_mandatory_protocols = >=TLSv1.2",
            "smtp_tls_mandatory_ciphers = high",
            "smtp_tls_CAfile = /x/ca.pem",
            "relayhost = [127.0.0.1]:3000",
            "smtp_tls_connection_reuse = no",
        ] {
            assert!(cf.lines().any(|l| l == line), "{line}");
        }
    }
}
