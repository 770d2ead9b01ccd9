//! What to do with a recipient when no MX passed its policy: walk the policy's `on_failure`
//! chain (`hold:D`, `bounce`, `smarthost:NAME`, `portal`) by the time since arrival.

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
    /// The chain has reached a step this version does not perform yet (bounce, smarthost,
    /// portal): the recipient stays queued and the secure path keeps being retried.
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
    let elapsed = now.duration_since(arrival).unwrap_or(Duration::ZERO);
    let mut held_until = Duration::ZERO;
    for (index, step) in chain.iter().enumerate() {
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
            // The fallback issue adds these; the decision stays a function of the chain.
            FallbackStep::Bounce | FallbackStep::Smarthost(_) | FallbackStep::Portal => {
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
            FallbackAction::Unavailable {
                step: 2,
                name: "smarthost:relay".into()
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
}
