//! What to do with a recipient when no MX passed its policy: walk the policy's `on_failure`
//! chain (`hold:D`, `bounce`, `smarthost:NAME`, `portal`) by the time since arrival.
//!
//! The decision is a pure function of the chain, the times and where to start (after a
//! smarthost failed, the walk continues at the next step).

use std::time::{Duration, SystemTime};

use sealpost_config::FallbackStep;

/// The decision for one recipient after a failed round of attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackAction {
    /// Keep the recipient held and retry the secure path at `retry_at`.
    Hold {
        /// Index of the `hold` step in the chain.
        step: usize,
        /// When to try again (the next retry interval, at most the end of the hold).
        retry_at: SystemTime,
        /// When this hold step ends.
        ends: SystemTime,
    },
    /// Send a DSN to the envelope sender and finish the recipient.
    Bounce {
        /// Index of the `bounce` step in the chain.
        step: usize,
    },
    /// Relay the recipient through the named smarthost.
    Smarthost {
        /// Index of the step in the chain.
        step: usize,
        /// The `[smarthosts.NAME]` name.
        name: String,
    },
    /// The chain has reached a step this version does not perform yet (portal): the recipient
    /// stays queued and the secure path keeps being retried.
    Unavailable {
        /// Index of the step in the chain.
        step: usize,
        /// The step as written in the configuration (e.g. `bounce`).
        name: String,
    },
    /// Every step is used up (or the chain is empty): defer and keep retrying.
    Exhausted,
}

/// The step as written in the configuration.
pub fn step_name(step: &FallbackStep) -> String {
    match step {
        FallbackStep::Hold(d) => format!("hold:{}", sealpost_config::format_duration(*d)),
        FallbackStep::Bounce => "bounce".to_owned(),
        FallbackStep::Smarthost(name) => format!("smarthost:{name}"),
        FallbackStep::Portal => "portal".to_owned(),
    }
}

/// Decides by walking `chain`: each `hold:D` covers the next D after the holds before it,
/// counted from `arrival`; the first step not yet used up is the one in force at `now`.
pub fn decide(
    chain: &[FallbackStep],
    arrival: SystemTime,
    now: SystemTime,
    retry_in: Duration,
) -> FallbackAction {
    decide_from(chain, 0, arrival, now, retry_in)
}

/// Like [`decide`], but only steps at index `from` or later can be in force (the steps before
/// were tried this round); holds before `from` still count towards the time.
pub fn decide_from(
    chain: &[FallbackStep],
    from: usize,
    arrival: SystemTime,
    now: SystemTime,
    retry_in: Duration,
) -> FallbackAction {
    let elapsed = now.duration_since(arrival).unwrap_or(Duration::ZERO);
    let mut held_until = Duration::ZERO;
    for (index, step) in chain.iter().enumerate() {
        if index < from {
            if let FallbackStep::Hold(d) = step {
                held_until = held_until.saturating_add(*d);
            }
            continue;
        }
        match step {
            FallbackStep::Hold(d) => {
                held_until = held_until.saturating_add(*d);
                if elapsed < held_until {
                    let ends = arrival + held_until;
                    let retry_at = (now + retry_in).min(ends).max(now);
                    return FallbackAction::Hold {
                        step: index,
                        retry_at,
                        ends,
                    };
                }
            }
            FallbackStep::Bounce => return FallbackAction::Bounce { step: index },
            FallbackStep::Smarthost(name) => {
                return FallbackAction::Smarthost {
                    step: index,
                    name: name.clone(),
                }
            }
            FallbackStep::Portal => {
                return FallbackAction::Unavailable {
                    step: index,
                    name: step_name(step),
                };
            }
        }
    }
    FallbackAction::Exhausted
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);
    const M: Duration = Duration::from_secs(60);

    #[test]
    fn hold_within_its_duration_retries_at_the_next_interval() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let chain = [FallbackStep::Hold(4 * H), FallbackStep::Bounce];
        assert_eq!(
            decide(&chain, t0, t0 + M, 5 * M),
            FallbackAction::Hold {
                step: 0,
                retry_at: t0 + 6 * M,
                ends: t0 + 4 * H
            }
        );
        // Near the end of the hold the retry is clamped to the end.
        let late = t0 + 4 * H - M;
        assert_eq!(
            decide(&chain, t0, late, 30 * M),
            FallbackAction::Hold {
                step: 0,
                retry_at: t0 + 4 * H,
                ends: t0 + 4 * H
            }
        );
    }

    #[test]
    fn after_the_hold_the_next_step_is_in_force() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let chain = [
            FallbackStep::Hold(H),
            FallbackStep::Hold(2 * H),
            FallbackStep::Smarthost("relay".into()),
        ];
        assert!(matches!(
            decide(&chain, t0, t0 + 90 * M, M),
            FallbackAction::Hold { step: 1, ends, .. } if ends == t0 + 3 * H
        ));
        assert_eq!(
            decide(&chain, t0, t0 + 3 * H, M),
            FallbackAction::Smarthost {
                step: 2,
                name: "relay".into()
            }
        );
        assert_eq!(
            decide(&[FallbackStep::Hold(H)], t0, t0 + 2 * H, M),
            FallbackAction::Exhausted
        );
        assert_eq!(decide(&[], t0, t0, M), FallbackAction::Exhausted);
        assert_eq!(
            decide(&[FallbackStep::Portal], t0, t0, M),
            FallbackAction::Unavailable {
                step: 0,
                name: "portal".into()
            }
        );
    }

    #[test]
    fn bounce_is_in_force_after_the_hold_and_a_failed_smarthost_continues_the_chain() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let chain = [
            FallbackStep::Hold(H),
            FallbackStep::Smarthost("relay".into()),
            FallbackStep::Bounce,
        ];
        assert!(matches!(
            decide(&chain, t0, t0 + M, M),
            FallbackAction::Hold { step: 0, .. }
        ));
        assert_eq!(
            decide_from(&chain, 2, t0, t0 + 2 * H, M),
            FallbackAction::Bounce { step: 2 }
        );
        // A smarthost that fails as the last step: the chain is used up.
        assert_eq!(
            decide_from(&chain[..2], 2, t0, t0 + 2 * H, M),
            FallbackAction::Exhausted
        );
        // A hold after a smarthost counts from arrival, after the holds before it.
        let chain = [
            FallbackStep::Smarthost("relay".into()),
            FallbackStep::Hold(H),
            FallbackStep::Bounce,
        ];
        assert!(matches!(
            decide_from(&chain, 1, t0, t0 + 30 * M, M),
            FallbackAction::Hold { step: 1, ends, .. } if ends == t0 + H
        ));
        assert_eq!(
            decide_from(&chain, 1, t0, t0 + 2 * H, M),
            FallbackAction::Bounce { step: 2 }
        );
        assert_eq!(
            decide(&[FallbackStep::Bounce], t0, t0, M),
            FallbackAction::Bounce { step: 0 }
        );
    }
}
