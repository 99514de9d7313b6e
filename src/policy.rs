//! What a guard enforces, and the checks that reject nonsense configuration
//! when a layer is built rather than at the first request.

use std::{error::Error, fmt, time::Duration};

/// The longest duration any guard setting accepts: 365 days.
///
/// Longer values are almost always a unit mistake (milliseconds passed as
/// seconds); use no limit at all instead.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The largest end-event (and connection-event) channel capacity accepted:
/// 65,536 events.
///
/// The channel allocates its slots up front; a lagging receiver skips the
/// events it missed rather than holding up streams, so more room buys
/// little.
pub const MAX_EVENT_CAPACITY: usize = 1 << 16;

/// The default timer resolution: deadlines are checked every 10 ms.
pub const DEFAULT_TIMER_RESOLUTION: Duration = Duration::from_millis(10);

/// The finest timer resolution accepted: 1 ms.
pub const MIN_TIMER_RESOLUTION: Duration = Duration::from_millis(1);

/// The coarsest timer resolution accepted: 1 s.
pub const MAX_TIMER_RESOLUTION: Duration = Duration::from_secs(1);

/// Which side of a stream an idle timeout watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IdleDirection {
    /// Frames the peer sends to the service (the request body).
    ///
    /// The timeout stops applying once the request body has ended, so a
    /// server-streaming call whose single request message has arrived is never
    /// idle on this side.
    Request,
    /// Frames the service sends to the peer (the response body). The clock runs
    /// from the moment the request reached the guard, so a handler that takes
    /// longer than the timeout to answer counts as idle too.
    Response,
    /// The stream is idle only when *neither* side moved a frame: for
    /// bidirectional calls where one side is legitimately quiet for a while.
    Both,
}

impl IdleDirection {
    /// A short lower-case name: `request`, `response` or `both`.
    pub fn as_str(self) -> &'static str {
        match self {
            IdleDirection::Request => "request",
            IdleDirection::Response => "response",
            IdleDirection::Both => "both",
        }
    }
}

impl fmt::Display for IdleDirection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The limits a guard puts on each stream. `None` means "no limit".
///
/// Built and validated by [`StreamGuardBuilder`](crate::StreamGuardBuilder).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub(crate) idle_both: Option<Duration>,
    pub(crate) idle_request: Option<Duration>,
    pub(crate) idle_response: Option<Duration>,
    pub(crate) max_lifetime: Option<Duration>,
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

    pub(crate) fn set_idle(&mut self, direction: IdleDirection, timeout: Duration) {
        match direction {
            IdleDirection::Request => self.idle_request = Some(timeout),
            IdleDirection::Response => self.idle_response = Some(timeout),
            IdleDirection::Both => self.idle_both = Some(timeout),
        }
    }

    fn settings(&self) -> [(&'static str, Option<Duration>); 4] {
        [
            ("idle_timeout", self.idle_both),
            ("request_idle_timeout", self.idle_request),
            ("response_idle_timeout", self.idle_response),
            ("max_lifetime", self.max_lifetime),
        ]
    }

    /// Checks every setting against `resolution` and against each other.
    pub(crate) fn validate(&self, resolution: Duration) -> Result<(), ConfigError> {
        if !(MIN_TIMER_RESOLUTION..=MAX_TIMER_RESOLUTION).contains(&resolution) {
            return Err(ConfigError::ResolutionOutOfRange { value: resolution });
        }
        for (setting, value) in self.settings() {
            let Some(value) = value else { continue };
            if value.is_zero() {
                return Err(ConfigError::Zero { setting });
            }
            if value > MAX_DURATION {
                return Err(ConfigError::TooLong { setting, value });
            }
            if value < resolution {
                return Err(ConfigError::BelowResolution {
                    setting,
                    value,
                    resolution,
                });
            }
        }
        if let Some(lifetime) = self.max_lifetime {
            for (setting, idle) in &self.settings()[..3] {
                if let Some(idle) = *idle
                    && idle >= lifetime
                {
                    return Err(ConfigError::IdleNotBelowLifetime {
                        setting,
                        idle,
                        lifetime,
                    });
                }
            }
        }
        Ok(())
    }
}

/// Checks an event channel capacity.
pub(crate) fn validate_event_capacity(capacity: usize) -> Result<(), ConfigError> {
    match capacity {
        0 => Err(ConfigError::ZeroEventCapacity),
        value if value > MAX_EVENT_CAPACITY => Err(ConfigError::EventCapacityTooLarge { value }),
        _ => Ok(()),
    }
}

/// A guard configuration that cannot work, reported when the layer is built.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration setting is zero: every stream would end at once.
    Zero {
        /// The builder method that was given zero.
        setting: &'static str,
    },
    /// A duration setting is longer than [`MAX_DURATION`].
    TooLong {
        /// The builder method that was given the value.
        setting: &'static str,
        /// The value given.
        value: Duration,
    },
    /// An idle timeout is not shorter than the maximum lifetime, so it could
    /// never fire.
    IdleNotBelowLifetime {
        /// The idle setting at fault.
        setting: &'static str,
        /// Its value.
        idle: Duration,
        /// The maximum lifetime it must stay below.
        lifetime: Duration,
    },
    /// The timer resolution is outside
    /// [`MIN_TIMER_RESOLUTION`]..=[`MAX_TIMER_RESOLUTION`].
    ResolutionOutOfRange {
        /// The value given.
        value: Duration,
    },
    /// A duration setting is shorter than the timer resolution, so it could not
    /// be enforced with any precision.
    BelowResolution {
        /// The builder method that was given the value.
        setting: &'static str,
        /// The value given.
        value: Duration,
        /// The timer resolution in force.
        resolution: Duration,
    },
    /// The end-event channel was given a capacity of zero.
    ZeroEventCapacity,
    /// The end-event channel was given a capacity above
    /// [`MAX_EVENT_CAPACITY`].
    EventCapacityTooLarge {
        /// The value given.
        value: usize,
    },
    /// A stream cap is zero: no stream could ever be admitted.
    ZeroCap {
        /// The setting that was given zero.
        setting: &'static str,
    },
    /// A route path or prefix does not start with `/`, so it could never
    /// match a request path.
    InvalidRoute {
        /// The route as given.
        route: String,
    },
    /// A connection guard's `max_age_grace` is set without `max_age`.
    GraceWithoutMaxAge,
    /// A route's settings, laid over the layer's, cannot work.
    Route {
        /// The route: its path, its prefix followed by `*`, or
        /// `route_when #N` for the N-th route (counting from 0).
        route: String,
        /// What is wrong with it.
        error: Box<ConfigError>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Zero { setting } => write!(
                f,
                "`{setting}` is zero; every stream would end at once (leave it unset for no limit)"
            ),
            ConfigError::TooLong { setting, value } => write!(
                f,
                "`{setting}` is {value:?}, longer than the {MAX_DURATION:?} maximum (leave it unset for no limit)"
            ),
            ConfigError::IdleNotBelowLifetime {
                setting,
                idle,
                lifetime,
            } => write!(
                f,
                "`{setting}` ({idle:?}) is not shorter than `max_lifetime` ({lifetime:?}), so it could never fire"
            ),
            ConfigError::ResolutionOutOfRange { value } => write!(
                f,
                "`timer_resolution` is {value:?}; it must lie between {MIN_TIMER_RESOLUTION:?} and {MAX_TIMER_RESOLUTION:?}"
            ),
            ConfigError::BelowResolution {
                setting,
                value,
                resolution,
            } => write!(
                f,
                "`{setting}` ({value:?}) is shorter than the timer resolution ({resolution:?})"
            ),
            ConfigError::ZeroEventCapacity => f.write_str(
                "`event_capacity` is zero; the end-event channel needs room for at least one event",
            ),
            ConfigError::EventCapacityTooLarge { value } => write!(
                f,
                "`event_capacity` is {value}, more than the {MAX_EVENT_CAPACITY} maximum (the channel allocates its slots up front)"
            ),
            ConfigError::ZeroCap { setting } => write!(
                f,
                "`{setting}` is zero; no stream could ever be admitted (leave it unset for no cap)"
            ),
            ConfigError::InvalidRoute { route } => write!(
                f,
                "route `{route}` does not start with `/`, so it could never match a request path"
            ),
            ConfigError::Route { route, error } => write!(f, "route `{route}`: {error}"),
            ConfigError::GraceWithoutMaxAge => f.write_str(
                "`max_age_grace` is set without `max_age`; the grace follows the maximum age",
            ),
        }
    }
}

impl Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn idle_at_or_above_lifetime_is_rejected() {
        let p = Policy {
            idle_both: Some(Duration::from_secs(30)),
            max_lifetime: Some(Duration::from_secs(30)),
            ..policy()
        };
        let err = p.validate(DEFAULT_TIMER_RESOLUTION).unwrap_err();
        assert!(matches!(err, ConfigError::IdleNotBelowLifetime { .. }));
        assert!(err.to_string().contains("could never fire"), "{err}");
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
