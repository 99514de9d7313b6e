//! The limits a guard puts on each stream.

use std::time::Duration;

use crate::{
    end::IdleDirection,
    error::{ConfigError, check_duration, check_resolution},
};

/// The limits a guard puts on each stream. `None` means "no limit".
///
/// Built and validated by [`StreamGuardBuilder`](crate::StreamGuardBuilder);
/// read with [`StreamGuardLayer::policy`](crate::StreamGuardLayer::policy)
/// (the limits of streams no route matches).
///
/// ```
/// use std::time::Duration;
/// use tower_stream_guard::{IdleDirection, StreamGuardLayer};
///
/// # fn main() -> Result<(), tower_stream_guard::ConfigError> {
/// let guard = StreamGuardLayer::builder()
///     .request_idle_timeout(Duration::from_secs(5))
///     .build()?;
/// let policy = guard.policy();
/// assert_eq!(policy.idle_timeout(IdleDirection::Request), Some(Duration::from_secs(5)));
/// assert_eq!(policy.idle_timeout(IdleDirection::Both), None);
/// assert_eq!(policy.max_lifetime(), None);
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub(crate) idle_both: Option<Duration>,
    pub(crate) idle_request: Option<Duration>,
    pub(crate) idle_response: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
    pub(crate) min_rate: Option<MinRate>,
}

/// A minimum response rate: at least `bytes` per `window` of time spent
/// waiting on the reader (see
/// [`StreamGuardBuilder::min_response_rate`](crate::StreamGuardBuilder::min_response_rate)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MinRate {
    pub(crate) bytes: u64,
    pub(crate) window: Duration,
}

impl Policy {
    /// The idle timeout watching `direction`, if one is set.
    pub fn idle_timeout(&self, direction: IdleDirection) -> Option<Duration> {
        match direction {
            IdleDirection::Request => self.idle_request,
            IdleDirection::Response => self.idle_response,
            IdleDirection::Both => self.idle_both,
        }
    }

    /// The maximum lifetime of a stream, if one is set.
    pub fn max_lifetime(&self) -> Option<Duration> {
        self.max_lifetime
    }

    /// The minimum response rate, if one is set: the bytes the reader must
    /// take per window (see
    /// [`StreamGuardBuilder::min_response_rate`](crate::StreamGuardBuilder::min_response_rate)).
    pub fn min_response_rate(&self) -> Option<(u64, Duration)> {
        self.min_rate.map(|rate| (rate.bytes, rate.window))
    }

    pub(crate) fn set_idle(&mut self, direction: IdleDirection, timeout: Duration) {
        match direction {
            IdleDirection::Request => self.idle_request = Some(timeout),
            IdleDirection::Response => self.idle_response = Some(timeout),
            IdleDirection::Both => self.idle_both = Some(timeout),
        }
    }

    fn settings(&self) -> [(&'static str, Option<Duration>); 5] {
        [
            ("idle_timeout", self.idle_both),
            ("request_idle_timeout", self.idle_request),
            ("response_idle_timeout", self.idle_response),
            ("max_lifetime", self.max_lifetime),
            ("min_response_rate", self.min_rate.map(|rate| rate.window)),
        ]
    }

    /// Checks every setting against `resolution` and against each other.
    pub(crate) fn validate(&self, resolution: Duration) -> Result<(), ConfigError> {
        check_resolution("timer_resolution", resolution)?;
        if self.min_rate.is_some_and(|rate| rate.bytes == 0) {
            // Zero bytes per window: nothing could ever be too slow.
            return Err(ConfigError::Zero {
                setting: "min_response_rate",
            });
        }
        for (setting, value) in self.settings() {
            if let Some(value) = value {
                check_duration(setting, value, Some(resolution))?;
            }
        }
        // An idle timeout not below the lifetime is accepted: it can never
        // fire first (the lifetime ends the stream), which is harmless, and
        // a route that lengthens its idle timeout past the layer's lifetime
        // should not need to restate the lifetime.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{DEFAULT_TIMER_RESOLUTION, MAX_DURATION};

    fn policy() -> Policy {
        Policy::default()
    }

    #[test]
    fn empty_policy_is_valid() {
        assert_eq!(policy().validate(DEFAULT_TIMER_RESOLUTION), Ok(()));
    }

    #[test]
    fn zero_duration_is_rejected_with_its_setting() {
        let mut p = policy();
        p.set_idle(IdleDirection::Request, Duration::ZERO);
        assert_eq!(
            p.validate(DEFAULT_TIMER_RESOLUTION),
            Err(ConfigError::Zero {
                setting: "request_idle_timeout"
            })
        );
    }

    #[test]
    fn absurd_duration_is_rejected() {
        let p = Policy {
            max_lifetime: Some(MAX_DURATION + Duration::from_secs(1)),
            ..policy()
        };
        assert!(matches!(
            p.validate(DEFAULT_TIMER_RESOLUTION),
            Err(ConfigError::TooLong {
                setting: "max_lifetime",
                ..
            })
        ));
    }

    #[test]
    fn an_idle_timeout_not_below_the_lifetime_is_accepted() {
        let p = Policy {
            idle_both: Some(Duration::from_secs(30)),
            idle_request: Some(Duration::from_secs(90)),
            max_lifetime: Some(Duration::from_secs(30)),
            ..policy()
        };
        assert_eq!(p.validate(DEFAULT_TIMER_RESOLUTION), Ok(()));
    }

    #[test]
    fn a_minimum_rate_needs_bytes_and_a_window_the_timer_can_see() {
        let rate = |bytes, window| Policy {
            min_rate: Some(MinRate { bytes, window }),
            ..policy()
        };
        let zero = Err(ConfigError::Zero {
            setting: "min_response_rate",
        });
        let resolution = Duration::from_millis(10);
        assert_eq!(rate(0, Duration::from_secs(1)).validate(resolution), zero);
        assert_eq!(rate(1, Duration::ZERO).validate(resolution), zero);
        assert_eq!(
            rate(1, Duration::from_millis(5)).validate(resolution),
            Err(ConfigError::BelowResolution {
                setting: "min_response_rate",
                value: Duration::from_millis(5),
                resolution,
            })
        );
        assert_eq!(rate(1, resolution).validate(resolution), Ok(()));
    }

    #[test]
    fn resolution_bounds_are_enforced() {
        assert!(matches!(
            policy().validate(Duration::from_micros(10)),
            Err(ConfigError::ResolutionOutOfRange { .. })
        ));
        let p = Policy {
            idle_response: Some(Duration::from_millis(5)),
            ..policy()
        };
        assert!(matches!(
            p.validate(Duration::from_millis(10)),
            Err(ConfigError::BelowResolution { .. })
        ));
    }
}
