//! Due times: per-recipient due time, retry delays with jitter.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;

use crate::record::{MessageRecord, RecipientState};

/// Milliseconds since the Unix epoch (0 for times before it).
pub(crate) fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// When a recipient in `state` is next due, if ever.
pub(crate) fn recipient_due(state: &RecipientState, arrival: SystemTime) -> Option<SystemTime> {
    match state {
        RecipientState::Pending => Some(arrival),
        RecipientState::InFlight { lease_until } => Some(*lease_until),
        RecipientState::Deferred { next_attempt, .. } => Some(*next_attempt),
        RecipientState::Held { until, .. } => Some(*until),
        RecipientState::AdminHold | RecipientState::Delivered | RecipientState::Failed { .. } => {
            None
        }
    }
}

/// Earliest due time of any recipient of a message, in ms, if any is due ever.
pub(crate) fn message_due_ms(record: &MessageRecord) -> Option<u64> {
    record
        .recipients
        .iter()
        .filter_map(|r| recipient_due(&r.state, record.arrival))
        .map(to_ms)
        .min()
}

/// The delay before the next attempt after `attempts` attempts: `retry[attempts-1]` (the last entry
/// repeats) with ±10% uniform jitter.
pub(crate) fn retry_delay(retry: &[Duration], attempts: u32) -> Duration {
    let index = usize::try_from(attempts.saturating_sub(1)).unwrap_or(usize::MAX);
    let base = retry
        .get(index)
        .or(retry.last())
        .copied()
        .unwrap_or(Duration::from_secs(300));
    let factor: f64 = rand::rng().random_range(0.9..=1.1);
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_follows_schedule_within_ten_percent_and_jitters() {
        let retry = [
            Duration::from_secs(300),
            Duration::from_secs(900),
            Duration::from_secs(1800),
        ];
        for (attempts, base) in [
            (1u32, 300.0),
            (2, 900.0),
            (3, 1800.0),
            (4, 1800.0),
            (40, 1800.0),
        ] {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..200 {
                let d = retry_delay(&retry, attempts).as_secs_f64();
                assert!(
                    d >= base * 0.9 - 1e-6 && d <= base * 1.1 + 1e-6,
                    "{attempts}: {d}"
                );
                seen.insert(d.to_bits());
            }
            assert!(seen.len() > 50, "no jitter for attempt {attempts}");
        }
    }

    #[test]
    fn due_of_each_state() {
        let arrival = UNIX_EPOCH + Duration::from_secs(100);
        let later = UNIX_EPOCH + Duration::from_secs(200);
        assert_eq!(
            recipient_due(&RecipientState::Pending, arrival),
            Some(arrival)
        );
        assert_eq!(
            recipient_due(&RecipientState::InFlight { lease_until: later }, arrival),
            Some(later)
        );
        assert_eq!(recipient_due(&RecipientState::AdminHold, arrival), None);
        assert_eq!(recipient_due(&RecipientState::Delivered, arrival), None);
        assert_eq!(
            recipient_due(&RecipientState::Failed { reason: "x".into() }, arrival),
            None
        );
        assert_eq!(to_ms(later), 200_000);
    }
}
