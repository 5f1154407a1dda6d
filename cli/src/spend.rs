//! `tollgate spend`: what each client spent on each model in a day, ISO week or calendar month,
//! read from the Redis limiter's spend records (`tollgate:spend:<day>:<client>:<model>`,
//! micro-units of the configured currency, written by every Envoy as its responses end).
//!
//! Talks to Redis directly (RESP over TCP, a few commands: AUTH, SCAN, MGET), not through
//! Webdis: the operator's machine reaches Redis, the filter only reaches Webdis.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tollgate_core::spend::{days_from_civil, format_micros, Period};
use tollgate_core::webdis::SPEND_KEY_PREFIX;

use crate::args::Parsed;
use crate::{Ctx, Failure};

const DAY_MS: u64 = 86_400_000;
/// Most bytes of one Redis reply read (a guard against a wrong port).
const MAX_REPLY: usize = 64 << 20;

/// A Redis reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Vec<Reply>),
}

struct Redis {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Redis {
    fn connect(addr: &str) -> Result<Self, String> {
        let sock = addr
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {addr}: {e}"))?
            .next()
            .ok_or_else(|| format!("cannot resolve {addr}"))?;
        let stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))
            .map_err(|e| format!("cannot connect to Redis at {addr}: {e}"))?;
        let timeout = Some(Duration::from_secs(30));
        stream
            .set_read_timeout(timeout)
            .map_err(|e| e.to_string())?;
        stream
            .set_write_timeout(timeout)
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        Ok(Self {
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn call(&mut self, args: &[&str]) -> Result<Reply, String> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.writer
            .write_all(&out)
            .map_err(|e| format!("Redis: {e}"))?;
        match read_reply(&mut self.reader, 0)? {
            Reply::Error(e) => Err(format!("Redis answered {e}")),
            r => Ok(r),
        }
    }
}

fn read_line(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| format!("Redis: {e}"))?;
    if !line.ends_with("\r\n") {
        return Err("Redis closed the connection (or this is not Redis)".into());
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn read_reply(r: &mut impl BufRead, depth: usize) -> Result<Reply, String> {
    if depth > 4 {
        return Err("Redis reply nested too deep".into());
    }
    let line = read_line(r)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| format!("not a Redis reply: {line:?}"))
    };
    Ok(match kind {
        "+" => Reply::Simple(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Int(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(n) if n > MAX_REPLY => return Err("Redis reply too large".into()),
            Ok(n) => {
                let mut buf = vec![0u8; n + 2];
                r.read_exact(&mut buf).map_err(|e| format!("Redis: {e}"))?;
                buf.truncate(n);
                Reply::Bulk(Some(buf))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(Vec::new()),
            Ok(n) if n > MAX_REPLY => return Err("Redis reply too large".into()),
            Ok(n) => {
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(read_reply(r, depth + 1)?);
                }
                Reply::Array(items)
            }
        },
        _ => return Err(format!("not a Redis reply: {line:?}")),
    })
}

fn bulk_string(r: &Reply) -> Option<String> {
    match r {
        Reply::Bulk(Some(b)) => String::from_utf8(b.clone()).ok(),
        Reply::Simple(s) => Some(s.clone()),
        _ => None,
    }
}

/// Parses `YYYY-MM-DD`.
fn parse_date(s: &str) -> Option<i64> {
    let mut parts = s.splitn(3, '-');
    let y: i64 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let d: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || s.len() != 10 {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// The day numbers (as the filter numbers them, in the budgets' time zone) of the window of
/// `period` that holds local day `day`.
fn days_of(period: Period, day: i64, offset_minutes: i32) -> Vec<u64> {
    let offset_ms = i64::from(offset_minutes) * 60_000;
    // Noon of that local day, in Unix ms: inside the day whatever the offset.
    let noon = day * DAY_MS as i64 + DAY_MS as i64 / 2 - offset_ms;
    let w = period.window(u64::try_from(noon).unwrap_or(0), offset_minutes);
    let local = |t: u64| (i64::try_from(t).unwrap_or(0) + offset_ms).div_euclid(DAY_MS as i64);
    (local(w.start_ms)..local(w.end_ms))
        .filter_map(|d| u64::try_from(d).ok())
        .collect()
}

/// `tollgate spend`.
pub fn run(p: &Parsed, ctx: &mut Ctx) -> Result<(), Failure> {
    if let Some(extra) = p.positionals.first() {
        return Err(Failure::Usage(format!("unexpected argument {extra:?}")));
    }
    let period = match p.value("window").unwrap_or("month") {
        "day" => Period::Day,
        "week" => Period::Week,
        "month" => Period::Month,
        other => {
            return Err(Failure::Usage(format!(
                "--window must be day, week or month, not {other:?}"
            )))
        }
    };
    let offset: i32 = match p.value("utc-offset-minutes") {
        None => 0,
        Some(v) => v
            .parse()
            .ok()
            .filter(|o: &i32| (-720..=840).contains(o))
            .ok_or_else(|| {
                Failure::Usage("--utc-offset-minutes must be between -720 and 840".into())
            })?,
    };
    let day = match p.value("date") {
        Some(d) => {
            parse_date(d).ok_or_else(|| Failure::Usage(format!("--date {d:?}: use YYYY-MM-DD")))?
        }
        None => {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            let now = i64::try_from(now).unwrap_or(0) + i64::from(offset) * 60_000;
            now.div_euclid(DAY_MS as i64)
        }
    };
    let addr = p.value("redis").unwrap_or("127.0.0.1:6379");
    let currency = p.value("currency").unwrap_or("USD");
    let only = p.value("client");
    let mut redis = Redis::connect(addr).map_err(Failure::Io)?;
    if let Some(var) = p.value("password-env") {
        let password = (ctx.env)(var)
            .ok_or_else(|| Failure::Usage(format!("environment variable {var} is not set")))?;
        redis.call(&["AUTH", &password]).map_err(Failure::Io)?;
    }
    let mut totals: BTreeMap<(String, String), u64> = BTreeMap::new();
    let days = days_of(period, day, offset);
    for d in &days {
        let pattern = format!("{SPEND_KEY_PREFIX}{d}:*");
        let mut keys: Vec<String> = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let reply = redis
                .call(&["SCAN", &cursor, "MATCH", &pattern, "COUNT", "1000"])
                .map_err(Failure::Io)?;
            let Reply::Array(parts) = reply else {
                return Err(Failure::Io("unexpected SCAN reply".into()));
            };
            let (Some(next), Some(Reply::Array(found))) =
                (parts.first().and_then(bulk_string), parts.get(1))
            else {
                return Err(Failure::Io("unexpected SCAN reply".into()));
            };
            keys.extend(found.iter().filter_map(bulk_string));
            if next == "0" {
                break;
            }
            cursor = next;
        }
        keys.sort();
        keys.dedup();
        for chunk in keys.chunks(500) {
            let mut args = vec!["MGET"];
            args.extend(chunk.iter().map(String::as_str));
            let Reply::Array(values) = redis.call(&args).map_err(Failure::Io)? else {
                return Err(Failure::Io("unexpected MGET reply".into()));
            };
            for (key, value) in chunk.iter().zip(values) {
                let n: u64 = bulk_string(&value)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                // `<day>:<client>:<model>`: client names have no ':', model names may.
                let rest = key.get(SPEND_KEY_PREFIX.len()..).unwrap_or_default();
                let mut parts = rest.splitn(3, ':');
                let (_, Some(client), Some(model)) = (parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if only.is_some_and(|c| c != client) {
                    continue;
                }
                *totals
                    .entry((client.to_string(), model.to_string()))
                    .or_default() += n;
            }
        }
    }
    let (first, last) = (
        days.first().copied().unwrap_or(0),
        days.last().copied().unwrap_or(0),
    );
    let date = |d: u64| {
        let (y, m, dd) = tollgate_core::spend::civil_from_days(i64::try_from(d).unwrap_or(0));
        format!("{y:04}-{m:02}-{dd:02}")
    };
    let total: u64 = totals.values().sum();
    if p.flag("json") {
        let rows: Vec<serde_json::Value> = totals
            .iter()
            .map(|((c, m), n)| serde_json::json!({"client": c, "model": m, "micros": n}))
            .collect();
        let out = serde_json::json!({
            "window": period.as_str(),
            "from": date(first),
            "to": date(last),
            "currency": currency,
            "spend": rows,
            "total_micros": total,
        });
        writeln!(ctx.out, "{out}")?;
        return Ok(());
    }
    writeln!(
        ctx.out,
        "spend per client and model, {} {} to {} (UTC{:+}min), in {currency}:",
        period.as_str(),
        date(first),
        date(last),
        offset
    )?;
    let cw = totals
        .keys()
        .map(|(c, _)| c.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let mw = totals
        .keys()
        .map(|(_, m)| m.len())
        .max()
        .unwrap_or(5)
        .max(5);
    writeln!(
        ctx.out,
        "  {:<cw$}  {:<mw$}  {:>14}",
        "client", "model", "spend"
    )?;
    for ((c, m), n) in &totals {
        writeln!(ctx.out, "  {c:<cw$}  {m:<mw$}  {:>14}", format_micros(*n))?;
    }
    writeln!(
        ctx.out,
        "  {:<cw$}  {:<mw$}  {:>14}",
        "total",
        "",
        format_micros(total)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read() {
        let mut r: &[u8] = b"*2\r\n$1\r\n0\r\n*2\r\n$3\r\nabc\r\n$-1\r\n";
        assert_eq!(
            read_reply(&mut r, 0),
            Ok(Reply::Array(vec![
                Reply::Bulk(Some(b"0".to_vec())),
                Reply::Array(vec![Reply::Bulk(Some(b"abc".to_vec())), Reply::Bulk(None)])
            ]))
        );
        let mut r: &[u8] = b"-NOAUTH Authentication required.\r\n";
        assert_eq!(
            read_reply(&mut r, 0),
            Ok(Reply::Error("NOAUTH Authentication required.".into()))
        );
        let mut r: &[u8] = b"HTTP/1.1 400\r\n";
        assert!(read_reply(&mut r, 0).is_err());
    }

    #[test]
    fn windows_in_days() {
        let d = parse_date("2026-12-05").unwrap();
        assert_eq!(days_of(Period::Day, d, 0), vec![d as u64]);
        let week = days_of(Period::Week, d, 0);
        assert_eq!(week.len(), 7);
        assert_eq!(week[0], parse_date("2026-11-30").unwrap() as u64);
        let month = days_of(Period::Month, d, -300);
        assert_eq!(month.len(), 31);
        assert_eq!(month[0], parse_date("2026-12-01").unwrap() as u64);
        assert_eq!(parse_date("2026-13-01"), None);
        assert_eq!(parse_date("2026-1-01"), None);
    }
}
