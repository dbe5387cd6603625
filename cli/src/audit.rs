//! `capvisor audit`: query the install's audit log (cap `audit`, schema
//! `Audit`), by time, VM, grant, principal and action.

use capvisor_client::ops;
use capvisor_client::{ClientError, ClientResult};
use capvisor_rpc::error::printable;
use capvisor_rpc::schema::capvisor_capnp::{audit, session};
use clap::Args;

/// What `--help` says of the command.
pub const ABOUT: &str = "Query the audit log (cap `audit`, owner profile): logins, sessions, account changes and \
every VM action, as the server recorded them (state/audit.jsonl, indexed in state/audit.sqlite).\n\n\
The holder of `audit` is the operator: it sees every principal's records, not only its own. Filters combine; \
without any, the newest 1000 records are shown, oldest first. A line standing for repeats of the same event \
(a flood of refused calls) says how many and since when. Each query is itself recorded (`audit.query`).\n\n\
Times: a duration back from now (30s, 10m, 2h, 7d, 1w), an RFC 3339 time (2026-12-03T17:00:00Z, \
2026-12-03T18:00:00+01:00), or Unix epoch milliseconds.";

/// `capvisor audit` flags.
#[derive(Args)]
pub struct AuditArgs {
    /// Only records at or after this time (a duration back from now like 10m, RFC 3339, or epoch ms)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    since: Option<i64>,
    /// Only records at or before this time (same forms as --since)
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    until: Option<i64>,
    /// Only records about this VM (its name in its session)
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only records whose delegation chain holds this grant id
    #[arg(long, value_name = "ID")]
    grant: Option<String>,
    /// Only records of this principal, as shown (local:alice, password:bob)
    #[arg(long, value_name = "P")]
    principal: Option<String>,
    /// Only records of this action (login, vm.create, vm.exec, audit.query, ...)
    #[arg(long, value_name = "A")]
    action: Option<String>,
    /// At most this many records, the newest ones [default: 1000; at most 10000]
    #[arg(long, value_name = "N")]
    limit: Option<u32>,
    /// One JSON object per line instead of a table
    #[arg(long)]
    json: bool,
}

/// Parses a `--since`/`--until` value into Unix epoch ms (see [`ABOUT`]).
fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, capvisor_rpc::now_ms())
}

/// [`parse_time`] with "now" = `now_ms`.
fn parse_time_at(s: &str, now_ms: i64) -> Result<i64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|_| format!("{s:?}: epoch milliseconds out of range"));
    }
    if let Some(ms) = parse_duration_ms(t) {
        return Ok(now_ms - ms);
    }
    parse_rfc3339(t).ok_or_else(|| {
        format!("{s:?}: want a duration (30s, 10m, 2h, 7d), an RFC 3339 time (2026-12-03T17:00:00Z) or epoch ms")
    })
}

/// `<n><unit>` with unit ms, s, m, h, d or w, in ms.
pub fn parse_duration_ms(t: &str) -> Option<i64> {
    let split = t.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().ok()?;
    let mult = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant,
/// "chrono-Compatible Low-Level Date Algorithms", days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day since 1970-01-01 (same source, civil_from_days).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// RFC 3339 `date-time` (section 5.6): `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`,
/// `t`/space for `T` and `z` for `Z` accepted; into Unix epoch ms.
fn parse_rfc3339(t: &str) -> Option<i64> {
    let b = t.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' {
        return None;
    }
    if b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = t.get(r)?;
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok()).flatten()
    };
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let mut rest = &t[19..];
    let mut ms = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.find(|c: char| !c.is_ascii_digit()).unwrap_or(frac.len());
        if n == 0 {
            return None;
        }
        let digits = &frac[..n];
        ms = format!("{:0<3}", &digits[..digits.len().min(3)]).parse::<i64>().ok()?;
        rest = &frac[n..];
    }
    let offset_min = match rest {
        "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes().first()? {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let o = rest.get(1..)?;
            if o.len() != 5 || o.as_bytes()[2] != b':' {
                return None;
            }
            let (oh, om): (i64, i64) = (o[..2].parse().ok()?, o[3..].parse().ok()?);
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 60 + om)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s.min(59) - offset_min * 60;
    Some(secs * 1000 + ms)
}

/// Unix epoch ms as RFC 3339 UTC with milliseconds, e.g.
/// `2026-12-03T17:00:00.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let (days, rem) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (y, m, d) = civil_from_days(days);
    let (h, mi, s, frac) = (rem / 3_600_000, rem / 60_000 % 60, rem / 1000 % 60, rem % 1000);
    format!("{y:04}-{m:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{frac:03}Z")
}

/// The CapSet's `audit` cap, pipelined.
pub fn cap(s: &session::Client) -> audit::Client {
    ops::get_cap(&ops::cap_set(s), "audit")
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> ClientResult<String> {
    Ok(String::from_utf8_lossy(r?.as_bytes()).into_owned())
}

/// Runs `capvisor audit` on session `s`; returns the exit code.
///
/// Errors: usage when --since is after --until; the query's error
/// (notFound without the `audit` cap).
pub async fn run(a: AuditArgs, s: &session::Client) -> ClientResult<i32> {
    if let (Some(since), Some(until)) = (a.since, a.until) {
        if since > until {
            return Err(ClientError::Usage("--since is after --until".into()));
        }
    }
    let mut req = cap(s).query_request();
    {
        let mut r = req.get();
        r.set_since_ms(a.since.unwrap_or(0));
        r.set_until_ms(a.until.unwrap_or(0));
        r.set_vm(a.vm.as_deref().unwrap_or(""));
        r.set_grant(a.grant.as_deref().unwrap_or(""));
        r.set_principal(a.principal.as_deref().unwrap_or(""));
        r.set_action(a.action.as_deref().unwrap_or(""));
        r.set_limit(a.limit.unwrap_or(0));
    }
    let resp = req.send().promise.await?;
    let entries = resp.get()?.get_entries()?;
    if !a.json {
        println!(
            "{:<24} {:<20} {:<20} {:<24} {:<14} {:<12} DETAIL",
            "TIME", "PRINCIPAL", "ACTION", "CAP.METHOD", "OUTCOME", "VM"
        );
    }
    for e in entries.iter() {
        let mut grants = Vec::new();
        for g in e.get_grants()?.iter() {
            grants.push(serde_json::json!({"id": text(g.get_id())?, "label": text(g.get_label())?}));
        }
        let (principal, action, cap, method) =
            (text(e.get_principal())?, text(e.get_action())?, text(e.get_cap())?, text(e.get_method())?);
        let (outcome, vm, detail) = (text(e.get_outcome())?, text(e.get_vm())?, text(e.get_detail())?);
        if a.json {
            let v = serde_json::json!({
                "time": rfc3339(e.get_time_ms()),
                "ts_ms": e.get_time_ms(),
                "since_ms": e.get_since_ms(),
                "repeated": e.get_repeated(),
                "principal": principal,
                "session": text(e.get_session())?,
                "action": action,
                "cap": cap,
                "method": method,
                "outcome": outcome,
                "detail": detail,
                "peer": text(e.get_peer())?,
                "vm": vm,
                "grants": grants,
            });
            println!("{v}");
            continue;
        }
        let mut detail = detail;
        if e.get_repeated() > 0 {
            detail = format!("{detail} [{} times since {}]", e.get_repeated(), rfc3339(e.get_since_ms()));
        }
        let cm = if method.is_empty() { cap } else { format!("{cap}.{method}") };
        let show = |s: &str| printable(s, false).into_owned();
        println!(
            "{:<24} {:<20} {:<20} {:<24} {:<14} {:<12} {}",
            rfc3339(e.get_time_ms()),
            show(&principal),
            show(&action),
            show(&cm),
            show(&outcome),
            show(&vm),
            show(detail.trim())
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_durations_rfc3339_or_epoch_ms() {
        let now = 1_796_318_400_000; // 2026-12-03T17:20:00Z
        assert_eq!(parse_time_at("10m", now), Ok(now - 600_000));
        assert_eq!(parse_time_at("2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time_at("1w", now), Ok(now - 604_800_000));
        assert_eq!(parse_time_at("1500", now), Ok(1500));
        assert_eq!(parse_time_at("1970-01-01T00:00:01Z", now), Ok(1000));
        assert_eq!(parse_time_at("2026-12-03T17:20:00Z", now), Ok(now));
        assert_eq!(parse_time_at("2026-12-03T18:20:00.250+01:00", now), Ok(now + 250));
        assert_eq!(parse_time_at("2026-12-03t12:20:00-05:00", now), Ok(now));
        assert_eq!(parse_time_at("2000-02-29T00:00:00Z", now), Ok(951_782_400_000));
        for bad in ["", "10x", "yesterday", "2026-13-01T00:00:00Z", "2026-12-03T17:20:00", "2026-12-03T17:20:00+1"] {
            assert!(parse_time_at(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn times_print_as_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_318_400_123), "2026-12-03T17:20:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        for ms in [0, 1, 86_399_999, 951_782_400_000, 1_796_318_400_123, 4_102_444_800_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms), "{ms}");
        }
    }
}
