//! Whether IoT Core refused a connection, and why, told from rumqttc's error by its structure
//! (the CONNACK's return code, the HTTP answer to the websocket upgrade), never by its text.
//!
//! IoT Core answers an upgrade whose SigV4 signature it does not accept with `403 Forbidden`
//! (`x-amzn-ErrorType: ForbiddenException` and a short JSON body), whether the signature is
//! dated more than 5 minutes off its clock or the credentials are refused: status and headers
//! are the same, only the body's message says which, and that is text. What does tell them
//! apart is the answer's `Date`: a server clock beyond SigV4's 5 minutes from this device's
//! means every signature is dated wrong, whatever else holds.

use std::time::{Duration, SystemTime};

use rumqttc::{ConnectReturnCode, ConnectionError};
use tungstenite::http::{Response, StatusCode};

/// SigV4 accepts signatures dated up to this far from the server's clock; a refused upgrade
/// from a server further off is diagnosed as skew.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);

/// What a connection error says about IoT Core's view of this device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// IoT Core refuses this identity (its IoT policy may have been detached, or never
    /// attached): a CONNACK "not authorized" / "bad user name or password", or the upgrade
    /// answered 401, or 403 by a server whose clock agrees with this device's. A connection
    /// closed without any CONNACK is not one on its own (a network fault can look the same):
    /// the publisher's flow counts those.
    Authorization,
    /// The upgrade answered 403 by a server whose clock is this many seconds ahead of this
    /// device's (negative: behind), beyond what SigV4 accepts: no retry helps until the
    /// device's clock is fixed.
    ClockSkew { server_ahead_s: i64 },
    /// Not a refusal: the network, TLS, timeouts, the broker closing the stream, its errors.
    Other,
}

impl Refusal {
    /// Classifies `error`, with the device's clock read at `now`.
    pub fn classify(error: &ConnectionError, now: SystemTime) -> Refusal {
        match error {
            ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword,
            ) => Refusal::Authorization,
            ConnectionError::Websocket(tungstenite::Error::Http(response)) => {
                Refusal::of_upgrade(response, now)
            }
            _ => Refusal::Other,
        }
    }

    fn of_upgrade<T>(response: &Response<T>, now: SystemTime) -> Refusal {
        match response.status() {
            StatusCode::UNAUTHORIZED => Refusal::Authorization,
            StatusCode::FORBIDDEN => match server_ahead_s(response, now) {
                Some(skew) if skew.unsigned_abs() > MAX_CLOCK_SKEW.as_secs() => {
                    Refusal::ClockSkew {
                        server_ahead_s: skew,
                    }
                }
                _ => Refusal::Authorization,
            },
            _ => Refusal::Other,
        }
    }
}

/// How far the server's clock (the answer's `Date`) is ahead of `now`, in seconds (negative:
/// behind); `None` without a readable `Date`.
fn server_ahead_s<T>(response: &Response<T>, now: SystemTime) -> Option<i64> {
    let date = response.headers().get("date")?.to_str().ok()?;
    let server = parse_http_date(date)?;
    Some(match server.duration_since(now) {
        Ok(ahead) => i64::try_from(ahead.as_secs()).unwrap_or(i64::MAX),
        Err(behind) => -i64::try_from(behind.duration().as_secs()).unwrap_or(i64::MAX),
    })
}

/// Parses an HTTP `Date` (IMF-fixdate, RFC 9110: `Sun, 06 Nov 1994 08:49:37 GMT`).
fn parse_http_date(text: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = text.split_whitespace().skip(1);
    let day = parts.next()?;
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)?;
    let year = parts.next()?;
    let time = parts.next()?;
    if parts.next()? != "GMT" || day.len() != 2 || year.len() != 4 {
        return None;
    }
    let rfc3339 = format!("{year}-{:02}-{day}T{time}Z", month + 1);
    humantime::parse_rfc3339(&rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        humantime::parse_rfc3339("2026-11-29T15:00:00Z").expect("time")
    }

    /// The error rumqttc reports for an upgrade answered `status`, with `Date: date` if given.
    fn upgrade_refused(status: u16, date: Option<&str>) -> ConnectionError {
        let mut response = Response::builder().status(status);
        if let Some(date) = date {
            response = response.header("Date", date);
        }
        let response = response.body(None).expect("response");
        ConnectionError::Websocket(tungstenite::Error::Http(response))
    }

    #[test]
    fn only_authorization_refusals_count() {
        for code in [
            ConnectReturnCode::NotAuthorized,
            ConnectReturnCode::BadUserNamePassword,
        ] {
            assert_eq!(
                Refusal::classify(&ConnectionError::ConnectionRefused(code), now()),
                Refusal::Authorization
            );
        }
        for code in [
            ConnectReturnCode::ServiceUnavailable,
            ConnectReturnCode::BadClientId,
            ConnectReturnCode::RefusedProtocolVersion,
        ] {
            assert_eq!(
                Refusal::classify(&ConnectionError::ConnectionRefused(code), now()),
                Refusal::Other
            );
        }
        assert_eq!(
            Refusal::classify(&ConnectionError::NetworkTimeout, now()),
            Refusal::Other
        );
        assert_eq!(
            Refusal::classify(
                &ConnectionError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
                now()
            ),
            Refusal::Other
        );
    }

    #[test]
    fn a_refused_upgrade_is_told_by_its_status_code() {
        let same_time = Some("Sun, 29 Nov 2026 15:00:02 GMT");
        for (status, date, expected) in [
            (401, None, Refusal::Authorization),
            (403, None, Refusal::Authorization),
            (403, same_time, Refusal::Authorization),
            (401, same_time, Refusal::Authorization),
            (404, same_time, Refusal::Other),
            (500, None, Refusal::Other),
            (503, same_time, Refusal::Other),
        ] {
            let error = upgrade_refused(status, date);
            assert_eq!(Refusal::classify(&error, now()), expected, "{status}");
        }
    }

    #[test]
    fn a_403_from_a_server_clock_beyond_five_minutes_is_clock_skew() {
        let classify =
            |status, date| Refusal::classify(&upgrade_refused(status, Some(date)), now());
        assert_eq!(
            classify(403, "Sun, 29 Nov 2026 15:10:00 GMT"),
            Refusal::ClockSkew {
                server_ahead_s: 600
            }
        );
        assert_eq!(
            classify(403, "Sun, 29 Nov 2026 14:50:00 GMT"),
            Refusal::ClockSkew {
                server_ahead_s: -600
            }
        );
        // Within SigV4's 5 minutes, or a date that cannot be read: the credentials, not the
        // clock.
        assert_eq!(
            classify(403, "Sun, 29 Nov 2026 15:05:00 GMT"),
            Refusal::Authorization
        );
        assert_eq!(classify(403, "yesterday"), Refusal::Authorization);
        // Only a 403 is a refused signature.
        assert_eq!(
            classify(401, "Sun, 29 Nov 2026 15:10:00 GMT"),
            Refusal::Authorization
        );
        assert_eq!(
            classify(502, "Sun, 29 Nov 2026 15:10:00 GMT"),
            Refusal::Other
        );
    }

    #[test]
    fn a_403_upgrade_tells_how_far_the_clock_is_off() {
        let response = |date: &str| {
            Response::builder()
                .status(403)
                .header("Date", date)
                .body(())
                .expect("response")
        };
        assert_eq!(
            server_ahead_s(&response("Sun, 29 Nov 2026 15:10:00 GMT"), now()),
            Some(600)
        );
        assert_eq!(
            server_ahead_s(&response("Sun, 29 Nov 2026 14:59:30 GMT"), now()),
            Some(-30)
        );
        assert_eq!(server_ahead_s(&response("yesterday"), now()), None);
        assert_eq!(
            server_ahead_s(&Response::builder().body(()).expect("response"), now()),
            None
        );
    }
}
