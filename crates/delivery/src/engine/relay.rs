//! The `smarthost:NAME` fallback step: relay recipients through a configured smarthost over
//! verified TLS (STARTTLS or implicit) with AUTH, auditing the attempt and each delivery.

use std::net::{IpAddr, SocketAddr};

use sealpost_audit::{Event, Json, Record};
use sealpost_queue::{Lease, LeasedRecipient, Outcome};

use super::Inner;
use crate::client::{open_at, OpenError, RcptResult, Session, Transaction, TxnRecipient};
use crate::dns::HostAddrs;
use crate::smarthost::SmarthostTarget;

/// What a smarthost round did: outcomes for the delivered recipients, the rest to continue
/// the chain with, and why they were not relayed.
pub(crate) struct Relayed {
    /// Delivered recipients.
    pub(crate) delivered: Vec<(usize, Outcome)>,
    /// Recipients the smarthost did not take.
    pub(crate) rest: Vec<LeasedRecipient>,
    /// Why (one line, for the next step's audit record and reason).
    pub(crate) why: String,
}

impl Inner {
    /// Relays `recipients` through the smarthost `name`.
    pub(crate) async fn relay(
        &self,
        lease: &Lease,
        name: &str,
        recipients: Vec<LeasedRecipient>,
        body: &[u8],
    ) -> Relayed {
        let failed = |rest: Vec<LeasedRecipient>, why: String| Relayed {
            delivered: Vec::new(),
            rest,
            why,
        };
        let Some(target) = self.smarthosts.get(name) else {
            return failed(
                recipients,
                format!("no smarthost named `{name}` is configured"),
            );
        };
        let credentials = match target.credentials() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(smarthost = name, error = %e, "smarthost credentials unreadable");
                return failed(recipients, format!("smarthost:{name}: {e}"));
            }
        };
        let ips = match self.resolver.addresses(&target.host).await {
            HostAddrs::Found(ips) => ips,
            HostAddrs::None(why) | HostAddrs::Temporary(why) => {
                return failed(recipients, format!("smarthost:{name}: {why}"));
            }
        };
        let mut failures = Vec::new();
        for ip in ips {
            match self.smarthost_session(lease, target, ip).await {
                Ok(mut session) => {
                    if let Some((user, password)) = &credentials {
                        if let Err(e) = session.authenticate(user, password).await {
                            tracing::warn!(queue_id = %lease.id, smarthost = name, error = %e, "smarthost AUTH failed");
                            self.audit(
                                Record::new(Event::Attempt)
                                    .queue_id(lease.id.to_string())
                                    .mx(target.host.clone())
                                    .ip(ip)
                                    .detail("via", target.step())
                                    .detail("error", format!("AUTH: {e}")),
                            )
                            .await;
                            session.quit().await;
                            failures.push(format!("{} [{ip}]: AUTH: {e}", target.host));
                            continue;
                        }
                    }
                    return self
                        .relay_transaction(lease, target, session, recipients, body)
                        .await;
                }
                Err(why) => failures.push(why),
            }
        }
        failed(
            recipients,
            format!("smarthost:{name}: {}", failures.join("; ")),
        )
    }

    /// A verified session to the smarthost at `ip`; audits the attempt with its evidence.
    async fn smarthost_session(
        &self,
        lease: &Lease,
        target: &SmarthostTarget,
        ip: IpAddr,
    ) -> Result<Session, String> {
        let addr = SocketAddr::new(ip, target.port);
        let base = Record::new(Event::Attempt)
            .queue_id(lease.id.to_string())
            .mx(target.host.clone())
            .ip(ip)
            .detail("via", target.step())
            .detail("policy", target.spec.name.clone());
        match open_at(
            &self.settings,
            &self.trust,
            &target.spec,
            &target.host,
            addr,
            target.start,
        )
        .await
        {
            Ok(session) => {
                let verdict = session.evidence().reason;
                self.audit_tls_before_sending(base, session.evidence_json(), verdict)
                    .await;
                Ok(session)
            }
            Err(OpenError::Rejected(evidence)) => {
                tracing::warn!(queue_id = %lease.id, smarthost = %target.name, %ip, verdict = %evidence.reason, "smarthost did not pass the policy");
                self.audit_tls(base, Json::of(&*evidence), evidence.reason)
                    .await;
                Err(format!("{} [{ip}]: {}", target.host, evidence.reason))
            }
            Err(OpenError::Session { evidence, detail }) => {
                tracing::warn!(queue_id = %lease.id, smarthost = %target.name, %ip, detail, "smarthost session failed after a verified handshake");
                self.audit_tls(
                    base.detail("error", detail.clone()),
                    Json::of(&*evidence),
                    evidence.reason,
                )
                .await;
                Err(format!("{} [{ip}]: {detail}", target.host))
            }
        }
    }

    async fn relay_transaction(
        &self,
        lease: &Lease,
        target: &SmarthostTarget,
        mut session: Session,
        recipients: Vec<LeasedRecipient>,
        body: &[u8],
    ) -> Relayed {
        let env = &lease.envelope;
        let rcpts: Vec<TxnRecipient> = recipients
            .iter()
            .map(|r| TxnRecipient {
                address: r.address.clone(),
                notify: r.notify.clone(),
                orcpt: r.orcpt.clone(),
            })
            .collect();
        let txn = Transaction {
            sender: &env.sender,
            recipients: &rcpts,
            body,
            eight_bit: env.eight_bit,
            smtputf8: env.smtputf8,
            ret: env.ret.as_deref(),
            envid: env.envid.as_deref(),
        };
        let ip = session.ip();
        let remote = format!("{} [{ip}]", target.host);
        if self.audit.failed() {
            tracing::error!(queue_id = %lease.id, smarthost = %target.name, "AUDIT LOG FAILED: the message is not sent");
            session.quit().await;
            return Relayed {
                delivered: Vec::new(),
                rest: recipients,
                why: super::AUDIT_DOWN.to_owned(),
            };
        }
        let results = session.send(&txn).await;
        session.quit().await;
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                return Relayed {
                    delivered: Vec::new(),
                    rest: recipients,
                    why: format!("smarthost:{}: {remote}: {e}", target.name),
                }
            }
        };
        let mut relayed = Relayed {
            delivered: Vec::new(),
            rest: Vec::new(),
            why: String::new(),
        };
        let mut refusals = Vec::new();
        for (r, result) in recipients.into_iter().zip(results) {
            match result {
                RcptResult::Delivered(reply) => {
                    super::delivery_latency(lease.arrival);
                    self.audit(
                        Record::new(Event::Delivered)
                            .queue_id(lease.id.to_string())
                            .recipient(r.address.clone())
                            .mx(target.host.clone())
                            .ip(ip)
                            .detail("via", target.step())
                            .detail("policy", target.spec.name.clone())
                            .detail("reply", reply),
                    )
                    .await;
                    relayed.delivered.push((
                        r.index,
                        Outcome::Delivered {
                            remote: format!("{remote} via {}", target.step()),
                        },
                    ));
                }
                RcptResult::Deferred(why) | RcptResult::Failed(why) => {
                    refusals.push(why);
                    relayed.rest.push(r);
                }
            }
        }
        relayed.why = format!("smarthost:{}: {}", target.name, refusals.join("; "));
        tracing::info!(queue_id = %lease.id, smarthost = %target.name, delivered = relayed.delivered.len(), refused = relayed.rest.len(), "smarthost transaction finished");
        relayed
    }
}
