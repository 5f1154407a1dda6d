//! Money: prices per model, what a response cost, and the calendar windows of budgets.
//!
//! Amounts are integers in **micro-units** of the one configured currency (1 USD =
//! 1,000,000 micro-units), so that every sum is exact and Prometheus counters stay integers.
//! A price is kept in micro-units per million tokens; a response's cost is
//! `(uncached input x input price + cached input x cached price + cache writes x cache-write
//! price + output x output price) / 10^6`,
//! rounded **up** to the next micro-unit, once per response.

use crate::types::Usage;

/// One million: tokens in a priced unit, and micro-units in a currency unit.
pub const MILLION: u64 = 1_000_000;

/// A model's prices, in micro-units of the currency per million tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    /// The model, as the provider bills it (after aliasing).
    pub model: String,
    /// Uncached input (prompt) tokens.
    pub input: u64,
    /// Input tokens served from the provider's prompt cache.
    pub cached_input: u64,
    /// Input tokens written to the provider's prompt cache (Anthropic bills them above input).
    pub cache_write_input: u64,
    /// Output (completion) tokens, reasoning tokens included.
    pub output: u64,
}

/// Index of a price in [`Prices::models`].
pub type PriceId = usize;

/// The price table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Prices {
    /// ISO 4217 code of the currency every amount is in.
    pub currency: String,
    /// Prices in configuration order.
    pub models: Vec<Price>,
}

impl Prices {
    /// The price of `model` (exact name), if the table has one.
    pub fn find(&self, model: &str) -> Option<PriceId> {
        self.models.iter().position(|p| p.model == model)
    }

    /// The price with this id.
    pub fn get(&self, id: PriceId) -> Option<&Price> {
        self.models.get(id)
    }
}

fn micros(sum: u128) -> u64 {
    u64::try_from(sum.div_ceil(u128::from(MILLION))).unwrap_or(u64::MAX)
}

impl Price {
    /// What a reported usage costs.
    pub fn cost(&self, u: &Usage) -> u64 {
        let cached = u.cached_tokens.min(u.prompt_tokens);
        let written = u.cache_write_tokens.min(u.prompt_tokens - cached);
        let uncached = u.prompt_tokens - cached - written;
        let part = |tokens: u64, price: u64| u128::from(tokens) * u128::from(price);
        micros(
            part(uncached, self.input)
                .saturating_add(part(cached, self.cached_input))
                .saturating_add(part(written, self.cache_write_input))
                .saturating_add(part(u.completion_tokens, self.output)),
        )
    }

    /// What `prompt` input tokens (none cached) and `completion` output tokens cost: the
    /// reservation at admission (the prompt estimate and the request's output limit).
    pub fn estimate(&self, prompt: u64, completion: u64) -> u64 {
        self.cost(&Usage::new(prompt, completion))
    }
}

/// Formats micro-units as a decimal amount: `1234567` is `1.234567`, `5000000` is `5`.
pub fn format_micros(m: u64) -> String {
    let (whole, frac) = (m / MILLION, m % MILLION);
    if frac == 0 {
        return whole.to_string();
    }
    let frac = format!("{frac:06}");
    format!("{whole}.{}", frac.trim_end_matches('0'))
}

/// Reads a non-negative decimal amount (a JSON number) as micro-units: at most six decimals,
/// at most `max` whole units.
pub fn parse_micros(v: f64, max: u64) -> Result<u64, String> {
    if !v.is_finite() || v < 0.0 {
        return Err(format!("must be a number >= 0, got {v}"));
    }
    if v > max as f64 {
        return Err(format!("must be at most {max}, got {v}"));
    }
    let scaled = v * MILLION as f64;
    let rounded = scaled.round();
    // f64 holds 15-16 significant digits: a written amount with at most six decimals and a
    // whole part below `max` comes back within this of an integer.
    if (scaled - rounded).abs() > 1e-3 {
        return Err(format!("at most six decimals (micro-units), got {v}"));
    }
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(rounded as u64)
}

// ---------------------------------------------------------------------------------------------
// Calendar windows.

/// The length of a budget's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Period {
    /// A wall-clock minute.
    Minute,
    /// An hour.
    Hour,
    /// A day, from midnight in the budgets' time zone.
    Day,
    /// An ISO week: Monday 00:00 to Monday 00:00.
    Week,
    /// A calendar month: the 1st 00:00 to the next 1st.
    Month,
}

const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

impl Period {
    /// Every period, shortest first.
    pub const ALL: [Period; 5] = [
        Period::Minute,
        Period::Hour,
        Period::Day,
        Period::Week,
        Period::Month,
    ];

    /// The configuration's word, also used in headers, Redis keys and the budget endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The period of a configuration word.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }

    /// A one-byte tag (the local limiter's record).
    pub fn tag(self) -> u8 {
        match self {
            Period::Minute => 1,
            Period::Hour => 2,
            Period::Day => 3,
            Period::Week => 4,
            Period::Month => 5,
        }
    }

    /// The period of a tag.
    pub fn from_tag(tag: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.tag() == tag)
    }

    /// The window `now_ms` falls in, with `offset_minutes` added to UTC: its number (minutes,
    /// hours or days since the epoch, ISO weeks since the Monday before it, or months since
    /// January 1970), and its start and end in Unix milliseconds.
    pub fn window(self, now_ms: u64, offset_minutes: i32) -> Window {
        let offset = i64::from(offset_minutes) * MINUTE_MS;
        let local = i64::try_from(now_ms)
            .unwrap_or(i64::MAX)
            .saturating_add(offset);
        let (id, start, end) = match self {
            Period::Minute => fixed(local, MINUTE_MS),
            Period::Hour => fixed(local, HOUR_MS),
            Period::Day => fixed(local, DAY_MS),
            Period::Week => {
                // 1970-01-01 was a Thursday: Monday 1969-12-29 starts week 0.
                let shifted = local.saturating_add(3 * DAY_MS);
                let (id, start, end) = fixed(shifted, 7 * DAY_MS);
                (id, start - 3 * DAY_MS, end - 3 * DAY_MS)
            }
            Period::Month => {
                let day = local.div_euclid(DAY_MS);
                let (y, m, _) = civil_from_days(day);
                let id = y * 12 + i64::from(m) - 1 - 1970 * 12;
                let start = days_from_civil(y, m, 1) * DAY_MS;
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let end = days_from_civil(ny, nm, 1) * DAY_MS;
                (id, start, end)
            }
        };
        let to_unix = |t: i64| u64::try_from(t.saturating_sub(offset)).unwrap_or(0);
        Window {
            id: u64::try_from(id).unwrap_or(0),
            start_ms: to_unix(start),
            end_ms: to_unix(end),
        }
    }
}

fn fixed(t: i64, len: i64) -> (i64, i64, i64) {
    let id = t.div_euclid(len);
    (id, id * len, (id + 1) * len)
}

/// One window of a period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Its number (see [`Period::window`]).
    pub id: u64,
    /// Its start, Unix ms.
    pub start_ms: u64,
    /// Its end (the next window's start), Unix ms.
    pub end_ms: u64,
}

impl Window {
    /// Milliseconds from `now_ms` to the end (at least 1).
    pub fn reset_ms(&self, now_ms: u64) -> u64 {
        self.end_ms.saturating_sub(now_ms).max(1)
    }
}

/// Days since 1970-01-01 of a date (Howard Hinnant's civil calendar algorithms, proleptic
/// Gregorian).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date (year, month, day) of a day number since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = u32::try_from(doy - (153 * mp + 2) / 5 + 1).unwrap_or(1);
    let m = u32::try_from(if mp < 10 { mp + 3 } else { mp - 9 }).unwrap_or(1);
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Measure {
    /// Requests admitted.
    Requests,
    /// Tokens (input + output).
    Tokens,
    /// Money, in micro-units.
    Money,
}

impl Measure {
    /// Every measure.
    pub const ALL: [Measure; 3] = [Measure::Requests, Measure::Tokens, Measure::Money];

    /// Word used in headers, keys, metrics and the budget endpoint.
    pub fn as_str(self) -> &'static str {
        match self {
            Measure::Requests => "requests",
            Measure::Tokens => "tokens",
            Measure::Money => "money",
        }
    }

    /// Dense index.
    pub fn index(self) -> usize {
        match self {
            Measure::Requests => 0,
            Measure::Tokens => 1,
            Measure::Money => 2,
        }
    }
}

/// A client's budget over one period: limits on any of requests, tokens and money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Its window.
    pub period: Period,
    /// Limits indexed by [`Measure::index`]; money in micro-units.
    pub limits: [Option<u64>; 3],
}

impl Budget {
    /// The limit of one measure.
    pub fn limit(&self, m: Measure) -> Option<u64> {
        self.limits.get(m.index()).copied().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: u64, cached: u64, output: u64) -> Price {
        Price {
            model: "m".into(),
            input,
            cached_input: cached,
            cache_write_input: input,
            output,
        }
    }

    #[test]
    fn costs_round_up_once_per_response() {
        // $2 / $0.50 / $8 per million tokens.
        let p = price(2_000_000, 500_000, 8_000_000);
        assert_eq!(p.cost(&Usage::new(1000, 500)), 2000 + 4000);
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 500,
            cached_tokens: 600,
            reasoning_tokens: 200,
            cache_write_tokens: 0,
        };
        // 400 x 2 + 600 x 0.5 + 500 x 8 (reasoning is part of the output).
        assert_eq!(p.cost(&u), 800 + 300 + 4000);
        // Anthropic's cache: $3 input, $0.30 reads, $3.75 writes, $15 output per million.
        let claude = Price {
            cache_write_input: 3_750_000,
            ..price(3_000_000, 300_000, 15_000_000)
        };
        let u = Usage {
            prompt_tokens: 1000,
            completion_tokens: 100,
            cached_tokens: 600,
            reasoning_tokens: 0,
            cache_write_tokens: 300,
        };
        // 100 x 3 + 600 x 0.3 + 300 x 3.75 + 100 x 15.
        assert_eq!(claude.cost(&u), 300 + 180 + 1125 + 1500);
        // Details larger than the total never make a negative uncached count.
        let odd = Usage {
            cache_write_tokens: 5000,
            ..u
        };
        assert_eq!(claude.cost(&odd), 180 + 400 * 15 / 4 + 1500);
        // $0.42 per million: 3 tokens are 1.26 micro-units, charged 2.
        assert_eq!(price(420_000, 0, 0).cost(&Usage::new(3, 0)), 2);
        assert_eq!(p.cost(&Usage::default()), 0);
        assert_eq!(p.estimate(10, 5), 20 + 40);
        let huge = price(u64::MAX, u64::MAX, u64::MAX);
        assert_eq!(huge.cost(&Usage::new(u64::MAX, u64::MAX)), u64::MAX);
    }

    #[test]
    fn amounts() {
        assert_eq!(parse_micros(2.5, 1000), Ok(2_500_000));
        assert_eq!(parse_micros(0.42, 1000), Ok(420_000));
        assert_eq!(parse_micros(0.000001, 1000), Ok(1));
        assert_eq!(parse_micros(0.0, 1000), Ok(0));
        assert!(parse_micros(0.0000001, 1000).is_err());
        assert!(parse_micros(-1.0, 1000).is_err());
        assert!(parse_micros(1001.0, 1000).is_err());
        assert_eq!(format_micros(2_500_000), "2.5");
        assert_eq!(format_micros(5_000_000), "5");
        assert_eq!(format_micros(1), "0.000001");
    }

    const DAY: u64 = 86_400_000;

    #[test]
    fn calendar_windows() {
        // 2026-12-05 16:00:00 UTC, a Saturday.
        let t = 1_796_486_400_000;
        let day = Period::Day.window(t, 0);
        assert_eq!(day.start_ms, 1_796_428_800_000);
        assert_eq!(day.end_ms, day.start_ms + DAY);
        let week = Period::Week.window(t, 0);
        // Monday 2026-11-30 to Monday 2026-12-07.
        assert_eq!(week.start_ms, 1_796_428_800_000 - 5 * DAY);
        assert_eq!(week.end_ms, week.start_ms + 7 * DAY);
        let month = Period::Month.window(t, 0);
        assert_eq!(month.start_ms, 1_796_428_800_000 - 4 * DAY);
        assert_eq!(month.end_ms, 1_796_428_800_000 + 27 * DAY);
        assert_eq!(month.id, (2026 - 1970) * 12 + 11);
        // Week 0 starts on Monday 1969-12-29.
        assert_eq!(Period::Week.window(0, 0).id, 0);
        assert_eq!(Period::Week.window(4 * DAY, 0).id, 1);
        assert_eq!(Period::Week.window(4 * DAY - 1, 0).id, 0);
        // UTC+2: the day starts at 22:00 UTC the day before.
        let d2 = Period::Day.window(t, 120);
        assert_eq!(d2.start_ms, day.start_ms - 2 * 3_600_000);
        assert_eq!(
            Period::Day.window(day.end_ms - 7_200_000, 120).id,
            d2.id + 1
        );
        // UTC-5: Saturday 16:00 UTC is Saturday 11:00.
        assert_eq!(Period::Day.window(t, -300).id, day.id);
        // February in a leap year, December to January.
        let feb = Period::Month.window(1_709_251_199_000, 0); // 2024-02-29 23:59:59
        assert_eq!(feb.end_ms - feb.start_ms, 29 * DAY);
        let dec = Period::Month.window(1_735_689_599_000, 0); // 2024-12-31 23:59:59
        assert_eq!(dec.end_ms, 1_735_689_600_000);
        assert_eq!(Period::Minute.window(61_000, 0).reset_ms(61_000), 59_000);
        for p in Period::ALL {
            assert_eq!(Period::from_tag(p.tag()), Some(p));
            assert_eq!(Period::from_name(p.as_str()), Some(p));
            let w = p.window(t, 330);
            assert!(w.start_ms <= t && t < w.end_ms, "{p:?}");
        }
    }
}
