//! The per-source limits and the longest connection, as `[[endpoint]]` and `[[listener]]`
//! write them (`per_source_max_connections`, `per_source_rate = "10/s"`, `max_duration`):
//! [`SourcePolicy`], [`Rate`] and their value checks.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

/// The most new connections per second (or per minute) a rate may name.
pub const MAX_RATE: u32 = 1_000_000;

/// New connections per source: a token bucket that holds `burst` tokens and gains
/// `per_second` of them each second (`"10/s"`: 10 at once, then 10 a second; `"600/m"`: 600 at
/// once, then 10 a second).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// The bucket's size: the number written.
    pub burst: u32,
    /// Tokens gained per second.
    pub per_second: f64,
}

// A rate is written in whole numbers of connections per second or minute, so `per_second` is
// a ratio of two integers: equal texts give equal values, and no NaN can occur.
impl Eq for Rate {}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if (self.per_second - f64::from(self.burst)).abs() < f64::EPSILON {
            write!(f, "{}/s", self.burst)
        } else {
            write!(f, "{}/m", self.burst)
        }
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let help = || {
            format!(
                "`{}` is not a rate: a whole number of new connections per second or per minute, \
                 \"10/s\" or \"600/m\"",
                privlink_protocol::text::loggable(text)
            )
        };
        let (number, unit) = text.trim().split_once('/').ok_or_else(help)?;
        let burst: u32 = number.trim().parse().map_err(|_| help())?;
        if burst == 0 || burst > MAX_RATE {
            return Err(format!("a rate is 1 to {MAX_RATE} connections per second or minute"));
        }
        let per_second = match unit.trim() {
            "s" => f64::from(burst),
            "m" => f64::from(burst) / 60.0,
            _ => return Err(help()),
        };
        Ok(Self { burst, per_second })
    }
}

/// What one source may do on an endpoint or a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SourcePolicy {
    /// Connections open at once from one source (`per_source_max_connections`).
    pub max_connections: Option<u32>,
    /// New connections from one source (`per_source_rate`).
    pub rate: Option<Rate>,
}

/// `per_source_max_connections`: at least 1.
pub(super) fn deserialize_per_source_max<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    let n = u32::deserialize(d)?;
    if n == 0 {
        return Err(serde::de::Error::custom(
            "per_source_max_connections must be at least 1 (leave it out for no limit)",
        ));
    }
    Ok(Some(n))
}

/// `per_source_rate = "10/s"`.
pub(super) fn deserialize_rate<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Rate>, D::Error> {
    String::deserialize(d)?.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_or_per_minute_with_their_burst() {
        assert_eq!("10/s".parse(), Ok(Rate { burst: 10, per_second: 10.0 }));
        let per_minute: Rate = "600/m".parse().expect("rate");
        assert_eq!((per_minute.burst, per_minute.per_second), (600, 10.0));
        assert_eq!(per_minute.to_string(), "600/m");
        for bad in ["10", "10/h", "0/s", "-1/s", "1.5/s", "ten/s", "2000000/s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }
}
